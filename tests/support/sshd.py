"""A real OpenSSH ``sshd`` on 127.0.0.1 for integration and end-to-end tests.

Each :class:`SshServer` owns a private 0700 temp directory holding its own ed25519 host key, a
client key pair, ``authorized_keys``, ``known_hosts``, an ``sshd_config`` and the daemon's log. The
daemon runs in the foreground (``-D -e``) as a child of the test process, listens on a free
unprivileged port of 127.0.0.1 only, and logs you in as the current user (root is allowed, with
keys only). Nothing on the machine outside the temp directory is read or changed, except that
``/run/sshd`` (sshd's privilege-separation directory) is created when missing.

Typical use in a test module (the fixture is not in a conftest on purpose: import what you use)::

    import pytest
    from tests.support.sshd import SshServer

    @pytest.fixture(scope="module")
    def sshd():
        with SshServer() as server:          # started; stopped and deleted on exit
            yield server

    def test_something(sshd):
        async def scenario():
            session, host_key = await connect(sshd.endpoint, key_file=sshd.client_key_path,
                                              pinned_host_key=None, ...)
            async with session:
                assert host_key == sshd.host_public_key

        asyncio.run(scenario())

For a daemon subprocess, write ``[ssh] host/port/user/key_file`` from ``server.endpoint`` and
``server.client_key_path`` (``known_hosts = server.known_hosts_path`` pins the key up front).
OpenSSH clients: ``server.ssh_argv("cmd")``, ``server.scp_argv(src, "REMOTE:/dst")``, or
``server.ssh_options()`` with your own ``-p`` (they verify the host key through a proxy too).

Drop scenarios:

* ``server.restart()`` — a new sshd process, same host key and port. Existing SSH connections are
  dropped too (their per-connection sshd processes are ended), but commands detached with
  ``setsid nohup … &`` keep running, as they would on a pod whose sshd crashed and came back.
* ``server.stop()`` / ``server.start()`` — down for a while (connections are refused meanwhile).
* ``server.rotate_host_key()`` — a new host key (e.g. the pod was replaced), then restart.

Commands run through the user's login shell, so its rc files run too: with root's pyenv setup
here each command costs ~0.2 s. sshd stays in the test's process group (killing the group ends
it) and servers still running at interpreter exit are stopped by an atexit hook.

Requires Debian's ``openssh-server`` (``apt-get install -y openssh-server``); the constructor fails
with that instruction when ``/usr/sbin/sshd`` is missing. Only processes this class started are
ever signalled.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psutil

from mhd.remote.provider import Endpoint

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
_SFTP_SERVER_CANDIDATES = (
    Path("/usr/lib/openssh/sftp-server"),  # Debian / Ubuntu
    Path("/usr/libexec/openssh/sftp-server"),  # Fedora / RHEL
    Path("/usr/libexec/sftp-server"),  # Arch, Alpine
)
LOOPBACK = "127.0.0.1"
HOST_KEY_ALIAS = "mhd-test-sshd"
# Servers still running when the interpreter exits (a test that forgot close(), Ctrl-C) are
# stopped then. sshd stays in pytest's process group, so killing that group ends it as well.
_LIVE: weakref.WeakSet[SshServer] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, *, banner: bytes | None = None) -> None:
    """Block until ``host:port`` accepts a connection (and sends ``banner``, when given)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if banner is None or s.recv(64).startswith(banner):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s (last: {last})")


def sftp_server_path() -> Path:
    for candidate in _SFTP_SERVER_CANDIDATES:
        if candidate.exists():
            return candidate
    raise RuntimeError("no OpenSSH sftp-server found; install openssh-server (apt-get install -y openssh-server)")


def _sshd_version() -> tuple[int, int]:
    out = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _public_key_text(pub_file: Path) -> str:
    """``"ssh-ed25519 AAAA…"`` without the comment (the form ``connect()`` returns and pins)."""
    kind, blob = pub_file.read_text().split()[:2]
    return f"{kind} {blob}"


class SshServer:
    """One OpenSSH ``sshd`` on 127.0.0.1 that a test starts, stops, restarts and re-keys.

    Attributes (all stable for the server's life; the port survives restarts):
      ``host`` ("127.0.0.1"), ``port``, ``user`` (the current user), ``endpoint`` (an
      :class:`~mhd.remote.provider.Endpoint`), ``host_key_path`` (private host key),
      ``host_public_key`` ("ssh-ed25519 AAAA…", what a client should pin), ``client_key_path``
      (private key whose ``.pub`` is authorized), ``known_hosts_path`` (an OpenSSH known_hosts
      file pinning the current host key), ``log_path`` (sshd's stderr, useful when a test fails),
      ``dir`` (the private temp directory).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        log_level: str = "INFO",
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare keys and config (nothing is started until :meth:`start`).

        ``extra_config`` adds or overrides sshd_config keywords, e.g. ``{"MaxStartups": "1"}``.
        """
        if not SSHD.exists():
            raise RuntimeError(f"{SSHD} not found; install it: apt-get install -y openssh-server")
        self.dir = Path(tempfile.mkdtemp(prefix="mhd-sshd-"))
        # sshd refuses keys and authorized_keys under group/world-writable paths (StrictModes);
        # a private 0700 directory keeps that check meaningful instead of just switching it off.
        self.dir.chmod(0o700)
        self.host = LOOPBACK
        self.port = port or free_port()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.host_key_path = self.dir / "ssh_host_ed25519_key"
        self.client_key_path = self.dir / "client_ed25519"
        self.authorized_keys_path = self.dir / "authorized_keys"
        self.known_hosts_path = self.dir / "known_hosts"
        self.config_path = self.dir / "sshd_config"
        self.pid_path = self.dir / "sshd.pid"
        self.log_path = self.dir / "sshd.log"
        self._log_level = log_level
        self._extra = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # how many sshd processes this object has started
        self._keygen(self.client_key_path, "mhd-test-client")
        shutil.copyfile(self.client_key_path.with_suffix(".pub"), self.authorized_keys_path)
        self.authorized_keys_path.chmod(0o600)
        self._keygen(self.host_key_path, "mhd-test-host")
        self._write_known_hosts()
        self._write_config()

    # ---- public API -------------------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.host, port=self.port, user=self.user)

    @property
    def host_public_key(self) -> str:
        return _public_key_text(self.host_key_path.with_suffix(".pub"))

    @property
    def client_public_key(self) -> str:
        return _public_key_text(self.client_key_path.with_suffix(".pub"))

    @property
    def pid(self) -> int | None:
        """The listening sshd's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 10.0) -> SshServer:
        """Start sshd and return once it answers with an SSH banner on :attr:`port`."""
        if self.running:
            return self
        # sshd's privilege separation needs this directory; Debian creates it only via systemd.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config_path), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()  # the child holds its own copy
        self.starts += 1
        _LIVE.add(self)
        try:
            wait_for_port(self.host, self.port, timeout, banner=b"SSH-")
        except TimeoutError:
            self._terminate_listener()
            raise RuntimeError(f"sshd did not come up on port {self.port}; its log:\n{self.log_tail()}") from None
        return self

    def stop(self, *, kill_sessions: bool = True, timeout: float = 5.0) -> None:
        """Stop the listening sshd; by default also end every SSH connection it accepted.

        Real sshd leaves established sessions alive when the listener stops; ``kill_sessions``
        (default) ends their sshd processes too, so clients see the drop. Commands the sessions
        started are not signalled: detached jobs keep running, like on a pod.
        """
        sessions = self._session_processes() if kill_sessions else []
        self._terminate_listener(timeout)
        for proc in sessions:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _gone, alive = psutil.wait_procs(sessions, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def restart(self, timeout: float = 10.0) -> SshServer:
        """A new sshd process on the same port with the same host key (connections dropped)."""
        self.stop()
        return self.start(timeout)

    def rotate_host_key(self) -> str:
        """Replace the host key with a fresh one and restart; returns the new public key."""
        was_running = self.running
        self.stop()
        for path in (self.host_key_path, self.host_key_path.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        self._keygen(self.host_key_path, "mhd-test-host-rotated")
        self._write_known_hosts()
        if was_running:
            self.start()
        return self.host_public_key

    def ssh_argv(self, *remote_command: str) -> list[str]:
        """An OpenSSH ``ssh`` command line that logs in to this server, host key checked."""
        return ["ssh", *self.ssh_options(), "-p", str(self.port), f"{self.user}@{self.host}", *remote_command]

    def scp_argv(self, *paths: str) -> list[str]:
        """An ``scp`` command line for this server; write remote paths as ``REMOTE:/path``."""
        target = f"{self.user}@{self.host}:"
        return ["scp", "-q", *self.ssh_options(), "-P", str(self.port), *(p.replace("REMOTE:", target) for p in paths)]

    def ssh_options(self) -> list[str]:
        """OpenSSH client options for this server: its client key and a strict host-key check.

        Work through a proxy too: ``["ssh", *server.ssh_options(), "-p", str(proxy.port), ...]``.
        """
        return [
            "-i", str(self.client_key_path),
            "-o", f"UserKnownHostsFile={self.known_hosts_path}",
            "-o", f"HostKeyAlias={HOST_KEY_ALIAS}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-F", "/dev/null",
        ]  # fmt: skip

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop everything and delete the temp directory (keys included)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SshServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _keygen(path: Path, comment: str) -> None:
        # An empty passphrase, not key material: the private key never leaves the 0700 dir.
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )

    def _write_known_hosts(self) -> None:
        # Two entries: the real address (for asyncssh's known_hosts reader), and an alias that
        # ssh_options() names, so `ssh`/`scp` through a TcpProxy on another port verify it too.
        self.known_hosts_path.write_text(
            f"[{self.host}]:{self.port} {self.host_public_key}\n{HOST_KEY_ALIAS} {self.host_public_key}\n"
        )

    def _write_config(self) -> None:
        options: dict[str, str] = {
            "ListenAddress": self.host,
            "HostKey": str(self.host_key_path),
            "PidFile": str(self.pid_path),
            "AuthorizedKeysFile": str(self.authorized_keys_path),
            "PubkeyAuthentication": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            "PermitRootLogin": "prohibit-password",
            # Keys live in our 0700 dir; the user's home may not satisfy StrictModes in a container.
            "StrictModes": "no",
            "UseDNS": "no",
            "PrintMotd": "no",
            # Tests open many connections in quick succession (reconnect loops, proxies).
            "MaxStartups": "100",
            "MaxSessions": "100",
            "LogLevel": self._log_level,
            "Subsystem": f"sftp {sftp_server_path()}",
        }
        if _sshd_version() >= (9, 8):
            # 9.8+ penalises addresses whose connections drop before auth — exactly what a
            # test proxy's cut() does — and would then refuse 127.0.0.1 for a while.
            options["PerSourcePenalties"] = "no"
        options.update(self._extra)
        self.config_path.write_text("".join(f"{k} {v}\n" for k, v in options.items()))

    def _terminate_listener(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _session_processes(self) -> list[psutil.Process]:
        """The per-connection sshd processes forked by our listener (never anything else)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        try:
            children = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        sessions = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.name().startswith("sshd"):
                    sessions.append(child)
        return sessions
