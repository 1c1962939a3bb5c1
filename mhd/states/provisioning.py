"""Provisioning: build the dataset (local, idempotent), then adopt or rent the pod.

The pod's name is derived from the run id and the attempt (``mhd-<run>``, then ``mhd-<run>-a2``
after a preemption), and ``find`` runs before ``create``: a crash between the provider's answer
and our DB write leads to adoption, never to a second pod for the same attempt.

Before the inputs are built, the run decides whether the pod exports a merged GGUF after training
(``config.json`` ``"export"``): yes when the model goes to an Ollama that takes only merged models
(>= 0.34.1, asked through ``/api/version``) or when ``merge.route = "merged"``; no for older Ollama
(the daemon converts the adapter itself) and without Ollama. The answer is written into the input
folder once, so a re-entered Provisioning never asks again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mhd.dataset.incremental import INCREMENTAL, incremental_learning_rate, plan_run
from mhd.errors import ConfigError, NoCapacityError, NoSamples, TransientProviderError
from mhd.pod.export import DEFAULT_QUANTIZE, QUANT_TYPES, canonical_quant
from mhd.remote.job import LAUNCHER, POD_FILES_DIR
from mhd.remote.provider import Pod, pod_name
from mhd.states import preemption
from mhd.states.context import RunContext
from mhd.states.machine import RunMachine
from mhd.store import Run, now

TRAINER = "train.py"
# train.py's sibling modules: it imports them by name from its own folder on the pod.
TRAINER_MODULES = ("jsonfiles.py", "train_config.py", "train_data.py", "train_loop.py", "train_models.py",
                   "train_phases.py", "train_progress.py", "train_rundir.py")
EXPORTER = "export.py"  # imported by train.py when config.json asks for an export
EVALUATOR = "evaluate.py"  # imported by train.py for the quality gate's Evaluating phase
PROBE = Path(__file__).resolve().parent.parent / "quality" / "probe.jsonl"
CURRENT_ADAPTER = "current_adapter"
START_ADAPTER = "start_adapter"  # an incremental run's start, when it is not the gate's current adapter
BOOTSTRAP, LOCK = "bootstrap.sh", "requirements.lock"


def trainer_config(ctx: RunContext, export: dict[str, Any] | None = None) -> dict[str, Any]:
    t = ctx.cfg.training
    data = t.model_dump(mode="json", exclude={"script", "python", "bootstrap", "extra", "mode",
                                                     "replay_fraction", "full_every",
                                                     "incremental_lr_scale"})
    data["export"] = export if export is not None else {"enabled": False}
    e = ctx.cfg.eval
    data["evaluate"] = {"enabled": e.enabled, "generate": e.generate, "max_new_tokens": e.max_new_tokens,
                        "current_adapter": None}
    data.update(t.extra)
    return data


def current_adapter(ctx: RunContext) -> tuple[str, Path] | None:
    """(run id, adapter dir) of the model promoted today, when it was trained on the same base."""
    from mhd.quality.gate import promoted_run

    run_id = promoted_run(ctx.store)
    if run_id is None:
        return None
    adapter = ctx.cfg.runs_dir / run_id / "output" / "adapter"
    try:
        base = json.loads((ctx.cfg.runs_dir / run_id / "input" / "config.json").read_text()).get("base_model")
    except (OSError, ValueError):
        return None
    if base != ctx.cfg.training.base_model or not (adapter / "adapter_config.json").is_file():
        return None
    return run_id, adapter


async def export_settings(ctx: RunContext) -> dict[str, Any]:
    """config.json's ``export``: build the merged GGUF on the pod when Ollama needs one.

    Ollama unreachable while the route is ``auto`` is transient: the run waits for it (rather than
    train an adapter that the Ollama may refuse) unless ``merge.route`` names the route.
    """
    from mhd.merge import OllamaError, ollama_route

    m = ctx.cfg.merge
    try:
        route = await ollama_route(ctx.cfg)
    except OllamaError as exc:
        if exc.status is None or exc.status >= 500:
            raise TransientProviderError(
                f"{exc} (the run asks Ollama's version to decide whether the pod builds a merged GGUF; it "
                "retries — set merge.route = \"merged\" or \"adapter\" to decide without asking)") from exc
        raise
    enabled = route == "merged" or m.route == "merged"
    try:
        quantize = canonical_quant(m.quantize or DEFAULT_QUANTIZE)
    except ValueError:
        if enabled:
            raise ConfigError("merge.quantize", m.quantize, f"one of {', '.join(QUANT_TYPES.values())}") from None
        quantize = DEFAULT_QUANTIZE
    return {"enabled": enabled, "quantize": quantize, "llama_cpp_dir": m.llama_cpp_dir, "route": route}


def job_env(ctx: RunContext) -> str:
    env = {"MHD_PYTHON": ctx.cfg.training.python, "MHD_TRAINER": TRAINER, "PYTHONUNBUFFERED": "1",
           "MHD_BOOTSTRAP": ctx.cfg.training.bootstrap}
    # Secrets the trainer may need travel only in this 0600 file, never on a command line.
    for name in ("HF_TOKEN",):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return "".join(f"{k}={_sh_quote(v)}\n" for k, v in env.items())


def _sh_quote(v: str) -> str:
    return "'" + v.replace("'", "'\"'\"'") + "'"


def _build_dataset(ctx: RunContext, run: Run) -> dict[str, Any]:
    """The dataset, into a fresh staging folder (``input.tmp``); returns its manifest."""
    from mhd.dataset.build import build_dataset

    staging = ctx.run_dir(run) / "input.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dcfg = ctx.cfg.dataset
    if ctx.cfg.eval.enabled:  # the gate's held-out split: stable by key, never trained on
        dcfg = dcfg.model_copy(update={"holdout_fraction": ctx.cfg.eval.fraction,
                                       "holdout_min": ctx.cfg.eval.min_count})
    plan = plan_run(ctx.cfg, ctx.store, run)
    # The run id salts the replay sample: a rebuild of this run picks the same one.
    manifest = dict(build_dataset(ctx.cfg.memory_dir, staging, dcfg,
                                  exclude=frozenset(ctx.store.forgotten_keys()), plan=plan, salt=run.id))
    training = manifest["training"]
    # Lineage through the chain (Store.model_keys) needs the parent the weights start from.
    ctx.store.update_run(run.id, parent_run_id=training.get("parent_run_id"))
    what = (f"incremental run: {training['new']} new + {training['replay']} replayed memories, {training['reason']}"
            if training["mode"] == INCREMENTAL else f"full run: {training['reason']}")
    ctx.store.add_event(run.id, "training", what)
    ctx.append_log(run, what)
    # Lineage is exact from the moment the files exist: the rows come from the records written.
    ctx.store.record_lineage(run.id, ((e["key"], e["role"], e.get("type"), e.get("date"))
                                      for e in manifest.get("lineage") or []))
    return manifest


def _finish_inputs(ctx: RunContext, run: Run, export: dict[str, Any] | None,
                   parent: str | None = None) -> None:
    """Config, scripts and job env next to the dataset; then staging becomes ``input``.

    ``parent``: an incremental run's start; the trainer loads that adapter as trainable LoRA
    weights (config.json ``init_adapter``). It is the gate's current adapter, uploaded once for both.
    """
    staging = ctx.run_dir(run) / "input.tmp"
    config = trainer_config(ctx, export)
    current = current_adapter(ctx)
    if ctx.cfg.eval.enabled:
        shutil.copyfile(POD_FILES_DIR / EVALUATOR, staging / EVALUATOR)
        shutil.copyfile(PROBE, staging / "probe.jsonl")
        if current is not None:
            # The model served today is scored on the same held-out set (its adapter is small).
            shutil.copytree(current[1], staging / CURRENT_ADAPTER)
            config["evaluate"]["current_adapter"] = CURRENT_ADAPTER
            config["evaluate"]["current_run"] = current[0]
    if parent is not None:
        if (staging / CURRENT_ADAPTER).is_dir() and current is not None and current[0] == parent:
            config["init_adapter"] = CURRENT_ADAPTER
        else:  # the gate is off, or the promoted model moved since the plan (a rollback just now)
            shutil.copytree(ctx.cfg.runs_dir / parent / "output" / "adapter", staging / START_ADAPTER)
            config["init_adapter"] = START_ADAPTER
        config["init_run"] = parent
        config["learning_rate"] = incremental_learning_rate(config["learning_rate"], ctx.cfg.training)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    script = ctx.cfg.training.script or POD_FILES_DIR / TRAINER
    shutil.copyfile(script, staging / TRAINER)
    for name in TRAINER_MODULES:  # also beside a custom training.script, which may import them
        shutil.copyfile(POD_FILES_DIR / name, staging / name)
    shutil.copyfile(POD_FILES_DIR / EXPORTER, staging / EXPORTER)
    shutil.copyfile(POD_FILES_DIR / LAUNCHER, staging / LAUNCHER)
    for name in (BOOTSTRAP, LOCK):  # run.sh installs the lock's packages first where they are missing
        shutil.copyfile(POD_FILES_DIR / name, staging / name)
    env_path = staging / "job.env"
    env_path.touch(mode=0o600)
    env_path.write_text(job_env(ctx))
    # The folder appears whole or not at all: a crash mid-build rebuilds from scratch.
    inputs = ctx.run_dir(run) / "input"
    shutil.rmtree(inputs, ignore_errors=True)
    os.replace(staging, inputs)


async def act(ctx: RunContext, m: RunMachine) -> None:
    run = ctx.check(m.run.id)
    manifest_path = ctx.run_dir(run) / "input" / "dataset_manifest.json"
    if manifest_path.exists() and run.pod_id is None and (
            _holds_forgotten(ctx, manifest_path)
            or (run.parent_run_id is not None and ctx.store.forgotten_in(run.parent_run_id))):
        # A memory was forgotten since this dataset was built (a restart in between), in it or in
        # the adapter it would start from: no pod gets it; the rebuild plans a full run then.
        shutil.rmtree(manifest_path.parent)
    if manifest_path.exists():
        manifest = dict(json.loads(manifest_path.read_text()))
    else:
        manifest = await asyncio.to_thread(_build_dataset, ctx, run)
        # Data first: with nothing to train on, the run ends no_data at once instead of
        # waiting for an Ollama that is down.
        if manifest.get("samples"):
            export = await export_settings(ctx)
            await asyncio.to_thread(_finish_inputs, ctx, run, export, manifest["training"].get("parent_run_id"))
            ctx.append_log(run, f"model route {export['route']}: " + (
                f"the pod exports a merged {export['quantize']} GGUF after training" if export["enabled"]
                else "the pod ships the adapter only"))
    report = {k: manifest.get(k) for k in ("samples", "eval_samples", "memories_read", "rejects",
                                            "not_ready", "by_type", "time_range", "training")}
    run = ctx.store.update_run(run.id, samples=int(manifest.get("samples") or 0),
                               dataset_sha256=manifest.get("sha256"), report_json=json.dumps(report))
    if not run.samples:
        raise NoSamples(f"no usable training sample in {ctx.cfg.memory_dir} "
                        f"(rejects: {manifest.get('rejects') or {}}); no pod was rented")

    if run.pod_id is None and not run.preemptions:  # checked once, before the first pod
        await _preflight(ctx, run)

    name = pod_name(run.id, run.preemptions + 1)
    pod: Pod | None = None
    how = "adopted"
    if run.pod_id:
        pod = await ctx.provider.get(run.pod_id)
        if pod is not None and pod.gone:
            ctx.log.warning("run %s: pod %s is %s; renting a new one", run.id, pod.id, pod.status)
            ctx.store.pod_terminated(pod.id, note=f"found {pod.status}")
            pod = None
    if pod is None:
        pod = await ctx.provider.find(name)
    if pod is None:
        pod, run = await _create(ctx, run, name)
        how = "created"
        await ctx.fault_point("Provisioning.created")
    interruptible = bool(pod.extra.get("interruptible", _wants_interruptible(ctx, run)))
    # Persist the moment we know it (find-before-create covers a crash right before this line).
    started = run.pod_started_at or now()
    cost = pod.cost_per_hr if pod.cost_per_hr is not None else run.cost_per_hr
    ctx.store.record_pod(pod.id, run.id, ctx.provider.name, pod.name, started_at=started, cost_per_hr=cost,
                         interruptible=interruptible)
    # On a network volume the run folder outlives the pod: every attempt works in the first one's.
    folder = pod_name(run.id) if preemption.uses_volume(ctx.cfg) else pod.name
    run = ctx.store.update_run(
        run.id, pod_id=pod.id, pod_name=pod.name, gpu_type=pod.gpu_type, cost_per_hr=cost,
        pod_started_at=started, pod_stopped_at=None, pod_interruptible=interruptible,
        remote_dir=f"{ctx.remote_root.rstrip('/')}/runs/{folder}",
    )
    kind = " interruptible" if interruptible else ""
    ctx.append_log(run, f"pod {pod.id} {how} ({pod.gpu_type or '?'}{kind}, ${pod.cost_per_hr or 0:.3f}/h)")
    m.fire("provisioned", reason=f"pod {pod.id} {how}")


def _wants_interruptible(ctx: RunContext, run: Run) -> bool:
    return ctx.provider.name == "runpod" and ctx.cfg.runpod.interruptible and not run.on_demand


async def _create(ctx: RunContext, run: Run, name: str) -> tuple[Pod, Run]:
    """Rent the attempt's pod: interruptible when configured, unless the run fell back already.

    No interruptible capacity is the other case where ``on_preemption`` decides: an on-demand
    pod (recorded on the run, so a restart stays on-demand), a wait for spot capacity, or the
    provider's refusal as the run's failure.
    """
    if not _wants_interruptible(ctx, run):
        return await ctx.provider.create(name), run
    try:
        return await ctx.provider.create(name, interruptible=True), run
    except NoCapacityError as exc:
        policy = ctx.cfg.runpod.on_preemption
        if policy == "fail":
            raise
        if policy == "resume":
            raise TransientProviderError(f"{exc} (runpod.on_preemption = \"resume\" waits for interruptible "
                                         "capacity)") from exc
        ctx.store.add_event(run.id, preemption.EVENT, f"no interruptible capacity: on-demand from now ({exc})")
        ctx.append_log(run, f"no interruptible capacity ({exc}); renting an on-demand pod")
        run = ctx.store.update_run(run.id, on_demand=True)
        return await ctx.provider.create(name), run


def _holds_forgotten(ctx: RunContext, manifest_path: Path) -> bool:
    try:
        keys = {e["key"] for e in json.loads(manifest_path.read_text()).get("lineage") or []}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(keys & ctx.store.forgotten_keys())


async def _preflight(ctx: RunContext, run: Run) -> None:
    """Before any pod: what the run needs after training must be here (PreflightFailed if not)."""
    from mhd import preflight

    try:
        route = json.loads((ctx.run_dir(run) / "input" / "config.json").read_text())["export"].get("route")
    except (OSError, ValueError, KeyError, AttributeError):
        route = None
    checks = await preflight.run_checks(ctx.cfg, store=ctx.store, samples=run.samples, route=route)
    for c in checks:
        if c.ok is not None:
            ctx.append_log(run, "preflight " + c.line())
    preflight.require(checks)


def input_files(ctx: RunContext, run: Run) -> list[Path]:
    """Every file to upload, subfolders (``current_adapter/``) included."""
    return sorted(p for p in (ctx.run_dir(run) / "input").rglob("*") if p.is_file())
