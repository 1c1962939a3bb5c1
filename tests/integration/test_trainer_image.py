"""The pod image's scripts: what can be checked without Docker or a GPU."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "image"
START = REPO / "mhd" / "pod" / "start.sh"  # image/start.sh links to it; the daemon ships it

TRICKY = "two words 'single' \"double\" $HOME `id` \\ back\nslash; line two"


def test_start_sh_parses() -> None:
    subprocess.run(["bash", "-n", str(START)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_start_sh_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(START)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_container_env_reaches_ssh_sessions_without_leaking_values(tmp_path: Path) -> None:
    env_file = tmp_path / "etc" / "container.env"
    env = {"PATH": os.environ["PATH"], "MHD_ENV_FILE": str(env_file), "TRICKY": TRICKY,
           "RUNPOD_API_KEY": "rpa_SECRET_VALUE_123", "PUBLIC_KEY": "ssh-ed25519 AAAAKEY me@host"}
    result = subprocess.run(["bash", "-c", f'source "{START}" && export_environment'], env=env,
                            capture_output=True, text=True, check=True)

    assert "SECRET" not in result.stdout + result.stderr and "two words" not in result.stdout + result.stderr
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    # What a command session gets: sshd sets BASH_ENV, bash sources it before the command.
    seen = subprocess.run(["bash", "-c", 'printf "%s|%s|%s" "$TRICKY" "$RUNPOD_API_KEY" "${PUBLIC_KEY-unset}"'],
                          env={"PATH": os.environ["PATH"], "BASH_ENV": str(env_file)},
                          capture_output=True, text=True, check=True).stdout
    assert seen == f"{TRICKY}|rpa_SECRET_VALUE_123|unset"


def test_export_is_atomic_and_repeatable(tmp_path: Path) -> None:
    env_file = tmp_path / "container.env"
    env = {"PATH": os.environ["PATH"], "MHD_ENV_FILE": str(env_file), "A": "1"}
    for _ in range(2):
        subprocess.run(["bash", "-c", f'source "{START}" && export_environment'], env=env, check=True,
                       capture_output=True)
    assert env_file.read_text().count("export A=1") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["container.env"]  # no temp files left behind


def test_dockerfile_installs_the_pod_lock_and_copies_the_pod_files() -> None:
    text = (IMAGE / "Dockerfile").read_text()
    # No loose `pip install name==X` beside the lock: one list of versions, checked by CI
    # (tests/integration/test_pod_lock.py), for both the image and a stock-image pod.
    assert not re.search(r"pip install(?! --require-hashes)", text)
    assert "COPY mhd/pod/requirements.lock mhd/pod/bootstrap.sh /opt/mhd/" in text
    assert "MHD_BOOTSTRAP=always" in text and "MHD_ENV_DIR=/opt/mhd/venv" in text
    assert "py3.11" in text  # the lock's python (mhd-lock: python=3.11)
    assert "COPY mhd/pod/ /opt/mhd/" in text  # start.sh, bootstrap.sh and the lock are in mhd/pod/
    assert "PasswordAuthentication no" in text and "openssh-server" in text
    assert 'ENTRYPOINT ["/usr/bin/tini"' in text


def test_docker_context_keeps_what_the_dockerfile_copies() -> None:
    ignore = [line for line in (IMAGE / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything else (.venv!) stays out of the build context
    assert "!mhd/pod/" in ignore
    assert (REPO / "mhd" / "pod" / "train.py").exists()
