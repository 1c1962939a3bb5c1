"""The dataset as the trainer sees it: chat rows to prompt/completion rows, and how a batch is laid out."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.<module> (tests; mypy reads this branch)
    from .train_config import ConfigProblem, TrainConfig, log
else:  # on the pod: train.py runs as a script and put its folder on sys.path
    from train_config import ConfigProblem, TrainConfig, log


CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load_rows(path: Path, required: bool) -> list[dict[str, Any]]:
    """Chat rows → prompt/completion rows, so that only the assistant turn is trained on."""
    if not path.exists():
        if required:
            raise ConfigProblem(f"{path.name} is missing in {path.parent}: upload the dataset before training")
        return []
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigProblem(f"{path.name}: cannot be read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_row(path.name, n, line))
    if required and not rows:
        raise ConfigProblem(f"{path.name} has no samples: build the dataset from more memories")
    return rows


def _row(name: str, n: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
        messages = record["messages"]
        ok = (isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and messages[-1]["role"] == "assistant")
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigProblem(f"{name} line {n}: expected {{\"messages\": [..., {{\"role\": \"assistant\", ...}}]}}")
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
        "completion": [{"role": "assistant", "content": messages[-1]["content"]}],
    }


def drop_overlong(rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[dict[str, Any]]:
    """Drop rows whose prompt alone fills max_length: truncation would leave nothing to learn."""
    kept = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if len(ids) < max_len - 8:
            kept.append(row)
    if len(kept) < len(rows):
        log(f"skipping {len(rows) - len(kept)} samples whose prompt exceeds max_seq_length={max_len}")
    return kept


def packed_masks_supported() -> bool:
    """Whether this transformers builds block-diagonal masks from position_ids for sdpa/eager.

    Its masking_utils turns "position_ids restart at 0" into one causal block per sample when no
    attention_mask is passed (flash-attention reads the same boundaries from cu_seq_lens). Without
    that, a concatenated row would be one long causal sequence: samples would attend to each other.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def make_collator(cfg: TrainConfig, tokenizer: Any, backend: str) -> Any | None:
    """trl's collator in padding-free mode, or None for trl's default (padded) one.

    Padding-free without packing: each micro-batch's samples are concatenated into one row, with
    position_ids restarting at 0 per sample and no attention_mask, so no token is padding and no
    sample sees another. The labels (prompt tokens already -100 from trl's completion mask) travel
    with the tokens, and the batches hold the same samples in the same order as padded ones, so the
    loss is the same. It is passed as our own collator, with SFTConfig.padding_free left off,
    because trl refuses padding_free with max_length unless packing: that way trl still truncates
    every sample to max_length while preparing the dataset.
    """
    if not cfg.padding_free:
        return None
    if backend == "unsloth":
        # unsloth turns padding-free on itself, with its own attention kernels; a collator from us
        # would replace the one it instruments.
        return None
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError:
        return None
    if "padding_free" not in {f.name for f in fields(DataCollatorForLanguageModeling)} or not packed_masks_supported():
        log("note: this trl/transformers cannot keep concatenated samples apart; padding batches instead")
        return None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)
