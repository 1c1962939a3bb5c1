"""A tiny causal LM + tokenizer built offline, for tests and the demo (no model hub needed).

    python -m mhd.devtools.tiny_model OUT_DIR

Qwen3 architecture, 2 layers of width 64, a byte-level BPE trained on the bundled example
memories, and a ChatML chat template whose assistant part carries ``{% generation %}`` markers
(so trl's ``assistant_only_loss`` works on it). Deterministic for a given seed: the same seed
gives byte-identical files, so tests can compare adapters across runs.

Needs the ``train`` extra (torch, transformers, tokenizers); imports them lazily so that
importing this module stays cheap.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from mhd.devtools import examples

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Words the dataset builder and the chat template put around memories; without them in the
# tokenizer's training text they would fall apart into single bytes.
_SCAFFOLD = (
    "system user assistant You are Maya. Speak in your own voice, as Maya would.",
    "Respond in Maya's conversational style: Write a reflection in Maya's voice on this theme:",
    "Think this through in Maya's inner voice: Describe a dream Maya had about: "
    "Describe what happened, as Maya: Summarize, in Maya's words: Say what is on your mind.",
    "### Instruction: ### Input: ### Response: The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 100 2025 2026 a.m. p.m. ? ! , . ; : ' \" ( ) - —",
)


def _training_text() -> Iterator[str]:
    # Repeat so that common words win merges over one-off names.
    for _ in range(3):
        yield from _SCAFFOLD
        yield from examples.corpus()


def build_tokenizer() -> object:
    """A ``PreTrainedTokenizerFast`` with ChatML specials; trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write config, weights (safetensors) and tokenizer files into ``out_dir``; return it."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise in test output

    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # type: ignore[attr-defined]
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # A private generator (not the global seed) so that building a model inside a test does not
    # perturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=pad_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # type: ignore[attr-defined]
    return out_dir


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m mhd.devtools.tiny_model OUT_DIR", file=sys.stderr)
        return 2
    out = build_tiny_model(Path(args[0]))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
