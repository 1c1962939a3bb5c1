"""The Ollama client against the stand-in (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhd.errors import MergeError
from mhd.merge.ollama import OllamaClient, OllamaError, file_digest, normalize_name
from tests.support.ollama_standin import ADAPTERS_UNSUPPORTED, OllamaStandIn


@pytest.fixture
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn(version="0.33.0") as s:
        s.add_model("qwen3:8b")
        yield s


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with(url: str, fn: Any, **kw: Any) -> Any:
    async with OllamaClient(url, **kw) as c:
        return await fn(c)


def test_version_and_tags(ollama: OllamaStandIn) -> None:
    assert run(_with(ollama.url, lambda c: c.version())) == "0.33.0"
    ollama.version = "0.34.1"
    assert run(_with(ollama.url, lambda c: c.version())) == "0.34.1"
    names = run(_with(ollama.url, lambda c: c.model_names()))
    assert names == {"qwen3:8b"}
    assert run(_with(ollama.url, lambda c: c.has_model("qwen3:8b")))
    assert not run(_with(ollama.url, lambda c: c.has_model("qwen3")))  # qwen3 means qwen3:latest


def test_normalize_name_adds_latest_only_when_untagged() -> None:
    assert normalize_name("mhd-1") == "mhd-1:latest"
    assert normalize_name("mhd:latest") == "mhd:latest"
    assert normalize_name("me/mhd") == "me/mhd:latest"
    assert normalize_name("host:11434/me/mhd:v1") == "host:11434/me/mhd:v1"


def test_blob_upload_streams_the_file_and_is_skipped_when_present(ollama: OllamaStandIn, tmp_path: Path) -> None:
    f = tmp_path / "adapter.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 9000)  # ~2.3 MB: several 1 MiB chunks
    digest = "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    assert run(file_digest(f)) == digest
    lines: list[str] = []
    assert run(_with(ollama.url, lambda c: c.push_blob(f, log=lines.append))) == digest
    assert ollama.blobs == {digest: f.stat().st_size}
    posts = ollama.requests_to("/api/blobs", "POST")
    assert len(posts) == 1 and posts[0].body == {"bytes": f.stat().st_size}

    run(_with(ollama.url, lambda c: c.push_blob(f, log=lines.append)))
    assert len(ollama.requests_to("/api/blobs", "POST")) == 1  # HEAD found it: no second upload
    assert any("upload skipped" in ln for ln in lines)


def test_blob_digest_mismatch_is_refused(ollama: OllamaStandIn, tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(OllamaError, match="digest mismatch") as exc:
        run(_with(ollama.url, lambda c: c.push_blob(f, digest=wrong)))
    assert exc.value.status == 400
    assert ollama.blobs == {}


def test_create_streams_status_lines_to_the_log(ollama: OllamaStandIn, tmp_path: Path) -> None:
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF-adapter")
    lines: list[str] = []

    async def go(c: OllamaClient) -> None:
        digest = await c.push_blob(f)
        await c.create("mhd-x", from_="qwen3:8b", adapters={"adapter.gguf": digest}, log=lines.append)

    run(_with(ollama.url, go))
    assert lines[-1] == "success"
    assert "creating adapter layer" in lines and "writing manifest" in lines
    body = ollama.create_bodies()[0]
    assert body["model"] == "mhd-x" and body["from"] == "qwen3:8b"
    assert list(body["adapters"]) == ["adapter.gguf"]
    assert "mhd-x:latest" in ollama.models


def test_create_with_adapters_is_refused_from_0_34_1_like_the_real_server(ollama: OllamaStandIn,
                                                                          tmp_path: Path) -> None:
    ollama.version = "0.34.1"
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF-adapter")

    async def go(c: OllamaClient) -> None:
        await c.create("mhd-x", from_="qwen3:8b", adapters={"adapter.gguf": await c.push_blob(f)})

    with pytest.raises(OllamaError) as exc:
        run(_with(ollama.url, go))
    assert exc.value.status == 400 and exc.value.server_message == ADAPTERS_UNSUPPORTED


def test_error_line_in_the_create_stream_is_a_merge_error(ollama: OllamaStandIn) -> None:
    ollama.fail_next("/api/create", 200, "write manifest: disk full", mid_stream=True)
    lines: list[str] = []
    with pytest.raises(MergeError, match="create mhd-x failed: write manifest: disk full"):
        run(_with(ollama.url, lambda c: c.create("mhd-x", from_="qwen3:8b", log=lines.append)))
    assert lines  # progress before the failure reached the log
    assert "mhd-x:latest" not in ollama.models


def test_create_from_a_missing_base_fails_with_the_server_reason(ollama: OllamaStandIn) -> None:
    with pytest.raises(MergeError, match="pull model manifest"):
        run(_with(ollama.url, lambda c: c.create("mhd-x", from_="nope:1b")))


def test_copy_delete_and_their_404s(ollama: OllamaStandIn) -> None:
    async def go(c: OllamaClient) -> tuple[bool, bool]:
        await c.copy("qwen3:8b", "mine:latest")
        first = await c.delete("mine")
        again = await c.delete("mine")
        return first, again

    assert run(_with(ollama.url, go)) == (True, False)
    with pytest.raises(OllamaError, match="not found") as exc:
        run(_with(ollama.url, lambda c: c.copy("ghost", "x")))
    assert exc.value.status == 404
    with pytest.raises(OllamaError):
        run(_with(ollama.url, lambda c: c.delete("ghost", missing_ok=False)))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_returns_the_reply(ollama: OllamaStandIn, stream: bool) -> None:
    ollama.reply = "Hi there, friend."
    reply = run(_with(ollama.url, lambda c: c.chat("qwen3:8b", [{"role": "user", "content": "hi"}], stream=stream)))
    assert reply == "Hi there, friend."
    assert ollama.requests_to("/api/chat")[-1].body["stream"] is stream


def test_chat_failures(ollama: OllamaStandIn) -> None:
    with pytest.raises(OllamaError, match="not found") as exc:
        run(_with(ollama.url, lambda c: c.chat("ghost", [{"role": "user", "content": "hi"}])))
    assert exc.value.status == 404
    ollama.fail_next("/api/chat", 500, "llama runner process has terminated")
    with pytest.raises(OllamaError, match="runner process has terminated"):
        run(_with(ollama.url, lambda c: c.chat("qwen3:8b", [{"role": "user", "content": "hi"}])))
    ollama.fail_next("/api/chat", 200, "out of memory", mid_stream=True)
    with pytest.raises(OllamaError, match="out of memory"):
        run(_with(ollama.url, lambda c: c.chat("qwen3:8b", [{"role": "user", "content": "hi"}], stream=True)))


def test_unreachable_server_gives_an_actionable_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nothing listens there
    with pytest.raises(MergeError, match=r"Is Ollama running .*merge\.ollama_url") as exc:
        run(_with(f"http://127.0.0.1:{port}", lambda c: c.version()))
    assert isinstance(exc.value, OllamaError) and exc.value.status is None


def test_non_ollama_server_is_named(ollama: OllamaStandIn) -> None:
    with pytest.raises(MergeError, match="HTTP 404"):
        run(_with(ollama.url + "/nothing-here", lambda c: c.version()))


def test_transport_is_injectable(ollama: OllamaStandIn) -> None:
    seen: list[str] = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}")
            return await super().handle_async_request(request)

    assert run(_with(ollama.url, lambda c: c.version(), transport=Recording())) == "0.33.0"
    assert seen == ["GET /api/version"]


def test_standin_accepts_chunked_uploads_and_checks_their_digest(ollama: OllamaStandIn) -> None:
    data = b"x" * 300_000

    async def gen() -> Any:
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    async def go() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=ollama.url) as c:
            good = "sha256:" + hashlib.sha256(data).hexdigest()
            r1 = await c.post(f"/api/blobs/{good}", content=gen())  # no length: chunked
            r2 = await c.post(f"/api/blobs/sha256:{'1' * 64}", content=gen())
            return r1.status_code, r2.status_code

    assert run(go()) == (201, 400)
