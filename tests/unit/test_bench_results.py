"""benchmarks/run_all.py keeps the RESULTS.md sections that other benchmarks write themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import run_all


def test_rewriting_results_keeps_sections_owned_by_other_benchmarks(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "RESULTS.md"
    owned = "<!-- begin:padding -->\n## Padding\n\n| a | b |\n<!-- end:padding -->"
    results.write_text(f"# Benchmark results\n\n## Daemon\n\nold figures\n\n{owned}\n")
    monkeypatch.setattr(run_all, "RESULTS", results)
    mach = {"date": "now", "cpus": 2}
    run_all.write_results(mach, {"ok": False, "error": "skipped"}, None, quick=True, seconds=1.0)
    text = results.read_text()
    assert "old figures" not in text  # run_all's own sections are rewritten
    assert text.count(owned) == 1 and text.rstrip().endswith(owned)
    run_all.write_results(mach, {"ok": False, "error": "skipped"}, None, quick=True, seconds=1.0)
    assert results.read_text().count(owned) == 1
