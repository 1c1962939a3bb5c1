"""PEFT LoRA adapter → GGUF LoRA adapter (the format llama.cpp's ``--lora`` and Ollama's ADAPTER take).

    python -m mhd.merge.gguf --adapter DIR --base-config config.json --out adapter.gguf [--outtype f16|f32]

Runs in a subprocess of the daemon (numpy + the ``gguf`` package; no torch): the daemon never
imports this module. It reads the adapter's safetensors with a small reader of its own, so bf16
adapters work without torch.

What the file holds, following llama.cpp's own ``convert_lora_to_gguf.py`` conventions:

- ``general.architecture`` = the base's GGUF architecture (llama.cpp refuses an adapter whose
  architecture differs from the model's), ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha`` (float32);
- for every adapted weight ``W`` (GGUF name, e.g. ``blk.3.attn_q.weight``) two tensors
  ``<name>.lora_a`` (numpy shape ``(r, in)``) and ``<name>.lora_b`` (``(out, r)``): the same
  layout as PEFT's ``lora_A`` / ``lora_B``, which in ggml order is ``ne = [in, r]`` / ``[r, out]``
  and matches the base tensor's ``ne = [in, out]`` as llama.cpp checks when it loads;
- llama.cpp applies ``scale * alpha / r`` with ``r`` read from each tensor's shape, which is
  PEFT's ``lora_alpha / r``. Where PEFT scales differently (rsLoRA, ``alpha_pattern``) the
  difference is expressed through ``adapter.lora.alpha`` when it is uniform, else folded into
  ``lora_b``.

Architecture quirk: for ``llama`` the HF→GGUF converter permutes the rows of ``q_proj`` /
``k_proj`` (HF's rotate-half RoPE layout → llama.cpp's interleaved one). A LoRA delta ``B @ A``
must follow its base weight, and permuting rows of ``B @ A`` is permuting rows of ``B``: so
``lora_b`` of ``attn_q`` / ``attn_k`` is permuted, ``lora_a`` never is. ``qwen2`` / ``qwen3`` use
NeoX-style RoPE in llama.cpp and are not permuted.

Refused, with the reason: mixture-of-experts bases, DoRA, LoRA biases, ``modules_to_save`` /
trainable tokens / full ``embed_tokens`` or ``lm_head`` weights (a LoRA file cannot carry them),
LoRA on embeddings, LoRA on a tied ``lm_head``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# HF model_type → (GGUF arch name, permute q/k rows like llama.cpp's LlamaModel does).
_DENSE_ARCHES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
_ARCH_BY_CLASS = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

_ST_DTYPES: dict[str, Any] = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
_F16_MAX = float(np.finfo(np.float16).max)


class ConversionError(Exception):
    """The adapter cannot be converted; the message says why and what to do instead."""


@dataclass(frozen=True)
class LoraTensorPair:
    gguf_name: str  # base tensor name in the GGUF model, e.g. blk.0.attn_q.weight
    hf_module: str  # e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray  # (r, in)
    b: np.ndarray  # (out, r), already permuted/scaled for GGUF


@dataclass(frozen=True)
class ConversionResult:
    out: Path
    arch: str
    alpha: float
    tensors: int
    outtype: str


# Safetensors ------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float arrays (bf16 widened to float32).

    A reader of our own: ``safetensors.numpy`` cannot read bf16, and torch is not wanted here.
    Format: u64 little-endian header length, a JSON header, then the raw little-endian data.
    """
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (n,) = np.frombuffer(raw_len, dtype="<u8")
        if n > 100 * 1024 * 1024:
            raise ConversionError(f"{path}: not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(int(n)))
        base = 8 + int(n)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        buf = data[base + start : base + end]
        if dtype == "BF16":
            # bf16 is the upper half of a float32.
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ConversionError(f"{path}: tensor {name} has dtype {dtype}; expected F32, F16 or BF16")
        out[name] = np.array(arr.reshape(shape), dtype=np.float32)  # copy: detach from the memmap
    return out


# Base model ------------------------------------------------------------------------------------
def _expert_count(cfg: Mapping[str, Any]) -> int:
    for key in _EXPERT_KEYS:
        v = cfg.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return 0


def base_arch(base_cfg: Mapping[str, Any]) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k) for a supported dense base, else ConversionError."""
    cfg = base_cfg.get("text_config") or base_cfg
    model_type = str(cfg.get("model_type") or base_cfg.get("model_type") or "")
    classes = list(base_cfg.get("architectures") or [])
    experts = _expert_count(cfg)
    if experts or "moe" in model_type.lower() or any("moe" in c.lower() for c in classes):
        raise ConversionError(
            f"base model is a mixture-of-experts model (model_type {model_type!r}"
            f"{f', {experts} experts' if experts else ''}): GGUF LoRA conversion supports dense "
            "llama, qwen2 and qwen3 only. For MoE bases use the merged route (merge.route = "
            "\"merged\": the pod builds a merged GGUF) or merge.mode = \"peft\""
        )
    if model_type not in _DENSE_ARCHES:
        model_type = next((_ARCH_BY_CLASS[c] for c in classes if c in _ARCH_BY_CLASS), model_type)
    if model_type not in _DENSE_ARCHES:
        raise ConversionError(
            f"base architecture {model_type or classes!r} is not supported for GGUF LoRA conversion "
            f"(supported: {', '.join(sorted(_DENSE_ARCHES))}); use merge.mode = \"peft\" or the merged route"
        )
    return _DENSE_ARCHES[model_type]


def _head_counts(base_cfg: Mapping[str, Any]) -> tuple[int, int]:
    cfg = base_cfg.get("text_config") or base_cfg
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    return n_head, n_kv


def permute_rows_llama(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation, applied to the rows of ``lora_b`` (out, r).

    Within each head the rows [first half | second half] become interleaved pairs; the same
    reshape → swap → reshape the base weight gets in llama.cpp's converter.
    """
    out, r = b.shape
    if out % (2 * n_head):
        raise ConversionError(f"cannot permute a ({out}, {r}) lora_b over {n_head} heads")
    return b.reshape(n_head, 2, out // n_head // 2, r).swapaxes(1, 2).reshape(out, r)


# Adapter ---------------------------------------------------------------------------------------
def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name by suffix/regex."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return None


def _check_adapter_config(cfg: Mapping[str, Any]) -> None:
    def refuse(why: str) -> None:
        raise ConversionError(f"adapter cannot be converted to a GGUF LoRA: {why}")

    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        refuse(f"peft_type is {cfg.get('peft_type')!r}, only LORA is supported")
    if cfg.get("use_dora"):
        refuse("it is a DoRA adapter (use_dora), which llama.cpp does not apply; use merge.mode = \"peft\"")
    if cfg.get("lora_bias") or cfg.get("bias", "none") not in (None, "none"):
        refuse("it trains biases (lora_bias / bias), which a GGUF LoRA cannot carry")
    if cfg.get("fan_in_fan_out"):
        refuse("fan_in_fan_out adapters (Conv1D bases) are not supported")
    if cfg.get("modules_to_save"):
        refuse(
            f"it carries full weights of {cfg['modules_to_save']} (modules_to_save): a LoRA file holds "
            "only low-rank deltas. Train without modules_to_save (and without added tokens), or use "
            "merge.mode = \"peft\" / the merged route"
        )
    if cfg.get("trainable_token_indices"):
        refuse(
            "it trains embedding rows (trainable_token_indices), which a GGUF LoRA cannot carry; "
            "use merge.mode = \"peft\" or the merged route"
        )
    if cfg.get("target_parameters"):
        refuse("it targets raw parameters (target_parameters, used for MoE experts), which is not supported")
    if cfg.get("layer_replication"):
        refuse("layer_replication changes the model's layer count; not supported")
    if cfg.get("alora_invocation_tokens") or cfg.get("invocation_string"):
        refuse("activated LoRA (aLoRA) adapters are not supported")


def collect_pairs(
    tensors: Mapping[str, np.ndarray],
    adapter_cfg: Mapping[str, Any],
    base_cfg: Mapping[str, Any],
) -> tuple[str, float, list[LoraTensorPair]]:
    """Map PEFT tensors to GGUF names; returns (arch, alpha for the file, pairs)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    _check_adapter_config(adapter_cfg)
    arch, permute = base_arch(base_cfg)
    cfg = base_cfg.get("text_config") or base_cfg
    n_layers = int(cfg["num_hidden_layers"])
    n_head, n_kv = _head_counts(base_cfg)
    name_map = get_tensor_name_map(MODEL_ARCH[arch.upper()], n_layers)

    halves: dict[str, dict[str, np.ndarray]] = {}
    full_weights: list[str] = []
    unknown: list[str] = []
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        if name.endswith(".lora_A.weight"):
            halves.setdefault(name.removesuffix(".lora_A.weight"), {})["A"] = value
        elif name.endswith(".lora_B.weight"):
            halves.setdefault(name.removesuffix(".lora_B.weight"), {})["B"] = value
        elif name.endswith(".base_layer.weight"):
            # PEFT's save_embedding_layers copies the untouched base weight of an adapted
            # lm_head/embed_tokens next to the LoRA; the GGUF base has it already (as llama.cpp's
            # converter, skip it). A resized vocabulary is caught by the shape check below.
            continue
        elif "lora_embedding_" in name:
            raise ConversionError(
                f"adapter cannot be converted to a GGUF LoRA: it puts LoRA on the embeddings ({name}); "
                "train without embed_tokens in target_modules, or use merge.mode = \"peft\""
            )
        elif re.search(r"(embed_tokens|lm_head)\b", name):
            full_weights.append(key)
        else:
            unknown.append(key)
    if full_weights:
        raise ConversionError(
            "adapter cannot be converted to a GGUF LoRA: it carries full embed_tokens/lm_head weights "
            f"({', '.join(sorted(full_weights)[:4])}) — from modules_to_save, trainable tokens or added "
            "tokens. A LoRA file holds only low-rank deltas: train without them, or use merge.mode = "
            "\"peft\" / the merged route"
        )
    if unknown:
        raise ConversionError(
            "adapter cannot be converted to a GGUF LoRA: tensors that are neither lora_A nor lora_B: "
            f"{', '.join(sorted(unknown)[:6])}{' …' if len(unknown) > 6 else ''}"
        )
    if not halves:
        raise ConversionError("adapter holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight)")

    base_alpha = float(adapter_cfg.get("lora_alpha") or adapter_cfg.get("r") or 8)
    rslora = bool(adapter_cfg.get("use_rslora"))
    alpha_pattern: Mapping[str, Any] = adapter_cfg.get("alpha_pattern") or {}
    tied = bool(cfg.get("tie_word_embeddings", base_cfg.get("tie_word_embeddings", False)))

    if tied and any(m.endswith("lm_head") for m in halves):
        raise ConversionError(
            "adapter cannot be converted to a GGUF LoRA: it adapts lm_head, but the base ties "
            "lm_head to the embeddings, which llama.cpp keeps as one tensor; train without "
            "lm_head in target_modules"
        )
    vocab = cfg.get("vocab_size")
    staged: list[tuple[str, str, np.ndarray, np.ndarray, float]] = []
    for module, ab in sorted(halves.items()):
        if "A" not in ab or "B" not in ab:
            raise ConversionError(f"adapter is incomplete: {module} has only lora_{next(iter(ab))}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConversionError(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not fit together")
        if module.endswith("lm_head") and vocab and b.shape[0] != vocab:
            raise ConversionError(
                f"adapter cannot be converted to a GGUF LoRA: its lm_head has {b.shape[0]} rows but the "
                f"base vocabulary has {vocab} (tokens were added in training); use merge.mode = \"peft\""
            )
        gguf_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ConversionError(f"no GGUF tensor corresponds to {module} for architecture {arch}")
        rank = a.shape[0]
        alpha_i = float(_pattern_value(alpha_pattern, module) or base_alpha)
        scale = alpha_i / math.sqrt(rank) if rslora else alpha_i / rank
        if permute and re.search(r"\.attn_q\.weight$", gguf_name):
            b = permute_rows_llama(b, n_head)
        elif permute and re.search(r"\.attn_k\.weight$", gguf_name):
            b = permute_rows_llama(b, n_kv)
        staged.append((gguf_name, module, a, b, scale * rank))  # the alpha llama.cpp would need

    # llama.cpp computes alpha / r per tensor. One alpha for the file when all agree (the usual
    # case: then lora_b is written untouched); any tensor that needs another gets the ratio folded
    # into its lora_b.
    file_alpha = staged[0][4]
    pairs: list[LoraTensorPair] = []
    for gguf_name, module, a, b, needed in staged:
        if not math.isclose(needed, file_alpha, rel_tol=1e-6):
            b = b * np.float32(needed / file_alpha)
        pairs.append(LoraTensorPair(gguf_name, module, a, b))
    pairs.sort(key=lambda p: _natural_key(p.gguf_name))
    return arch, file_alpha, pairs


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# Writing ---------------------------------------------------------------------------------------
def write_gguf(out: Path, arch: str, alpha: float, pairs: Iterable[LoraTensorPair], outtype: str,
               name: str = "mhd adapter") -> int:
    """Write the file atomically (temp name, then rename): a crash never leaves a half file."""
    from gguf import GGUFType, GGUFWriter, Keys

    dtype = {"f16": np.float16, "f32": np.float32}[outtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        writer = GGUFWriter(tmp, arch)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
        for p in pairs:
            for suffix, arr in ((".lora_a", p.a), (".lora_b", p.b)):
                if dtype is np.float16 and float(np.max(np.abs(arr), initial=0.0)) > _F16_MAX:
                    raise ConversionError(f"{p.hf_module}{suffix} overflows float16; use --outtype f32")
                writer.add_tensor(p.gguf_name + suffix, np.ascontiguousarray(arr, dtype=dtype))
                count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def convert(adapter_dir: Path, base_config: Path, out: Path, outtype: str = "f16") -> ConversionResult:
    if outtype not in ("f16", "f32"):
        raise ConversionError(f"outtype {outtype!r}: expected f16 or f32")
    cfg_path = adapter_dir / ADAPTER_CONFIG
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path} is missing: {adapter_dir} is not a PEFT adapter directory")
    if not weights.is_file():
        extra = " (only adapter_model.bin: save the adapter with safe_serialization=True)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise ConversionError(f"{weights} is missing{extra}")
    try:
        adapter_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        base_cfg = json.loads(base_config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read adapter/base config: {exc}") from exc
    arch, alpha, pairs = collect_pairs(read_safetensors(weights), adapter_cfg, base_cfg)
    n = write_gguf(out, arch, alpha, pairs, outtype)
    return ConversionResult(out=out, arch=arch, alpha=alpha, tensors=n, outtype=outtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mhd.merge.gguf", description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    ap.add_argument("--base-config", type=Path, required=True, help="the base model's config.json")
    ap.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    ap.add_argument("--outtype", choices=("f16", "f32"), default="f16")
    args = ap.parse_args(argv)
    try:
        res = convert(args.adapter, args.base_config, args.out, args.outtype)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # One JSON line: the daemon logs it.
    print(json.dumps({"out": str(res.out), "arch": res.arch, "alpha": res.alpha, "tensors": res.tensors,
                      "outtype": res.outtype}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
