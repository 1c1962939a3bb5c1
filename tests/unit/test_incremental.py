"""Incremental training's decisions (mhd/dataset/incremental.py) on a real store and real dataset builds.

Each fallback to a full run names its reason; an incremental build trains only on memories the
served chain has not seen plus the replay sample, and never on a held-out one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mhd.config import Config, DatasetConfig
from mhd.dataset.build import build_dataset
from mhd.dataset.incremental import FULL, INCREMENTAL, Plan, plan_run, replay_count
from mhd.states.model import Outcome, RunState
from mhd.store import TRAIN, Run, Store
from tests.support.memories import memory, write

NOW = datetime(2026, 7, 1, tzinfo=UTC)
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'mhd.db'}")


def config(tmp_path: Path, **training: Any) -> Config:
    t = {"mode": "incremental", "base_model": "tiny", "lora_rank": 8, "lora_alpha": 16, "target_modules": TARGETS,
         **training}
    return Config(state_dir=tmp_path / "state", memory_dir=tmp_path / "episodic", training=t)


def promoted(cfg: Config, store: Store, keys: list[str], *, parent: str | None = None, **shape: Any) -> Run:
    """A succeeded run with its adapter on disk, trained on ``keys`` (lineage train rows)."""
    run = store.create_run("manual", "local")
    d = cfg.runs_dir / run.id
    (d / "input").mkdir(parents=True)
    (d / "output" / "adapter").mkdir(parents=True)
    conf = {"base_model": "tiny", "lora_rank": 8, "lora_alpha": 16, "target_modules": TARGETS, **shape}
    (d / "input" / "config.json").write_text(json.dumps(conf))
    (d / "output" / "adapter" / "adapter_config.json").write_text("{}")
    (d / "output" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    store.record_lineage(run.id, ((k, TRAIN, "observation", None) for k in keys))
    return store.update_run(run.id, state=RunState.IDLE, outcome=Outcome.SUCCEEDED, parent_run_id=parent)


def fresh(store: Store, trigger: str = "threshold") -> Run:
    """The run being planned (left idle, so that the next one can be created)."""
    run = store.create_run(trigger, "local")
    return store.update_run(run.id, state=RunState.IDLE)


def test_incremental_starts_from_the_promoted_run_with_its_chain_as_seen(tmp_path: Path, store: Store) -> None:
    cfg = config(tmp_path)
    first = promoted(cfg, store, ["a", "b"])
    second = promoted(cfg, store, ["c"], parent=first.id)
    plan = plan_run(cfg, store, fresh(store))
    assert plan.mode == INCREMENTAL and plan.parent_run_id == second.id
    assert plan.seen == {"a", "b", "c"}  # the parent's model holds its ancestors' memories too
    assert plan.parent_adapter == cfg.runs_dir / second.id / "output" / "adapter"


@pytest.mark.parametrize("change, reason", [
    ({"base_model": "other"}, "the base model changed (other → tiny)"),
    ({"lora_rank": 16}, "the LoRA shape changed (lora_rank 16 → 8)"),
    ({"lora_alpha": 32}, "the LoRA shape changed (lora_alpha 32 → 16)"),
    ({"target_modules": ["q_proj"]}, "the LoRA shape changed (target_modules ['q_proj'] → ['q_proj', 'v_proj'])"),
])
def test_a_changed_base_or_lora_shape_means_a_full_run(tmp_path: Path, store: Store, change: dict[str, Any],
                                                       reason: str) -> None:
    cfg = config(tmp_path)
    promoted(cfg, store, ["a"], **change)
    plan = plan_run(cfg, store, fresh(store))
    assert (plan.mode, plan.reason) == (FULL, reason)


def test_no_promoted_adapter_or_mode_full_means_a_full_run(tmp_path: Path, store: Store) -> None:
    cfg = config(tmp_path)
    assert plan_run(cfg, store, fresh(store)).reason == "no promoted model to start from"
    promoted(cfg, store, ["a"])
    plan = plan_run(config(tmp_path, mode="full"), store, fresh(store))
    assert (plan.mode, plan.reason) == (FULL, 'training.mode = "full"')


def test_every_full_every_th_run_is_full(tmp_path: Path, store: Store) -> None:
    cfg = config(tmp_path, full_every=3)
    full = promoted(cfg, store, ["a"])
    one = promoted(cfg, store, ["b"], parent=full.id)
    assert plan_run(cfg, store, fresh(store)).mode == INCREMENTAL
    promoted(cfg, store, ["c"], parent=one.id)  # the chain is now 3 runs long: full, inc, inc
    plan = plan_run(cfg, store, fresh(store))
    assert (plan.mode, plan.reason) == (FULL, "every 3rd run is full (the promoted model is the 3rd of its chain)")


def test_a_forgetting_run_is_always_full(tmp_path: Path, store: Store) -> None:
    """An incremental forgetting run would inherit the forgotten memory from its parent's weights."""
    cfg = config(tmp_path)
    first = promoted(cfg, store, ["a", "gone"])
    child = promoted(cfg, store, ["b"], parent=first.id)
    assert plan_run(cfg, store, fresh(store, "forget")).mode == FULL
    store.forget({"gone": "owner"})
    # Through the chain: the child never trained on it, its weights still hold it.
    assert store.forgotten_in(child.id) == {"gone"} and store.chain_holding(["gone"]) == {child.id}
    from mhd.purge import affected_models

    store.add_model(child.id, "mhd:child", "ollama")
    assert [m.name for m in affected_models(store)] == ["mhd:child"]  # the served model holds it too
    plan = plan_run(cfg, store, fresh(store))
    assert plan.mode == FULL and "forgotten" in plan.reason


def test_replay_count() -> None:
    assert [replay_count(n, 100, 0.3) for n in (0, 1, 10, 50)] == [0, 1, 3, 15]
    assert replay_count(50, 4, 0.3) == 4 and replay_count(10, 100, 0.0) == 0


def _memories(root: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        ts = (NOW - timedelta(days=1 + i % 20)).isoformat().replace("+00:00", "Z")
        write(root, f"m{i:03d}.json", memory(f"Memory number {i}: the walk by the river on day {i}.", timestamp=ts))


def test_an_incremental_build_trains_new_plus_replay_and_never_a_held_out_memory(tmp_path: Path) -> None:
    root = tmp_path / "episodic"
    dcfg = DatasetConfig(persona_name="Maya", holdout_fraction=0.1, holdout_min=4)
    _memories(root, 60)
    first = build_dataset(root, tmp_path / "one", dcfg, now=NOW)
    _memories(root, 20, start=60)
    seen = frozenset(first["train_keys"])
    plan = Plan(INCREMENTAL, "test", parent_run_id="r1", seen=seen, replay_fraction=0.3)
    full = build_dataset(root, tmp_path / "full", dcfg, now=NOW)
    inc = build_dataset(root, tmp_path / "inc", dcfg, now=NOW, plan=plan, salt="r2")

    assert inc["heldout_keys"] == full["heldout_keys"]  # the split is the full build's
    new = set(full["train_keys"]) - seen
    assert inc["training"] == {"mode": INCREMENTAL, "reason": "test", "parent_run_id": "r1",
                               "new": len(new), "replay": replay_count(len(new), len(seen), 0.3)}
    keys = set(inc["train_keys"])
    assert new <= keys and len(keys - new) == inc["training"]["replay"] and keys - new <= seen
    assert not keys & set(inc["heldout_keys"])
    assert inc["samples"] == len(keys) == sum(1 for _ in (tmp_path / "inc" / "dataset.jsonl").open())
    # Another run replays other old memories; the same run rebuilt replays the same ones.
    again = build_dataset(root, tmp_path / "again", dcfg, now=NOW, plan=plan, salt="r2")
    other = build_dataset(root, tmp_path / "other", dcfg, now=NOW, plan=plan, salt="r3")
    assert again["train_keys"] == inc["train_keys"] and other["train_keys"] != inc["train_keys"]


def test_a_held_out_memory_the_parent_trained_on_makes_the_build_full(tmp_path: Path) -> None:
    root = tmp_path / "episodic"
    dcfg = DatasetConfig(persona_name="Maya", holdout_fraction=0.1, holdout_min=4)
    _memories(root, 6)  # below 2 * holdout_min: nothing held out, all trained
    first = build_dataset(root, tmp_path / "one", dcfg, now=NOW)
    assert not first["heldout_keys"]
    n = 6
    while not set(build_dataset(root, tmp_path / "probe", dcfg, now=NOW)["heldout_keys"]) & set(first["train_keys"]):
        _memories(root, 1, start=n)  # until the split holds out one the first run trained on
        n += 1
    plan = Plan(INCREMENTAL, "test", parent_run_id="r1", seen=frozenset(first["train_keys"]), replay_fraction=0.3)
    inc = build_dataset(root, tmp_path / "inc", dcfg, now=NOW, plan=plan, salt="r2")
    assert inc["training"]["mode"] == FULL and "held-out" in inc["training"]["reason"]
    assert len(inc["train_keys"]) + len(inc["heldout_keys"]) == n


def test_provisioning_builds_an_incremental_run_on_the_gates_copy_of_the_served_adapter(tmp_path: Path,
                                                                                        store: Store) -> None:
    """With the gate on, the start weights are the current_adapter/ it uploads anyway: one copy, not two."""
    import logging

    from mhd.states import provisioning
    from mhd.states.context import RunContext

    cfg = config(tmp_path)
    ctx = RunContext(cfg=cfg, store=store, provider=None, connector=None, remote_root="/r",  # type: ignore[arg-type]
                     log=logging.getLogger("test"))
    _memories(cfg.memory_dir, 40)
    first = fresh(store, "manual")
    provisioning._build_dataset(ctx, first)
    provisioning._finish_inputs(ctx, first, None)
    adapter = cfg.runs_dir / first.id / "output" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of the first run")
    store.update_run(first.id, outcome=Outcome.SUCCEEDED)
    _memories(cfg.memory_dir, 10, start=40)

    second = fresh(store)
    manifest = provisioning._build_dataset(ctx, second)
    provisioning._finish_inputs(ctx, second, None, manifest["training"]["parent_run_id"])

    got = store.get_run(second.id)
    assert got is not None and got.parent_run_id == first.id
    inputs = cfg.runs_dir / second.id / "input"
    conf = json.loads((inputs / "config.json").read_text())
    assert (conf["init_adapter"], conf["init_run"], conf["evaluate"]["current_run"]) == (
        "current_adapter", first.id, first.id)
    assert (inputs / "current_adapter" / "adapter_model.safetensors").read_bytes() == b"weights of the first run"
    assert not (inputs / "start_adapter").exists()
    assert not {"mode", "replay_fraction", "full_every", "incremental_lr_scale"} & conf.keys()  # the daemon's keys
    # From trained weights at a lower rate; the full first run had the configured one.
    assert conf["learning_rate"] == cfg.training.learning_rate * cfg.training.incremental_lr_scale == 1e-4
    assert json.loads((cfg.runs_dir / first.id / "input" / "config.json").read_text())["learning_rate"] == 2e-4
    first_train = {r.key for r in store.lineage(first.id) if r.role == TRAIN}
    own = {r.key for r in store.lineage(second.id) if r.role == TRAIN}
    assert len(own - first_train) == manifest["training"]["new"] and len(own & first_train) == 3
    assert store.model_keys(second.id) == first_train | own
    assert [e.detail for e in store.events(second.id, "training")] == [
        f"incremental run: {manifest['training']['new']} new + 3 replayed memories, "
        f"from run {first.id}'s adapter (1 run(s) since the last full run)"]


def test_an_active_run_started_from_an_adapter_holding_a_forgotten_memory_is_cancelled(tmp_path: Path,
                                                                                       store: Store) -> None:
    """Its own dataset is clean, but its start weights carry the memory: finishing it would be paid for nothing."""
    from mhd.daemon.forgetting import Forgetter
    from mhd.daemon.watcher import MemoryIndex

    cfg = config(tmp_path)
    parent = promoted(cfg, store, ["a", "gone"])
    clean = promoted(cfg, store, ["b"])  # a run with no chain: not affected
    active = store.create_run("threshold", "local")
    store.record_lineage(active.id, [("c", TRAIN, "observation", None)])
    store.update_run(active.id, parent_run_id=parent.id)
    cancelled: list[tuple[str, str]] = []
    forgetter = Forgetter(cfg, store, MemoryIndex(cfg.memory_dir, store, cfg.dataset), start_run=lambda t: None,
                          cancel=lambda run_id, why: cancelled.append((run_id, why)), hold_until=lambda: 0.0,
                          on_purged=lambda: None)
    store.forget({"b": "owner"})  # held by another run only
    forgetter.react()
    assert cancelled == []
    store.forget({"gone": "owner"})
    forgetter.react()
    assert cancelled == [(active.id, "the adapter it started from holds a memory forgotten by its owner")]
    assert store.chain_holding(["gone", "b"]) == {active.id} and clean.id not in store.chain_holding(["b"])
