"""The run folder: its paths, the listings that say what is complete (trained.json, manifest.json)
and the checkpoints a relaunch resumes from."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.<module> (tests; mypy reads this branch)
    from .jsonfiles import write_json_atomic
    from .train_config import log
else:  # on the pod: train.py runs as a script and put its folder on sys.path
    from jsonfiles import write_json_atomic
    from train_config import log


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def trained(self) -> Path:
        return self.root / "trained.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(run: RunDir) -> bool:
    """manifest.json present and every file it lists has the recorded size and sha256."""
    return _verified(run, run.manifest) is not None


def read_trained(run: RunDir) -> dict[str, Any] | None:
    """The training summary from trained.json when adapter/ still matches it, else None."""
    data = _verified(run, run.trained)
    info = data.get("info") if data else None
    return dict(info) if isinstance(info, dict) else None


def _verified(run: RunDir, listing: Path) -> dict[str, Any] | None:
    """The JSON object at ``listing`` if every file it lists has the recorded size and sha256."""
    try:
        data = json.loads(listing.read_text())
        files = data["files"]
        if not files:
            return None
        for entry in files:
            path = run.root / entry["path"]
            if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def newest_checkpoint(run: RunDir) -> Path | None:
    """The newest *complete* checkpoint; half-written ones (a kill mid-save) are removed."""
    if not run.checkpoints.is_dir():
        return None
    found = []
    for p in run.checkpoints.iterdir():
        step = p.name.removeprefix("checkpoint-")
        if p.is_dir() and step.isdigit():
            found.append((int(step), p))
    for _, path in sorted(found, reverse=True):
        if _checkpoint_complete(path):
            return path
        log(f"removing incomplete checkpoint {path.name}")
        shutil.rmtree(path, ignore_errors=True)
    return None


def _checkpoint_complete(path: Path) -> bool:
    # The Trainer writes trainer_state.json after the weights, optimizer and RNG state.
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("adapter_model.*")) or any(path.glob("model*.safetensors"))


def file_entries(run: RunDir, paths: Sequence[Path], known: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Manifest entries; ``known`` maps a relative path to a sha256 already computed."""
    out = []
    for path in paths:
        rel = path.relative_to(run.root).as_posix()
        digest = (known or {}).get(rel) or sha256_file(path)
        out.append({"path": rel, "size": path.stat().st_size, "sha256": digest})
    return out


def adapter_files(run: RunDir) -> list[Path]:
    return sorted(p for p in run.adapter.rglob("*") if p.is_file())


def write_manifest(run: RunDir, info: dict[str, Any], extra: Sequence[Path] = (),
                   known: dict[str, str] | None = None) -> dict[str, Any]:
    """The adapter's files (and ``extra``, e.g. model.gguf) with sizes and sha256, then ``info``."""
    manifest = {"files": file_entries(run, [*adapter_files(run), *extra], known), **info}
    write_json_atomic(run.manifest, manifest)
    return manifest


def write_trained(run: RunDir, info: dict[str, Any]) -> None:
    """The adapter is complete: a relaunch (e.g. killed during the export) skips training."""
    write_json_atomic(run.trained, {"files": file_entries(run, adapter_files(run)), "info": info})
