"""Training throughput on a GPU: the trainer's unsloth path against its plain peft path.

    .venv/bin/python -m benchmarks.bench_gpu                  # on CUDA: both models, both paths
    .venv/bin/python -m benchmarks.bench_gpu --cpu-tiny       # tiny configs on the CPU (CI: the script stays correct)
    .venv/bin/python -m benchmarks.bench_gpu --results        # also writes its section of benchmarks/RESULTS.md

Models are random-init from a config (no hub), written once under benchmarks/out/bench-gpu/ with
the tiny offline tokenizer (its ids are a subset of the models' vocabulary):
  moe     Qwen3-30B-A3B's shape (width 2048, 128 experts, 8 active, 768 per expert) with as many of its
          48 layers as fit --weight-share of the card's memory in bf16
  dense   Qwen3-8B's shape (width 4096, 12288 MLP, 36 layers), layers cut the same way if needed
On --cpu-tiny both shrink to 2 layers of width 64.

Each (model, path) trains in its own process, so unsloth's patches of transformers never reach the
peft run and the peak memory is that run's alone. The process loads mhd/pod/train.py from its file
and calls the trainer's own build_trainer with backend "unsloth" (FastLanguageModel, its LoRA and
its padding-free batching) or "cuda" (transformers + peft, 4-bit when bitsandbytes is installed, the
trainer's padding-free collator); on the CPU the backend is "cpu". Data: the seed-like chats of
bench_padding. After --warmup steps, --steps optimizer steps are timed (CUDA synchronized at each
step end); tokens are the samples' real tokens collated in that window.

Printed per run: tokens/s, peak VRAM (torch's max allocated and reserved), and model FLOP
utilisation = 6 · N_active · tokens/s ÷ the card's bf16 dense peak (N_active: parameters without
the input embedding, experts counted at top_k / num_experts; 6N is the usual forward + backward
estimate, though LoRA skips the frozen weights' gradients, so the real work is nearer 4N). Then
the ratio unsloth ÷ peft of tokens/s. A path that cannot run is reported with the reason (on the
CPU: unsloth needs CUDA), never estimated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._trainer import OUT_DIR, REPO, load_train, write_run

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "gpu"
MODEL_ROOT = OUT_DIR / "bench-gpu"

# bf16 dense tensor-core peak (no sparsity), TFLOP/s, by a substring of torch's device name.
# First match wins, so the specific names come before the general ones.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("RTX 4090", 165.2),
)

VOCAB = 151936  # Qwen3's
MOE = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
       "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
       "num_hidden_layers": 48, "vocab_size": VOCAB, "tie_word_embeddings": False}
DENSE = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "intermediate_size": 12288, "num_hidden_layers": 36, "vocab_size": VOCAB, "tie_word_embeddings": False}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 2048, "tie_word_embeddings": True}
TINY_MOE = {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# The experts of transformers' Qwen3-MoE are fused 3-D parameters, not Linear modules: LoRA (and
# the trainer's default target_modules) reach only the attention there.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---- models ---------------------------------------------------------------------------------------


def hf_config(kind: str, shape: dict[str, Any]) -> Any:
    from transformers import Qwen3Config, Qwen3MoeConfig

    from mhd.devtools.tiny_model import build_tokenizer

    tok: Any = build_tokenizer()
    ids = {"bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cls = Qwen3MoeConfig if kind == "moe" else Qwen3Config
    return cls(max_position_embeddings=4096, **ids, **shape)


def param_counts(kind: str, shape: dict[str, Any]) -> dict[str, int]:
    """Total and active parameters (see the module docstring), counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(kind, shape))
    total = active = 0
    share = shape.get("num_experts_per_tok", 1) / shape.get("num_experts", 1)
    for name, p in model.named_parameters():
        total += p.numel()
        if "embed_tokens" in name:
            continue
        active += round(p.numel() * share) if ".experts." in name else p.numel()
    return {"total": total, "active": active}


def fitted_shape(kind: str, base: dict[str, Any], budget_bytes: float, layers: int | None) -> dict[str, Any]:
    """``base`` with as many layers (up to its own count) as fit ``budget_bytes`` of bf16 weights."""
    if layers is None:
        one = param_counts(kind, {**base, "num_hidden_layers": 1})["total"]
        per_layer = param_counts(kind, {**base, "num_hidden_layers": 2})["total"] - one
        layers = max(1, min(base["num_hidden_layers"], math.floor((budget_bytes / 2 - (one - per_layer)) / per_layer)))
    return {**base, "num_hidden_layers": layers}


def build_model(kind: str, shape: dict[str, Any], device: str) -> Path:
    """Random-init weights + tokenizer in a folder named by the shape; reused when already there."""
    import torch
    from transformers import AutoModelForCausalLM

    from mhd.devtools.tiny_model import build_tokenizer

    key = f"{kind}-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-v{shape['vocab_size']}"
    final = MODEL_ROOT / key
    if (final / "config.json").exists():
        return final
    staging = MODEL_ROOT / f"{key}.building-{os.getpid()}"
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):  # a GPU fills billions of random weights in seconds, a CPU in minutes
        model = AutoModelForCausalLM.from_config(hf_config(kind, shape), dtype=dtype)
    model.save_pretrained(staging)
    tok: Any = build_tokenizer()
    tok.save_pretrained(staging)
    del model
    os.replace(staging, final)  # whole or not at all
    return final


# ---- one measured run (a child process) ------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["backend"] == "unsloth":
        import unsloth  # noqa: F401  (before transformers and trl: it patches them as it is imported)
    import torch
    from transformers import TrainerCallback

    from benchmarks.bench_padding import example_rows, seed_like_rows

    train = load_train()
    train.prepare_environment(Path("/nonexistent"))
    tmp = Path(spec["tmp"])
    rows = seed_like_rows(example_rows(tmp / "dataset"))
    cfg_dict = {"base_model": spec["model_dir"], "target_modules": spec["target_modules"],
                "per_device_train_batch_size": spec["batch_size"], "gradient_accumulation_steps": 1,
                "max_seq_length": spec["max_seq_length"], "load_in_4bit": spec["load_in_4bit"],
                "num_train_epochs": 1000, "save_steps": 10**6, "logging_steps": 1, "lora_dropout": 0.0}
    run = train.RunDir(write_run(tmp / "run", cfg_dict, rows))
    trainer, _ = train.build_trainer(train.read_config(run), run, spec["backend"])
    cuda = torch.cuda.is_available() and spec["backend"] != "cpu"

    collated = [0]
    inner = trainer.data_collator

    def counting(batch: list[dict[str, Any]]) -> Any:
        collated[0] += sum(len(r["input_ids"]) for r in batch)
        return inner(batch)

    trainer.data_collator = counting
    warmup, steps = spec["warmup"], spec["steps"]
    marks: dict[int, tuple[float, int]] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            marks[state.global_step] = (time.perf_counter(), collated[0])
            if state.global_step >= warmup + steps:
                control.should_training_stop = True

    trainer.add_callback(Timer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, n0), (t1, n1) = marks[warmup], marks[warmup + steps]
    out: dict[str, Any] = {"ok": True, "tokens": n1 - n0, "seconds": round(t1 - t0, 3),
                           "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
                           "final_loss": train.final_loss(trainer.state),
                           "padding_free": bool(getattr(trainer.data_collator, "padding_free", False)
                                                or getattr(inner, "padding_free", False))}
    if cuda:
        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_vram_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["device"] = "cpu"
    return out


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_GPU_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return dict(json.loads(lines[-1].removeprefix("BENCH_GPU_RESULT ")))


# ---- the whole benchmark ---------------------------------------------------------------------------


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def gpu_info() -> dict[str, Any] | None:
    """Name and memory of CUDA device 0, from a child process: this one never initialises CUDA."""
    code = ("import json, torch; print(json.dumps({'name': torch.cuda.get_device_name(), "
            "'memory': torch.cuda.get_device_properties(0).total_memory}) if torch.cuda.is_available() else 'null')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    gpu = None if args.cpu_tiny else gpu_info()
    tiny = gpu is None
    peak = peak_tflops(gpu["name"], args.peak_tflops) if gpu else args.peak_tflops
    budget = (gpu["memory"] if gpu else 0) * args.weight_share
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "mode": "cpu-tiny" if tiny else "cuda",
        "device": gpu["name"] if gpu else "cpu", "peak_bf16_tflops": peak,
        "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "load_in_4bit": args.load_in_4bit and not tiny, "models": [],
    }
    if tiny and not args.cpu_tiny:
        report["note"] = "no CUDA device: ran the tiny CPU configuration instead"
    MODEL_ROOT.mkdir(parents=True, exist_ok=True)
    for kind in args.models:
        base = (TINY_MOE if kind == "moe" else TINY) if tiny else (MOE if kind == "moe" else DENSE)
        shape = base if tiny else fitted_shape(kind, base, budget, args.layers)
        counts = param_counts(kind, shape)
        entry: dict[str, Any] = {"model": kind, "layers": shape["num_hidden_layers"],
                                 "params_total": counts["total"], "params_active": counts["active"], "runs": {}}
        with tempfile.TemporaryDirectory(dir=OUT_DIR) as tmp:
            model_dir = build_model(kind, shape, "cpu" if tiny else "cuda")
            spec = {"model_dir": str(model_dir), "target_modules": ATTENTION if kind == "moe" else
                    list(load_train().DEFAULT_TARGETS), "batch_size": args.batch_size,
                    "max_seq_length": args.max_seq_length, "load_in_4bit": args.load_in_4bit and not tiny,
                    "warmup": args.warmup, "steps": args.steps}
            paths = {"unsloth": "unsloth", "peft": "cpu" if tiny else "cuda"}
            for path, backend in paths.items():
                if path == "unsloth" and tiny:
                    entry["runs"][path] = {"ok": False, "error": "not measured: unsloth needs CUDA"}
                    continue
                if path == "unsloth" and not has_unsloth:
                    entry["runs"][path] = {"ok": False, "error": "not measured: unsloth is not installed"}
                    continue
                print(f"=== {kind} ({shape['num_hidden_layers']} layers, {_count(counts['total'])} params) "
                      f"via {path}", flush=True)
                r = run_worker({**spec, "backend": backend, "tmp": str(Path(tmp) / path)}, args.timeout)
                if r.get("ok") and peak:
                    r["mfu"] = round(6 * counts["active"] * r["tokens_per_s"] / (peak * 1e12), 4)
                entry["runs"][path] = r
        u, p = entry["runs"].get("unsloth", {}), entry["runs"].get("peft", {})
        entry["ratio_unsloth_over_peft"] = (round(u["tokens_per_s"] / p["tokens_per_s"], 2)
                                            if u.get("ok") and p.get("ok") else None)
        report["models"].append(entry)
    return report


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def table(report: dict[str, Any]) -> list[str]:
    lines = ["| model | layers | params (active) | path | tokens/s | peak VRAM alloc / reserved (GiB) | MFU | "
             "unsloth ÷ peft |", "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for path, r in m["runs"].items():
            size = f"{_count(m['params_total'])} ({_count(m['params_active'])})"
            ratio = m["ratio_unsloth_over_peft"]
            ratio_s = "n/a" if ratio is None else f"{ratio:.2f}x"
            if not r.get("ok"):
                lines.append(f"| {m['model']} | {m['layers']} | {size} | {path} | {r.get('error')} | — | — | "
                             f"{ratio_s} |")
                continue
            mem = (f"{r['peak_vram_gib']} / {r['peak_vram_reserved_gib']}" if "peak_vram_gib" in r
                   else f"n/a (CPU; peak RSS {r.get('peak_rss_gib')})")
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            lines.append(f"| {m['model']} | {m['layers']} | {size} | {path} | {r['tokens_per_s']:.0f} | {mem} | "
                         f"{mfu} | {ratio_s} |")
    return lines


def section(report: dict[str, Any]) -> list[str]:
    head = [f"<!-- begin:{SECTION} -->", "## Training throughput on a GPU (`benchmarks/bench_gpu.py`, issue 16 §5)", ""]
    how = (f"{report['steps']} timed steps after {report['warmup']} warm-up, micro-batch {report['batch_size']} "
           f"seed-like chats, max_length {report['max_seq_length']}, 4-bit base: {report['load_in_4bit']}. "
           "Raw figures: `benchmarks/out/gpu.json`.")
    if report["mode"] == "cuda":
        body = [f"Written by `python -m benchmarks.bench_gpu --results` on {report['date']}, on "
                f"{report['device']} (bf16 peak {report['peak_bf16_tflops']} TFLOP/s). {how}", ""]
    else:
        body = ["**GPU rows pending**: no GPU was lent to the session that wrote this section. The rows below "
                f"are the CPU check (`--cpu-tiny`, {report['date']}): 2-layer models of width 64, peft path only "
                f"(unsloth needs CUDA), so they show that the script runs, not a speed. {how} On a GPU host: "
                "`.venv/bin/python -m benchmarks.bench_gpu --results` (unsloth installed for its rows; "
                "`--peak-tflops` for a card missing from the table).", ""]
    return [*head, *body, *table(report), "", f"<!-- end:{SECTION} -->"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--cpu-tiny", action="store_true", help="tiny configs on the CPU, even where CUDA is present")
    p.add_argument("--models", nargs="+", choices=("moe", "dense"), default=["moe", "dense"])
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 16 on CUDA, 4 on CPU)")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--layers", type=int, default=None, help="layers of each GPU model (default: what fits)")
    p.add_argument("--weight-share", type=float, default=0.25,
                   help="share of the card's memory the bf16 weights may take when the layers are chosen")
    p.add_argument("--no-4bit", dest="load_in_4bit", action="store_false",
                   help="load the base in bf16 (the trainer's default is 4-bit)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 peak, overriding the table")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per (model, path) run")
    p.add_argument("--out", type=Path, default=OUT_DIR / "gpu.json")
    p.add_argument("--results", action="store_true", help="write this benchmark's section of benchmarks/RESULTS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("BENCH_GPU_RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    cpu = args.cpu_tiny
    args.steps = args.steps or (3 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.batch_size = args.batch_size or (4 if cpu else 16)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = measure(args)
    report["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if report.get("note"):
        print(f"note: {report['note']}")
    print("\n".join(table(report)))
    if args.results:
        from benchmarks.bench_padding import update_results

        update_results(section(report), section_name=SECTION)
        print(f"wrote the {SECTION} section of {RESULTS.relative_to(REPO)}")
    return 0 if all(r.get("ok") or str(r.get("error", "")).startswith("not measured")
                    for m in report["models"] for r in m["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
