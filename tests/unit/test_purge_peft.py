"""The purge in peft mode (merged model directories and the ``latest`` symlink), on a real DB and disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mhd.config import Config
from mhd.merge.registry import KIND_PEFT, models_dir, point_latest
from mhd.purge import purge
from mhd.states.model import Outcome, RunState
from mhd.store import Store


def _run(store: Store, cfg: Config, keys: list[str], name: str, text: str) -> tuple[str, Path]:
    run = store.create_run("manual", "local")
    store.record_lineage(run.id, [(k, "train", "observation", None) for k in keys])
    inputs = cfg.runs_dir / run.id / "input"
    inputs.mkdir(parents=True)
    (inputs / "dataset.jsonl").write_text(text + "\n")
    (cfg.runs_dir / run.id / "run.log").write_text("trained\n")
    merged = models_dir(cfg) / name
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"weights")
    store.transition(run.id, RunState.PROVISIONING, RunState.IDLE, outcome=Outcome.SUCCEEDED)
    store.add_model(run.id, str(merged), KIND_PEFT)
    return run.id, merged


def test_merged_dirs_holding_a_forgotten_memory_go_and_latest_moves_to_the_clean_one(tmp_path: Path) -> None:
    cfg = Config(memory_dir=tmp_path / "m", state_dir=tmp_path / "s", merge={"mode": "peft"})
    store = Store(f"sqlite:///{tmp_path / 's' / 'mhd.db'}")
    clean_run, clean = _run(store, cfg, ["a"], "clean", "a walk by the river")
    old_run, old = _run(store, cfg, ["a", "secret"], "old", "the secret text")
    store.set_active_model(str(old))
    point_latest(cfg, old)

    store.forget({"secret": "deleted"})
    report = asyncio.run(purge(cfg, store))

    assert report.models_removed == [str(old)] and report.alias == str(clean)
    assert not old.exists() and clean.exists()
    assert (models_dir(cfg) / "latest").resolve() == clean.resolve()
    assert [m.name for m in store.models()] == [str(clean)] and store.models()[0].active
    assert report.runs_purged == [old_run]
    assert not (cfg.runs_dir / old_run / "input").exists() and (cfg.runs_dir / old_run / "run.log").exists()
    assert (cfg.runs_dir / clean_run / "input" / "dataset.jsonl").exists()
    assert store.forgotten_keys(pending_only=True) == set()
    assert asyncio.run(purge(cfg, store)).models_removed == []  # done is done


def test_with_no_clean_model_left_latest_is_removed(tmp_path: Path) -> None:
    cfg = Config(memory_dir=tmp_path / "m", state_dir=tmp_path / "s", merge={"mode": "peft"})
    store = Store(f"sqlite:///{tmp_path / 's' / 'mhd.db'}")
    _, only = _run(store, cfg, ["secret"], "only", "the secret text")
    store.set_active_model(str(only))
    point_latest(cfg, only)
    store.forget({"secret": "owner"})
    report = asyncio.run(purge(cfg, store))
    assert report.alias == "" and not (models_dir(cfg) / "latest").is_symlink() and not only.exists()
