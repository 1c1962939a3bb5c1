"""Merging: turn a fetched LoRA adapter into a model the owner chats with.

Daemon-facing API (torch-free; heavy work runs in subprocesses):

- :func:`merge_run` — convert/register (``ollama``) or merge (``peft``) one run's adapter;
  idempotent, so re-entering after a crash finishes the job.
- :func:`rollback` — point the alias at the previous (or a named run's) model.
- :func:`ollama_route` — ``adapter`` | ``merged`` | ``none``, from Ollama's version.

Modules: ``pipeline`` (the steps), ``registry`` (names, alias, keep-N, rollback), ``ollama`` (HTTP
client), and the subprocess entry points ``gguf`` (PEFT LoRA → GGUF LoRA) and ``peft_merge``
(``merge_and_unload``), which are never imported by the daemon.
"""

from __future__ import annotations

from mhd.merge.ollama import OllamaClient, OllamaError
from mhd.merge.pipeline import merge_run, ollama_route, route_for_version
from mhd.merge.registry import alias_name, model_name, rollback

__all__ = [
    "OllamaClient",
    "OllamaError",
    "alias_name",
    "merge_run",
    "model_name",
    "ollama_route",
    "rollback",
    "route_for_version",
]
