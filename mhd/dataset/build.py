"""Build ``dataset.jsonl`` (+ ``eval.jsonl``) and ``dataset_manifest.json`` from ``memory_dir``.

One streaming pass: each file is parsed, validated, turned into a sample and deduplicated on
the spot; what stays in memory is a small digest per memory (for dedupe and the ledger's key
list) and a bounded heap of at most ``max_samples`` candidates.

Selection is time-weighted sampling without replacement (weight ``2^(-age/half_life)``) in
the Efraimidis-Spirakis form, with each memory's random draw taken from its key. Because the
weights differ only by a common factor, the choice does not depend on *when* the build runs:
the same files always give the same bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mhd.config import DatasetConfig
from mhd.dataset.incremental import FULL, INCREMENTAL, Plan, select
from mhd.dataset.memories import Memory, NotReady, Reject, iter_memory_files, read_memory
from mhd.dataset.samples import Sample, make_sample, system_prompt
from mhd.errors import DatasetError

DATASET = "dataset.jsonl"
EVAL = "eval.jsonl"
MANIFEST = "dataset_manifest.json"
EXAMPLES_CAP = 20
_LN2 = math.log(2)


@dataclass(order=True)
class _Candidate:
    neg_score: float  # heapq is a min-heap: the worst (largest score) candidate sits on top
    key: str
    sample: Sample = field(compare=False)
    timestamp: datetime | None = field(compare=False)


@dataclass
class _Tally:
    files: int = 0
    not_ready: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    reject_examples: list[dict[str, str]] = field(default_factory=list)
    not_ready_examples: list[dict[str, str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    memory_keys: set[str] = field(default_factory=set)
    seen_norms: set[bytes] = field(default_factory=set)
    memories: int = 0

    def reject(self, r: Reject) -> None:
        self.rejects[r.reason] += 1
        # A file the owner withdrew from training is counted, never named: its name is a slug of
        # its text, and this manifest is kept.
        if r.reason != "no_consent" and len(self.reject_examples) < EXAMPLES_CAP:
            self.reject_examples.append({"path": str(r.path), "reason": r.reason, "detail": r.detail})

    def wait(self, r: NotReady) -> None:
        self.not_ready += 1
        if len(self.not_ready_examples) < EXAMPLES_CAP:
            self.not_ready_examples.append({"path": str(r.path), "detail": r.detail})


def selection_score(key: str, timestamp: datetime | None, half_life_days: float) -> float:
    """Smaller is picked first. ``log(-log u) - t·ln2/h`` orders like ES's ``u^(1/w)``."""
    u = (int(key[:16], 16) + 0.5) / 2.0**64
    if timestamp is None:
        return math.inf  # undated memories go last
    days = timestamp.timestamp() / 86400.0
    return math.log(-math.log(u)) - days * _LN2 / half_life_days


def _in_eval(key: str) -> str:
    return hashlib.sha256(f"holdout:{key}".encode()).hexdigest()


def _check_root(memory_dir: Path) -> None:
    try:
        with os.scandir(memory_dir):
            pass
    except FileNotFoundError:
        raise DatasetError(f"memory_dir {memory_dir} does not exist: point memory_dir at the folder "
                           "holding the episodic memories (e.g. .../memory/episodic)") from None
    except NotADirectoryError:
        raise DatasetError(f"memory_dir {memory_dir} is a file, not a folder: point it at the "
                           "episodic memory folder") from None
    except OSError as exc:
        raise DatasetError(f"memory_dir {memory_dir} cannot be read ({exc.strerror or exc}): check "
                           "its permissions for the user mhd runs as") from None


def _scan(memory_dir: Path, cfg: DatasetConfig, now_ts: float,
          exclude: frozenset[str]) -> tuple[_Tally, list[_Candidate]]:
    tally = _Tally()
    heap: list[_Candidate] = []
    types = set(cfg.types)
    for path in iter_memory_files(memory_dir):
        tally.files += 1
        result = read_memory(path, memory_dir, max_bytes=cfg.max_file_bytes,
                             not_ready_grace_s=cfg.not_ready_grace_s, now=now_ts)
        if isinstance(result, NotReady):
            tally.wait(result)
            continue
        if isinstance(result, Reject):
            tally.reject(result)
            continue
        if result.key in exclude:
            tally.skipped["forgotten"] += 1  # the owner took it back (`mhd forget`, a deletion)
            continue
        _consider(result, cfg, types, tally, heap)
    return tally, heap


def _consider(memory: Memory, cfg: DatasetConfig, types: set[str], tally: _Tally,
              heap: list[_Candidate]) -> None:
    if memory.key in tally.memory_keys:
        tally.skipped["duplicate"] += 1  # the same memory again (a copy, or a linked folder)
        return
    tally.memory_keys.add(memory.key)
    tally.memories += 1
    if memory.type not in types:
        tally.skipped["type_excluded"] += 1
        return
    sample = make_sample(memory, cfg)
    if isinstance(sample, str):
        tally.skipped[sample] += 1
        return
    if sample.norm in tally.seen_norms:
        tally.skipped["duplicate"] += 1
        return
    tally.seen_norms.add(sample.norm)
    score = selection_score(memory.key, memory.timestamp, cfg.half_life_days)
    heapq.heappush(heap, _Candidate(-score, memory.key, sample, memory.timestamp))
    if len(heap) > cfg.max_samples:
        heapq.heappop(heap)
        tally.skipped["over_cap"] += 1


def _order(chosen: list[_Candidate]) -> list[_Candidate]:
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(chosen, key=lambda c: (c.timestamp or oldest, c.key))


def _split(chosen: list[_Candidate], fraction: float, minimum: int = 0) -> tuple[list[_Candidate], list[_Candidate]]:
    """(train, held out). A memory is held out when its key's hash falls below ``fraction``: the
    same memory stays held out run after run, so scores compare across runs. Below ``minimum``
    the lowest hashes top it up; with fewer than twice ``minimum`` memories nothing is held out
    (the gate then says so and decides on its probe set alone)."""
    n = len(chosen)
    if fraction <= 0 or n < 2:
        return chosen, []
    ranked = sorted(chosen, key=lambda c: _in_eval(c.key))
    held_keys = {c.key for c in ranked if int(_in_eval(c.key)[:16], 16) / 2.0**64 < fraction}
    if minimum:
        if n < 2 * minimum:
            return chosen, []
        for c in ranked:
            if len(held_keys) >= minimum:
                break
            held_keys.add(c.key)
    if not held_keys and not minimum:
        held_keys = {ranked[0].key}  # the old contract of holdout_fraction: at least one
    if len(held_keys) >= n:
        held_keys = {c.key for c in ranked[:n - 1]}
    return [c for c in chosen if c.key not in held_keys], [c for c in chosen if c.key in held_keys]


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def _write_jsonl(path: Path, items: list[_Candidate], system: str) -> str:
    """Atomically write one JSON record per line; return the file's sha256."""
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        for c in items:
            line = json.dumps(c.sample.record(system, _iso(c.timestamp)), ensure_ascii=False) + "\n"
            data = line.encode("utf-8")
            digest.update(data)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_dataset(memory_dir: Path, out_dir: Path, cfg: DatasetConfig, *, now: datetime | None = None,
                  exclude: frozenset[str] = frozenset(), plan: Plan | None = None, salt: str = "") -> dict:
    """Write the dataset files into ``out_dir`` and return the manifest.

    ``exclude``: keys of forgotten memories; they are skipped (counted as ``forgotten``) even
    where their file is still there.

    ``plan``: an incremental plan keeps, of the split's train part, only the memories its parent
    chain has not seen plus a replay sample (``salt`` varies that sample by run); the held-out
    part is the same as a full build's. The manifest's ``training`` says which it became and why
    (an incremental plan can still fall back to full here, see ``incremental.select``).

    Raises ``DatasetError`` only when ``memory_dir`` itself cannot be read; bad files are
    counted in the manifest, never raised.
    """
    memory_dir, out_dir = Path(memory_dir), Path(out_dir)
    _check_root(memory_dir)
    now = now or datetime.now(UTC)
    tally, heap = _scan(memory_dir, cfg, now.timestamp(), exclude)
    chosen = _order(heap)
    train, held = _split(chosen, cfg.holdout_fraction, cfg.holdout_min)
    training = _narrow(train, held, plan, salt)
    if training["mode"] == INCREMENTAL:
        keep = set(training.pop("keys"))
        train = [c for c in train if c.key in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    system = system_prompt(cfg)
    sha = _write_jsonl(out_dir / DATASET, train, system)
    eval_sha = _write_jsonl(out_dir / EVAL, held, system) if held else None
    if not held:
        (out_dir / EVAL).unlink(missing_ok=True)  # a stale split from an earlier build would mislead
    manifest = _manifest(tally, chosen, train, held, cfg, sha, eval_sha, memory_dir, now)
    manifest["training"] = training
    _write_json(out_dir / MANIFEST, manifest)  # last: its presence means the build is complete
    return manifest


def _narrow(train: list[_Candidate], held: list[_Candidate], plan: Plan | None, salt: str) -> dict[str, Any]:
    """The manifest's ``training``: mode, reason, parent run, new / replay counts (+ the keys kept)."""
    if plan is None:
        return {"mode": FULL, "reason": "no plan (a dataset built alone)", "parent_run_id": None}
    if not plan.incremental:
        return {"mode": FULL, "reason": plan.reason, "parent_run_id": None}
    sel = select([c.key for c in train], [c.key for c in held], plan, salt)
    if sel.fallback is not None:
        return {"mode": FULL, "reason": sel.fallback, "parent_run_id": None}
    return {"mode": INCREMENTAL, "reason": plan.reason, "parent_run_id": plan.parent_run_id,
            "new": sel.new, "replay": sel.replay, "keys": sorted(sel.keys)}


def _manifest(tally: _Tally, chosen: list[_Candidate], train: list[_Candidate], held: list[_Candidate],
              cfg: DatasetConfig, sha: str, eval_sha: str | None, memory_dir: Path,
              now: datetime) -> dict[str, Any]:
    stamps = [c.timestamp for c in chosen if c.timestamp is not None]
    return {
        "format": 1,
        "built_at": _iso(now.astimezone(UTC)),
        "memory_dir": str(memory_dir),
        "samples": len(train),
        "eval_samples": len(held),
        "files_seen": tally.files,
        "memories_read": tally.memories,
        "rejects": dict(sorted(tally.rejects.items())),
        "reject_examples": tally.reject_examples,
        "not_ready": tally.not_ready,
        "not_ready_examples": tally.not_ready_examples,
        "skipped": dict(sorted(tally.skipped.items())),
        "sha256": sha,
        "eval_sha256": eval_sha,
        "time_range": [_iso(min(stamps)), _iso(max(stamps))] if stamps else None,
        "by_type": dict(sorted(Counter(c.sample.type for c in chosen).items())),
        "persona_name": cfg.persona_name,
        "voice": cfg.voice,
        "memory_keys": sorted(tally.memory_keys),
        "sample_keys": sorted(c.key for c in chosen),
        "train_keys": sorted(c.key for c in train),
        "heldout_keys": sorted(c.key for c in held),
        # The lineage rows (`mhd lineage`): key, role, type, date; no text.
        "lineage": [{"key": c.key, "role": role, "type": c.sample.type, "date": _iso(c.timestamp)}
                    for role, part in (("train", train), ("heldout", held)) for c in part],
    }
