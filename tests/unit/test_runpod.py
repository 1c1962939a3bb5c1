"""RunPod provider against the local REST v2 stand-in (a real HTTP server on 127.0.0.1).

No test sleeps for real: the provider gets a ``sleep`` that records the delays it asked for, so
backoff and Retry-After are asserted on those numbers, never on wall time.
"""

from __future__ import annotations

import email.utils
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhd.config import RunpodConfig
from mhd.errors import (
    ConfigError,
    InsufficientFunds,
    NoCapacityError,
    ProviderError,
    TransientProviderError,
)
from mhd.remote.provider import Endpoint, Provider
from mhd.remote.runpod import (
    PermissionDenied,
    RunpodProvider,
    load_api_key,
    parse_endpoint,
    parse_pod,
    parse_retry_after,
    start_command,
)
from tests.support.runpod_standin import RunpodStandin

pytestmark = pytest.mark.anyio

KEY = "rpa_T3STKEY_never-log-me_0123456789abcdef"
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMhd mhd@test"
GPUS = ["NVIDIA RTX A6000", "NVIDIA A40", "NVIDIA GeForce RTX 4090"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingSleep:
    """Stands in for asyncio.sleep: records each requested delay, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def standin() -> Iterator[RunpodStandin]:
    with RunpodStandin(KEY, ssh_port=40022, udp_port=40999) as s:
        yield s


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


def make(standin: RunpodStandin, sleep: RecordingSleep, *, key: str = KEY, max_attempts: int = 6,
         env: dict[str, str] | None = None, public_key: str | None = PUB, **cfg: Any) -> RunpodProvider:
    cfg.setdefault("gpu_types", GPUS)
    return RunpodProvider(RunpodConfig(api_url=standin.url, **cfg), key, public_key=public_key, env=env,
                          sleep=sleep, max_attempts=max_attempts, rng=lambda: 0.5)


@pytest.fixture
async def provider(standin: RunpodStandin, sleep: RecordingSleep) -> AsyncIterator[RunpodProvider]:
    async with make(standin, sleep) as p:
        yield p


# Creating -----------------------------------------------------------------------------------------

async def test_provider_satisfies_the_protocol(provider: RunpodProvider) -> None:
    assert isinstance(provider, Provider)
    assert provider.name == "runpod"


async def test_create_sends_the_v2_body_with_ssh_port_public_key_and_unattended_limit(
        standin: RunpodStandin, sleep: RecordingSleep) -> None:
    async with make(standin, sleep, env={"MHD_ROOT": "/workspace/mhd"}, disk_gb=40,
                    network_volume_id="vol_abc", max_unattended="90m") as p:
        pod = await p.create("mhd-run1")
    [req] = standin.requests_for("POST /pods")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.json == {
        "name": "mhd-run1",
        "image": RunpodConfig().image,
        "gpu": {"id": "NVIDIA RTX A6000", "count": 1},
        "cloud": "SECURE",
        "disk": 40,
        "ports": ["22/tcp"],
        "env": {"MHD_ROOT": "/workspace/mhd", "PUBLIC_KEY": PUB, "MHD_MAX_UNATTENDED": "5400"},
        "mounts": {"network": [{"volumeId": "vol_abc", "path": "/workspace"}]},
        "args": start_command(RunpodConfig()),  # the stock image runs mhd's start script
    }
    assert pod.name == "mhd-run1" and pod.id in standin.pods
    assert pod.cost_per_hr == pytest.approx(0.44)
    assert pod.gpu_type == "NVIDIA RTX A6000"
    assert "env" not in pod.extra  # env may hold tokens; extra may be stored


async def test_interruptible_create_sends_the_flag_and_pays_the_spot_price(
        standin: RunpodStandin, provider: RunpodProvider) -> None:
    spot = await provider.create("mhd-run1", interruptible=True)
    plain = await provider.create("mhd-run1-a2")
    first, second = standin.requests_for("POST /pods")
    assert first.json["interruptible"] is True
    assert "interruptible" not in second.json  # an on-demand body is what it was before spot pods
    assert spot.cost_per_hr == pytest.approx(0.22) and spot.extra["interruptible"] is True
    assert plain.cost_per_hr == pytest.approx(0.44) and plain.extra["interruptible"] is False


async def test_no_interruptible_capacity_is_named_as_such(standin: RunpodStandin, provider: RunpodProvider) -> None:
    standin.no_interruptible_capacity = True
    with pytest.raises(NoCapacityError, match="no interruptible capacity"):
        await provider.create("mhd-run1", interruptible=True)
    assert standin.created_count == 0
    assert (await provider.create("mhd-run1")).cost_per_hr == pytest.approx(0.44)


async def test_a_preempted_pod_is_listed_exited_until_deleted(standin: RunpodStandin,
                                                              provider: RunpodProvider) -> None:
    pod = await provider.create("mhd-run1", interruptible=True)
    standin.preempt(pod.id)
    seen = await provider.get(pod.id)
    assert seen is not None and seen.status == "EXITED" and seen.gone
    assert await provider.endpoint(seen) is None  # its sshd went with it
    assert [p.id for p in await provider.list_owned()] == [pod.id]  # still bills for its disk
    await provider.terminate(pod.id)
    assert await provider.list_owned() == []


async def test_create_refuses_a_name_the_reaper_would_not_recognise(provider: RunpodProvider,
                                                                     standin: RunpodStandin) -> None:
    with pytest.raises(ProviderError, match="mhd-"):
        await provider.create("notebook")
    assert standin.created_count == 0


async def test_create_without_a_public_key_fails_before_renting(standin: RunpodStandin,
                                                                 sleep: RecordingSleep) -> None:
    async with make(standin, sleep, public_key=None) as p:
        with pytest.raises(ConfigError, match="ssh_key_file"):
            await p.create("mhd-run1")
    assert standin.requests_for("POST /pods") == []


async def test_public_key_is_read_beside_the_configured_private_key(standin: RunpodStandin,
                                                                     sleep: RecordingSleep,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "id_ed25519.pub").write_text(PUB + "\n")
    async with make(standin, sleep, public_key=None, ssh_key_file=tmp_path / "id_ed25519") as p:
        await p.create("mhd-run1")
    assert standin.requests_for("POST /pods")[0].json["env"]["PUBLIC_KEY"] == PUB


async def test_no_capacity_falls_through_the_gpu_types_in_order(standin: RunpodStandin,
                                                                provider: RunpodProvider) -> None:
    standin.no_capacity |= {GPUS[0], GPUS[1]}
    pod = await provider.create("mhd-run1")
    assert pod.gpu_type == GPUS[2]
    assert [r.json["gpu"]["id"] for r in standin.requests_for("POST /pods")] == GPUS
    assert standin.created_count == 1


async def test_no_capacity_anywhere_names_every_type_tried(standin: RunpodStandin,
                                                           provider: RunpodProvider) -> None:
    standin.no_capacity |= set(GPUS)
    with pytest.raises(NoCapacityError) as err:
        await provider.create("mhd-run1")
    for gpu in GPUS:
        assert gpu in str(err.value)
    assert standin.created_count == 0


async def test_cloud_all_tries_secure_then_community(standin: RunpodStandin, sleep: RecordingSleep) -> None:
    standin.no_capacity.add(f"{GPUS[0]}@SECURE")
    async with make(standin, sleep, cloud="ALL") as p:
        pod = await p.create("mhd-run1")
    posts = [(r.json["gpu"]["id"], r.json["cloud"]) for r in standin.requests_for("POST /pods")]
    assert posts == [(GPUS[0], "SECURE"), (GPUS[0], "COMMUNITY")]
    assert pod.extra["cloud"] == "COMMUNITY"


async def test_402_stops_with_insufficient_funds_and_tries_nothing_else(
        standin: RunpodStandin, provider: RunpodProvider, sleep: RecordingSleep) -> None:
    standin.fail_next("POST /pods", 402)
    with pytest.raises(InsufficientFunds, match="balance"):
        await provider.create("mhd-run1")
    assert len(standin.requests_for("POST /pods")) == 1
    assert sleep.delays == []
    assert standin.created_count == 0


async def test_422_says_fix_the_config_and_is_not_retried(standin: RunpodStandin, provider: RunpodProvider,
                                                         sleep: RecordingSleep) -> None:
    standin.fail_next("POST /pods", 422, detail="disk: must be >= 20 for this image")
    with pytest.raises(ProviderError) as err:
        await provider.create("mhd-run1")
    assert not isinstance(err.value, TransientProviderError | NoCapacityError)
    assert "fix the config" in str(err.value) and "disk: must be >= 20" in str(err.value)
    assert len(standin.requests_for("POST /pods")) == 1 and sleep.delays == []


async def test_403_is_permission_denied_not_retried(standin: RunpodStandin, provider: RunpodProvider,
                                                    sleep: RecordingSleep) -> None:
    standin.fail_next("POST /pods", 403)
    with pytest.raises(PermissionDenied):
        await provider.create("mhd-run1")
    assert len(standin.requests_for("POST /pods")) == 1 and sleep.delays == []


async def test_a_wrong_key_is_a_clear_permanent_error(standin: RunpodStandin, sleep: RecordingSleep) -> None:
    async with make(standin, sleep, key="rpa_wrong_key_xyz") as p:
        with pytest.raises(ProviderError) as err:
            await p.list_owned()
    assert not isinstance(err.value, TransientProviderError)
    assert "api_key_file" in str(err.value) and "rpa_wrong_key_xyz" not in str(err.value)


async def test_stand_in_rejects_v1_field_names_like_runpod_does(standin: RunpodStandin) -> None:
    async with httpx.AsyncClient(base_url=standin.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = await c.post("/pods", json={"name": "mhd-x", "imageName": "img", "gpuTypeIds": ["A"]})
        unauth = await c.get("/pods", headers={"Authorization": ""})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert any("imageName" in e for e in r.json()["errors"])
    assert unauth.status_code == 401


# Retries ------------------------------------------------------------------------------------------

async def test_429_is_retried_no_sooner_than_retry_after(standin: RunpodStandin, provider: RunpodProvider,
                                                         sleep: RecordingSleep) -> None:
    standin.fail_next("POST /pods", 429, retry_after=7)
    pod = await provider.create("mhd-run1")
    assert len(sleep.delays) == 1 and sleep.delays[0] >= 7
    assert standin.created_count == 1 and pod.id in standin.pods


async def test_429_with_an_http_date_retry_after(standin: RunpodStandin, provider: RunpodProvider,
                                                 sleep: RecordingSleep) -> None:
    standin.fail_next("GET /pods", 429, retry_after=email.utils.formatdate(
        __import__("time").time() + 120, usegmt=True))
    assert await provider.list_owned() == []
    # HTTP dates have 1 s resolution and the clocks differ by the time the test takes.
    assert len(sleep.delays) == 1 and sleep.delays[0] >= 100


def test_retry_after_parses_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_a_retry_after_too_long_to_wait_is_handed_to_the_caller(standin: RunpodStandin,
                                                                      provider: RunpodProvider,
                                                                      sleep: RecordingSleep) -> None:
    standin.fail_next("GET /pods", 429, retry_after=3600)
    with pytest.raises(TransientProviderError) as err:
        await provider.list_owned()
    assert err.value.retry_after == 3600 and sleep.delays == []


async def test_5xx_is_retried_with_growing_backoff(standin: RunpodStandin, provider: RunpodProvider,
                                                   sleep: RecordingSleep) -> None:
    pod_id = standin.seed_pod("mhd-run1")
    standin.fail_next("GET /pods/{id}", 503, times=3)
    pod = await provider.get(pod_id)
    assert pod is not None and pod.id == pod_id
    assert len(sleep.delays) == 3
    assert sleep.delays[0] < sleep.delays[1] < sleep.delays[2]


async def test_retries_are_bounded_then_a_transient_error_surfaces(standin: RunpodStandin,
                                                                   sleep: RecordingSleep) -> None:
    standin.fail_next("GET /pods", 500, times=50)
    async with make(standin, sleep, max_attempts=4) as p:
        with pytest.raises(TransientProviderError, match="4 attempt"):
            await p.list_owned()
    assert len(standin.requests_for("GET /pods")) == 4 and len(sleep.delays) == 3


async def test_a_dropped_connection_is_retried(standin: RunpodStandin, provider: RunpodProvider,
                                               sleep: RecordingSleep) -> None:
    pod_id = standin.seed_pod("mhd-run1")
    standin.fail_next("DELETE /pods/{id}", drop=True)
    await provider.terminate(pod_id)
    assert standin.pods[pod_id]["status"] == "TERMINATED" and len(sleep.delays) == 1


@pytest.mark.parametrize("fault", [{"status": 500}, {"drop": True}])
async def test_a_create_that_failed_after_the_pod_was_made_adopts_it(standin: RunpodStandin,
                                                                     provider: RunpodProvider,
                                                                     fault: dict[str, Any]) -> None:
    standin.fail_next("POST /pods", commit=True, **fault)
    pod = await provider.create("mhd-run1")
    assert standin.created_count == 1, "a retried POST must not rent a second pod"
    assert len(standin.requests_for("POST /pods")) == 1
    assert list(standin.live_pods()) == [pod.id]


# Reading pods and endpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("style", ["issue", "v2"])
async def test_endpoint_picks_the_tcp_mapping_never_the_udp_one(standin: RunpodStandin,
                                                                sleep: RecordingSleep, style: str) -> None:
    standin.ssh_direct = False  # only runtime.ports to choose from, udp listed first
    standin.port_style = style  # type: ignore[assignment]
    async with make(standin, sleep) as p:
        pod = await p.create("mhd-run1")
        ports = standin.pods[pod.id]["runtime"]["ports"]
        assert ports[0]["type"] == "udp"
        assert await p.endpoint(pod) == Endpoint("127.0.0.1", 40022, "root")


async def test_endpoint_prefers_ssh_direct(standin: RunpodStandin, provider: RunpodProvider) -> None:
    standin.ssh_user = "trainer"  # only ssh.direct carries a user name
    pod = await provider.create("mhd-run1")
    assert await provider.endpoint(pod) == Endpoint("127.0.0.1", 40022, "trainer")


def test_ssh_direct_wins_over_the_port_list() -> None:
    body = {"id": "p", "ssh": {"direct": {"host": "203.0.113.9", "port": 31022, "username": "root"}},
            "runtime": {"ports": [{"privatePort": 22, "publicPort": 40000, "ip": "198.51.100.1",
                                   "isIpPublic": True, "type": "tcp"}]}}
    assert parse_endpoint(body) == Endpoint("203.0.113.9", 31022, "root")


def test_port_list_skips_private_ips_and_udp_and_reads_v1_mappings() -> None:
    ports = [
        {"privatePort": 22, "publicPort": 1, "ip": "10.0.0.5", "isIpPublic": False, "type": "tcp"},
        {"privatePort": 22, "publicPort": 2, "ip": "198.51.100.1", "isIpPublic": True, "type": "udp"},
        {"privatePort": 8888, "publicPort": 3, "ip": "198.51.100.1", "isIpPublic": True, "type": "tcp"},
    ]
    assert parse_endpoint({"id": "p", "ssh": {"direct": None}, "runtime": {"ports": ports}}) is None
    ports.append({"privatePort": 22, "publicPort": 4, "ip": "198.51.100.1", "isIpPublic": True, "type": "tcp"})
    assert parse_endpoint({"id": "p", "runtime": {"ports": ports}}) == Endpoint("198.51.100.1", 4, "root")
    legacy = {"id": "p", "publicIp": "198.51.100.7", "portMappings": {"22": 41234}}
    assert parse_endpoint(legacy) == Endpoint("198.51.100.7", 41234, "root")


def test_pod_parsing_reads_v2_and_older_field_names() -> None:
    v2 = parse_pod({"id": "a", "name": "mhd-a", "status": "RUNNING", "cost": 0.35, "gpu": {"id": "G", "count": 2},
                    "env": {"HF_TOKEN": "secret"}})
    assert (v2.status, v2.cost_per_hr, v2.gpu_type, v2.extra["gpu_count"]) == ("RUNNING", 0.35, "G", 2)
    assert "secret" not in json.dumps(v2.extra)
    v1 = parse_pod({"id": "b", "name": "mhd-b", "desiredStatus": "EXITED", "costPerHr": "0.79",
                    "machine": {"gpuTypeId": "NVIDIA A40"}})
    assert (v1.status, v1.cost_per_hr, v1.gpu_type, v1.gone) == ("EXITED", 0.79, "NVIDIA A40", True)


async def test_endpoint_is_none_until_port_22_is_mapped_and_always_read_fresh(sleep: RecordingSleep) -> None:
    clock = FakeClock()
    with RunpodStandin(KEY, provisioning_s=10, starting_s=10, ssh_delay_s=30, ssh_port=40022,
                       clock=clock) as s:
        async with make(s, sleep) as p:
            pod = await p.create("mhd-run1")
            seen = []
            for t in (0, 15, 25):
                clock.now = 1000.0 + t
                fresh = await p.get(pod.id)
                assert fresh is not None
                seen.append((fresh.status, await p.endpoint(pod)))
            assert seen == [("PROVISIONING", None), ("STARTING", None), ("RUNNING", None)]
            clock.now = 1031.0
            assert await p.endpoint(pod) == Endpoint("127.0.0.1", 40022, "root")
            s.set_ssh_endpoint("127.0.0.1", 40555, pod.id)  # restarted: a new public port
            assert await p.endpoint(pod) == Endpoint("127.0.0.1", 40555, "root")


async def test_endpoint_of_a_terminated_pod_is_an_error_not_a_wait(standin: RunpodStandin,
                                                                   provider: RunpodProvider) -> None:
    pod = await provider.create("mhd-run1")
    await provider.terminate(pod.id)
    with pytest.raises(ProviderError, match="no longer exists"):
        await provider.endpoint(pod)


async def test_find_adopts_only_the_exact_name(standin: RunpodStandin, provider: RunpodProvider) -> None:
    standin.seed_pod("mhd-xy")
    standin.seed_pod("mhd-x-2")
    assert await provider.find("mhd-x") is None
    pod_id = standin.seed_pod("mhd-x")
    found = await provider.find("mhd-x")
    assert found is not None and found.id == pod_id and found.name == "mhd-x"


async def test_find_ignores_stopped_failed_and_terminated_namesakes(standin: RunpodStandin,
                                                                    provider: RunpodProvider) -> None:
    for status in ("TERMINATED", "EXITED", "ERROR"):
        standin.seed_pod("mhd-x", status=status)
    assert await provider.find("mhd-x") is None
    starting = standin.seed_pod("mhd-x", status="STARTING")
    found = await provider.find("mhd-x")
    assert found is not None and found.id == starting


async def test_get_of_an_unknown_pod_is_none(provider: RunpodProvider) -> None:
    assert await provider.get("does-not-exist") is None


async def test_terminating_a_missing_pod_is_success(standin: RunpodStandin, provider: RunpodProvider) -> None:
    await provider.terminate("does-not-exist")
    pod_id = standin.seed_pod("mhd-run1")
    await provider.terminate(pod_id)
    await provider.terminate(pod_id)  # already gone: still success
    assert standin.pods[pod_id]["status"] == "TERMINATED"


async def test_list_owned_is_every_existing_mhd_pod(standin: RunpodStandin, provider: RunpodProvider) -> None:
    running = standin.seed_pod("mhd-a")
    stopped = standin.seed_pod("mhd-b", status="EXITED")  # still bills for its disk
    standin.seed_pod("mhd-c", status="TERMINATED")
    standin.seed_pod("jupyter-notebook")
    standin.seed_pod("xmhd-d")
    assert sorted(p.id for p in await provider.list_owned()) == sorted([running, stopped])


async def test_list_follows_a_next_cursor(sleep: RecordingSleep) -> None:
    pages = {None: {"pods": [{"id": "1", "name": "mhd-a", "status": "RUNNING"}],
                    "pagination": {"hasNextPage": True, "nextCursor": "c2"}},
             "c2": {"pods": [{"id": "2", "name": "mhd-b", "status": "RUNNING"}],
                    "pagination": {"hasNextPage": False, "nextCursor": None}}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    async with RunpodProvider(RunpodConfig(api_url="http://runpod.invalid/v2"), KEY,
                              transport=httpx.MockTransport(handler), sleep=sleep) as p:
        assert [pod.id for pod in await p.list_owned()] == ["1", "2"]


# Secrets ------------------------------------------------------------------------------------------

def test_api_key_from_file_or_env(tmp_path: Path) -> None:
    key_file = tmp_path / "runpod.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    assert load_api_key(RunpodConfig(api_key_file=key_file), {}) == KEY
    assert load_api_key(RunpodConfig(), {"RUNPOD_API_KEY": KEY}) == KEY
    # An explicitly configured file wins over the environment.
    assert load_api_key(RunpodConfig(api_key_file=key_file), {"RUNPOD_API_KEY": "other"}) == KEY


def test_missing_api_key_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RUNPOD_API_KEY"):
        load_api_key(RunpodConfig(), {})
    with pytest.raises(ConfigError, match="readable file"):
        load_api_key(RunpodConfig(api_key_file=tmp_path / "nope"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_api_key(RunpodConfig(api_key_file=tmp_path / "empty"), {})


def test_a_world_readable_key_file_is_warned_about_without_the_key(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "runpod.key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_api_key(RunpodConfig(api_key_file=key_file), {}) == KEY
    assert "chmod 600" in caplog.text and KEY not in caplog.text


async def test_the_api_key_never_appears_in_logs_errors_or_reprs(standin: RunpodStandin,
                                                                 sleep: RecordingSleep,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    texts: list[str] = []

    def keep(exc: BaseException) -> None:
        while exc is not None:
            texts.extend([str(exc), repr(exc)])
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]

    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    async with make(standin, sleep, max_attempts=2) as p:
        texts.append(repr(p))
        # A server (or proxy) that echoes the credential back must not get it into our errors.
        standin.fail_next("POST /pods", 422, detail=f"bad header Authorization: Bearer {KEY}")
        standin.fail_next("GET /pods/{id}", 500, times=2, detail=f"token {KEY} rejected")
        standin.fail_next("GET /pods", 429, retry_after=1)
        standin.fail_next("DELETE /pods/{id}", drop=True, times=2)
        for call in (p.create("mhd-run1"), p.get("abc"), p.terminate("abc")):
            try:
                await call
            except ProviderError as exc:
                keep(exc)
        pod = await p.create("mhd-run2")
        await p.list_owned()
        await p.endpoint(pod)
    async with make(standin, sleep, key=KEY + "x") as wrong:
        try:
            await wrong.list_owned()
        except ProviderError as exc:
            keep(exc)
    assert len(texts) > 5 and caplog.records
    assert any("[redacted]" in r.getMessage() for r in caplog.records), "debug log should show the redaction"
    assert KEY not in caplog.text
    for text in texts:
        assert KEY not in text


async def test_a_stock_image_gets_mhds_start_script_as_its_command() -> None:
    import base64
    import re

    from mhd.remote.runpod import START_SCRIPT

    cmd = start_command(RunpodConfig())  # the default: RunPod's stock PyTorch image
    assert cmd is not None
    m = re.fullmatch(r"bash -c 'echo ([A-Za-z0-9+/=]+) \| base64 -d \| bash'", cmd)
    assert m is not None, cmd
    assert base64.b64decode(m.group(1)) == START_SCRIPT.read_bytes()
    assert b"ensure_sshd" in START_SCRIPT.read_bytes()
    assert start_command(RunpodConfig(image="ghcr.io/me/mhd-trainer:0.1.0")) is None
    assert start_command(RunpodConfig(image="ghcr.io/me/mhd-trainer:0.1.0", start_script="always")) == cmd
    assert start_command(RunpodConfig(start_script="never")) is None
