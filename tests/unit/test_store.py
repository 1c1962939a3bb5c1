"""The store on real SQLite files: compare-and-set transitions, journal, ledger, schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mhd.states.model import Outcome, RunState
from mhd.store import SCHEMA_VERSION, Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'mhd.db'}")


def test_wal_mode_and_schema_version(tmp_path: Path, store: Store):
    assert store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "mhd.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_version_1_database_is_upgraded_in_place_keeping_its_runs(tmp_path: Path):
    # The schema of version 1, as an mhd of that version left it (runs without the merge-retry columns).
    path = tmp_path / "old.db"
    old = Store(f"sqlite:///{path}")
    run = old.create_run("manual", "local")
    old.update_run(run.id, samples=7)
    old.close()
    with sqlite3.connect(path) as con:
        con.execute("ALTER TABLE runs DROP COLUMN merge_attempts")
        con.execute("ALTER TABLE runs DROP COLUMN merge_retry_at")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    new = Store(f"sqlite:///{path}")
    assert new.schema_version() == SCHEMA_VERSION
    got = new.get_run(run.id)
    assert got is not None and got.samples == 7 and got.merge_attempts == 0 and got.merge_retry_at is None
    new.update_run(run.id, merge_attempts=2)
    assert new.get_run(run.id).merge_attempts == 2


def test_a_version_2_database_gains_the_preemption_columns_and_bills_every_pod(tmp_path: Path):
    path = tmp_path / "v2.db"
    old = Store(f"sqlite:///{path}")
    run = old.create_run("manual", "runpod")
    old.update_run(run.id, cost_per_hr=0.5, pod_started_at=1000.0, pod_stopped_at=1720.0)
    old.record_pod("p1", run.id, "runpod", "mhd-x")
    old.close()
    with sqlite3.connect(path) as con:
        for col in ("preemptions", "on_demand", "pod_interruptible", "prior_billed_s", "prior_cost_usd",
                    "checkpoint_step"):
            con.execute(f"ALTER TABLE runs DROP COLUMN {col}")
        for col in ("cost_per_hr", "interruptible", "preempted"):
            con.execute(f"ALTER TABLE pods DROP COLUMN {col}")
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    new = Store(f"sqlite:///{path}")
    assert new.schema_version() == SCHEMA_VERSION == 4
    got = new.get_run(run.id)
    assert got is not None and got.preemptions == 0 and not got.on_demand and got.checkpoint_step is None
    assert got.billed_s() == pytest.approx(720.0) and got.cost_usd() == pytest.approx(0.1)
    (pod,) = new.run_pods(run.id)
    assert not pod.preempted and not pod.interruptible
    # A second pod after a preemption: the first one's time and cost are carried, not lost.
    got = new.update_run(run.id, prior_billed_s=720.0, prior_cost_usd=0.1, cost_per_hr=0.25,
                         pod_started_at=2000.0, pod_stopped_at=3440.0, preemptions=1)
    assert got.billed_s() == pytest.approx(2160.0) and got.cost_usd() == pytest.approx(0.2)
    assert got.pod_billed_s() == pytest.approx(1440.0)


def test_a_version_3_database_gains_lineage_and_forgetting(tmp_path: Path):
    path = tmp_path / "v3.db"
    old = Store(f"sqlite:///{path}")
    run = old.create_run("manual", "local")
    old.close()
    with sqlite3.connect(path) as con:
        con.execute("DROP TABLE lineage")
        con.execute("DROP TABLE forgotten")
        for col in ("purged_at", "parent_run_id"):
            con.execute(f"ALTER TABLE runs DROP COLUMN {col}")
        con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    new = Store(f"sqlite:///{path}")
    assert new.schema_version() == 4
    assert new.record_lineage(run.id, [("k1", "train", "observation", None), ("k2", "heldout", None, None)]) == 2
    assert new.model_keys(run.id) == {"k1"}  # held out: never inside the model
    assert new.forget({"k1": "deleted"}) == ["k1"] and new.forget({"k1": "owner"}) == []
    assert new.forgotten_in(run.id) == {"k1"} and new.get_run(run.id).purged_at is None


def test_newer_schema_is_refused_with_advice(tmp_path: Path, store: Store):
    with sqlite3.connect(tmp_path / "mhd.db") as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99"):
        Store(f"sqlite:///{tmp_path / 'mhd.db'}")


def test_transition_is_compare_and_set(store: Store):
    run = store.create_run("manual", "local")
    store.transition(run.id, RunState.PROVISIONING, RunState.CONNECTING, "pod p1", pod_id="p1")
    with pytest.raises(StoreError, match="expected state Provisioning, found Connecting"):
        store.transition(run.id, RunState.PROVISIONING, RunState.CONNECTING)
    j = store.journal(run.id)
    assert [(t.from_state, t.to_state) for t in j] == [
        (RunState.IDLE, RunState.PROVISIONING), (RunState.PROVISIONING, RunState.CONNECTING)]
    assert store.get_run(run.id).pod_id == "p1"


def test_state_is_stored_as_enum_name_not_free_text(tmp_path: Path, store: Store):
    run = store.create_run("manual", "local")
    with sqlite3.connect(tmp_path / "mhd.db") as con:
        raw = con.execute("SELECT state FROM runs WHERE id = ?", (run.id,)).fetchone()[0]
    assert RunState[raw] is RunState.PROVISIONING


def test_only_one_active_run(store: Store):
    run = store.create_run("manual", "local")
    with pytest.raises(StoreError, match="already active"):
        store.create_run("threshold", "local")
    store.transition(run.id, RunState.PROVISIONING, RunState.ABORTING, abort_outcome=Outcome.CANCELLED)
    store.transition(run.id, RunState.ABORTING, RunState.IDLE, outcome=Outcome.CANCELLED)
    assert store.active_run() is None
    store.create_run("manual", "local")


def test_progress_appends_points_and_advances_offset(store: Store):
    run = store.create_run("manual", "local")
    store.add_progress(run.id, [{"step": 1, "total_steps": 4, "loss": 2.0}], 50)
    r = store.add_progress(run.id, [{"step": 2, "total_steps": 4, "loss": 1.5, "eta_s": 3.0}], 100)
    assert (r.step, r.total_steps, r.loss, r.eta_s, r.progress_offset) == (2, 4, 1.5, 3.0, 100)
    assert [p.step for p in store.progress(run.id)] == [1, 2]


def test_ledger_marks_each_key_once(store: Store):
    run = store.create_run("manual", "local")
    assert store.mark_trained(["a", "b"], run.id) == 2
    assert store.mark_trained(["b", "c"], run.id) == 1
    assert store.trained_keys() == {"a", "b", "c"}


def test_attempts_survive_reopen(tmp_path: Path, store: Store):
    run = store.create_run("manual", "local")
    store.bump_attempts(run.id)
    store.bump_attempts(run.id)
    again = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    assert again.get_run(run.id).attempts == 2
