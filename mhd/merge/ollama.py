"""A small async client for the parts of Ollama's HTTP API that registering a model needs.

Endpoints (Ollama's documented API): ``GET /api/version``, ``HEAD``/``POST /api/blobs/sha256:<hex>``,
``POST /api/create`` (streams ``{"status": …}`` lines; an ``{"error": …}`` line ends it on
failure), ``POST /api/copy``, ``DELETE /api/delete``, ``GET /api/tags``, ``POST /api/chat``.

Every failure leaves this module as :class:`OllamaError` (a :class:`~mhd.errors.MergeError`) whose
message names the operation, the server and what to check; ``status`` keeps the HTTP status
(``None`` when the server was not reached). The transport is injectable (``transport=``) like any
httpx client, so tests can swap it; the project's tests use a real local stand-in server instead.

Request bodies are never logged or put into error messages (prompts may be personal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from mhd.errors import MergeError
from mhd.hashing import sha256_file

Log = Callable[[str], None]

CHUNK = 1 << 20  # file reads for hashing and upload: 1 MiB keeps memory flat for multi-GB GGUFs
DEFAULT_TIMEOUT = 30.0
# create (copies/reads a multi-GB blob), blob upload and the first chat (loads the model into
# memory) can each take minutes on a big model: the gap allowed between two bytes.
LONG_TIMEOUT = 1800.0


class OllamaError(MergeError):
    def __init__(self, message: str, status: int | None = None, server_message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


def normalize_name(name: str) -> str:
    """Ollama's canonical form: a name without a tag means ``:latest`` (``mhd-x`` == ``mhd-x:latest``)."""
    head, _, last = name.rpartition("/")
    if ":" not in last:
        last += ":latest"
    return f"{head}/{last}" if head else last


async def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, streamed, off the event loop."""
    return await asyncio.to_thread(blob_digest, path)


def _server_error(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    text = resp.text.strip()
    return text[:300] if text else resp.reason_phrase or f"HTTP {resp.status_code}"


class OllamaClient:
    """One Ollama server. Use as ``async with OllamaClient(url) as ollama: …``."""

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = DEFAULT_TIMEOUT, long_timeout: float = LONG_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self._long = httpx.Timeout(timeout, read=long_timeout, write=long_timeout)
        self._http = httpx.AsyncClient(base_url=self.base_url, transport=transport,
                                       timeout=httpx.Timeout(timeout))

    async def __aenter__(self) -> OllamaClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # Plumbing ------------------------------------------------------------------------------
    def _unreachable(self, op: str, exc: httpx.HTTPError) -> OllamaError:
        if isinstance(exc, httpx.TimeoutException):
            why = f"timed out ({type(exc).__name__})"
        else:
            why = str(exc) or type(exc).__name__
        return OllamaError(
            f"Ollama at {self.base_url}: {op} failed: {why}. Is Ollama running (`ollama serve`) and is "
            "merge.ollama_url right?"
        )

    def _failed(self, op: str, resp: httpx.Response, hint: str = "") -> OllamaError:
        msg = _server_error(resp)
        return OllamaError(
            f"Ollama at {self.base_url}: {op} failed (HTTP {resp.status_code}): {msg}{hint}",
            status=resp.status_code, server_message=msg,
        )

    async def _request(self, op: str, method: str, path: str, *, ok: Sequence[int] = (200,),
                       **kwargs: Any) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(op, exc) from exc
        if resp.status_code not in ok:
            raise self._failed(op, resp)
        return resp

    # API -----------------------------------------------------------------------------------
    async def version(self) -> str:
        resp = await self._request("GET /api/version", "GET", "/api/version")
        try:
            return str(resp.json()["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise OllamaError(f"{self.base_url}/api/version did not answer like Ollama: {resp.text[:200]!r}; "
                              "check merge.ollama_url") from exc

    async def blob_exists(self, digest: str) -> bool:
        resp = await self._request(f"HEAD /api/blobs/{digest}", "HEAD", f"/api/blobs/{digest}", ok=(200, 404))
        return resp.status_code == 200

    async def push_blob(self, path: Path, *, digest: str | None = None, log: Log | None = None) -> str:
        """Upload ``path`` as a blob unless the server already has it; return its digest.

        Streams the file (never whole in memory) with an explicit Content-Length.
        """
        digest = digest or await file_digest(path)
        if await self.blob_exists(digest):
            if log:
                log(f"blob {digest[:19]}… already on the server: upload skipped")
            return digest
        size = path.stat().st_size
        if log:
            log(f"uploading {path.name} ({size / 1e6:.1f} MB) as {digest[:19]}…")

        async def chunks() -> AsyncIterator[bytes]:
            sent, next_report = 0, size // 10
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    sent += len(chunk)
                    if log and size >= 100 * CHUNK and sent >= next_report:
                        log(f"upload {100 * sent // size}%")
                        next_report += size // 10
                    yield chunk

        op = f"POST /api/blobs/{digest[:19]}…"
        try:
            resp = await self._http.post(f"/api/blobs/{digest}", content=chunks(),
                                         headers={"Content-Length": str(size)}, timeout=self._long)
        except httpx.HTTPError as exc:
            raise self._unreachable(op, exc) from exc
        if resp.status_code not in (200, 201):
            raise self._failed(op, resp, " (the file changed while uploading?)" if resp.status_code == 400 else "")
        return digest

    async def create(self, model: str, *, from_: str | None = None, files: Mapping[str, str] | None = None,
                     adapters: Mapping[str, str] | None = None, template: str | None = None,
                     system: str | None = None, parameters: Mapping[str, Any] | None = None,
                     log: Log | None = None) -> None:
        """``POST /api/create``; each new status line goes to ``log``; returns on ``success``."""
        body: dict[str, Any] = {"model": model, "stream": True}
        for key, value in (("from", from_), ("files", files), ("adapters", adapters), ("template", template),
                           ("system", system), ("parameters", parameters)):
            if value is not None:
                body[key] = dict(value) if isinstance(value, Mapping) else value
        op = f"create {model}"
        last = ""
        async with contextlib.aclosing(self._ndjson(op, "/api/create", body, lenient=True)) as lines:
            async for msg in lines:
                status = str(msg.get("status", ""))
                if status and status != last:
                    last = status
                    if log:
                        log(status)
        if last != "success":
            raise OllamaError(f"Ollama at {self.base_url}: {op}: the stream ended without 'success' "
                              f"(last status: {last or 'none'}); retry")

    async def copy(self, source: str, destination: str) -> None:
        await self._request(f"copy {source} → {destination}", "POST", "/api/copy",
                            json={"source": source, "destination": destination})

    async def delete(self, model: str, *, missing_ok: bool = True) -> bool:
        """Delete a model; False when it was not there (and ``missing_ok``)."""
        op = f"delete {model}"
        resp = await self._request(op, "DELETE", "/api/delete", ok=(200, 404), json={"model": model})
        if resp.status_code == 404:
            if not missing_ok:
                raise self._failed(op, resp)
            return False
        return True

    async def tags(self) -> list[dict[str, Any]]:
        resp = await self._request("GET /api/tags", "GET", "/api/tags")
        try:
            models = resp.json().get("models") or []
        except (ValueError, AttributeError) as exc:
            raise OllamaError(f"{self.base_url}/api/tags did not answer like Ollama") from exc
        return [m for m in models if isinstance(m, dict)]

    async def model_names(self) -> set[str]:
        """Normalized names of the local models (``name`` or ``model`` field)."""
        return {normalize_name(str(m.get("name") or m.get("model"))) for m in await self.tags()
                if m.get("name") or m.get("model")}

    async def has_model(self, name: str) -> bool:
        return normalize_name(name) in await self.model_names()

    async def chat(self, model: str, messages: Sequence[Mapping[str, str]], *,
                   options: Mapping[str, Any] | None = None, stream: bool = False) -> str:
        """The assistant's reply text (streamed replies are joined)."""
        body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages], "stream": stream}
        if options:
            body["options"] = dict(options)
        op = f"chat with {model}"
        if not stream:
            resp = await self._request(op, "POST", "/api/chat", json=body, timeout=self._long)
            try:
                data = resp.json()
            except ValueError as exc:
                raise OllamaError(f"Ollama at {self.base_url}: {op}: reply is not JSON") from exc
            if data.get("error"):
                raise OllamaError(f"Ollama at {self.base_url}: {op} failed: {data['error']}")
            return str((data.get("message") or {}).get("content") or "")
        parts: list[str] = []
        async with contextlib.aclosing(self._ndjson(op, "/api/chat", body, lenient=False)) as lines:
            async for msg in lines:
                parts.append(str((msg.get("message") or {}).get("content") or ""))
                if msg.get("done"):
                    break
        return "".join(parts)

    async def _ndjson(self, op: str, path: str, body: dict[str, Any], *,
                      lenient: bool) -> AsyncGenerator[dict[str, Any], None]:
        """POST ``body`` and yield each line of the streamed (NDJSON) reply as a dict.

        A line carrying ``error`` raises OllamaError. A line that is not a JSON object is skipped
        when ``lenient`` (create: the last status decides), an error otherwise (chat).
        """
        try:
            async with self._http.stream("POST", path, json=body, timeout=self._long) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._failed(op, resp)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        msg = None
                    if not isinstance(msg, dict):
                        if lenient:
                            continue
                        raise OllamaError(f"Ollama at {self.base_url}: {op}: a streamed line is not a JSON object")
                    if msg.get("error"):
                        err = str(msg["error"])
                        raise OllamaError(f"Ollama at {self.base_url}: {op} failed: {err}",
                                          status=resp.status_code, server_message=err)
                    yield msg
        except httpx.HTTPError as exc:
            raise self._unreachable(op, exc) from exc


def blob_digest(path: Path) -> str:
    return "sha256:" + sha256_file(path)
