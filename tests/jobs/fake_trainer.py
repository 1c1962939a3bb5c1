"""A stand-in trainer that follows the remote job protocol exactly, in seconds, without torch.

config.json knobs: fake_steps (10), fake_step_s (0.2), fake_adapter_bytes (262144),
fake_exit (0), fake_checkpoint_every (2). Its checkpoints look like the real trainer's
(``checkpoints/checkpoint-N/`` with ``trainer_state.json`` written last, the newest 2 kept), and it
resumes from the newest complete one, logging the step like the real one does.
``init_adapter`` (incremental training) must name a folder holding adapter_model.safetensors; its
sha256 goes into the manifest (``init_adapter_sha256``).
With export.enabled it also ships a small model.gguf (the merged route's artifact).
"""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def newest_checkpoint(root: Path) -> int:
    """The step of the newest checkpoint whose trainer_state.json (written last) is there."""
    steps = []
    for p in root.glob("checkpoint-*"):
        n = p.name.removeprefix("checkpoint-")
        if n.isdigit() and (p / "trainer_state.json").is_file():
            steps.append(int(json.loads((p / "trainer_state.json").read_text())["global_step"]))
    return max(steps, default=0)


def save_checkpoint(root: Path, step: int) -> None:
    c = root / f"checkpoint-{step}"
    c.mkdir(parents=True, exist_ok=True)
    (c / "adapter_model.safetensors").write_bytes(hashlib.sha256(str(step).encode()).digest() * 128)
    (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for old in sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    d = Path(ap.parse_args().run_dir)
    cfg = json.loads((d / "config.json").read_text())
    steps = int(cfg.get("fake_steps", 10))
    step_s = float(cfg.get("fake_step_s", 0.2))
    every = int(cfg.get("fake_checkpoint_every", 2))
    if not (d / "dataset.jsonl").exists():
        print("fake trainer: dataset.jsonl missing")
        return 2
    if (d / "manifest.json").exists():
        print("fake trainer: manifest present, nothing to do")
        return 0
    init = cfg.get("init_adapter")  # incremental training: the adapter to start from, as the real trainer
    init_sha = None
    if init:
        weights = d / init / "adapter_model.safetensors"
        if not weights.is_file():
            print(f"mhd-train: init_adapter {init}: adapter_model.safetensors is missing")
            return 2
        init_sha = sha(weights)
    start = newest_checkpoint(d / "checkpoints")
    print(f"fake trainer: pid {os.getpid()} starting at step {start}/{steps}", flush=True)
    how = f"resuming at step {start}" if start else "starting"
    print(f"fake trainer: training {steps} steps ({how})", flush=True)
    with (d / "progress.jsonl").open("a") as prog:
        for step in range(start + 1, steps + 1):
            time.sleep(step_s)
            line = {"step": step, "total_steps": steps, "epoch": step / steps * 2, "loss": 3.0 / step,
                    "learning_rate": 2e-4, "samples_per_s": 5.0, "eta_s": (steps - step) * step_s,
                    "time": time.time(), "phase": "train"}
            prog.write(json.dumps(line) + "\n")
            prog.flush()
            if step % every == 0:
                save_checkpoint(d / "checkpoints", step)
    code = int(cfg.get("fake_exit", 0))
    if code:
        print(f"fake trainer: failing on purpose with {code}")
        return code
    ad = d / "adapter"
    ad.mkdir(exist_ok=True)
    # A started adapter differs from its start (and from a fresh one), like one trained further.
    rng = hashlib.sha256((str(cfg.get("seed", 0)) + (f":{init_sha}" if init_sha else "")).encode()).digest()
    size = int(cfg.get("fake_adapter_bytes", 262144))
    (ad / "adapter_model.safetensors").write_bytes((rng * (size // len(rng) + 1))[:size])
    (ad / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    escape = cfg.get("fake_symlink_escape")
    if escape:  # a hostile or broken pod: a manifest entry that is a symlink out of the run dir
        (ad / "escape").symlink_to(escape)
    files = [{"path": f"adapter/{p.name}", "size": p.stat().st_size, "sha256": sha(p)} for p in sorted(ad.iterdir())]
    if (cfg.get("export") or {}).get("enabled"):  # the merged route: a stand-in for the pod-built GGUF
        gguf = d / "model.gguf"
        gguf.write_bytes(b"GGUF" + rng * 64)
        files.append({"path": "model.gguf", "size": gguf.stat().st_size, "sha256": sha(gguf)})
    tmp = d / "manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files, "base_model": cfg.get("base_model"), "final_loss": 3.0 / steps,
                               "steps": steps, "init_adapter_sha256": init_sha}))
    os.replace(tmp, d / "manifest.json")
    print("fake trainer: done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
