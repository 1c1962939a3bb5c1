"""peft mode on the tiny offline model: merge_and_unload in a subprocess, same logits as base+adapter."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mhd.config import Config  # noqa: E402
from mhd.errors import MergeError  # noqa: E402
from mhd.merge import merge_run, rollback  # noqa: E402
from mhd.merge.registry import KIND_PEFT, cleanup_peft  # noqa: E402
from mhd.states.model import RunState  # noqa: E402
from mhd.store import Store  # noqa: E402
from tests.support.tiny import tiny_model_dir  # noqa: F401,E402  (session fixture)


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def logits(model: object, ids: object) -> object:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator]


def cfg_for(tmp: Path, base: Path, keep: int = 3) -> Config:
    return Config.model_validate({"state_dir": str(tmp / "state"),
                                  "merge": {"mode": "peft", "base_model_path": str(base), "keep": keep}})


def new_run(store: Store) -> str:
    run = store.create_run("test", "local")
    store.update_run(run.id, state=RunState.IDLE)
    return run.id


def test_peft_merge_gives_the_logits_of_base_plus_adapter_and_is_reused(tmp_path: Path,
                                                                      tiny_model_dir: Path) -> None:  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    cfg = cfg_for(tmp_path, tiny_model_dir)
    run_id = new_run(store)
    adapter = make_adapter(tiny_model_dir, tmp_path / "run" / "output" / "adapter", seed=1)
    logs: list[str] = []

    name = asyncio.run(merge_run(cfg, store, run_id, adapter, logs.append))
    out = tmp_path / "state" / "models" / run_id
    assert name == str(out)
    assert (out / "mhd_merge.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    assert (tmp_path / "state" / "models" / "latest").resolve() == out.resolve()
    assert [(m.name, m.kind, m.active) for m in store.models()] == [(name, KIND_PEFT, True)]

    ids = torch.tensor([[1, 5, 42, 7, 300, 9, 11, 1000]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits(base, ids)
    with_adapter = logits(PeftModel.from_pretrained(base, str(adapter)), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(out), ids)
    assert (with_adapter - base_logits).abs().max() > 1e-3  # type: ignore[operator]  # the adapter matters
    assert (merged - with_adapter).abs().max() < 1e-5  # type: ignore[operator]

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    assert asyncio.run(merge_run(cfg, store, run_id, adapter, logs.append)) == name
    assert any("already merged" in ln for ln in logs)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    store.close()


@pytest.mark.slow
def test_peft_rollback_repoints_latest(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    store = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    cfg = cfg_for(tmp_path, tiny_model_dir)
    names: list[str] = []
    for seed in (1, 2):
        run_id = new_run(store)
        adapter = make_adapter(tiny_model_dir, tmp_path / run_id / "adapter", seed=seed)
        name = asyncio.run(merge_run(cfg, store, run_id, adapter, lambda _: None))
        assert name is not None
        names.append(name)
    latest = tmp_path / "state" / "models" / "latest"
    assert latest.resolve() == Path(names[1]).resolve()
    assert asyncio.run(rollback(cfg, store)) == names[0]
    assert latest.resolve() == Path(names[0]).resolve()
    assert [m.name for m in store.models() if m.active] == [names[0]]
    assert len(store.events(kind="rollback")) == 1
    store.close()


def test_peft_merge_failure_is_a_merge_error_and_leaves_nothing_half_written(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:  # noqa: F811
    store = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    cfg = cfg_for(tmp_path, tmp_path / "no-such-base")
    run_id = new_run(store)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    with pytest.raises(MergeError, match=r"peft merge failed \(exit 2\): base model directory .* does not exist"):
        asyncio.run(merge_run(cfg, store, run_id, adapter, lambda _: None))
    models = tmp_path / "state" / "models"
    assert not (models / run_id).exists()
    assert not models.exists() or not [p for p in models.iterdir() if p.name.startswith(".")]
    assert store.models() == []
    store.close()


def test_peft_keep_n_removes_only_old_dirs_under_the_models_dir(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    cfg = Config.model_validate({"state_dir": str(tmp_path / "state"), "merge": {"mode": "peft", "keep": 1}})
    root = tmp_path / "state" / "models"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    store.add_model("r0", str(outside), KIND_PEFT)  # recorded, but not under models/: never removed
    dirs = {}
    for i in range(1, 4):
        d = root / f"r{i}"
        d.mkdir(parents=True)
        (d / "mhd_merge.json").write_text("{}")
        store.add_model(f"r{i}", str(d), KIND_PEFT)
        dirs[i] = d
    store.set_active_model(str(dirs[1]))  # the active one stays, whatever its age
    logs: list[str] = []

    assert cleanup_peft(cfg, store, logs.append) == [str(dirs[2])]
    assert sorted(os.listdir(root)) == ["r1", "r3"]
    assert outside.is_dir() and any("outside" in ln for ln in logs)
    assert [m.run_id for m in store.models()] == ["r0", "r1", "r3"]
    store.close()
