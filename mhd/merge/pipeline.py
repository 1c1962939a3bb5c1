"""Merging, daemon side: from a fetched adapter to a model the owner chats with.

Torch-free by rule: the heavy steps run as subprocesses (``python -m mhd.merge.gguf``,
``python -m mhd.merge.peft_merge``); this module imports only the stdlib, httpx and mhd core.

Idempotent at every step, so the Merging state can simply call :func:`merge_run` again after a
crash: the GGUF is reused when present (written atomically), the blob upload is skipped when the
server has the digest, ``/api/create`` is skipped when the model already exists, the alias copy
and the store writes are plain overwrites. A failure anywhere before the alias copy leaves the
alias on the previous model and the adapter on disk.

Route (``ollama`` mode), from Ollama's version: before 0.34.1 the adapter is converted to a GGUF
LoRA and attached to ``merge.base`` through ``/api/create``'s ``adapters``; from 0.34.1 Ollama
refuses adapters, so the model must be a merged GGUF built on the pod (``model.gguf`` next to
the adapter, see ``mhd/pod/export.py``) and is registered with ``files``, ``merge.template``
(unset: Ollama derives the template from the GGUF) and ``dataset.system_prompt``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

import mhd
from mhd.config import Config
from mhd.errors import MergeError
from mhd.merge.ollama import Log, OllamaClient, OllamaError, normalize_name
from mhd.merge.registry import (
    KIND_OLLAMA,
    KIND_PEFT,
    alias_name,
    check_prefix,
    cleanup_ollama,
    cleanup_peft,
    models_dir,
    name_for_run,
    point_latest,
)
from mhd.store import Store

ADAPTERS_REFUSED_FROM = (0, 34, 1)  # Ollama PR #14969: create with ADAPTER/adapters removed
ADAPTER_GGUF = "adapter.gguf"
MERGED_GGUF = "model.gguf"
BASE_CONFIG = "base_config.json"  # a copy of the base's config.json, shipped beside the adapter
PEFT_DONE = "mhd_merge.json"  # written last by peft_merge: its presence means the dir is complete
SMOKE_PROMPT = "Say hello in one short sentence."


# Route -------------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.match(r"^\s*v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def route_for_version(version: str) -> str:
    """``adapter`` for Ollama < 0.34.1, else ``merged``.

    Builds from source report 0.0.0 and unknown strings say nothing: treat both as current
    Ollama (the adapter route would be refused there).
    """
    v = parse_version(version)
    if v is None or v == (0, 0, 0):
        return "merged"
    return "adapter" if v < ADAPTERS_REFUSED_FROM else "merged"


async def ollama_route(cfg: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> str:
    """``adapter`` | ``merged`` | ``none`` (no Ollama configured: ship the adapter only)."""
    m = cfg.merge
    if m.effective_mode != "ollama" or not m.ollama_url:
        return "none"
    if m.route != "auto":
        return m.route
    async with OllamaClient(m.ollama_url, transport=transport) as client:
        return route_for_version(await client.version())


# Subprocesses ------------------------------------------------------------------------------------
def tool_env() -> dict[str, str]:
    """The environment of a merge subprocess (and of preflight's import probe, which must match it)."""
    env = dict(os.environ)
    root = str(Path(mhd.__file__).resolve().parent.parent)  # importable even when not installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


async def run_tool(module: str, args: Sequence[str], log: Log, *, what: str) -> list[str]:
    """Run ``python -m module args``; stream its output lines to ``log``; MergeError on failure.

    Returns stdout lines. The child is killed if we are cancelled (daemon shutdown).
    """
    env = tool_env()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
    except OSError as exc:
        raise MergeError(f"{what}: cannot start {sys.executable} -m {module}: {exc}") from exc
    out: list[str] = []
    err: list[str] = []

    async def pump(stream: asyncio.StreamReader | None, sink: list[str]) -> None:
        assert stream is not None
        async for raw in stream:
            for line in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                if line.strip():
                    sink.append(line.rstrip())
                    log(line.rstrip())

    try:
        await asyncio.gather(pump(proc.stdout, out), pump(proc.stderr, err))
        rc = await proc.wait()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if rc != 0:
        reason = next((ln.removeprefix("error: ") for ln in reversed(err) if ln.startswith("error: ")), None)
        if reason is None:
            reason = " | ".join(err[-5:]) or "no output"
        raise MergeError(f"{what} failed (exit {rc}): {reason}")
    return out


# Inputs ------------------------------------------------------------------------------------------
def _require_adapter(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(
            f"no PEFT adapter at {adapter_dir} (adapter_config.json missing): was the run's adapter "
            "fetched? `mhd runs` shows the run's state"
        )


def _hf_cache_roots() -> list[Path]:
    roots: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return roots


def find_base_config(cfg: Config, adapter_dir: Path) -> Path:
    """The base model's config.json, found locally (the daemon never downloads the base)."""
    tried: list[Path] = [adapter_dir / BASE_CONFIG, adapter_dir.parent / BASE_CONFIG]
    for ref in (cfg.merge.base_model_path, cfg.training.base_model):
        if ref:
            p = Path(ref).expanduser()
            tried.append(p if p.suffix == ".json" else p / "config.json")
    repo_ids = [cfg.training.base_model]
    try:
        named = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if isinstance(named, str) and named:
            repo_ids.insert(0, named)
    except (OSError, ValueError):
        pass
    for repo in repo_ids:
        if repo.count("/") == 1 and not Path(repo).exists():
            for root in _hf_cache_roots():
                snaps = root / f"models--{repo.replace('/', '--')}" / "snapshots"
                tried.extend(sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True))
    for p in tried:
        if p.is_file():
            return p
    raise MergeError(
        f"the base model's config.json is needed to convert the adapter and none was found (looked at: "
        f"{', '.join(str(p) for p in tried[:5])}). Put a copy at {adapter_dir / BASE_CONFIG} or set "
        "merge.base_model_path to a local copy of the base"
    )


def merged_gguf(adapter_dir: Path) -> Path | None:
    for p in (adapter_dir.parent / MERGED_GGUF, adapter_dir / MERGED_GGUF):
        if p.is_file():
            return p
    return None


def export_error(adapter_dir: Path) -> str | None:
    """Why the pod built no merged GGUF, as its manifest recorded it (None: no export was asked)."""
    try:
        export = json.loads((adapter_dir.parent / "manifest.json").read_text()).get("export")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(export, dict) and export.get("enabled") and export.get("error"):
        return str(export["error"])
    return None


async def ensure_adapter_gguf(cfg: Config, adapter_dir: Path, log: Log) -> Path:
    """``adapter.gguf`` beside the adapter dir; converted once (the converter writes atomically)."""
    out = adapter_dir.parent / ADAPTER_GGUF
    weights = adapter_dir / "adapter_model.safetensors"
    if out.is_file() and weights.is_file() and out.stat().st_mtime >= weights.stat().st_mtime:
        log(f"{out.name} already converted: reusing it")
        return out
    base_cfg = find_base_config(cfg, adapter_dir)
    log(f"converting the adapter to GGUF LoRA (base config {base_cfg})")
    await run_tool("mhd.merge.gguf", ["--adapter", str(adapter_dir), "--base-config", str(base_cfg),
                                      "--out", str(out), "--outtype", "f16"], log, what="GGUF LoRA conversion")
    return out


# Ollama mode -------------------------------------------------------------------------------------
async def _register(cfg: Config, client: OllamaClient, route: str, name: str, adapter_dir: Path,
                    version: str, log: Log) -> None:
    m = cfg.merge
    if route == "adapter":
        _require_adapter(adapter_dir)
        if not m.base:
            raise MergeError(
                "merge.base must name the Ollama model the adapter was trained on (e.g. \"qwen3:8b\" "
                f"for {cfg.training.base_model})"
            )
        if not await client.has_model(m.base):
            raise MergeError(
                f"base model {m.base!r} is not in Ollama at {m.ollama_url}: run `ollama pull {m.base}` "
                f"(it must be the model the adapter was trained on: {cfg.training.base_model})"
            )
        gguf = await ensure_adapter_gguf(cfg, adapter_dir, log)
        digest = await client.push_blob(gguf, log=log)
        try:
            await client.create(name, from_=m.base, adapters={ADAPTER_GGUF: digest}, log=log)
        except OllamaError as exc:
            if "no longer supported" in (exc.server_message or ""):
                raise MergeError(
                    f"Ollama {version} at {m.ollama_url} refuses LoRA adapters (removed in 0.34.1): set "
                    "merge.route = \"merged\" so the pod builds a merged GGUF, or run an older Ollama"
                ) from exc
            raise
        return
    gguf_path = merged_gguf(adapter_dir)
    if gguf_path is None:
        failed = export_error(adapter_dir)
        why = (f"the pod's export failed: {failed}" if failed else
               "the run's pod did not build one (it was told to ship the adapter only: the route was chosen "
               "when the run started)")
        raise MergeError(
            f"Ollama {version} takes only merged models (adapters were removed in 0.34.1), and no merged "
            f"GGUF ({MERGED_GGUF}) is in {adapter_dir.parent}: {why}. The adapter is kept; use "
            "merge.mode = \"peft\", or register it with an Ollama older than 0.34.1 (merge.route = \"adapter\"); "
            "the next run builds the merged model"
        )
    size = gguf_path.stat().st_size
    log(f"registering the merged model {gguf_path} "
        + (f"({size / 1e9:.2f} GB)" if size >= 1e8 else f"({size / 1e6:.2f} MB)"))
    digest = await client.push_blob(gguf_path, log=log)
    await client.create(name, files={MERGED_GGUF: digest}, template=m.template, system=cfg.dataset.system_prompt,
                        log=log)


async def _merge_ollama(cfg: Config, store: Store, run_id: str, adapter_dir: Path, log: Log,
                        transport: httpx.AsyncBaseTransport | None) -> str:
    m = cfg.merge
    if not m.ollama_url:
        raise MergeError("merge.mode = \"ollama\" needs merge.ollama_url (e.g. \"http://127.0.0.1:11434\")")
    alias = alias_name(check_prefix(m.model_prefix))
    name = name_for_run(cfg, store, run_id)
    recorded = any(r.name == name for r in store.models())
    async with OllamaClient(m.ollama_url, transport=transport) as client:
        version = await client.version()
        route = m.route if m.route != "auto" else route_for_version(version)
        log(f"Ollama {version} at {m.ollama_url}: {route} route; model {name}")
        if await client.has_model(name):
            log(f"{name} is already in Ollama: not creating it again")
        else:
            await _register(cfg, client, route, name, adapter_dir, version, log)
        try:
            reply = await client.chat(name, [{"role": "user", "content": SMOKE_PROMPT}],
                                      options={"temperature": 0, "num_predict": 24})
        except MergeError as exc:
            if not recorded:  # never served: remove it so a retry starts clean
                try:
                    await client.delete(name)
                except MergeError:
                    pass
            raise MergeError(f"smoke prompt to {name} failed, {alias} left as it was: {exc}") from exc
        log(f"smoke reply: {reply.strip()[:120]!r}" if reply.strip() else "smoke reply: (empty)")
        store.add_model(run_id, name, KIND_OLLAMA)
        await client.copy(name, alias)
        store.set_active_model(name)
        store.add_event(run_id, "merge", f"{name} registered ({route} route); {alias} points at it")
        log(f"{alias} → {name}")
        await cleanup_ollama(cfg, store, client, log)
    return name


# peft mode ---------------------------------------------------------------------------------------
async def _merge_peft(cfg: Config, store: Store, run_id: str, adapter_dir: Path, log: Log) -> str:
    out = models_dir(cfg) / run_id
    if (out / PEFT_DONE).is_file():
        log(f"{out} already merged: reusing it")
    else:
        _require_adapter(adapter_dir)
        base = cfg.merge.base_model_path or cfg.training.base_model
        log(f"merging the adapter into {base} → {out}")
        await run_tool("mhd.merge.peft_merge", ["--adapter", str(adapter_dir), "--base", str(base),
                                                "--out", str(out)], log, what="peft merge")
    name = str(out)
    store.add_model(run_id, name, KIND_PEFT)
    point_latest(cfg, out)
    store.set_active_model(name)
    store.add_event(run_id, "merge", f"merged model at {name}; {models_dir(cfg) / 'latest'} points at it")
    cleanup_peft(cfg, store, log)
    return name


async def merge_run(cfg: Config, store: Store, run_id: str, adapter_dir: Path, log: Log, *,
                    transport: httpx.AsyncBaseTransport | None = None) -> str | None:
    """Make the run's adapter usable; return the model name (peft: its directory), None for mode none."""
    mode = cfg.merge.effective_mode
    if mode == "none":
        return None
    adapter_dir = Path(adapter_dir)
    if mode == "peft":
        return await _merge_peft(cfg, store, run_id, adapter_dir, log)
    return await _merge_ollama(cfg, store, run_id, adapter_dir, log, transport)


__all__ = ["merge_run", "normalize_name", "ollama_route", "route_for_version"]
