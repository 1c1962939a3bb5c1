"""`mhd daemon|status|train|cancel|runs|logs|merge|promote|eval|rollback|dataset|doctor|lineage|memory|forget`.

Exit codes: 0 ok, 1 a command failed, 2 bad config or usage, 3 the daemon is not running.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from mhd.cli_common import EXIT_CONFIG, EXIT_FAIL, _ask, _cfg, _die, _store
from mhd.config import Config
from mhd.errors import ConfigError, MhdError


@click.group()
@click.option("--config", "config_path", type=click.Path(path_type=Path), envvar="MHD_CONFIG",
              help="Config file (default: $XDG_CONFIG_HOME/mhd/config.toml, else /etc/mhd/config.toml).")
@click.version_option(package_name="mhd")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """mhd keeps a personal model in step with its owner's memories."""
    ctx.ensure_object(dict)["config_path"] = config_path


@main.command()
@click.pass_context
def daemon(ctx: click.Context) -> None:
    """Run the daemon in the foreground (what systemd runs)."""
    cfg = _cfg(ctx)
    from mhd.daemon.service import run_daemon

    try:
        sys.exit(run_daemon(cfg, ctx.ensure_object(dict).get("config_path")))
    except ConfigError as exc:
        _die(str(exc), EXIT_CONFIG)
    except MhdError as exc:
        _die(str(exc), EXIT_FAIL)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Live view with a progress bar (Ctrl-C to leave).")
@click.option("--interval", default=1.0, show_default=True, help="Refresh interval for --watch.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: bool, interval: float) -> None:
    """What the daemon is doing now."""
    cfg = _cfg(ctx)
    from mhd.render import render_status

    if as_json:
        click.echo(json.dumps(_ask(cfg, "status")["status"], indent=2))
        return
    if not watch:
        from rich.console import Console

        Console().print(render_status(_ask(cfg, "status")["status"]))
        return
    from rich.live import Live

    with Live(render_status(_ask(cfg, "status")["status"]), refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render_status(_ask(cfg, "status")["status"]))
        except KeyboardInterrupt:
            pass


@main.command()
@click.pass_context
def train(ctx: click.Context) -> None:
    """Start a retraining run now (whatever the threshold says)."""
    resp = _ask(_cfg(ctx), "train")
    if not resp.get("ok"):
        _die(resp.get("error", "could not start a run"), EXIT_FAIL)
    click.echo(f"run {resp['run_id']} started")


@main.command()
@click.pass_context
def cancel(ctx: click.Context) -> None:
    """Cancel the active run: its pod is terminated, the outcome recorded as cancelled."""
    resp = _ask(_cfg(ctx), "cancel")
    if not resp.get("ok"):
        _die(resp.get("error", "nothing cancelled"), EXIT_FAIL)
    click.echo(f"run {resp['run_id']}: cancelling (pod will be terminated)")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def runs(ctx: click.Context, as_json: bool, limit: int) -> None:
    """Run history (read from the DB; works without the daemon)."""
    from mhd.render import render_runs
    from mhd.views import runs_list

    data = runs_list(_store(_cfg(ctx)), limit)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        Console().print(render_runs(data))


def _find_run(cfg: Config, run_id: str | None) -> Any:
    store = _store(cfg)
    run = store.last_run() if run_id is None else store.get_run(run_id) or store.find_run(run_id)
    if run is None:
        _die(f"no run {run_id or '(none yet)'} in {cfg.db_path_url}", EXIT_FAIL)
    return run


@main.command()
@click.argument("run_id", required=False)
@click.option("--lines", "-n", default=200, show_default=True, help="Lines of the trainer log to show.")
@click.pass_context
def logs(ctx: click.Context, run_id: str | None, lines: int) -> None:
    """The run's journal, its log and the tail of the trainer's log."""
    cfg = _cfg(ctx)
    run = _find_run(cfg, run_id)
    store = _store(cfg)
    click.echo(f"# run {run.id} ({run.state.value}, {run.outcome.value if run.outcome else 'active'})")
    for t in store.journal(run.id):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.at))
        click.echo(f"{when}  {t.from_state.value:>12} → {t.to_state.value:<12} {t.reason}")
    for name in ("run.log", "train.log"):
        path = cfg.runs_dir / run.id / name
        if path.exists():
            click.echo(f"\n# {name}")
            text = path.read_text(errors="replace").splitlines()
            click.echo("\n".join(text[-lines:] if name == "train.log" else text))


def _merge_or_promote(cfg: Config, run_id: str, cmd: str) -> dict[str, Any]:
    """Ask the daemon (one merge at a time; its retrier stops once merged), else do it here."""
    from mhd.daemon.client import DaemonNotRunning, request

    run = _find_run(cfg, run_id)
    try:
        resp = request(cfg.socket_path, cmd, timeout=3600, run_id=run.id)
    except (DaemonNotRunning, OSError):
        resp = asyncio.run(_merge_here(cfg, run.id, cmd))
    for line in resp.get("log") or []:
        click.echo(f"  {line}")
    if not resp.get("ok"):
        _die(f"{cmd} of run {run.id} failed: {resp.get('error')}", EXIT_FAIL)
    return resp


async def _merge_here(cfg: Config, run_id: str, cmd: str) -> dict[str, Any]:
    """`mhd merge` / `mhd promote` without a running daemon: the same attempt, in this process."""
    from mhd.daemon.merges import MergeRetrier

    retrier = MergeRetrier(cfg, _store(cfg), asyncio.Lock(), lambda keys: None)
    return await (retrier.promote(run_id) if cmd == "promote" else retrier.attempt(run_id))


@main.command()
@click.argument("run_id")
@click.pass_context
def merge(ctx: click.Context, run_id: str) -> None:
    """Retry merging a run's fetched adapter now (e.g. after `merge_failed`); never retrains."""
    resp = _merge_or_promote(_cfg(ctx), run_id, "merge")
    note = f" ({resp['note']})" if resp.get("note") else ""
    click.echo(f"run {resp.get('run_id')}: model {resp.get('model')}{note}")


@main.command()
@click.argument("run_id")
@click.pass_context
def promote(ctx: click.Context, run_id: str) -> None:
    """Register a run the quality gate rejected (your call: the gate's numbers said it is worse)."""
    resp = _merge_or_promote(_cfg(ctx), run_id, "promote")
    click.echo(resp.get("note") or f"run {resp.get('run_id')}: promoted, model {resp.get('model')}")


@main.command(name="eval")
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def eval_cmd(ctx: click.Context, run_id: str | None, as_json: bool) -> None:
    """The quality gate's numbers for a run, its decision, and base vs new answers side by side."""
    cfg = _cfg(ctx)
    run = _find_run(cfg, run_id)
    from mhd.quality.gate import eval_view
    from mhd.states.merging import fetched_eval

    view = eval_view(run)
    ev = fetched_eval(cfg, run.id) or {}
    if as_json:
        click.echo(json.dumps({"run_id": run.id, "eval": view, "generations": ev.get("generations") or []}, indent=2))
        return
    if view is None:
        _die(f"run {run.id} has no evaluation (it did not reach Merging, or predates the gate)", EXIT_FAIL)
    click.echo(f"# run {run.id}: {view['decision']}")
    click.echo(view["reason"])
    for name in ("heldout", "probe"):
        cells = [f"{k} {view.get(f'{name}_nll_{k}'):.4f}" for k in ("base", "current", "new")
                 if view.get(f"{name}_nll_{k}") is not None]
        click.echo(f"{name:>8} (n={view.get(f'{name}_count')}): " + (", ".join(cells) or "-"))
    for g in ev.get("generations") or []:
        click.echo(f"\n> {g.get('prompt')}\n  base: {g.get('base')}\n  new:  {g.get('new')}")


@main.command()
@click.argument("run_id", required=False)
@click.pass_context
def rollback(ctx: click.Context, run_id: str | None) -> None:
    """Point the alias back at the previous (or the named) run's model."""
    cfg = _cfg(ctx)
    from mhd.merge import rollback as do_rollback

    if run_id is not None:
        run_id = _find_run(cfg, run_id).id
    try:
        name = asyncio.run(do_rollback(cfg, _store(cfg), run_id))
    except MhdError as exc:
        _die(str(exc), EXIT_FAIL)
    click.echo(f"{cfg.merge.model_prefix}:latest now points at {name}")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write into.")
@click.pass_context
def dataset(ctx: click.Context, out: Path) -> None:
    """Build the training dataset from memory_dir without training (for inspection)."""
    cfg = _cfg(ctx)
    from mhd.dataset.build import build_dataset

    try:
        manifest = build_dataset(cfg.memory_dir, out, cfg.dataset)
    except MhdError as exc:
        _die(str(exc), EXIT_FAIL)
    click.echo(f"{manifest['samples']} samples from {manifest['memories_read']} memories → {out}/dataset.jsonl")
    for reason, n in sorted((manifest.get("rejects") or {}).items()):
        click.echo(f"  rejected {n:>5}  {reason}")


@main.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check the setup; one line per check, with a fix for each failure."""
    obj = ctx.ensure_object(dict)
    from mhd.doctor import run_checks

    sys.exit(run_checks(obj.get("config_path")))


def _late_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:  # after the subcommand wins over before it (the last one typed)
        ctx.ensure_object(dict)["config_path"] = value
        ctx.obj.pop("cfg", None)


def _accept_global_options_anywhere() -> None:
    """`mhd status --config X` as well as `mhd --config X status`: people type both."""
    for cmd in main.commands.values():
        cmd.params.append(click.Option(["--config"], type=click.Path(path_type=Path), expose_value=False,
                                       is_eager=True, callback=_late_config,
                                       help="Config file (as before the command)."))


from mhd.cli_memory import forget, lineage, memory  # noqa: E402  (they use the helpers above)

for _cmd in (lineage, memory, forget):
    main.add_command(_cmd)
_accept_global_options_anywhere()

if __name__ == "__main__":
    main()
