"""One memory → one training sample (chat messages plus the seed trainer's instruction form).

Whose words the model learns is ``DatasetConfig.voice``: with ``owner`` the owner's own lines
of a conversation become the assistant turn; with ``assistant`` the assistant's replies do (the
original MetaHuman behaviour). Reflections, inner dialogue, dreams and observations are written
in the owner's voice either way.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from mhd.config import DatasetConfig
from mhd.dataset.memories import Memory

_OLD_SHAPE = re.compile(r'^\s*Me:\s*"(?P<said>.*)"\s*$', re.DOTALL)
_TURN = re.compile(r"^(User|Assistant):[ \t]*", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Control characters (Unicode Cc) but tab and newline; BOM and zero-width space (invisible, they
# only hurt tokenization); lone surrogates (valid in JSON, unencodable in UTF-8 output).
_DROP = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\u200b\ud800-\udfff]")
_NOT_WORD = re.compile(r"[\W_]+")

_THEMED = {  # type → instruction; the input is the first sentence (the theme)
    "reflection": "Write a reflection in {name}'s voice on this theme:",
    "reflection_summary": "Write a reflection in {name}'s voice on this theme:",
    "inner_dialogue": "Think this through in {name}'s inner voice:",
}
_TOPICAL = {  # type → instruction; the input names the topics (tags, entities)
    "dream": "Describe a dream {name} had about:",
    "daydream": "Describe a daydream {name} had about:",
    "observation": "Describe what happened, as {name}:",
    "audio": "Describe what happened, as {name}:",
    "summary": "Summarize, in {name}'s words:",
}
_DEFAULT_INSTRUCTION = "Write as {name}:"
_CONVERSATION = {
    "assistant": "Respond in {name}'s conversational style:",
    "owner": "Say it in {name}'s own words:",
}


@dataclass(frozen=True)
class Sample:
    key: str  # the memory's key
    type: str
    instruction: str
    input: str
    output: str

    @property
    def norm(self) -> bytes:
        """Digest of the text with case, punctuation and spacing ignored (near-duplicate test)."""
        text = " ".join(_loose(self.input).split()) + "\x00" + " ".join(_loose(self.output).split())
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]

    def record(self, system_prompt: str, timestamp: str | None) -> dict[str, Any]:
        user = self.instruction + (f"\n\n{self.input}" if self.input else "")
        text = f"### Instruction:\n{self.instruction}\n\n"
        if self.input:
            text += f"### Input:\n{self.input}\n\n"
        text += f"### Response:\n{self.output}"
        return {
            "messages": [
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": user},
                {"role": "assistant", "content": self.output},
            ],
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "text": text,
            "key": self.key,
            "type": self.type,
            "timestamp": timestamp,
        }


def system_prompt(cfg: DatasetConfig) -> str:
    if cfg.system_prompt:
        return cfg.system_prompt.replace("{name}", cfg.persona_name)
    name = cfg.persona_name
    return f"You are {name}. Speak in {name}'s own voice, in the first person."


def clean_text(text: str) -> str:
    """Normalize Unicode, drop control characters, tidy whitespace; keep paragraphs."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _DROP.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _loose(text: str) -> str:
    return _NOT_WORD.sub(" ", text.casefold())


def conversation_turns(memory: Memory) -> tuple[str, str]:
    """(owner's words, assistant's words) from either conversation shape; '' where absent."""
    content = memory.content
    old = _OLD_SHAPE.match(content)
    if old:
        return old.group("said"), memory.response or ""
    parts = _TURN.split(content)
    if len(parts) < 3:  # no "User:"/"Assistant:" markers: all of it is the owner's
        return content, memory.response or ""
    owner: list[str] = [parts[0]] if parts[0].strip() else []
    assistant: list[str] = []
    for speaker, said in zip(parts[1::2], parts[2::2], strict=True):
        (owner if speaker == "User" else assistant).append(said)
    if memory.response:
        assistant.append(memory.response)
    return "\n\n".join(p.strip() for p in owner), "\n\n".join(p.strip() for p in assistant)


def first_sentence(text: str) -> str:
    head = _SENTENCE_END.split(text.split("\n", 1)[0].strip(), maxsplit=1)[0]
    return head if head != text else ""


def topics(memory: Memory) -> str:
    """Tags then entities, each once (case-insensitively), minus tags that merely repeat the type."""
    seen = {memory.type.casefold(), "dream", "summary"}
    words: list[str] = []
    for word in (*memory.tags, *memory.entities):
        word = clean_text(word)
        if word and word.casefold() not in seen:
            seen.add(word.casefold())
            words.append(word)
    return ", ".join(words)


def make_sample(memory: Memory, cfg: DatasetConfig) -> Sample | str:
    """The sample, or a short reason it was skipped (``no_reply``, ``too_short``)."""
    name = cfg.persona_name
    if memory.type == "conversation":
        owner, assistant = (clean_text(t) for t in conversation_turns(memory))
        if cfg.voice == "assistant":
            if not assistant:
                return "no_reply"
            prompt, output = owner, assistant
        else:
            prompt, output = topics(memory), owner
        instruction = _CONVERSATION[cfg.voice]
    else:
        output = clean_text(memory.content)
        if memory.type in _THEMED:
            instruction, prompt = _THEMED[memory.type], first_sentence(output) or topics(memory)
        else:
            instruction = _TOPICAL.get(memory.type, _DEFAULT_INSTRUCTION)
            prompt = topics(memory)
    if len(output) < cfg.min_chars or not output:
        return "too_short"
    return Sample(memory.key, memory.type, instruction.replace("{name}", name), prompt, output)
