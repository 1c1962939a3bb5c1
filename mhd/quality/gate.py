"""The quality gate: promote a run's model only when its evaluation says it is better.

The pod's Evaluating phase (``mhd/pod/evaluate.py``) scores the mean per-token NLL of the
assistant turns on the held-out memories and on the probe set, for the base, the new adapter and
the adapter promoted today. :func:`decide` turns those numbers into ``promoted`` / ``rejected``
(or ``skipped`` when ``[eval] enabled = false``), with a reason that names each rule and its
numbers:

- min gain:   held-out NLL(new) ≤ NLL(base) * (1 - min_gain)
- tolerance:  held-out NLL(new) ≤ NLL(current) * (1 + tolerance)   (when a model is promoted)
- probe:      probe NLL(new)    ≤ probe NLL(base) * (1 + max_probe_regression)

A run with no held-out set (too few memories) is decided on the probe rule alone, and says so;
a run with no numbers at all is rejected — never a silent pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mhd.config import EvalConfig
from mhd.states.model import Outcome
from mhd.store import ModelRecord, Run, Store

PROMOTED, REJECTED, SKIPPED = "promoted", "rejected", "skipped"


@dataclass(frozen=True)
class Decision:
    decision: str
    reason: str
    failed: tuple[str, ...] = ()
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def promote(self) -> bool:
        return self.decision != REJECTED

    def as_json(self) -> str:
        return json.dumps(asdict(self))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def numbers(ev: dict[str, Any] | None) -> dict[str, Any]:
    """The flat view of an eval result that `mhd runs --json` shows (issue 13's field names)."""
    ev = ev or {}
    h, p = ev.get("heldout") or {}, ev.get("probe") or {}
    return {
        "heldout_nll_base": _num(h.get("base")), "heldout_nll_new": _num(h.get("new")),
        "heldout_nll_current": _num(h.get("current")), "probe_nll_base": _num(p.get("base")),
        "probe_nll_new": _num(p.get("new")), "probe_nll_current": _num(p.get("current")),
        "heldout_count": int(h.get("count") or 0), "probe_count": int(p.get("count") or 0),
    }


def decide(ev: dict[str, Any] | None, cfg: EvalConfig, *, forgetting: bool = False) -> Decision:
    """``forgetting``: this run exists to drop memories the owner deleted — the no-regression
    (tolerance) rule does not apply then; the run must still beat the base."""
    n = numbers(ev)
    if not cfg.enabled:
        return Decision(SKIPPED, "quality gate off ([eval] enabled = false): promoted unchecked", (), n)
    if not ev or ev.get("error"):
        why = (ev or {}).get("error") or "the pod reported no evaluation"
        return Decision(REJECTED, f"no evaluation numbers ({why}): not promoted; `mhd promote RUN` promotes "
                                  "it anyway", ("evaluation",), n)
    failed: list[str] = []
    notes: list[str] = []

    def rule(name: str, what: str, new: float, ref_name: str, ref: float, sign: str, factor: float) -> None:
        """new ≤ ref * (1 ± factor): one note with the numbers; the rule's name when it fails."""
        limit = ref * (1 - factor if sign == "-" else 1 + factor)
        ok = new <= limit
        notes.append(f"{name}: {what} new {new:.4f} {'≤' if ok else '>'} {ref_name} {ref:.4f} * "
                     f"(1 {sign} {factor:g}) = {limit:.4f}")
        if not ok:
            failed.append(name)

    hb, hn, hc = n["heldout_nll_base"], n["heldout_nll_new"], n["heldout_nll_current"]
    if n["heldout_count"] and hb is not None and hn is not None:
        rule("min_gain", "held-out NLL", hn, "base", hb, "-", cfg.min_gain)
        if hc is not None and not forgetting:
            rule("tolerance", "held-out NLL", hn, "current", hc, "+", cfg.tolerance)
        elif hc is not None:
            notes.append("tolerance: not applied (this run forgets memories the owner removed)")
    else:
        notes.append(f"no held-out set (too few memories for [eval] min_count = {cfg.min_count}, needs "
                     f"{2 * cfg.min_count}): decided on the probe set alone")
    pb, pn = n["probe_nll_base"], n["probe_nll_new"]
    if n["probe_count"] and pb is not None and pn is not None:
        rule("probe", "NLL", pn, "base", pb, "+", cfg.max_probe_regression)
    elif not n["heldout_count"]:
        failed.append("evaluation")
        notes.append("no probe numbers either: nothing to decide on")
    if failed:
        return Decision(REJECTED, f"rejected by {', '.join(failed)}: " + "; ".join(notes), tuple(failed), n)
    return Decision(PROMOTED, "promoted: " + "; ".join(notes), (), n)


def eval_view(run: Run) -> dict[str, Any] | None:
    """The run's ``eval`` in `mhd runs --json`: the numbers, the decision and its reason."""
    if not run.eval_json:
        return None
    d = json.loads(run.eval_json)
    return {**d.get("numbers", {}), "decision": d.get("decision"), "reason": d.get("reason")}


def promoted_run(store: Store) -> str | None:
    """The run whose model is served today: the active registered model's, else the newest succeeded run."""
    active: list[ModelRecord] = [m for m in store.models() if m.active]
    if active:
        return active[-1].run_id
    for run in store.list_runs(50):
        if run.outcome is Outcome.SUCCEEDED:
            return run.id
    return None
