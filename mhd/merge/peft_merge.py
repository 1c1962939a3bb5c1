"""Merge a PEFT LoRA adapter into its base model and save the result (safetensors + tokenizer).

    python -m mhd.merge.peft_merge --adapter DIR --base BASE --out OUT [--dtype auto|float32|bfloat16|float16]

A subprocess of the daemon (torch, transformers, peft: the ``merge`` extra). ``BASE`` is a local
directory or a model id already in the Hugging Face cache. The result appears whole or not at
all: everything is written into a temporary sibling directory, ``mhd_merge.json`` last, then
renamed to ``OUT``; a directory holding ``mhd_merge.json`` is complete and is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mhd.hashing import sha256_file

DONE = "mhd_merge.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class MergeFailed(Exception):
    pass


def merge(adapter: Path, base: str, out: Path, dtype: str = "auto") -> Path:
    if (out / DONE).is_file():
        print(f"{out} is already complete", flush=True)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype: object = "auto" if dtype == "auto" else getattr(torch, dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    print(f"loading base {base}", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise MergeFailed(
            f"cannot load the base model {base!r} ({str(exc).splitlines()[0]}): set merge.base_model_path "
            "to a local copy of the model the adapter was trained on"
        ) from exc
    print(f"loading adapter {adapter}", flush=True)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    merged = peft_model.merge_and_unload()
    print(f"saving merged model to {out}", flush=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    # The adapter dir carries the tokenizer when training added to it; else the base's.
    tok_src = str(adapter) if any((adapter / f).exists() for f in _TOKENIZER_FILES) else base
    try:
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
    except (OSError, ValueError) as exc:
        print(f"warning: no tokenizer saved ({exc})", file=sys.stderr, flush=True)
    weights = adapter / "adapter_model.safetensors"
    (tmp / DONE).write_text(json.dumps({
        "base": base,
        "adapter": str(adapter),
        "adapter_sha256": sha256_file(weights) if weights.is_file() else None,
        "dtype": str(merged.dtype),
        "seconds": round(time.monotonic() - t0, 2),
    }, indent=2))
    if out.exists():  # a stale, incomplete result of an earlier crash
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mhd.merge.peft_merge", description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--base", required=True, help="local base model directory or cached model id")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    args = ap.parse_args(argv)
    base_path = Path(args.base).expanduser()
    if args.base.startswith((".", "/", "~")) and not base_path.is_dir():
        print(f"error: base model directory {base_path} does not exist: set merge.base_model_path to a local "
              "copy of the model the adapter was trained on", file=sys.stderr)
        return 2
    if not (args.adapter / "adapter_config.json").is_file():
        print(f"error: {args.adapter} is not a PEFT adapter directory (adapter_config.json missing)",
              file=sys.stderr)
        return 2
    try:
        out = merge(args.adapter, args.base, args.out, args.dtype)
    except (MergeFailed, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
