"""What the quality gate's Evaluating phase costs next to training (issue 13: < 5 % of pod time).

    .venv/bin/python -m benchmarks.bench_eval

Measured: the real trainer (mhd/pod/train.py) on the tiny offline model and the bundled example
memories (10 % held out, the 60+ probes), with the evaluation enabled, as the detached job runs
it. Training seconds come from trained.json, evaluation seconds from eval.json (model load
included in both). Then an estimate for the seed case from a stated cost model, printed with its
formula: a tiny model says nothing about a 30B MoE's absolute speed, only about the shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def measure(work: Path) -> dict[str, Any]:
    from mhd.config import DatasetConfig
    from mhd.dataset.build import build_dataset
    from tests.integration.test_trainer import env, trainer_config
    from tests.support.memories import write_examples_to
    from tests.support.tiny import build_once

    model = build_once(work)
    run = work / "run"
    run.mkdir()
    build_dataset(write_examples_to(work / "memories"), run, DatasetConfig(persona_name="Maya", holdout_fraction=0.1))
    shutil.copyfile(REPO / "mhd" / "quality" / "probe.jsonl", run / "probe.jsonl")
    cfg = {**trainer_config(model), "evaluate": {"enabled": True, "generate": 3, "max_new_tokens": 48}}
    (run / "config.json").write_text(json.dumps(cfg))
    with (run / "train.log").open("wb") as log:
        rc = subprocess.call([sys.executable, str(REPO / "mhd" / "pod" / "train.py"), "--run-dir", str(run)],
                             stdout=log, stderr=subprocess.STDOUT, env=env(work))
    if rc != 0:
        raise SystemExit(f"trainer failed (rc {rc}):\n{(run / 'train.log').read_text()[-2000:]}")
    trained = json.loads((run / "trained.json").read_text())["info"]
    ev = json.loads((run / "eval.json").read_text())
    return {"train_s": trained["wall_time_s"], "eval_s": ev["seconds"], "steps": trained["steps"],
            "heldout": ev["heldout"], "probe": ev["probe"]}


def seed_estimate(a: argparse.Namespace) -> dict[str, float]:
    """Seconds of each part, from the cost model printed by main()."""
    train_tokens = a.samples * (1 - a.holdout) * a.epochs * a.tokens_per_sample
    eval_tokens = (a.samples * a.holdout * a.tokens_per_sample + a.probes * a.tokens_per_probe) * a.models
    train_s = a.train_load_s + train_tokens / a.train_tok_s
    eval_s = a.eval_load_s + eval_tokens / a.fwd_tok_s + a.generate * 2 * a.max_new_tokens / a.decode_tok_s
    pod_s = a.pod_overhead_s + train_s + eval_s
    return {"train_s": train_s, "eval_s": eval_s, "pod_s": pod_s, "share": eval_s / pod_s,
            "share_of_training": eval_s / train_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Seed case (Qwen3-30B-A3B, 4-bit, one H100): assumptions, override them with measured values.
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--probes", type=int, default=66)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--models", type=int, default=3, help="forward passes per set: base, new, current")
    p.add_argument("--tokens-per-sample", type=int, default=400)
    p.add_argument("--tokens-per-probe", type=int, default=60)
    p.add_argument("--train-tok-s", type=float, default=1500, help="training tokens/s (fwd+bwd, unsloth)")
    p.add_argument("--fwd-tok-s", type=float, default=3000, help="no-grad forward tokens/s (transformers)")
    p.add_argument("--decode-tok-s", type=float, default=8, help="greedy decode tokens/s, batch 1")
    p.add_argument("--train-load-s", type=float, default=180, help="load + 4-bit quantize for training")
    p.add_argument("--eval-load-s", type=float, default=180, help="the same again in the fresh process")
    p.add_argument("--pod-overhead-s", type=float, default=900,
                   help="provision, image pull, base download, upload, fetch")
    p.add_argument("--generate", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--skip-measure", action="store_true")
    a = p.parse_args(argv)

    if not a.skip_measure:
        with tempfile.TemporaryDirectory(prefix="mhd-bench-eval-") as tmp:
            m = measure(Path(tmp))
        h, pr = m["heldout"], m["probe"]
        print(f"tiny model, {m['steps']} steps: training {m['train_s']:.1f} s, evaluation {m['eval_s']:.1f} s "
              f"-> evaluation / training = {m['eval_s'] / m['train_s']:.1%}")
        print(f"  held-out ({h['count']} samples, {h['tokens']} tokens): base {h['base']:.4f} new {h['new']:.4f} "
              f"(new/base {h['new'] / h['base']:.4f})")
        print(f"  probe ({pr['count']} samples, {pr['tokens']} tokens): base {pr['base']:.4f} new {pr['new']:.4f} "
              f"(new/base {pr['new'] / pr['base']:.4f})")
    e = seed_estimate(a)
    print("seed case estimate (assumptions are the options; see --help):")
    print("  train_s = train_load_s + samples*(1-holdout)*epochs*tokens_per_sample / train_tok_s")
    print("  eval_s  = eval_load_s + models*(samples*holdout*tokens_per_sample + probes*tokens_per_probe)"
          " / fwd_tok_s + generate*2*max_new_tokens / decode_tok_s")
    print("  pod_s   = pod_overhead_s + train_s + eval_s")
    print(f"  train {e['train_s']:.0f} s, eval {e['eval_s']:.0f} s, pod {e['pod_s']:.0f} s -> evaluation is "
          f"{e['share']:.1%} of pod time ({e['share_of_training']:.1%} of training); goal < 5 %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
