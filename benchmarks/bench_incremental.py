"""Incremental vs full training on a simulated memory stream (issue 15, part 2).

    .venv/bin/python -m benchmarks.bench_incremental [--results] [--initial 300] [--runs 5] [--per-run 50]

A memory stream on the tiny offline model: ``--initial`` memories and a first (full) run, then
``--runs`` runs of ``--per-run`` new memories each, once with ``[training] mode = "full"`` and once
with ``"incremental"`` (``replay_fraction`` and ``full_every`` at their defaults unless given).
Each run goes the daemon's way: ``plan_run`` on a real store decides full or incremental from the
promoted run (every run here is promoted, as the gate would when it passes), ``build_dataset``
builds the dataset with the held-out split (10 %, at least 8), and the real trainer
(mhd/pod/train.py, as the pod runs it) trains and evaluates: held-out NLL per assistant token of
the new adapter, the base and the current (previous) adapter, the gate's numbers.

Measured per run: training samples, trainer seconds (trained.json's ``wall_time_s``: process
start to adapter saved, model load included; the evaluation is not in it), held-out NLL, and
what the quality gate would decide. Goal: >= 3x fewer samples over the runs, with held-out NLL
within 2 % of the full runs'.

The memories: a persona's days drawn from topics (a walk, a call, work, cooking, ...) with varied
details, newer ones dated later. The tiny model is random-init, so the NLL says how well each
adapter learned the stream's language, not anything about a real model's quality.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"
SECTION = "incremental"
GOAL_SAMPLES, GOAL_NLL = 3.0, 0.02
NOW = datetime(2026, 7, 1, tzinfo=UTC)

TOPICS = [
    ("walked", ["by the river", "up the hill behind the school", "around the old harbour", "through the pine wood"],
     ["with Tomas", "alone", "with my sister", "with the dog"]),
    ("called", ["my mother", "the plumber", "an old friend from Lyon", "the bank"],
     ["about the roof", "about the weekend", "about money", "for no reason at all"]),
    ("cooked", ["a lentil soup", "fish with lemon", "my grandmother's bread", "too much rice"],
     ["for the neighbours", "for myself", "for Tomas", "while listening to the radio"]),
    ("worked on", ["the quarterly report", "the garden shed", "the translation", "my tax forms"],
     ["all morning", "until late", "between two meetings", "without much progress"]),
    ("read", ["a novel about sailors", "the local paper", "an essay on memory", "old letters"],
     ["on the balcony", "in bed", "on the train", "in the library"]),
    ("thought about", ["moving to the coast", "my father", "the argument at dinner", "learning the cello"],
     ["on the way home", "before sleeping", "in the shower", "while waiting for the bus"]),
]
MOODS = ["It felt calm.", "I was tired but happy.", "It annoyed me a little.", "I laughed a lot.",
         "I should do it more often.", "I did not expect to enjoy it."]


def memory_text(i: int) -> str:
    rng = random.Random(i)
    verb, objects, details = rng.choice(TOPICS)
    return f"Day {i}: I {verb} {rng.choice(objects)} {rng.choice(details)}. {rng.choice(MOODS)}"


def write_stream(root: Path, start: int, n: int) -> None:
    from tests.support.memories import memory, write

    for i in range(start, start + n):
        # Later memories are newer: a stream, as the MetaHuman writes it.
        ts = (NOW - timedelta(hours=2 * (2000 - i))).isoformat().replace("+00:00", "Z")
        write(root, f"{i // 100:02d}/evt-{i:05d}.json", memory(memory_text(i), timestamp=ts))


def _launch(run: Path, work: Path) -> float:
    from tests.integration.test_trainer import env

    t0 = time.monotonic()
    with (run / "train.log").open("ab") as log:
        rc = subprocess.call([sys.executable, str(REPO / "mhd" / "pod" / "train.py"), "--run-dir", str(run)],
                             stdout=log, stderr=subprocess.STDOUT, env=env(work))
    if rc != 0:
        raise SystemExit(f"trainer failed (rc {rc}):\n{(run / 'train.log').read_text()[-2000:]}")
    return time.monotonic() - t0


def trainer_settings(model: Path) -> dict[str, Any]:
    from tests.integration.test_trainer import trainer_config

    # Batch 4: a quarter of the steps of the tests' batch 1, so both series fit in a few minutes.
    return {**trainer_config(model), "per_device_train_batch_size": 4, "save_steps": 10_000}


def series(mode: str, work: Path, model: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """One stream, run by run, the daemon's way (plan → dataset → trainer → promoted)."""
    from mhd.config import Config
    from mhd.dataset.build import build_dataset
    from mhd.dataset.incremental import incremental_learning_rate, plan_run
    from mhd.quality.gate import decide
    from mhd.states.model import Outcome, RunState
    from mhd.store import Store

    memories = work / "memories"
    training = {"mode": mode, "base_model": str(model), "lora_rank": 8, "lora_alpha": 16,
                "target_modules": trainer_settings(model)["target_modules"], "full_every": a.full_every,
                "replay_fraction": a.replay_fraction, "incremental_lr_scale": a.lr_scale}
    cfg = Config(state_dir=work / "state", memory_dir=memories, training=training)
    dcfg = cfg.dataset.model_copy(update={"persona_name": "Maya", "holdout_fraction": cfg.eval.fraction,
                                          "holdout_min": cfg.eval.min_count})
    store = Store(f"sqlite:///{work / 'mhd.db'}")
    out: list[dict[str, Any]] = []
    previous: Path | None = None
    for n in range(a.runs + 1):
        write_stream(memories, 0 if n == 0 else a.initial + (n - 1) * a.per_run, a.initial if n == 0 else a.per_run)
        run = store.create_run("threshold", "local")
        plan = plan_run(cfg, store, run)
        d = cfg.runs_dir / run.id / "input"
        manifest = build_dataset(memories, d, dcfg, plan=plan, salt=run.id, now=NOW)
        tr = manifest["training"]
        conf: dict[str, Any] = {**trainer_settings(model),
                                "evaluate": {"enabled": True, "generate": 0, "current_adapter": None}}
        shutil.copyfile(REPO / "mhd" / "quality" / "probe.jsonl", d / "probe.jsonl")
        if previous is not None:  # the served adapter, scored beside the new one (the gate's "current")
            shutil.copytree(previous, d / "current_adapter")
            conf["evaluate"]["current_adapter"] = "current_adapter"
        if tr["mode"] == "incremental":
            conf["init_adapter"], conf["init_run"] = "current_adapter", tr["parent_run_id"]
            conf["learning_rate"] = incremental_learning_rate(conf["learning_rate"], cfg.training)  # as Provisioning
        (d / "config.json").write_text(json.dumps(conf))
        job_s = _launch(d, work)
        trained = json.loads((d / "trained.json").read_text())["info"]
        ev = json.loads((d / "eval.json").read_text())
        # As Fetching and Merging leave it: the adapter under output/, the lineage, promoted.
        shutil.copytree(d / "adapter", cfg.runs_dir / run.id / "output" / "adapter")
        previous = cfg.runs_dir / run.id / "output" / "adapter"
        store.record_lineage(run.id, ((e["key"], e["role"], e.get("type"), e.get("date"))
                                      for e in manifest["lineage"]))
        store.update_run(run.id, state=RunState.IDLE, outcome=Outcome.SUCCEEDED, parent_run_id=tr.get("parent_run_id"))
        gate = decide(ev, cfg.eval)
        row = {"run": n, "memories": len(manifest["memory_keys"]), "mode": tr["mode"], "reason": tr["reason"],
               "samples": manifest["samples"], "new": tr.get("new"), "replay": tr.get("replay"),
               "steps": trained["steps"], "trainer_s": trained["wall_time_s"], "job_s": round(job_s, 2),
               "heldout_count": ev["heldout"]["count"], "nll_new": ev["heldout"]["new"],
               "nll_base": ev["heldout"]["base"], "nll_current": ev["heldout"].get("current"),
               "probe_new": ev["probe"]["new"], "gate": gate.decision, "gate_failed": list(gate.failed)}
        out.append(row)
        print(f"{mode:<11} run {n}: {row['mode']:<11} {row['samples']:>4} samples ({row['steps']} steps) "
              f"{row['trainer_s']:6.1f} s  held-out NLL {row['nll_new']:.4f} (current "
              f"{row['nll_current'] if row['nll_current'] is None else round(row['nll_current'], 4)})  "
              f"gate {row['gate']}  [{row['reason']}]", flush=True)
    store.close()
    return out


def summary(full: list[dict[str, Any]], inc: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the stream's runs (run 0, the same full run in both series, left out)."""
    f, i = full[1:], inc[1:]
    fs, is_ = sum(r["samples"] for r in f), sum(r["samples"] for r in i)
    ratios = [b["nll_new"] / a["nll_new"] - 1 for a, b in zip(f, i, strict=True)]
    # The held-out NLL barely moves from the base on a random-init model, so "within 2 %" alone says
    # little: the share of the full run's gain over the base that the incremental run kept says more.
    kept = [(b["nll_base"] - b["nll_new"]) / (a["nll_base"] - a["nll_new"]) for a, b in zip(f, i, strict=True)]
    return {"samples_full": fs, "samples_incremental": is_, "samples_ratio": fs / is_, "gain_kept": kept,
            "gain_kept_worst": min(kept),
            "steps_full": sum(r["steps"] for r in f), "steps_incremental": sum(r["steps"] for r in i),
            "samples_full_runs_only": sum(r["samples"] for r in i if r["mode"] == "full"),
            "trainer_s_full": round(sum(r["trainer_s"] for r in f), 1),
            "trainer_s_incremental": round(sum(r["trainer_s"] for r in i), 1),
            "nll_worst": max(ratios), "nll_last": ratios[-1], "nll_per_run": ratios}


def notes(report: dict[str, Any]) -> list[str]:
    """What the table means, computed from the figures (so a rerun's notes match its numbers)."""
    full, inc = report["full"][1:], report["incremental"][1:]
    only = [(f, i) for f, i in zip(full, inc, strict=True) if i["mode"] == "incremental"]
    fs, is_ = sum(f["samples"] for f, _ in only), sum(i["samples"] for _, i in only)
    worse = [i for _, i in only if i["nll_current"] is not None and i["nll_new"] > i["nll_current"]]
    last = report["full"][-1]
    kept = report["summary"]["gain_kept"][:len(only)] or [1.0]
    out = [
        f"- Held-out NLL: base {last['nll_base']:.2f}, full runs {min(f['nll_new'] for f in full):.2f} to "
        f"{max(f['nll_new'] for f in full):.2f}; the incremental runs kept {min(kept):.0%} to {max(kept):.0%} "
        "of the full runs' gain over the base (within the 2 % goal, but consistently behind).",
    ]
    if only:
        out.append(f"- The incremental runs alone ({len(only)}): {fs} vs {is_} samples, {fs / is_:.1f}x fewer. The "
                   "total counts the full run that `full_every` forces into the chain as well.")
    if worse:
        out.append(f"- {len(worse)} incremental run(s) scored worse on the held-out set than the model they started "
                   "from (run " + ", ".join(f"{i['run']}: {i['nll_new']:.4f} vs {i['nll_current']:.4f}" for i in worse)
                   + "); the gate's 1 % tolerance let them through. Restarting at the full learning rate on a few "
                   "dozen samples is the likely cause (not measured here).")
    if only:
        pi, pf = [i["probe_new"] for _, i in only], [f["probe_new"] for f, _ in only]
        out.append(f"- Probe NLL (general text, not the memories): incremental runs {min(pi):.3f} to {max(pi):.3f}, "
                   f"full runs {min(pf):.3f} to {max(pf):.3f} (lower: less drift from the base).")
    return [line for line in out if line]


def section(report: dict[str, Any]) -> list[str]:
    s, a = report["summary"], report["args"]
    ok_s, ok_n = s["samples_ratio"] >= GOAL_SAMPLES, s["nll_worst"] <= GOAL_NLL
    lines = [
        f"<!-- begin:{SECTION} -->",
        "## Incremental vs full training (`benchmarks/bench_incremental.py`, issue 15)",
        "",
        f"Written by `python -m benchmarks.bench_incremental --results` on {report['date']} "
        f"({report['seconds']:.0f} s), on the 2-core shared machine above (CPU only). Raw figures: "
        "`benchmarks/out/incremental.json`. The real trainer on the tiny offline model (random-init), batch 4, "
        f"2 epochs, lr 5e-3; a stream of {a['initial']} memories and a full run, then {a['runs']} runs of "
        f"{a['per_run']} new ones; held out 10 % (at least 8) by key; `replay_fraction = {a['replay_fraction']}`, "
        f"`full_every = {a['full_every']}`, `incremental_lr_scale = {a.get('lr_scale', 1.0)}` (an incremental run "
        "trains at lr times that). Every run is promoted (the next one starts from it)."
        + (f" The full series is reused from `{a['reuse_full']}` (same stream)." if a.get("reuse_full") else ""),
        "",
        "| run | memories | full: samples / s / held-out NLL | incremental: mode, samples (new + replay) / s / "
        "held-out NLL | NLL incr ÷ full | gate (incremental run) |",
        "|---|---|---|---|---|---|",
    ]
    for f, i in zip(report["full"], report["incremental"], strict=True):
        split = f" ({i['new']} + {i['replay']})" if i["mode"] == "incremental" else ""
        lines.append(
            f"| {f['run']} | {f['memories']} | {f['samples']} / {f['trainer_s']:.1f} s / {f['nll_new']:.4f} | "
            f"{i['mode']}, {i['samples']}{split} / {i['trainer_s']:.1f} s / {i['nll_new']:.4f} | "
            f"{i['nll_new'] / f['nll_new']:.4f} | {i['gate']}"
            + (f" ({', '.join(i['gate_failed'])})" if i["gate_failed"] else "") + " |")
    lines += [
        "",
        "| over runs 1-" + str(a["runs"]) + " | full | incremental | goal | result |",
        "|---|---|---|---|---|",
        f"| training samples | {s['samples_full']} | {s['samples_incremental']} | ≥ {GOAL_SAMPLES:g}x fewer | "
        f"{s['samples_ratio']:.2f}x: " + ("pass" if ok_s else "**not met**") + " |",
        f"| of which in full runs (`full_every`) | {s['samples_full']} | {s['samples_full_runs_only']} | | info |",
        f"| optimizer steps | {s['steps_full']} | {s['steps_incremental']} | — | "
        f"{s['steps_full'] / s['steps_incremental']:.2f}x |",
        f"| trainer seconds (model load included; noisy: the 2 cores were shared) | {s['trainer_s_full']} | "
        f"{s['trainer_s_incremental']} | — | {s['trainer_s_full'] / s['trainer_s_incremental']:.2f}x |",
        f"| held-out NLL, incremental vs full (worst run; last run) | | {s['nll_worst']:+.2%}; {s['nll_last']:+.2%} | "
        f"≤ +{GOAL_NLL:.0%} | " + ("pass" if ok_n else "**not met**") + " |",
        f"| held-out NLL gain over the base, incremental ÷ full (worst run) | | {s['gain_kept_worst']:.2f} | — | "
        "info (per run: " + ", ".join(f"{k:.2f}" for k in s["gain_kept"]) + ") |",
        "",
        *notes(report),
        "- Default: " + ("both goals met on this stream: `training.mode` could be `incremental`." if ok_s and ok_n
                         else "`training.mode` stays `full`: not every goal is met at the default `full_every` "
                              "(see above); `incremental` is opt-in."),
        "",
        "Reasons recorded per incremental-series run: "
        + "; ".join(f"{r['run']}: {r['reason']}" for r in report["incremental"]) + ".",
        f"<!-- end:{SECTION} -->",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--results", action="store_true", help="update this benchmark's section of benchmarks/RESULTS.md")
    p.add_argument("--out", type=Path, default=OUT_DIR / "incremental.json")
    p.add_argument("--initial", type=int, default=300)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--per-run", type=int, default=50)
    p.add_argument("--replay-fraction", type=float, default=0.3)
    p.add_argument("--full-every", type=int, default=5)
    p.add_argument("--lr-scale", type=float, default=None,
                   help="[training] incremental_lr_scale (default: the config's default)")
    p.add_argument("--reuse-full", type=Path,
                   help="take the full series from a saved --out of the same stream instead of training it again")
    p.add_argument("--from-json", type=Path, help="re-render the summary and section from a saved run's --out")
    a = p.parse_args(argv)
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        saved["summary"] = summary(saved["full"], saved["incremental"])
        a.from_json.write_text(json.dumps(saved, indent=2) + "\n")
        _write_section(saved, a.results)
        return 0
    started = time.time()
    from mhd.config import TrainingConfig
    from tests.support.tiny import build_once

    if a.lr_scale is None:
        a.lr_scale = TrainingConfig().incremental_lr_scale
    reused = _reused_full(a)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mhd-bench-incr-") as tmp_s:
        tmp = Path(tmp_s)
        model = build_once(tmp)
        full = reused if reused is not None else series("full", tmp / "full", model, a)
        inc = series("incremental", tmp / "incremental", model, a)
    s = summary(full, inc)
    print(f"samples over runs 1-{a.runs}: full {s['samples_full']}, incremental {s['samples_incremental']} "
          f"({s['samples_ratio']:.2f}x fewer; goal {GOAL_SAMPLES:g}x); trainer s {s['trainer_s_full']} vs "
          f"{s['trainer_s_incremental']}; held-out NLL incremental vs full: worst {s['nll_worst']:+.2%}, "
          f"last {s['nll_last']:+.2%} (goal ≤ +{GOAL_NLL:.0%})")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": round(time.time() - started, 1),
              "args": vars(a) | {"out": str(a.out), "reuse_full": a.reuse_full and str(a.reuse_full)},
              "full": full, "incremental": inc, "summary": s}
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    _write_section(report, a.results)
    return 0


def _reused_full(a: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The full series of a saved run, when it ran the same stream (the full runs ignore the knobs tried)."""
    if a.reuse_full is None:
        return None
    saved = json.loads(a.reuse_full.read_text())
    stream = ("initial", "runs", "per_run")
    if any(saved["args"].get(k) != getattr(a, k) for k in stream):
        was = ", ".join(f"{k}={saved['args'].get(k)}" for k in stream)
        raise SystemExit(f"{a.reuse_full}: another stream ({was})")
    full: list[dict[str, Any]] = saved["full"]
    return full


def _write_section(report: dict[str, Any], results: bool) -> None:
    lines = section(report)
    if not results:
        print("\n".join(lines))
        return
    from benchmarks.bench_padding import RESULTS, update_results

    update_results(lines, RESULTS, SECTION)
    print(f"updated the {SECTION} section of {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    raise SystemExit(main())
