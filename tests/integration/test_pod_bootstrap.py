"""bootstrap.sh on a stand-in pod: a real sshd on loopback, a python without the training stack,
and a tiny lock (one pure-python wheel, served from a local folder: no network).

What it pins down: the first pod installs the lock into the volume's environment once; a second
pod on the same volume reuses it (the marker holds the lock's sha256); a broken lock leaves a
clear one-line error as the last line of train.log, which is what the run's reason quotes.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mhd.remote.job import POD_FILES_DIR
from tests.support.sshd import SshServer

pytestmark = pytest.mark.slow

# The interpreter this venv was made from: it has none of torch/transformers/peft/trl/datasets,
# like a stock image's python before the bootstrap.
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)
TRAINER = """\
import sys, mhdprobe
open("used_python.txt", "w").write(sys.prefix + "\\n" + mhdprobe.VERSION + "\\n")
"""


def make_wheel(folder: Path, name: str = "mhdprobe", version: str = "1.0") -> Path:
    """A minimal valid wheel, built by hand (no build backend, no network)."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f'VERSION = "{version}"\n',
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: mhd-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def lock_for(wheel: Path, *, version: str = "1.0", python: str = "3.11") -> str:
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return f"# mhd-lock: python={python} platform=any\nmhdprobe=={version} \\\n    --hash=sha256:{sha}\n"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(folder)
    return folder


def pod_run(sshd: SshServer, root: Path, name: str, lock: str, volume: Path, wheelhouse: Path) -> Path:
    """One run folder as the daemon uploads it, launched over SSH; returns the folder."""
    run = root / name
    run.mkdir()
    for f in ("run.sh", "bootstrap.sh"):
        shutil.copyfile(POD_FILES_DIR / f, run / f)
    (run / "requirements.lock").write_text(lock)
    (run / "train.py").write_text(TRAINER)
    env = {"MHD_PYTHON": BARE_PYTHON, "MHD_TRAINER": "train.py", "MHD_BOOTSTRAP": "auto",
           "MHD_ENV_DIR": str(volume / "mhd-env"), "MHD_PIP_ARGS": f"--no-index --find-links {wheelhouse}"}
    (run / "job.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    (run / "job.env").chmod(0o600)
    cmd = f"sh {shlex.quote(str(run / 'run.sh'))} >> {shlex.quote(str(run / 'train.log'))} 2>&1 < /dev/null"
    subprocess.run(sshd.ssh_argv(cmd), check=True, timeout=240)
    return run


def test_first_pod_installs_the_lock_and_a_second_pod_on_the_volume_reuses_it(
        sshd: SshServer, tmp_path: Path, wheelhouse: Path) -> None:
    wheel = next(wheelhouse.glob("*.whl"))
    lock = lock_for(wheel)
    volume = tmp_path / "volume"
    first = pod_run(sshd, tmp_path, "pod1", lock, volume, wheelhouse)
    log1 = (first / "train.log").read_text()
    assert (first / "exit_code").read_text().strip() == "0", log1
    env_dir = volume / "mhd-env"
    assert (first / "used_python.txt").read_text().splitlines() == [str(env_dir), "1.0"]
    assert (env_dir / ".mhd-lock-sha256").read_text().strip() == hashlib.sha256(lock.encode()).hexdigest()
    assert "installing the pod's packages" in log1
    cfg_mtime = (env_dir / "pyvenv.cfg").stat().st_mtime_ns

    second = pod_run(sshd, tmp_path, "pod2", lock, volume, wheelhouse)
    log2 = (second / "train.log").read_text()
    assert (second / "exit_code").read_text().strip() == "0", log2
    assert "already holds this lock" in log2 and "installing the pod's packages" not in log2
    assert (env_dir / "pyvenv.cfg").stat().st_mtime_ns == cfg_mtime  # not rebuilt
    assert (second / "used_python.txt").read_text().splitlines()[0] == str(env_dir)


def test_a_changed_lock_is_installed_afresh(sshd: SshServer, tmp_path: Path, wheelhouse: Path) -> None:
    wheel = next(wheelhouse.glob("*.whl"))
    volume = tmp_path / "volume"
    pod_run(sshd, tmp_path, "pod1", lock_for(wheel), volume, wheelhouse)
    changed = lock_for(wheel) + "# a comment changes the sha256, so the marker no longer matches\n"
    run = pod_run(sshd, tmp_path, "pod2", changed, volume, wheelhouse)
    assert (run / "exit_code").read_text().strip() == "0"
    assert "installing the pod's packages" in (run / "train.log").read_text()


def test_a_broken_lock_fails_with_one_clear_line(sshd: SshServer, tmp_path: Path, wheelhouse: Path) -> None:
    wheel = next(wheelhouse.glob("*.whl"))
    run = pod_run(sshd, tmp_path, "pod", lock_for(wheel, version="2.0"), tmp_path / "volume", wheelhouse)
    assert (run / "exit_code").read_text().strip() == "4"
    assert not (run / "used_python.txt").exists()  # the trainer never started
    last = (run / "train.log").read_text().strip().splitlines()[-1]
    assert last.startswith("mhd: the trainer was not started, exit 4; mhd-bootstrap: pip could not install"), last
    assert not (tmp_path / "volume" / "mhd-env" / ".mhd-lock-sha256").exists()


def test_a_lock_for_another_python_is_refused_before_pip(sshd: SshServer, tmp_path: Path,
                                                         wheelhouse: Path) -> None:
    wheel = next(wheelhouse.glob("*.whl"))
    run = pod_run(sshd, tmp_path, "pod", lock_for(wheel, python="3.99"), tmp_path / "volume", wheelhouse)
    assert (run / "exit_code").read_text().strip() == "4"
    last = (run / "train.log").read_text().strip().splitlines()[-1]
    assert "the lock is for CPython 3.99" in last and "runpod.image" in last
    assert not (tmp_path / "volume" / "mhd-env").exists()


def test_bootstrap_script_is_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", "-S", "warning", str(POD_FILES_DIR / "bootstrap.sh"),
                           str(POD_FILES_DIR / "run.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
