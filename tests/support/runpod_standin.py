"""A local stand-in for RunPod's REST API v2 (the pod subset mhd uses), for tests.

A real HTTP server on 127.0.0.1 (stdlib ``ThreadingHTTPServer`` in a daemon thread), so it works
both for in-process tests (``RunpodProvider(cfg(api_url=s.url), key)``) and for end-to-end tests
where the daemon is a separate process pointed at ``s.url``. All state is behind one lock.

Implements: ``POST /v2/pods``, ``GET /v2/pods``, ``GET /v2/pods/{id}``, ``DELETE /v2/pods/{id}``
with bearer-token auth (401 otherwise), the status progression PROVISIONING → STARTING → RUNNING
over configurable seconds, ``ssh.direct`` that stays null until a delay has passed, the seed's
port list (a **udp** mapping of port 22 listed before the tcp one, to catch sloppy pickers),
``cost`` in USD/h, RFC 9457 problem bodies, and fault injection per route::

    with RunpodStandin(api_key="k", ssh_port=sshd.port, ssh_delay_s=2) as rp:
        rp.fail_next("POST /pods", 429, retry_after=1)
        rp.fail_next("POST /pods", 500, commit=True)      # creates the pod, then answers 500
        rp.fail_next("GET /pods/{id}", 503, times=2)
        rp.fail_next("DELETE /pods/{id}", drop=True)      # closes the connection, no answer
        rp.no_capacity.add("NVIDIA A40")                  # 400 for that GPU type
        rp.no_interruptible_capacity = True               # 400 for every interruptible create
        rp.preempt(pod_id)                                # EXITED, as RunPod lists a preempted pod
        ...  # point runpod.api_url at rp.url
        assert rp.created_count == 1 and rp.live_pods()
        assert rp.requests_for("POST /pods")[0].json["gpu"]["id"] == "NVIDIA RTX A6000"

Run it by hand: ``python -m tests.support.runpod_standin --api-key k --ssh-port 2222``.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

PREFIX = "/v2"
ROUTES = ("POST /pods", "GET /pods", "GET /pods/{id}", "DELETE /pods/{id}")
_POD_PATH = re.compile(r"^/pods/([^/]+)$")
# Keys CreatePodRequest accepts (the OpenAPI sets unevaluatedProperties: false): anything else is
# a 422, as on RunPod, so a client sending v1 names (imageName, gpuTypeIds, …) fails here too.
_CREATE_KEYS = frozenset({"name", "image", "args", "disk", "ports", "env", "registry", "mounts", "gpu",
                          "cpu", "cloud", "dataCenterIds", "globalNetworking", "templateId",
                          "startSsh", "startJupyter", "interruptible"})
_ALIVE = ("PROVISIONING", "STARTING", "RUNNING")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the /v2 prefix: "/pods", "/pods/abc"
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    json: Any
    at: float  # time.monotonic()

    @property
    def route(self) -> str:
        return f"{self.method} {_route_of(self.path)}"


@dataclass
class Fault:
    status: int = 500
    detail: str | None = None
    retry_after: float | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without any answer
    commit: bool = False  # carry out the request, then answer with this fault anyway
    body: Any = None  # a raw JSON body instead of the problem object


@dataclass
class _PodRecord:
    id: str
    name: str
    body: dict[str, Any]
    created: float  # clock()
    created_wall: float
    cost: float
    forced: str | None = None  # EXITED / ERROR / TERMINATED / a fixed status
    interruptible: bool = False
    ssh_host: str | None = None
    ssh_port: int | None = None


def _route_of(path: str) -> str:
    return "/pods/{id}" if _POD_PATH.match(path) else path


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunpodStandin:
    """The fake API. Start with ``with RunpodStandin() as s:`` (or ``start()``/``stop()``)."""

    def __init__(
        self,
        api_key: str = "standin-api-key",
        *,
        provisioning_s: float = 0.0,
        starting_s: float = 0.0,
        ssh_delay_s: float = 0.0,
        ssh_host: str = "127.0.0.1",
        ssh_port: int = 22022,
        udp_port: int | None = None,
        ssh_user: str = "root",
        ssh_direct: bool = True,
        port_style: Literal["issue", "v2"] = "issue",
        cost_per_hr: float = 0.44,
        spot_cost_per_hr: float | None = None,
        on_preempt: Callable[[str], None] | None = None,
        no_capacity: Iterable[str] = (),
        list_terminated: bool = True,
        clock: Callable[[], float] = time.monotonic,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.provisioning_s = provisioning_s
        self.starting_s = starting_s
        # Measured from creation; ssh is never mapped before the pod is RUNNING.
        self.ssh_delay_s = ssh_delay_s
        self.ssh_host = ssh_host
        self.ssh_port = ssh_port
        self.udp_port = udp_port if udp_port is not None else (ssh_port % 65535) + 1
        self.ssh_user = ssh_user
        # False: ``ssh.direct`` stays null, so clients must pick from ``runtime.ports``.
        self.ssh_direct = ssh_direct
        # "issue": privatePort/publicPort/isIpPublic; "v2": private/public (the OpenAPI text).
        self.port_style = port_style
        self.cost_per_hr = cost_per_hr
        # What an interruptible pod costs (RunPod's spot price): half the on-demand one by default.
        self.spot_cost_per_hr = cost_per_hr / 2 if spot_cost_per_hr is None else spot_cost_per_hr
        # Called with the pod id by preempt(), outside the lock: the harness stops the pod's sshd
        # and its processes there (the stand-in only knows the API side).
        self.on_preempt = on_preempt
        self.no_interruptible_capacity = False
        self.preempted: list[str] = []
        # GPU type ids ("NVIDIA A40") or "gpu@CLOUD" ("NVIDIA A40@SECURE") answered with 400.
        self.no_capacity: set[str] = set(no_capacity)
        self.list_terminated = list_terminated
        self.clock = clock
        self._lock = threading.RLock()
        self._pods: dict[str, _PodRecord] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._created = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # Lifecycle ----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The ``runpod.api_url`` to configure: ``http://127.0.0.1:PORT/v2``."""
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def start(self) -> RunpodStandin:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="runpod-standin",
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> RunpodStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Test controls ------------------------------------------------------------------------------

    def fail_next(
        self,
        route: str,
        status: int = 500,
        *,
        times: int = 1,
        retry_after: float | str | None = None,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        drop: bool = False,
        commit: bool = False,
        body: Any = None,
    ) -> None:
        """Answer the next ``times`` requests on ``route`` with a fault.

        ``route``: one of :data:`ROUTES` ("GET /pods/{id}" matches any id) or an exact path
        ("DELETE /pods/abc"). Exact routes win over patterns. ``retry_after``: seconds, or an HTTP
        date string, sent as ``Retry-After``.
        """
        method, _, path = route.partition(" ")
        if not path.startswith("/pods"):
            raise ValueError(f"route must look like 'GET /pods/{{id}}', not {route!r}")
        fault = Fault(status=status, detail=detail, retry_after=retry_after, headers=dict(headers or {}),
                      drop=drop, commit=commit, body=body)
        with self._lock:
            q = self._faults.setdefault(f"{method.upper()} {path}", deque())
            q.extend(fault for _ in range(times))

    def seed_pod(
        self,
        name: str,
        *,
        status: str | None = None,
        gpu: str = "NVIDIA RTX A6000",
        cost_per_hr: float | None = None,
        age_s: float = 3600.0,
        env: dict[str, str] | None = None,
    ) -> str:
        """A pod that already exists (not counted in ``created_count``); RUNNING by default."""
        body = {"name": name, "image": "seed/image:1", "gpu": {"id": gpu, "count": 1}, "cloud": "SECURE",
                "disk": 20, "ports": ["22/tcp"], "env": dict(env or {})}
        with self._lock:
            rec = self._new_record(body, created_ago=age_s, cost=cost_per_hr)
            rec.forced = status.upper() if status else None
            return rec.id

    def set_status(self, pod_id: str, status: str | None) -> None:
        """Force a status (e.g. "EXITED" as if the dead-man timer stopped it); None resumes the clock."""
        with self._lock:
            self._pods[pod_id].forced = status.upper() if status else None

    def preempt(self, pod_id: str) -> None:
        """Take the pod back as RunPod does a spot pod: it stops (EXITED, its sshd gone with it),
        and stays listed until deleted. ``on_preempt`` does the machine side."""
        with self._lock:
            rec = self._pods[pod_id]
            if rec.forced in ("EXITED", "TERMINATED"):
                raise AssertionError(f"pod {pod_id} is already {rec.forced}")
            rec.forced = "EXITED"
            self.preempted.append(pod_id)
        if self.on_preempt is not None:
            self.on_preempt(pod_id)

    def set_ssh_endpoint(self, host: str, port: int, pod_id: str | None = None) -> None:
        """Where ``ssh.direct``/the tcp mapping point: all pods, or one (a restarted pod moves)."""
        with self._lock:
            if pod_id is None:
                self.ssh_host, self.ssh_port = host, port
            else:
                self._pods[pod_id].ssh_host, self._pods[pod_id].ssh_port = host, port

    @property
    def created_count(self) -> int:
        """Pods created through ``POST /pods`` (seeded ones excluded)."""
        with self._lock:
            return self._created

    @property
    def pods(self) -> dict[str, dict[str, Any]]:
        """A snapshot: pod id → the JSON ``GET /pods/{id}`` would answer (terminated ones too)."""
        with self._lock:
            return {pid: self._render(rec) for pid, rec in self._pods.items()}

    def live_pods(self) -> dict[str, dict[str, Any]]:
        """Pods that still exist and bill (not TERMINATED)."""
        return {pid: p for pid, p in self.pods.items() if p["status"] != "TERMINATED"}

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, route: str) -> list[RecordedRequest]:
        """Recorded requests on ``route`` ("POST /pods", "GET /pods/{id}", or an exact path)."""
        method, _, path = route.partition(" ")
        return [r for r in self.requests
                if r.method == method.upper() and (r.path == path or _route_of(r.path) == path)]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # Model --------------------------------------------------------------------------------------

    def _new_record(self, body: dict[str, Any], *, created_ago: float = 0.0, cost: float | None = None) -> _PodRecord:
        pid = f"sp{len(self._pods) + 1:03d}{secrets.token_hex(4)}"
        rec = _PodRecord(id=pid, name=str(body["name"]), body=body, created=self.clock() - created_ago,
                         created_wall=time.time() - created_ago,
                         cost=self.cost_per_hr if cost is None else cost)
        self._pods[pid] = rec
        return rec

    def _status(self, rec: _PodRecord) -> str:
        if rec.forced:
            return rec.forced
        age = self.clock() - rec.created
        if age < self.provisioning_s:
            return "PROVISIONING"
        if age < self.provisioning_s + self.starting_s:
            return "STARTING"
        return "RUNNING"

    def _render(self, rec: _PodRecord) -> dict[str, Any]:
        status = self._status(rec)
        age = self.clock() - rec.created
        running = status == "RUNNING"
        mapped = running and age >= self.ssh_delay_s
        host = rec.ssh_host or self.ssh_host
        port = rec.ssh_port or self.ssh_port
        direct = ({"host": host, "port": port, "username": self.ssh_user,
                   "command": f"ssh {self.ssh_user}@{host} -p {port}"}
                  if mapped and self.ssh_direct else None)
        ports = [self._port(22, self.udp_port, "udp", host), self._port(22, port, "tcp", host)] if mapped else []
        started = rec.created_wall + self.provisioning_s + self.starting_s
        body = rec.body
        return {
            "id": rec.id,
            "name": rec.name,
            "image": body.get("image"),
            "args": body.get("args", ""),
            "disk": body.get("disk", 20),
            "ports": list(body.get("ports") or []),
            "env": dict(body.get("env") or {}),
            "registry": body.get("registry"),
            "status": status,
            "actions": ["stop", "restart", "terminate"] if status in _ALIVE else
                       (["start", "terminate"] if status in ("EXITED", "ERROR") else []),
            "mounts": body.get("mounts") or {},
            "gpu": body.get("gpu"),
            "cloud": body.get("cloud", "SECURE"),
            "dataCenterId": "US-STANDIN-1",
            "template": None,
            "cost": rec.cost if status in _ALIVE else 0.0,
            "interruptible": rec.interruptible,
            "locked": False,
            "globalNetworking": {"enabled": False},
            "ssh": {"proxy": {"host": "ssh.standin.invalid", "port": 22, "username": f"{rec.id}-proxy",
                              "command": f"ssh {rec.id}-proxy@ssh.standin.invalid"},
                    "direct": direct},
            "runtime": {"uptime": int(max(0.0, age - self.provisioning_s - self.starting_s)), "ports": ports}
                       if running else None,
            "createdAt": _iso(rec.created_wall),
            "startedAt": _iso(started) if running else None,
        }

    def _port(self, private: int, public: int, kind: str, ip: str) -> dict[str, Any]:
        if self.port_style == "v2":
            return {"private": private, "public": public, "type": kind, "ip": ip}
        return {"privatePort": private, "publicPort": public, "type": kind, "ip": ip, "isIpPublic": True}

    # HTTP ---------------------------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for key in (f"{method} {path}", f"{method} {_route_of(path)}"):
            q = self._faults.get(key)
            if q:
                return q.popleft()
        return None

    def _handle(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes
                ) -> tuple[int, Any, dict[str, str]] | None:
        """(status, json body or None, extra headers), or None to drop the connection."""
        split = urlsplit(raw_path)
        path = split.path
        payload: Any = None
        if raw_body:
            try:
                payload = json.loads(raw_body)
            except ValueError:
                payload = raw_body.decode("utf-8", "replace")
        with self._lock:
            if not path.startswith(PREFIX + "/"):
                return _problem(404, f"no such path {path} (the stand-in serves {PREFIX}/pods)")
            path = path[len(PREFIX):]
            self._requests.append(RecordedRequest(method, path, dict(parse_qsl(split.query)), headers,
                                                  payload, time.monotonic()))
            if headers.get("authorization") != f"Bearer {self.api_key}":
                detail = "missing bearer token" if "authorization" not in headers else "invalid bearer token"
                return _problem(401, detail)
            fault = self._take_fault(method, path)
            if fault is not None and not fault.commit:
                return None if fault.drop else _fault_answer(fault)
            answer = self._route(method, path, payload)
            if fault is not None:
                return None if fault.drop else _fault_answer(fault)
            return answer

    def _route(self, method: str, path: str, payload: Any) -> tuple[int, Any, dict[str, str]]:
        if path == "/pods":
            if method == "GET":
                pods = [self._render(r) for r in self._pods.values()]
                if not self.list_terminated:
                    pods = [p for p in pods if p["status"] != "TERMINATED"]
                return 200, {"pods": pods}, {}
            if method == "POST":
                return self._create(payload)
            return _problem(405, "The requested method is not allowed for this path.", {"Allow": "GET, POST"})
        m = _POD_PATH.match(path)
        if not m:
            return _problem(404, f"no such path {PREFIX}{path}")
        rec = self._pods.get(m.group(1))
        if method == "GET":
            return (200, self._render(rec), {}) if rec else _problem(404, "The requested Pod does not exist.")
        if method == "DELETE":
            if rec is None or rec.forced == "TERMINATED":
                return _problem(404, "The requested Pod does not exist.")
            rec.forced = "TERMINATED"
            return 204, None, {}
        return _problem(405, "The requested method is not allowed for this path.", {"Allow": "GET, DELETE"})

    def _create(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        if not isinstance(body, dict):
            return _problem(400, "request body must be a JSON object")
        errors = [f"unknown property {k!r}" for k in sorted(set(body) - _CREATE_KEYS)]
        for key in ("name", "image"):
            if not isinstance(body.get(key), str) or not body[key]:
                errors.append(f"{key}: required non-empty string")
        gpu = body.get("gpu")
        if not isinstance(gpu, dict) or not isinstance(gpu.get("id"), str) or not gpu["id"]:
            errors.append("gpu: required object with a string id (exactly one of gpu or cpu)")
        elif not isinstance(gpu.get("count", 1), int) or gpu.get("count", 1) < 1:
            errors.append("gpu.count: integer >= 1")
        cloud = body.get("cloud", "SECURE")
        if cloud not in ("SECURE", "COMMUNITY"):
            errors.append(f"cloud: must be SECURE or COMMUNITY, not {cloud!r}")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            errors.append("env: object of string values")
        ports = body.get("ports", [])
        if not isinstance(ports, list) or not all(isinstance(p, str) and "/" in p for p in ports):
            errors.append("ports: array of 'port/protocol' strings")
        if not isinstance(body.get("disk", 1), int) or body.get("disk", 1) < 1:
            errors.append("disk: integer >= 1")
        mounts = body.get("mounts") or {}
        if isinstance(mounts, dict) and mounts.get("persistent") and mounts.get("network"):
            return _problem(400, "mounts: at most one of persistent or network")
        if errors:
            return _problem(422, "Request validation failed.", errors=errors)
        interruptible = body.get("interruptible", False)
        if not isinstance(interruptible, bool):
            return _problem(422, "Request validation failed.", errors=["interruptible: boolean"])
        gpu_id = gpu["id"] if isinstance(gpu, dict) else ""
        if (gpu_id in self.no_capacity or f"{gpu_id}@{cloud}" in self.no_capacity
                or (interruptible and self.no_interruptible_capacity)):
            return _problem(400, "There are no longer any instances available with the requested "
                                 f"specifications ({gpu_id}, {cloud} cloud). Please refresh and try again.")
        rec = self._new_record(dict(body), cost=self.spot_cost_per_hr if interruptible else None)
        rec.interruptible = interruptible
        self._created += 1
        return 201, self._render(rec), {"Location": f"{PREFIX}/pods/{rec.id}"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in separate writes; without this, Nagle + delayed ACK add
            # ~40 ms to every keep-alive exchange.
            disable_nagle_algorithm = True
            server_version = "runpod-standin/1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests read .requests instead

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = standin._handle(self.command, self.path, headers, raw)
                if answer is None:
                    self.close_connection = True
                    return
                status, body, extra = answer
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                if data:
                    kind = "application/problem+json" if status >= 400 else "application/json"
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if data:
                    self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve

        return Handler


def _problem(status: int, detail: str, headers: dict[str, str] | None = None, *,
             errors: list[str] | None = None) -> tuple[int, Any, dict[str, str]]:
    body: dict[str, Any] = {"title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return status, body, dict(headers or {})


def _fault_answer(f: Fault) -> tuple[int, Any, dict[str, str]]:
    headers = dict(f.headers)
    if f.retry_after is not None:
        ra = f.retry_after
        headers["Retry-After"] = ra if isinstance(ra, str) else str(int(ra) if float(ra).is_integer() else ra)
    if f.body is not None:
        return f.status, f.body, headers
    default = {402: "insufficient balance to deploy this pod", 403: "access denied",
               429: "rate limit exceeded for the minute window"}.get(f.status, "injected fault")
    return _problem(f.status, f.detail or default, headers)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", default="standin-api-key")
    ap.add_argument("--ssh-host", default="127.0.0.1")
    ap.add_argument("--ssh-port", type=int, default=22022)
    ap.add_argument("--provisioning-s", type=float, default=2.0)
    ap.add_argument("--starting-s", type=float, default=2.0)
    ap.add_argument("--ssh-delay-s", type=float, default=5.0)
    a = ap.parse_args(argv)
    s = RunpodStandin(a.api_key, port=a.port, ssh_host=a.ssh_host, ssh_port=a.ssh_port,
                      provisioning_s=a.provisioning_s, starting_s=a.starting_s, ssh_delay_s=a.ssh_delay_s)
    with s:
        print(s.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
