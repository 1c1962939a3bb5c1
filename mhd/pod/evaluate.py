#!/usr/bin/env python3
"""mhd's quality gate on the pod: how well base, new and current adapter predict held-out text.

``train.py`` runs this after training and before the export, when ``config.json`` says
``"evaluate": {"enabled": true, ...}``. Like ``train.py`` it is uploaded beside the run's inputs and
imports only the standard library and ``jsonfiles.py`` (uploaded with the trainer) at module level
(torch, transformers and peft once it starts).

    in:   eval.jsonl        held-out samples (may be absent or empty)
          probe.jsonl       general-ability probe set (shipped in mhd/quality/)
          adapter/          the adapter just trained
          current_adapter/  the adapter the daemon serves today (optional)
    out:  eval.json         written atomically when complete: a relaunch finds it and skips all this

The number is the mean negative log-likelihood (natural log) per *assistant* token, summed over
every assistant token of a set (token-weighted), for the base model, the new adapter and the
current one. The daemon promotes the new adapter only when these say it is better: lower on the
held-out memories, not much higher on the probe set (it must not forget how to answer in general).

One model serves all three: the base with the new adapter attached by peft (and the current one
as a second named adapter); ``disable_adapter()`` gives the base numbers. Normally that model is
the one training just used, still in memory (``Evaluation.run(model)``): loading the base again
was most of this phase's cost (issue 13: a 30B base takes minutes to load and quantize). A job
killed before eval.json is written evaluates again on relaunch, without the training's model:
then ``run()`` loads the base with plain transformers + peft (4-bit where training was), and the
adapters from their folders. Both ways score the same weights; eval.json's ``in_process`` says
which one ran (a test compares them on the tiny model).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:  # imported as mhd.pod.evaluate (tests; mypy reads this branch)
    from .jsonfiles import write_json_atomic
else:  # on the pod: train.py imports it by name from its own folder, which is on sys.path
    from jsonfiles import write_json_atomic

FORMAT = 1
EVAL_FILE = "eval.json"
HELDOUT_FILE = "eval.jsonl"
PROBE_FILE = "probe.jsonl"
# Test seam, read from the same variable as train.py's "oom@N" and export.py's "kill@<phase>":
# "kill@evaluating" SIGKILLs this process mid-evaluation (after the first set is scored).
FAULT_ENV = "MHD_TRAIN_FAULT"
FAULT_KILL = "kill@evaluating"
# "fail@evaluating-in-process": the evaluation on the training's model raises, as a backend whose
# trained model cannot be scored would; the trainer must then evaluate again with the base reloaded.
FAULT_FAIL_IN_PROCESS = "fail@evaluating-in-process"
# Tokens per forward pass (batch size x padded length). Bounds the logits tensor, which for a
# 150k-token vocabulary dominates memory: 4096 x 151936 x 2 bytes = 1.2 GB in bf16.
DEFAULT_BATCH_TOKENS = 4096
PROGRESS_EVERY_S = 2.0  # at most one progress line per model and set this often (plus the last)


class EvaluationProblem(Exception):
    """A bad evaluation input (one-line message); train.py turns it into exit 2 or a manifest note."""


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mhd-eval: {msg}", flush=True)


# --- config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = False
    generate: int = 3  # greedy answers to this many held-out prompts, from base and new
    max_new_tokens: int = 48
    current_adapter: str | None = None  # folder in the run dir, e.g. "current_adapter"
    batch_tokens: int = DEFAULT_BATCH_TOKENS

    @classmethod
    def from_dict(cls, data: Any) -> EvalConfig:
        """Raises ValueError naming the key; unknown keys are ignored (a newer daemon may add some)."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError('evaluate: expected an object like {"enabled": true, "generate": 3}')
        enabled = data.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ValueError(f"evaluate.enabled = {enabled!r}: expected true or false")
        ints = {}
        for key, low in (("generate", 0), ("max_new_tokens", 1), ("batch_tokens", 16)):
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"evaluate.{key} = {value!r}: expected an integer >= {low}")
            ints[key] = value
        current = data.get("current_adapter")
        if current is not None and (not isinstance(current, str) or not current.strip()
                                    or Path(current).is_absolute() or ".." in Path(current).parts):
            raise ValueError(f"evaluate.current_adapter = {current!r}: expected a folder name inside the run "
                             "folder, or null")
        return cls(enabled=enabled, current_adapter=current, **ints)


def check(cfg: EvalConfig, root: Path) -> None:
    """Before training: inputs the daemon must have uploaded (a missing one is exit 2, not a lost hour)."""
    if cfg.current_adapter is not None:
        folder = root / cfg.current_adapter
        if not (folder / "adapter_config.json").is_file():
            raise EvaluationProblem(f"config.json names the current adapter {cfg.current_adapter!r}, but "
                                    f"{folder}/adapter_config.json is missing: upload it before training")
    read_set(root / HELDOUT_FILE)  # a malformed line fails now, not after training
    read_set(root / PROBE_FILE)


def read_set(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from a dataset-format JSONL file; a missing file is an empty set."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationProblem(f"{path.name}: cannot be read ({exc})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            ok = (isinstance(messages, list) and len(messages) >= 2 and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages) and any(m["role"] == "assistant" for m in messages))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise EvaluationProblem(f"{path.name} line {n}: expected {{\"messages\": [..., "
                                    "{\"role\": \"assistant\", ...}]}")
        out.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return out


# --- tokens and the assistant mask --------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ids: list[int]
    mask: list[int]  # 1 where the token belongs to an assistant turn (it is scored)

    @property
    def scored(self) -> int:
        # The first token has nothing before it to be predicted from.
        return sum(self.mask[1:])


def encode(tokenizer: Any, messages: Sequence[dict[str, str]], max_len: int) -> Sample:
    """Token ids and assistant mask, cut to ``max_len`` (as training cuts: the tail goes)."""
    ids, mask = _marked(tokenizer, messages)
    if mask is None or not any(mask):
        ids, mask = _by_prefix(tokenizer, messages)
    return Sample(ids[:max_len], mask[:max_len])


def _marked(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int] | None]:
    """The template's own ``{% generation %}`` markers, when it has them (the tiny model's has)."""
    try:
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception:  # (templates without markers may refuse; the fallback covers them)
        return [], None
    ids = list(out["input_ids"])
    mask = out.get("assistant_masks")
    return ids, (list(mask) if mask is not None and len(mask) == len(ids) else None)


def _by_prefix(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Assistant spans found the way trl finds a completion: render the conversation up to each
    assistant turn with the generation prompt, then up to its end; the tokens in between are the
    answer (for Qwen3 this includes the empty think block its template puts there, as in training)."""
    def render(msgs: Sequence[dict[str, str]], gen: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(list(msgs), tokenize=True, add_generation_prompt=gen,
                                                  return_dict=False))

    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(render(messages[:i], True), ids)
        end = _common_prefix(render(messages[:i + 1], False), ids)
        for t in range(start, end):
            mask[t] = 1
    return ids, mask


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    # Templates that rewrite earlier turns (Qwen3 drops old think blocks) can make a partial
    # rendering differ from the full one near its end; the shared prefix is the safe boundary.
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def batches(samples: Sequence[Sample], budget: int) -> Iterator[list[Sample]]:
    """Similar lengths together (little padding), each batch at most ``budget`` padded tokens."""
    ordered = sorted((s for s in samples if s.scored), key=lambda s: len(s.ids))
    batch: list[Sample] = []
    for s in ordered:
        if batch and (len(batch) + 1) * len(s.ids) > budget:
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


# --- scoring ------------------------------------------------------------------------------


def nll_sum(model: Any, batch: Sequence[Sample], pad_id: int, device: Any) -> float:
    """Sum of -log p(token | everything before) over the scored tokens of one batch."""
    import torch

    width = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, s in enumerate(batch):  # right padding: causal attention never sees it
        ids[row, :len(s.ids)] = torch.tensor(s.ids)
        attn[row, :len(s.ids)] = 1
        scored[row, :len(s.ids)] = torch.tensor(s.mask, dtype=torch.bool)
    ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits
    # Position t predicts token t+1; keep only the rows that predict an assistant token before
    # going to float32, so the upcast costs (scored tokens x vocab), not (batch x width x vocab).
    picked = logits[:, :-1][scored[:, 1:]]
    targets = ids[:, 1:][scored[:, 1:]]
    total = 0.0
    for lo in range(0, picked.shape[0], 1024):
        chunk = picked[lo:lo + 1024].float()
        total += torch.nn.functional.cross_entropy(chunk, targets[lo:lo + 1024], reduction="sum").item()
    return total


def load_model(base_model: str, adapter: Path, current: Path | None, load_in_4bit: bool) -> tuple[Any, Any]:
    """(peft model with adapters "new" and maybe "current", its input device)."""
    import importlib.util

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if torch.cuda.is_available():
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs = {"dtype": half, "device_map": {"": 0}}
        # Score the base the adapter was trained on: 4-bit when training was 4-bit.
        if load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half)
    base = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="new", is_trainable=False)
    if current is not None:
        model.load_adapter(str(current), adapter_name="current", is_trainable=False)
    model.eval()
    return model, next(model.parameters()).device


class Evaluation:
    """One run's evaluation. ``run()`` returns eval.json's content, writing it first."""

    def __init__(self, root: Path, adapter: Path, base_model: str, cfg: EvalConfig, max_seq_length: int,
                 load_in_4bit: bool, progress: Callable[[dict[str, Any]], None],
                 log: Callable[[str], None] = _log) -> None:
        self.root, self.adapter, self.base_model, self.cfg = root, adapter, base_model, cfg
        self.max_len, self.load_in_4bit = max_seq_length, load_in_4bit
        self.progress, self.log = progress, log
        self.kill = os.environ.get(FAULT_ENV, "") == FAULT_KILL

    @property
    def out(self) -> Path:
        return self.root / EVAL_FILE

    def run(self, model: Any = None) -> dict[str, Any]:
        """``model``: the trainer's peft model, its active adapter the one just saved in adapter/
        (it is left as it was found); None loads the base and the adapters."""
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        t0 = time.monotonic()
        current = self.root / self.cfg.current_adapter if self.cfg.current_adapter else None
        heldout, probe = read_set(self.root / HELDOUT_FILE), read_set(self.root / PROBE_FILE)
        if not probe:
            self.log(f"note: no {PROBE_FILE} in the run folder; the probe numbers will be null")
        # The tokenizer saved with the adapter is the one training used (template included).
        tokenizer = AutoTokenizer.from_pretrained(str(self.adapter))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sets = {"heldout": [encode(tokenizer, m, self.max_len) for m in heldout],
                "probe": [encode(tokenizer, m, self.max_len) for m in probe]}
        in_process = model is not None
        if model is None:
            model, device = load_model(self.base_model, self.adapter, current, self.load_in_4bit)
        else:
            device = self._attach(model, current)
        models = ["base", "new", *(["current"] if current is not None else [])]
        result: dict[str, Any] = {"format": FORMAT}
        try:
            with torch.no_grad():
                for name, samples in sets.items():
                    result[name] = self._score_set(model, name, samples, models, pad_id, device)
                generations = self._generate(model, tokenizer, heldout or probe, device)
        finally:
            if in_process:
                self._detach(model)
        result["generations"] = generations
        result["seconds"] = round(time.monotonic() - t0, 3)
        result["in_process"] = in_process
        result["base_model"] = self.base_model
        write_json_atomic(self.out, result)
        self.progress({"phase": "evaluating", "status": "done", "seconds": result["seconds"],
                       "time": time.time()})
        self.log(f"evaluation done in {result['seconds']:.1f} s: " + "; ".join(
            f"{s} " + ", ".join(f"{m} {_fmt(result[s][m])}" for m in models) for s in sets))
        return result

    def _score_set(self, model: Any, name: str, samples: list[Sample], models: list[str], pad_id: int,
                   device: Any) -> dict[str, Any]:
        used = [s for s in samples if s.scored]
        if len(used) < len(samples):
            self.log(f"{name}: {len(samples) - len(used)} samples have no assistant token within "
                     f"max_seq_length={self.max_len}; not scored")
        tokens = sum(s.scored for s in used)
        entry: dict[str, Any] = {"count": len(used), "tokens": tokens, "base": None, "new": None,
                                 "current": None}
        if not tokens:
            return entry
        for which in models:
            with self._select(model, which):
                total, done, last = 0.0, 0, 0.0
                for batch in batches(used, self.cfg.batch_tokens):
                    total += nll_sum(model, batch, pad_id, device)
                    done += len(batch)
                    if done == len(used) or time.monotonic() - last >= PROGRESS_EVERY_S:
                        last = time.monotonic()
                        self.progress({"phase": "evaluating", "set": name, "model": which, "done": done,
                                       "total": len(used), "time": time.time()})
            entry[which] = total / tokens
            if self.kill:  # one set scored, eval.json not written: the relaunch must redo it all
                self.log(f"{FAULT_ENV}: killing the job during the evaluation")
                os.kill(os.getpid(), signal.SIGKILL)
        return entry

    # peft's adapter name for "new" and "current": load_model names them so; the trainer's model
    # calls its own adapter "default".
    names = {"new": "new", "current": "current"}
    _restore: tuple[str, bool, bool] | None = None

    def _attach(self, model: Any, current: Path | None) -> Any:
        """The trainer's model, made ready to score: the current adapter beside the new one,
        inference mode. Returns its input device."""
        if not (hasattr(model, "disable_adapter") and hasattr(model, "load_adapter")):
            raise EvaluationProblem(f"the trained model ({type(model).__name__}) is not a peft model")
        if os.environ.get(FAULT_ENV, "") == FAULT_FAIL_IN_PROCESS:
            raise EvaluationProblem(f"{FAULT_ENV}={FAULT_FAIL_IN_PROCESS}")
        active = model.active_adapter
        self.names = {"new": active, "current": "current"}
        if current is not None:
            model.load_adapter(str(current), adapter_name="current", is_trainable=False)
        self._restore = (active, current is not None, model.training)
        model.eval()  # no LoRA dropout: the numbers must be those of the saved adapter
        return next(model.parameters()).device

    def _detach(self, model: Any) -> None:
        if self._restore is None:
            return
        active, loaded, training = self._restore
        model.set_adapter(active)
        if loaded:
            model.delete_adapter("current")
        model.train(training)

    def _select(self, model: Any, which: str) -> Any:
        if which == "base":
            return model.disable_adapter()
        model.set_adapter(self.names[which])
        return nullcontext()

    def _generate(self, model: Any, tokenizer: Any, source: list[list[dict[str, str]]],
                  device: Any) -> list[dict[str, str]]:
        """Greedy answers from base and new to the first few prompts: a human-readable sample."""
        out = []
        for messages in source[:self.cfg.generate]:
            cut = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = messages[:cut]
            # enable_thinking=False: Qwen3's generation prompt then opens with the empty think block
            # its template puts before every trained answer; other templates ignore the variable.
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt", enable_thinking=False)
            ids = {k: v[:, -self.max_len:].to(device) for k, v in ids.items()}
            answers = {}
            for which in ("base", "new"):
                with self._select(model, which):
                    answers[which] = self._greedy(model, tokenizer, ids)
            user = [m["content"] for m in prompt if m["role"] == "user"]
            out.append({"prompt": user[-1] if user else prompt[-1]["content"], **answers})
        return out

    def _greedy(self, model: Any, tokenizer: Any, ids: dict[str, Any]) -> str:
        from transformers import GenerationConfig

        # A fresh config: the base's may ask for sampling, and greedy must be reproducible.
        gen = GenerationConfig(do_sample=False, max_new_tokens=self.cfg.max_new_tokens,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        seq = model.generate(**ids, generation_config=gen)
        return str(tokenizer.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)).strip()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def read_result(root: Path) -> dict[str, Any] | None:
    """eval.json from an earlier (complete) evaluation, else None."""
    try:
        data = json.loads((root / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None
