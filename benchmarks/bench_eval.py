"""What the quality gate's Evaluating phase costs next to training (issue 13: < 5 % of pod time).

    .venv/bin/python -m benchmarks.bench_eval [--results] [--repeat N]

Measured, in one run: the real trainer (mhd/pod/train.py) on the tiny offline model and the
bundled example memories (10 % held out, the 66 probes), with the evaluation enabled, as the
detached job runs it.

- after (today's trainer): the evaluation runs in the training process, on the model training
  leaves loaded. Its seconds are eval.json's ``seconds`` (tokenizer, scoring, generations).
- before (the trainer up to issue 13's first version): after training the job re-executed itself
  and the fresh process loaded the base and the adapter again. The same run folder with eval.json
  and manifest.json removed is relaunched: that process does exactly what the re-executed one
  did (start, imports, config and adapter checks, base + adapter load, scoring, manifest). Its
  seconds are the relaunch's wall time; eval.json's ``seconds`` (load included, process start
  and imports not) is printed beside it.

Training seconds come from trained.json (``wall_time_s``: model load included). Both evaluations
score the same adapter on the same sets; their numbers are printed to show they agree.

Then a cost model for the seed case, printed with its formula and assumptions (the options): a
tiny model says nothing about a 30B MoE's absolute speed, only about the shape of the costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks" / "out"
SECTION = "eval"
GOAL = 0.05


def _launch(run: Path, work: Path) -> tuple[int, float]:
    from tests.integration.test_trainer import env

    t0 = time.monotonic()
    with (run / "train.log").open("ab") as log:
        rc = subprocess.call([sys.executable, str(REPO / "mhd" / "pod" / "train.py"), "--run-dir", str(run)],
                             stdout=log, stderr=subprocess.STDOUT, env=env(work))
    return rc, time.monotonic() - t0


def measure(work: Path, model: Path, memories: Path) -> dict[str, Any]:
    from mhd.config import DatasetConfig
    from mhd.dataset.build import build_dataset
    from tests.integration.test_trainer import trainer_config

    run = work / "run"
    run.mkdir(parents=True)
    build_dataset(memories, run, DatasetConfig(persona_name="Maya", holdout_fraction=0.1))
    shutil.copyfile(REPO / "mhd" / "quality" / "probe.jsonl", run / "probe.jsonl")
    cfg = {**trainer_config(model), "evaluate": {"enabled": True, "generate": 3, "max_new_tokens": 48}}
    (run / "config.json").write_text(json.dumps(cfg))
    rc, job_s = _launch(run, work)
    if rc != 0:
        raise SystemExit(f"trainer failed (rc {rc}):\n{(run / 'train.log').read_text()[-2000:]}")
    trained = json.loads((run / "trained.json").read_text())["info"]
    live = json.loads((run / "eval.json").read_text())
    assert live["in_process"] is True, "the evaluation did not run in the training process"

    fresh = work / "fresh"
    shutil.copytree(run, fresh)
    for name in ("eval.json", "manifest.json"):
        (fresh / name).unlink()
    rc, fresh_s = _launch(fresh, work)
    if rc != 0:
        raise SystemExit(f"relaunch failed (rc {rc}):\n{(fresh / 'train.log').read_text()[-2000:]}")
    reloaded = json.loads((fresh / "eval.json").read_text())
    assert reloaded["in_process"] is False
    return {"train_s": trained["wall_time_s"], "steps": trained["steps"], "job_s": round(job_s, 2),
            "after_eval_s": live["seconds"], "before_eval_s": round(fresh_s, 2),
            "before_eval_json_s": reloaded["seconds"],
            "numbers": {s: {m: (live[s][m], reloaded[s][m]) for m in ("base", "new")} for s in ("heldout", "probe")},
            "heldout": live["heldout"], "probe": live["probe"]}


def seed_estimate(a: argparse.Namespace, samples: int) -> dict[str, float]:
    """Seconds of each part, from the cost model printed by main()."""
    train_tokens = samples * (1 - a.holdout) * a.epochs * a.tokens_per_sample
    eval_tokens = (samples * a.holdout * a.tokens_per_sample + a.probes * a.tokens_per_probe) * a.models
    train_s = a.train_load_s + train_tokens / a.train_tok_s
    scoring_s = eval_tokens / a.fwd_tok_s + a.generate * 2 * a.max_new_tokens / a.decode_tok_s
    out = {"samples": samples, "train_s": train_s}
    for how, eval_s in (("before", a.eval_start_s + a.eval_load_s + scoring_s),
                        ("after", a.current_load_s + scoring_s)):
        pod_s = a.pod_overhead_s + train_s + eval_s
        out[f"{how}_eval_s"], out[f"{how}_pod_s"], out[f"{how}_share"] = eval_s, pod_s, eval_s / pod_s
    return out


def section(report: dict[str, Any]) -> list[str]:
    runs, a = report["runs"], report["assumptions"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("train_s", "after_eval_s", "before_eval_s",
                                                               "before_eval_json_s")}
    first = runs[0]
    h, pr = first["heldout"], first["probe"]
    agree = max(abs(x - y) / y for r in runs for s in r["numbers"].values() for x, y in s.values())
    lines = [
        f"<!-- begin:{SECTION} -->",
        "## Quality gate: evaluation vs training (`benchmarks/bench_eval.py`, issue 13)",
        "",
        f"Written by `python -m benchmarks.bench_eval --results` on {report['date']} ({report['seconds']:.0f} s), "
        f"on the 2-core shared machine above (CPU only), {len(runs)} run(s), medians shown. Raw figures: "
        "`benchmarks/out/eval.json`. Before = the evaluation in a fresh process that loads the base again (the "
        "trainer re-executed itself after training for it); after = in the training process, on the model "
        "training left loaded. Both score the same adapter on the same sets in the same run.",
        "",
        "| what | before | after | goal | result |",
        "|---|---|---|---|---|",
        f"| tiny model, example memories ({first['steps']} steps, {h['count']} held-out samples, {pr['count']} "
        f"probes, base + new, 3 generations of 48 tokens): evaluation seconds | {med['before_eval_s']:.1f} s "
        f"(process start + imports + load + scoring; {med['before_eval_json_s']:.1f} s of it after the imports) | "
        f"{med['after_eval_s']:.1f} s | — | info |",
        f"| tiny model: evaluation ÷ training ({med['train_s']:.1f} s, model load included) | "
        f"{med['before_eval_s'] / med['train_s']:.1%} | {med['after_eval_s'] / med['train_s']:.1%} | — | info |",
        f"| the two evaluations agree | max relative difference {agree:.1e} over held-out/probe x base/new | | "
        "≤ 1e-5 | " + ("pass" if agree <= 1e-5 else "**fail**") + " |",
        f"| tiny model held-out NLL per assistant token ({h['tokens']} tokens), base → new | the same both ways: | "
        f"{h['base']:.4f} → {h['new']:.4f} (new/base {h['new'] / h['base']:.4f}) | ≤ 0.98 | "
        + ("pass" if h["new"] <= 0.98 * h["base"] else "fail") + " |",
    ]
    for e in report["seed"]:
        lines.append(
            f"| seed case, **estimate**, {e['samples']:.0f} samples (Qwen3-30B-A3B 4-bit; training "
            f"{e['train_s']:.0f} s): evaluation share of pod time | "
            f"{e['before_eval_s']:.0f} s → {e['before_share']:.1%} | "
            f"{e['after_eval_s']:.0f} s → {e['after_share']:.1%} "
            f"({e['after_eval_s'] / e['train_s']:.0%} of training) | < 5 % | "
            + ("estimated to pass" if e["after_share"] < GOAL else "**estimated not met**") + " |")
    lines += [
        "",
        "The seed rows are a cost model, not a measurement (no GPU was used):",
        "",
        "    train_s  = train_load_s + samples·(1-holdout)·epochs·tokens_per_sample / train_tok_s",
        "    scoring  = models·(samples·holdout·tokens_per_sample + probes·tokens_per_probe) / fwd_tok_s",
        "               + generate·2·max_new_tokens / decode_tok_s",
        "    before   = eval_start_s + eval_load_s + scoring        after = current_load_s + scoring",
        "    share    = eval / (pod_overhead_s + train_s + eval)",
        "",
        "with " + ", ".join(f"{k} = {v:g}" for k, v in a.items()) + ". The 200 samples are the issue's "
        "figure, 500 the one the 16 % estimate was quoted with.",
        "",
        "- What the tiny model measures is the shape: before, most of the evaluation was process start, "
        "imports and the second load of the model; after, what is left is the scoring and the generations. "
        "On the tiny model the load itself is cheap and the saving is mostly the fresh process's start and "
        "imports; for a 30B base the second load and quantization are minutes (`eval_load_s`), which is what "
        "the seed rows remove. The tiny model's own ratio after (scoring 66 probes and 3 x 2 generations "
        "against 6 s of training) says nothing about the seed's.",
        "- The seed margin is thin and rests on the assumptions: " + "; ".join(report["sensitivity"]) + ".",
        "- Not measured: the unsloth backend (the seed's). There the evaluation scores the model after "
        "`FastLanguageModel.for_inference`; no test or benchmark here runs it (it needs CUDA). If it fails, "
        "the trainer restarts and evaluates with the base reloaded (the before column), so the numbers are "
        "not lost, but the time is.",
        "- The greedy generations dominate the seed's remaining cost at the assumed 8 tokens/s "
        "(3 prompts x 2 models x 48 tokens = 36 s); `decode_tok_s` is the least certain assumption.",
        "- On the tiny model the pre-training suggested in the issue was tried and dropped: pre-training on "
        "the probe set made the base memorize it (probe NLL 0.63), so any fine-tune looked like forgetting "
        "(new 3.96, gate fails); pre-training on the memories' text taught the base the held-out text "
        "(held-out base 3.645, new 3.640, gate fails). The random-init model passes both rules as is.",
        f"<!-- end:{SECTION} -->",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--results", action="store_true", help="update this benchmark's section of benchmarks/RESULTS.md")
    p.add_argument("--repeat", type=int, default=1, help="measured runs (medians are reported)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "eval.json")
    # Seed case (Qwen3-30B-A3B, 4-bit, one H100): assumptions, override them with measured values.
    p.add_argument("--samples", type=int, nargs="+", default=[200, 500])
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--probes", type=int, default=66)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--models", type=int, default=3, help="forward passes per set: base, new, current")
    p.add_argument("--tokens-per-sample", type=int, default=400)
    p.add_argument("--tokens-per-probe", type=int, default=60)
    p.add_argument("--train-tok-s", type=float, default=1500, help="training tokens/s (fwd+bwd, unsloth)")
    p.add_argument("--fwd-tok-s", type=float, default=3000, help="no-grad forward tokens/s")
    p.add_argument("--decode-tok-s", type=float, default=8, help="greedy decode tokens/s, batch 1")
    p.add_argument("--train-load-s", type=float, default=180, help="load + 4-bit quantize for training")
    p.add_argument("--eval-load-s", type=float, default=180, help="before: the same again in the fresh process")
    p.add_argument("--eval-start-s", type=float, default=20, help="before: the fresh process's start and imports")
    p.add_argument("--current-load-s", type=float, default=2, help="after: the current adapter (tens of MB)")
    p.add_argument("--pod-overhead-s", type=float, default=900,
                   help="provision, image pull, base download, upload, fetch")
    p.add_argument("--generate", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--skip-measure", action="store_true", help="print the seed estimate only")
    a = p.parse_args(argv)
    started = time.time()
    names = ("holdout", "probes", "epochs", "models", "tokens_per_sample", "tokens_per_probe", "train_tok_s",
             "fwd_tok_s", "decode_tok_s", "train_load_s", "eval_load_s", "eval_start_s", "current_load_s",
             "pod_overhead_s", "generate", "max_new_tokens")
    seed = [seed_estimate(a, n) for n in a.samples]
    sensitivity = []
    for key, factor in (("decode_tok_s", 0.5), ("pod_overhead_s", 0.5), ("fwd_tok_s", 0.5)):
        worse = argparse.Namespace(**{**vars(a), key: getattr(a, key) * factor})
        e = seed_estimate(worse, a.samples[0])
        sensitivity.append(f"{key} halved → after {e['after_share']:.1%} ({a.samples[0]} samples)")
    for e in seed:
        print(f"seed estimate, {e['samples']} samples: train {e['train_s']:.0f} s; evaluation before "
              f"{e['before_eval_s']:.0f} s = {e['before_share']:.1%} of pod time, after {e['after_eval_s']:.0f} s = "
              f"{e['after_share']:.1%} (goal < {GOAL:.0%})")
    if a.skip_measure:
        return 0

    from tests.support.memories import write_examples_to
    from tests.support.tiny import build_once

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="mhd-bench-eval-") as tmp_s:
        tmp = Path(tmp_s)
        model, memories = build_once(tmp), write_examples_to(tmp / "memories")
        for i in range(a.repeat):
            m = measure(tmp / f"r{i}", model, memories)
            runs.append(m)
            print(f"run {i + 1}: training {m['train_s']:.1f} s ({m['steps']} steps); evaluation before "
                  f"{m['before_eval_s']:.1f} s ({m['before_eval_s'] / m['train_s']:.1%} of training), after "
                  f"{m['after_eval_s']:.1f} s ({m['after_eval_s'] / m['train_s']:.1%} of training)")
            for s, by_model in m["numbers"].items():
                print(f"  {s}: " + ", ".join(f"{k} in-process {x:.6f} / reloaded {y:.6f}" for k, (x, y)
                                             in by_model.items()))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": round(time.time() - started, 1),
              "runs": runs, "seed": seed, "sensitivity": sensitivity, "assumptions": {k: getattr(a, k) for k in names}}
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    if a.results:
        from benchmarks.bench_padding import RESULTS, update_results

        text = RESULTS.read_text()
        # The hand-written section this benchmark's first version left outside any marker (run_all
        # would drop it on its next rewrite) gives way to the marked one.
        old = text.find("## Quality gate: evaluation vs training")
        if old != -1 and f"<!-- begin:{SECTION} -->" not in text:
            end = text.find("<!-- begin:", old)
            RESULTS.write_text(text[:old] + (text[end:] if end != -1 else ""))
        update_results(section(report), RESULTS, SECTION)
        print(f"updated the {SECTION} section of {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
