"""The pod's Evaluating phase (mhd/pod/evaluate.py, run by train.py) on the tiny offline model, CPU only."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_trainer import Run, finish, prepare, start
from tests.support.memories import write_examples_to
from tests.support.tiny import tiny_model_dir  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

PROBE = Path(__file__).resolve().parents[2] / "mhd" / "quality" / "probe.jsonl"
EVALUATE = {"enabled": True, "generate": 3, "max_new_tokens": 16, "current_adapter": None}


def prepare_eval(dest: Path, model_dir: Path, memories: Path, **overrides: Any) -> Run:
    run = prepare(dest, model_dir, memories)  # dataset with 10 % held out, as the daemon uploads it
    shutil.copyfile(PROBE, run.dir / "probe.jsonl")
    cfg = json.loads((run.dir / "config.json").read_text())
    cfg.update({"evaluate": dict(EVALUATE)}, **overrides)
    (run.dir / "config.json").write_text(json.dumps(cfg))
    return run


def result(run: Run) -> dict[str, Any]:
    return dict(json.loads((run.dir / "eval.json").read_text()))


def trainings(run: Run) -> int:
    """How many times training started: the first train line of each run is step 1."""
    return sum(1 for line in run.progress() if line["phase"] == "train" and line["step"] == 1)


@pytest.fixture(scope="module")
def memories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_examples_to(tmp_path_factory.mktemp("memories"))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, memories: Path) -> Run:  # noqa: F811
    run = finish(prepare_eval(tmp_path_factory.mktemp("evaluated") / "run", tiny_model_dir, memories))
    assert run.rc == 0, run.log()
    return run


def test_normal_run_scores_heldout_and_probe_and_lists_eval_json(evaluated: Run) -> None:
    ev = result(evaluated)
    held, probe = ev["heldout"], ev["probe"]
    assert ev["format"] == 1 and ev["seconds"] > 0 and Path(ev["base_model"]).is_dir()
    assert held["count"] == sum(1 for _ in (evaluated.dir / "eval.jsonl").open()) > 0
    assert held["tokens"] > held["count"]
    # The gate's rule (issue 13) on a normal run: held-out clearly better, probe not much worse.
    assert held["new"] <= 0.98 * held["base"]
    assert probe["count"] == sum(1 for _ in PROBE.open()) and probe["tokens"] > 0
    assert probe["new"] <= 1.05 * probe["base"]
    assert held["current"] is None and probe["current"] is None
    assert len(ev["generations"]) == 3
    for g in ev["generations"]:
        assert g["prompt"] and isinstance(g["base"], str) and isinstance(g["new"], str)

    m = evaluated.manifest()
    assert m["eval"] == ev
    entry = next(f for f in m["files"] if f["path"] == "eval.json")
    data = (evaluated.dir / "eval.json").read_bytes()
    assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()

    lines = [p for p in evaluated.progress() if p["phase"] == "evaluating"]
    assert {(p["set"], p["model"]) for p in lines if "set" in p} == {
        (s, m) for s in ("heldout", "probe") for m in ("base", "new")}
    assert all(p["done"] <= p["total"] for p in lines if "set" in p)
    assert lines[-1]["status"] == "done" and lines[-1]["seconds"] == ev["seconds"]
    # Evaluation comes after training: no train line follows it.
    phases = [p["phase"] for p in evaluated.progress()]
    assert "train" not in phases[phases.index("evaluating"):]


def test_learning_rate_near_zero_leaves_heldout_unchanged(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                          memories: Path) -> None:
    run = finish(prepare_eval(tmp_path / "run", tiny_model_dir, memories, learning_rate=1e-12))
    assert run.rc == 0, run.log()
    held = result(run)["heldout"]
    # What a min-gain rule must reject: the "new" adapter is the base (LoRA's B starts at zero).
    assert abs(held["new"] - held["base"]) / held["base"] < 0.005


def test_kill_during_evaluation_relaunch_evaluates_without_training(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                                    memories: Path) -> None:
    run = prepare_eval(tmp_path / "run", tiny_model_dir, memories)
    proc = start(run, MHD_TRAIN_FAULT="kill@evaluating")
    assert proc.wait(timeout=240) == -signal.SIGKILL, run.log()
    assert (run.dir / "trained.json").exists()
    assert not (run.dir / "eval.json").exists() and not (run.dir / "manifest.json").exists()
    assert [p for p in run.progress() if p["phase"] == "evaluating"]  # it was killed mid-evaluation
    trained = (run.dir / "trained.json").read_bytes()
    steps = run.train_steps()

    finish(run)

    assert run.rc == 0, run.log()
    assert (run.dir / "trained.json").read_bytes() == trained
    assert run.train_steps() == steps and trainings(run) == 1
    assert "not training again" in run.log()
    assert result(run)["heldout"]["new"] is not None and run.manifest()["eval"] == result(run)


def test_a_failed_evaluation_on_the_training_model_is_redone_with_the_base_reloaded(
        tmp_path: Path, tiny_model_dir: Path, memories: Path) -> None:  # noqa: F811
    run = finish(prepare_eval(tmp_path / "run", tiny_model_dir, memories),
                 MHD_TRAIN_FAULT="fail@evaluating-in-process")
    assert run.rc == 0, run.log()
    assert "evaluating again with the base reloaded" in run.log() and "restarting for the evaluation" in run.log()
    ev = result(run)
    assert ev["in_process"] is False and ev["heldout"]["new"] < ev["heldout"]["base"]
    assert run.manifest()["eval"] == ev and trainings(run) == 1
    failed = [p for p in run.progress() if p["phase"] == "evaluating" and p.get("status") == "failed"]
    assert len(failed) == 1 and failed[0]["retry"] is True


def test_current_adapter_is_scored_as_its_own_adapter(tmp_path: Path, evaluated: Run) -> None:
    # The finished run again with its eval cleared: only the evaluation runs (trained.json is
    # there). "current" is (1) a copy of the new adapter, then (2) an all-zero one (= the base).
    def rerun(name: str, zero: bool) -> dict[str, Any]:
        run = Run(tmp_path / name)
        shutil.copytree(evaluated.dir, run.dir)
        for f in ("eval.json", "manifest.json"):
            (run.dir / f).unlink()
        shutil.copytree(run.dir / "adapter", run.dir / "current_adapter")
        if zero:
            from safetensors.torch import load_file, save_file

            weights = run.dir / "current_adapter" / "adapter_model.safetensors"
            save_file({k: v * 0 for k, v in load_file(weights).items()}, weights)
        cfg = json.loads((run.dir / "config.json").read_text())
        cfg["evaluate"]["current_adapter"] = "current_adapter"
        (run.dir / "config.json").write_text(json.dumps(cfg))
        finish(run)
        assert run.rc == 0, run.log()
        assert trainings(run) == 1
        return result(run)

    same = rerun("same", zero=False)
    for s in ("heldout", "probe"):
        assert same[s]["current"] == pytest.approx(same[s]["new"], abs=1e-5)
        assert same[s]["new"] == pytest.approx(result(evaluated)[s]["new"], abs=1e-5)
    zero = rerun("zero", zero=True)
    for s in ("heldout", "probe"):
        assert zero[s]["current"] == pytest.approx(zero[s]["base"], abs=1e-5)
        assert abs(zero[s]["current"] - zero[s]["new"]) > 1e-3


def test_numbers_on_the_training_model_match_a_fresh_reload(tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
                                                             memories: Path, evaluated: Run) -> None:
    # Another adapter (seed, learning rate), with the fixture's adapter as the current one: the
    # evaluation runs in the training process, "current" loaded beside the trained adapter.
    run = prepare_eval(tmp_path / "run", tiny_model_dir, memories, seed=7, learning_rate=2e-3)
    shutil.copytree(evaluated.dir / "adapter", run.dir / "current_adapter")
    cfg = json.loads((run.dir / "config.json").read_text())
    cfg["evaluate"]["current_adapter"] = "current_adapter"
    (run.dir / "config.json").write_text(json.dumps(cfg))
    finish(run)
    assert run.rc == 0, run.log()
    live = result(run)
    # The same run evaluated from scratch, as a relaunch after a kill does: base and adapters loaded
    # from their files in a fresh process.
    again = Run(tmp_path / "again")
    shutil.copytree(run.dir, again.dir)
    for f in ("eval.json", "manifest.json"):
        (again.dir / f).unlink()
    finish(again)
    assert again.rc == 0, again.log()
    reloaded = result(again)

    assert live["in_process"] is True and reloaded["in_process"] is False and trainings(again) == 1
    for s in ("heldout", "probe"):
        assert live[s]["count"] == reloaded[s]["count"] and live[s]["tokens"] == reloaded[s]["tokens"]
        for m in ("base", "new", "current"):
            assert live[s][m] == pytest.approx(reloaded[s][m], rel=1e-5), (s, m)
        # Three different models, or the comparison above would not show a missing disable_adapter()
        # or a "current" that is really the new adapter.
        assert abs(live[s]["new"] - live[s]["base"]) > 1e-3 and abs(live[s]["current"] - live[s]["new"]) > 1e-3
        assert live[s]["current"] == pytest.approx(result(evaluated)[s]["new"], rel=1e-5)
    assert live["generations"] == reloaded["generations"]


def test_only_assistant_tokens_are_scored(tiny_model_dir: Path) -> None:  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mhd.pod import evaluate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def conv(user: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": "You are Maya."}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]

    def nll(sample: evaluate.Sample) -> float:
        with torch.no_grad():
            return evaluate.nll_sum(model, [sample], tok.pad_token_id, torch.device("cpu"))

    answer = "I walked by the river with Juniper."
    a = evaluate.encode(tok, conv("How was the walk?", answer), 512)
    b = evaluate.encode(tok, conv("How was the walk? Tell me everything about the river and the dog.", answer), 512)
    c = evaluate.encode(tok, conv("How was the walk?", "The garden was full of rain and tomatoes."), 512)
    expected = len(tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
    # The scored tokens are exactly the answer (+ its end marker), wherever the user turn ends.
    assert a.scored == b.scored == expected and len(b.ids) > len(a.ids)
    assert [t for t, m in zip(a.ids, a.mask, strict=True) if m] == [t for t, m in zip(b.ids, b.mask, strict=True) if m]
    assert nll(a) != nll(c)  # a different answer to the same prompt scores differently

    # A template without {% generation %} markers (like Qwen's): the prefix fallback finds the
    # same answer tokens, plus the newline the template puts after <|im_end|>.
    ids, mask = evaluate._by_prefix(tok, conv("How was the walk?", answer))
    assert ids == a.ids and sum(mask) == expected + 1
    assert mask[:len(mask) - 1] == a.mask[:len(mask) - 1]
