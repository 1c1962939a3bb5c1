"""`mhd doctor`: one line per check, a fix for each failure, non-zero exit if any fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mhd.devtools.toml_write import write_config
from mhd.store import SCHEMA_VERSION
from tests.support.daemon import write_memories
from tests.support.ollama_standin import OllamaStandIn


def doctor(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith(("MHD_", "RUNPOD_"))}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(cfg), "doctor"],
                          capture_output=True, text=True, env=full, timeout=120)


def test_healthy_local_setup_passes_and_counts_memories(tmp_path: Path):
    write_memories(tmp_path / "mem", 4)
    cfg = write_config(tmp_path / "c.toml", {"memory_dir": str(tmp_path / "mem"), "state_dir": str(tmp_path / "st")},
                       {"merge": {"mode": "none"}})
    out = doctor(cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 memory files" in out.stdout
    assert "✓ state_dir" in out.stdout and f"schema version {SCHEMA_VERSION}" in out.stdout


def test_runpod_without_key_and_with_loose_ssh_key_fails_with_fixes(tmp_path: Path):
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key")
    key.chmod(0o644)
    cfg = write_config(tmp_path / "c.toml", {"memory_dir": str(tmp_path / "nowhere"), "state_dir": str(tmp_path / "st"),
                                             "provider": "runpod"},
                       {"runpod": {"ssh_key_file": str(key), "api_url": "http://127.0.0.1:9/v2"},
                        "merge": {"mode": "none"}})
    out = doctor(cfg)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert any(line.startswith("✗ memory_dir") and "fix:" in line for line in lines)
    assert any(line.startswith("✗ RunPod API key") and "RUNPOD_API_KEY" in line for line in lines)
    assert any(line.startswith("✗ SSH key") and f"chmod 600 {key}" in line for line in lines)


def test_api_key_is_never_printed(tmp_path: Path):
    keyfile = tmp_path / "rp.key"
    keyfile.write_text("rpa_SECRET_VALUE_123\n")
    cfg = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "st"), "provider": "runpod"},
                       {"runpod": {"api_key_file": str(keyfile), "api_url": "http://127.0.0.1:9/v2"},
                        "merge": {"mode": "none"}})
    out = doctor(cfg)
    assert "rpa_SECRET_VALUE_123" not in out.stdout + out.stderr
    assert "✓ RunPod API key" in out.stdout


def test_ollama_base_model_missing_is_explained(tmp_path: Path):
    with OllamaStandIn(version="0.33.0") as ol:
        cfg = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "st")},
                           {"merge": {"mode": "ollama", "ollama_url": ol.url, "base": "qwen3:8b"}})
        out = doctor(cfg)
        assert out.returncode == 1
        assert "ollama pull qwen3:8b" in out.stdout
        ol.add_model("qwen3:8b")
        out = doctor(cfg)
        assert "✓ Ollama" in out.stdout, out.stdout
