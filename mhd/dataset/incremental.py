"""Incremental training (issue 15): which run a run starts from, and which memories it trains on.

``[training] mode = "incremental"`` makes a run start from the adapter served today and train on
the memories no promoted model has seen, plus a replay sample of older ones against forgetting.
:func:`plan_run` decides, before the dataset is built, whether a run may do that; a full run
(from the base, on every memory) comes instead when

- ``mode = "full"``;
- the run is a forgetting run (trigger ``forget``), or the served model holds a forgotten memory:
  a run started from that adapter would inherit the memory from its parent;
- there is no promoted adapter, or it was trained on another base or another LoRA shape (rank,
  alpha, target modules): its weights would not fit, or would mean something else;
- the served adapter already ends a chain of ``full_every`` runs (every Nth run is full, so the
  drift of many small runs does not pile up).

"No promoted model has seen" is read from **lineage**, not from the memories ledger: the ledger's
``trained`` mark is set for every memory a merged run *read* (held-out and over-cap ones too, so
that they stop counting as pending), while the lineage's ``train`` rows of the served run and its
ancestors (``Store.model_keys``) are exactly what its weights were trained on. A memory held out
or left over the cap last time is therefore new this time.

:func:`select` runs inside the dataset build, after the held-out split (stable by key), so a
held-out memory is never in the new part nor in the replay part. If the split now holds out a
memory the served model was trained on (the held-out set grew, e.g. from none below
``2 * eval.min_count`` memories), the score would flatter the new model: the run goes full.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhd.config import Config, TrainingConfig
    from mhd.store import Run, Store

FULL, INCREMENTAL = "full", "incremental"
# The LoRA shape: an adapter trained with other values cannot be the start of this run's.
SHAPE_KEYS = ("lora_rank", "lora_alpha", "target_modules")


@dataclass(frozen=True)
class Plan:
    """What Provisioning builds: ``incremental`` with the adapter it starts from, or ``full``."""

    mode: str
    reason: str
    parent_run_id: str | None = None
    parent_adapter: Path | None = None
    seen: frozenset[str] = frozenset()  # train keys of the parent and its ancestors
    replay_fraction: float = 0.0

    @property
    def incremental(self) -> bool:
        return self.mode == INCREMENTAL


def _full(reason: str) -> Plan:
    return Plan(FULL, reason)


def plan_run(cfg: Config, store: Store, run: Run) -> Plan:
    """Full or incremental for this run, with the reason (journaled, and in ``mhd runs``)."""
    from mhd.quality.gate import promoted_run

    t = cfg.training
    if t.mode == FULL:
        return _full('training.mode = "full"')
    if run.trigger == "forget":
        return _full("a forgetting run: starting from the served adapter would keep the forgotten memory")
    parent = promoted_run(store)
    if parent is None:
        return _full("no promoted model to start from")
    if parent == run.id:
        return _full("the run is its own promoted model")  # a re-entered, already merged run
    adapter = cfg.runs_dir / parent / "output" / "adapter"
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        return _full(f"the promoted run {parent} has no adapter on disk to start from")
    try:
        was = json.loads((cfg.runs_dir / parent / "input" / "config.json").read_text())
    except (OSError, ValueError):
        return _full(f"the promoted run {parent}'s config.json is unreadable: its base and LoRA shape are unknown")
    if was.get("base_model") != t.base_model:
        return _full(f"the base model changed ({was.get('base_model')} → {t.base_model})")
    now: dict[str, Any] = {"lora_rank": t.lora_rank, "lora_alpha": t.lora_alpha,
                           "target_modules": sorted(t.target_modules)}
    was_shape = {k: sorted(was.get(k) or []) if k == "target_modules" else was.get(k) for k in SHAPE_KEYS}
    changed = [f"{k} {was_shape[k]} → {now[k]}" for k in SHAPE_KEYS if was_shape[k] != now[k]]
    if changed:
        return _full("the LoRA shape changed (" + "; ".join(changed) + ")")
    if store.forgotten_in(parent):
        return _full(f"the promoted run {parent}'s model holds a forgotten memory: this run must not inherit it")
    chain = store.run_chain(parent)
    if len(chain) >= t.full_every:
        return _full(f"every {_nth(t.full_every)} run is full (the promoted model is the {_nth(len(chain))} of its "
                     "chain)")
    seen = frozenset(store.model_keys(parent))
    return Plan(INCREMENTAL, f"from run {parent}'s adapter ({len(chain)} run(s) since the last full run)",
                parent_run_id=parent, parent_adapter=adapter, seen=seen, replay_fraction=t.replay_fraction)


def _nth(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def incremental_learning_rate(rate: float, training: TrainingConfig) -> float:
    """The learning rate of a run that starts from trained weights (``incremental_lr_scale``)."""
    return rate * training.incremental_lr_scale


def replay_count(new: int, old: int, fraction: float) -> int:
    """Old memories replayed beside ``new`` new ones: ``ceil(fraction * new)``, at most ``old``."""
    return min(old, math.ceil(fraction * new - 1e-9)) if new else 0


def _replay_rank(salt: str, key: str) -> str:
    return hashlib.sha256(f"replay:{salt}:{key}".encode()).hexdigest()


@dataclass(frozen=True)
class Selection:
    """The train part of an incremental run, or why it cannot be one (``fallback``)."""

    keys: frozenset[str] = frozenset()
    new: int = 0
    replay: int = 0
    fallback: str | None = None


def select(train: Sequence[str], held: Sequence[str], plan: Plan, salt: str) -> Selection:
    """New + replay keys among ``train`` (the split's train part; held-out keys never enter).

    The replay sample is drawn by key hash salted with the parent run: the same build gives the
    same bytes, and each run of a chain replays other old memories.
    """
    inherited = plan.seen & set(held)
    if inherited:
        return Selection(fallback=f"{len(inherited)} held-out memory(ies) were trained on by the served model: "
                                  "its held-out score would flatter it")
    new = [k for k in train if k not in plan.seen]
    if not new:
        return Selection(fallback="no memory the served model has not seen: nothing new to train on")
    old = sorted((k for k in train if k in plan.seen), key=lambda k: _replay_rank(salt, k))
    replay = old[:replay_count(len(new), len(old), plan.replay_fraction)]
    return Selection(frozenset(new) | frozenset(replay), len(new), len(replay))
