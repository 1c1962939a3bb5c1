"""The real trainer (mhd/pod/train.py) started from a parent adapter, on the tiny offline model, CPU only.

At step 0 the trainer's LoRA weights are the parent adapter's safetensors, trainable, on both
loading paths (plain peft, and the unsloth path's weight copy into its own LoRA modules); then it
trains them further. A parent of another LoRA shape is a bad input (exit 2), never a silent fresh start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_trainer import Run, finish, trainer_config
from tests.support.tiny import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

import torch  # noqa: E402  (after the skip: torch comes with trl)
from safetensors.torch import load_file  # noqa: E402

from mhd.pod import train as T  # noqa: E402

ROWS = [{"messages": [{"role": "system", "content": "You are Maya."},
                      {"role": "user", "content": f"What did you do on day {i}?"},
                      {"role": "assistant", "content": f"On day {i} I walked by the river and fed the ducks."}]}
        for i in range(6)]


def write_run(d: Path, model: Path, **over: Any) -> Path:
    d.mkdir(parents=True)
    conf = {**trainer_config(model), "num_train_epochs": 1, "save_steps": 100, **over}
    (d / "config.json").write_text(json.dumps(conf))
    (d / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:  # noqa: F811
    """A parent adapter whose weights no fresh LoRA has (lora_B is zero when fresh, lora_A seeded)."""
    root = tmp_path_factory.mktemp("parent")
    run = T.RunDir(write_run(root / "run", tiny_model_dir))
    tr, _ = T.build_trainer(T.read_config(run), run, "cpu")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in tr.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    tr.model.save_pretrained(str(root / "adapter"))
    return root / "adapter"


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_step_0_weights_are_the_parent_adapter_trainable_and_training_moves_them(
        tmp_path: Path, tiny_model_dir: Path, parent: Path) -> None:  # noqa: F811
    d = write_run(tmp_path / "child", tiny_model_dir, init_adapter="current_adapter", init_run="r1")
    shutil.copytree(parent, d / "current_adapter")
    run = T.RunDir(d)
    want = load_file(str(parent / "adapter_model.safetensors"))

    tr, _ = T.build_trainer(T.read_config(run), run, "cpu")
    assert_same(lora_state(tr.model), want)
    lora = [p for n, p in tr.model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in tr.model.named_parameters() if "lora_" not in n)
    del tr

    done = finish(Run(d))  # the trainer as the pod runs it
    assert done.rc == 0, done.log()
    assert "incremental: starting from the adapter of run r1 (current_adapter/)" in done.log()
    trained = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert trained.keys() == want.keys()
    assert any(not torch.equal(trained[k], want[k]) for k in want)  # trained further, from there
    assert done.manifest()["train_samples"] == len(ROWS)


def test_the_unsloth_paths_weight_copy_lands_every_tensor(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                         parent: Path) -> None:
    """unsloth builds its own LoRA (get_peft_model) and copies the start in: the same copy, on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = T.read_config(T.RunDir(write_run(tmp_path / "u", tiny_model_dir)))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    T.load_start_weights(model, parent)
    assert_same(lora_state(model), load_file(str(parent / "adapter_model.safetensors")))


def test_a_parent_of_another_lora_shape_is_a_config_problem(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                            parent: Path) -> None:
    d = write_run(tmp_path / "r4", tiny_model_dir, lora_rank=4, init_adapter="current_adapter")
    shutil.copytree(parent, d / "current_adapter")
    with pytest.raises(T.ConfigProblem, match="LoRA shape"):
        T.load_model(T.read_config(T.RunDir(d)), "cpu", d / "current_adapter")
