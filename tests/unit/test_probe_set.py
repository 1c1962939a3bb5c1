"""The quality gate's probe set (mhd/quality/probe.jsonl) is shipped and well formed."""

from __future__ import annotations

import json
from importlib import resources


def test_probe_set_has_sixty_unique_user_assistant_exchanges() -> None:
    text = resources.files("mhd.quality").joinpath("probe.jsonl").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) >= 60
    prompts = []
    for line in lines:
        messages = json.loads(line)["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        prompts.append(messages[0]["content"].strip().lower())
    assert len(set(prompts)) == len(prompts)
