"""The trainer's unsloth calls against the locked unsloth's own source (downloaded, never run).

unsloth needs a CUDA GPU to import, so the signatures are read from its source with ``ast``:
every keyword the trainer passes to ``FastLanguageModel.from_pretrained`` / ``get_peft_model``
must be a named parameter there. ``**kwargs`` does not count: unsloth forwards those to places
that ignore an unknown name, which is exactly the silent drop this test exists to catch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from mhd.devtools import podlock
from mhd.pod import train as T

pytestmark = pytest.mark.slow


def _class_method(tree: ast.Module, cls: str, method: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return item
    raise AssertionError(f"{cls}.{method} is not in this unsloth's source")


def named_params(fn: ast.FunctionDef) -> set[str]:
    a = fn.args
    return {p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)}


def unknown_keywords(kwargs: dict[str, Any], params: set[str]) -> list[str]:
    return sorted(set(kwargs) - params)


@pytest.fixture(scope="module")
def unsloth_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The locked unsloth wheel, unpacked (its source only; nothing of it is imported)."""
    version = podlock.parse(podlock.LOCK.read_text())["unsloth"].version
    dest = tmp_path_factory.mktemp("unsloth")
    proc = subprocess.run([sys.executable, "-m", "pip", "--isolated", "download", "--no-deps", "--quiet",
                           "--only-binary=:all:", "--index-url", podlock.INDEX_URL, "-d", str(dest),
                           f"unsloth=={version}"], env=podlock.pip_env(), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        if podlock._UNREACHABLE.search(proc.stderr):
            pytest.skip(f"PyPI cannot be reached; unsloth=={version} was not checked: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr)
    (wheel,) = dest.glob("unsloth-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest / "src", [n for n in zf.namelist() if n.startswith("unsloth/models/")])
    return dest / "src" / "unsloth" / "models"


@pytest.fixture(scope="module")
def signatures(unsloth_src: Path) -> dict[str, set[str]]:
    loader = ast.parse((unsloth_src / "loader.py").read_text())
    llama = ast.parse((unsloth_src / "llama.py").read_text())
    # FastLanguageModel.get_peft_model(model, *args, **kwargs) hands everything to FastLlamaModel's.
    wrapper = _class_method(loader, "FastLanguageModel", "get_peft_model")
    assert "FastLlamaModel.get_peft_model(model, *args, **kwargs)" in ast.unparse(wrapper)
    return {"from_pretrained": named_params(_class_method(loader, "FastLanguageModel", "from_pretrained")),
            "get_peft_model": named_params(_class_method(llama, "FastLlamaModel", "get_peft_model")) - {"model"}}


def _cfg() -> T.TrainConfig:
    return T.TrainConfig.from_dict({"base_model": "Qwen/Qwen3-8B", "load_in_4bit": True})


def test_every_keyword_the_trainer_passes_to_unsloth_is_in_the_locked_signature(
        signatures: dict[str, set[str]]) -> None:
    assert unknown_keywords(T.unsloth_load_kwargs(_cfg(), "bf16"), signatures["from_pretrained"]) == []
    assert unknown_keywords(T.unsloth_peft_kwargs(_cfg()), signatures["get_peft_model"]) == []


def test_a_keyword_the_locked_unsloth_lacks_is_caught(signatures: dict[str, set[str]]) -> None:
    peft = T.unsloth_peft_kwargs(_cfg())
    peft["lora_rank"] = peft.pop("r")  # the trainer's own name, not unsloth's
    assert unknown_keywords(peft, signatures["get_peft_model"]) == ["lora_rank"]
    load = T.unsloth_load_kwargs(_cfg(), "bf16")
    load["max_length"] = load.pop("max_seq_length")
    assert unknown_keywords(load, signatures["from_pretrained"]) == ["max_length"]


def test_signature_reader_ignores_star_kwargs() -> None:
    fn = ast.parse("def f(a, b=1, *args, c=2, **kwargs): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    assert named_params(fn) == {"a", "b", "c"}

