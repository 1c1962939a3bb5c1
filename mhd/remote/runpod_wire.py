"""RunPod's wire format: the pod, endpoint and error bodies its REST API answers, read tolerantly.

Parsing is tolerant on purpose (v2 names first, v1/GraphQL names too): a beta API that renames a
field must not leave a pod running unnoticed. Also the redaction of what debug logs show.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx

from mhd.errors import ProviderError
from mhd.remote.provider import Endpoint, Pod

SSH_PORT = "22/tcp"
# Statuses that mean "this pod no longer exists" (TERMINATED in v2; DELETED seen in older APIs).
_DELETED = frozenset({"TERMINATED", "DELETED"})
# Statuses that exist (and may bill for storage) but will never become a usable training pod.
_DEAD = _DELETED | {"EXITED", "ERROR"}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


# Parsing: tolerant on purpose (see the module docstring) -------------------------------------------

def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        v = d.get(k)
        if v is not None:
            return v
    return None


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def pod_status(d: Mapping[str, Any]) -> str:
    return str(_first(d, "status", "desiredStatus") or "UNKNOWN").upper()


def parse_pod(d: Mapping[str, Any]) -> Pod:
    gpu = _mapping(d.get("gpu"))
    machine = _mapping(d.get("machine"))
    gpu_type = _first(gpu, "id") or d.get("gpuTypeId") or _first(machine, "gpuTypeId", "gpuDisplayName")
    # Only plain facts go to ``extra``: never ``env`` (it may carry tokens) or the raw body, since
    # callers may store ``extra`` and secrets never enter the database.
    extra: dict[str, object] = {}
    for key in ("cloud", "dataCenterId", "createdAt", "startedAt", "image"):
        if isinstance(d.get(key), str):
            extra[key] = d[key]
    if isinstance(d.get("interruptible"), bool):
        extra["interruptible"] = d["interruptible"]
    if (count := _as_int(_first(gpu, "count") or d.get("gpuCount"))) is not None:
        extra["gpu_count"] = count
    return Pod(
        id=str(d["id"]),
        name=str(d.get("name") or ""),
        status=pod_status(d),
        cost_per_hr=_as_float(_first(d, "cost", "costPerHr", "adjustedCostPerHr")),
        gpu_type=str(gpu_type) if gpu_type else None,
        extra=extra,
    )


def parse_endpoint(d: Mapping[str, Any], default_user: str = "root") -> Endpoint | None:
    """Where the pod's sshd is reachable, or None while ``22/tcp`` has no public mapping.

    ``ssh.direct`` first: RunPod computed it from the same mapping. Else the port list: the entry
    for private port 22 that is TCP and has a public IP. Pods commonly list a UDP mapping of 22 as
    well (often first); it leads nowhere, so the protocol is checked, never assumed.
    """
    ssh = d.get("ssh")
    direct = ssh.get("direct") if isinstance(ssh, Mapping) else None
    if isinstance(direct, Mapping):
        host = direct.get("host")
        port = _as_int(direct.get("port"))
        if isinstance(host, str) and host and port:
            return Endpoint(host=host, port=port, user=str(direct.get("username") or default_user))
    runtime = d.get("runtime")
    ports = runtime.get("ports") if isinstance(runtime, Mapping) else None
    best: Endpoint | None = None
    for p in ports if isinstance(ports, list) else []:
        if not isinstance(p, Mapping):
            continue
        private = _as_int(_first(p, "privatePort", "private"))
        public = _as_int(_first(p, "publicPort", "public"))
        kind = str(p.get("type") or "").lower()
        ip = p.get("ip")
        if private != 22 or kind != "tcp" or not public or not isinstance(ip, str) or not ip:
            continue
        flag = p.get("isIpPublic")
        if flag is False:
            continue  # a private address: reachable from RunPod's network only
        ep = Endpoint(host=ip, port=public, user=default_user)
        if flag is True:
            return ep
        best = best or ep  # the v2 text has no isIpPublic: a mapped ip is the public one
    if best is not None:
        return best
    # v1 / GraphQL shape: publicIp plus {"22": public_port} (TCP ports only in that API).
    public_ip = d.get("publicIp")
    mappings = d.get("portMappings")
    if isinstance(public_ip, str) and public_ip and isinstance(mappings, Mapping):
        port = _as_int(mappings.get("22"))
        if port:
            return Endpoint(host=public_ip, port=port, user=default_user)
    return None


def _pods_in(body: Any) -> list[Mapping[str, Any]]:
    items = body.get("pods") if isinstance(body, Mapping) else body
    if not isinstance(items, list):
        raise ProviderError(f"RunPod answered GET /pods with {type(body).__name__}, not a pod list; "
                            "is runpod.api_url right?")
    return [p for p in items if isinstance(p, Mapping) and p.get("id")]


def _problem_detail(resp: httpx.Response) -> str:
    """The RFC 9457 ``detail`` (+ ``errors``), or v1's ``message``, or the reason phrase."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        parts = [str(v) for k in ("detail", "message", "error", "title") if (v := body.get(k))][:1]
        errors = body.get("errors")
        if isinstance(errors, list):
            parts.extend(str(e) for e in errors[:5])
        if parts:
            return "; ".join(parts)
    text = resp.text.strip()[:200] if resp.content else ""
    return text or resp.reason_phrase or "no detail"


def _redacted_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: ("[redacted]" if k.lower() in {"authorization", "cookie"} else v) for k, v in headers.items()}


def _redacted_body(body: Any) -> Any:
    """Env values may be tokens: log their names only."""
    if isinstance(body, Mapping) and isinstance(body.get("env"), Mapping):
        return {**body, "env": dict.fromkeys(body["env"], "…")}
    return body
