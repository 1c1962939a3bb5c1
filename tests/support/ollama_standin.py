"""A stand-in Ollama server: real HTTP on 127.0.0.1, following Ollama's documented API.

    with OllamaStandIn(version="0.33.0") as ollama:
        ollama.add_model("qwen3:8b")              # a model the owner pulled (not mhd's)
        url = ollama.url                          # e.g. http://127.0.0.1:41234
        ollama.fail_next("/api/chat", 500)        # the next chat answers 500
        ...
        ollama.models                             # {"qwen3:8b": {...}, ...} (normalized names)
        ollama.blobs                              # {"sha256:…": size}
        ollama.requests                           # [Request(method, path, body), ...]

Endpoints and behaviour (modelled on Ollama's server code, see ``server/routes.go`` and
``server/create.go``):

- ``GET /api/version`` → ``{"version": …}`` (``version`` is settable at any time).
- ``HEAD /api/blobs/sha256:<hex>`` → 200 / 404. ``POST`` the same path with the bytes → 201; the
  digest of what arrived is checked: 400 ``digest mismatch, expected …, got …``. Bodies may be
  sent with Content-Length or chunked; they are hashed as they arrive, not kept.
- ``POST /api/create`` with ``model`` and ``from`` / ``files`` / ``adapters`` / ``template`` /
  ``system`` / ``parameters``: streams ``{"status": …}`` lines ending in ``success`` (or one object
  when ``"stream": false``). From version 0.34.1 on, a non-empty ``adapters`` is refused like the
  real server: 400 ``{"error": "LoRA adapters are no longer supported"}``. Blobs named in
  ``files``/``adapters`` must have been uploaded (400 otherwise); ``from`` must name a local model
  (else a streamed error, as when the real server fails to pull it).
- ``POST /api/copy`` (404 when the source is missing; the copy's entry in ``.models`` gets
  ``copied_from``), ``DELETE /api/delete`` (404 when missing),
  ``GET /api/tags``, ``POST /api/chat`` (streaming and not; 404 for an unknown model).

Fault injection: ``fail_next(route, status, error=…, mid_stream=False, times=1)`` makes the next
request(s) to ``route`` (a path like ``"/api/create"``; ``"/api/blobs"`` covers every blob path,
optionally prefixed by a method: ``"HEAD /api/blobs"``) fail with that status and
``{"error": …}``. ``mid_stream=True`` (create, chat) answers 200, streams a first status line, then
the error line — how the real server reports a failure once streaming has begun.

Everything is guarded by one lock; handlers run on ThreadingHTTPServer threads, so the stand-in
serves an in-process async client and a separate daemon process alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ADAPTERS_REMOVED_IN = (0, 34, 1)
ADAPTERS_UNSUPPORTED = "LoRA adapters are no longer supported"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def normalize(name: str) -> str:
    head, _, last = name.rpartition("/")
    if ":" not in last:
        last += ":latest"
    return f"{head}/{last}" if head else last


def parse_version(v: str) -> tuple[int, int, int]:
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", v)
    return (int(m[1]), int(m[2]), int(m[3])) if m else (0, 0, 0)


@dataclass
class Request:
    method: str
    path: str
    body: Any = None  # parsed JSON for JSON requests; {"bytes": n} for blob uploads


@dataclass
class _Fault:
    method: str | None
    route: str
    status: int
    error: str
    mid_stream: bool
    times: int


@dataclass
class _State:
    version: str
    reply: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    faults: list[_Fault] = field(default_factory=list)


class OllamaStandIn:
    def __init__(self, version: str = "0.33.0", reply: str = "Hello, it's me.") -> None:
        self._lock = threading.RLock()
        self._state = _State(version=version, reply=reply)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle --------------------------------------------------------------------------------
    def start(self) -> OllamaStandIn:
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="ollama-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OllamaStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # Inspection and control (thread-safe snapshots) -----------------------------------------
    @property
    def version(self) -> str:
        with self._lock:
            return self._state.version

    @version.setter
    def version(self, value: str) -> None:
        with self._lock:
            self._state.version = value

    @property
    def reply(self) -> str:
        with self._lock:
            return self._state.reply

    @reply.setter
    def reply(self, value: str) -> None:
        with self._lock:
            self._state.reply = value

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._state.models)

    @property
    def blobs(self) -> dict[str, int]:
        with self._lock:
            return dict(self._state.blobs)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._state.requests)

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[Request]:
        return [r for r in self.requests
                if r.path.startswith(path_prefix) and (method is None or r.method == method)]

    def create_bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests_to("/api/create", "POST")]

    def add_model(self, name: str, **info: Any) -> None:
        """A model that exists without mhd (pulled by the owner)."""
        with self._lock:
            self._state.models[normalize(name)] = {"from": None, "files": {}, "adapters": {}, **info,
                                                   "modified_at": _now_iso()}

    def fail_next(self, route: str, status: int = 500, error: str | None = None, *,
                  mid_stream: bool = False, times: int = 1) -> None:
        method, _, path = route.rpartition(" ")
        with self._lock:
            self._state.faults.append(_Fault(method or None, path, status,
                                             error or f"injected failure ({status})", mid_stream, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._state.faults.clear()

    # Used by the handler ----------------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._state.faults:
                if path.startswith(f.route) and (f.method is None or f.method == method):
                    f.times -= 1
                    if f.times <= 0:
                        self._state.faults.remove(f)
                    return f
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request (it got its error line, a test ended) is normal here.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class _Handler(BaseHTTPRequestHandler):
    standin: OllamaStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures anyway
        pass

    # Body reading -----------------------------------------------------------------------------
    def _iter_body(self, chunk: int = 1 << 16) -> Any:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return
                remaining = size
                while remaining:
                    data = self.rfile.read(min(chunk, remaining))
                    if not data:
                        return
                    remaining -= len(data)
                    yield data
                self.rfile.readline()  # CRLF after each chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(chunk, remaining))
                if not data:
                    return
                remaining -= len(data)
                yield data

    def _json_body(self) -> Any:
        raw = b"".join(self._iter_body())
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"_invalid": raw[:200].decode(errors="replace")}

    # Responses ----------------------------------------------------------------------------------
    def _send_json(self, status: int, obj: Any = None) -> None:
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _stream_line(self, obj: Any) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stream(self, lines: list[Any]) -> None:
        self._start_stream()
        for obj in lines:
            self._stream_line(obj)
        self._end_stream()

    # Dispatch -----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        s = self.standin
        is_blob_post = self.command == "POST" and path.startswith("/api/blobs/")
        body: Any = None
        if not is_blob_post and self.command in ("POST", "DELETE"):
            body = self._json_body()
        fault = s._take_fault(self.command, path)
        if fault is not None and not fault.mid_stream:
            if is_blob_post:
                for _ in self._iter_body():  # drain, so the client sees the answer, not a reset
                    pass
            with s._lock:
                s._state.requests.append(Request(self.command, path, body))
            self._send_json(fault.status, {"error": fault.error})
            return
        routes = {
            ("GET", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("POST", "/api/create"): self._create,
            ("POST", "/api/copy"): self._copy,
            ("DELETE", "/api/delete"): self._delete,
            ("POST", "/api/chat"): self._chat,
        }
        if path.startswith("/api/blobs/") and self.command in ("HEAD", "POST"):
            digest = path.removeprefix("/api/blobs/")
            if self.command == "HEAD":
                with s._lock:
                    s._state.requests.append(Request("HEAD", path))
                self._blob_head(digest)
            else:
                self._blob_post(digest, path)
            return
        with s._lock:
            s._state.requests.append(Request(self.command, path, body))
        fn = routes.get((self.command, path))
        if fn is None:
            self._send_json(404, {"error": "404 page not found"})
            return
        fn(body, fault)

    # Handlers -----------------------------------------------------------------------------------
    def _version(self, body: Any, fault: _Fault | None) -> None:
        self._send_json(200, {"version": self.standin.version})

    def _blob_head(self, digest: str) -> None:
        if not _DIGEST.match(digest):
            self._send_json(400, {"error": f"invalid digest format {digest!r}"})
            return
        with self.standin._lock:
            present = digest in self.standin._state.blobs
        if present:
            self._send_json(200)
        else:
            self._send_json(404, {"error": f'blob "{digest}" not found'})

    def _blob_post(self, digest: str, path: str) -> None:
        h = hashlib.sha256()
        n = 0
        for data in self._iter_body():
            h.update(data)
            n += len(data)
        with self.standin._lock:
            self.standin._state.requests.append(Request("POST", path, {"bytes": n}))
        if not _DIGEST.match(digest):
            self._send_json(400, {"error": f"invalid digest format {digest!r}"})
            return
        got = "sha256:" + h.hexdigest()
        if got != digest:
            self._send_json(400, {"error": f'digest mismatch, expected "{digest}", got "{got}"'})
            return
        with self.standin._lock:
            self.standin._state.blobs[digest] = n
        self._send_json(201)

    def _tags(self, body: Any, fault: _Fault | None) -> None:
        with self.standin._lock:
            models = copy.deepcopy(self.standin._state.models)
        out = []
        for name, info in sorted(models.items()):
            digest = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()
            out.append({"name": name, "model": name, "modified_at": info.get("modified_at"),
                        "size": sum(self.standin.blobs.get(d, 0) for d in
                                    [*info.get("files", {}).values(), *info.get("adapters", {}).values()]),
                        "digest": digest,
                        "details": {"format": "gguf", "family": info.get("family", "qwen3"),
                                    "parent_model": info.get("from") or ""}})
        self._send_json(200, {"models": out})

    def _create(self, body: Any, fault: _Fault | None) -> None:
        s = self.standin
        if not isinstance(body, dict) or "_invalid" in body:
            self._send_json(400, {"error": "missing request body" if body is None else "invalid JSON"})
            return
        name = body.get("model") or body.get("name")
        if not name:
            self._send_json(400, {"error": "invalid model name"})
            return
        adapters = body.get("adapters") or {}
        files = body.get("files") or {}
        if adapters and parse_version(s.version) >= ADAPTERS_REMOVED_IN:
            self._send_json(400, {"error": ADAPTERS_UNSUPPORTED})
            return
        with s._lock:
            missing = [d for d in [*files.values(), *adapters.values()] if d not in s._state.blobs]
        if missing:
            self._send_json(400, {"error": f"open blob {missing[0]}: no such file or directory"})
            return
        if not body.get("from") and not files:
            self._send_json(400, {"error": "neither 'from' or 'files' was specified"})
            return
        lines: list[dict[str, Any]] = []
        src = body.get("from")
        if src:
            with s._lock:
                known = normalize(src) in s._state.models
            if not known:
                self._stream([{"status": "pulling manifest"},
                              {"error": "pull model manifest: file does not exist"}])
                return
            lines.append({"status": "using existing layer sha256:" + "0" * 64})
        for d in files.values():
            lines.append({"status": "parsing GGUF"})
            lines.append({"status": f"using existing layer {d}"})
        for d in adapters.values():
            lines.append({"status": f"using existing layer {d}"})
            lines.append({"status": "creating adapter layer"})
        if body.get("template"):
            lines.append({"status": "creating template layer"})
        if body.get("system"):
            lines.append({"status": "creating system layer"})
        lines.append({"status": "writing manifest"})
        if fault is not None:  # mid-stream failure: progress first, then the error line
            self._stream([*lines[:1], {"error": fault.error}])
            return
        with s._lock:
            s._state.models[normalize(name)] = {
                "from": src, "files": dict(files), "adapters": dict(adapters),
                "template": body.get("template"), "system": body.get("system"),
                "parameters": body.get("parameters"), "modified_at": _now_iso(),
            }
        lines.append({"status": "success"})
        if body.get("stream") is False:
            self._send_json(200, {"status": "success"})
        else:
            self._stream(lines)

    def _copy(self, body: Any, fault: _Fault | None) -> None:
        s = self.standin
        if not isinstance(body, dict) or not body.get("source") or not body.get("destination"):
            self._send_json(400, {"error": "source and destination are required"})
            return
        with s._lock:
            src = s._state.models.get(normalize(body["source"]))
            if src is None:
                status = 404
            else:
                # copied_from lets a test see where an alias points (the real server shares layers)
                s._state.models[normalize(body["destination"])] = {
                    **copy.deepcopy(src), "copied_from": normalize(body["source"]), "modified_at": _now_iso()}
                status = 200
        if status == 404:
            self._send_json(404, {"error": f'model "{body["source"]}" not found'})
        else:
            self._send_json(200)

    def _delete(self, body: Any, fault: _Fault | None) -> None:
        s = self.standin
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not name:
            self._send_json(400, {"error": "model is required"})
            return
        with s._lock:
            found = s._state.models.pop(normalize(name), None) is not None
        if found:
            self._send_json(200)
        else:
            self._send_json(404, {"error": f"model '{name}' not found"})

    def _chat(self, body: Any, fault: _Fault | None) -> None:
        s = self.standin
        if not isinstance(body, dict) or not body.get("model"):
            self._send_json(400, {"error": "model is required"})
            return
        name = body["model"]
        with s._lock:
            known = normalize(name) in s._state.models
            reply = s._state.reply
        if not known:
            self._send_json(404, {"error": f'model "{name}" not found, try pulling it first'})
            return
        base = {"model": name, "created_at": _now_iso()}
        final = {**base, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                 "total_duration": 1_000_000, "eval_count": max(1, len(reply.split()))}
        if body.get("stream") is False:
            if fault is not None:
                self._send_json(500, {"error": fault.error})
                return
            self._send_json(200, {**final, "message": {"role": "assistant", "content": reply}})
            return
        words = reply.split(" ")
        lines: list[Any] = [{**base, "message": {"role": "assistant", "content": (" " if i else "") + w},
                             "done": False} for i, w in enumerate(words)]
        if fault is not None:
            self._stream([*lines[:1], {"error": fault.error}])
            return
        self._stream([*lines, final])
