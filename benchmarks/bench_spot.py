"""A run's expected cost on an interruptible pod with one preemption vs on an on-demand pod (issue 15).

    .venv/bin/python -m benchmarks.bench_spot [--results]

A cost model, not a measurement: every figure is an option (``--help``), printed with the formula.
RunPod bills by the second while a pod exists; a preempted pod stops billing when it is taken
back. With one preemption at a uniformly random moment of training, the run pays:

    on-demand     p_od   * (setup + train + fetch)
    interruptible p_spot * (setup + train + fetch  +  setup + notice + interval/2)
    fallback      p_spot * (setup + train/2)  +  p_od * (setup + notice + interval/2 + train/2 + fetch)

``setup`` is a pod's time before training starts (provisioning, image, base weights, upload; the
new pod pays it again and uploads the checkpoint too, a few MB for a LoRA); ``interval`` the time
between two checkpoints (``save_steps``), of which half is trained again on average; ``notice`` the
seconds until the daemon sees the pod gone (one failed poll, then one provider question). The
"fallback" row is ``max_preemptions = 1`` with ``on_preemption = "resume_on_demand"``.
Pulling each checkpoint during training costs no pod time (it runs beside the trainer).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "spot"
# RTX 5090 on RunPod, from a third-party compilation of RunPod's listed prices (deploybase.ai,
# "RunPod GPU Pricing", March 2026): spot $0.69/h, on-demand $1.22/h. Spot prices move (±15 %
# there); check the console and pass yours.
SPOT_USD_H, ON_DEMAND_USD_H = 0.69, 1.22


def costs(a: argparse.Namespace) -> dict[str, float]:
    base = a.setup_s + a.train_s + a.fetch_s
    redo = a.setup_s + a.notice_s + a.interval_s / 2
    od = a.on_demand_usd_h * base / 3600
    spot0 = a.spot_usd_h * base / 3600
    spot1 = a.spot_usd_h * (base + redo) / 3600
    fallback = (a.spot_usd_h * (a.setup_s + a.train_s / 2)
                + a.on_demand_usd_h * (redo + a.train_s / 2 + a.fetch_s)) / 3600
    per_preemption = a.spot_usd_h * redo / 3600
    return {"on_demand": od, "spot_none": spot0, "spot_one": spot1, "fallback": fallback,
            "per_preemption": per_preemption, "break_even": (od - spot0) / per_preemption,
            "base_s": base, "redo_s": redo}


def table(a: argparse.Namespace, c: dict[str, float]) -> list[str]:
    od = c["on_demand"]

    def row(what: str, usd: float, pod_s: float) -> str:
        return f"| {what} | {pod_s / 60:.0f} min | ${usd:.3f} | {usd / od:.2f}x |"

    return [
        "| run | pod time | cost | vs on-demand |",
        "|---|---|---|---|",
        row(f"on-demand (${a.on_demand_usd_h:.2f}/h)", od, c["base_s"]),
        row(f"interruptible (${a.spot_usd_h:.2f}/h), not preempted", c["spot_none"], c["base_s"]),
        row("interruptible, **one preemption**, resumed on a new interruptible pod", c["spot_one"],
            c["base_s"] + c["redo_s"]),
        row("interruptible, one preemption mid-training, rest on-demand (fallback)", c["fallback"],
            c["base_s"] + c["redo_s"]),
    ]


def verdict(a: argparse.Namespace, c: dict[str, float]) -> str:
    """What the figures say about the defaults, worded from the figures themselves."""
    out = []
    if c["break_even"] < 3:
        out.append(f"With these figures the default `max_preemptions = 3` lets a run go past that "
                   f"({c['break_even']:.1f}); the pod's setup ({a.setup_s / 60:.0f} min, paid again by "
                   "every new pod) is what a preemption costs, so a custom image and a network volume "
                   "holding the base weights shorten it, or lower `max_preemptions`.")
    if c["fallback"] > c["on_demand"]:
        out.append(f"Falling back to on-demand after one preemption mid-training costs "
                   f"{c['fallback'] / c['on_demand']:.2f}x on-demand here (the on-demand pod pays the setup "
                   "again at the higher price): `on_preemption = \"resume\"` is cheaper when spot capacity "
                   "is there; the fallback buys an end to the preemptions, not a lower bill.")
    return " ".join(out)


def update_results(lines: list[str], path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join(lines) + "\n"
    pattern = re.compile(rf"<!-- begin:{SECTION} -->.*?<!-- end:{SECTION} -->\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--spot-usd-h", type=float, default=SPOT_USD_H, help="interruptible price, USD/h")
    p.add_argument("--on-demand-usd-h", type=float, default=ON_DEMAND_USD_H, help="on-demand price, USD/h")
    p.add_argument("--setup-s", type=float, default=900,
                   help="pod time before training: provision, image, base weights, upload")
    p.add_argument("--train-s", type=float, default=2700, help="training (and the export) on the pod")
    p.add_argument("--fetch-s", type=float, default=120, help="fetching the artifacts")
    p.add_argument("--interval-s", type=float, default=300, help="seconds between checkpoints (save_steps)")
    p.add_argument("--notice-s", type=float, default=30, help="until the daemon sees the pod gone")
    p.add_argument("--results", action="store_true", help="update this benchmark's section of benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    c = costs(a)
    rows = table(a, c)
    print("\n".join(rows))
    print(f"one preemption costs ${c['per_preemption']:.3f} ({c['redo_s'] / 60:.0f} min of a second pod); "
          f"interruptible stays cheaper up to {c['break_even']:.1f} preemptions per run")
    if a.results:
        update_results([
            f"<!-- begin:{SECTION} -->",
            "## Interruptible vs on-demand pods: a run's expected cost (`benchmarks/bench_spot.py`, issue 15)",
            "",
            "A cost model, not a measurement (the formula is the script's docstring): RTX 5090 at "
            f"${a.spot_usd_h:.2f}/h interruptible and ${a.on_demand_usd_h:.2f}/h on-demand (a third-party "
            "compilation of RunPod's listed prices, March 2026: check the console, spot prices move); "
            f"{a.setup_s / 60:.0f} min of setup per pod, {a.train_s / 60:.0f} min of training, "
            f"{a.fetch_s / 60:.0f} min of fetch, a checkpoint every {a.interval_s / 60:.0f} min, "
            f"{a.notice_s:.0f} s to notice a preemption.",
            "",
            *rows,
            "",
            f"One preemption costs ${c['per_preemption']:.3f}: a second pod's setup, the notice and half a "
            "checkpoint interval trained again (the checkpoint pulled during training, or on a network "
            "volume, is what the new pod resumes from). Interruptible stays cheaper than on-demand up to "
            f"{c['break_even']:.1f} preemptions per run. " + verdict(a, c),
            "",
            "The e2e test `tests/e2e/test_spot_pods.py` checks the billing this assumes: a run's time and "
            "cost are the sum over its pods, each at its own price.",
            f"<!-- end:{SECTION} -->",
        ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
