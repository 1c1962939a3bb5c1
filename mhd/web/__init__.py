"""The daemon's read-only web page: live state, loss curve, GPU use, cost and run history.

:class:`WebServer` is the whole public surface; the daemon starts it into its exit stack.
"""

from __future__ import annotations

from mhd.web.server import WebServer

__all__ = ["WebServer"]
