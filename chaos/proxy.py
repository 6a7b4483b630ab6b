"""A TCP proxy that can blackhole its connections: bytes stop flowing, no socket is closed.

A blackholed peer is the failure a closed socket is not: nothing errors, reads simply never
return, so only the client's own timeouts (or TCP keepalive) can notice. The harness puts one in
front of PostgreSQL for a service's connections.
"""

from __future__ import annotations

import asyncio
import contextlib


class BlackholeProxy:
    """Forwards 127.0.0.1:`port` to `upstream`; `blackhole()` freezes every byte until `resume()`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.upstream_ports: set[int] = set()
        """Local ports of the proxy's own connections to upstream (what PostgreSQL sees as client_port)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.flowing.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def blackhole(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A connection opened while blackholed hangs too: its handshake bytes wait like any other.
        await self.flowing.wait()
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        local_port = upstream_w.get_extra_info("sockname")[1]
        self.upstream_ports.add(local_port)
        pumps = [
            asyncio.ensure_future(self._pump(client_r, upstream_w)),
            asyncio.ensure_future(self._pump(upstream_r, client_w)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            self._tasks.difference_update(pumps)
            self.upstream_ports.discard(local_port)
            for writer in (client_w, upstream_w):
                with contextlib.suppress(Exception):
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await self.flowing.wait()
                data = await reader.read(65536)
                if not data:
                    return
                # Held here while blackholed: read but not delivered, the socket left open.
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
