"""The control socket: one JSON request per line, one JSON answer per line.

Created 0600 (0660 with ``socket_group``) so only the owner (and that group) can steer the daemon.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, path: Path, handler: Handler, group: str | None = None) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # a stale socket from a killed daemon
        mode = 0o660 if self.group else 0o600
        # Create it with the right mode from the first instant: no window where it is wider.
        old = os.umask(0o777 & ~mode)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        if self.group:
            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
        os.chmod(self.path, mode)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("request must be a JSON object")
                    resp = await self.handler(req)
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    resp = {"ok": False, "error": f"bad request: {exc}"}
                except Exception as exc:
                    log.exception("control: request failed")
                    resp = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(resp, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
