"""Preflight: everything a run needs after training, checked on this machine before a pod is rented.

A run that trains for an hour and then finds ``gguf`` missing has paid for a GPU for nothing,
and — because its memories stay pending — the threshold would rent another pod for the same
data. So before Provisioning creates a pod, these checks run; any failure ends the run
``preflight_failed`` with the check's message and its fix, and no pod exists. ``mhd doctor`` runs
the same checks, so the owner sees the same verdict without starting a run.

Checks (each returns a :class:`Check`; ``ok=None`` means not applicable here):

- ``merge tools``: the Python modules the merge subprocess imports, imported *in the interpreter
  that will run it* (``sys.executable``, with the subprocess's own environment);
- ``Ollama``: reachable, its version's route, and for the adapter route ``merge.base`` pulled;
- ``base model``: for ``merge.mode = "peft"``, the base is on this machine (the merge loads it);
- ``free disk``: room under ``state_dir`` for what the run will download and build;
- ``SSH key`` / ``RunPod API key``: readable and present, for the providers that need them;
- ``budget``: the run is expected to fit ``[budget]`` (estimated from earlier runs' pod time).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mhd.config import Config
from mhd.errors import MhdError, PreflightFailed
from mhd.states.model import Outcome
from mhd.store import Store

GB = 1e9
# What a run downloads/builds when no earlier run says better (per route).
FLOOR_BYTES = {"none": 1 << 30, "adapter": 1 << 30, "merged": 5 << 30, "peft": 5 << 30}
IMPORT_TIMEOUT_S = 120.0  # torch's first import on a cold disk is slow; never the whole check
# Python modules the merge subprocess imports, by route / mode (their pip names in the fix).
MERGE_MODULES: dict[str, tuple[str, ...]] = {
    "adapter": ("numpy", "gguf", "mhd.merge.gguf"),
    "peft": ("torch", "transformers", "peft", "safetensors", "mhd.merge.peft_merge"),
}
PIP_FIX = {"adapter": "pip install 'gguf>=0.17' numpy (or reinstall mhd: they are its dependencies)",
           "peft": "pip install 'mhd[merge]' (torch, transformers, peft for merge.mode = \"peft\")"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not applicable / information only
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "✓", False: "✗", None: "·"}[self.ok]
        text = f"{mark} {self.name:<13} {self.detail}"
        if self.ok is False and self.fix:
            text += f"  → fix: {self.fix}"
        return text


# Merge tools -------------------------------------------------------------------------------------
_PROBE = (
    "import importlib, json, sys\n"
    "bad = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        importlib.import_module(name)\n"
    "    except Exception as exc:\n"
    "        bad[name] = f'{type(exc).__name__}: {exc}'\n"
    "print(json.dumps(bad))\n"
)


async def missing_modules(modules: Sequence[str], python: str | None = None) -> dict[str, str]:
    """module → why it does not import, tried in ``python`` with the merge subprocess's environment."""
    from mhd.merge.pipeline import tool_env

    python = python or sys.executable
    try:
        proc = await asyncio.create_subprocess_exec(
            python, "-c", _PROBE, *modules, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=tool_env())
    except OSError as exc:
        return {m: f"cannot start {python}: {exc}" for m in modules}
    try:
        out, err = await asyncio.wait_for(proc.communicate(), IMPORT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {m: f"importing took over {IMPORT_TIMEOUT_S:.0f}s" for m in modules}
    try:
        bad = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {m: f"{python} failed: {tail[0]}" for m in modules}
    return {str(k): str(v) for k, v in bad.items()}


async def check_merge_tools(cfg: Config, route: str) -> Check:
    key = "peft" if cfg.merge.effective_mode == "peft" else route
    modules = MERGE_MODULES.get(key)
    if modules is None:
        what = ("the pod builds the merged GGUF; registering it needs no local tools" if route == "merged"
                else f"merge.mode = {cfg.merge.effective_mode}")
        return Check("merge tools", None, what)
    bad = await missing_modules(modules)
    if not bad:
        return Check("merge tools", True, f"{sys.executable} imports {', '.join(modules)}")
    names = ", ".join(bad)
    first = next(iter(bad.values()))
    return Check("merge tools", False,
                 f"{sys.executable} cannot import {names} ({first}), which the {key} merge needs",
                 f"{sys.executable} -m {PIP_FIX[key]}")


# Ollama ------------------------------------------------------------------------------------------
async def check_ollama(cfg: Config, route: str | None = None) -> tuple[Check, str]:
    """(the check, the route): the route is ``none`` without Ollama, else from its version."""
    m = cfg.merge
    if m.effective_mode != "ollama":
        return Check("Ollama", None, f"merge.mode = {m.effective_mode}"), "none"
    if not m.ollama_url:
        return (Check("Ollama", False, "merge.mode = \"ollama\" without merge.ollama_url",
                      "set merge.ollama_url = \"http://127.0.0.1:11434\""), route or "none")
    from mhd.merge import OllamaClient, route_for_version

    if route is not None and route != "adapter":
        # Decided at Provisioning (asked once); registering a merged GGUF needs nothing pulled, and
        # an Ollama down by then is a merge retry (the model is kept), never a second pod.
        return Check("Ollama", True, f"{route} route at {m.ollama_url} (decided when the run started)"), route
    try:
        async with OllamaClient(m.ollama_url) as client:
            version = "(asked at Provisioning)" if route else await client.version()
            route = route or (m.route if m.route != "auto" else route_for_version(version))
            if route != "adapter":
                return (Check("Ollama", True, f"version {version} at {m.ollama_url}: {route} route"), route)
            if not m.base:
                return (Check("Ollama", False, f"version {version}: the adapter route needs merge.base",
                              f"set merge.base to the Ollama model of {cfg.training.base_model} (e.g. \"qwen3:8b\")"),
                        route)
            if not await client.has_model(m.base):
                return (Check("Ollama", False, f"version {version} at {m.ollama_url}; base model {m.base} "
                              "is not pulled (the adapter is attached to it)", f"ollama pull {m.base}"), route)
    except MhdError as exc:
        return (Check("Ollama", False, f"{m.ollama_url}: {exc}", "start Ollama (ollama serve) or fix merge.ollama_url"),
                route or "none")
    return Check("Ollama", True, f"version {version} at {m.ollama_url}: adapter route; base {m.base} present"), route


# peft base ---------------------------------------------------------------------------------------
def local_base(cfg: Config) -> Path | None:
    """The base model's folder on this machine (a path, or a Hugging Face cache snapshot)."""
    from mhd.merge.pipeline import _hf_cache_roots

    ref = cfg.merge.base_model_path or cfg.training.base_model
    p = Path(ref).expanduser()
    if (p / "config.json").is_file():
        return p
    if ref.count("/") == 1:
        for root in _hf_cache_roots():
            snaps = sorted((root / f"models--{ref.replace('/', '--')}" / "snapshots").glob("*/config.json"))
            if snaps:
                return snaps[-1].parent
    return None


def check_peft_base(cfg: Config) -> Check:
    if cfg.merge.effective_mode != "peft":
        return Check("base model", None, f"not needed for merge.mode = {cfg.merge.effective_mode}")
    found = local_base(cfg)
    ref = cfg.merge.base_model_path or cfg.training.base_model
    if found is None:
        return Check("base model", False, f"the peft merge loads {ref} on this machine and it is not here "
                     "(mhd never downloads it)",
                     f"download it (huggingface-cli download {ref}) or set merge.base_model_path to a local copy")
    return Check("base model", True, f"{found}")


# Disk --------------------------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def expected_bytes(cfg: Config, route: str) -> tuple[int, str]:
    """(bytes a run will write under state_dir, how that was estimated)."""
    key = "peft" if cfg.merge.effective_mode == "peft" else route
    floor = FLOOR_BYTES.get(key, FLOOR_BYTES["none"])
    how = f"at least {floor / GB:.1f} GB for the {key} route"
    if key == "peft" and (base := local_base(cfg)) is not None:
        floor = max(floor, _dir_bytes(base))  # the merged copy is about the base's size
        how = f"a merged copy of {base}"
    seen = [(_dir_bytes(out), out.parent.name) for out in sorted(cfg.runs_dir.glob("*/output"))[-5:]]
    if seen:
        biggest, run_id = max(seen)
        if biggest * 1.2 > floor:
            return int(biggest * 1.2), f"run {run_id} fetched {biggest / GB:.2f} GB (+20%)"
    return floor, how


def check_disk(cfg: Config, route: str) -> Check:
    from mhd.states.fetching import FREE_MARGIN, free_bytes

    d = cfg.state_dir if cfg.state_dir.exists() else Path("/")
    free = free_bytes(d)
    need, how = expected_bytes(cfg, route)
    detail = f"{free / GB:.1f} GB free under {d}; a run needs ~{(need + FREE_MARGIN) / GB:.1f} GB ({how}, +1 GB margin)"
    if free >= need + FREE_MARGIN:
        return Check("free disk", True, detail)
    return Check("free disk", False, detail,
                 f"free {(need + FREE_MARGIN - free) / GB:.1f} GB under {d}, or move state_dir to a larger disk")


# Credentials -------------------------------------------------------------------------------------
def check_ssh_key(cfg: Config) -> Check:
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
    try:
        with key.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        return Check("SSH key", False, f"{key} cannot be read by this user ({exc.strerror})",
                     "chown the key to the user mhd runs as, or set ssh.key_file to one it can read")
    if cfg.provider == "runpod" and not Path(str(key) + ".pub").exists():
        return Check("SSH key", False, f"{key}.pub missing (the pod needs the public key)",
                     f"ssh-keygen -y -f {key} > {key}.pub")
    return Check("SSH key", True, f"{key} ({oct(mode)})")


def check_api_key(cfg: Config) -> Check:
    if cfg.provider != "runpod":
        return Check("RunPod API key", None, f"not needed for provider {cfg.provider}")
    from mhd.remote.runpod import load_api_key

    try:
        load_api_key(cfg.runpod, dict(os.environ))
    except MhdError as exc:
        return Check("RunPod API key", False, str(exc), "set [runpod] api_key_file or RUNPOD_API_KEY")
    return Check("RunPod API key", True, "present (not shown)")


# Budget ------------------------------------------------------------------------------------------
def expected_pod_s(store: Store, samples: int) -> tuple[float, float | None, str] | None:
    """(pod seconds, $/h, from what) for ``samples`` samples, from the last succeeded runs; None: no history."""
    done = [r for r in store.list_runs(50) if r.outcome is Outcome.SUCCEEDED and r.samples and r.billed_s() > 0]
    if not done or samples <= 0:
        return None
    recent = done[:5]
    per_sample = statistics.median(r.billed_s() / (r.samples or 1) for r in recent)
    rate = next((r.cost_per_hr for r in recent if r.cost_per_hr), None)
    return per_sample * samples, rate, f"{len(recent)} earlier run(s): {per_sample:.1f} pod-s per sample"


def check_budget(cfg: Config, store: Store | None, samples: int | None) -> Check:
    b = cfg.budget
    if b.max_hours_per_run is None and b.max_usd_per_run is None:
        return Check("budget", None, "no [budget] limits set")
    est = expected_pod_s(store, samples or 0) if store is not None else None
    if est is None:
        return Check("budget", None, "no finished run to estimate from yet; the budget is enforced while it runs")
    secs, rate, how = est
    cost = (rate or 0.0) * secs / 3600
    detail = f"a run of {samples} samples is expected to take {secs / 3600:.2f} h" + (
        f" (${cost:.2f})" if rate else "") + f" ({how})"
    if b.max_hours_per_run is not None and secs > b.max_hours_per_run * 3600:
        return Check("budget", False, detail + f", over budget.max_hours_per_run = {b.max_hours_per_run} h",
                     "raise budget.max_hours_per_run or lower dataset.max_samples")
    if b.max_usd_per_run is not None and rate and cost > b.max_usd_per_run:
        return Check("budget", False, detail + f", over budget.max_usd_per_run = ${b.max_usd_per_run:.2f}",
                     "raise budget.max_usd_per_run, lower dataset.max_samples or choose cheaper runpod.gpu_types")
    return Check("budget", True, detail)


# All together ------------------------------------------------------------------------------------
async def run_checks(cfg: Config, *, store: Store | None = None, samples: int | None = None,
                     route: str | None = None) -> list[Check]:
    """Every preflight check; ``route`` (decided at Provisioning) saves asking Ollama again."""
    ollama, route = await check_ollama(cfg, route)
    if cfg.merge.effective_mode != "ollama":
        route = "none"
    return [
        await check_merge_tools(cfg, route),
        ollama,
        check_peft_base(cfg),
        check_disk(cfg, route),
        check_ssh_key(cfg),
        check_api_key(cfg),
        check_budget(cfg, store, samples),
    ]


def require(checks: Sequence[Check]) -> None:
    """Raise :class:`PreflightFailed` naming every failed check and its fix."""
    failed = [c for c in checks if c.ok is False]
    if not failed:
        return
    parts = [f"{c.name}: {c.detail}" + (f" → fix: {c.fix}" if c.fix else "") for c in failed]
    raise PreflightFailed("preflight failed, no pod was rented: " + "; ".join(parts), tuple(failed))
