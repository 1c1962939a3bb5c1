"""The pod's export (mhd/pod/export.py, run by train.py) on the tiny offline model, CPU only.

Training → merge → llama.cpp's converter → quantize, as the detached job does it; the GGUF is then
run by llama.cpp itself and compared with transformers + peft on the same prompt. Needs llama.cpp
(`scripts/setup-llama-cpp`): skipped without it, failed without it under CI.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from mhd.config import Config, DatasetConfig
from mhd.dataset.build import build_dataset
from mhd.states.model import RunState
from mhd.store import Store
from tests.support.llama_cpp import llama_cpp_dir, logits, shim_dir  # noqa: F401  (fixture)
from tests.support.memories import write_examples_to
from tests.support.ollama_standin import OllamaStandIn, normalize

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]
pytest.importorskip("trl")

TRAINER = Path(__file__).resolve().parents[2] / "mhd" / "pod" / "train.py"
SAMPLES = 16  # ~5 s of training on 2 cores: the export is what these tests are about
PROMPT = [{"role": "user", "content": "How was the walk with Juniper?"}]
GGUF_FILE_TYPE = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}  # llama.cpp's general.file_type values


def trainer_config(model_dir: Path, llama_dir: Path, quantize: str) -> dict[str, Any]:
    return {
        "base_model": str(model_dir), "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "num_train_epochs": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1, "max_seq_length": 128, "load_in_4bit": True, "save_steps": 5,
        "logging_steps": 1, "seed": 42,
        "export": {"enabled": True, "quantize": quantize, "llama_cpp_dir": str(llama_dir)},
    }


def env(tmp: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MHD_"))}
    e.update(HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


@dataclass
class Job:
    dir: Path
    rc: int | None = None
    wall_s: float = 0.0

    def progress(self) -> list[dict[str, Any]]:
        p = self.dir / "progress.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "manifest.json").read_text()))

    def log(self) -> str:
        return (self.dir / "train.log").read_text()

    def start(self, **extra_env: str) -> subprocess.Popen[bytes]:
        with (self.dir / "train.log").open("ab") as log:  # like the launcher: both streams to train.log
            return subprocess.Popen([sys.executable, str(TRAINER), "--run-dir", str(self.dir)], stdout=log,
                                    stderr=subprocess.STDOUT, env={**env(self.dir.parent), **extra_env})

    def finish(self, **extra_env: str) -> Job:
        t0 = time.monotonic()
        self.rc = self.start(**extra_env).wait(timeout=300)
        self.wall_s = time.monotonic() - t0
        return self


def phases(lines: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(p["phase"], p["status"]) for p in lines if p["phase"] in ("merge", "convert", "quantize", "export")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dataset")
    build_dataset(write_examples_to(d / "memories"), d, DatasetConfig(persona_name="Maya"))
    lines = (d / "dataset.jsonl").read_text().splitlines()[:SAMPLES]
    (d / "dataset.jsonl").write_text("\n".join(lines) + "\n")
    return d / "dataset.jsonl"


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:  # noqa: F811
    return shim_dir(tmp_path_factory.mktemp("llama.cpp"), llama_cpp_dir)


def prepare(dest: Path, model_dir: Path, dataset: Path, shim: Path, quantize: str = "q4_K_M") -> Job:
    dest.mkdir(parents=True)
    shutil.copy(dataset, dest / "dataset.jsonl")
    (dest / "config.json").write_text(json.dumps(trainer_config(model_dir, shim, quantize)))
    return Job(dest)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, dataset: Path, shim: Path) -> Job:
    job = prepare(tmp_path_factory.mktemp("exported") / "run", tiny_model_dir, dataset, shim).finish()
    assert job.rc == 0, job.log()[-3000:]
    return job


def peft_logits(model_dir: Path, adapter: Path) -> tuple[Any, Any, list[int]]:
    """(logits with the adapter, logits without it, prompt ids) from transformers + peft, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(adapter).apply_chat_template(PROMPT, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        with model.disable_adapter():
            plain = model(torch.tensor([ids])).logits[0].numpy()
    return ref, plain, list(ids)


def gguf_file_type(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).fields["general.file_type"].contents())


# --- the export ---------------------------------------------------------------------------------


def test_training_then_export_lists_a_quantized_model_gguf_in_the_manifest(exported: Job, tiny_model_dir: Path) -> None:
    m = exported.manifest()
    entry = next(f for f in m["files"] if f["path"] == "model.gguf")
    gguf = exported.dir / "model.gguf"
    assert entry == {"path": "model.gguf", "size": gguf.stat().st_size, "sha256": sha256(gguf)}
    assert m["export"]["enabled"] is True and m["export"]["quantize"] == "Q4_K_M"
    assert (m["export"]["file"], m["export"]["sha256"]) == ("model.gguf", entry["sha256"])
    assert {"merge_s", "convert_s", "quantize_s"} <= set(m["export"])
    assert gguf_file_type(gguf) == GGUF_FILE_TYPE["Q4_K_M"]

    lines = exported.progress()
    first_export = next(i for i, p in enumerate(lines) if p["phase"] == "merge")
    assert all(p["phase"] in ("train", "eval") for p in lines[:first_export])  # export after training
    assert phases(lines) == [("merge", "started"), ("merge", "done"), ("convert", "started"), ("convert", "done"),
                             ("quantize", "started"), ("quantize", "done")]
    assert all("step" not in p for p in lines[first_export:])  # `mhd status` keeps the training step
    assert "export with fresh memory" in exported.log()  # a new process: training memory freed

    assert not (exported.dir / "export").exists()  # the work folder (merged weights, f32 GGUF) is gone
    assert (exported.dir / "adapter" / "base_config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert m["steps"] == json.loads((exported.dir / "trained.json").read_text())["info"]["steps"]


def test_quantized_gguf_runs_in_llama_cpp_and_agrees_with_peft(exported: Job, tiny_model_dir: Path) -> None:
    import numpy as np

    ref, plain, ids = peft_logits(tiny_model_dir, exported.dir / "adapter")
    got = logits(exported.dir / "model.gguf", ids)

    effect = np.abs(ref - plain).max()
    err = np.abs(got - ref).max()
    assert effect > 0.3  # the adapter changes the model…
    print(f"q4_K_M vs peft: max |Δlogit| {err:.4f}, adapter effect {effect:.4f}, min corr "
          f"{min(np.corrcoef(g, r)[0, 1] for g, r in zip(got, ref, strict=True)):.5f}")
    assert err < 0.2 * effect, (err, effect)  # …and q4 noise is small next to it: the merge is in there
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert min(np.corrcoef(g, r)[0, 1] for g, r in zip(got, ref, strict=True)) > 0.99


def test_f16_export_of_an_already_trained_adapter_matches_peft_tightly(
        exported: Job, tmp_path: Path, tiny_model_dir: Path, dataset: Path, shim: Path) -> None:
    import numpy as np

    job = prepare(tmp_path / "run", tiny_model_dir, dataset, shim, quantize="f16")
    shutil.copytree(exported.dir / "adapter", job.dir / "adapter")  # a job whose training had finished
    shutil.copy(exported.dir / "trained.json", job.dir / "trained.json")

    job.finish()

    assert job.rc == 0, job.log()[-3000:]
    assert "not training again" in job.log()
    assert [p for p in job.progress() if p["phase"] == "train"] == []
    # f16 is the converter's own output type: no quantize step
    assert phases(job.progress()) == [("merge", "started"), ("merge", "done"), ("convert", "started"),
                                      ("convert", "done")]
    gguf = job.dir / "model.gguf"
    assert gguf_file_type(gguf) == GGUF_FILE_TYPE["F16"]
    ref, _, ids = peft_logits(tiny_model_dir, job.dir / "adapter")
    err = np.abs(logits(gguf, ids) - ref).max()
    print(f"f16 vs peft: max |Δlogit| {err:.2e}")
    assert err < 1e-3, err


def test_export_killed_during_convert_is_redone_on_relaunch_without_training_again(
        exported: Job, tmp_path: Path, tiny_model_dir: Path, dataset: Path, shim: Path) -> None:
    job = prepare(tmp_path / "run", tiny_model_dir, dataset, shim)

    job.finish(MHD_TRAIN_FAULT="kill@convert")

    assert job.rc == -signal.SIGKILL, job.log()[-3000:]
    assert not (job.dir / "manifest.json").exists()
    assert (job.dir / "export" / "merged" / "config.json").is_file()  # the merge had finished
    assert phases(job.progress())[-1] == ("convert", "started")
    time.sleep(0.5)
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any(str(job.dir) in a for a in p.info["cmdline"] or [])]
    assert leftovers == [], "the converter died with the job (no twin writing the same files later)"
    trained = json.loads((job.dir / "trained.json").read_text())["info"]
    train_lines = [p for p in job.progress() if p["phase"] == "train"]
    adapter_sha = sha256(job.dir / "adapter" / "adapter_model.safetensors")
    lines_before = len(job.progress())

    job.finish()

    assert job.rc == 0, job.log()[-3000:]
    new = job.progress()[lines_before:]
    assert [p for p in new if p["phase"] == "train"] == []
    assert phases(new) == [("convert", "started"), ("convert", "done"), ("quantize", "started"),
                           ("quantize", "done")]  # the merged weights were reused
    assert [p for p in job.progress() if p["phase"] == "train"] == train_lines
    m = job.manifest()
    assert m["steps"] == trained["steps"] == train_lines[-1]["step"]
    assert sha256(job.dir / "adapter" / "adapter_model.safetensors") == adapter_sha
    assert not list(job.dir.rglob("*.tmp-*"))
    # Same data, seed and config as the uninterrupted job: the very same model file.
    assert m["export"]["sha256"] == exported.manifest()["export"]["sha256"]


def test_export_that_cannot_run_ships_the_adapter_with_the_reason(
        exported: Job, tmp_path: Path, tiny_model_dir: Path, dataset: Path, shim: Path) -> None:
    job = prepare(tmp_path / "run", tiny_model_dir, dataset, shim)
    shutil.copytree(exported.dir / "adapter", job.dir / "adapter")
    shutil.copy(exported.dir / "trained.json", job.dir / "trained.json")
    broken = tmp_path / "broken-llama.cpp"
    broken.mkdir()
    (broken / "convert_hf_to_gguf.py").write_text("import sys\nsys.exit('error: this converter is broken')\n")
    cfg = json.loads((job.dir / "config.json").read_text())
    cfg["export"]["llama_cpp_dir"] = str(broken)
    (job.dir / "config.json").write_text(json.dumps(cfg))

    job.finish()

    assert job.rc == 0, job.log()[-3000:]
    m = job.manifest()
    assert [f["path"] for f in m["files"] if not f["path"].startswith("adapter/")] == []
    assert "convert failed (exit 1): error: this converter is broken" in m["export"]["error"]
    assert job.progress()[-1]["phase"] == "export" and job.progress()[-1]["status"] == "failed"


def test_llama_quantize_binary_writes_the_same_model_as_the_binding(
        exported: Job, tmp_path: Path, tiny_model_dir: Path, dataset: Path, shim: Path,
        llama_cpp_dir: Path) -> None:  # noqa: F811
    binary = llama_cpp_dir / "llama-quantize"
    if not binary.is_file():  # optional: the pod's quantizer, built by MHD_LLAMA_QUANTIZE=1 scripts/setup-llama-cpp
        pytest.skip(f"no {binary} (MHD_LLAMA_QUANTIZE=1 scripts/setup-llama-cpp builds it)")
    with_binary = shutil.copytree(shim, tmp_path / "llama.cpp")
    shutil.copy(binary, with_binary / "llama-quantize")
    job = prepare(tmp_path / "run", tiny_model_dir, dataset, with_binary)
    shutil.copytree(exported.dir / "adapter", job.dir / "adapter")
    shutil.copy(exported.dir / "trained.json", job.dir / "trained.json")

    job.finish()

    assert job.rc == 0, job.log()[-3000:]
    assert f"with {with_binary / 'llama-quantize'}" in job.log()
    assert job.manifest()["export"]["sha256"] == exported.manifest()["export"]["sha256"]


# --- registering what the pod built -------------------------------------------------------------


def test_fetched_model_gguf_registers_in_current_ollama_with_alias_and_rollback(exported: Job, tmp_path: Path) -> None:
    from mhd.merge import merge_run, rollback

    store = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    with OllamaStandIn(version="0.34.1") as ollama:
        cfg = Config.model_validate({
            "state_dir": str(tmp_path / "state"),
            "dataset": {"system_prompt": "You are Maya."},
            "merge": {"mode": "ollama", "ollama_url": ollama.url, "keep": 3,
                      "template": "{{ .System }}{{ .Prompt }}"},
        })
        names = []
        for _ in range(2):
            run = store.create_run("test", "local")
            store.update_run(run.id, state=RunState.IDLE)
            out = tmp_path / "runs" / run.id / "output"  # what Fetching leaves
            shutil.copytree(exported.dir / "adapter", out / "adapter")
            shutil.copy(exported.dir / "model.gguf", out / "model.gguf")
            shutil.copy(exported.dir / "manifest.json", out / "manifest.json")
            names.append((run.id, asyncio.run(merge_run(cfg, store, run.id, out / "adapter", print))))
        back = asyncio.run(rollback(cfg, store))

        digest = "sha256:" + exported.manifest()["export"]["sha256"]
        bodies = ollama.create_bodies()
        assert [b["files"] for b in bodies] == [{"model.gguf": digest}] * 2
        assert bodies[0]["system"] == "You are Maya." and bodies[0]["template"] == "{{ .System }}{{ .Prompt }}"
        assert "adapters" not in bodies[0] and "from" not in bodies[0]
        assert ollama.blobs == {digest: (exported.dir / "model.gguf").stat().st_size}
        assert len(ollama.requests_to("/api/blobs", "POST")) == 1  # the second run's identical blob is not re-sent
        assert back == names[0][1]
        assert ollama.models["mhd:latest"]["copied_from"] == normalize(names[0][1])
