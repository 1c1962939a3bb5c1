"""`mhd doctor`: one line per check, each failure with the fix. Exit 1 if any check fails."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import click

from mhd import preflight
from mhd.config import Config, load_config
from mhd.errors import ConfigError
from mhd.preflight import Check
from mhd.store import Store

UNIT_PATHS = (Path("/etc/systemd/system/mhd.service"), Path("/lib/systemd/system/mhd.service"),
              Path("/usr/lib/systemd/system/mhd.service"))


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


def _fetch_disk(cfg: Config) -> Check | None:
    """While a run is fetching (or waiting for room to fetch), the disk check that matters now."""
    from mhd.states.fetching import FREE_MARGIN, free_bytes

    pending = _pending_fetch(cfg)
    if pending is None:
        return None
    d = cfg.state_dir if cfg.state_dir.exists() else Path("/")
    free = free_bytes(d)
    run_id, left, total = pending
    need = left + FREE_MARGIN if left else 0
    detail = (f"{free / 1e9:.1f} GB free under {d}; run {run_id} is fetching {total / 1e9:.1f} GB, "
              f"{left / 1e9:.1f} GB still to download")
    if free >= need:
        return Check("free disk", True, detail)
    return Check("free disk", False, detail + f" (+ {FREE_MARGIN / 1e9:.1f} GB margin): the pod is kept and "
                 "the fetch waits", f"free {(need - free) / 1e9:.1f} GB under {d}; the fetch resumes by itself "
                 f"(the pod stops itself after runpod.max_unattended = {cfg.runpod.max_unattended / 3600:.1f} h)")


def _preflight(cfg: Config) -> list[Check]:
    """The checks a run makes before renting a pod (mhd/preflight.py), once; during a fetch, its disk check."""
    store = _store(cfg)
    try:
        checks = asyncio.run(preflight.run_checks(cfg, store=store, samples=_expected_samples(cfg, store)))
    finally:
        if store is not None:
            store.close()
    fetching = _fetch_disk(cfg)
    return [fetching if fetching is not None and c.name == "free disk" else c for c in checks]


def _store(cfg: Config) -> Store | None:
    if not cfg.db_url and not (cfg.state_dir / "mhd.db").exists():
        return None
    try:
        return Store(cfg.db_path_url, create=False)
    except Exception:
        return None


def _expected_samples(cfg: Config, store: Store | None) -> int:
    """What the next run would train on: the last run's count (the dataset cap bounds it)."""
    last = store.last_run() if store is not None else None
    return min(cfg.dataset.max_samples, (last.samples or 0) if last else cfg.dataset.max_samples)


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


CHECKS: tuple[Callable[[Config], Check | list[Check]], ...] = (_memory_dir, _state_dir, _db, _provider, _preflight,
                                                              _unit)


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
            got = fn(cfg)
        except Exception as exc:
            got = Check(fn.__name__.strip("_"), False, f"check crashed: {exc}")
        for c in got if isinstance(got, list) else [got]:
            click.echo(c.line())
            failed += c.ok is False
    return 1 if failed else 0
