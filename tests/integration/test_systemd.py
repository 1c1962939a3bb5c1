"""systemd integration: the unit's promises, and the daemon's sd_notify side of them."""

from __future__ import annotations

import configparser
import socket
import time
from pathlib import Path

import pytest

from tests.support.daemon import write_memories

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mhd.service"


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    return cp


def test_unit_is_notify_with_watchdog_restart_dirs_and_hardening():
    s = unit()["Service"]
    assert s["Type"] == "notify"
    assert int(s["WatchdogSec"]) > 0
    assert s["Restart"] == "on-failure"
    assert s["RuntimeDirectory"] == "mhd" and s["StateDirectory"] == "mhd"
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert s[key] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert s["ProtectHome"] in ("read-only", "yes", "tmpfs")
    assert "daemon" in s["ExecStart"]
    # Secrets never in the unit's environment lines.
    assert "API_KEY=" not in UNIT.read_text().replace("API_KEY_FILE=", "")


@pytest.mark.slow
def test_daemon_sends_ready_watchdog_and_stopping_then_exits_0_on_sigterm(denv, tmp_path):
    sock_path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(0.2)
    write_memories(denv.memories, 2)
    d = denv.daemon(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    d.start(wait=False)
    assert d.proc is not None
    # WATCHDOG_PID must name the daemon itself for it to ping; systemd sets it to MAINPID.
    messages: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
        try:
            messages.append(srv.recv(4096).decode())
        except TimeoutError:
            continue
    assert any(m.startswith("READY=1") for m in messages), messages
    assert any("WATCHDOG=1" in m for m in messages), messages
    d.wait_ready()
    assert d.stop() == 0
    srv.settimeout(2)
    tail = []
    try:
        while True:
            tail.append(srv.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in tail + messages)
    srv.close()


def test_journal_lines_carry_syslog_priority_when_under_journald():
    import logging

    from mhd.daemon.service import JournalFormatter

    rec = logging.LogRecord("mhd.run", logging.WARNING, __file__, 1, "pod %s lost", ("p1",), None)
    assert JournalFormatter(journal=True).format(rec) == "<4>mhd.run: pod p1 lost"
    assert "WARNING" in JournalFormatter(journal=False).format(rec)
