"""End-to-end harness: the real daemon process, a real sshd behind a TCP proxy, the real trainer.

One :class:`E2E` per test (the ``e2e`` fixture in ``tests/e2e/conftest.py``) owns everything the
test starts and stops all of it in :meth:`E2E.cleanup`:

- an OpenSSH ``sshd`` on 127.0.0.1 (:class:`~tests.support.sshd.SshServer`), reached only through
  a :class:`~tests.support.tcpproxy.TcpProxy` the test cuts at will;
- the Ollama stand-in with the base ``qwen3:tiny`` already "pulled";
- optionally the RunPod REST v2 stand-in (:meth:`E2E.use_runpod`), whose pods' ``ssh.direct``
  point at the proxy;
- every daemon process (:meth:`E2E.daemon`) and every trainer process group the daemon launched
  (found by the ``pid`` files in the remote run folders — never by name).

The "pod" is this machine seen through sshd, so the remote run folder
``<remote_root>/runs/mhd-<run>`` is also a local path the test can read: ``launches``,
``progress.jsonl``, ``train.log``, ``pid``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from mhd.devtools.toml_write import write_config
from mhd.hashing import sha256_file
from mhd.store import Store
from tests.support.daemon import REPO, DaemonProc, write_memories
from tests.support.ollama_standin import OllamaStandIn
from tests.support.polling import wait_until
from tests.support.runpod_standin import RunpodStandin
from tests.support.sshd import SshServer
from tests.support.tcpproxy import TcpProxy

TRAINER = REPO / "mhd" / "pod" / "train.py"
OLLAMA_BASE = "qwen3:tiny"
HAPPY = ["Idle", "Provisioning", "Connecting", "Uploading", "Training", "Fetching", "Merging", "Idle"]
# An API key that looks like RunPod's and that no log line could contain by accident.
API_KEY = "rpa_E2E" + "K3yN0tF0rL0gs" * 3
_TRAIN_START = re.compile(r"training (\d+) steps \((starting|resuming at step (\d+))\)")


def live_members(pgid: int) -> list[psutil.Process]:
    """Processes of group ``pgid`` that are not zombies (PID 1 here may never reap them)."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                out.append(p)
    return out


def pending_signals(pid: int) -> set[int]:
    """Signals queued for ``pid`` and not yet delivered (a stopped process keeps them queued)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    mask = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


class E2E:
    def __init__(self, tmp: Path, tiny_model: Path) -> None:
        self.tmp = tmp
        self.tiny_model = tiny_model
        self.memories = tmp / "memories"
        self.state = tmp / "state"
        self.remote_root = tmp / "remote"
        self.config = tmp / "config.toml"
        self.daemon_log = tmp / "daemon.log"
        self.api_key_file = tmp / "runpod.key"
        for d in (self.memories, self.state, self.remote_root):
            d.mkdir(parents=True, exist_ok=True)
        self.procs: list[DaemonProc] = []
        self.extra_proxies: list[TcpProxy] = []
        self.runpod: RunpodStandin | None = None
        self._groups: set[int] = set()
        self._stopped: set[int] = set()
        # What the "pod" gives every SSH session: no hub, no cache outside the test's folder.
        self.sshd = SshServer(extra_config={"SetEnv": f"HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME={tmp / 'hf'}"})
        self.proxy: TcpProxy | None = None
        self.ollama: OllamaStandIn | None = None
        try:
            self.sshd.start()
            self.proxy = TcpProxy(self.sshd.host, self.sshd.port).start()
            self.ollama = OllamaStandIn(version="0.33.0").start()
            self.ollama.add_model(OLLAMA_BASE)
        except BaseException:
            self.cleanup()
            raise

    # ---- configuration ---------------------------------------------------------------------

    def use_runpod(self, **kw: Any) -> RunpodStandin:
        """Start the RunPod stand-in; its pods' SSH endpoint is the proxy (so cuts still work)."""
        assert self.proxy is not None
        self.api_key_file.write_text(API_KEY + "\n")
        self.api_key_file.chmod(0o600)
        kw.setdefault("ssh_user", self.sshd.user)
        kw.setdefault("on_preempt", self._pod_stopped)
        self.runpod = RunpodStandin(api_key=API_KEY, ssh_host="127.0.0.1", ssh_port=self.proxy.port, **kw).start()
        return self.runpod

    def _pod_stopped(self, pod_id: str) -> None:
        """The machine side of ``RunpodStandin.preempt``: the pod's sshd goes (every connection
        through it drops) and its processes die. The link first: a daemon that saw the trainer
        gone while still connected would relaunch it on the lost pod."""
        assert self.runpod is not None and self.proxy is not None
        self.proxy.cut()
        pgid = self.pod_group(str(self.runpod.pods[pod_id]["name"]))
        if pgid is not None:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)

    def pod_group(self, pod_name: str) -> int | None:
        """The job's process group in pod ``pod_name``'s run folder (one folder per pod)."""
        try:
            pgid = int((self.remote_root / "runs" / pod_name / "pid").read_text().strip())
        except (OSError, ValueError):
            return None
        self._groups.add(pgid)
        return pgid

    def new_proxy(self) -> TcpProxy:
        """Another way in to the same sshd (a pod that came back on another public port)."""
        proxy = TcpProxy(self.sshd.host, self.sshd.port).start()
        self.extra_proxies.append(proxy)
        return proxy

    def configure(self, provider: str = "ssh", **overrides: Any) -> Path:
        """Write the daemon's config; ``overrides`` like ``training={"num_train_epochs": 1}``."""
        assert self.proxy is not None and self.ollama is not None
        top: dict[str, Any] = {
            "memory_dir": str(self.memories),
            "state_dir": str(self.state),
            "threshold": 1000,  # runs start with `train`, never by themselves
            "debounce_s": 0.3,
            "poll_interval_s": 0.3,
            "heartbeat_interval_s": 5,
            "provider": provider,
            "log_level": "DEBUG",
        }
        sections: dict[str, dict[str, Any]] = {
            "ssh": {"host": "127.0.0.1", "port": self.proxy.port, "user": self.sshd.user,
                    "key_file": str(self.sshd.client_key_path), "remote_root": str(self.remote_root),
                    "connect_deadline_s": 60, "keepalive_interval": 2, "keepalive_count_max": 3},
            "training": {
                "base_model": str(self.tiny_model), "python": sys.executable, "script": str(TRAINER),
                "load_in_4bit": False, "max_seq_length": 128, "gradient_accumulation_steps": 1,
                "per_device_train_batch_size": 1, "num_train_epochs": 1, "save_steps": 4,
                "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 5e-3,
            },
            "merge": {"mode": "ollama", "ollama_url": self.ollama.url, "base": OLLAMA_BASE,
                      "base_model_path": str(self.tiny_model), "model_prefix": "mhd"},
            "retry": {"base_s": 0.2, "max_s": 2.0},
            "dataset": {"min_chars": 5},
            "web": {"enabled": False},
            # Off unless a test is about the gate (tests/e2e/test_quality_gate.py): it adds a scoring pass.
            "eval": {"enabled": False},
        }
        if provider == "runpod":
            assert self.runpod is not None, "use_runpod() first"
            sections["runpod"] = {
                "api_url": self.runpod.url, "api_key_file": str(self.api_key_file),
                "ssh_key_file": str(self.sshd.client_key_path), "remote_root": str(self.remote_root),
                "gpu_types": ["NVIDIA RTX A6000", "NVIDIA A40"], "reap_interval_s": 3600,
            }
        for key, value in overrides.items():
            if isinstance(value, dict):
                sections.setdefault(key, {}).update(value)
            else:
                top[key] = value
        return write_config(self.config, top, sections)

    def write_memories(self, n: int = 6) -> list[Path]:
        return write_memories(self.memories, n)

    # ---- the daemon ------------------------------------------------------------------------

    def daemon(self, pause: str | None = None, env: dict[str, str] | None = None) -> DaemonProc:
        """A daemon process (not started); ``pause`` is an ``MHD_DEBUG_PAUSE`` value."""
        full = {"MHD_DEBUG_PAUSE": pause or "", **(env or {})}
        d = DaemonProc(self.config, self.daemon_log, full)
        self.procs.append(d)
        return d

    def start_run(self, d: DaemonProc) -> str:
        resp = d.ask("train")
        assert resp["ok"], resp
        return str(resp["run_id"])

    def wait_run_end(self, d: DaemonProc, run_id: str, timeout: float = 150) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            st = d.status()
            last = st.get("last_run")
            return last if st["state"] == "Idle" and last and last["id"] == run_id else None

        return dict(d.wait_for(ended, timeout, f"run {run_id} to end", interval=0.2))

    def wait_state(self, d: DaemonProc, state: str, timeout: float = 60) -> None:
        d.wait_for(lambda: d.status()["state"] == state, timeout, f"state {state}", interval=0.02)

    def log_text(self) -> str:
        try:
            return self.daemon_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_count(self, text: str) -> int:
        return self.log_text().count(text)

    def run_log(self, run_id: str) -> str:
        f = self.run_dir(run_id) / "run.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def cut_during(self, state: str, pause: str, cuts: int = 3,
                   arm: Callable[[int], int | None] = lambda i: None) -> None:
        """Cut the link ``cuts`` times while the daemon is in ``state``, each cut seen.

        The daemon must run with ``MHD_DEBUG_PAUSE="<pause>=<s>"``, a fault point it passes after
        each file. In the i-th pass through ``state`` the link is cut during the i-th pause (so
        each pass gets one file further), and the next cut waits until the daemon has noticed
        the last one (``state → Connecting``) and come back. ``arm(i)`` may return a byte count:
        that cut is armed to fire after that many more bytes flowed down, i.e. mid-transfer.
        """
        assert self.proxy is not None
        proxy = self.proxy
        for i in range(1, cuts + 1):
            def pauses_in_pass(i: int = i) -> bool:
                text = self.log_text()
                start = _nth(text, f"→ {state} (", i)
                return start >= 0 and text[start:].count(f"debug pause at {pause}") >= i

            wait_until(pauses_in_pass, 90, f"pause {i} of pass {i} through {state}", on_timeout=self.tail)
            nbytes = arm(i)
            if nbytes is None:
                proxy.cut()
            else:
                proxy.cut_after(nbytes, "down")
            wait_until(lambda i=i: self.log_count(f"{state} → Connecting") >= i, 60,
                       f"cut {i} in {state} to be noticed", on_timeout=self.tail)

    # ---- the remote side -------------------------------------------------------------------

    def remote_dir(self, run_id: str) -> Path:
        return self.remote_root / "runs" / f"mhd-{run_id}"

    def run_dir(self, run_id: str) -> Path:
        return self.state / "runs" / run_id

    def launches(self, run_id: str) -> int:
        f = self.remote_dir(run_id) / "launches"
        return len(f.read_text().split()) if f.exists() else 0

    def progress(self, run_id: str) -> list[dict[str, Any]]:
        f = self.remote_dir(run_id) / "progress.jsonl"
        if not f.exists():
            return []
        out = []
        for line in f.read_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if obj.get("phase") == "train":
                    out.append(obj)
        return out

    def step(self, run_id: str) -> int:
        p = self.progress(run_id)
        return int(p[-1]["step"]) if p else 0

    def train_starts(self, run_id: str) -> list[tuple[int, int]]:
        """(total_steps, resumed_at_step) per trainer start, from the remote train.log."""
        f = self.remote_dir(run_id) / "train.log"
        text = f.read_text(errors="replace") if f.exists() else ""
        return [(int(m[1]), int(m[3] or 0)) for m in _TRAIN_START.finditer(text)]

    def job_group(self, run_id: str) -> int | None:
        try:
            pgid = int((self.remote_dir(run_id) / "pid").read_text().strip())
        except (OSError, ValueError):
            return None
        self._groups.add(pgid)
        return pgid

    def trainer_process(self, run_id: str) -> psutil.Process | None:
        """The trainer (python) child of the launcher's process group, once it runs."""
        pgid = self.job_group(run_id)
        if pgid is None:
            return None
        for p in live_members(pgid):
            with contextlib.suppress(psutil.Error):
                if p.pid != pgid and "python" in p.name().lower():
                    return p
        return None

    @contextlib.contextmanager
    def hold_trainer(self, run_id: str, at_step: int = 1, *, when: Callable[[], bool] = lambda: True
                     ) -> Iterator[int]:
        """Freeze the job's process group (SIGSTOP) once training reached ``at_step`` (and
        ``when()`` holds), for the block; then SIGCONT. Frozen, the trainer provably outlasts
        whatever the block does, and its pid stays alive for the daemon to see."""
        def reached() -> int | None:
            pgid = self.job_group(run_id)
            return pgid if pgid and self.step(run_id) >= at_step and when() else None

        # The real trainer starts here (torch import, model load): minutes on a loaded 2-core box.
        pgid = wait_until(reached, 240, f"training to reach step {at_step}", interval=0.01, on_timeout=self.tail)
        os.killpg(pgid, signal.SIGSTOP)
        self._stopped.add(pgid)
        try:
            assert not (self.remote_dir(run_id) / "manifest.json").exists(), "the trainer finished before the hold"
            assert self.trainer_process(run_id) is not None, "no trainer in the job's process group"
            yield pgid
        finally:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGCONT)
            self._stopped.discard(pgid)

    def alive_groups(self) -> list[int]:
        groups = set(self._groups)
        for pid_file in self.remote_root.glob("runs/*/pid"):
            with contextlib.suppress(OSError, ValueError):
                groups.add(int(pid_file.read_text().strip()))
        return sorted(g for g in groups if live_members(g))

    def wait_no_jobs(self, timeout: float = 15) -> None:
        """The launcher exits a moment after writing exit_code: allow it that moment."""
        wait_until(lambda: not self.alive_groups(), timeout, "no trainer process group left",
                   on_timeout=lambda: f"alive: {self.alive_groups()}")

    # ---- what happened ---------------------------------------------------------------------

    def store(self) -> Store:
        return Store(f"sqlite:///{self.state / 'mhd.db'}", create=False)

    def journal(self, run_id: str) -> list[str]:
        store = self.store()
        try:
            j = store.journal(run_id)
            return [j[0].from_state.value] + [t.to_state.value for t in j] if j else []
        finally:
            store.close()

    def verify_output(self, run_id: str, pod_name: str | None = None) -> dict[str, Any]:
        """Every fetched file matches manifest.json's size and sha256, and the manifest is the one
        in pod ``pod_name``'s run folder (default: the run's first pod); returns the manifest."""
        out = self.run_dir(run_id) / "output"
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["files"]
        assert any(f["path"].endswith("adapter_model.safetensors") for f in files), files
        for f in files:
            p = out / f["path"]
            assert p.stat().st_size == f["size"], f
            assert sha256_file(p) == f["sha256"], f"{f['path']}: sha256 differs from the manifest"
        folder = self.remote_root / "runs" / pod_name if pod_name else self.remote_dir(run_id)
        remote = json.loads((folder / "manifest.json").read_text())
        assert remote["files"] == files
        return dict(manifest)

    def assert_succeeded(self, last: dict[str, Any], *, launches: int = 1) -> list[str]:
        """The invariants every successful scenario shares; returns the journal's path."""
        run_id = last["id"]
        assert last["outcome"] == "succeeded", f"{last}\n{self.tail()}"
        assert self.launches(run_id) == launches, f"launches: {self.launches(run_id)}"
        manifest = self.verify_output(run_id)
        sha = next(f["sha256"] for f in manifest["files"] if f["path"].endswith("adapter_model.safetensors"))
        assert last["adapter_sha256"] == sha
        self.wait_no_jobs()
        path = self.journal(run_id)
        assert path[0] == "Idle" and path[-3:] == ["Fetching", "Merging", "Idle"], path
        assert "Aborting" not in path, path
        # The model is registered in Ollama under the run's name, with the alias pointing at it.
        assert self.ollama is not None
        assert last["model_name"] and last["model_name"].startswith("mhd"), last
        models = self.ollama.models
        assert any(last["model_name"].split(":")[0] in name for name in models), models
        return path

    def files_containing(self, secret: str) -> list[Path]:
        """Every file under the test's folder (daemon log, DB and its WAL, run folders, the
        "pod" side) whose bytes contain ``secret`` — except the key file that holds it."""
        needle = secret.encode()
        hits = []
        for path in sorted(self.tmp.rglob("*")):
            if path == self.api_key_file or not path.is_file() or path.is_symlink():
                continue
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    hits.append(path)
        return hits

    def tail(self, n: int = 4000) -> str:
        try:
            text = self.daemon_log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            text = "(no daemon log)"
        return f"--- daemon log tail ---\n{text}\n--- sshd ---\n{self.sshd.log_tail(10)}"

    # ---- teardown --------------------------------------------------------------------------

    def cleanup(self) -> None:
        for d in self.procs:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
        for pgid in self.alive_groups() + sorted(self._stopped):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        for stop in (*(p.stop for p in self.extra_proxies), getattr(self.proxy, "stop", None),
                     getattr(self.ollama, "stop", None),
                     getattr(self.runpod, "stop", None), self.sshd.close):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()


def _nth(text: str, needle: str, n: int) -> int:
    """Index of the n-th (1-based) occurrence of ``needle`` in ``text``, or -1."""
    pos = -1
    for _ in range(n):
        pos = text.find(needle, pos + 1)
        if pos < 0:
            return -1
    return pos


def count_transitions(path: list[str], a: str, b: str) -> int:
    return sum(1 for x, y in itertools.pairwise(path) if (x, y) == (a, b))
