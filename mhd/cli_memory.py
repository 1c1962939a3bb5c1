"""`mhd lineage`, `mhd memory`, `mhd forget`: which memories are inside which model, and taking one back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from mhd.cli_common import EXIT_CONFIG, EXIT_FAIL, _cfg, _die, _store
from mhd.config import Config


def _run_for(cfg: Config, store: Any, ref: str) -> tuple[Any, str | None]:
    """RUN (id or unique prefix) or MODEL (a registered name, or the alias) → (run, model name)."""
    from mhd.merge.registry import alias_name

    models = store.models(include_deleted=True)
    if ref == alias_name(cfg.merge.model_prefix) or ref == "latest":
        active = [m for m in models if m.active]
        if not active:
            _die(f"{ref}: no model is active", EXIT_FAIL)
        return store.get_run(active[-1].run_id), active[-1].name
    named = [m for m in models if m.name == ref or m.name == ref.removesuffix(":latest")]
    if named:
        return store.get_run(named[-1].run_id), named[-1].name
    run = store.get_run(ref) or store.find_run(ref)
    if run is None:
        _die(f"no run or model {ref!r} (`mhd runs` lists runs and their models)", EXIT_FAIL)
    return run, run.model_name


@click.command()
@click.argument("ref", metavar="RUN|MODEL")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def lineage(ctx: click.Context, ref: str, as_json: bool) -> None:
    """The memories inside a run's model: key, role (train / heldout), type, date, path if still known."""
    cfg = _cfg(ctx)
    store = _store(cfg)
    run, model = _run_for(cfg, store, ref)
    forgotten = store.forgotten_keys()
    rows = [{"key": r.key, "role": r.role, "type": r.mtype, "date": r.mdate,
             "path": next(iter(store.paths_of(r.key)), None), "forgotten": r.key in forgotten}
            for r in store.lineage(run.id)]
    chain = store.run_chain(run.id)
    # An incremental run's model also holds what its ancestors trained on (its start weights).
    own = {r["key"] for r in rows if r["role"] == "train"}
    inherited = [{"key": r.key, "run_id": parent, "type": r.mtype, "date": r.mdate,
                  "path": next(iter(store.paths_of(r.key)), None), "forgotten": r.key in forgotten}
                 for parent in chain[1:] for r in store.lineage(parent) if r.role == "train" and r.key not in own]
    data = {"run_id": run.id, "model": model, "parents": chain[1:], "purged": run.purged_at is not None,
            "train": sum(r["role"] == "train" for r in rows), "heldout": sum(r["role"] == "heldout" for r in rows),
            "memories": rows, "inherited": inherited, "model_memories": len(store.model_keys(run.id))}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# run {run.id}" + (f", model {model}" if model else "") + (" (purged)" if data["purged"] else "")
               + f": {data['train']} trained, {data['heldout']} held out"
               + (f", started from {' ← '.join(chain[1:])} ({len(inherited)} memories inherited)" if chain[1:] else ""))
    for r in rows:
        mark = "  FORGOTTEN" if r["forgotten"] else ""
        click.echo(f"{r['role']:<8} {r['key'][:16]}  {r['type'] or '?':<16} {r['date'] or '-':<25} "
                   f"{r['path'] or '(file gone)'}{mark}")


def _key_of(cfg: Config, store: Any, path: Path) -> str:
    from mhd.dataset.memories import content_key_of

    p = path.expanduser()
    key = content_key_of(p) if p.is_file() else None
    key = key or store.memory_file_key(str(p.resolve() if p.exists() else p.absolute()))
    if key is None:
        why = "is not a memory file mhd can read" if p.exists() else "is gone and mhd never saw it"
        _die(f"{path} {why}: give the memory's key instead (`mhd lineage RUN` lists keys)", EXIT_FAIL)
    return str(key)


@click.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--key", help="The memory's key, for a file that is gone.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def memory(ctx: click.Context, path: Path | None, key: str | None, as_json: bool) -> None:
    """Which runs, and which still existing models, contain this memory."""
    cfg = _cfg(ctx)
    store = _store(cfg)
    if (path is None) == (key is None):
        _die("give PATH or --key KEY", EXIT_CONFIG)
    key = key or _key_of(cfg, store, path)  # type: ignore[arg-type]
    runs = []
    for r in store.runs_with(key):
        run = store.get_run(r.run_id)
        runs.append({"run_id": r.run_id, "role": r.role, "outcome": run.outcome.value if run and run.outcome else None,
                     "purged": bool(run and run.purged_at)})
    models = [{"name": m.name, "run_id": m.run_id, "active": m.active}
              for m in store.models() if key in store.model_keys(m.run_id)]
    forgotten = next((f for f in store.forgotten() if f.key == key), None)
    data = {"key": key, "paths": store.paths_of(key), "runs": runs, "models": models,
            "forgotten": None if forgotten is None else {"reason": forgotten.reason, "at": forgotten.at,
                                                          "purged_at": forgotten.purged_at}}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"memory {key}" + (f" (forgotten: {forgotten.reason})" if forgotten else ""))
    click.echo("runs:   " + (", ".join(f"{r['run_id']} ({r['role']}{', purged' if r['purged'] else ''})"
                                      for r in runs) or "none"))
    click.echo("models: " + (", ".join(m["name"] + (" (active)" if m["active"] else "") for m in models) or "none"))


@click.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--key", help="The memory's key (works for a file that is already gone).")
@click.option("--purge", is_flag=True, help="Remove every model and file holding a forgotten memory, now.")
@click.pass_context
def forget(ctx: click.Context, path: Path | None, key: str | None, purge: bool) -> None:
    """Take a memory back: it is never trained on again and leaves every model mhd made.

    With ``[forget] policy = "retrain"`` the daemon retrains without it, then removes the models
    and files that hold it; with ``"flag"``, or with --purge, they are removed when you say so.
    """
    from mhd.daemon.client import DaemonNotRunning, request

    cfg = _cfg(ctx)
    store = _store(cfg)
    if path is None and key is None and not purge:
        _die("give PATH, --key KEY, or --purge", EXIT_CONFIG)
    if path is not None or key is not None:
        key = key or _key_of(cfg, store, path)  # type: ignore[arg-type]
        try:
            resp = request(cfg.socket_path, "forget", keys=[key])
        except (DaemonNotRunning, OSError):
            resp = {"ok": True, "forgotten": store.forget({key: "owner"}), "policy": cfg.forget.policy}
        holders = [m.name for m in store.models() if key in store.model_keys(m.run_id)]
        click.echo(f"memory {key[:16]}: " + ("forgotten" if resp.get("forgotten") else "was forgotten already")
                   + (f"; inside {', '.join(holders)}" if holders else "; inside no model"))
        if holders and not purge:
            click.echo("the daemon retrains without it, then removes those models"
                       if cfg.forget.policy == "retrain" else "`mhd forget --purge` removes those models")
    if purge:
        try:
            resp = request(cfg.socket_path, "purge", timeout=600)
        except (DaemonNotRunning, OSError):
            from mhd.purge import purge as do_purge

            report = asyncio.run(do_purge(cfg, store, say=lambda line: click.echo(f"  {line}")))
            resp = {"ok": not report.errors, "summary": report.summary(), "errors": report.errors}
        click.echo(f"purge: {resp.get('summary')}")
        if not resp.get("ok"):
            _die("purge incomplete: " + "; ".join(resp.get("errors") or []), EXIT_FAIL)
