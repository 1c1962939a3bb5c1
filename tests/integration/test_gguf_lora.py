"""PEFT LoRA → GGUF LoRA on tiny real models (qwen3, qwen2, llama), read back with GGUFReader."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gguf")
import numpy as np  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from mhd.merge.gguf import ConversionError, convert, permute_rows_llama, read_safetensors  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)


def build_base(arch: str, out: Path, **extra: Any) -> Any:
    import transformers as tf

    cls_cfg, cls_model = {
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    }[arch]
    kw: dict[str, Any] = {**SMALL, **extra}
    if arch == "qwen3":
        kw.setdefault("head_dim", 16)
    torch.manual_seed(0)
    model = cls_model(cls_cfg(**kw))
    model.save_pretrained(out)
    return model


def make_adapter(model: Any, out: Path, seed: int = 1, **lora: Any) -> Path:
    """A real PEFT adapter whose A and B are both non-zero (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora.pop("r", 4), lora_alpha=lora.pop("lora_alpha", 8),
                     target_modules=lora.pop("target_modules", TARGETS), init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    peft_model.unload()  # leave the base model clean for the next adapter
    return out


def peft_tensors(adapter: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(adapter / "adapter_model.safetensors").items()}


def read_back(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def expected_pairs(src: dict[str, np.ndarray], n_layers: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for i in range(n_layers):
        for hf, gg in HF_TO_GGUF.items():
            key = f"base_model.model.model.layers.{i}.{hf}"
            out[f"blk.{i}.{gg}.weight"] = (src[f"{key}.lora_A.weight"], src[f"{key}.lora_B.weight"])
    return out


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_qwen_adapter_converts_with_names_shapes_values_and_metadata(tmp_path: Path, arch: str) -> None:
    model = build_base(arch, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter")
    res = convert(adapter, tmp_path / "base" / "config.json", tmp_path / "adapter.gguf", "f16")

    fields, tensors = read_back(res.out)
    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)

    src = peft_tensors(adapter)
    expected = expected_pairs(src, 2)
    assert set(tensors) == {f"{n}.lora_{x}" for n in expected for x in "ab"}
    assert res.tensors == len(tensors) == len(src)
    for name, (a, b) in expected.items():
        ta, tb = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        # ggml order is reversed: lora_a ne = [in, r], lora_b ne = [r, out]
        assert list(ta.shape) == [a.shape[1], a.shape[0]]
        assert list(tb.shape) == [b.shape[1], b.shape[0]]
        assert ta.data.dtype == np.float16
        # qwen: no permutation, values are PEFT's within f16 rounding
        np.testing.assert_allclose(ta.data.astype(np.float32), a, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(tb.data.astype(np.float32), b, rtol=1e-3, atol=1e-4)


def test_llama_q_and_k_lora_b_rows_follow_llamacpp_rope_permutation(tmp_path: Path) -> None:
    model = build_base("llama", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter")
    res = convert(adapter, tmp_path / "base" / "config.json", tmp_path / "adapter.gguf", "f32")
    fields, tensors = read_back(res.out)
    assert fields["general.architecture"] == "llama"

    src = peft_tensors(adapter)
    n_head, n_kv, head_dim = 4, 2, 64 // 4
    for name, (a, b) in expected_pairs(src, 2).items():
        ga = tensors[f"{name}.lora_a"].data
        gb = tensors[f"{name}.lora_b"].data
        np.testing.assert_array_equal(ga, a)  # lora_a is never permuted
        heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else 0
        if not heads:
            np.testing.assert_array_equal(gb, b)
            continue
        assert not np.array_equal(gb, b)
        # Independent statement of the layout: within each head, GGUF row 2j is HF row j and row
        # 2j+1 is HF row j + head_dim/2 (rotate-half pairs become adjacent pairs).
        for h in range(heads):
            for j in range(head_dim // 2):
                np.testing.assert_array_equal(gb[h * head_dim + 2 * j], b[h * head_dim + j])
                np.testing.assert_array_equal(gb[h * head_dim + 2 * j + 1], b[h * head_dim + head_dim // 2 + j])
        # and so the delta B·A follows its base weight through the same row permutation
        np.testing.assert_allclose(gb @ ga, permute_rows_llama(b @ a, heads), rtol=1e-6, atol=1e-7)


def test_rslora_scale_is_carried_by_the_alpha(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True)
    res = convert(adapter, tmp_path / "base" / "config.json", tmp_path / "a.gguf", "f32")
    # llama.cpp applies alpha / r; rsLoRA means 8 / sqrt(4) = 4 = alpha' / 4 → alpha' = 16
    assert res.alpha == pytest.approx(8 * math.sqrt(4))
    _, tensors = read_back(res.out)
    src = peft_tensors(adapter)
    b = src["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"].data, b)


def test_alpha_pattern_differences_are_folded_into_lora_b(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, alpha_pattern={"v_proj": 16})
    res = convert(adapter, tmp_path / "base" / "config.json", tmp_path / "a.gguf", "f32")
    _, tensors = read_back(res.out)
    src = peft_tensors(adapter)
    key = "base_model.model.model.layers.1.self_attn.{}.lora_B.weight"
    for hf, gg in (("v_proj", "attn_v"), ("q_proj", "attn_q")):
        b = src[key.format(hf)]
        peft_scale = (16 if hf == "v_proj" else 8) / 4
        gguf_scale = res.alpha / 4
        np.testing.assert_allclose(tensors[f"blk.1.{gg}.weight.lora_b"].data * gguf_scale, b * peft_scale, rtol=1e-6)


def test_bf16_adapter_is_read_without_torch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    t = {"x": torch.randn(3, 5, dtype=torch.bfloat16), "y": torch.randn(2, dtype=torch.float16)}
    save_file(t, tmp_path / "t.safetensors")
    got = read_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(got["x"], t["x"].float().numpy())
    np.testing.assert_array_equal(got["y"], t["y"].float().numpy())


def test_moe_base_is_refused_with_the_limitation_named(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter")
    moe = json.loads((tmp_path / "base" / "config.json").read_text())
    moe.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8)
    (tmp_path / "moe.json").write_text(json.dumps(moe))
    with pytest.raises(ConversionError, match=r"mixture-of-experts.*dense llama, qwen2 and qwen3"):
        convert(adapter, tmp_path / "moe.json", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("extra, why", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"use_dora": True}, "DoRA"),
])
def test_adapters_a_lora_file_cannot_carry_are_refused(tmp_path: Path, extra: dict[str, Any], why: str) -> None:
    model = build_base("qwen3", tmp_path / "base", tie_word_embeddings=False)
    adapter = make_adapter(model, tmp_path / "adapter", **extra)
    with pytest.raises(ConversionError, match=why):
        convert(adapter, tmp_path / "base" / "config.json", tmp_path / "a.gguf")


def test_full_embedding_weights_in_the_tensors_are_refused_even_if_the_config_hides_them(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base", tie_word_embeddings=False)
    adapter = make_adapter(model, tmp_path / "adapter", modules_to_save=["lm_head"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["modules_to_save"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="full embed_tokens/lm_head weights"):
        convert(adapter, tmp_path / "base" / "config.json", tmp_path / "a.gguf")


def test_lora_on_tied_lm_head_is_refused(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base", tie_word_embeddings=True)
    adapter = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConversionError, match="ties lm_head"):
        convert(adapter, tmp_path / "base" / "config.json", tmp_path / "a.gguf")


def test_lm_head_lora_on_untied_base_maps_to_output(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base", tie_word_embeddings=False)
    adapter = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    res = convert(adapter, tmp_path / "base" / "config.json", tmp_path / "a.gguf")
    _, tensors = read_back(res.out)
    assert {"output.weight.lora_a", "output.weight.lora_b"} <= set(tensors)
    assert list(tensors["output.weight.lora_b"].shape) == [4, 256]


def test_cli_writes_the_file_and_reports_refusals_on_stderr(tmp_path: Path) -> None:
    model = build_base("qwen3", tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "adapter")
    ok = subprocess.run([sys.executable, "-m", "mhd.merge.gguf", "--adapter", str(adapter), "--base-config",
                         str(tmp_path / "base" / "config.json"), "--out", str(tmp_path / "x.gguf"),
                         "--outtype", "f32"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary == {"out": str(tmp_path / "x.gguf"), "arch": "qwen3", "alpha": 8.0, "tensors": 28,
                       "outtype": "f32"}
    assert GGUFReader(tmp_path / "x.gguf").tensors[0].data.dtype == np.float32
    (tmp_path / "moe.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 128}))
    bad = subprocess.run([sys.executable, "-m", "mhd.merge.gguf", "--adapter", str(adapter), "--base-config",
                          str(tmp_path / "moe.json"), "--out", str(tmp_path / "y.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: base model is a mixture-of-experts model")
    assert not (tmp_path / "y.gguf").exists()
