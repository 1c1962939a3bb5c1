"""The ``ssh`` provider: a bring-your-own GPU host that is always there.

Nothing is rented or created: a "pod" is just the run's name, and its run dir on the host is
``<ssh.remote_root>/runs/<pod name>``. Terminating means ending the run's detached job — the
process group whose leader's pid the job wrote to ``pid`` in that dir — never the host itself.
Nothing is billed, so there is nothing for the reaper to find (``list_owned`` is empty).
"""

from __future__ import annotations

import re
import shlex

from mhd.config import SshConfig
from mhd.errors import ConfigError, ConnectionLost, ProviderError, RemoteError, TransientProviderError
from mhd.remote.provider import Endpoint, Pod
from mhd.remote.ssh import connect, pinned_key_from_known_hosts

# terminate() is retried by Aborting; one attempt need not wait as long as Connecting does.
TERMINATE_CONNECT_DEADLINE_S = 60.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Runs under /bin/sh on the host. Prints one word for the log; exit 0 whenever the job is not
# running afterwards ("already gone" is success). Arguments: $1 run dir, $2 grace in 0.1 s ticks.
_TERMINATE_SH = r"""
d=$1; ticks=$2
[ -f "$d/pid" ] || { echo no-job; exit 0; }
[ -f "$d/exit_code" ] && { echo finished; exit 0; }
pg=; read -r pg < "$d/pid" || true
case $pg in ''|*[!0-9]*) echo bad-pid; exit 0;; esac
[ "$pg" -gt 1 ] || { echo bad-pid; exit 0; }
alive() {
  # Members of the group that are not zombies: where PID 1 does not reap (containers), a killed
  # job lingers as a zombie that `kill -0` still reports as present.
  if n=$(ps -A -o pgid= -o stat= 2>/dev/null | awk -v pg="$pg" '$1 == pg && $2 !~ /^Z/ {n++} END {print n+0}'); then
    [ "$n" -gt 0 ]
  else
    kill -0 -"$pg" 2>/dev/null
  fi
}
alive || { echo gone; exit 0; }
# A pid can be reused once the job is gone: a leader that started after the pid file was
# written is someone else's process, and must not be signalled.
if [ -r "/proc/$pg/stat" ] && [ -r /proc/stat ]; then
  bt=$(awk '/^btime/ {print $2}' /proc/stat)
  hz=$(getconf CLK_TCK)
  # Field 22 of /proc/PID/stat (start time in ticks after boot) is $20 once "pid (comm) " is cut.
  started=$(awk -v hz="$hz" -v bt="$bt" '{sub(/.*\) /, ""); printf "%d", bt + $20 / hz}' "/proc/$pg/stat")
  written=$(stat -c %Y "$d/pid")
  if [ -n "$started" ] && [ -n "$written" ] && [ "$started" -gt $((written + 2)) ]; then echo reused; exit 0; fi
fi
kill -TERM -"$pg" 2>/dev/null
i=0
while alive; do
  if [ "$i" -ge "$ticks" ]; then kill -KILL -"$pg" 2>/dev/null; echo killed; exit 0; fi
  sleep 0.1; i=$((i + 1))
done
echo terminated
"""


class SshHostProvider:
    """Provider protocol for ``provider = "ssh"``: one configured host, no provisioning."""

    name = "ssh"

    def __init__(self, cfg: SshConfig, *, grace_s: float = 10.0, connect_deadline_s: float | None = None) -> None:
        self.cfg = cfg
        self.grace_s = grace_s
        self.connect_deadline_s = connect_deadline_s or min(cfg.connect_deadline_s, TERMINATE_CONNECT_DEADLINE_S)
        self.last_terminate: str | None = None  # what the last terminate() found (for logs/tests)

    def _pod(self, name: str) -> Pod:
        return Pod(id=name, name=name, status="RUNNING", cost_per_hr=0.0, extra={"host": self.cfg.host})

    def run_dir(self, pod_id: str) -> str:
        """``<remote_root>/runs/<pod_id>``; the id is checked, it becomes part of a path."""
        if not _SAFE_NAME.match(pod_id) or ".." in pod_id:
            raise ProviderError(f"pod id {pod_id!r} is not a plain name; refusing to build a path from it")
        return f"{self.cfg.remote_root.rstrip('/')}/runs/{pod_id}"

    async def create(self, name: str, *, interruptible: bool = False) -> Pod:
        self.run_dir(name)
        return self._pod(name)

    async def find(self, name: str) -> Pod | None:
        return self._pod(name)

    async def get(self, pod_id: str) -> Pod | None:
        return self._pod(pod_id)

    async def endpoint(self, pod: Pod) -> Endpoint | None:
        if not self.cfg.host:
            raise ConfigError("ssh.host", self.cfg.host, "the GPU host's name or address")
        return Endpoint(host=self.cfg.host, port=self.cfg.port, user=self.cfg.user)

    async def terminate(self, pod_id: str) -> None:
        """End the run's detached job (TERM to its process group, KILL after ``grace_s``).

        No job, a finished job, or a job already gone all count as success. An unreachable host
        raises TransientProviderError (Aborting retries); anything else ProviderError.
        """
        run_dir = self.run_dir(pod_id)
        if self.cfg.key_file is None:
            raise ConfigError("ssh.key_file", None, "the private key that logs in to the GPU host")
        endpoint = await self.endpoint(self._pod(pod_id))
        assert endpoint is not None
        pinned = (
            pinned_key_from_known_hosts(self.cfg.known_hosts, endpoint.host, endpoint.port)
            if self.cfg.known_hosts is not None
            else None
        )
        where = f"{endpoint.host}:{endpoint.port}"
        try:
            session, _ = await connect(
                endpoint,
                key_file=self.cfg.key_file,
                pinned_host_key=pinned,
                keepalive_interval=self.cfg.keepalive_interval,
                keepalive_count_max=self.cfg.keepalive_count_max,
                deadline_s=self.connect_deadline_s,
            )
        except ConnectionLost as exc:
            raise TransientProviderError(f"cannot reach {where} to stop run {pod_id}: {exc}") from exc
        except RemoteError as exc:
            raise ProviderError(f"cannot log in to {where} to stop run {pod_id}: {exc}") from exc
        try:
            ticks = max(1, round(self.grace_s * 10))
            # Through sh -c: the user's login shell (bash, zsh, fish…) must not matter.
            command = f"sh -c {shlex.quote(_TERMINATE_SH)} mhd-terminate {shlex.quote(run_dir)} {ticks}"
            result = await session.run(command, timeout=self.grace_s + 60)
        except ConnectionLost as exc:
            raise TransientProviderError(f"lost {where} while stopping run {pod_id}: {exc}") from exc
        except RemoteError as exc:
            raise ProviderError(f"stopping run {pod_id} on {where} failed: {exc}") from exc
        finally:
            await session.close()
        if result.exit_status != 0:
            raise ProviderError(
                f"stopping run {pod_id} on {where} failed (exit {result.exit_status}): {result.stderr.strip()[:300]}"
            )
        self.last_terminate = result.stdout.strip() or None

    async def list_owned(self) -> list[Pod]:
        return []  # nothing is rented on a BYO host, so nothing can be orphaned and billing

    async def aclose(self) -> None:
        return None
