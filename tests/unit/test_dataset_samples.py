"""Memory → sample: conversation shapes, themes, cleaning, the persona prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mhd.config import DatasetConfig
from mhd.dataset.memories import Memory, memory_key
from mhd.dataset.samples import clean_text, conversation_turns, first_sentence, make_sample, system_prompt


def mem(content: str, type: str = "observation", response: str | None = None, **kw: Any) -> Memory:
    return Memory(path=Path("x.json"), id=None, timestamp=None, type=type, content=content, response=response,
                  tags=kw.get("tags", ()), entities=kw.get("entities", ()), metadata={}, extra={},
                  key=memory_key(type, content, response))


def test_new_shape_multi_turn_conversation() -> None:
    m = mem("User: first question\n\nAssistant: first answer\n\nUser: follow-up\nAssistant: second answer",
            type="conversation")
    assert conversation_turns(m) == ("first question\n\nfollow-up", "first answer\n\nsecond answer")


def test_old_shape_conversation_unquotes_the_owner() -> None:
    m = mem('Me: "I said "hello" to the neighbours."', type="conversation", response="Nice.")
    assert conversation_turns(m) == ('I said "hello" to the neighbours.', "Nice.")


def test_conversation_without_markers_is_all_owner() -> None:
    assert conversation_turns(mem("just a note to self", type="conversation")) == ("just a note to self", "")


def test_reflection_theme_is_the_first_sentence() -> None:
    s = make_sample(mem("Rest needs one thing just for me. Not errands. Not catch-up work.", type="reflection"),
                    DatasetConfig(persona_name="Maya"))
    assert not isinstance(s, str)
    assert s.input == "Rest needs one thing just for me."
    assert s.output.endswith("Not catch-up work.") and s.instruction == (
        "Write a reflection in Maya's voice on this theme:")


def test_single_sentence_reflection_falls_back_to_topics() -> None:
    s = make_sample(mem("Rest needs one thing that is just for me.", type="reflection", tags=("rest", "Rest")),
                    DatasetConfig())
    assert not isinstance(s, str) and s.input == "rest"


def test_first_sentence() -> None:
    assert first_sentence("One. Two three.") == "One."
    assert first_sentence("Only one sentence") == ""


def test_clean_text_keeps_emoji_sequences_and_paragraphs() -> None:
    family = "\U0001f469\u200d\U0001f467"  # ZWJ sequence: the joiner must stay
    assert clean_text(f" a\tb  {family} \r\n\r\n\r\n\r\nc\x1b[0m ") == f"a b {family}\n\nc[0m"


def test_system_prompt_default_and_custom() -> None:
    assert "Maya" in system_prompt(DatasetConfig(persona_name="Maya"))
    assert system_prompt(DatasetConfig(persona_name="Maya", system_prompt="You are {name}'s twin.")) == (
        "You are Maya's twin.")
