"""merge_run / rollback / ollama_route against the Ollama stand-in, with the real converter subprocess.

Adapters here are written directly as safetensors (numpy, random non-zero values) so these tests
need no torch; the converter's numerical correctness is pinned by test_gguf_lora.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("gguf")
from safetensors.numpy import save_file  # noqa: E402

from mhd.config import Config  # noqa: E402
from mhd.errors import MergeError  # noqa: E402
from mhd.merge import merge_run, ollama_route, rollback  # noqa: E402
from mhd.states.model import RunState  # noqa: E402
from mhd.store import Store  # noqa: E402
from tests.support.ollama_standin import OllamaStandIn, normalize  # noqa: E402

BASE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 256, "tie_word_embeddings": True,
}
SHAPES = {  # module → (out, in)
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


def write_adapter(adapter_dir: Path, seed: int, base_config: dict[str, Any] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for mod, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((4, inp)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out, 4)).astype(np.float32)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]}))
    (adapter_dir / "base_config.json").write_text(json.dumps(base_config or BASE_CONFIG))
    return adapter_dir


class Env:
    def __init__(self, tmp: Path, ollama: OllamaStandIn) -> None:
        self.tmp = tmp
        self.ollama = ollama
        self.store = Store(f"sqlite:///{tmp / 'mhd.db'}")
        self.merge: dict[str, Any] = {"mode": "ollama", "ollama_url": ollama.url, "base": "qwen3:8b", "keep": 3}
        self.logs: list[str] = []
        self.seed = 0

    @property
    def cfg(self) -> Config:
        return Config.model_validate({"state_dir": str(self.tmp / "state"), "merge": self.merge,
                                      "training": {"base_model": str(self.tmp / "no-base-here")}})

    def new_run(self) -> tuple[str, Path]:
        run = self.store.create_run("test", "local")
        self.store.update_run(run.id, state=RunState.IDLE)  # let the next create_run through
        self.seed += 1
        adapter = write_adapter(self.tmp / "runs" / run.id / "output" / "adapter", self.seed)
        return run.id, adapter

    def merge_raw(self, run_id: str, adapter: Path) -> str | None:
        return asyncio.run(merge_run(self.cfg, self.store, run_id, adapter, self.logs.append))

    def merge_run(self, run_id: str, adapter: Path) -> str:
        name = self.merge_raw(run_id, adapter)
        assert name is not None
        return name

    def rollback(self, run_id: str | None = None) -> str:
        return asyncio.run(rollback(self.cfg, self.store, run_id))

    def alias_target(self) -> str | None:
        return self.ollama.models.get("mhd:latest", {}).get("copied_from")

    def active(self) -> list[str]:
        return [m.name for m in self.store.models() if m.active]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with OllamaStandIn(version="0.33.0") as ollama:
        ollama.add_model("qwen3:8b")
        e = Env(tmp_path, ollama)
        try:
            yield e
        finally:
            e.store.close()


def test_adapter_route_registers_the_model_aliases_it_and_records_it(env: Env) -> None:
    run_id, adapter = env.new_run()
    name = env.merge_run(run_id, adapter)

    run = env.store.get_run(run_id)
    assert run is not None
    day = datetime.fromtimestamp(run.created_at, UTC).strftime("%Y%m%d")
    assert name == f"mhd-{day}-{run_id}"
    gguf = adapter.parent / "adapter.gguf"
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    body = env.ollama.create_bodies()[0]
    assert body["model"] == name and body["from"] == "qwen3:8b" and body["adapters"] == {"adapter.gguf": digest}
    assert env.ollama.blobs == {digest: gguf.stat().st_size}
    assert env.alias_target() == normalize(name)
    assert env.ollama.requests_to("/api/chat")[0].body["model"] == name  # smoke prompt went to the new model
    assert env.active() == [name]
    assert [m.kind for m in env.store.models()] == ["ollama"]
    assert [e.kind for e in env.store.events(run_id)] == ["merge"]
    assert "success" in env.logs and any(ln.startswith("smoke reply") for ln in env.logs)


def test_merge_run_is_idempotent_when_re_entered(env: Env) -> None:
    run_id, adapter = env.new_run()
    first = env.merge_run(run_id, adapter)
    gguf_mtime = (adapter.parent / "adapter.gguf").stat().st_mtime_ns
    env.logs.clear()
    assert env.merge_run(run_id, adapter) == first
    assert len(env.ollama.requests_to("/api/blobs", "POST")) == 1
    assert len(env.ollama.create_bodies()) == 1
    assert (adapter.parent / "adapter.gguf").stat().st_mtime_ns == gguf_mtime
    assert any("already in Ollama" in ln for ln in env.logs)
    assert len(env.store.models()) == 1 and env.alias_target() == normalize(first)


def test_keep_n_deletes_only_models_mhd_created(env: Env) -> None:
    env.merge["keep"] = 2
    env.ollama.add_model("mhd-notes:latest")  # the owner's, despite the prefix
    env.ollama.add_model("mhd-20200101-foreign")  # looks like ours, but mhd never recorded it
    names = []
    for _ in range(3):
        run_id, adapter = env.new_run()
        names.append(env.merge_run(run_id, adapter))

    left = set(env.ollama.models)
    assert normalize(names[0]) not in left
    assert {normalize(names[1]), normalize(names[2])} <= left
    assert {"qwen3:8b", "mhd-notes:latest", "mhd-20200101-foreign:latest", "mhd:latest"} <= left
    assert [m.name for m in env.store.models()] == names[1:]
    assert [m.name for m in env.store.models(include_deleted=True) if m.deleted_at] == [names[0]]
    assert env.alias_target() == normalize(names[2])
    deletes = [r.body["model"] for r in env.ollama.requests_to("/api/delete")]
    assert deletes == [names[0]]


def test_rollback_goes_to_the_previous_model_or_a_named_run_and_is_recorded(env: Env) -> None:
    runs = []
    for _ in range(3):
        run_id, adapter = env.new_run()
        runs.append((run_id, env.merge_run(run_id, adapter)))

    assert env.rollback() == runs[1][1]
    assert env.alias_target() == normalize(runs[1][1])
    assert env.active() == [runs[1][1]]
    ev = env.store.events(runs[1][0], kind="rollback")
    assert len(ev) == 1 and runs[2][1] in ev[0].detail and "mhd:latest" in ev[0].detail

    assert env.rollback() == runs[0][1]
    with pytest.raises(MergeError, match="nothing to roll back to"):
        env.rollback()
    ids = [r for r, _ in runs]
    prefix = next(ids[2][:n] for n in range(1, len(ids[2]) + 1)
                  if sum(i.startswith(ids[2][:n]) for i in ids) == 1)
    assert env.rollback(prefix) == runs[2][1]  # a unique prefix of the run id is enough
    assert env.alias_target() == normalize(runs[2][1])

    env.ollama.fail_next("/api/copy", 500)
    with pytest.raises(MergeError):
        env.rollback(runs[0][0])
    assert env.alias_target() == normalize(runs[2][1]) and env.active() == [runs[2][1]]


def test_rollback_to_a_model_gone_from_ollama_is_refused(env: Env) -> None:
    names = []
    for _ in range(2):
        run_id, adapter = env.new_run()
        names.append((run_id, env.merge_run(run_id, adapter)))
    asyncio.run(_delete(env.ollama.url, names[0][1]))
    with pytest.raises(MergeError, match="no longer in Ollama"):
        env.rollback()
    assert env.alias_target() == normalize(names[1][1])


async def _delete(url: str, name: str) -> None:
    from mhd.merge.ollama import OllamaClient

    async with OllamaClient(url) as c:
        await c.delete(name)


def test_failed_smoke_prompt_keeps_the_previous_model_serving_and_a_retry_finishes(env: Env) -> None:
    run1, adapter1 = env.new_run()
    first = env.merge_run(run1, adapter1)
    run2, adapter2 = env.new_run()
    env.ollama.fail_next("/api/chat", 500, "llama runner process has terminated")
    with pytest.raises(MergeError, match=r"smoke prompt .* failed, mhd:latest left as it was"):
        env.merge_run(run2, adapter2)
    assert env.alias_target() == normalize(first)
    assert env.active() == [first]
    assert [m.run_id for m in env.store.models()] == [run1]  # the broken model was never recorded
    assert not any(n.endswith(run2 + ":latest") for n in env.ollama.models)  # …and was removed
    assert (adapter2 / "adapter_model.safetensors").is_file()

    second = env.merge_run(run2, adapter2)  # `mhd merge RUN`
    assert env.alias_target() == normalize(second)
    assert len(env.ollama.requests_to("/api/blobs", "POST")) == 2  # run2's blob went up once, then HEAD hit


def test_crash_mid_create_then_re_entry_finishes(env: Env) -> None:
    run_id, adapter = env.new_run()
    env.ollama.fail_next("/api/create", 200, "write manifest: no space left on device", mid_stream=True)
    with pytest.raises(MergeError, match="no space left on device"):
        env.merge_run(run_id, adapter)
    assert "mhd:latest" not in env.ollama.models and env.store.models() == []
    name = env.merge_run(run_id, adapter)
    assert env.alias_target() == normalize(name)
    assert len(env.ollama.create_bodies()) == 2 and len(env.ollama.requests_to("/api/blobs", "POST")) == 1


def test_failure_at_the_alias_copy_then_re_entry_skips_create(env: Env) -> None:
    run1, adapter1 = env.new_run()
    first = env.merge_run(run1, adapter1)
    run2, adapter2 = env.new_run()
    env.ollama.fail_next("/api/copy", 500)
    with pytest.raises(MergeError, match="copy"):
        env.merge_run(run2, adapter2)
    assert env.alias_target() == normalize(first) and env.active() == [first]
    second = env.merge_run(run2, adapter2)
    assert len(env.ollama.create_bodies()) == 2  # one per run: the retry found run2's model
    assert env.alias_target() == normalize(second) and env.active() == [second]


@pytest.mark.parametrize("version, route", [
    ("0.33.0", "adapter"), ("0.34.0", "adapter"), ("0.34.1", "merged"), ("0.34.1-rc0", "merged"),
    ("0.40.2", "merged"), ("0.0.0", "merged"),
])
def test_route_follows_the_ollama_version(env: Env, version: str, route: str) -> None:
    env.ollama.version = version
    assert asyncio.run(ollama_route(env.cfg)) == route


def test_route_without_ollama_or_when_forced(env: Env) -> None:
    before = len(env.ollama.requests)
    env.merge["route"] = "merged"
    assert asyncio.run(ollama_route(env.cfg)) == "merged"
    assert len(env.ollama.requests) == before  # forced: Ollama not even asked
    assert asyncio.run(ollama_route(Config.model_validate({}))) == "none"
    assert asyncio.run(ollama_route(Config.model_validate({"merge": {"mode": "peft"}}))) == "none"


def test_current_ollama_without_a_merged_gguf_explains_and_keeps_the_previous_model(env: Env) -> None:
    run1, adapter1 = env.new_run()
    first = env.merge_run(run1, adapter1)
    env.ollama.version = "0.34.1"
    run2, adapter2 = env.new_run()
    with pytest.raises(MergeError, match=r"no merged GGUF \(model\.gguf\)"):
        env.merge_run(run2, adapter2)
    assert len(env.ollama.create_bodies()) == 1
    assert env.alias_target() == normalize(first)
    assert (adapter2 / "adapter_model.safetensors").is_file()


def test_merged_route_registers_model_gguf_with_files(env: Env) -> None:
    env.ollama.version = "0.34.1"
    run_id, adapter = env.new_run()
    merged = adapter.parent / "model.gguf"
    merged.write_bytes(b"GGUF" + b"\0" * 4096)
    name = env.merge_run(run_id, adapter)
    body = env.ollama.create_bodies()[0]
    digest = "sha256:" + hashlib.sha256(merged.read_bytes()).hexdigest()
    assert body["files"] == {"model.gguf": digest}
    assert "adapters" not in body and "from" not in body
    assert env.alias_target() == normalize(name)
    assert not (adapter.parent / "adapter.gguf").exists()  # nothing converted on this route


def test_forcing_the_adapter_route_on_current_ollama_gets_a_clear_refusal(env: Env) -> None:
    env.ollama.version = "0.34.1"
    env.merge["route"] = "adapter"
    run_id, adapter = env.new_run()
    with pytest.raises(MergeError, match=r"refuses LoRA adapters .*merge\.route = \"merged\""):
        env.merge_run(run_id, adapter)
    assert "mhd:latest" not in env.ollama.models


def test_base_missing_from_ollama_says_to_pull_it(env: Env) -> None:
    env.merge["base"] = "qwen3:14b"
    run_id, adapter = env.new_run()
    with pytest.raises(MergeError, match="ollama pull qwen3:14b"):
        env.merge_run(run_id, adapter)
    assert env.ollama.create_bodies() == []


def test_missing_base_config_is_explained(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(env.tmp / "hf"))
    monkeypatch.setenv("HOME", str(env.tmp / "home"))
    run_id, adapter = env.new_run()
    (adapter / "base_config.json").unlink()
    with pytest.raises(MergeError, match=r"config\.json is needed .*merge\.base_model_path"):
        env.merge_run(run_id, adapter)
    env.merge["base_model_path"] = str(env.tmp / "base")
    (env.tmp / "base").mkdir()
    (env.tmp / "base" / "config.json").write_text(json.dumps(BASE_CONFIG))
    assert env.merge_run(run_id, adapter)


def test_conversion_refusal_surfaces_as_a_merge_error(env: Env) -> None:
    run1, adapter1 = env.new_run()
    first = env.merge_run(run1, adapter1)
    run2, adapter2 = env.new_run()
    moe = {**BASE_CONFIG, "model_type": "qwen3_moe", "num_experts": 128}
    (adapter2 / "base_config.json").write_text(json.dumps(moe))
    with pytest.raises(MergeError, match=r"GGUF LoRA conversion failed \(exit 2\): base model is a mixture-of-experts"):
        env.merge_run(run2, adapter2)
    assert env.alias_target() == normalize(first)
    assert not (adapter2.parent / "adapter.gguf").exists()


def test_mode_none_makes_nothing(env: Env) -> None:
    env.merge = {"mode": "none"}
    run_id, adapter = env.new_run()
    assert env.merge_raw(run_id, adapter) is None
    assert env.ollama.requests == []


def test_ollama_unreachable_is_a_merge_error(env: Env) -> None:
    run_id, adapter = env.new_run()
    env.merge["ollama_url"] = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(MergeError, match="Is Ollama running"):
        env.merge_run(run_id, adapter)


def test_model_names_are_valid_and_stable(env: Env) -> None:
    run_id, adapter = env.new_run()
    name = env.merge_run(run_id, adapter)
    assert re.fullmatch(r"mhd-\d{8}-\d{8}-\d{6}-[0-9a-f]{4}", name)
    env.merge["model_prefix"] = "Bad Prefix"
    with pytest.raises(MergeError, match="model_prefix"):
        env.merge_run(*env.new_run())
