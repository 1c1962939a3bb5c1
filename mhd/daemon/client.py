"""The CLI side of the control socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from mhd.errors import MhdError


class DaemonNotRunning(MhdError):
    pass


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        s.close()
        raise DaemonNotRunning(f"mhd daemon is not running (no answer on {path})") from exc
    try:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf:
        raise DaemonNotRunning(f"mhd daemon closed the connection on {path}")
    resp: dict[str, Any] = json.loads(buf)
    return resp
