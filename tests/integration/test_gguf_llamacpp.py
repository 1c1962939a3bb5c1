"""The strong check: llama.cpp running base GGUF + our LoRA GGUF gives transformers+peft's logits.

Needs llama.cpp (``scripts/setup-llama-cpp``: the ``llama_cpp`` binding, built from source for the
CPU, and llama.cpp's ``convert_hf_to_gguf.py`` in ``.venv/src/llama.cpp`` or ``MHD_LLAMA_CPP_DIR``)
to make the base GGUF and run it. Skipped with the reason without it; failed under CI.

The tiny models' tokenizer is unknown to llama.cpp's pre-tokenizer table, so the base conversion
runs through a small shim that names it (tests/support/llama_cpp.py; the logits are compared on
token ids, the tokenizer's text handling does not enter).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.llama_cpp import llama_cpp_dir, logits, shim_dir  # noqa: F401  (fixture)
from tests.support.tiny import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.llama_cpp
torch = pytest.importorskip("torch")
pytest.importorskip("peft")
import numpy as np  # noqa: E402

from mhd.merge.gguf import convert  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [1, 5, 42, 7, 300, 9, 11, 1000]


def base_gguf(model_dir: Path, out: Path, tmp: Path, converter: Path) -> Path:
    shim = shim_dir(tmp / "llama.cpp", converter)
    r = subprocess.run([sys.executable, str(shim / "convert_hf_to_gguf.py"), str(model_dir),
                        "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def peft_logits(model: Any, tmp: Path) -> tuple[Any, Any, Path]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    p = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS))
    with torch.no_grad():
        for n, prm in p.named_parameters():
            if "lora_B" in n:
                prm.mul_(0.1)  # a realistic-size delta, not one that swamps the base
        ref = p(torch.tensor([IDS])).logits[0].numpy()
        with p.disable_adapter():
            plain = p(torch.tensor([IDS])).logits[0].numpy()
    p.save_pretrained(str(tmp / "adapter"))
    return ref, plain, tmp / "adapter"


def llama_logits(model: Path, lora: Path | None) -> Any:
    return logits(model, IDS, lora)


def check(model_dir: Path, model: Any, tmp: Path, converter: Path) -> None:
    base = base_gguf(model_dir, tmp / "base.gguf", tmp, converter)
    ref, plain, adapter = peft_logits(model, tmp)
    lora = convert(adapter, model_dir / "config.json", tmp / "adapter.gguf", "f32").out
    assert np.abs(llama_logits(base, None) - plain).max() < 1e-3  # the base conversion itself agrees
    got = llama_logits(base, lora)
    assert np.abs(ref - plain).max() > 0.1  # the adapter matters…
    # …and llama.cpp applies it as peft does (measured ~1.4e-4; a wrong q/k row layout gives ~1e-2)
    assert np.abs(got - ref).max() < 1e-3


def test_llamacpp_applies_our_qwen3_lora_like_peft(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                   llama_cpp_dir: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM

    check(tiny_model_dir, AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path,
          llama_cpp_dir)


def test_llamacpp_applies_our_llama_lora_like_peft(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                  llama_cpp_dir: Path) -> None:  # noqa: F811
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model_dir = tmp_path / "llama"
    model.save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, model_dir / f)
    check(model_dir, model, tmp_path, llama_cpp_dir)
