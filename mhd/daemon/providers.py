"""Build the configured provider and the matching session connector."""

from __future__ import annotations

import os
from pathlib import Path

from mhd.config import Config
from mhd.errors import ConfigError
from mhd.remote.local import LocalProvider, LocalSession
from mhd.remote.provider import Endpoint, Provider
from mhd.remote.session import Session
from mhd.states.context import Connector
from mhd.store import Run


def build_provider(cfg: Config) -> tuple[Provider, str]:
    """The provider and the remote root under which run folders live."""
    if cfg.provider == "local":
        return LocalProvider(cfg.local_root), str(cfg.local_root)
    if cfg.provider == "ssh":
        from mhd.remote.sshhost import SshHostProvider

        return SshHostProvider(cfg.ssh), cfg.ssh.remote_root
    from mhd.remote.runpod import RunpodProvider, load_api_key

    key_file = _ssh_key_file(cfg)
    pub = Path(str(key_file) + ".pub")
    public_key = pub.read_text().strip() if pub.exists() else None
    provider = RunpodProvider(cfg.runpod, load_api_key(cfg.runpod, dict(os.environ)), public_key=public_key,
                              env={"MHD_ROOT": cfg.runpod.remote_root})
    return provider, cfg.runpod.remote_root


def _ssh_key_file(cfg: Config) -> Path:
    key = cfg.runpod.ssh_key_file if cfg.provider == "runpod" else cfg.ssh.key_file
    key = key or cfg.ssh.key_file
    if key is None:
        raise ConfigError(f"{'runpod' if cfg.provider == 'runpod' else 'ssh'}.key_file", None,
                          "the path of an SSH private key (its .pub beside it for RunPod)")
    return Path(os.path.expanduser(str(key)))


def _pinned_key(cfg: Config, run: Run) -> str | None:
    if run.host_key:
        return run.host_key
    if cfg.ssh.known_hosts and cfg.provider == "ssh" and cfg.ssh.host:
        from mhd.remote.ssh import pinned_key_from_known_hosts

        return pinned_key_from_known_hosts(Path(cfg.ssh.known_hosts).expanduser(), cfg.ssh.host, cfg.ssh.port)
    return None


def build_connector(cfg: Config) -> Connector:
    if cfg.provider == "local":
        async def local(run: Run, ep: Endpoint) -> tuple[Session, str | None]:
            return LocalSession(), None

        return local

    key_file = _ssh_key_file(cfg)

    async def ssh(run: Run, ep: Endpoint) -> tuple[Session, str | None]:
        from mhd.remote.ssh import connect

        session, host_key = await connect(
            ep, key_file=key_file, pinned_host_key=_pinned_key(cfg, run),
            keepalive_interval=cfg.ssh.keepalive_interval, keepalive_count_max=cfg.ssh.keepalive_count_max,
            deadline_s=cfg.ssh.connect_deadline_s, base_delay=cfg.retry.base_s, max_delay=cfg.retry.max_s,
        )
        return session, host_key

    return ssh
