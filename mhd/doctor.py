"""`mhd doctor`: one line per check, each failure with the fix. Exit 1 if any check fails."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from mhd.config import Config, load_config
from mhd.errors import ConfigError, MhdError

MIN_FREE_GB = 5.0
UNIT_PATHS = (Path("/etc/systemd/system/mhd.service"), Path("/lib/systemd/system/mhd.service"),
              Path("/usr/lib/systemd/system/mhd.service"))


@dataclass
class Check:
    name: str
    ok: bool | None  # None = not applicable / warning only
    detail: str
    fix: str = ""


def _memory_dir(cfg: Config) -> Check:
    d = cfg.memory_dir
    if not d.is_dir() or not os.access(d, os.R_OK | os.X_OK):
        return Check("memory_dir", False, f"{d} is not a readable folder", "set memory_dir to the episodic folder")
    from mhd.dataset.memories import iter_memory_files

    n = sum(1 for _ in iter_memory_files(d))
    return Check("memory_dir", True, f"{d}: {n} memory files")


def _state_dir(cfg: Config) -> Check:
    d = cfg.state_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".doctor-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return Check("state_dir", False, f"{d}: {exc.strerror}", f"create {d} writable by this user")
    return Check("state_dir", True, f"{d} is writable")


def _db(cfg: Config) -> Check:
    from mhd.store import SCHEMA_VERSION, Store, StoreError

    try:
        v = Store(cfg.db_path_url).schema_version()
    except (StoreError, Exception) as exc:
        return Check("database", False, str(exc), "move the DB aside or upgrade mhd")
    return Check("database", v == SCHEMA_VERSION, f"schema version {v} (expected {SCHEMA_VERSION})")


def _api_key(cfg: Config) -> Check:
    if cfg.provider != "runpod":
        return Check("RunPod API key", None, f"not needed for provider {cfg.provider}")
    from mhd.remote.runpod import load_api_key

    try:
        load_api_key(cfg.runpod, dict(os.environ))
    except MhdError as exc:
        return Check("RunPod API key", False, str(exc), "set [runpod] api_key_file or RUNPOD_API_KEY")
    return Check("RunPod API key", True, "present (not shown)")


def _ssh_key(cfg: Config) -> Check:
    if cfg.provider == "local":
        return Check("SSH key", None, "not needed for provider local")
    key = (cfg.runpod.ssh_key_file if cfg.provider == "runpod" else None) or cfg.ssh.key_file
    if key is None:
        return Check("SSH key", False, "no key configured", "set [ssh] key_file (ssh-keygen -t ed25519)")
    key = key.expanduser()
    if not key.exists():
        return Check("SSH key", False, f"{key} does not exist", f"ssh-keygen -t ed25519 -f {key} -N ''")
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o077:
        return Check("SSH key", False, f"{key} has mode {oct(mode)}", f"chmod 600 {key}")
    if cfg.provider == "runpod" and not Path(str(key) + ".pub").exists():
        return Check("SSH key", False, f"{key}.pub missing (the pod needs the public key)",
                     f"ssh-keygen -y -f {key} > {key}.pub")
    return Check("SSH key", True, f"{key} ({oct(mode)})")


def _provider(cfg: Config) -> Check:
    if cfg.provider == "local":
        return Check("provider", True, "local (this machine trains; demo mode)")

    async def probe() -> str:
        from mhd.daemon.providers import build_provider

        provider, _ = build_provider(cfg)
        try:
            if cfg.provider == "runpod":
                pods = await provider.list_owned()
                return f"RunPod API answered; {len(pods)} mhd pod(s) live"
            from mhd.daemon.providers import build_connector
            from mhd.remote.provider import pod_name

            pod = await provider.create(pod_name("doctor"))
            ep = await provider.endpoint(pod)
            assert ep is not None
            from mhd.store import Run

            session, _ = await build_connector(cfg)(Run(id="doctor", host_key=None), ep)
            await session.close()
            return f"SSH to {ep.user}@{ep.host}:{ep.port} works"
        finally:
            await provider.aclose()

    try:
        return Check("provider", True, asyncio.run(asyncio.wait_for(probe(), 30)))
    except Exception as exc:
        return Check("provider", False, f"{cfg.provider}: {exc}", "check the host/API key and network")


def _ollama(cfg: Config) -> Check:
    if cfg.merge.effective_mode != "ollama":
        return Check("Ollama", None, f"merge.mode = {cfg.merge.effective_mode}")
    import httpx

    try:
        with httpx.Client(base_url=cfg.merge.ollama_url or "", timeout=5) as c:
            version = c.get("/api/version").json().get("version")
            names = {m.get("name") for m in c.get("/api/tags").json().get("models", [])}
    except (httpx.HTTPError, ValueError) as exc:
        return Check("Ollama", False, f"{cfg.merge.ollama_url}: {exc}", "start Ollama or fix merge.ollama_url")
    base = cfg.merge.base
    if base and base not in names and f"{base}:latest" not in names:
        return Check("Ollama", False, f"version {version}; base model {base} is not pulled", f"ollama pull {base}")
    return Check("Ollama", True, f"version {version} at {cfg.merge.ollama_url}; base {base or '(unset)'} present")


def _disk(cfg: Config) -> Check:
    from mhd.states.fetching import FREE_MARGIN, free_bytes

    d = cfg.state_dir if cfg.state_dir.exists() else Path("/")
    free = free_bytes(d)
    pending = _pending_fetch(cfg)
    if pending is not None:
        # A run is fetching (or waiting for room to fetch): that is the number that matters now.

        run_id, left, total = pending
        need = left + FREE_MARGIN if left else 0
        detail = (f"{free / 1e9:.1f} GB free under {d}; run {run_id} is fetching {total / 1e9:.1f} GB, "
                  f"{left / 1e9:.1f} GB still to download")
        if free >= need:
            return Check("free disk", True, detail)
        return Check("free disk", False, detail + f" (+ {FREE_MARGIN / 1e9:.1f} GB margin): the pod is kept and "
                     "the fetch waits", f"free {(need - free) / 1e9:.1f} GB under {d}; the fetch resumes by itself "
                     f"(the pod stops itself after runpod.max_unattended = {cfg.runpod.max_unattended / 3600:.1f} h)")
    ok = free / 1e9 >= MIN_FREE_GB
    return Check("free disk", ok, f"{free / 1e9:.1f} GB free under {d}",
                 "" if ok else f"free space: a merged model needs several GB (≥ {MIN_FREE_GB} GB)")


def _pending_fetch(cfg: Config) -> tuple[str, int, int] | None:
    """(run id, bytes still to download, total bytes) of the active run if it is in Fetching."""
    if not cfg.db_url and not (cfg.state_dir / "mhd.db").exists():
        return None
    from mhd.states.fetching import bytes_to_fetch, fetch_plan
    from mhd.states.model import RunState
    from mhd.store import Store

    store = Store(cfg.db_path_url, create=False)
    try:
        run = store.active_run()
    finally:
        store.close()
    if run is None or run.state is not RunState.FETCHING:
        return None
    files = fetch_plan(cfg.runs_dir / run.id)
    if files is None:
        return None
    out = cfg.runs_dir / run.id / "output"
    return run.id, bytes_to_fetch(out, files), sum(f.size or 0 for f in files)


def _unit(cfg: Config) -> Check:
    found = next((p for p in UNIT_PATHS if p.exists()), None)
    if found is None:
        return Check("systemd unit", None, "mhd.service not installed (fine for a foreground run)",
                     "see README: install systemd/mhd.service")
    return Check("systemd unit", True, str(found))


CHECKS: tuple[Callable[[Config], Check], ...] = (_memory_dir, _state_dir, _db, _api_key, _ssh_key, _provider,
                                                 _ollama, _disk, _unit)


def run_checks(config_path: Path | None) -> int:
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"✗ config        {exc}")
        return 1
    click.echo("✓ config        valid")
    failed = 0
    for fn in CHECKS:
        try:
            c = fn(cfg)
        except Exception as exc:
            c = Check(fn.__name__.strip("_"), False, f"check crashed: {exc}")
        mark = {True: "✓", False: "✗", None: "·"}[c.ok]
        line = f"{mark} {c.name:<13} {c.detail}"
        if c.ok is False and c.fix:
            line += f"  → fix: {c.fix}"
        click.echo(line)
        failed += c.ok is False
    return 1 if failed else 0
