"""Shared by the trainer benchmarks: the pod's trainer loaded as the pod runs it, and the tiny model.

mhd/pod/train.py is a standalone script (it imports nothing from mhd, only its sibling modules in
mhd/pod/), so it is loaded from its file path, as the pod runs it: the benchmarks measure the
trainer's own code (backend choice, model loading, collator), not a copy of it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / "mhd" / "pod" / "train.py"
OUT_DIR = REPO / "benchmarks" / "out"


def load_train() -> ModuleType:
    name = "mhd_pod_train_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TRAIN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def tiny_model(out_dir: Path = OUT_DIR) -> Path:
    """The tests' tiny offline model (mhd.devtools.tiny_model), built once under benchmarks/out/."""
    from mhd.devtools.tiny_model import build_tiny_model

    final = out_dir / "tiny-model-0"
    if not (final / "config.json").exists():
        build_tiny_model(final, seed=0)
    return final


def write_run(run_dir: Path, config: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """A run folder as Uploading leaves it: config.json and dataset.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir
