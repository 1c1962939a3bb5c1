"""Fixtures shared by the integration tests that talk to a real OpenSSH sshd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.sshd import SshServer
from tests.support.tcpproxy import TcpProxy


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    """One sshd per test module (tests that restart or re-key it use their own)."""
    with SshServer() as server:
        yield server


@pytest.fixture
def proxy(sshd: SshServer) -> Iterator[TcpProxy]:
    """A TCP proxy in front of ``sshd`` that a test can cut."""
    with TcpProxy(sshd.host, sshd.port) as p:
        yield p
