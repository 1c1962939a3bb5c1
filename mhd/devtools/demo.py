"""The README's first command: one full retraining cycle on this machine, no cloud account.

It writes the shipped example memories into a fresh folder *while the daemon watches it*, so
the threshold trigger starts the run; the `local` provider plays the pod and the real trainer
trains a LoRA on a tiny model built offline. It ends with `mhd runs` and leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from mhd.daemon.client import DaemonNotRunning, request
from mhd.devtools.examples import write_examples
from mhd.devtools.tiny_model import build_tiny_model
from mhd.devtools.toml_write import write_config
from mhd.render import render_status

console = Console()


def demo_config(work: Path, model: Path, web: bool) -> Path:
    top: dict[str, Any] = {
        "memory_dir": str(work / "memories"),
        "state_dir": str(work / "state"),
        "threshold": 40,
        "debounce_s": 1.0,
        "poll_interval_s": 0.5,
        "provider": "local",
    }
    sections: dict[str, dict[str, Any]] = {
        "training": {
            "base_model": str(model), "python": sys.executable, "load_in_4bit": False,
            "max_seq_length": 384, "gradient_accumulation_steps": 2, "num_train_epochs": 2,
            "learning_rate": 5e-3, "save_steps": 10, "lora_rank": 8, "lora_alpha": 16,
        },
        "dataset": {"persona_name": "Alex", "min_chars": 20},
        "merge": {"mode": "peft", "base_model_path": str(model)},
        "web": {"enabled": web, "listen": "127.0.0.1:8765"},
    }
    return write_config(work / "config.toml", top, sections)


def _status(sock: Path) -> dict[str, Any] | None:
    try:
        resp = request(sock, "status", timeout=5)
    except (DaemonNotRunning, OSError):
        return None
    st: dict[str, Any] = resp.get("status") or {}
    return st


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("demo-state"), help="Folder for the demo (recreated).")
    ap.add_argument("--timeout", type=float, default=900, help="Give up after this many seconds.")
    ap.add_argument("--no-web", action="store_true", help="Do not serve the status page.")
    args = ap.parse_args(argv)

    work: Path = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "memories").mkdir(parents=True)
    console.rule("[bold]mhd demo")
    t0 = time.monotonic()
    model = build_tiny_model(work / "tiny-model")
    console.print(f"tiny offline model built in {time.monotonic() - t0:.1f}s → {model}")
    config = demo_config(work, model, web=not args.no_web)
    from mhd.config import load_config

    sock = load_config(config, {}).socket_path
    log = (work / "daemon.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHD_")}
    daemon = subprocess.Popen([sys.executable, "-m", "mhd.cli", "--config", str(config), "daemon"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while _status(sock) is None:
            if daemon.poll() is not None:
                console.print(f"[red]daemon exited early; see {work / 'daemon.log'}")
                return 1
            time.sleep(0.2)
        if not args.no_web:
            console.print("status page: http://127.0.0.1:8765/")
        staging = work / "staging"
        files = write_examples(staging)
        console.print(f"writing {len(files)} example memories into {work / 'memories'} (threshold 40) …")
        for src in sorted(staging.rglob("*")):
            if src.is_file():
                dst = work / "memories" / src.relative_to(staging)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                time.sleep(0.02)
        code = _follow(sock, daemon, args.timeout)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        log.close()
    console.rule("the run's journal (mhd logs)")
    subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(config), "logs", "-n", "5"], check=False)
    console.rule("mhd runs")
    subprocess.run([sys.executable, "-m", "mhd.cli", "--config", str(config), "runs"], check=False)
    console.print(f"daemon stopped; everything is under {work} (daemon.log, state/runs/…). "
                  f"Total {time.monotonic() - t0:.0f}s.")
    return code


def _follow(sock: Path, daemon: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen_states: list[str] = []
    run_id = None
    with Live(console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            st = _status(sock)
            if st is None:
                if daemon.poll() is not None:
                    live.console.print("[red]the daemon stopped unexpectedly")
                    return 1
                time.sleep(0.3)
                continue
            live.update(render_status(st))
            if st["state"] not in seen_states[-1:]:
                seen_states.append(st["state"])
                live.console.print(f"→ {st['state']}")
            run_id = st.get("run_id") or run_id
            last = st.get("last_run")
            if st["state"] == "Idle" and run_id and last and last["id"] == run_id:
                live.console.print(f"run {run_id}: {last['outcome']}"
                                   + (f" — {last['error']}" if last.get("error") else ""))
                live.console.print(json.dumps(last["report"], indent=None)[:400])
                if ev := last.get("eval"):
                    live.console.print(f"quality gate: {ev['reason']}")
                return 0 if last["outcome"] == "succeeded" else 1
            time.sleep(0.3)
    console.print("[red]timed out waiting for the run")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
