"""SIGKILL the real daemon in each of the seven states; a restart must finish the run with
one pod created, the job launched once, the adapter fetched once and verified, no pod left."""

from __future__ import annotations

import json
import re

import pytest

from mhd.store import Store
from tests.support.daemon import no_jobs_left, write_memories

pytestmark = pytest.mark.slow

# state → (fault-injection pause that holds the daemon there, predicate that we are there)
POINTS = {
    "Provisioning": "Provisioning.created=30",
    "Connecting": "Connecting=30",
    "Uploading": "Uploading.partial=30",
    "Training": None,
    "Fetching": "Fetching.partial=30",
    "Merging": "Merging=30",
}


def _bytes_downloaded(denv, run_id: str) -> int:
    log = (denv.state / "runs" / run_id / "run.log").read_text()
    return sum(int(n) for n in re.findall(r"downloaded \S+: (\d+) bytes", log))


@pytest.mark.parametrize("state", list(POINTS))
def test_sigkill_in_state_then_restart_finishes_the_run(denv, state):
    denv.configure(training={"extra": {"fake_steps": 12, "fake_step_s": 0.25, "fake_adapter_bytes": 3 << 20}})
    write_memories(denv.memories, 6)
    pause = POINTS[state]
    d = denv.daemon(env={"MHD_DEBUG_PAUSE": pause} if pause else None).start()
    run_id = d.ask("train")["run_id"]
    d.wait_state(state, 60)
    if state == "Provisioning":
        d.wait_for(lambda: denv.pod_creations() == 1, 30, "pod created")
    if state == "Training":
        d.wait_for(lambda: (d.status()["progress"]["step"] or 0) >= 2, 30, "training under way")
    if state == "Fetching":
        d.wait_for(lambda: _bytes_downloaded(denv, run_id) > 0, 30, "first file fetched")
    d.kill()

    d2 = denv.daemon().start()  # no pauses this time
    d2.wait_for(lambda: d2.status()["state"] == "Idle" and d2.status()["last_run"], 90, "run end")
    last = d2.status()["last_run"]
    assert last["id"] == run_id
    assert last["outcome"] == "succeeded", last
    assert denv.pod_creations() == 1
    assert denv.launches(run_id) == 1
    out = denv.state / "runs" / run_id / "output"
    manifest = json.loads((out / "manifest.json").read_text())
    assert _bytes_downloaded(denv, run_id) == sum(f["size"] for f in manifest["files"])
    no_jobs_left(denv)
    pod = json.loads((denv.pods / "pods" / f"mhd-{run_id}.json").read_text())
    assert pod["status"] == "TERMINATED"
    store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
    visited = [t.to_state.value for t in store.journal(run_id)]
    assert visited[-1] == "Idle" and "Aborting" not in visited
    assert d2.stop() == 0


def test_sigkill_while_idle_then_restart_counts_and_runs(denv):
    d = denv.daemon().start()
    d.kill()
    write_memories(denv.memories, 6)  # written while the daemon is down
    d2 = denv.daemon().start()
    d2.wait_for(lambda: d2.status()["last_run"] and d2.status()["state"] == "Idle", 60, "threshold run")
    assert d2.status()["last_run"]["outcome"] == "succeeded"
    assert d2.status()["last_run"]["trigger"] == "threshold"
