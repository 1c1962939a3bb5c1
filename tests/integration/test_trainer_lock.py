"""The trainer's unsloth calls against the locked unsloth's own source (downloaded, never run).

unsloth needs a CUDA GPU to import, so the signatures are read from its source with ``ast``:
every keyword the trainer passes to ``FastLanguageModel.from_pretrained`` / ``get_peft_model``
must be a named parameter there. ``**kwargs`` does not count: unsloth forwards those to places
that ignore an unknown name, which is exactly the silent drop this test exists to catch.
"""

from __future__ import annotations

import ast
import os
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



# --- the trainer's non-unsloth path with the locked trl/transformers/peft/datasets -------------

# What a CPU box cannot install or run: CUDA wheels and unsloth's GPU kernels. Everything else the
# lock pins differently from this venv is laid over it, from PyPI with the lock's hashes.
GPU_ONLY = ("torch", "torchvision", "torchao", "triton", "xformers", "bitsandbytes", "unsloth", "unsloth-zoo",
            "cut-cross-entropy", "diffusers")
DRIVER = """\
import importlib.metadata as md, json, pathlib, sys
sys.path.insert(0, sys.argv[1])
import train as T
import train_models as M  # where the loaders live and are looked up (train.py only re-exports them)
want = json.loads(sys.argv[3])
got = {n: md.version(n) for n in want}
assert got == want, f"not the lock's versions: {got} != {want}"
# Exactly the GPU path's arguments (backend "unsloth"), less what a CPU cannot do: no half
# precision (bf16/fp16 off) and unsloth's 4-bit loader replaced by the plain fp32 one.
M.pick_backend = lambda: "unsloth"
M.half_dtype = lambda: None
M._load_unsloth = lambda cfg, start=None: M._load_plain(cfg, "cpu")  # start: incremental runs only
M.import_unsloth_first = lambda: None  # unsloth needs a GPU to import; its signatures are checked elsewhere
run = T.RunDir(pathlib.Path(sys.argv[2]))
T.prepare_environment()
trainer, _ = T.build_trainer(T.read_config(run), run, "unsloth")  # SFTConfig + SFTTrainer: where drift shows
a = trainer.args
print("ARGS " + json.dumps({"max_length": a.max_length, "bf16": a.bf16, "fp16": a.fp16, "seed": a.seed,
                            "eval_strategy": str(getattr(a.eval_strategy, "value", a.eval_strategy)),
                            "gradient_checkpointing": a.gradient_checkpointing, "packing": a.packing}))
import trl.trainer.utils as U
if U._ChunkedLogProbFunction is None:
    # trl 1.15.0's SFT loss is a Triton kernel (trl.kernels): on a host without triton it cannot
    # take a step. The pod has triton (in the lock) and CUDA; CPU CI stops after construction.
    print("NO-TRITON")
    sys.exit(0)
sys.exit(T.main(["--run-dir", sys.argv[2]]))
"""


@pytest.fixture(scope="module")
def locked_overlay(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A --target folder with the lock's versions of what differs from this venv (trl, transformers,
    datasets, huggingface-hub, ...): on PYTHONPATH it comes before the venv's site-packages. Cheaper
    on 2 cores than a fresh venv with torch (~30 MB of pure-python wheels, no torch copy)."""
    import importlib.metadata as md

    pins = podlock.parse(podlock.LOCK.read_text())
    overlay = {}
    for name, pin in pins.items():
        if name in GPU_ONLY or name.startswith(("nvidia-", "cuda-")):
            continue
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        if have != pin.version:
            overlay[name] = pin
    tmp = tmp_path_factory.mktemp("locked")
    req = tmp / "overlay.lock"
    req.write_text("".join(f"{p.name}=={p.version} " + " ".join(f"--hash=sha256:{h}" for h in p.hashes) + "\n"
                           for p in overlay.values()))
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--quiet", "--no-deps",
                           "--require-hashes", "--only-binary=:all:", "--index-url", podlock.INDEX_URL,
                           "--target", str(target), "-r", str(req)],
                          env=podlock.pip_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if podlock._UNREACHABLE.search(proc.stderr):
            pytest.skip(f"PyPI cannot be reached; the locked trl/transformers were not installed: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr)
    versions = {n: pins[n].version for n in ("transformers", "trl", "peft", "datasets")}
    return target, versions


def test_plain_path_trains_with_the_locked_libraries_and_the_gpu_paths_sft_arguments(
        locked_overlay: tuple[Path, dict[str, str]], tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    target, versions = locked_overlay
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"What happened on day {i}?"},
                          {"role": "assistant", "content": f"On day {i} I walked by the river."}]} for i in range(6)]
    (run / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (run / "config.json").write_text(json.dumps({
        "base_model": str(tiny_model_dir), "lora_rank": 4, "lora_alpha": 8, "num_train_epochs": 1,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_seq_length": 64,
        "load_in_4bit": True, "save_steps": 2, "logging_steps": 1, "warmup_ratio": 0.1}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MHD_", "PYTHONPATH"))}
    env.update(PYTHONPATH=str(target), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(driver), str(Path(T.__file__).parent), str(run), json.dumps(versions)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("ARGS ")]
    assert json.loads(line[5:]) == {"max_length": 64, "bf16": False, "fp16": False, "seed": 42,
                                    "eval_strategy": "steps", "gradient_checkpointing": False, "packing": False}
    if "NO-TRITON" in proc.stdout:
        pytest.skip("built the trainer with the locked trl/transformers/peft and the GPU path's arguments; "
                    "trl 1.15.0 needs triton to take a training step, which this CPU host lacks")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backend"] == "unsloth" and manifest["steps"] == 3
    assert {n: manifest["versions"][n] for n in ("transformers", "trl", "peft")} == \
        {n: versions[n] for n in ("transformers", "trl", "peft")}
