"""The tiny offline model, built once per test session.

Register in ``tests/conftest.py``::

    from tests.support.tiny import tiny_model_dir  # noqa: F401  (session fixture)

Building takes ~4 s (torch import included); the directory is then shared read-only by every
test that asks for ``tiny_model_dir``. Tests must not write into it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def build_once(base: Path, seed: int = 0) -> Path:
    """Build into ``base/tiny-model-<seed>`` unless a previous call already did."""
    from mhd.devtools.tiny_model import build_tiny_model

    final = base / f"tiny-model-{seed}"
    if (final / "config.json").exists():
        return final
    staging = base / f"tiny-model-{seed}.building-{os.getpid()}"
    build_tiny_model(staging, seed=seed)
    # Appear whole or not at all, so a crashed build is never mistaken for a finished one.
    os.replace(staging, final)
    return final


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return build_once(tmp_path_factory.getbasetemp())
