"""Bad config values: exit 2 with one clear line naming key, value and expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mhd.config import load_config
from mhd.errors import ConfigError


@pytest.mark.parametrize(("toml", "key", "hint"), [
    ("threshold = 'many'", "threshold", "integer"),
    ("threshold = 0", "threshold", "greater than or equal to 1"),
    ("provider = 'aws'", "provider", "'local', 'ssh' or 'runpod'"),
    ("schedule = 'every day'", "schedule", "cron"),
    ("[web]\nlisten = 'nowhere'", "web.listen", "HOST:PORT"),
    ("[runpod]\nmax_unattended = 'forever'", "runpod.max_unattended", "duration"),
    ("provider = 'ssh'", "ssh.host", "needs [ssh] host"),
    ("colour = 'blue'", "colour", "unknown"),
])
def test_bad_value_names_key_value_and_expectation(tmp_path: Path, toml: str, key: str, hint: str):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, {})
    assert err.value.key == key
    assert hint in str(err.value)


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("threshold = -3\n")
    out = subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(cfg), "status"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "threshold" in lines[0] and "-3" in lines[0]
    assert "Traceback" not in out.stderr


def test_env_overrides_file_and_sections(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("threshold = 10\n[ssh]\nport = 22\n")
    c = load_config(cfg, {"MHD_THRESHOLD": "3", "MHD_SSH__PORT": "2222", "MHD_SCHEDULE": "0 3 * * *"})
    assert (c.threshold, c.ssh.port, c.schedule) == (3, 2222, "0 3 * * *")


def test_bad_env_value_is_reported_like_a_file_value(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.toml", {"MHD_BUDGET__MAX_USD_PER_RUN": "-1"})
    assert err.value.key == "budget.max_usd_per_run"


def test_defaults_need_no_file(tmp_path: Path):
    c = load_config(tmp_path / "none.toml", {})
    assert c.provider == "local" and c.threshold == 50
    assert c.socket_path == c.state_dir / "mhd.sock"
