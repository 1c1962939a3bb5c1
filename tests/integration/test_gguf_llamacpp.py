"""The strong check: llama.cpp running base GGUF + our LoRA GGUF gives transformers+peft's logits.

Needs two optional things, and skips with the reason when either is missing:

- ``llama_cpp`` (``pip install llama-cpp-python==0.3.36``: builds llama.cpp from source, CPU);
- llama.cpp's own ``convert_hf_to_gguf.py`` with its ``gguf-py`` beside it, to make the base GGUF:
  set ``MHD_LLAMA_CPP_DIR`` to ``vendor/llama.cpp`` of the extracted llama-cpp-python sdist
  (``pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:``).

The tiny models' tokenizer is unknown to llama.cpp's pre-tokenizer table, so the base conversion
runs through a small driver that names it (the logits are compared on token ids; the tokenizer's
text handling does not enter).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama_cpp is not installed (pip install llama-cpp-python==0.3.36)", allow_module_level=True)
_CONVERTER = Path(os.environ.get("MHD_LLAMA_CPP_DIR", "/nonexistent"))
if not (_CONVERTER / "convert_hf_to_gguf.py").is_file():
    pytest.skip("MHD_LLAMA_CPP_DIR does not point at llama.cpp's convert_hf_to_gguf.py (see module docstring)",
                allow_module_level=True)

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
import numpy as np  # noqa: E402

from mhd.merge.gguf import convert  # noqa: E402
from tests.support.tiny import tiny_model_dir  # noqa: F401,E402  (session fixture)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [1, 5, 42, 7, 300, 9, 11, 1000]
DRIVER = """
import runpy, sys
from pathlib import Path
conv = Path(sys.argv[1])
sys.argv = [str(conv / "convert_hf_to_gguf.py"), *sys.argv[2:]]
sys.path[:0] = [str(conv), str(conv / "gguf-py")]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # the tiny BPE is not in its table
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def base_gguf(model_dir: Path, out: Path, tmp: Path) -> Path:
    (tmp / "driver.py").write_text(DRIVER)
    env = dict(os.environ)
    if importlib.util.find_spec("sentencepiece") is None:
        # Qwen's vocab path imports sentencepiece before finding there is no tokenizer.model.
        (tmp / "stub").mkdir(exist_ok=True)
        (tmp / "stub" / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
        env["PYTHONPATH"] = str(tmp / "stub")
    r = subprocess.run([sys.executable, str(tmp / "driver.py"), str(_CONVERTER), str(model_dir),
                        "--outfile", str(out), "--outtype", "f32"], env=env, capture_output=True, text=True,
                       timeout=300)
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
    import llama_cpp

    kw: dict[str, Any] = {"model_path": str(model), "n_ctx": 64, "logits_all": True, "verbose": False}
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = llama_cpp.Llama(**kw)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


def check(model_dir: Path, model: Any, tmp: Path) -> None:
    base = base_gguf(model_dir, tmp / "base.gguf", tmp)
    ref, plain, adapter = peft_logits(model, tmp)
    lora = convert(adapter, model_dir / "config.json", tmp / "adapter.gguf", "f32").out
    assert np.abs(llama_logits(base, None) - plain).max() < 1e-3  # the base conversion itself agrees
    got = llama_logits(base, lora)
    assert np.abs(ref - plain).max() > 0.1  # the adapter matters…
    # …and llama.cpp applies it as peft does (measured ~1.4e-4; a wrong q/k row layout gives ~1e-2)
    assert np.abs(got - ref).max() < 1e-3


def test_llamacpp_applies_our_qwen3_lora_like_peft(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM

    check(tiny_model_dir, AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path)


def test_llamacpp_applies_our_llama_lora_like_peft(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model_dir = tmp_path / "llama"
    model.save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, model_dir / f)
    check(model_dir, model, tmp_path)
