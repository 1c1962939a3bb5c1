"""llama.cpp for tests: where its converter is, a converter folder that knows the tiny tokenizer,
and llama.cpp's logits for a prompt.

    scripts/setup-llama-cpp      # once: llama_cpp binding + converter in .venv/src/llama.cpp

Tests that need it take the ``llama_cpp_dir`` fixture (and carry ``@pytest.mark.llama_cpp``).
Without llama.cpp they are skipped with the reason, except under CI (env ``CI`` set), where
they fail: a CI that silently stopped running them would be worse than one that fails.

The converter location: env ``MHD_LLAMA_CPP_DIR``, else ``.venv/src/llama.cpp`` of this checkout.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / ".venv" / "src" / "llama.cpp"
SETUP_HINT = "run scripts/setup-llama-cpp (or set MHD_LLAMA_CPP_DIR to llama.cpp's source folder)"

# Runs llama.cpp's converter with one change: the tiny test tokenizer is not in llama.cpp's table
# of known BPE pre-tokenizers, so it is named as Qwen2's (the tests compare logits on token ids;
# the pre-tokenizer's text handling never enters). Everything else is the real converter.
SHIM = '''\
import runpy, sys
from pathlib import Path
REAL = Path({real!r})
sys.path[:0] = [str(Path(__file__).resolve().parent / "stub"), str(REAL), str(REAL / "gguf-py")]
sys.argv[0] = str(REAL / "convert_hf_to_gguf.py")
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def converter_dir() -> Path:
    return Path(os.environ.get("MHD_LLAMA_CPP_DIR") or DEFAULT_DIR)


def missing() -> str | None:
    """Why llama.cpp cannot be used here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"the llama_cpp module is not installed: {SETUP_HINT}"
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return f"no convert_hf_to_gguf.py in {converter_dir()}: {SETUP_HINT}"
    return None


def require() -> Path:
    """The converter folder; skip (or, under CI, fail) when llama.cpp is not set up."""
    why = missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"llama.cpp tests must run in CI: {why}")
        pytest.skip(why)
    return converter_dir()


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    return require()


def shim_dir(dest: Path, real: Path | None = None) -> Path:
    """A folder that works as ``llama_cpp_dir`` for the tiny models: its convert_hf_to_gguf.py is
    the real one behind the pre-tokenizer shim. No llama-quantize in it: quantizing falls back to
    the llama_cpp binding, the path a CPU test can take."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "convert_hf_to_gguf.py").write_text(SHIM.format(real=str(real or converter_dir())))
    if importlib.util.find_spec("sentencepiece") is None:
        # The converter's Qwen path imports sentencepiece before it finds no tokenizer.model.
        (dest / "stub").mkdir(exist_ok=True)
        (dest / "stub" / "sentencepiece.py").write_text("class SentencePieceProcessor:\n    pass\n")
    return dest


def logits(model: Path, ids: list[int], lora: Path | None = None) -> Any:
    """llama.cpp's logits for every position of ``ids`` (rows = positions), as a numpy array."""
    import llama_cpp
    import numpy as np

    kw: dict[str, Any] = {"model_path": str(model), "n_ctx": max(64, len(ids) + 8), "logits_all": True,
                          "verbose": False, "seed": 0}
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = llama_cpp.Llama(**kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
