"""RunPod provider over the REST API v2 (``https://api.runpod.io/v2``), with httpx.

What the API looks like (v2 OpenAPI, checked against RunPod's docs, 2026):

- ``POST /pods`` takes ``name``, ``image``, ``gpu: {id, count}``, ``cloud`` (SECURE|COMMUNITY),
  ``disk`` (GB), ``ports`` (``"22/tcp"``), ``env`` (map), ``mounts`` ({persistent|network}),
  ``interruptible`` (boolean: a spot pod; the REST API takes no bid, unlike GraphQL's
  ``podRentInterruptable``/``bidPerGpu``: the pod pays the current spot price).
  Unknown body keys are rejected (``unevaluatedProperties: false``), so only those are sent.
- ``GET /pods`` answers ``{"pods": [...]}`` (v1 answered a bare list; both are read).
- A pod has ``status`` (PROVISIONING → STARTING → RUNNING, EXITED, ERROR, TERMINATED), ``cost``
  (USD/h), ``ssh.direct {host, port, username}`` (null until ``22/tcp`` is mapped) and
  ``runtime.ports`` entries (``private``/``public`` in the OpenAPI text, ``privatePort``/
  ``publicPort``/``isIpPublic`` in older answers). v1/GraphQL names (``desiredStatus``,
  ``costPerHr``, ``publicIp`` + ``portMappings``) are read too: parsing is tolerant on purpose,
  because a beta API that renames a field must not leave a pod running unnoticed.
- Errors are RFC 9457 problem bodies (``title``, ``status``, ``detail``, ``errors[]``).

Retry policy lives in one place (:meth:`RunpodProvider._retrying`), keyed on the tuple
:data:`RETRY_ON`: 429 (honouring ``Retry-After``), 5xx and network errors are retried with
exponential backoff and jitter, a bounded number of times, then surface as
:class:`TransientProviderError` so the state machine can come back later. Everything else is a
decision, not a retry: 422 fix the config, 400 no capacity → next GPU type, 402 stop (balance),
403 permission.

The API key goes only into the ``Authorization`` header. It is never logged (debug logs redact
the header), never part of an exception message (server text is scrubbed too, in case a proxy
echoes the request), and never in ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from mhd.config import RunpodConfig
from mhd.errors import (
    ConfigError,
    InsufficientFunds,
    NoCapacityError,
    ProviderError,
    TransientProviderError,
)
from mhd.remote.provider import POD_PREFIX, Endpoint, Pod
from mhd.remote.runpod_wire import (  # the wire format; re-exported for callers of this module
    _DEAD,
    _DELETED,
    SSH_PORT,
    _pods_in,
    _problem_detail,
    _redacted_body,
    _redacted_headers,
    parse_endpoint,
    parse_pod,
    parse_retry_after,
    pod_status,
)

log = logging.getLogger("mhd.remote.runpod")

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[Any]]

API_KEY_ENV = "RUNPOD_API_KEY"
# Where a network volume is mounted: the pod-side root (MHD_ROOT=/workspace/mhd) then survives a
# pod being replaced, which is what a network volume is for.
VOLUME_PATH = "/workspace"
# Words RunPod uses when a GPU type has no free machine ("There are no longer any instances
# available with the requested specifications", "not enough resources", …). A 400 without them is
# a request problem, which no other GPU type would fix.
_NO_CAPACITY_WORDS = ("capacity", "available", "availability", "instances", "resources",
                      "sold out", "out of stock")


class PermissionDenied(ProviderError):
    """403: the key is valid but may not do this (a scoped key, a foreign pod): skip, don't retry."""


class _Transient(TransientProviderError):
    """A retryable failure, plus whether the server may already have acted on the request.

    ``ambiguous`` matters for POST /pods only: after a 5xx or a dropped connection the pod may
    exist, so the next attempt looks it up by name before posting again.
    """

    def __init__(self, message: str, retry_after: float | None = None, *, ambiguous: bool) -> None:
        super().__init__(message, retry_after)
        self.ambiguous = ambiguous


# What ``_request`` answers for a 404 the caller expects ("already gone").
_GONE = object()

# The one list of conditions the retry loop retries; everything else propagates at once.
RETRY_ON: tuple[type[BaseException], ...] = (_Transient,)


START_SCRIPT = Path(__file__).resolve().parents[1] / "pod" / "start.sh"


def start_command(cfg: RunpodConfig) -> str | None:
    """The container command for an image that lacks mhd's start (sshd, key, env), or None.

    The script travels base64-encoded inside one single-quoted word, so however the API splits
    the string into argv, bash gets it intact; it holds no secret (those arrive as env)."""
    wanted = cfg.start_script == "always" or (cfg.start_script == "auto" and "mhd-trainer" not in cfg.image)
    if not wanted:
        return None
    encoded = base64.b64encode(START_SCRIPT.read_bytes()).decode()
    return f"bash -c 'echo {encoded} | base64 -d | bash'"


def load_api_key(cfg: RunpodConfig, environ: Mapping[str, str] | None = None) -> str:
    """The API key from ``runpod.api_key_file``, else from ``$RUNPOD_API_KEY``.

    Error messages name where the key was looked for, never the key itself.
    """
    environ = os.environ if environ is None else environ
    path = cfg.api_key_file
    if path is not None:
        path = Path(os.path.expandvars(str(path))).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ConfigError("runpod.api_key_file", str(path),
                              f"a readable file holding the RunPod API key ({exc.strerror})") from None
        if not key:
            raise ConfigError("runpod.api_key_file", str(path), "a file holding the RunPod API key (it is empty)")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # Not fatal (the owner may share a group on purpose), but worth a line in the log.
            log.warning("%s is readable by group/others; `chmod 600 %s` keeps the RunPod key private",
                        path, path)
        return key
    key = (environ.get(API_KEY_ENV) or "").strip()
    if not key:
        raise ConfigError("runpod.api_key_file", None,
                          f"a file holding the RunPod API key, or the {API_KEY_ENV} environment variable")
    return key


def _public_key_from(cfg: RunpodConfig) -> str | None:
    """The ``.pub`` beside ``runpod.ssh_key_file``: the pod's sshd accepts it via PUBLIC_KEY."""
    if cfg.ssh_key_file is None:
        return None
    pub = Path(str(cfg.ssh_key_file) + ".pub").expanduser()
    try:
        text = pub.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None



class RunpodProvider:
    """:class:`~mhd.remote.provider.Provider` for RunPod. One instance per daemon; ``aclose()`` it."""

    name = "runpod"

    def __init__(
        self,
        cfg: RunpodConfig,
        api_key: str,
        *,
        public_key: str | None = None,
        env: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        max_attempts: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 300.0,
        timeout_s: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not api_key:
            raise ConfigError("runpod.api_key_file", None, "a non-empty RunPod API key")
        self.cfg = cfg
        self._key = api_key
        self._public_key = public_key
        self._env = dict(env or {})
        self._sleep = sleep
        self._max_attempts = max(1, max_attempts)
        self._base = backoff_base_s
        self._cap = backoff_max_s
        self._max_retry_after = max_retry_after_s
        self._rng = rng
        self._client = httpx.AsyncClient(
            base_url=cfg.api_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,  # a redirect would carry the bearer token to another host
        )

    def __repr__(self) -> str:
        return f"RunpodProvider(api_url={self.cfg.api_url!r}, gpu_types={self.cfg.gpu_types!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> RunpodProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # Provider ---------------------------------------------------------------------------------

    async def create(self, name: str, *, interruptible: bool = False) -> Pod:
        """Rent ``name``: each configured GPU type in order (and each cloud, for ``cloud = "ALL"``).

        ``interruptible``: a spot pod (REST's ``interruptible`` flag; billed at the spot price).

        400 no-capacity moves on to the next candidate; 402/403/422 stop at once. A retried POST
        first looks the name up, so a 5xx that did create the pod never leads to a second one.
        """
        if not name.startswith(POD_PREFIX):
            # The reaper only ever sees mhd-* pods; anything else would be rented and forgotten.
            raise ProviderError(f"pod name {name!r} must start with {POD_PREFIX!r} (the reaper's mark)")
        public_key = self._public_key or _public_key_from(self.cfg)
        if not public_key:
            raise ConfigError(
                "runpod.ssh_key_file", str(self.cfg.ssh_key_file) if self.cfg.ssh_key_file else None,
                "an SSH private key with its .pub beside it (the pod's sshd only admits PUBLIC_KEY)",
            )
        clouds = ["SECURE", "COMMUNITY"] if self.cfg.cloud == "ALL" else [self.cfg.cloud]
        refused: list[str] = []
        for gpu in self.cfg.gpu_types:
            for cloud in clouds:
                body = self._create_body(name, gpu, cloud, public_key, interruptible=interruptible)
                try:
                    return await self._create_once(name, body)
                except NoCapacityError as exc:
                    label = gpu if len(clouds) == 1 else f"{gpu} ({cloud})"
                    refused.append(label)
                    log.info("runpod: no capacity for %s: %s; trying the next GPU type", label, exc)
        kind = "interruptible capacity" if interruptible else "capacity"
        raise NoCapacityError(
            f"RunPod has no {kind} for any configured GPU type ({', '.join(refused)}) in "
            f"{self.cfg.cloud} cloud; try later, or add types to [runpod] gpu_types"
        )

    async def find(self, name: str) -> Pod | None:
        """The pod called exactly ``name`` that could still train (not stopped, failed or gone).

        A stopped/failed namesake is left for the reaper: adopting it would stall the run.
        """
        matches = [p for p in await self._list() if p.name == name and p.status not in _DEAD]
        if len(matches) > 1:
            log.warning("runpod: %d live pods are called %s (%s); adopting %s, the reaper ends the rest",
                        len(matches), name, ", ".join(p.id for p in matches), matches[0].id)
        return matches[0] if matches else None

    async def get(self, pod_id: str) -> Pod | None:
        body = await self._get_raw(pod_id)
        return None if body is None else parse_pod(body)

    async def endpoint(self, pod: Pod) -> Endpoint | None:
        """Read fresh (a restarted pod may come back on another port); None until mapped."""
        body = await self._get_raw(pod.id)
        if body is None or pod_status(body) in _DELETED:
            raise ProviderError(f"RunPod pod {pod.id} ({pod.name}) no longer exists; it cannot be reached")
        return parse_endpoint(body)

    async def terminate(self, pod_id: str) -> None:
        """DELETE the pod. 404 (already gone) is success: terminating is idempotent."""
        answer = await self._retrying(
            f"DELETE /pods/{pod_id}",
            lambda _attempt: self._request("DELETE", f"/pods/{pod_id}", not_found_ok=True))
        log.info("runpod: pod %s %s", pod_id, "was already gone" if answer is _GONE else "terminated")

    async def list_owned(self) -> list[Pod]:
        """Every ``mhd-*`` pod that still exists, stopped ones included: they bill for storage."""
        return [p for p in await self._list() if p.name.startswith(POD_PREFIX) and p.status not in _DELETED]

    # Requests ---------------------------------------------------------------------------------

    def _create_body(self, name: str, gpu: str, cloud: str, public_key: str, *,
                     interruptible: bool = False) -> dict[str, Any]:
        env = dict(self._env)
        env["PUBLIC_KEY"] = public_key
        # The pod's dead-man timer reads this; whole seconds keep the shell arithmetic simple.
        env["MHD_MAX_UNATTENDED"] = str(max(1, int(self.cfg.max_unattended)))
        body: dict[str, Any] = {
            "name": name,
            "image": self.cfg.image,
            "gpu": {"id": gpu, "count": self.cfg.gpu_count},
            "cloud": cloud,
            "disk": self.cfg.disk_gb,
            "ports": [SSH_PORT],
            "env": env,
        }
        if interruptible:
            # Only when asked: an on-demand body stays exactly what it was before spot pods.
            body["interruptible"] = True
        if start_command(self.cfg) is not None:
            body["args"] = start_command(self.cfg)
        if self.cfg.network_volume_id:
            body["mounts"] = {"network": [{"volumeId": self.cfg.network_volume_id, "path": VOLUME_PATH}]}
        elif self.cfg.volume_gb:
            body["mounts"] = {"persistent": {"size": self.cfg.volume_gb, "path": VOLUME_PATH}}
        return body

    async def _create_once(self, name: str, body: dict[str, Any]) -> Pod:
        maybe_created = False

        async def attempt(n: int) -> Pod:
            nonlocal maybe_created
            if maybe_created:
                # The last POST may have created the pod before failing: adopt, never duplicate.
                found = await self.find(name)
                if found is not None:
                    log.warning("runpod: a retried create found %s already exists (%s); adopting it",
                                name, found.id)
                    return found
            try:
                answer = await self._request("POST", "/pods", json=body)
            except _Transient as exc:
                maybe_created = maybe_created or exc.ambiguous
                raise
            if not isinstance(answer, Mapping) or not answer.get("id"):
                raise ProviderError(f"RunPod answered POST /pods for {name} without a pod id; "
                                    "check the RunPod console for a pod of that name")
            return parse_pod(answer)

        pod = await self._retrying(f"POST /pods ({name})", attempt)
        log.info("runpod: pod %s is %s (%s, $%s/h)", name, pod.id, pod.gpu_type or body["gpu"]["id"],
                 "?" if pod.cost_per_hr is None else f"{pod.cost_per_hr:.3f}")
        return pod

    async def _get_raw(self, pod_id: str) -> Mapping[str, Any] | None:
        body = await self._retrying(
            f"GET /pods/{pod_id}",
            lambda _attempt: self._request("GET", f"/pods/{pod_id}", not_found_ok=True))
        if body is _GONE:
            return None
        if not isinstance(body, Mapping) or not body.get("id"):
            raise ProviderError(f"RunPod answered GET /pods/{pod_id} with no pod object")
        return body

    async def _list(self) -> list[Pod]:
        pods: list[Pod] = []
        seen_cursors: set[str] = set()
        params: dict[str, str] = {}
        # v2 lists are unpaginated today; a ``pagination.nextCursor`` is followed in case that
        # changes, because a pod on page 2 that the reaper never sees would bill forever.
        for _page in range(100):
            body = await self._retrying("GET /pods", functools.partial(self._list_page, dict(params)))
            pods.extend(parse_pod(p) for p in _pods_in(body))
            page = body.get("pagination") if isinstance(body, Mapping) else None
            cursor = page.get("nextCursor") if isinstance(page, Mapping) and page.get("hasNextPage") else None
            if not isinstance(cursor, str) or not cursor or cursor in seen_cursors:
                break
            seen_cursors.add(cursor)
            params = {"cursor": cursor}
        return pods

    async def _list_page(self, params: dict[str, str], _attempt: int) -> Any:
        return await self._request("GET", "/pods", params=params)

    async def _retrying(self, what: str, op: Callable[[int], Awaitable[T]]) -> T:
        """Run ``op(attempt)`` until it succeeds, retrying only :data:`RETRY_ON`.

        Delay: exponential (base·2^(n-1), capped) with jitter in its upper half, and never less
        than the server's ``Retry-After``. A ``Retry-After`` beyond ``max_retry_after_s`` is not
        slept through here: the caller gets it on the error and can schedule the run later.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await op(attempt)
            except RETRY_ON as exc:
                retry_after = getattr(exc, "retry_after", None)
                if attempt >= self._max_attempts or (retry_after or 0) > self._max_retry_after:
                    raise TransientProviderError(
                        f"RunPod {what}: still failing after {attempt} attempt(s): {exc}",
                        retry_after=retry_after,
                    ) from exc
                cap = min(self._cap, self._base * 2 ** (attempt - 1))
                delay = max(cap / 2 + self._rng() * cap / 2, retry_after or 0.0)
                log.warning("runpod: %s: %s; retry %d/%d in %.1fs", what, exc, attempt,
                            self._max_attempts - 1, delay)
                await self._sleep(delay)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        not_found_ok: bool = False,
    ) -> Any:
        """One HTTP exchange → parsed JSON (None for an empty body; ``_GONE`` for an allowed 404).

        The boundary where httpx errors and HTTP statuses become mhd errors.
        """
        if log.isEnabledFor(logging.DEBUG):
            log.debug("runpod → %s %s params=%s headers=%s body=%s", method, path, dict(params or {}),
                      _redacted_headers(self._client.headers), _redacted_body(json))
        started = time.monotonic()
        try:
            resp = await self._client.request(method, path, json=json, params=params)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached the server: safe to resend anything.
            raise _Transient(self._scrub(f"{method} {path}: cannot reach {self.cfg.api_url} "
                                         f"({type(exc).__name__}: {exc})"), ambiguous=False) from exc
        except httpx.TransportError as exc:
            raise _Transient(self._scrub(f"{method} {path}: connection failed mid-request "
                                         f"({type(exc).__name__}: {exc})"), ambiguous=True) from exc
        log.debug("runpod ← %s %s %d in %.0f ms", method, path, resp.status_code,
                  (time.monotonic() - started) * 1000)
        if resp.is_success:
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError as exc:
                raise ProviderError(f"RunPod answered {method} {path} with non-JSON "
                                    f"({resp.headers.get('content-type', '?')}); is runpod.api_url right?") from exc
        if resp.status_code == 404 and not_found_ok:
            return _GONE
        raise self._error(method, path, resp)

    def _error(self, method: str, path: str, resp: httpx.Response) -> ProviderError:
        code = resp.status_code
        detail = self._scrub(_problem_detail(resp))
        where = f"RunPod {method} {path} → {code}"
        if code == 429:
            return _Transient(f"{where} (rate limited): {detail}",
                              parse_retry_after(resp.headers.get("Retry-After")), ambiguous=False)
        if code >= 500:
            return _Transient(f"{where} (server error): {detail}",
                              parse_retry_after(resp.headers.get("Retry-After")), ambiguous=True)
        if code == 402:
            return InsufficientFunds(f"{where}: insufficient RunPod balance: {detail}; "
                                     "top up the account, then `mhd train` again")
        if code == 401:
            return ProviderError(f"{where}: RunPod rejected the API key: {detail}; check "
                                 f"[runpod] api_key_file or ${API_KEY_ENV}")
        if code == 403:
            return PermissionDenied(f"{where}: the API key may not do this: {detail}; give the key "
                                    "read/write access to pods in the RunPod console")
        if code == 422:
            return ProviderError(f"{where}: RunPod rejected the request; fix the config "
                                 f"([runpod] image, gpu_types, disk_gb, …): {detail}")
        if code == 400 and any(w in detail.lower() for w in _NO_CAPACITY_WORDS):
            return NoCapacityError(f"{where}: {detail}")
        if code == 408:
            return _Transient(f"{where} (timeout): {detail}", ambiguous=True)
        return ProviderError(f"{where}: {detail}")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text


