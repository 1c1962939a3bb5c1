"""The purge: a forgotten memory leaves every model and every file mhd made from it.

What holds a forgotten memory (``store.forgotten_keys(pending_only=True)``):
- a **model** whose run (or an ancestor, for incremental runs) trained on it: its Ollama model or
  merged directory is deleted, after the alias is moved to the newest model that is clean (or
  removed when none is);
- a **run folder** whose dataset had it, as training or held-out sample: everything in it goes
  (dataset, eval set and report, adapter, GGUF, checkpoints) except ``run.log``, which holds no
  memory text; the run's row and journal stay, marked ``purged``. A run that only *held it out*
  keeps its model (the weights never saw it) and loses only its eval files;
- a **copy** of an affected adapter in a later run's ``input/current_adapter`` (the gate's
  comparison), and the local provider's pod folders under ``state_dir``.

Idempotent: a purge cut short is finished by the next one. The active run is left alone (it is
being cancelled; the next purge takes its folder).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mhd.config import Config
from mhd.errors import MergeError
from mhd.store import HELDOUT, TRAIN, ModelRecord, Store

if TYPE_CHECKING:  # an idle daemon's status imports this module: no httpx until a purge runs
    import httpx

log = logging.getLogger("mhd.purge")
Log = Callable[[str], None]
KEEP = {"run.log"}


@dataclass
class PurgeReport:
    models_removed: list[str] = field(default_factory=list)
    runs_purged: list[str] = field(default_factory=list)
    runs_scrubbed: list[str] = field(default_factory=list)  # held out only: eval files removed
    alias: str | None = None  # where the alias points now ("" = removed), None = untouched
    resolved: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.models_removed)} model(s) removed", f"{len(self.runs_purged)} run folder(s) purged"]
        if self.runs_scrubbed:
            parts.append(f"{len(self.runs_scrubbed)} eval set(s) scrubbed")
        if self.alias is not None:
            parts.append(f"alias → {self.alias}" if self.alias else "alias removed (no clean model left)")
        if self.errors:
            parts.append(f"{len(self.errors)} error(s), retried next time: " + "; ".join(self.errors))
        return ", ".join(parts)


def affected_models(store: Store) -> list[ModelRecord]:
    """Registered models that still exist and contain a forgotten memory not yet purged."""
    pending = store.forgotten_keys(pending_only=True)
    if not pending:
        return []
    return [m for m in store.models() if store.model_keys(m.run_id) & pending]


def forget_view(store: Store, policy: str) -> dict[str, object]:
    """`mhd status --json`'s ``forget``: what is still to be removed."""
    pending = store.forgotten_keys(pending_only=True)
    return {"pending": len(pending), "models_affected": [m.name for m in affected_models(store)] if pending else [],
            "policy": policy}


def forgotten_note(store: Store, run_id: str) -> str | None:
    """Names the forgotten memories inside a run's model (for refusals), or None."""
    inside = store.forgotten_in(run_id)
    if not inside:
        return None
    rows = {r.key: r for r in store.lineage(run_id)}
    named = []
    for key in sorted(inside)[:3]:
        r = rows.get(key)
        named.append(f"{key[:12]} ({r.mtype or '?'}, {r.mdate or 'undated'})" if r else key[:12])
    more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
    return f"it contains {len(inside)} forgotten memory(ies): {', '.join(named)}{more}"


async def purge(cfg: Config, store: Store, *, say: Log | None = None,
                transport: httpx.AsyncBaseTransport | None = None) -> PurgeReport:
    report = PurgeReport()
    pending = store.forgotten_keys(pending_only=True)
    if not pending:
        return report
    note = say or (lambda line: log.info("purge: %s", line))
    active = store.active_run()
    doomed = affected_models(store)
    if doomed:
        await _remove_models(cfg, store, doomed, report, note, transport)
    holding = store.runs_holding(pending)
    for run_id in store.chain_holding(pending):  # incremental runs: inherited through the parent's adapter
        holding.setdefault(run_id, set()).add(TRAIN)
    live_clean = {m.run_id for m in store.models()}  # what is left alive is clean now
    for run_id, roles in sorted(holding.items()):
        if active is not None and run_id == active.id:
            continue
        if roles == {HELDOUT} and run_id in live_clean:
            _scrub_eval(cfg, run_id)
            _drop_pod_folders(cfg, store, run_id)
            store.drop_lineage(run_id, pending)
            report.runs_scrubbed.append(run_id)
            note(f"run {run_id}: held out a forgotten memory; its eval files removed, its model kept")
            continue
        _purge_folder(cfg, store, run_id)
        store.mark_purged(run_id)
        store.add_event(run_id, "purged", "its files (and model) removed: it held a forgotten memory")
        report.runs_purged.append(run_id)
        note(f"run {run_id}: files removed")
    _drop_adapter_copies(cfg, {*report.runs_purged, *(m.run_id for m in doomed)})
    report.resolved = store.resolve_forgotten()
    store.compact()
    return report


async def _remove_models(cfg: Config, store: Store, doomed: list[ModelRecord], report: PurgeReport,
                         note: Log, transport: httpx.AsyncBaseTransport | None) -> None:
    from mhd.merge.registry import KIND_PEFT, models_dir, remove_alias, repoint_alias

    names = {m.name for m in doomed}
    clean = [m for m in store.models() if m.name not in names]
    if any(m.active for m in doomed):
        # First the alias, so that whoever chats with <prefix>:latest never meets a model being deleted.
        kind = next(m.kind for m in doomed if m.active)
        target = next((m for m in reversed(clean) if m.kind == kind), None)
        try:
            if target is not None:
                await repoint_alias(cfg, target, transport=transport)
                store.set_active_model(target.name)
                report.alias = target.name
            else:
                await remove_alias(cfg, kind, transport=transport)
                report.alias = ""
        except MergeError as exc:
            report.errors.append(f"alias: {exc}")
            return  # never delete the model the alias still serves
        note(f"alias → {target.name}" if target else "alias removed: no model without the forgotten memory is left")
    for m in doomed:
        try:
            if m.kind == KIND_PEFT:
                path = Path(m.name)
                if path.resolve().is_relative_to(models_dir(cfg).resolve()):
                    shutil.rmtree(path, ignore_errors=True)
            else:
                await _delete_ollama(cfg, m.name, transport)
        except MergeError as exc:
            report.errors.append(f"{m.name}: {exc}")
            continue
        store.mark_model_deleted(m.name)
        report.models_removed.append(m.name)
        note(f"model {m.name} removed")


async def _delete_ollama(cfg: Config, name: str, transport: httpx.AsyncBaseTransport | None) -> None:
    from mhd.merge.ollama import OllamaClient

    if not cfg.merge.ollama_url:
        raise MergeError("merge.ollama_url is not set: cannot reach Ollama to delete the model")
    async with OllamaClient(cfg.merge.ollama_url, transport=transport) as client:
        await client.delete(name, missing_ok=True)


def _purge_folder(cfg: Config, store: Store, run_id: str) -> None:
    folder = cfg.runs_dir / run_id
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name in KEEP:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    _drop_pod_folders(cfg, store, run_id)


def _drop_pod_folders(cfg: Config, store: Store, run_id: str) -> None:
    # The local provider's "pod" (demo, tests) keeps its uploaded copy under state_dir.
    pods_root = cfg.local_root / "runs"
    for pod in store.pods():
        if pod.run_id == run_id and (pods_root / pod.name).is_dir():
            shutil.rmtree(pods_root / pod.name, ignore_errors=True)


def _scrub_eval(cfg: Config, run_id: str) -> None:
    folder = cfg.runs_dir / run_id
    for rel in ("input/eval.jsonl", "output/eval.json", "output/eval.json.partial"):
        (folder / rel).unlink(missing_ok=True)


def _drop_adapter_copies(cfg: Config, runs: set[str]) -> None:
    """A later run's copy of an affected adapter (uploaded for the gate's comparison) goes too."""
    if not runs or not cfg.runs_dir.is_dir():
        return
    for conf in cfg.runs_dir.glob("*/input/config.json"):
        try:
            src = json.loads(conf.read_text()).get("evaluate", {}).get("current_run")
        except (OSError, ValueError, AttributeError):
            continue
        if src in runs:
            shutil.rmtree(conf.parent / "current_adapter", ignore_errors=True)
        try:
            start = json.loads(conf.read_text()).get("init_run")
        except (OSError, ValueError, AttributeError):
            continue
        if start in runs:  # an incremental run's start weights (when not the gate's copy above)
            shutil.rmtree(conf.parent / "start_adapter", ignore_errors=True)
