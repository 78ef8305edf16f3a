"""An aiohttp application served on one address, with its connections bounded in number and in time.

The webhook port faces the providers, and so anyone: a flood of connections must not take the
file descriptors the gRPC port and the database need. So a listener holds at most
`max_connections` connections, each counted from the moment it is accepted (a TLS handshake
included) until it closes. At the limit it stops accepting: new connections wait in the kernel's
accept queue (`BACKLOG`; beyond it the kernel drops connection attempts and clients retry), and
are taken in order as slots free up. Nothing is accepted only to be closed, and reaching the limit
is one WARNING line, rate-limited like every repeated line (observability.logs.RepeatFilter).

A connection that has not sent a complete request head within `idle_timeout` seconds is closed:
a TLS handshake that stalls, headers sent slowly, a kept-alive connection idle between requests
(aiohttp's keepalive_timeout, which runs from the moment a connection opens). Time for the body is
the webhooks' own (webhooks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)

# File descriptors left for everything but webhook connections: the gRPC port's connections, the
# database files, the poller, the admin port, and the interpreter's own.
FILE_RESERVE = 256
BACKLOG = 128
# After the process ran out of file descriptors, the next accept waits this long (as asyncio's own).
_ACCEPT_RETRY_SECONDS = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def connection_budget(configured: int) -> int:
    """`configured`, or fewer when the open-file limit leaves less room beside FILE_RESERVE.

    Raises ValueError when the limit leaves no room at all.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    room = soft - FILE_RESERVE
    if room < 1:
        raise ValueError(f"the open-file limit (ulimit -n) is {soft}: dlrhub needs more than {FILE_RESERVE}")
    return min(configured, room)


class HttpListener:
    """Serves `app` on one address; `port` is the bound port once started."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        idle_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.port = 0
        self._idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        # Told the number of open connections whenever it changes (a gauge).
        self._on_count = on_count
        # Lingering (reading the rest of a body the answer did not need) waits for bytes too.
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=idle_timeout, lingering_time=idle_timeout
        )
        self._slots = asyncio.Semaphore(max_connections)
        self._open = 0
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[None]] = set()

    async def start(self, address: str, *, reuse_port: bool = False) -> None:
        """Binds `address` (host:port; port 0 picks a free port) and starts accepting; with
        `reuse_port`, other processes may bind it too (SO_REUSEPORT: the kernel shares connections).

        Raises OSError when the address cannot be bound.
        """
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        await self._runner.setup()
        try:
            self._socket = socket.create_server(
                (host, int(port)), family=family, backlog=BACKLOG, reuse_port=reuse_port
            )
        except BaseException:
            await self._runner.cleanup()
            raise
        self._socket.setblocking(False)
        self.port = self._socket.getsockname()[1]
        self._accepting = asyncio.get_running_loop().create_task(self._accept(), name="dlrhub-http-accept")

    async def stop(self) -> None:
        """Stops accepting, then closes the connections once their requests are answered."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        connecting = list(self._connecting)  # TLS handshakes under way
        for task in connecting:
            task.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()
        await self._runner.cleanup()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        listening = self._socket
        assert listening is not None
        while True:
            if self._slots.locked():
                log.warning(
                    "HTTP connections at the limit: new ones wait to be accepted",
                    extra={"port": self.port, "max_connections": self.max_connections},
                )
            await self._slots.acquire()
            try:
                connection, _ = await loop.sock_accept(listening)
            except OSError as error:
                self._slots.release()
                if error.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept an HTTP connection: %s", error, extra={"port": self.port})
                    await asyncio.sleep(_ACCEPT_RETRY_SECONDS)
                continue  # otherwise one connection went away before it was accepted
            self._counted(+1)
            task = loop.create_task(self._connect(connection))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, connection: socket.socket) -> None:
        """Hands an accepted connection to aiohttp (after the TLS handshake, when TLS is on)."""
        slot = _Slot(self._release)
        server = self._runner.server
        assert server is not None
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Counted(server(), slot),
                connection,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self._idle_timeout if self._ssl_context is not None else None,
            )
        except BaseException as error:
            slot.release()
            connection.close()
            # A TLS handshake that failed or timed out (OSError, TimeoutError), or the listener stopping.
            if not isinstance(error, OSError | asyncio.CancelledError):
                raise

    def _release(self) -> None:
        self._counted(-1)
        self._slots.release()

    def _counted(self, change: int) -> None:
        self._open += change
        if self._on_count is not None:
            self._on_count(self._open)


class _Slot:
    """One connection's place under the limit, given back once."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, giving its slot back when the connection is lost."""

    __slots__ = ("_inner", "_slot")

    def __init__(self, inner: asyncio.Protocol, slot: _Slot) -> None:
        self._inner = inner
        self._slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._slot.release()
        self._inner.connection_lost(exc)
