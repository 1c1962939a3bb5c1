"""Padding-free batching in the trainer (mhd/pod/train.py): concatenated samples stay apart.

Everything here is the trainer's own code path (build_trainer → trl's dataset preparation and the
collator make_collator picks) on the tiny offline model with LoRA, in float32 on the CPU, where
sdpa gets the block-diagonal mask that transformers builds from the restarting position_ids.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from mhd.config import DatasetConfig
from mhd.dataset.build import build_dataset
from tests.support.memories import write_examples_to
from tests.support.tiny import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

import torch  # noqa: E402  (after the skip: torch comes with trl)

from mhd.pod import train as T  # noqa: E402

BATCH = 6  # samples concatenated into one row
TOL = 1e-4


def make_run(root: Path, model_dir: Path, **overrides: Any) -> T.RunDir:
    run = root / "run"
    run.mkdir(parents=True)
    build_dataset(write_examples_to(root / "memories"), run, DatasetConfig(persona_name="Maya", holdout_fraction=0.0))
    cfg = {"base_model": str(model_dir), "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
           "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "max_seq_length": 256,
           "num_train_epochs": 1, "save_steps": 1000, "seed": 7, **overrides}
    (run / "config.json").write_text(json.dumps(cfg))
    return T.RunDir(run)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:  # noqa: F811
    run = make_run(tmp_path_factory.mktemp("pf"), tiny_model_dir)
    tr, _ = T.build_trainer(T.read_config(run), run, "cpu")
    # Fresh LoRA has B = 0, i.e. it changes nothing; random B makes the adapter part of what is
    # compared, as it is after a few steps of training.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tr.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    tr.model.eval()
    return tr


def samples(trainer: Any, n: int = BATCH) -> list[dict[str, list[int]]]:
    ds = trainer.train_dataset
    # Varied lengths in one row: the longest and shortest of the first 3n, interleaved.
    rows = sorted((ds[i] for i in range(min(3 * n, len(ds)))), key=lambda r: len(r["input_ids"]))
    picked = [r for pair in zip(rows[::-1], rows, strict=False) for r in pair][:n]
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in picked]


def token_losses(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Cross-entropy of each trained position (label != -100) of a one-row batch, in row order."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, **kw).logits[0, :-1].float()
    target = labels[0, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")


def per_sample_losses(model: Any, batch: dict[str, torch.Tensor], position_ids: torch.Tensor) -> list[float]:
    """Mean loss of each sample of a concatenated row; samples start where batch's position_ids are 0."""
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
    row = token_losses(model, batch["input_ids"], batch["labels"], position_ids=position_ids)
    # Position of each entry of ``row`` in the row: the trained positions, shifted by one.
    idx = torch.arange(batch["labels"].shape[1] - 1)[batch["labels"][0, 1:] != -100]
    out = []
    for s, e in itertools.pairwise(starts):
        in_seg = (idx >= s) & (idx < e - 1)
        assert int(in_seg.sum()) > 0, "every sample has trained tokens"
        out.append(float(row[in_seg].mean()))
    return out


def alone_losses(model: Any, rows: list[dict[str, list[int]]]) -> list[float]:
    out = []
    for r in rows:
        ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
        out.append(float(token_losses(model, ids, labels).mean()))
    return out


def test_trainer_collates_padding_free_with_the_completion_mask_kept(trainer: Any) -> None:
    rows = samples(trainer)
    batch = trainer.data_collator(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1, "the row must mix sample lengths"
    # One row, exactly the samples' tokens: nothing is padding, and no attention_mask (its presence
    # would make transformers treat the row as one sequence).
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    # The prompt tokens stay out of the loss, as in each sample alone (trl's completion mask); only
    # each sample's first token is added to the masked ones, it has nothing before it to predict it.
    expected: list[int] = []
    for r in rows:
        assert r["labels"][0] == -100 and r["labels"].count(-100) > 1, "prompt tokens are masked per sample"
        expected += [-100, *r["labels"][1:]]
    assert batch["labels"][0].tolist() == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_per_sample_losses_equal_each_sample_alone(trainer: Any, attention: str) -> None:
    rows = samples(trainer)
    batch = trainer.data_collator(rows)
    model = trainer.model
    model.base_model.model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    packed = per_sample_losses(model, batch, batch["position_ids"])
    alone = alone_losses(model, rows)
    assert max(abs(a - b) for a, b in zip(packed, alone, strict=True)) < TOL, (packed, alone)

    # The same row read as one long sequence (positions 0..L-1: no sample boundaries) lets every
    # sample after the first attend to the ones before it: the comparison above would catch that.
    flat = torch.arange(batch["input_ids"].shape[1])[None]
    leaky = per_sample_losses(model, batch, flat)
    assert abs(leaky[0] - alone[0]) < TOL
    assert all(abs(a - b) > TOL for a, b in zip(leaky[1:], alone[1:], strict=True)), (leaky, alone)
    model.base_model.model.set_attn_implementation("sdpa")  # the trainer's default, for the other tests


def test_padding_free_batch_loss_equals_the_padded_batch_loss(trainer: Any) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = samples(trainer)
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(rows)
    assert int((padded["attention_mask"] == 0).sum()) > 0, "the padded batch must carry padding"
    free = trainer.data_collator(rows)
    with torch.no_grad():
        loss_padded = float(trainer.model(**padded).loss)
        loss_free = float(trainer.model(**free).loss)
    assert abs(loss_padded - loss_free) < TOL, (loss_padded, loss_free)


def test_padding_free_false_in_config_gives_padded_batches(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    run = make_run(tmp_path, tiny_model_dir, padding_free=False)
    tr, _ = T.build_trainer(T.read_config(run), run, "cpu")
    batch = tr.data_collator(samples(tr))
    assert batch["input_ids"].shape[0] == BATCH and "attention_mask" in batch


def test_training_with_padding_free_batches_finishes(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    run = make_run(tmp_path, tiny_model_dir)
    assert T.main(["--run-dir", str(run.root)]) == T.EXIT_OK
    manifest = json.loads(run.manifest.read_text())
    assert manifest["steps"] >= 2 and manifest["final_loss"] is not None
