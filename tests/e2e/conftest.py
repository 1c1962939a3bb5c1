"""Fixtures for the end-to-end suite: one :class:`~tests.support.e2e.E2E` world per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.e2e import E2E
from tests.support.sshd import SSHD


@pytest.fixture
def e2e(tmp_path: Path, tiny_model_dir: Path) -> Iterator[E2E]:
    if not SSHD.exists():
        pytest.skip("OpenSSH sshd is not installed (apt-get install -y openssh-server)")
    pytest.importorskip("trl")
    pytest.importorskip("gguf")
    world = E2E(tmp_path, tiny_model_dir)
    try:
        yield world
    finally:
        world.cleanup()
