"""The pod's lock resolves for the pod's platform with pip's real resolver (needs PyPI).

pip reads only wheel metadata (PEP 658), so each resolution takes ~20-40 s, not a 5 GB download.
Without network the tests skip, saying so; with network a broken lock fails them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mhd.devtools import podlock

pytestmark = pytest.mark.slow


def _check(lock: Path, cache: Path) -> list[podlock.Pin]:
    try:
        return podlock.check(lock, cache)
    except podlock.RegistryUnreachable as exc:
        pytest.skip(f"PyPI cannot be reached, the pod's lock was not resolved: {exc}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pip-cache")


def _without_hashes(text: str, **pins: str) -> str:
    """The lock with other versions for some pins; hashes dropped (they belong to the old wheels)."""
    text = re.sub(r" \\\n\s+--hash=sha256:[0-9a-f]{64}", "", text)
    for name, version in pins.items():
        text, n = re.subn(rf"^{name}==\S+$", f"{name}=={version}", text, flags=re.M)
        assert n == 1, name
    return text


def test_pod_lock_resolves_for_linux_x86_64_cpython_311(cache: Path) -> None:
    pins = {p.name: p.version for p in _check(podlock.LOCK, cache)}
    locked = podlock.parse(podlock.LOCK.read_text())
    for name in ("torch", "unsloth", "unsloth-zoo", "trl", "peft", "transformers", "datasets", "accelerate",
                 "bitsandbytes", "xformers", "gguf", "sentencepiece"):
        assert pins[name] == locked[name].version
        assert locked[name].hashes, f"{name} has no hash"
    assert "nvidia-cuda-runtime" in pins or any(n.startswith("nvidia-cuda-runtime") for n in pins)


def test_image_lock_is_the_shipped_lock() -> None:
    image_lock = Path(__file__).resolve().parents[2] / "image" / "requirements.lock"
    assert image_lock.read_text() == podlock.LOCK.read_text()
    assert "mhd-lock: python=3.11" in podlock.LOCK.read_text()


def test_a_pin_that_does_not_exist_fails_the_lock(cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "requirements.lock"
    bad.write_text(_without_hashes(podlock.LOCK.read_text(), peft="0.21.99"))
    with pytest.raises(podlock.LockError, match=r"peft==0\.21\.99") as info:
        _check(bad, cache)
    assert not isinstance(info.value, podlock.RegistryUnreachable)


def test_a_pin_that_conflicts_with_unsloths_requirements_fails_the_lock(cache: Path, tmp_path: Path) -> None:
    # trl 1.16.0 exists, but unsloth 2026.10.9 declares trl<=1.15.0
    bad = tmp_path / "requirements.lock"
    bad.write_text(_without_hashes(podlock.LOCK.read_text(), trl="1.16.0"))
    with pytest.raises(podlock.LockError, match="ResolutionImpossible") as info:
        _check(bad, cache)
    assert "trl" in str(info.value)


def test_a_wrong_hash_fails_the_lock(cache: Path, tmp_path: Path) -> None:
    text = podlock.LOCK.read_text()
    line = re.search(r"^peft==\S+ \\\n\s+--hash=sha256:([0-9a-f]{64})", text, re.M)
    assert line is not None
    bad = tmp_path / "requirements.lock"
    bad.write_text(text.replace(line.group(1), "0" * 64))
    with pytest.raises(podlock.LockError, match="DO NOT MATCH THE HASHES"):
        _check(bad, cache)


def test_lock_parser_refuses_an_unpinned_line() -> None:
    with pytest.raises(podlock.LockError, match="not a pinned"):
        podlock.parse("trl>=1.0\n")
