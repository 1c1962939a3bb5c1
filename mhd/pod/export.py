#!/usr/bin/env python3
"""mhd's export on the pod: LoRA adapter → merged model → GGUF → quantized ``model.gguf``.

Current Ollama (>= 0.34.1) takes only merged models, and building one needs the full base weights,
which the pod already has (DESIGN.md, "Merging"). ``train.py`` runs this after training, inside the
same detached job, when ``config.json`` says ``"export": {"enabled": true, ...}``. It is uploaded
next to ``train.py`` and, like it, imports only the standard library at module level (torch, peft
and transformers once the export starts).

Three phases, each written to a temporary name and renamed when complete, so a job killed midway
resumes at the first phase whose output is missing (``train.py`` never retrains for it):

    merge     base (reloaded unquantized: bf16 on a GPU, fp32 on CPU) + adapter → export/merged/
    convert   llama.cpp's convert_hf_to_gguf.py → export/model-<f32|f16|bf16>.gguf
              (or straight to model.gguf when the target type is one the converter writes)
    quantize  llama-quantize (binary in llama_cpp_dir or on PATH, else the llama_cpp Python
              binding's llama_model_quantize) → model.gguf

Each phase appends ``{"phase": ..., "status": "started"|"done", ...}`` to progress.jsonl. The
tools run in child processes that die with this one (PR_SET_PDEATHSIG), so a killed job leaves no
converter behind to race the relaunch's.

Also a small command line for those children (not for people):
    export.py child PPID PROGRAM ARGS...        die with PPID, then exec PROGRAM
    export.py quantize-binding SRC DST TYPE N    quantize through the llama_cpp binding
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_LLAMA_CPP_DIR = "/opt/llama.cpp"
DEFAULT_QUANTIZE = "Q4_K_M"
CONVERTER = "convert_hf_to_gguf.py"
QUANTIZER = "llama-quantize"
MODEL_GGUF = "model.gguf"
WORK_DIR = "export"
# llama.cpp's names for the types mhd accepts. The i-quants are left out: they need an
# importance matrix, which mhd does not compute.
QUANT_TYPES: dict[str, str] = {n.lower(): n for n in (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
    "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")}
# Types convert_hf_to_gguf.py writes itself (its --outtype): no quantize step for these.
CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")
# A job killed this many times during the export gives up on it and ships the adapter alone
# (a kill that repeats is most likely the host's OOM killer; retrying cannot help).
MAX_ATTEMPTS = 2
# Room left on the disk besides the export's own files, so logs and checkpoints can still be written.
DISK_MARGIN = 1 << 30
# Test seam: "kill@merge" | "kill@convert" | "kill@quantize" SIGKILLs this process mid-phase.
FAULT_ENV = "MHD_TRAIN_FAULT"
_TOKENIZER_SKIP = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                   "base_config.json")


class ExportProblem(Exception):
    """The export cannot be done: one line naming what and what to do."""


def canonical_quant(name: object) -> str:
    """``q4_k_m`` → ``Q4_K_M``; ValueError for a type mhd does not accept."""
    if isinstance(name, str) and name.strip().lower() in QUANT_TYPES:
        return QUANT_TYPES[name.strip().lower()]
    raise ValueError(f"quantize = {name!r}: expected one of {', '.join(QUANT_TYPES.values())}")


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = False
    quantize: str = DEFAULT_QUANTIZE
    llama_cpp_dir: str = DEFAULT_LLAMA_CPP_DIR

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportConfig:
        """ValueError (naming the key) for a bad value; unknown keys are ignored."""
        enabled = data.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ValueError(f"export.enabled = {enabled!r}: expected true or false")
        try:
            quantize = canonical_quant(data.get("quantize") or DEFAULT_QUANTIZE)
        except ValueError as exc:
            raise ValueError(f"export.{exc}") from None
        llama_cpp_dir = data.get("llama_cpp_dir") or DEFAULT_LLAMA_CPP_DIR
        if not isinstance(llama_cpp_dir, str):
            raise ValueError(f"export.llama_cpp_dir = {llama_cpp_dir!r}: expected a path")
        return cls(enabled=enabled, quantize=quantize, llama_cpp_dir=llama_cpp_dir)

    @property
    def direct(self) -> bool:
        """The converter writes the target type itself."""
        return self.quantize in CONVERTER_TYPES


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mhd-export: {msg}", flush=True)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def find_quantizer(llama_cpp_dir: Path) -> Path | None:
    """The llama-quantize binary: in llama_cpp_dir (or its build/bin), else on PATH."""
    for p in (llama_cpp_dir / QUANTIZER, llama_cpp_dir / "build" / "bin" / QUANTIZER):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which(QUANTIZER)
    return Path(found) if found else None


def has_binding() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_tools(cfg: ExportConfig) -> str:
    """Fail before any work if llama.cpp is not there; returns how quantizing will be done."""
    d = Path(cfg.llama_cpp_dir)
    if not (d / CONVERTER).is_file():
        raise ExportProblem(
            f"llama.cpp's {CONVERTER} is not in {d}: use the mhd trainer image (it has llama.cpp in "
            f"{DEFAULT_LLAMA_CPP_DIR}) or set merge.llama_cpp_dir to where the pod has it")
    if cfg.direct:
        return "converter"
    binary = find_quantizer(d)
    if binary is not None:
        return str(binary)
    if has_binding():
        return "llama_cpp binding"
    raise ExportProblem(
        f"no {QUANTIZER} in {d} or on PATH and no llama_cpp Python module: cannot quantize to "
        f"{cfg.quantize} (use the mhd trainer image, or merge.quantize = \"q8_0\" which the converter writes)")


class Exporter:
    """One run's export. ``run()`` is idempotent and resumes at the first missing phase output."""

    def __init__(self, root: Path, adapter: Path, base_model: str, cfg: ExportConfig,
                 progress: Callable[[dict[str, Any]], None], log: Callable[[str], None] = _log) -> None:
        self.root, self.adapter, self.base_model, self.cfg = root, adapter, base_model, cfg
        self.work = root / WORK_DIR
        self.out = root / MODEL_GGUF
        self.progress, self.log = progress, log
        self.times: dict[str, float] = {}
        fault = os.environ.get(FAULT_ENV, "")
        self.kill_in = fault[5:] if fault.startswith("kill@") else None

    # -- the whole export ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Build model.gguf (unless already there); return the manifest's ``export`` entry."""
        if not self.out.is_file():
            how = check_tools(self.cfg)
            self.work.mkdir(parents=True, exist_ok=True)
            self._count_attempt()
            self._remove_temporaries()
            gguf = self._existing_gguf()
            if gguf is None:
                gguf = self.convert(self.merge())
            if gguf != self.out:
                self.quantize(gguf, how)
        info = {"file": MODEL_GGUF, "quantize": self.cfg.quantize, "size": self.out.stat().st_size,
                "sha256": sha256_file(self.out), **{f"{k}_s": round(v, 2) for k, v in self.times.items()}}
        shutil.rmtree(self.work, ignore_errors=True)
        return info

    def _count_attempt(self) -> None:
        attempts = self.work / "attempts"
        before = len(attempts.read_text().split()) if attempts.exists() else 0
        if before >= MAX_ATTEMPTS:
            raise ExportProblem(
                f"the export was interrupted {before} times (the job was killed: out of host memory?); "
                "shipping the adapter alone. See train.log")
        with attempts.open("a") as fh:
            fh.write(f"{int(time.time())}\n")

    def _remove_temporaries(self) -> None:
        """Leftovers of a killed attempt: half-written outputs under a .tmp-<pid> name."""
        for p in [*self.work.glob("*.tmp-*"), *self.root.glob(f"{MODEL_GGUF}.tmp-*")]:
            self.log(f"removing {p.name} (left by an interrupted export)")
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _existing_gguf(self) -> Path | None:
        """A finished conversion from an earlier attempt (then the merged weights are garbage)."""
        found = sorted(self.work.glob("model-*.gguf"))
        if found:
            self.log(f"{found[0].name} was converted by an earlier attempt; not merging or converting again")
            shutil.rmtree(self.work / "merged", ignore_errors=True)
            return found[0]
        return None

    @contextmanager
    def phase(self, name: str, **extra: Any) -> Iterator[None]:
        self.progress({"phase": name, "status": "started", "time": time.time(), **extra})
        self.log(f"{name}: started")
        t0 = time.monotonic()
        yield
        self.times[name] = elapsed = time.monotonic() - t0
        self.progress({"phase": name, "status": "done", "elapsed_s": round(elapsed, 2), "time": time.time(),
                       **extra})
        self.log(f"{name}: done in {elapsed:.1f} s")

    def _fault(self, name: str) -> None:
        if self.kill_in == name:
            self.log(f"{FAULT_ENV}: killing the job during {name}")
            os.kill(os.getpid(), signal.SIGKILL)

    # -- phases -------------------------------------------------------------------------------
    def merge(self) -> Path:
        merged = self.work / "merged"
        if (merged / "config.json").is_file():
            self.log("merged weights were saved by an earlier attempt; not merging again")
            return merged
        with self.phase("merge"):
            import gc

            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            self._refuse_prequantized()
            stored = base_weight_bytes(self.base_model)
            if stored:  # fail in seconds, not after minutes of loading (the check below is exact)
                self.need_space(2 * stored, "the merged weights and their GGUF")
            cuda = torch.cuda.is_available()
            # A 4-bit (QLoRA) run trained on quantized weights; the merge reloads the base unquantized.
            dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
            kwargs: dict[str, Any] = {"dtype": dtype}
            if cuda:
                kwargs["device_map"] = "auto"  # GPU first, the rest in host memory
            base = AutoModelForCausalLM.from_pretrained(self.base_model, **kwargs)
            model = PeftModel.from_pretrained(base, str(self.adapter)).merge_and_unload()
            self._fault("merge")
            nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            # Peak: the merged weights and the converted GGUF side by side (then the first is deleted).
            self.need_space(2 * nbytes, "the merged weights and their GGUF")
            tmp = self.work / f"merged.tmp-{os.getpid()}"
            model.save_pretrained(str(tmp), max_shard_size="5GB")
            for f in self.adapter.iterdir():  # tokenizer + chat template, as trained
                if f.is_file() and f.name not in _TOKENIZER_SKIP:
                    shutil.copy2(f, tmp / f.name)
            os.replace(tmp, merged)
            del model, base
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return merged

    def _refuse_prequantized(self) -> None:
        from transformers import AutoConfig

        qc = getattr(AutoConfig.from_pretrained(self.base_model), "quantization_config", None)
        if qc:
            raise ExportProblem(
                f"base_model {self.base_model!r} is stored quantized ({_quant_method(qc)}); a merged GGUF needs "
                "full-precision weights: train on the full-precision repository (load_in_4bit quantizes it "
                "on load)")

    def convert(self, merged: Path) -> Path:
        if self.cfg.direct:
            outtype, target = self.cfg.quantize.lower(), self.out
        else:
            outtype = _weights_type(merged)
            target = self.work / f"model-{outtype}.gguf"
        with self.phase("convert", outtype=outtype):
            tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            converter = Path(self.cfg.llama_cpp_dir) / CONVERTER
            self._tool("convert", [sys.executable, str(converter), str(merged), "--outfile", str(tmp),
                                   "--outtype", outtype])
            _fsync(tmp)
            os.replace(tmp, target)
        shutil.rmtree(merged, ignore_errors=True)
        return target

    def quantize(self, src: Path, how: str) -> None:
        with self.phase("quantize", quantize=self.cfg.quantize):
            tmp = self.out.with_name(f"{MODEL_GGUF}.tmp-{os.getpid()}")
            threads = str(os.cpu_count() or 1)
            if how == "llama_cpp binding":
                argv = [sys.executable, str(Path(__file__).resolve()), "quantize-binding", str(src), str(tmp),
                        self.cfg.quantize, threads]
            else:
                argv = [how, str(src), str(tmp), self.cfg.quantize, threads]
            self.log(f"quantizing {src.name} to {self.cfg.quantize} with {how}")
            self._tool("quantize", argv)
            _fsync(tmp)
            os.replace(tmp, self.out)
        src.unlink(missing_ok=True)

    # -- helpers ------------------------------------------------------------------------------
    def need_space(self, nbytes: int, what: str) -> None:
        free = shutil.disk_usage(self.work).free
        if free < nbytes + DISK_MARGIN:
            raise ExportProblem(
                f"the export needs ~{(nbytes + DISK_MARGIN) / 1e9:.1f} GB free in {self.work} for {what}, "
                f"{free / 1e9:.1f} GB are free: raise runpod.disk_gb")

    def _tool(self, name: str, argv: list[str]) -> None:
        """Run one tool in a child that dies with us; relay its output; ExportProblem on failure."""
        wrapped = [sys.executable, str(Path(__file__).resolve()), "child", str(os.getpid()), *argv]
        tail: deque[str] = deque(maxlen=20)
        with subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", bufsize=1) as proc:
            assert proc.stdout is not None
            for n, line in enumerate(proc.stdout):
                print(line, end="", flush=True)
                if line.strip():
                    tail.append(line.strip())
                if n == 0:
                    self._fault(name)  # the tool is running: a kill now is a kill mid-phase
            rc = proc.wait()
        if rc != 0:
            last = next((t for t in reversed(tail) if "error" in t.lower()), tail[-1] if tail else "no output")
            raise ExportProblem(f"{name} failed (exit {rc}): {_one_line(last)}")


def base_weight_bytes(base_model: str) -> int | None:
    """The base's stored weight size (local folder or HF cache, never a download), if known."""
    local = Path(base_model)
    if local.is_dir():
        return sum(p.stat().st_size for p in local.glob("*.safetensors")) or None
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(base_model, "model.safetensors.index.json")
        if isinstance(index, str):
            return int(json.loads(Path(index).read_text())["metadata"]["total_size"])
        single = try_to_load_from_cache(base_model, "model.safetensors")
        if isinstance(single, str):
            return Path(single).stat().st_size
    except Exception:  # an estimate only: the exact check after the merge still holds
        return None
    return None


def _quant_method(qc: Any) -> str:
    if isinstance(qc, dict):
        return str(qc.get("quant_method", "quantized"))
    return str(getattr(qc, "quant_method", "quantized"))


def _weights_type(merged: Path) -> str:
    """The converter outtype that keeps the merged weights exactly: bf16, f16 or f32."""
    try:
        cfg = json.loads((merged / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


# --- children -----------------------------------------------------------------------------


def _die_with_parent(ppid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (kept across exec)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:  # the parent died before prctl took effect
        os._exit(137)


def quantize_with_binding(src: str, dst: str, qtype: str, threads: int) -> int:
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        print(f"error: this llama_cpp has no quantization type {qtype}", file=sys.stderr, flush=True)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
    if rc != 0:
        print(f"error: llama_model_quantize returned {rc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _child_main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "child":
        _die_with_parent(int(argv[1]))
        os.execv(argv[2], argv[2:])
    if len(argv) == 5 and argv[0] == "quantize-binding":
        return quantize_with_binding(argv[1], argv[2], argv[3], int(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
