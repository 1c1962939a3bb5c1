"""The gate's rules on numbers (the end-to-end tests make real runs produce such numbers)."""

from __future__ import annotations

from typing import Any

from mhd.config import EvalConfig
from mhd.quality.gate import PROMOTED, REJECTED, SKIPPED, decide


def ev(heldout: dict[str, Any] | None = None, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": 1, "heldout": heldout or {"count": 0, "tokens": 0, "base": None, "new": None, "current": None},
            "probe": probe or {"count": 66, "tokens": 1000, "base": 5.0, "new": 5.0, "current": None}}


def test_min_gain_passes_at_the_limit_and_fails_just_above_it() -> None:
    cfg = EvalConfig()
    ok = decide(ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.92, "current": None}), cfg)
    assert ok.decision == PROMOTED and "min_gain" in ok.reason
    bad = decide(ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.93, "current": None}), cfg)
    assert bad.decision == REJECTED and bad.failed == ("min_gain",) and "3.9300 > base 4.0000" in bad.reason


def test_tolerance_applies_against_the_current_model_but_not_to_a_forgetting_run() -> None:
    numbers = ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.5, "current": 3.4})
    assert decide(numbers, EvalConfig()).failed == ("tolerance",)
    forgetting = decide(numbers, EvalConfig(), forgetting=True)
    assert forgetting.decision == PROMOTED and "not applied" in forgetting.reason


def test_probe_regression_rejects() -> None:
    d = decide(ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.0, "current": None},
                  {"count": 66, "tokens": 900, "base": 5.0, "new": 5.3, "current": None}), EvalConfig())
    assert d.failed == ("probe",) and "5.3000 > base 5.0000" in d.reason


def test_too_few_memories_decides_on_the_probe_set_and_says_so() -> None:
    d = decide(ev(probe={"count": 66, "tokens": 900, "base": 5.0, "new": 4.9, "current": None}), EvalConfig())
    assert d.decision == PROMOTED and "no held-out set" in d.reason and "probe set alone" in d.reason
    worse = decide(ev(probe={"count": 66, "tokens": 900, "base": 5.0, "new": 5.5, "current": None}), EvalConfig())
    assert worse.decision == REJECTED and "probe set alone" in worse.reason


def test_no_numbers_is_never_a_silent_pass_and_the_switch_is_explicit() -> None:
    assert decide(None, EvalConfig()).decision == REJECTED
    assert decide({"error": "out of memory"}, EvalConfig()).decision == REJECTED
    off = decide(None, EvalConfig(enabled=False))
    assert off.decision == SKIPPED and off.promote and "enabled = false" in off.reason


def _run_with_eval(store: Any, cfg: Any, numbers: dict[str, Any], keys: list[str]) -> str:
    import json

    from mhd.states.model import Outcome, RunState

    run = store.create_run("manual", "local")
    store.record_lineage(run.id, [(k, "train", "observation", None) for k in keys])
    out = cfg.runs_dir / run.id / "output"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps(numbers))
    store.transition(run.id, RunState.PROVISIONING, RunState.IDLE, outcome=Outcome.SUCCEEDED)
    return str(run.id)


def test_the_daemon_gate_skips_no_regression_while_the_served_model_holds_a_forgotten_memory(tmp_path: Any) -> None:
    """decide_run, on a real DB: the owner's deletion wins over tolerance; a run that holds a
    forgotten memory itself is never promoted, whatever its numbers."""
    from mhd.config import Config
    from mhd.states.merging import decide_run
    from mhd.store import Store

    cfg = Config(memory_dir=tmp_path / "m", state_dir=tmp_path / "s")
    store = Store(f"sqlite:///{tmp_path / 'mhd.db'}")
    served = _run_with_eval(store, cfg, ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.4, "current": None}),
                            ["a", "b", "secret"])
    store.add_model(served, "mhd-1", "ollama")
    store.set_active_model("mhd-1")
    worse = ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.5, "current": 3.4})
    new = _run_with_eval(store, cfg, worse, ["a", "b"])
    assert decide_run(cfg, store, new).failed == ("tolerance",)  # nothing forgotten: the usual rules

    store.forget({"secret": "deleted"})
    d = decide_run(cfg, store, new)
    assert d.decision == PROMOTED and "not applied" in d.reason
    no_gain = _run_with_eval(store, cfg, ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.95, "current": 3.4}),
                             ["a"])
    assert decide_run(cfg, store, no_gain).failed == ("min_gain",)  # it must still beat the base
    holds = _run_with_eval(store, cfg, ev({"count": 8, "tokens": 90, "base": 4.0, "new": 3.0, "current": 3.4}),
                           ["a", "secret"])
    d = decide_run(cfg, store, holds)
    assert d.decision == REJECTED and d.failed == ("forgotten",)
