"""What the daemon process imports: never torch; SSH and HTTP libraries only when a run needs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "numpy", "gguf", "safetensors")


def test_daemon_side_merge_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import mhd.merge\n"
        "from mhd.merge import merge_run, rollback, ollama_route\n"
        "import mhd.merge.pipeline, mhd.merge.registry, mhd.merge.ollama\n"
        "import mhd.states.merging\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"heavy modules imported by the daemon side: {out.stdout.strip()}"


def test_the_daemon_loads_ssh_and_http_libraries_only_when_a_provider_needs_them() -> None:
    # asyncssh (+ cryptography) is ~27 MiB of an idle daemon's ~60: only a run over SSH needs it.
    code = (
        "import sys\n"
        "import mhd.daemon.service, mhd.states.runner\n"
        "print(','.join(m for m in ('asyncssh', 'httpx', 'torch') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at daemon start: {out.stdout.strip()}"
