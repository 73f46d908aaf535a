"""The forwarder's sockets: an httpcore network backend on plain asyncio protocols.

httpcore (httpx's engine: the connections, h11, TLS settings) reads and writes through a
"network backend"; its default wraps every socket in anyio streams, which cost a cancel
scope, a checkpoint and a ``sniffio`` lookup per read and per write: about a fifth of a
delivery's CPU in the worker's profile. And httpcore writes a request's head and its body
in two writes, so each delivery paid two ``send`` system calls (two TCP segments) where one
does: on these machines a loopback ``send`` is the most expensive call a delivery makes.

This backend keeps httpcore's connections and protocol handling as they are and changes
only the byte transport:

- one ``asyncio.Protocol`` per connection; ``read`` waits on a future, its timeout a timer
  (``loop.call_later``), so a read or write makes no task, scope or context manager;
- ``write`` queues the bytes and the next ``read`` sends everything queued in one call: an
  HTTP/1.1 request is always followed by reading its answer, so the head and the body leave
  together, and nothing waits longer than until the answer is awaited;
- TLS is asyncio's (``loop.start_tls``), with the ``ssl.SSLContext`` httpcore hands over
  (certificate checks, SNI and ALPN as httpx sets them).

Errors are httpcore's (``ConnectError``, ``ConnectTimeout``, ``ReadError``,
``ReadTimeout``, ``WriteError``, ``WriteTimeout``), which ``forwarder.KeepAlivePool`` maps
to httpx's as before.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Iterable

import httpcore

READ_HIGH_WATER = 256 * 1024  # bytes received and not yet read: stop reading the socket above


class _Protocol(asyncio.Protocol):
    """Bytes in, as they arrive; the end of the connection, and why."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False  # end of stream or connection lost
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None  # a read waiting for bytes
        self.drained: asyncio.Future[None] | None = None  # a write waiting for room
        self.paused_writing = False
        self.paused_reading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and not self.paused_reading:
            self.paused_reading = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def eof_received(self) -> None:
        self.closed = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _expire(future: asyncio.Future[None], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


async def _wait(future: asyncio.Future[None], timeout: float | None, error: Exception) -> None:
    """``future``, or ``error`` raised after ``timeout`` seconds (None: no limit)."""
    timer = None
    if timeout is not None:
        timer = asyncio.get_running_loop().call_later(timeout, _expire, future, error)
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()


class Stream(httpcore.AsyncNetworkStream):
    """One connection, as httpcore uses it: ``write``s queued, sent by the next ``read``."""

    def __init__(self, protocol: _Protocol):
        self._protocol = protocol
        self._queued: list[bytes] = []
        self._write_timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if buffer:
            if self._protocol.closed:
                raise httpcore.WriteError(str(self._protocol.error or "connection closed"))
            self._queued.append(buffer)
            self._write_timeout = timeout

    async def _flush(self) -> None:
        protocol = self._protocol
        data = b"".join(self._queued)
        self._queued.clear()
        if protocol.closed or protocol.transport is None or protocol.transport.is_closing():
            raise httpcore.WriteError(str(protocol.error or "connection closed"))
        protocol.transport.write(data)
        if protocol.paused_writing:  # the kernel's buffer is full: wait for room
            protocol.drained = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.drained, self._write_timeout,
                            httpcore.WriteTimeout("write timed out"))
            finally:
                protocol.drained = None
            if protocol.closed and protocol.error is not None:
                raise httpcore.WriteError(str(protocol.error))

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if self._queued:
            try:
                await self._flush()
            except httpcore.WriteError:
                if not protocol.buffer:
                    raise
                # The server answered before taking the whole request (a 413, say) and
                # closed: its answer is what counts, as with httpcore's own streams.
        if not protocol.buffer and not protocol.closed:
            protocol.waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.waiter, timeout, httpcore.ReadTimeout("read timed out"))
            finally:
                protocol.waiter = None
        if protocol.buffer:
            data = bytes(protocol.buffer[:max_bytes])
            del protocol.buffer[:max_bytes]
            if protocol.paused_reading and len(protocol.buffer) <= READ_HIGH_WATER // 2:
                protocol.paused_reading = False
                protocol.transport.resume_reading()  # type: ignore[union-attr]
            return data
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
        return b""  # the other end closed: httpcore says what that means

    async def aclose(self) -> None:
        self._queued.clear()
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(protocol.transport, protocol,  # type: ignore
                                                 ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            await self.aclose()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None:
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        protocol.transport = transport  # type: ignore[assignment]
        return self

    def get_extra_info(self, info: str) -> Any:
        protocol = self._protocol
        transport = protocol.transport
        if info == "is_readable":  # an idle connection the server closed (or wrote to)
            return protocol.closed or bool(protocol.buffer)
        if transport is None:
            return None
        name = {"ssl_object": "ssl_object", "client_addr": "sockname",
                "server_addr": "peername", "socket": "socket"}.get(info)
        return None if name is None else transport.get_extra_info(name)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """``httpcore.AsyncHTTPConnection(..., network_backend=AsyncioBackend())``."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> Stream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, happy_eyeballs_delay=0.25,
                    local_addr=(local_address, 0) if local_address else None)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return Stream(protocol)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> Stream:
        raise httpcore.ConnectError("vendors are reached over TCP")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
