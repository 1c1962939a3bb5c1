"""benchmarks/bench_gpu.py on the CPU (--cpu-tiny): the script that waits for a GPU stays correct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[2]
PEAK_TFLOPS = 0.5  # a made-up peak, so that the MFU column is computed on the CPU too


def run_bench(out: Path) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--cpu-tiny", "--steps", "2",
                           "--peak-tflops", str(PEAK_TFLOPS), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_cpu_tiny_run_reports_peft_and_says_unsloth_was_not_measured(tmp_path: Path) -> None:
    proc, report = run_bench(tmp_path / "gpu.json")
    assert report["mode"] == "cpu-tiny" and report["device"] == "cpu"
    assert [m["model"] for m in report["models"]] == ["moe", "dense"]
    for m in report["models"]:
        assert 0 < m["params_active"] < m["params_total"], "the input embedding is never active"
        peft, unsloth = m["runs"]["peft"], m["runs"]["unsloth"]
        # The trainer's real path ran: its padding-free collator, a finite loss, real tokens counted.
        assert peft["ok"] and peft["padding_free"] and peft["tokens"] > 0 and peft["tokens_per_s"] > 0
        assert peft["final_loss"] is not None
        assert peft["mfu"] == pytest.approx(6 * m["params_active"] * peft["tokens_per_s"] / (PEAK_TFLOPS * 1e12),
                                            abs=1e-4)
        # No CUDA: unsloth is reported as not measured, and there is no ratio to fake.
        assert not unsloth["ok"] and "unsloth needs CUDA" in unsloth["error"]
        assert m["ratio_unsloth_over_peft"] is None
    moe = report["models"][0]
    assert moe["params_active"] < 0.8 * moe["params_total"], "experts count at top_k / num_experts"
    assert "unsloth ÷ peft" in proc.stdout and "not measured: unsloth needs CUDA" in proc.stdout


def test_results_section_of_a_cpu_run_says_the_gpu_rows_are_pending(tmp_path: Path) -> None:
    from benchmarks import bench_gpu
    from benchmarks.bench_padding import update_results

    report = {"date": "d", "mode": "cpu-tiny", "device": "cpu", "steps": 2, "warmup": 1, "batch_size": 4,
              "max_seq_length": 2048, "load_in_4bit": False,
              "models": [{"model": "dense", "layers": 2, "params_total": 10**6, "params_active": 9 * 10**5,
                          "ratio_unsloth_over_peft": None,
                          "runs": {"unsloth": {"ok": False, "error": "not measured: unsloth needs CUDA"}}}]}
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    update_results(bench_gpu.section(report), results, section_name="gpu")
    update_results(bench_gpu.section(report), results, section_name="gpu")  # replaced, not appended twice
    text = results.read_text()
    assert "## Other\n\nkept" in text and text.count("<!-- begin:gpu -->") == 1
    assert "**GPU rows pending**" in text
