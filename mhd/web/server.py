"""The read-only web page: a small asyncio HTTP/1.1 server (GET/HEAD only) inside the daemon.

No web framework: the surface is a handful of GET routes, and the daemon already has an event loop.
Everything the page shows comes from the same views as ``mhd status --json`` / ``mhd runs --json``
(:mod:`mhd.views`), so the page can never know more than the CLI does, and never a secret.

Routes::

    /                               the page (static HTML + app.js; live via /api/events)
    /static/<file>                  its CSS/JS/icon
    /api/status                     = status()            (what `mhd status --json` prints)
    /api/runs                       = views.runs_list()   (what `mhd runs --json` prints)
    /api/runs/<id>                  = views.run_dict(run)
    /api/runs/<id>/journal          the run's transitions (from, to, reason, at)
    /api/runs/<id>/progress         the run's progress lines
    /api/runs/<id>/eval             the quality gate's numbers, decision and generations
    /api/runs/<id>/log[?lines=N]    tails of <runs_dir>/<id>/run.log and train.log
    /api/events                     server-sent events: one status() snapshot about every second
    /charts/<id>/loss.svg           loss curve (previous run faint behind it), server-rendered
    /charts/<id>/gpu.svg            GPU utilization and memory over time, or "no GPU"
    /runs/<id>/log                  the log tails as a plain HTML page (works without JS)

Access: on a loopback address anyone on this machine may read the page (like ``mhd status``), and
the ``Host`` header must name a loopback host too, so a web site in the owner's browser cannot read
it through DNS rebinding. Any other address needs ``[web] token``: ``Authorization: Bearer <token>``,
or ``?token=<token>`` once, which sets a cookie derived from (not equal to) the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from mhd.config import WebConfig
from mhd.errors import ConfigError
from mhd.states.preemption import is_preemption
from mhd.store import PROGRESS_FIELDS, Run, Store
from mhd.views import run_dict, runs_list
from mhd.web import charts
from mhd.web.http import HttpError, Request, Response, _host_of, is_loopback, split_listen
from mhd.web.logpage import render_log_page, tail_lines

log = logging.getLogger("mhd.web")

COOKIE = "mhd_session"
MAX_HEAD = 16 * 1024  # request line + headers; a GET needs far less
IDLE_TIMEOUT_S = 30.0  # keep-alive connections idle longer than this are closed
WRITE_TIMEOUT_S = 10.0  # a client that does not read for this long is dropped
MAX_CLIENTS = 64
STOP_GRACE_S = 5.0  # how long stop() lets open connections wind down before cancelling them
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*\.(?:css|js|svg|html)$")
CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
# The page loads only its own files; inline SVG from /charts is inserted as markup, not fetched as
# a document, so 'self' covers everything and no inline script can ever run.
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy",
     "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
)


Handler = Callable[[Request, re.Match[str]], Awaitable[Response]]


class WebServer:
    """Serve the page and its JSON; ``start()`` binds, ``stop()`` closes every connection."""

    def __init__(self, cfg: WebConfig, store: Store, status: Callable[[], dict[str, Any]], *,
                 runs_dir: Path | None = None, events_interval_s: float = 1.0) -> None:
        self.cfg = cfg
        self.store = store
        self.status = status
        self.runs_dir = runs_dir
        self.events_interval_s = events_interval_s
        self.host, self.port = split_listen(cfg.listen)
        self._token = cfg.token or None
        # The cookie proves the token was shown once without carrying the token itself.
        self._cookie_value = (hmac.new(self._token.encode(), b"mhd-web-session", hashlib.sha256).hexdigest()
                              if self._token else "")
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._stopping = asyncio.Event()
        self._snapshot: tuple[float, bytes] | None = None
        self._routes: list[tuple[re.Pattern[str], Handler]] = [
            (re.compile(r"^/$"), self._page),
            (re.compile(r"^/static/(?P<name>[^/]+)$"), self._static),
            (re.compile(r"^/api/status$"), self._api_status),
            (re.compile(r"^/api/runs$"), self._api_runs),
            (re.compile(r"^/api/runs/(?P<id>[^/]+)$"), self._api_run),
            (re.compile(r"^/api/runs/(?P<id>[^/]+)/journal$"), self._api_journal),
            (re.compile(r"^/api/runs/(?P<id>[^/]+)/progress$"), self._api_progress),
            (re.compile(r"^/api/runs/(?P<id>[^/]+)/eval$"), self._api_eval),
            (re.compile(r"^/api/runs/(?P<id>[^/]+)/log$"), self._api_log),
            (re.compile(r"^/charts/(?P<id>[^/]+)/loss\.svg$"), self._chart_loss),
            (re.compile(r"^/charts/(?P<id>[^/]+)/gpu\.svg$"), self._chart_gpu),
            (re.compile(r"^/runs/(?P<id>[^/]+)/log$"), self._log_page),
        ]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # Lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if not is_loopback(self.host) and not self._token:
            raise ConfigError("web.listen", self.cfg.listen,
                              "a loopback address, or set web.token to serve on other interfaces")
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError("web.listen", self.cfg.listen,
                              f"an address this machine can listen on ({exc.strerror or exc}); change "
                              "[web] listen, or set [web] enabled = false") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("web page on %s%s", self.url, " (token required)" if self._token else "")

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        # Server.close() leaves accepted connections open (an SSE stream would live on). Closing each
        # transport makes its handler see EOF and return by itself; cancelling the handler instead
        # would make Python 3.11's stream callback log a spurious CancelledError traceback.
        for writer in self._clients.values():
            writer.close()
        if self._clients:
            _, stuck = await asyncio.wait(list(self._clients), timeout=STOP_GRACE_S)
            for task in stuck:
                task.cancel()  # last resort for a handler blocked elsewhere
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # Connection handling ------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        try:
            if len(self._clients) > MAX_CLIENTS:
                await self._send(writer, Response.text(503, "too many connections"), keep_alive=False)
                return
            while not self._stopping.is_set():
                try:
                    req = await self._read_request(reader)
                except HttpError as exc:
                    await self._send(writer, exc.response(), keep_alive=False)
                    return
                if req is None:
                    return
                resp, stream = await self._respond(req)
                if stream and req.method == "GET":
                    await self._events(reader, writer, resp)
                    return
                if stream:  # HEAD of the event stream: its headers, no body
                    resp.content_type = "text/event-stream"
                keep = req.keep_alive and not self._stopping.is_set()
                await self._send(writer, resp, keep_alive=keep, head=req.method == "HEAD")
                if not keep:
                    return
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled; nothing to tell it
        except Exception:  # a bug here must cost one connection, not spam the daemon's log forever
            log.exception("web: connection handler failed")
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_S)
        except asyncio.IncompleteReadError:
            return None  # closed between requests: the normal end of keep-alive
        except asyncio.LimitOverrunError as exc:
            raise HttpError(431, "request header too large") from exc
        except TimeoutError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise HttpError(400, "bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, "bad header line")
            headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            raise HttpError(405, "read-only: only GET and HEAD are served", [("Allow", "GET, HEAD")])
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            raise HttpError(400, "a GET carries no body")
        url = urlsplit(target)
        return Request(method, unquote(url.path) or "/", parse_qs(url.query), headers, version)

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, *, keep_alive: bool,
                    head: bool = False) -> None:
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
                   ("Cache-Control", "no-store"), *SECURITY_HEADERS, *resp.headers,
                   ("Connection", "keep-alive" if keep_alive else "close")]
        writer.write(self._head(resp.status, headers) + (b"" if head else resp.body))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _respond(self, req: Request) -> tuple[Response, bool]:
        """The response, and whether it is the SSE stream (whose body is written by _events)."""
        try:
            denied = self._check_access(req)
            if denied is not None:
                return denied, False
            extra = self._cookie_header(req)
            if extra and req.arg("token") is not None and not req.path.startswith(("/api/", "/charts/")):
                # A page opened with ?token=: keep the token out of the address bar from now on.
                rest = urlencode([(k, v) for k, vs in req.query.items() if k != "token" for v in vs])
                location = quote(req.path) + (f"?{rest}" if rest else "")
                return Response(303, headers=[("Location", location), extra]), False
            if req.path == "/api/events":
                return Response(200, headers=[extra] if extra else []), True
            for pattern, handler in self._routes:
                m = pattern.match(req.path)
                if m is not None:
                    resp = await handler(req, m)
                    if extra:
                        resp.headers.append(extra)
                    return resp, False
            raise HttpError(404, f"not found: {req.path}")
        except HttpError as exc:
            return exc.response(), False
        except Exception:  # one bad request must not take the daemon's page down
            log.exception("web: %s %s failed", req.method, req.path)
            return Response.text(500, "internal error (see the daemon's log)"), False

    # Access control ----------------------------------------------------------------------------
    def _check_access(self, req: Request) -> Response | None:
        if self._token is None:
            host = req.headers.get("host")
            if host is not None and not is_loopback(_host_of(host)):
                return Response.text(403, "this page answers only to a loopback host name "
                                          "(localhost, 127.0.0.1, [::1]); set [web] token to serve others")
            return None
        if self._authorized(req):
            return None
        return Response(401, b"unauthorized: send 'Authorization: Bearer <web.token>', or open the page "
                             b"once with ?token=<web.token>\n",
                        headers=[("WWW-Authenticate", 'Bearer realm="mhd"')])

    def _authorized(self, req: Request) -> bool:
        assert self._token is not None
        scheme, _, cred = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(cred.strip(), self._token):
            return True
        query = req.arg("token")
        if query is not None and _same(query, self._token):
            return True
        if "cookie" in req.headers:
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):
                jar.load(req.headers["cookie"])
            morsel = jar.get(COOKIE)
            if morsel is not None and _same(morsel.value, self._cookie_value):
                return True
        return False

    def _cookie_header(self, req: Request) -> tuple[str, str] | None:
        if self._token is None or req.arg("token") is None:
            return None
        return ("Set-Cookie", f"{COOKIE}={self._cookie_value}; Path=/; HttpOnly; SameSite=Strict")

    # Data helpers ------------------------------------------------------------------------------
    def _run(self, run_id: str) -> Run:
        run = self.store.get_run(run_id) if RUN_ID.match(run_id) else None
        if run is None:
            raise HttpError(404, f"no run {run_id!r}")
        return run

    def _points(self, run_id: str) -> list[dict[str, Any]]:
        return [{k: getattr(p, k) for k in PROGRESS_FIELDS} for p in self.store.progress(run_id)]

    def _previous(self, run: Run) -> Run | None:
        """The most recent earlier run that reported a loss: the faint curve behind this one."""
        for r in self.store.list_runs(50):
            if r.created_at < run.created_at and r.loss is not None:
                return r
        return None

    def _log_tails(self, run: Run, lines: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in ("run.log", "train.log"):
            entry: dict[str, Any] = {"name": name, "exists": False, "lines": [], "truncated": False}
            if self.runs_dir is not None:
                path = self.runs_dir / run.id / name
                if path.is_file():
                    tail, truncated = tail_lines(path, lines)
                    entry.update(exists=True, lines=tail, truncated=truncated)
            out.append(entry)
        return out

    def _lines_arg(self, req: Request) -> int:
        raw = req.arg("lines") or "200"
        if not raw.isdigit():
            raise HttpError(400, "lines: expected a whole number")
        return max(1, min(int(raw), 5000))

    # Handlers ----------------------------------------------------------------------------------
    async def _page(self, req: Request, m: re.Match[str]) -> Response:
        return self._static_file("index.html")

    async def _static(self, req: Request, m: re.Match[str]) -> Response:
        name = m["name"]
        if not STATIC_NAME.match(name):
            raise HttpError(404, f"not found: {req.path}")
        return self._static_file(name)

    @staticmethod
    def _static_file(name: str) -> Response:
        res = resources.files("mhd.web").joinpath("static", name)
        if not res.is_file():
            raise HttpError(404, f"not found: /static/{name}")
        return Response(200, res.read_bytes(), CONTENT_TYPES[Path(name).suffix])

    async def _api_status(self, req: Request, m: re.Match[str]) -> Response:
        return Response.json(self.status())

    async def _api_runs(self, req: Request, m: re.Match[str]) -> Response:
        return Response.json(runs_list(self.store))

    async def _api_run(self, req: Request, m: re.Match[str]) -> Response:
        return Response.json(run_dict(self._run(m["id"])))

    async def _api_journal(self, req: Request, m: re.Match[str]) -> Response:
        run = self._run(m["id"])
        return Response.json([{"from_state": t.from_state.value, "to_state": t.to_state.value,
                               "reason": t.reason, "at": t.at, "preempted": is_preemption(t.reason)}
                              for t in self.store.journal(run.id)])

    async def _api_eval(self, req: Request, m: re.Match[str]) -> Response:
        """The gate's numbers and decision, and the base/new generations (what `mhd eval RUN --json` prints)."""
        from mhd.quality.gate import eval_view
        from mhd.states.merging import read_eval

        run = self._run(m["id"])
        ev = await asyncio.to_thread(read_eval, self.runs_dir / run.id) if self.runs_dir is not None else None
        gens = (ev or {}).get("generations") or []
        return Response.json({"run_id": run.id, "eval": eval_view(run), "generations": gens})

    async def _api_progress(self, req: Request, m: re.Match[str]) -> Response:
        return Response.json(self._points(self._run(m["id"]).id))

    async def _api_log(self, req: Request, m: re.Match[str]) -> Response:
        run = self._run(m["id"])
        lines = self._lines_arg(req)
        files = await asyncio.to_thread(self._log_tails, run, lines)
        return Response.json({"run_id": run.id, "files": files})

    async def _chart_loss(self, req: Request, m: re.Match[str]) -> Response:
        run = self._run(m["id"])
        prev = self._previous(run)
        svg = charts.loss_svg(self._points(run.id), self._points(prev.id) if prev else (),
                              previous_id=prev.id if prev else None)
        return Response(200, svg.encode(), "image/svg+xml")

    async def _chart_gpu(self, req: Request, m: re.Match[str]) -> Response:
        run = self._run(m["id"])
        return Response(200, charts.gpu_svg(self._points(run.id)).encode(), "image/svg+xml")

    async def _log_page(self, req: Request, m: re.Match[str]) -> Response:
        run = self._run(m["id"])
        files = await asyncio.to_thread(self._log_tails, run, self._lines_arg(req))
        return Response(200, render_log_page(run, self.store, files).encode(), "text/html; charset=utf-8")

    # Server-sent events --------------------------------------------------------------------------
    def _status_event(self) -> bytes:
        """One encoded snapshot per interval, shared by every open page (status() reads the DB)."""
        t = time.monotonic()
        if self._snapshot is None or t - self._snapshot[0] >= self.events_interval_s / 2:
            data = json.dumps(self.status(), default=str, separators=(",", ":"))
            self._snapshot = (t, f"data: {data}\n\n".encode())
        return self._snapshot[1]

    async def _events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, resp: Response) -> None:
        # No Content-Length: the stream ends when either side closes, which HTTP/1.1 allows.
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"),
                   ("X-Accel-Buffering", "no"), *SECURITY_HEADERS, *resp.headers, ("Connection", "close")]
        writer.write(self._head(200, headers) + b"retry: 2000\n\n")
        while not self._stopping.is_set() and not writer.is_closing() and not reader.at_eof():
            try:
                writer.write(self._status_event())
            except Exception:  # a failing snapshot is logged; the stream goes on
                log.exception("web: status snapshot failed")
                writer.write(b": status unavailable\n\n")
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.events_interval_s)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
