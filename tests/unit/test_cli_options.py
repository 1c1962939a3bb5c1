"""Global options typed after the subcommand, as people type them (`mhd status --config X`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def mhd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mhd.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("cmd", ["daemon", "status", "runs", "doctor"])
def test_config_after_the_subcommand_is_the_config_used(tmp_path: Path, cmd: str) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("threshold = 'many'\n")
    before = mhd("--config", str(bad), cmd)
    after = mhd(cmd, "--config", str(bad))
    assert "No such option" not in after.stderr
    # The same file is read either way: the same refusal, naming the key.
    assert after.returncode == before.returncode != 0, after.stderr + after.stdout
    assert "threshold" in (after.stderr + after.stdout)


def test_the_later_config_wins(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("threshold = 'many'\n")
    good = tmp_path / "good.toml"
    good.write_text(f'state_dir = "{tmp_path / "state"}"\nmemory_dir = "{tmp_path / "m"}"\n')
    out = mhd("--config", str(bad), "runs", "--json", "--config", str(good))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
