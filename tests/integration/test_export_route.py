"""Which route a run takes, decided in Provisioning, and how the pod is told (config.json "export").

Provisioning runs in-process here with the local provider, a real SQLite store and the Ollama
stand-in; the trainer's own checks of the "export" block run it as the pod does (a lone folder).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mhd.config import Config
from mhd.errors import ConfigError, TransientProviderError, is_transient
from mhd.remote.local import LocalProvider
from mhd.remote.provider import Endpoint
from mhd.remote.session import Session
from mhd.states import provisioning
from mhd.states.context import RunContext
from mhd.states.machine import RunMachine
from mhd.states.model import RunState
from mhd.store import Run, Store
from tests.support.memories import write_examples_to
from tests.support.ollama_standin import OllamaStandIn

POD = Path(__file__).resolve().parents[2] / "mhd" / "pod"
BASE = "qwen3:8b"


@pytest.fixture(scope="module")
def memories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_examples_to(tmp_path_factory.mktemp("memories"))


class Provisioning:
    """One run in Provisioning, driven by the real state action."""

    def __init__(self, tmp: Path, memories: Path, merge: dict[str, Any]) -> None:
        # merge.base: the adapter route's preflight needs it (the stand-ins below have it pulled).
        self.cfg = Config.model_validate({"memory_dir": str(memories), "state_dir": str(tmp / "state"),
                                          "provider": "local", "merge": {"base": BASE, **merge}})
        self.store = Store(self.cfg.db_path_url)

        async def connector(run: Run, ep: Endpoint) -> tuple[Session, str | None]:
            raise AssertionError("Provisioning connects to nothing")

        self.ctx = RunContext(cfg=self.cfg, store=self.store, provider=LocalProvider(self.cfg.local_root),
                              connector=connector, remote_root=str(self.cfg.local_root),
                              log=logging.getLogger("test"))
        self.run = self.store.create_run("manual", "local")
        self.machine = RunMachine(self.store, self.run)

    def act(self) -> None:
        asyncio.run(provisioning.act(self.ctx, self.machine))

    @property
    def inputs(self) -> Path:
        return self.cfg.runs_dir / self.run.id / "input"

    def export(self) -> dict[str, Any]:
        return dict(json.loads((self.inputs / "config.json").read_text())["export"])

    def pods_created(self) -> int:
        log = self.cfg.local_root / "pods.log"
        return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize(("version", "enabled"), [("0.33.0", False), ("0.34.0", False), ("0.34.1", True),
                                                  ("0.40.2", True)])
def test_ollama_version_decides_whether_the_pod_exports_a_merged_gguf(
        tmp_path: Path, memories: Path, version: str, enabled: bool) -> None:
    with OllamaStandIn(version=version) as ollama:
        ollama.add_model(BASE)
        p = Provisioning(tmp_path, memories, {"mode": "ollama", "ollama_url": ollama.url, "quantize": "q5_k_m",
                                              "llama_cpp_dir": "/srv/llama.cpp"})
        p.act()
        asked = len(ollama.requests_to("/api/version"))

    assert asked == 1
    assert p.export() == {"enabled": enabled, "quantize": "Q5_K_M", "llama_cpp_dir": "/srv/llama.cpp",
                          "route": "merged" if enabled else "adapter"}
    assert (p.inputs / "export.py").read_bytes() == (POD / "export.py").read_bytes()
    assert p.machine.state is RunState.CONNECTING and p.pods_created() == 1
    assert "model route" in (p.cfg.runs_dir / p.run.id / "run.log").read_text()


def test_without_ollama_the_pod_ships_the_adapter_only(tmp_path: Path, memories: Path) -> None:
    p = Provisioning(tmp_path, memories, {"mode": "none"})
    p.act()
    assert p.export()["enabled"] is False and p.export()["route"] == "none"


def test_forced_merged_route_exports_without_asking_ollama(tmp_path: Path, memories: Path) -> None:
    with OllamaStandIn(version="0.33.0") as ollama:
        ollama.add_model(BASE)
        url = ollama.url
    # Ollama is down now: a forced route does not need it.
    p = Provisioning(tmp_path, memories, {"mode": "ollama", "ollama_url": url, "route": "merged"})
    p.act()
    assert p.export() == {"enabled": True, "quantize": "Q4_K_M", "llama_cpp_dir": "/opt/llama.cpp",
                          "route": "merged"}


def test_unreachable_ollama_is_transient_and_rents_nothing(tmp_path: Path, memories: Path) -> None:
    with OllamaStandIn(version="0.34.1") as ollama:
        ollama.add_model(BASE)
        url = ollama.url
    p = Provisioning(tmp_path, memories, {"mode": "ollama", "ollama_url": url})

    with pytest.raises(TransientProviderError, match=r"merge\.route") as err:
        p.act()

    assert is_transient(err.value)  # the runner retries the state with backoff
    assert "Is Ollama running" in str(err.value)
    assert p.pods_created() == 0 and not p.inputs.exists()
    assert p.machine.state is RunState.PROVISIONING

    with OllamaStandIn(version="0.34.1") as ollama:  # Ollama is back (on another port here)
        ollama.add_model(BASE)
        p.cfg.merge.ollama_url = ollama.url
        p.act()
    assert p.export()["enabled"] is True and p.pods_created() == 1


def test_re_entered_provisioning_keeps_the_first_answer(tmp_path: Path, memories: Path) -> None:
    with OllamaStandIn(version="0.34.1") as ollama:
        ollama.add_model(BASE)
        p = Provisioning(tmp_path, memories, {"mode": "ollama", "ollama_url": ollama.url})
        p.act()
        first = p.export()
        # A crash after the inputs were built: the state is re-entered; Ollama changed meanwhile.
        ollama.version = "0.33.0"
        p.store.update_run(p.run.id, state=RunState.PROVISIONING)
        p.machine = RunMachine(p.store, p.store.get_run(p.run.id))  # type: ignore[arg-type]
        p.act()
        assert len(ollama.requests_to("/api/version")) == 1
    assert p.export() == first and p.pods_created() == 1  # adopted, not rented twice


def test_unknown_quantization_is_a_config_error_before_anything_is_rented(tmp_path: Path, memories: Path) -> None:
    p = Provisioning(tmp_path, memories, {"mode": "ollama", "ollama_url": "http://127.0.0.1:9",
                                          "route": "merged", "quantize": "q4_K_X"})
    with pytest.raises(ConfigError, match=r"merge\.quantize = 'q4_K_X': expected one of .*Q4_K_M"):
        p.act()
    assert p.pods_created() == 0


# --- the trainer's side: config.json "export" is checked before any training ---------------------


def lone_trainer(tmp_path: Path, export: dict[str, Any] | None, with_exporter: bool = True) -> Path:
    """The pod's run folder: the trainer's files (+ export.py), config.json, a dataset."""
    d = tmp_path / "run"
    d.mkdir()
    for name in (provisioning.TRAINER, *provisioning.TRAINER_MODULES):
        shutil.copy(POD / name, d / name)
    if with_exporter:
        shutil.copy(POD / "export.py", d / "export.py")
    row = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    (d / "dataset.jsonl").write_text(json.dumps(row) + "\n")
    (d / "config.json").write_text(json.dumps({"base_model": str(tmp_path / "nope"), "export": export}))
    return d


def run_lone(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", str(d / "train.py"), "--run-dir", str(d)], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})


@pytest.mark.parametrize(("export", "with_exporter", "says"), [
    ({"enabled": True, "llama_cpp_dir": "/nonexistent"}, True,
     "convert_hf_to_gguf.py is not in /nonexistent: use the mhd trainer image"),
    ({"enabled": True, "quantize": "q9"}, True, "config.json: export.quantize = 'q9': expected one of"),
    ({"enabled": "yes"}, True, "config.json: export = {'enabled': 'yes'}: expected an object"),
    ({"enabled": True}, False, "export.py is not next to train.py"),
])
def test_a_bad_export_setup_exits_2_before_training(tmp_path: Path, export: dict[str, Any], with_exporter: bool,
                                                    says: str) -> None:
    result = run_lone(lone_trainer(tmp_path, export, with_exporter))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines


def test_a_quantizer_is_required_unless_the_converter_writes_the_type(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mhd.pod import export as E

    llama = tmp_path / "llama.cpp"
    llama.mkdir()
    (llama / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(E, "has_binding", lambda: False)
    q8 = E.ExportConfig.from_dict({"enabled": True, "quantize": "q8_0", "llama_cpp_dir": str(llama)})
    assert E.check_tools(q8) == "converter"
    q4 = E.ExportConfig.from_dict({"enabled": True, "llama_cpp_dir": str(llama)})
    with pytest.raises(E.ExportProblem, match="no llama-quantize"):
        E.check_tools(q4)
    binary = llama / "llama-quantize"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert E.check_tools(q4) == str(binary)


def test_the_export_names_the_disk_knob_when_the_pod_disk_is_too_small(tmp_path: Path) -> None:
    from mhd.pod import export as E

    exporter = E.Exporter(tmp_path, tmp_path / "adapter", "base", E.ExportConfig(enabled=True),
                          progress=lambda line: None, log=lambda msg: None)
    exporter.work.mkdir()
    exporter.need_space(1 << 20, "a small file")  # fits
    with pytest.raises(E.ExportProblem, match=r"needs ~\d+\.\d GB free in .*export for the merged weights.*"
                                              r"raise runpod\.disk_gb"):
        exporter.need_space(1 << 60, "the merged weights and their GGUF")
