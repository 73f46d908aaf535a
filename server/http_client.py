"""The forwarder's HTTP client: HTTP/1.1 keep-alive connections to vendors, parsed here.

Why its own client and not httpx's (docs/architecture.md, "The forwarder"; measured in
docs/performance-log.md): a delivery is one small JSON request and one small answer, and
with httpx's pool, then httpcore's connections and h11 under our own pool, the protocol
layers were still more than half of a worker's CPU samples: per request an ``httpx.Request``
and ``httpx.Response`` with their header models, httpcore's request and response models,
h11's event objects and validators, and the network backend's read calls. Here a request is
one ``bytes`` head written with its body in one ``send``, and an answer is parsed from the
bytes the socket brought: a few ``find`` and ``split`` calls, the body framed as RFC 9112
section 6.3 says. What httpx gave that the forwarder relies on is kept: its timeouts
(connect, read, write, pool), its exceptions (``httpx.ConnectError``, ``httpx.ReadTimeout``
and the rest: callers catch those), TLS with certificate checks (httpx's default
``SSLContext``, SNI, ALPN ``http/1.1``), gzip and deflate answers (we ask for them), and the
refusal of a header that would split a request (``httpx.LocalProtocolError``).

The parsing is strict where a mistake would be silent (a status line, a header line, a
length, a chunk size that does not parse is ``httpx.RemoteProtocolError``; a
``Transfer-Encoding`` beside a ``Content-Length`` too, as RFC 9112 section 6.3 tells a
client to treat it) and bounded everywhere: the head of an answer at ``HEAD_LIMIT`` bytes,
its interim answers at ``INTERIM_LIMIT``, its trailers at ``HEAD_LIMIT`` bytes, its body at
``BODY_LIMIT`` bytes once decoded and twice that as it came (a longer body is cut there, its
status stands, and the connection is closed rather than read to the end), and the whole
answer at the read timeout. Where the only way out is an HTTP proxy (``Proxy``,
``ONETAG_FORWARD_PROXY``), https goes through its CONNECT tunnel with TLS end to end.
Checked against answers cut at every byte, h11's reading of the same heads
(tests/test_http_client.py), and real nginx and Caddy servers
(tests/test_http_client_servers.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import ssl
import time
import urllib.parse
import zlib
from typing import Any, Iterable, Mapping

import httpx

READ_HIGH_WATER = 256 * 1024  # bytes received and not yet parsed: stop reading the socket above
HEAD_LIMIT = 64 * 1024  # an answer's status line and headers
BODY_LIMIT = 64 * 1024  # an answer's body, decoded (the forwarder keeps 4 KiB of it at most),
# and twice that of its bytes as they came: a slot holds no more, whatever a vendor sends
INTERIM_LIMIT = 8  # 1xx answers before the final one
CHUNK_LINE_LIMIT = 4096  # a chunk-size line with its extensions, a trailer line

# RFC 9110 section 5.6.2: a header name is a token; a value holds no control character
# but a tab (as h11 refused them).
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB, as h11
# RFC 9112 section 4: "HTTP/1.1 200 OK" (the reason may be empty or absent).
_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?:[ \t].*)?\Z", re.DOTALL)
_HEADER_LINE = re.compile(rb"([^:\s]+):[ \t]*(.*?)[ \t]*\Z", re.DOTALL)
_BAD_ANSWER_VALUE = re.compile(rb"[\0\r]")  # RFC 9112 2.2: a bare CR is refused
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,;])\s*timeout\s*=\s*(\d+)", re.IGNORECASE)
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                      b"proxy-authorization"})
_NO_BODY_STATUSES = frozenset({204, 304})
_EMPTY_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})  # say Content-Length: 0


class ConnectionClosed(httpx.RemoteProtocolError):
    """The connection ended before a byte of the answer arrived (on a reused connection:
    the vendor closed it while it sat idle, so the request goes once more on a new one)."""


class Answer:
    """A vendor's answer: its status, its headers (lower-case names; a repeated header's
    values joined with ", ", as ``httpx.Headers.get`` gives them), its body decoded from
    gzip or deflate, and whether that body was cut at ``BODY_LIMIT``."""

    __slots__ = ("status_code", "headers", "content", "truncated")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes,
                 truncated: bool = False):
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.truncated = truncated

    def __repr__(self) -> str:
        return f"<Answer {self.status_code}, {len(self.content)} bytes>"


class Origin:
    """Where a URL's requests go and what they say: parsed once per URL (``origin``)."""

    __slots__ = ("key", "host", "port", "tls", "target", "host_header", "authority")

    def __init__(self, url: str):
        parsed = httpx.URL(url)  # raises httpx.InvalidURL for a malformed one, as httpx did
        scheme = parsed.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{parsed.scheme}://'.")
        if not parsed.raw_host:
            raise httpx.InvalidURL(f"no host in {url!r}")
        self.tls = scheme == b"https"
        default_port = 443 if self.tls else 80
        self.port = parsed.port or default_port
        self.host = parsed.raw_host.decode("ascii")
        self.key = (scheme, parsed.raw_host, self.port)
        self.target = parsed.raw_path or b"/"
        host = parsed.raw_host if b":" not in parsed.raw_host else b"[" + parsed.raw_host + b"]"
        self.host_header = host if self.port == default_port else b"%s:%d" % (host, self.port)
        self.authority = b"%s:%d" % (host, self.port)  # a CONNECT's target: always a port


class Proxy:
    """An HTTP proxy every request goes through (``ONETAG_FORWARD_PROXY``): https origins
    through a CONNECT tunnel (the TLS, its certificate checks included, stays end to end),
    plain http ones as absolute-form requests (RFC 9112 section 3.2.2)."""

    __slots__ = ("host", "port", "authorization", "where")

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError("a proxy is http://[user:password@]host:port")
        self.host, self.port = parts.hostname, parts.port
        self.where = f"the proxy {self.host}:{self.port}"
        self.authorization: bytes | None = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            self.authorization = b"Basic " + base64.b64encode(
                f"{user}:{password}".encode("utf-8"))

    def tunnel_head(self, origin: Origin) -> bytes:
        authority = origin.authority
        lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
        if self.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self.authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"


def request_head(method: bytes, origin: Origin, headers: Iterable[tuple[str, str]],
                 body: bytes | None, proxy: Proxy | None = None) -> bytes:
    """The request line and headers (Host first, Content-Length last), each header checked:
    a name that is not a token, one the client writes itself, or a value with a control
    character (CR LF would split the request) is refused with ``httpx.LocalProtocolError``
    before a byte is sent. Through a ``proxy``,
    a plain http request names its whole URL and carries the proxy's credentials."""
    if proxy is not None and not origin.tls:
        lines = [method + b" http://" + origin.host_header + origin.target + b" HTTP/1.1",
                 b"Host: " + origin.host_header]
        if proxy.authorization is not None:
            lines.append(b"Proxy-Authorization: " + proxy.authorization)
    else:
        lines = [method + b" " + origin.target + b" HTTP/1.1", b"Host: " + origin.host_header]
    for name, value in headers:
        try:
            raw_name, raw_value = name.encode("ascii"), value.encode("latin-1")
        except (UnicodeEncodeError, AttributeError):
            raise httpx.LocalProtocolError(f"header {name!r}: not text HTTP can carry") from None
        if raw_name.lower() in _FRAMING:
            raise httpx.LocalProtocolError(f"header {name!r} is the client's to write")
        if not _TOKEN.match(raw_name):
            raise httpx.LocalProtocolError(f"illegal header name {name!r}")
        if _BAD_VALUE.search(raw_value):
            raise httpx.LocalProtocolError(f"illegal header value for {name!r}")
        lines.append(raw_name + b": " + raw_value.strip(b" \t"))
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    elif method in _EMPTY_BODY_METHODS:
        lines.append(b"Content-Length: 0")
    return b"\r\n".join(lines) + b"\r\n\r\n"


# Reading an answer -------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[int, bool, dict[str, str], list[tuple[str, str]]]:
    """(status, HTTP/1.1 or later, headers as ``Answer`` keeps them, every header in order)
    of an answer's head (without its blank line). Lines may end in CRLF or a bare LF (RFC
    9112 section 2.2); a folded line (obs-fold) continues the header before it."""
    lines = head.split(b"\n")
    status_line = lines[0].rstrip(b"\r")
    matched = _STATUS_LINE.match(status_line)
    if matched is None:
        raise httpx.RemoteProtocolError(f"malformed status line {status_line[:100]!r}")
    major, minor, status = int(matched[1]), int(matched[2]), int(matched[3])
    if major != 1:
        raise httpx.RemoteProtocolError(f"unsupported HTTP version {major}.{minor}")
    fields: list[tuple[str, str]] = []
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):  # obs-fold: replaced by a space (RFC 9112 5.2)
            if not fields:
                raise httpx.RemoteProtocolError("a folded line before any header")
            name, value = fields[-1]
            fields[-1] = (name, (value + " " + line.strip(b" \t").decode("latin-1")).strip())
            continue
        header = _HEADER_LINE.match(line)
        if header is None or not _TOKEN.match(header[1]) or _BAD_ANSWER_VALUE.search(header[2]):
            raise httpx.RemoteProtocolError(f"malformed header line {line[:100]!r}")
        fields.append((header[1].decode("latin-1").lower(), header[2].decode("latin-1")))
    headers: dict[str, str] = {}
    for name, value in fields:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return status, minor >= 1, headers, fields


def body_length(method: bytes, status: int, fields: list[tuple[str, str]]) -> int | str:
    """How the answer's body is delimited (RFC 9112 section 6.3): its length in bytes (0:
    none), ``"chunked"``, or ``"close"`` (read until the vendor closes)."""
    if method == b"HEAD" or status < 200 or status in _NO_BODY_STATUSES:
        return 0
    codings = [v for n, v in fields if n == "transfer-encoding"]
    lengths = {v.strip() for n, v in fields if n == "content-length"}
    if codings:
        if lengths:  # a smuggling pattern: RFC 9112 6.3 says to treat it as an error
            raise httpx.RemoteProtocolError("both Transfer-Encoding and Content-Length")
        names = [c.strip().lower() for v in codings for c in v.split(",") if c.strip()]
        if names != ["chunked"]:
            raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {codings!r}")
        return "chunked"
    if lengths:
        values = {v.strip() for text in lengths for v in text.split(",")}
        if len(values) != 1:
            raise httpx.RemoteProtocolError(f"conflicting Content-Length {sorted(lengths)!r}")
        (value,) = values
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise httpx.RemoteProtocolError(f"malformed Content-Length {value[:30]!r}")
        return int(value)
    return "close"


def _idle_expiry(keep_alive: str, ours: float | None) -> float | None:
    """How long a connection may sit idle: ours, or less when the vendor's ``Keep-Alive:
    timeout=N`` says it closes idle ones sooner (a second early: its clock started first),
    so that fewer requests meet a connection the vendor is closing."""
    matched = _KEEP_ALIVE_TIMEOUT.search(keep_alive)
    if matched is None:
        return ours
    theirs = max(0.0, int(matched[1][:9]) - 1.0)
    return theirs if ours is None else min(ours, theirs)


class _Decoder:
    """The answer's Content-Encoding undone (gzip, deflate; others, which we never ask for,
    left as they came, as httpx does), its output bounded at ``limit`` bytes: a body that
    decodes to more is cut there (``truncated``), never inflated whole; one that does not
    decode is cut where it stops decoding (the answer's status is what the forwarder
    judges; its body is only kept for people to read)."""

    def __init__(self, encoding: str | None, limit: int):
        self.limit = limit
        self.codings = [name for name in reversed([n.strip().lower() for n in
                                                   (encoding or "").split(",")])
                        if name in ("gzip", "x-gzip", "deflate")]
        self.steps: list[Any] = []  # made once two bytes are in (deflate's framing varies)
        self.first = b""
        self.out = bytearray()
        self.truncated = False
        self.raw = 0  # bytes fed, before decoding: bounded too (a stream that decodes to
        # nothing, or bytes after its end, would otherwise be read, or kept, for ever)

    def feed(self, data: bytes) -> None:
        self.raw += len(data)
        if self.raw > 2 * self.limit or (self.steps and self.steps[0].eof):
            self.truncated = True
        if self.codings and not self.steps:
            self.first += data
            if len(self.first) < 2:
                return
            data, self.first = self.first, b""
            self.steps = [_decompressor(name, data if at == 0 else b"")
                          for at, name in enumerate(self.codings)]
        if self.truncated or not data:
            return
        room = self.limit - len(self.out)
        try:
            for step in self.steps:
                data = step.decompress(data, room + 1)
                if step.unconsumed_tail or step.unused_data:
                    self.truncated = True
        except zlib.error:  # the status stands; the body is what decoded before the fault
            self.truncated = True
            return
        if len(data) > room:
            self.truncated = True
            data = data[:room]
        self.out += data

    def finish(self) -> None:
        """The body ended: a last byte still held back for deflate's framing is decoded,
        and a compressed stream that stopped before its end marks the body cut."""
        if self.first:
            self.steps = [_decompressor(name, self.first if at == 0 else b"")
                          for at, name in enumerate(self.codings)]
            first, self.first = self.first, b""
            self.feed(first)
        if any(not step.eof for step in self.steps):
            self.truncated = True


def _decompressor(name: str, first: bytes) -> Any:
    """gzip; deflate as RFC 9110 says (zlib-wrapped) or raw, as some servers send it."""
    if name != "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    wrapped = len(first) < 2 or (first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0)
    # (RFC 1950: a zlib stream starts with a CM of 8 and a header that is a multiple of 31)
    return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)


# Sockets ----------------------------------------------------------------------------------


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
    """``future``, or ``error`` raised after ``timeout`` seconds (None: no limit). A timer,
    not ``asyncio.wait_for``: no task a read."""
    timer = None
    if timeout is not None:
        timer = asyncio.get_running_loop().call_later(timeout, _expire, future, error)
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()


class Connection:
    """One HTTP/1.1 connection carrying one request at a time (the pool checks it out)."""

    def __init__(self, protocol: _Protocol, keepalive_expiry: float | None):
        self._protocol = protocol
        self._expiry = keepalive_expiry
        self._idle_since = time.monotonic()
        self._deadline: float | None = None
        self._interim = 0
        self._reusable = True  # the last answer was read whole and allows another request

    def is_available(self) -> bool:
        """Whether another request may go on it: the last answer allowed it, and nothing
        arrived since (bytes on an idle connection, or its end: the vendor closed it)."""
        protocol = self._protocol
        return (self._reusable and not protocol.closed and not protocol.buffer
                and protocol.transport is not None and not protocol.transport.is_closing())

    def has_expired(self) -> bool:
        return self._expiry is not None and time.monotonic() - self._idle_since > self._expiry

    def close(self) -> None:
        self._reusable = False
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    async def request(self, method: bytes, message: bytes, timeouts: Mapping[str, float | None],
                      deadline: float | None = None) -> Answer:
        """Send one request (``message``: its head and body, ``request_head``'s and the
        caller's) and read its whole answer by ``deadline`` (``time.monotonic()``; None:
        the read timeout from when the request left). Any exception leaves the connection
        unusable (the caller closes it): it is never reused half-read."""
        self._reusable = False
        self._deadline = deadline
        await self._write(message, timeouts.get("write"))
        read_timeout = timeouts.get("read")
        # The read timeout bounds the whole answer, not each read: a vendor trickling bytes
        # (or 1xx answers, or trailers) can't hold a slot past it, so a send ends before
        # its lease does (forward_options.DEFAULT_LEASE_S).
        if deadline is None and read_timeout is not None:
            self._deadline = time.monotonic() + read_timeout
        self._interim = 0
        while True:
            status, http11, answer_headers, fields = await self._read_head(read_timeout)
            if status >= 200:
                break
            self._interim += 1
            if self._interim > INTERIM_LIMIT:
                raise httpx.RemoteProtocolError(f"more than {INTERIM_LIMIT} interim answers")
            if status == 101:
                raise httpx.RemoteProtocolError("the vendor switched protocols unasked")
            # 1xx: an interim answer (100 Continue, 103 Early Hints); the final one follows.
        length = body_length(method, status, fields)
        decoder = _Decoder(answer_headers.get("content-encoding"), BODY_LIMIT)
        if length == "chunked":
            complete = await self._read_chunked(decoder, read_timeout)
        elif length == "close":
            complete = await self._read_to_close(decoder, read_timeout)
        else:
            complete = await self._read_exactly(length, decoder, read_timeout)  # type: ignore
        decoder.finish()
        if "keep-alive" in answer_headers:  # the vendor says how long it keeps idle ones
            self._expiry = _idle_expiry(answer_headers["keep-alive"], self._expiry)
        connection = answer_headers.get("connection", "").lower()
        self._reusable = (complete and length != "close" and http11 and not decoder.truncated
                          and "close" not in connection and not self._protocol.buffer)
        self._idle_since = time.monotonic()
        return Answer(status, answer_headers, bytes(decoder.out), decoder.truncated)

    async def _write(self, data: bytes, timeout: float | None) -> None:
        protocol = self._protocol
        transport = protocol.transport
        if protocol.closed or transport is None or transport.is_closing():
            raise httpx.WriteError(str(protocol.error or "connection closed"))
        transport.write(data)
        if protocol.paused_writing:  # the kernel's buffer is full: wait for room
            protocol.drained = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.drained, timeout, httpx.WriteTimeout("write timed out"))
            finally:
                protocol.drained = None
            if protocol.closed and protocol.error is not None and not protocol.buffer:
                # (bytes already in: the vendor answered before taking the whole request,
                # a 413 say, and its answer is what counts)
                raise httpx.WriteError(str(protocol.error))

    async def _more(self, timeout: float | None) -> bool:
        """Wait for bytes beyond those buffered; False when the connection ended instead."""
        protocol = self._protocol
        if protocol.closed:
            return False
        have = len(protocol.buffer)
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise httpx.ReadTimeout("the answer took longer than its deadline")
            timeout = left if timeout is None else min(timeout, left)
        while len(protocol.buffer) == have and not protocol.closed:
            protocol.waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.waiter, timeout, httpx.ReadTimeout("read timed out"))
            finally:
                protocol.waiter = None
        return len(protocol.buffer) > have

    def _take(self, count: int) -> bytes:
        protocol = self._protocol
        data = bytes(protocol.buffer[:count])
        del protocol.buffer[:count]
        if protocol.paused_reading and len(protocol.buffer) <= READ_HIGH_WATER // 2:
            protocol.paused_reading = False
            protocol.transport.resume_reading()  # type: ignore[union-attr]
        return data

    def _ended(self, what: str) -> Exception:
        error = self._protocol.error
        if error is not None:
            return httpx.ReadError(str(error) or type(error).__name__)
        return httpx.RemoteProtocolError(f"the vendor closed the connection {what}")

    async def _read_head(self, timeout: float | None
                         ) -> tuple[int, bool, dict[str, str], list[tuple[str, str]]]:
        buffer = self._protocol.buffer
        start = 0
        while True:
            end = _HEAD_END.search(buffer, start, HEAD_LIMIT + 4)
            if end is not None:
                head = self._take(end.end())[:end.start()]
                return parse_head(head)
            if len(buffer) > HEAD_LIMIT:
                raise httpx.RemoteProtocolError(f"an answer's head over {HEAD_LIMIT} bytes")
            start = max(0, len(buffer) - 3)
            if not await self._more(timeout):
                if not buffer and not self._interim:  # not a byte of answer: stale?
                    error = self._protocol.error
                    raise ConnectionClosed(str(error) if error else
                                           "the vendor closed the connection without answering")
                raise self._ended("in the middle of an answer's head")

    async def _read_exactly(self, length: int, decoder: _Decoder, timeout: float | None,
                            what: str = "the answer's body") -> bool:
        """``length`` bytes of body into ``decoder``; False if it was cut at its limit
        before their end (the rest is left unread: the connection goes)."""
        buffer = self._protocol.buffer
        left = length
        while left:
            if not buffer and not await self._more(timeout):
                raise self._ended(f"with {left} bytes of {what} unsent")
            piece = self._take(min(left, len(buffer)))
            left -= len(piece)
            decoder.feed(piece)
            if decoder.truncated:
                return False
        return True

    async def _read_to_close(self, decoder: _Decoder, timeout: float | None) -> bool:
        while True:
            if self._protocol.buffer:
                decoder.feed(self._take(len(self._protocol.buffer)))
                if decoder.truncated:
                    return False
            if not await self._more(timeout):
                if self._protocol.error is not None:  # a reset, not an end: cut short
                    raise self._ended("while sending the answer's body")
                return True

    async def _line(self, timeout: float | None, what: str) -> bytes:
        buffer = self._protocol.buffer
        while True:
            end = buffer.find(b"\n")
            if end >= 0:
                if end > CHUNK_LINE_LIMIT:
                    raise httpx.RemoteProtocolError(f"a {what} over {CHUNK_LINE_LIMIT} bytes")
                return self._take(end + 1).rstrip(b"\r\n")
            if len(buffer) > CHUNK_LINE_LIMIT:
                raise httpx.RemoteProtocolError(f"a {what} over {CHUNK_LINE_LIMIT} bytes")
            if not await self._more(timeout):
                raise self._ended(f"in the middle of a {what}")

    async def _read_chunked(self, decoder: _Decoder, timeout: float | None) -> bool:
        while True:
            size_text = (await self._line(timeout, "chunk size line")).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.match(size_text):
                raise httpx.RemoteProtocolError(f"malformed chunk size {size_text[:30]!r}")
            size = int(size_text, 16)
            if size == 0:
                total = 0  # trailers: none matters to a delivery, all of them are bounded
                while line := await self._line(timeout, "trailer line"):
                    total += len(line)
                    if total > HEAD_LIMIT:
                        raise httpx.RemoteProtocolError(f"trailers over {HEAD_LIMIT} bytes")
                return True
            if not await self._read_exactly(size, decoder, timeout, "a chunk"):
                return False
            if await self._line(timeout, "chunk end") != b"":
                raise httpx.RemoteProtocolError("a chunk longer than its size says")


# Connecting and the pool --------------------------------------------------------------------


async def connect(origin: Origin, ssl_context: ssl.SSLContext, timeout: float | None,
                  sni_hostname: str | None = None, proxy: Proxy | None = None) -> _Protocol:
    """A TCP connection to ``origin`` (or to ``proxy``, then for https its CONNECT tunnel to
    ``origin``), then TLS for https (certificates checked by ``ssl_context``; SNI
    ``sni_hostname`` or the host), within ``timeout`` in all."""
    loop = asyncio.get_running_loop()
    host, port = (proxy.host, proxy.port) if proxy is not None else (origin.host, origin.port)
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_connection(
                _Protocol, host, port, happy_eyeballs_delay=0.25)
            try:
                if proxy is not None and origin.tls:
                    await _tunnel(protocol, origin, proxy)
                if origin.tls:
                    tls = await loop.start_tls(transport, protocol, ssl_context,
                                               server_hostname=sni_hostname or origin.host)
                    if tls is None:
                        raise httpx.ConnectError(f"{where} closed the connection during TLS")
                    protocol.transport = tls  # type: ignore[assignment]
            except BaseException:
                transport.close()
                raise
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {where} timed out") from None
    except (OSError, ssl.SSLError) as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
    return protocol  # type: ignore[return-value]


async def _tunnel(protocol: _Protocol, origin: Origin, proxy: Proxy) -> None:
    """Ask ``proxy`` for a tunnel to ``origin`` (CONNECT, RFC 9110 section 9.3.6); on a
    2xx the connection is the origin's. Whatever goes wrong names the proxy, not the vendor
    (``httpx.ProxyError``; the connect timeout bounds it all)."""
    asking = Connection(protocol, None)
    to = f"a tunnel to {origin.authority.decode()}"
    try:
        await asking._write(proxy.tunnel_head(origin), None)
        status = (await asking._read_head(None))[0]
    except httpx.TransportError as exc:
        raise httpx.ProxyError(f"{proxy.where}, asked for {to}: {exc}") from None
    if not 200 <= status < 300:
        hint = (": check the user and password in ONETAG_FORWARD_PROXY" if status == 407
                else "")
        raise httpx.ProxyError(f"{proxy.where} answered {status} to {to}{hint}")
    if protocol.buffer:  # a 2xx to CONNECT has no content, and the vendor speaks after us
        raise httpx.ProxyError(f"{proxy.where} sent bytes after opening {to}")


class KeepAlivePool:
    """HTTP/1.1 keep-alive connections per origin, reused last-in first-out; taking one is
    O(1) (httpx's default pool, httpcore 1.0, walked every pooled connection on every
    request and release, encode/httpcore#1035: 3-5 ms of CPU a request at the 100+
    connections a worker keeps).

    ``max_connections`` bounds the requests in flight (one waits at most the pool timeout
    for a slot), ``max_keepalive`` the idle connections kept, ``keepalive_expiry`` how long
    one may sit idle. A request that fails or is cancelled part-way closes its connection,
    so none is ever reused half-read. A request that fails on a reused connection the way a
    stale one does (the vendor closed it while idle, and its close arrived only now) is sent
    once more on a fresh connection; the vendor's natural key makes that repeat harmless.
    """

    def __init__(self, max_connections: int, max_keepalive: int | None = None,
                 keepalive_expiry: float | None = 30.0,
                 ssl_context: ssl.SSLContext | None = None, proxy: str | None = None):
        self.max_keepalive = max_connections if max_keepalive is None else max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._proxy = Proxy(proxy) if proxy else None
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[bytes, bytes, int], list[Connection]] = {}
        self._idle_count = 0
        self.opened = 0  # connections opened so far (tests and the benchmark read it)

    async def send(self, method: str, url: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None, timeouts: Mapping[str, float | None],
                   sni_hostname: str | None = None) -> Answer:
        """One request, its whole answer. ``timeouts``: connect, read, write, pool (seconds,
        None: no limit), as ``httpx.Timeout.as_dict()`` gives them. Raises httpx's
        exceptions: ``httpx.InvalidURL``/``UnsupportedProtocol`` for the URL, a
        ``httpx.TransportError`` for the connection or the answer."""
        target = origin(url)
        raw_method = method.encode("ascii")
        head = request_head(raw_method, target, headers, body, self._proxy)  # refused: no slot
        message = head + body if body else head
        if self._slots.locked():  # every slot taken: wait, at most the pool timeout
            try:
                await asyncio.wait_for(self._slots.acquire(), timeouts.get("pool"))
            except asyncio.TimeoutError:
                raise httpx.PoolTimeout("no free connection slot") from None
        else:  # a free slot: taken at once (wait_for would make a task for it)
            await self._slots.acquire()
        try:
            fresh = False
            deadline = None  # the first try's: a retry on a fresh connection shares it
            while True:
                connection = None if fresh else self._checkout(target.key)
                reused = connection is not None
                if connection is None:
                    self.opened += 1
                    protocol = await connect(target, self._ssl, timeouts.get("connect"),
                                             sni_hostname, self._proxy)
                    connection = Connection(protocol, self.keepalive_expiry)
                try:
                    answer = await connection.request(raw_method, message, timeouts, deadline)
                except BaseException as exc:  # cancelled too: never reuse a half-read one
                    connection.close()
                    if reused and isinstance(exc, _STALE):
                        fresh, deadline = True, connection._deadline
                        continue  # a stale idle connection: once more on a fresh one
                    raise
                if answer.status_code == 407 and self._proxy is not None and not target.tls:
                    connection.close()  # the proxy's answer, not the vendor's: retried
                    raise httpx.ProxyError(f"{self._proxy.where} answered 407 to a request "
                                           f"for {target.authority.decode()}: check the user "
                                           f"and password in ONETAG_FORWARD_PROXY")
                self._checkin(target.key, connection)
                return answer
        finally:
            self._slots.release()

    def _checkout(self, key: tuple[bytes, bytes, int]) -> Connection | None:
        """The idle connection to ``key`` last checked in that is still usable, or None;
        the unusable ones met on the way (expired, closed by the vendor) are closed."""
        stack = self._idle.get(key)
        while stack:
            connection = stack.pop()
            self._idle_count -= 1
            if connection.is_available() and not connection.has_expired():
                return connection
            connection.close()
        return None

    def _checkin(self, key: tuple[bytes, bytes, int], connection: Connection) -> None:
        """Keep ``connection`` for the next request to ``key``. When the pool is full, the
        dead and expired idle connections go first, then, if it still is, the oldest of the
        origin with the most (the one in hand was just used: it is the freshest)."""
        if connection.is_available() and self._idle_count >= self.max_keepalive:
            self._drop_unusable()
            if self._idle_count >= self.max_keepalive:
                self._drop_oldest()
        if connection.is_available() and self._idle_count < self.max_keepalive:
            self._idle.setdefault(key, []).append(connection)
            self._idle_count += 1
        else:
            connection.close()

    def _drop_unusable(self) -> None:
        """Close the idle connections no request can use (expired, or closed by their
        vendor), of every origin: one vendor's dead ones must not keep another's out."""
        for stack in self._idle.values():
            usable = []
            for connection in stack:
                if connection.is_available() and not connection.has_expired():
                    usable.append(connection)
                else:
                    connection.close()
            self._idle_count -= len(stack) - len(usable)
            stack[:] = usable

    def _drop_oldest(self) -> None:
        """Close the idle connection least recently used of the origin with the most idle
        ones: a vendor whose burst left many can't keep another vendor's out."""
        stack = max(self._idle.values(), key=len, default=None)
        if stack:
            stack.pop(0).close()
            self._idle_count -= 1

    async def aclose(self) -> None:
        idle, self._idle, self._idle_count = self._idle, {}, 0
        for stack in idle.values():
            for connection in stack:
                connection.close()


# A reused keep-alive connection the vendor closed while it sat idle fails like this: before
# a byte of the answer came.
_STALE = (ConnectionClosed, httpx.WriteError)


@functools.lru_cache(maxsize=1024)  # a vendor's few URLs, over and over
def origin(url: str) -> Origin:
    """A vendor URL parsed once; a malformed one raises ``httpx.InvalidURL`` (not cached),
    one that is not http or https ``httpx.UnsupportedProtocol``."""
    return Origin(url)
