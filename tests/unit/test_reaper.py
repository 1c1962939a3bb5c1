"""The reaper against the RunPod stand-in: unowned mhd-* pods end, everything else is left alone."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from mhd.config import RunpodConfig
from mhd.errors import ProviderError
from mhd.remote.provider import Endpoint, Pod
from mhd.remote.reaper import reap
from mhd.remote.runpod import RunpodProvider
from tests.support.runpod_standin import RunpodStandin

pytestmark = pytest.mark.anyio

KEY = "rpa_REAPER_key_never_logged_42"
log = logging.getLogger("test.reaper")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _no_sleep(_seconds: float) -> None:
    return None


@pytest.fixture
def standin() -> Iterator[RunpodStandin]:
    with RunpodStandin(KEY) as s:
        yield s


@pytest.fixture
async def provider(standin: RunpodStandin) -> AsyncIterator[RunpodProvider]:
    async with RunpodProvider(RunpodConfig(api_url=standin.url), KEY, sleep=_no_sleep, max_attempts=2) as p:
        yield p


def status(standin: RunpodStandin, pod_id: str) -> str:
    return str(standin.pods[pod_id]["status"])


async def test_reaper_terminates_an_unowned_mhd_pod_and_leaves_the_rest(
        standin: RunpodStandin, provider: RunpodProvider, caplog: pytest.LogCaptureFixture) -> None:
    orphan = standin.seed_pod("mhd-20261101-030000-dead", cost_per_hr=0.79)
    owned = standin.seed_pod("mhd-20261125-030000-live")
    notebook = standin.seed_pod("my-notebook")  # someone's own pod: never ours to touch
    with caplog.at_level(logging.WARNING, logger="test.reaper"):
        reaped = await reap(provider, lambda: {owned}, log)
    assert [p.id for p in reaped] == [orphan]
    assert status(standin, orphan) == "TERMINATED"
    assert status(standin, owned) == "RUNNING" and status(standin, notebook) == "RUNNING"
    [line] = [r.getMessage() for r in caplog.records if "terminated unowned" in r.getMessage()]
    assert orphan in line and "mhd-20261101-030000-dead" in line and "0.790" in line
    assert [r.path for r in standin.requests_for("DELETE /pods/{id}")] == [f"/pods/{orphan}"]


async def test_a_stopped_orphan_is_reaped_too(standin: RunpodStandin, provider: RunpodProvider) -> None:
    stopped = standin.seed_pod("mhd-old", status="EXITED")  # the dead-man stopped it; disk still bills
    gone = standin.seed_pod("mhd-older", status="TERMINATED")
    assert [p.id for p in await reap(provider, set, log)] == [stopped]
    assert status(standin, stopped) == "TERMINATED"
    assert standin.requests_for(f"DELETE /pods/{gone}") == []


async def test_a_pod_owned_by_name_is_spared_while_its_run_has_no_pod_id_yet(
        standin: RunpodStandin, provider: RunpodProvider) -> None:
    just_created = standin.seed_pod("mhd-run7", age_s=1)
    assert await reap(provider, lambda: {"mhd-run7"}, log) == []
    assert status(standin, just_created) == "RUNNING"


async def test_ownership_is_asked_again_right_before_each_terminate(standin: RunpodStandin,
                                                                    provider: RunpodProvider) -> None:
    first = standin.seed_pod("mhd-a")
    second = standin.seed_pod("mhd-b")
    answers = iter([set(), {second}])  # a run adopts mhd-b while the reaper works on mhd-a

    reaped = await reap(provider, lambda: next(answers), log)
    assert [p.id for p in reaped] == [first]
    assert status(standin, second) == "RUNNING"


async def test_transient_errors_are_logged_not_raised(standin: RunpodStandin, provider: RunpodProvider,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    orphan = standin.seed_pod("mhd-orphan")
    standin.fail_next("GET /pods", 503, times=2)
    with caplog.at_level(logging.WARNING, logger="test.reaper"):
        assert await reap(provider, set, log) == []
    assert "cannot list" in caplog.text
    standin.fail_next("DELETE /pods/{id}", 502, times=2)
    with caplog.at_level(logging.WARNING, logger="test.reaper"):
        assert await reap(provider, set, log) == []
    assert status(standin, orphan) == "RUNNING" and "next round retries" in caplog.text
    # The next round gets it.
    assert [p.id for p in await reap(provider, set, log)] == [orphan]
    assert KEY not in caplog.text


async def test_a_pod_the_key_may_not_end_is_skipped_and_the_others_still_reaped(
        standin: RunpodStandin, provider: RunpodProvider, caplog: pytest.LogCaptureFixture) -> None:
    locked = standin.seed_pod("mhd-a")
    other = standin.seed_pod("mhd-b")
    standin.fail_next(f"DELETE /pods/{locked}", 403)
    with caplog.at_level(logging.ERROR, logger="test.reaper"):
        reaped = await reap(provider, set, log)
    assert [p.id for p in reaped] == [other]
    assert status(standin, locked) == "RUNNING" and locked in caplog.text and "by hand" in caplog.text


async def test_a_permanent_listing_error_is_raised(standin: RunpodStandin) -> None:
    async with RunpodProvider(RunpodConfig(api_url=standin.url), "wrong-key", sleep=_no_sleep) as bad:
        with pytest.raises(ProviderError, match="API key"):
            await reap(bad, set, log)


class SloppyProvider:
    """A provider whose list_owned forgets to filter by prefix (a real class, not a mock)."""

    name = "sloppy"

    def __init__(self) -> None:
        self.terminated: list[str] = []

    async def list_owned(self) -> list[Pod]:
        return [Pod("1", "notebook", "RUNNING"), Pod("2", "mhd-x", "RUNNING")]

    async def terminate(self, pod_id: str) -> None:
        self.terminated.append(pod_id)

    async def create(self, name: str, *, interruptible: bool = False) -> Pod:
        raise NotImplementedError

    async def find(self, name: str) -> Pod | None:
        return None

    async def get(self, pod_id: str) -> Pod | None:
        return None

    async def endpoint(self, pod: Pod) -> Endpoint | None:
        return None

    async def aclose(self) -> None:
        return None


async def test_the_reaper_never_terminates_a_pod_without_the_mhd_prefix() -> None:
    sloppy = SloppyProvider()
    await reap(sloppy, set, log)
    assert sloppy.terminated == ["2"]
