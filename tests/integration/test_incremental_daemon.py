"""Incremental training in the daemon: a real daemon process, the local provider, the fake trainer.

The second run starts from the first run's adapter (the bytes uploaded, and the trainer's note of
what it loaded), trains on the new memories plus the replay sample, and its lineage lists the
parent and what it inherited; a forgetting run is full, and the purge follows the chain.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mhd.store import Store
from tests.integration.test_forgetting import cli_json, forget_run_after, purged, train
from tests.support.daemon import write_memories, write_memory

pytestmark = pytest.mark.slow

SECRET = "Perpetua Windlass hid the green kite behind the boathouse"


def dataset_keys(run_dir: Path) -> set[str]:
    lines = (run_dir / "input" / "dataset.jsonl").read_text().splitlines()
    return {json.loads(line)["key"] for line in lines if line.strip()}


def test_a_run_starts_from_the_served_adapter_on_new_plus_replay_and_a_forgetting_run_is_full(denv):
    denv.configure(threshold=1000, retry={"failed_run_cooldown_s": 0},
                   training={"mode": "incremental", "replay_fraction": 0.5})
    write_memories(denv.memories, 6)
    secret = write_memory(denv.memories, SECRET)
    d = denv.daemon().start()
    first = train(d)
    write_memories(denv.memories, 2, prefix="later")
    second = train(d)
    assert (first["outcome"], second["outcome"]) == ("succeeded", "succeeded")
    runs = {r["id"]: r for r in cli_json(denv, "runs")}
    assert runs[first["id"]]["training"] == {"mode": "full", "reason": "no promoted model to start from",
                                             "parent_run_id": None}
    inc = runs[second["id"]]["training"]
    assert (inc["mode"], inc["parent_run_id"], inc["new"], inc["replay"]) == ("incremental", first["id"], 2, 1)
    assert runs[second["id"]]["parent_run_id"] == first["id"] and runs[second["id"]]["samples"] == 3

    # The start weights: the first run's fetched adapter, uploaded and loaded by the trainer.
    one, two = denv.state / "runs" / first["id"], denv.state / "runs" / second["id"]
    parent_weights = (one / "output" / "adapter" / "adapter_model.safetensors").read_bytes()
    conf = json.loads((two / "input" / "config.json").read_text())
    assert (conf["init_adapter"], conf["init_run"]) == ("start_adapter", first["id"])
    assert (two / "input" / "start_adapter" / "adapter_model.safetensors").read_bytes() == parent_weights
    fetched = json.loads((two / "output" / "manifest.json").read_text())
    assert fetched["init_adapter_sha256"] == hashlib.sha256(parent_weights).hexdigest()

    # Only new + replay trained; the lineage lists the parent and what its model inherited.
    first_keys, second_keys = dataset_keys(one), dataset_keys(two)
    assert len(second_keys - first_keys) == 2 and len(second_keys & first_keys) == 1
    lin = cli_json(denv, "lineage", second["id"])
    assert lin["parents"] == [first["id"]]
    assert {m["key"] for m in lin["memories"] if m["role"] == "train"} == second_keys
    assert {m["key"] for m in lin["inherited"]} == first_keys - second_keys
    assert lin["model_memories"] == len(first_keys | second_keys) == 9

    # A memory of the first run forgotten: the served (second) model holds it through its start
    # weights, so a forgetting run comes, and it is full — from the base, on the remaining memories.
    secret.unlink()
    store = Store(f"sqlite:///{denv.state / 'mhd.db'}")
    third = forget_run_after(d, store, second["id"])
    assert third["outcome"] == "succeeded", third
    d.wait_for(lambda: purged(d), 20, "the purge")
    runs = {r["id"]: r for r in cli_json(denv, "runs")}
    assert runs[third["id"]]["training"]["mode"] == "full" and runs[third["id"]]["parent_run_id"] is None
    assert "forgetting run" in runs[third["id"]]["training"]["reason"]
    assert not (denv.state / "runs" / third["id"] / "input" / "start_adapter").exists()
    # Both runs of the chain are purged: the second never trained on it, but its weights hold it.
    assert runs[first["id"]]["purged_at"] is not None and runs[second["id"]]["purged_at"] is not None
    assert runs[third["id"]]["purged_at"] is None
    d.stop()
