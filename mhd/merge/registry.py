"""Which models mhd made, what the alias points at, keep-N cleanup and rollback.

The Store's ``models`` table is the authority on what mhd created: cleanup only ever deletes
models recorded there (never the owner's own models, never the base, never the alias), and a
model is recorded only after it answered the smoke prompt — so every record is a model worth
rolling back to.

Names: ``<prefix>-<YYYYMMDD>-<run-id>`` (the date is the run's creation day, so a retry after
midnight derives the same name) and the alias ``<prefix>:latest``. For ``peft`` mode the "name" is
the merged model's directory and the alias is the symlink ``<state_dir>/models/latest``.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import httpx

from mhd.config import Config
from mhd.errors import MergeError
from mhd.merge.ollama import Log, OllamaClient, normalize_name
from mhd.store import ModelRecord, Store

KIND_OLLAMA = "ollama"
KIND_PEFT = "peft"
LATEST_LINK = "latest"

# Ollama model names: optional namespace path, then a name; tags are ours to add.
_PREFIX = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?$")


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise MergeError(
            f"merge.model_prefix = {prefix!r} is not usable in an Ollama model name: use lowercase "
            "letters, digits, '.', '_' and '-' (optionally one 'namespace/')"
        )
    return prefix


def model_name(prefix: str, run_id: str, day: datetime) -> str:
    return f"{prefix}-{day:%Y%m%d}-{run_id}"


def alias_name(prefix: str) -> str:
    return f"{prefix}:latest"


def models_dir(cfg: Config) -> Path:
    return cfg.state_dir / "models"


def name_for_run(cfg: Config, store: Store, run_id: str) -> str:
    """The Ollama name of this run's model: the recorded one, else derived (stable across retries)."""
    for rec in store.models():
        if rec.kind == KIND_OLLAMA and rec.run_id == run_id:
            return rec.name
    run = store.get_run(run_id)
    day = datetime.fromtimestamp(run.created_at, UTC) if run is not None else datetime.now(UTC)
    return model_name(check_prefix(cfg.merge.model_prefix), run_id, day)


def _kind(cfg: Config) -> str:
    mode = cfg.merge.effective_mode
    if mode == "none":
        raise MergeError("merge.mode is \"none\": mhd registers no model, so there is nothing to roll back")
    return KIND_PEFT if mode == "peft" else KIND_OLLAMA


# Keep-N ------------------------------------------------------------------------------------------
def _doomed(records: list[ModelRecord], keep: int) -> list[ModelRecord]:
    keep_names = {r.name for r in records[-keep:]} | {r.name for r in records if r.active}
    return [r for r in records if r.name not in keep_names]


async def cleanup_ollama(cfg: Config, store: Store, client: OllamaClient, log: Log) -> list[str]:
    """Delete mhd's Ollama models beyond the newest ``merge.keep`` (the active one always stays).

    A failed delete is logged, not raised: the new model is already serving, and the next merge
    tries again.
    """
    protected = {normalize_name(alias_name(cfg.merge.model_prefix))}
    if cfg.merge.base:
        protected.add(normalize_name(cfg.merge.base))
    records = [r for r in store.models() if r.kind == KIND_OLLAMA]
    deleted: list[str] = []
    for rec in _doomed(records, cfg.merge.keep):
        if normalize_name(rec.name) in protected:
            continue
        try:
            await client.delete(rec.name, missing_ok=True)
        except MergeError as exc:
            log(f"keep-{cfg.merge.keep} cleanup: could not delete {rec.name} ({exc}); will retry next merge")
            continue
        store.mark_model_deleted(rec.name)
        deleted.append(rec.name)
        log(f"keep-{cfg.merge.keep} cleanup: deleted {rec.name}")
    return deleted


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def cleanup_peft(cfg: Config, store: Store, log: Log) -> list[str]:
    """Remove merged model directories beyond keep-N; only directories under <state_dir>/models."""
    root = models_dir(cfg)
    records = [r for r in store.models() if r.kind == KIND_PEFT]
    deleted: list[str] = []
    for rec in _doomed(records, cfg.merge.keep):
        path = Path(rec.name)
        if not _inside(path, root) or path.resolve() == root.resolve():
            log(f"keep-{cfg.merge.keep} cleanup: {path} is outside {root}; left alone")
            continue
        shutil.rmtree(path, ignore_errors=True)
        store.mark_model_deleted(rec.name)
        deleted.append(rec.name)
        log(f"keep-{cfg.merge.keep} cleanup: removed {path}")
    return deleted


def point_latest(cfg: Config, target: Path) -> Path:
    """Atomically re-point ``<state_dir>/models/latest`` at ``target`` (peft mode's alias)."""
    root = models_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    link = root / LATEST_LINK
    tmp = root / f".{LATEST_LINK}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, root) if _inside(target, root) else str(target), tmp)
    os.replace(tmp, link)
    return link


async def repoint_alias(cfg: Config, target: ModelRecord, *,
                        transport: httpx.AsyncBaseTransport | None = None) -> None:
    """Point the alias at ``target`` (Ollama: copy onto ``<prefix>:latest``; peft: the symlink)."""
    if target.kind == KIND_PEFT:
        point_latest(cfg, Path(target.name))
        return
    if not cfg.merge.ollama_url:
        raise MergeError("merge.ollama_url is not set: cannot reach Ollama to move the alias")
    async with OllamaClient(cfg.merge.ollama_url, transport=transport) as client:
        await client.copy(target.name, alias_name(check_prefix(cfg.merge.model_prefix)))


async def remove_alias(cfg: Config, kind: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
    if kind == KIND_PEFT:
        (models_dir(cfg) / LATEST_LINK).unlink(missing_ok=True)
        return
    if not cfg.merge.ollama_url:
        raise MergeError("merge.ollama_url is not set: cannot reach Ollama to remove the alias")
    async with OllamaClient(cfg.merge.ollama_url, transport=transport) as client:
        await client.delete(alias_name(check_prefix(cfg.merge.model_prefix)), missing_ok=True)


# Rollback ----------------------------------------------------------------------------------------
def _rollback_target(records: list[ModelRecord], run_id: str | None) -> tuple[ModelRecord, ModelRecord | None]:
    current = next((r for r in reversed(records) if r.active), None)
    if run_id:
        matches = [r for r in records if r.run_id == run_id] or [r for r in records if r.run_id.startswith(run_id)]
        if len({r.run_id for r in matches}) > 1:
            raise MergeError(f"run {run_id!r} is ambiguous: give more of the run id (`mhd runs` lists them)")
        if not matches:
            raise MergeError(
                f"no kept model for run {run_id!r}: it was never merged or keep-N cleanup deleted it "
                "(`mhd runs` shows which runs have a model)"
            )
        return matches[-1], current
    anchor = current or records[-1]
    idx = records.index(anchor)
    if idx == 0:
        raise MergeError(
            f"no model older than {anchor.name} is kept, so there is nothing to roll back to "
            "(merge.keep sets how many are kept)"
        )
    return records[idx - 1], current


async def rollback(cfg: Config, store: Store, run_id: str | None = None, *,
                   transport: httpx.AsyncBaseTransport | None = None) -> str:
    """Point the alias at the previous model (or ``run_id``'s); record it; return the name now active."""
    kind = _kind(cfg)
    records = [r for r in store.models() if r.kind == kind]
    if not records:
        raise MergeError("mhd has registered no model yet: nothing to roll back to")
    target, current = _rollback_target(records, run_id)
    from mhd.purge import forgotten_note

    if (why := forgotten_note(store, target.run_id)) is not None:
        raise MergeError(f"refusing to roll back to {target.name} (run {target.run_id}): {why} "
                         "(the owner took it back; `mhd forget --purge` removes that model)")
    if kind == KIND_PEFT:
        path = Path(target.name)
        if not path.is_dir():
            raise MergeError(f"{path} (run {target.run_id}) is gone from disk; cannot roll back to it")
        point_latest(cfg, path)
        where = str(models_dir(cfg) / LATEST_LINK)
    else:
        if not cfg.merge.ollama_url:
            raise MergeError("merge.ollama_url is not set: cannot reach Ollama to move the alias")
        alias = alias_name(check_prefix(cfg.merge.model_prefix))
        async with OllamaClient(cfg.merge.ollama_url, transport=transport) as client:
            if not await client.has_model(target.name):
                raise MergeError(
                    f"{target.name} (run {target.run_id}) is no longer in Ollama at {cfg.merge.ollama_url}; "
                    "pick another run (`mhd rollback RUN`) or re-register it with `mhd merge RUN`"
                )
            await client.copy(target.name, alias)
        where = alias
    store.set_active_model(target.name)
    was = f" (was {current.name})" if current is not None and current.name != target.name else ""
    store.add_event(target.run_id, "rollback", f"{where} → {target.name}{was}")
    return target.name
