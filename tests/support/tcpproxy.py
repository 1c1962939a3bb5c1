"""A TCP proxy a test controls, to make links drop exactly when the test wants.

The proxy runs its own asyncio loop in its own thread, so it keeps forwarding while the test's
loop is busy and it can sit between a daemon *subprocess* and an sshd just as well. Every public
method is a plain blocking call, safe from any thread.

    from tests.support.sshd import SshServer
    from tests.support.tcpproxy import TcpProxy

    with SshServer() as sshd, TcpProxy(sshd.host, sshd.port) as proxy:
        endpoint = Endpoint(proxy.host, proxy.port, sshd.user)   # connect through the proxy
        ...
        proxy.cut()                   # drop every current connection now (both sides)
        proxy.cut_after(8 << 20)      # drop them once 8 MiB more flowed server→client
        proxy.pause()                 # refuse new connections (the port is closed) ...
        proxy.resume()                # ... and accept them again, same port
        proxy.stall()                 # keep connections open but forward nothing (dead link)
        proxy.unstall()
        proxy.latency_s = 0.05        # from now on, each direction is 50 ms late (RTT 100 ms)
        proxy.connections, proxy.active, proxy.cuts, proxy.bytes_down, proxy.bytes_up

"down" is target→client (what a download reads), "up" is client→target.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")
_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 512  # up to 32 MiB in transit per direction: enough for latency x bandwidth


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        # abort(), not close(): drop at once without flushing buffers, like a broken link.
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class TcpProxy:
    """Forward ``listen_host:listen_port`` (default: a free port on 127.0.0.1) to a target."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        latency_s: float = 0.0,
    ) -> None:
        """``latency_s`` delays every byte by that much in each direction (RTT = 2 x latency_s),
        without limiting bandwidth: a far-away pod on a fast link."""
        self.target = (target_host, target_port)
        self.latency_s = latency_s
        self.host = listen_host
        self.port = listen_port
        self.connections = 0  # accepted in total
        self.cuts = 0  # cut() calls and armed cuts that fired
        self.bytes_up = 0
        self.bytes_down = 0
        self._links: set[_Link] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._flowing: asyncio.Event | None = None
        self._cut_at: tuple[Literal["up", "down"], int] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start the proxy thread and listen; :attr:`port` is known when this returns."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"tcpproxy->{self.target}", daemon=True)
        self._thread.start()
        self._call(self._setup())
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- controls -----------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections open right now."""
        return len(self._links)

    def cut(self) -> int:
        """Abort every current connection on both sides; keep accepting new ones.

        Returns how many connections were cut.
        """
        return self._call(self._cut())

    def cut_after(self, nbytes: int, direction: Literal["up", "down"] = "down") -> None:
        """Arm a one-shot :meth:`cut` that fires once ``nbytes`` more bytes flowed ``direction``."""
        self._call(self._arm(direction, nbytes))

    def pause(self, *, cut: bool = False) -> None:
        """Stop listening: new connections are refused until :meth:`resume` (same port).

        With ``cut=True`` the current connections are dropped as well.
        """
        self._call(self._pause(cut))

    def resume(self) -> None:
        self._call(self._listen())

    def stall(self) -> None:
        """Keep connections open but stop forwarding bytes (a silently dead link)."""
        self._call(self._set_flowing(False))

    def unstall(self) -> None:
        self._call(self._set_flowing(True))

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to another target (e.g. an sshd that moved)."""
        self.target = (host, port)

    # ---- loop side ----------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("TcpProxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _setup(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        # Remember the kernel's choice so pause()/resume() reopen the very same port.
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _pause(self, cut: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # not wait_closed(): on 3.12+ it waits for all connections to end
        if cut:
            await self._cut()

    async def _shutdown(self) -> None:
        await self._pause(cut=True)
        # End the connection handlers while the loop still runs: a task left pending (a delayed
        # chunk under latency_s) would be destroyed with the closed loop, warning as it goes.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.cuts += 1
        return len(links)

    async def _arm(self, direction: Literal["up", "down"], nbytes: int) -> None:
        start = self.bytes_down if direction == "down" else self.bytes_up
        self._cut_at = (direction, start + nbytes)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._links.discard(link)
            writer.transport.abort()  # the client sees the failure as a reset, as with a dead host
            return
        link.upstream = up_writer
        if link not in self._links:  # cut while we were connecting upstream
            link.abort()
            return
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, "up")),
            asyncio.create_task(self._pump(up_reader, writer, "down")),
        ]
        # Whichever side ends first ends the pair: SSH has no use for half-closed links.
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        self._links.discard(link)
        link.abort()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: Literal["up", "down"]
    ) -> None:
        """Read from ``src``; a sender task delivers each chunk ``latency_s`` after it arrived.

        The bounded queue keeps TCP back-pressure end to end, so the proxy never hoards data.
        """
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        sender = asyncio.create_task(self._send(queue, dst, direction))
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while not sender.done() and (data := await src.read(_CHUNK)):
                    await self._flowing.wait()
                    await queue.put((loop.time() + self.latency_s, data))
            while not sender.done():  # tell the sender we are done, unless it already is
                try:
                    queue.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    await asyncio.sleep(0.01)
            await sender
        finally:
            sender.cancel()

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], dst: asyncio.StreamWriter, direction: str
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if dst.is_closing():
                    return
                dst.write(data)
                await dst.drain()
                if direction == "down":
                    self.bytes_down += len(data)
                    total = self.bytes_down
                else:
                    self.bytes_up += len(data)
                    total = self.bytes_up
                if self._cut_at is not None and self._cut_at[0] == direction and total >= self._cut_at[1]:
                    self._cut_at = None
                    await self._cut()
                    return
