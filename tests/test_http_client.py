"""The forwarder's HTTP client (server/http_client.py): its parsing of answers, against
byte streams cut anywhere and against h11's reading of the same bytes, and its pool against
real servers on loopback: TLS with certificate checks, one write per request, timeouts,
cancellation, a closed idle connection. The forwarder's tests (test_forwarder.py,
test_delivery_faults.py) cover the rest through the fake vendors."""

from __future__ import annotations

import asyncio
import base64
import gzip
import shutil
import ssl
import subprocess
import tracemalloc
import zlib

import h11
import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from server import http_client
from server.http_client import (BODY_LIMIT, HEAD_LIMIT, Connection, KeepAlivePool, _Protocol,
                                origin, parse_head, request_head)

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"
TIMEOUTS = httpx.Timeout(5.0).as_dict()
JSON = [("Content-Type", "application/json")]


async def send(pool: KeepAlivePool, url: str, body: bytes = b'{"order_id":"1"}',
               timeouts: dict | None = None) -> http_client.Answer:
    return await pool.send("POST", url, JSON, body, timeouts or TIMEOUTS)


class Server:
    """HTTP/1.1 on loopback that answers every request with ``answer`` (b"": never, a
    truncated one: part of an answer), and keeps what each read of the socket brought and
    how many connections it took."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, answer: bytes = ANSWER):
        self.ssl_context = ssl_context
        self.answer = answer
        self.reads: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0,
                                                 ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        self.connections += 1
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.reads.append(chunk)
                data += chunk
                head, sep, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if sep and len(rest) >= length:
                    data = rest[length:]
                    writer.write(self.answer)  # b"": a server that never answers
                    await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


async def test_https_with_a_trusted_certificate_reuses_its_connection(certificate) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    async with Server(server_context) as server:
        pool = KeepAlivePool(4, ssl_context=ssl.create_default_context(cafile=cert))
        try:
            for _ in range(3):
                answer = await send(pool, f"https://localhost:{server.port}/api")
                assert answer.status_code == 200 and answer.content == b'{"ok":true}'
            assert pool.opened == 1
            (connection,) = pool._idle[(b"https", b"localhost", server.port)]
            tls = connection._protocol.transport.get_extra_info("ssl_object")
            assert tls.server_hostname == "localhost"  # SNI, and the name checked
            assert tls.selected_alpn_protocol() == "http/1.1"  # offered alone, as httpcore does
        finally:
            await pool.aclose()


async def test_https_refuses_a_certificate_it_does_not_trust(certificate) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with Server(server_context) as server:
        pool = KeepAlivePool(4)  # the system's CAs only
        try:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await send(pool, f"https://localhost:{server.port}/")
        finally:
            await pool.aclose()


async def test_a_request_leaves_in_one_write() -> None:
    body = b'{"order_id":"1","email":"a@example.com"}'
    async with Server() as server:
        pool = KeepAlivePool(4)
        try:
            await send(pool, f"http://127.0.0.1:{server.port}/", body)
        finally:
            await pool.aclose()
    assert len(server.reads) == 1 and server.reads[0].endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize("answer", [b"", ANSWER[:-4]], ids=["silent", "half a body"])
async def test_a_read_timeout_drops_its_connection(answer: bytes) -> None:
    async with Server(answer=answer) as server:
        pool = KeepAlivePool(4)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await send(pool, f"http://127.0.0.1:{server.port}/",
                           timeouts=httpx.Timeout(5.0, read=0.2).as_dict())
            assert pool._idle_count == 0  # never pooled half-read
            server.answer = ANSWER
            answer = await send(pool, f"http://127.0.0.1:{server.port}/")
            assert answer.content == b'{"ok":true}' and pool.opened == 2
        finally:
            await pool.aclose()


async def test_refused_and_unsupported_urls() -> None:
    pool = KeepAlivePool(4)
    try:
        with pytest.raises(httpx.UnsupportedProtocol):
            await send(pool, "ftp://vendor.example/api")
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(httpx.ConnectError):
            await send(pool, f"http://127.0.0.1:{port}/")
    finally:
        await pool.aclose()


@pytest.mark.parametrize("answer", [b"", ANSWER[:-4]], ids=["no answer", "half a body"])
async def test_a_request_cancelled_mid_flight_drops_its_connection(answer: bytes) -> None:
    """Cancelled after the request left (no answer yet, or part of the body read): the
    connection is closed, never pooled half-read; the next request opens a new one."""
    async with Server(answer=answer) as server:
        pool = KeepAlivePool(4)
        try:
            task = asyncio.create_task(send(pool, f"http://127.0.0.1:{server.port}/"))
            while not server.reads:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the partial answer, if any, arrives
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool._idle_count == 0
            server.answer = ANSWER
            answer = await send(pool, f"http://127.0.0.1:{server.port}/")
            assert answer.content == b'{"ok":true}'
            assert pool.opened == 2 and server.connections == 2
        finally:
            await pool.aclose()



# Answers as bytes: the parsing, cut anywhere ------------------------------------------------


class _Transport(asyncio.Transport):
    """A socket's stand-in under ``Connection``: keeps what was written, and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def answer_to(data: bytes, cuts: list[int] | None = None, method: str = "POST",
                    close: bool = False) -> tuple[http_client.Answer, Connection]:
    """The answer a connection reads from ``data`` arriving in pieces (cut at ``cuts``),
    then the end of the connection if ``close``."""
    protocol = _Protocol()
    transport = _Transport()
    protocol.connection_made(transport)
    connection = Connection(protocol, 30.0)
    loop = asyncio.get_running_loop()
    bounds = sorted({0, len(data), *(c for c in cuts or () if 0 < c < len(data))})
    for start, end in zip(bounds, bounds[1:]):
        loop.call_soon(protocol.data_received, data[start:end])
    if close:
        loop.call_soon(protocol.eof_received)
    body = b"{}" if method != "GET" else None
    head = request_head(method.encode(), origin("http://vendor.example/x"), JSON, body)
    answer = await connection.request(method.encode(), head + (body or b""), TIMEOUTS)
    return answer, connection


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
                 min_size=1, max_size=20)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                        blacklist_characters="\x7f"), max_size=40
                 ).map(lambda v: v.strip(" \t"))
_headers = st.lists(st.tuples(_token.filter(lambda n: n.lower() not in (
    "content-length", "transfer-encoding", "content-encoding", "connection")), _value),
    max_size=8)


def chunked(body: bytes, sizes: list[int], extensions: bool) -> bytes:
    out, at = [], 0
    for size in sizes + [len(body)]:
        piece = body[at:at + max(1, size)]
        if not piece:
            break
        at += len(piece)
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), b";a=b" if extensions else b"", piece))
    return b"".join(out) + b"0\r\nx-trailer: 1\r\n\r\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=st.integers(200, 599).filter(lambda s: s not in (204, 304)), headers=_headers,
       body=st.binary(max_size=3000), framing=st.sampled_from(["length", "chunked", "close"]),
       encoding=st.sampled_from([None, "gzip", "deflate", "raw deflate"]),
       sizes=st.lists(st.integers(1, 700), max_size=6), cuts=st.lists(st.integers(0, 4000)),
       lf_only=st.booleans(), extensions=st.booleans())
def test_an_answer_reads_the_same_however_it_is_cut(status, headers, body, framing, encoding,
                                                    sizes, cuts, lf_only, extensions) -> None:
    """Any well-formed answer (framed by length, chunks or the connection's end; plain,
    gzip or deflate; lines ending CRLF or LF) gives its status, headers and body, whatever
    pieces its bytes arrive in, and the connection is reused only when it can be."""
    wire_body = body
    fields = list(headers)
    if encoding == "gzip":
        wire_body, fields = gzip.compress(body), fields + [("Content-Encoding", "gzip")]
    elif encoding == "deflate":
        wire_body, fields = zlib.compress(body), fields + [("Content-Encoding", "deflate")]
    elif encoding == "raw deflate":
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        wire_body = packer.compress(body) + packer.flush()
        fields = fields + [("Content-Encoding", "deflate")]
    if framing == "length":
        fields.append(("Content-Length", str(len(wire_body))))
    elif framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
        wire_body = chunked(wire_body, sizes, extensions)
    eol = b"\n" if lf_only else b"\r\n"
    head = eol.join([b"HTTP/1.1 %d Whatever" % status]
                    + [f"{n}: {v}".encode("latin-1") for n, v in fields]) + eol + eol
    answer, connection = asyncio.run(answer_to(head + wire_body, cuts, close=framing == "close"))
    assert answer.status_code == status and answer.content == body and not answer.truncated
    expected: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        expected[key] = f"{expected[key]}, {value}" if key in expected else value
    assert answer.headers == expected
    assert connection._reusable == (framing != "close")


@settings(max_examples=100, deadline=None)
@given(status=st.integers(100, 599).filter(lambda s: s != 101), headers=_headers,
       body=st.binary(max_size=200))
def test_a_head_reads_as_h11_reads_it(status, headers, body) -> None:
    """The status and headers of an answer are what h11 (httpx's parser until now) reads
    in the same bytes."""
    data = (b"HTTP/1.1 %d OK\r\n" % status
            + b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers) + b"\r\n")
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method="POST", target="/", headers=[("Host", "x"),
                                                                ("Content-Length", "0")]))
    reader.send(h11.EndOfMessage())
    reader.receive_data(data)
    event = reader.next_event()
    ours = parse_head(data[:-4])
    assert ours[0] == event.status_code
    theirs: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode()
        theirs[key] = f"{theirs[key]}, {value.decode('latin-1')}" if key in theirs \
            else value.decode("latin-1")
    assert ours[2] == theirs


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
     "both Transfer-Encoding and Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "malformed Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
     "unsupported Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
     "a chunk longer than its size says"),
    (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
    (b"ICY 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\n folded\r\n\r\n", "a folded line before any header"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
], ids=["te and cl", "two lengths", "negative length", "gzip te", "bad chunk size",
        "long chunk", "http2", "not http", "space in name", "fold first", "101"])
async def test_a_malformed_answer_is_a_protocol_error(answer: bytes, error: str) -> None:
    with pytest.raises(httpx.RemoteProtocolError, match=error):
        await answer_to(answer, close=True)


async def test_the_end_of_an_answer_cut_short_is_an_error_not_a_body() -> None:
    for data in (ANSWER[:-3], ANSWER[:20],
                 b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"):
        with pytest.raises(httpx.RemoteProtocolError, match="closed the connection"):
            await answer_to(data, close=True)
    with pytest.raises(http_client.ConnectionClosed):  # nothing at all: a stale connection
        await answer_to(b"", close=True)


async def test_interim_answers_are_skipped_and_bodiless_ones_have_none() -> None:
    answer, connection = await answer_to(b"HTTP/1.1 100 Continue\r\n\r\n"
                                         b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                         + ANSWER)
    assert answer.status_code == 200 and answer.content == b'{"ok":true}'
    for status in (204, 304):
        answer, connection = await answer_to(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n"
                                             % status)
        assert answer.content == b"" and connection._reusable
    answer, connection = await answer_to(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                                         method="HEAD")
    assert answer.content == b"" and connection._reusable


@pytest.mark.parametrize("data", [
    ANSWER.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
    ANSWER.replace(b"HTTP/1.1", b"HTTP/1.0"),
    ANSWER + b"HTTP/1.1 200 OK\r\n",  # more than was asked for
], ids=["connection close", "http/1.0", "extra bytes"])
async def test_a_connection_is_not_reused_when_the_answer_says_or_shows_so(data) -> None:
    answer, connection = await answer_to(data)
    assert answer.status_code == 200 and not connection._reusable
    assert not connection.is_available()


async def test_bounds_a_long_head_a_long_body_and_a_bomb() -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="head over"):
        await answer_to(b"HTTP/1.1 200 OK\r\nX: " + b"a" * HEAD_LIMIT + b"\r\n\r\n")
    long_body = b"x" * (BODY_LIMIT + 10)
    answer, connection = await answer_to(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                         % len(long_body) + long_body)
    assert answer.truncated and len(answer.content) == BODY_LIMIT and not connection._reusable
    bomb = gzip.compress(b"\0" * (50 * BODY_LIMIT))  # 50 MiB from ~50 kB
    answer, connection = await answer_to(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                                         b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb)
    assert answer.truncated and len(answer.content) == BODY_LIMIT and answer.status_code == 200
    broken = gzip.compress(b"hello world")[:12] + b"garbage!"
    answer, connection = await answer_to(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                                         b"Content-Length: %d\r\n\r\n" % len(broken) + broken)
    assert answer.status_code == 200 and answer.truncated and not connection._reusable


@pytest.mark.parametrize("name, value", [("X-Api-Key", "k\r\nX-Evil: 1"), ("X-Api-Key", "k\n"),
                                         ("Bad Name", "v"), ("X-Key", "k\0"),
                                         ("X-Key", "\u2603")])
def test_a_header_that_would_split_the_request_is_refused(name, value) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        request_head(b"POST", origin("https://vendor.example/x"), [(name, value)], b"{}")


def test_the_request_head() -> None:
    head = request_head(b"POST", origin("https://vendor.example:8443/a/b?c=1&d=%20"),
                        [("X-Key", " v ")], b"{}")
    assert head == (b"POST /a/b?c=1&d=%20 HTTP/1.1\r\nHost: vendor.example:8443\r\n"
                    b"X-Key: v\r\nContent-Length: 2\r\n\r\n")
    assert request_head(b"GET", origin("http://[::1]/"), [], None) == (
        b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")
    assert b"Content-Length: 0" in request_head(b"POST", origin("http://h/"), [], None)
    with pytest.raises(httpx.InvalidURL):
        origin("http:///nohost")


# Bounds on what a vendor may make a send hold (review of the client, 2026-11-30) ------------


async def _serve(handle) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


def _gzip_then_junk(total: int, close: bool):
    """A handler answering a tiny gzip body, then ``total`` bytes of junk after its end."""
    async def handle(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n"
                     + gzip.compress(b'{"ok":true}'))
        sent = 0
        try:
            while sent < total:
                writer.write(b"\0" * 65536)
                sent += 65536
                await writer.drain()
        except ConnectionError:
            return
        if close:
            writer.close()
    return handle


async def test_bytes_after_a_gzip_end_are_not_kept() -> None:
    server, url = await _serve(_gzip_then_junk(40 * 1024 * 1024, close=True))
    pool = KeepAlivePool(4)
    tracemalloc.start()
    try:
        answer = await send(pool, url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await pool.aclose()
        server.close()
    assert answer.status_code == 200 and answer.content == b'{"ok":true}' and answer.truncated
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB for a 40 MiB tail"
    assert pool._idle_count == 0  # cut short: the connection is not reused


async def test_an_endless_body_that_decodes_to_nothing_ends() -> None:
    server, url = await _serve(_gzip_then_junk(10 ** 12, close=False))
    pool = KeepAlivePool(4)
    try:  # bytes never stop coming, so no timeout would end it: the byte bound does
        answer = await asyncio.wait_for(send(pool, url), 30)
        assert answer.truncated
    finally:
        await pool.aclose()
        server.close()


async def test_a_trickled_answer_ends_at_the_read_timeout_in_all() -> None:
    """The read timeout bounds the whole answer, not each read: a byte every 0.2 s with a
    0.5 s timeout ends at 0.5 s, so a send never outlives its lease."""
    async def handle(reader, writer):
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
        for _ in range(20):
            await asyncio.sleep(0.2)
            writer.write(b"x")
        writer.close()

    server, url = await _serve(handle)
    pool = KeepAlivePool(4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(httpx.ReadTimeout):
            await send(pool, url, timeouts=httpx.Timeout(0.5).as_dict())
    finally:
        await pool.aclose()
        server.close()
    assert loop.time() - started < 2.0


async def test_interim_answers_and_trailers_are_bounded_in_number() -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="interim answers"):
        await answer_to(b"HTTP/1.1 100 Continue\r\n\r\n" * 200_000 + ANSWER)
    with pytest.raises(httpx.RemoteProtocolError, match="trailers over"):
        await answer_to(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
                        + b"x-t: 1\r\n" * 200_000 + b"\r\n")


async def test_a_close_after_an_interim_answer_is_not_a_stale_connection() -> None:
    with pytest.raises(httpx.RemoteProtocolError) as raised:
        await answer_to(b"HTTP/1.1 100 Continue\r\n\r\n", close=True)
    assert not isinstance(raised.value, http_client.ConnectionClosed)


async def test_a_request_closed_unanswered_is_sent_at_most_twice() -> None:
    """A request the vendor drops without answering (a firewall's reset, a crash on that
    payload) goes once more on a new connection, not once per idle connection."""
    arrivals = []

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                if b"poison" in body:
                    arrivals.append(body)
                    writer.close()
                    return
                await asyncio.sleep(0.05)  # the warm-up requests overlap: 8 connections
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server, url = await _serve(handle)
    pool = KeepAlivePool(16)
    try:
        await asyncio.gather(*(send(pool, url) for _ in range(8)))
        assert pool._idle_count == 8
        with pytest.raises(httpx.RemoteProtocolError):
            await send(pool, url, b'{"poison":1}')
    finally:
        await pool.aclose()
        server.close()
    assert len(arrivals) == 2


@pytest.mark.parametrize("name", ["Content-Length", "Host", "Transfer-Encoding", "Connection"])
def test_the_clients_own_headers_are_not_taken_from_a_caller(name) -> None:
    with pytest.raises(httpx.LocalProtocolError, match="the client's to write"):
        request_head(b"POST", origin("https://vendor.example/x"), [(name, "5")], b"{}")


async def test_control_characters_are_refused_both_ways() -> None:
    with pytest.raises(httpx.LocalProtocolError):
        request_head(b"POST", origin("https://vendor.example/x"), [("X-Key", "a\x01\x7fb")],
                     b"{}")
    assert b"X-Key: a\tb" in request_head(b"POST", origin("https://vendor.example/x"),
                                          [("X-Key", "a\tb")], b"{}")
    with pytest.raises(httpx.RemoteProtocolError, match="malformed header line"):
        await answer_to(b"HTTP/1.1 200 OK\r\nRetry-After: 5\rX\r\nContent-Length: 0\r\n\r\n")


async def test_one_vendors_dead_idle_connections_do_not_keep_anothers_out() -> None:
    async with Server() as a, Server() as b:
        pool = KeepAlivePool(2, 2, keepalive_expiry=0.1)
        try:
            await asyncio.gather(send(pool, f"http://127.0.0.1:{a.port}/"),
                                 send(pool, f"http://127.0.0.1:{a.port}/"))
            await asyncio.sleep(0.2)  # A's two idle connections expired, still counted
            for _ in range(3):
                await send(pool, f"http://127.0.0.1:{b.port}/")
        finally:
            await pool.aclose()
    assert b.connections == 1


async def test_a_vendors_keep_alive_timeout_shortens_the_idle_expiry() -> None:
    answer, connection = await answer_to(ANSWER.replace(
        b"\r\n\r\n", b"\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"))
    assert connection._expiry == 4.0 and connection._reusable
    answer, connection = await answer_to(ANSWER.replace(
        b"\r\n\r\n", b"\r\nKeep-Alive: max=100\r\n\r\n"))
    assert connection._expiry == 30.0
    answer, connection = await answer_to(ANSWER.replace(
        b"\r\n\r\n", b"\r\nKeep-Alive: timeout=1\r\n\r\n"))
    assert connection._expiry == 0.0


# Through an HTTP proxy (ONETAG_FORWARD_PROXY) ----------------------------------------------


class Proxy:
    """An HTTP proxy on loopback: CONNECT tunnels (bytes piped both ways) and absolute-form
    requests (answered by the proxy itself), every request head kept. With ``require``,
    a request without that Proxy-Authorization value gets 407."""

    def __init__(self, require: str | None = None):
        self.require = require
        self.heads: list[bytes] = []

    async def __aenter__(self) -> "Proxy":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    def _authorized(self, head: bytes) -> bool:
        given = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                 if line.lower().startswith(b"proxy-authorization:")]
        return self.require is None or given == [self.require.encode()]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if not self._authorized(head):
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                 b"Content-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if head.startswith(b"CONNECT "):
                    host, port = head.split()[1].decode().rsplit(":", 1)
                    up_reader, up_writer = await asyncio.open_connection(host, int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_https_goes_through_a_proxys_tunnel_with_tls_end_to_end(certificate) -> None:
    """CONNECT with the proxy's credentials (a password with an ``@`` percent-encoded, as
    in any URL), then TLS to the vendor itself, certificate checked; the tunnel is kept
    for the next request, and the vendor never sees the proxy's credentials."""
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    basic = "Basic " + base64.b64encode(b"onetag:p@ss").decode()
    async with Server(server_context) as vendor, Proxy(require=basic) as proxy:
        pool = KeepAlivePool(4, ssl_context=ssl.create_default_context(cafile=cert),
                             proxy=f"http://onetag:p%40ss@127.0.0.1:{proxy.port}")
        try:
            for _ in range(2):
                answer = await send(pool, f"https://localhost:{vendor.port}/api")
                assert answer.status_code == 200 and answer.content == b'{"ok":true}'
        finally:
            await pool.aclose()
    assert pool.opened == 1
    assert proxy.heads == [f"CONNECT localhost:{vendor.port} HTTP/1.1\r\nHost: localhost:"
                           f"{vendor.port}\r\nProxy-Authorization: {basic}\r\n\r\n".encode()]
    assert b"".join(vendor.reads).count(b"POST /api HTTP/1.1") == 2
    assert b"Proxy-Authorization" not in b"".join(vendor.reads)


async def test_plain_http_goes_to_a_proxy_as_absolute_form_requests() -> None:
    async with Proxy(require="Basic " + base64.b64encode(b"u:p").decode()) as proxy:
        pool = KeepAlivePool(4, proxy=f"http://u:p@127.0.0.1:{proxy.port}")
        try:  # the vendor's name is the proxy's to resolve: it never is here
            answer = await send(pool, "http://vendor.invalid:8080/track?x=1")
        finally:
            await pool.aclose()
    assert answer.status_code == 200
    assert proxy.heads[0].startswith(b"POST http://vendor.invalid:8080/track?x=1 HTTP/1.1\r\n"
                                     b"Host: vendor.invalid:8080\r\nProxy-Authorization: Basic ")


@pytest.mark.parametrize("url", ["https://localhost:1/api", "http://vendor.invalid/track"],
                         ids=["https: the tunnel refused", "http: the request refused"])
async def test_a_proxys_407_is_a_proxy_error_naming_the_setting(url) -> None:
    """A wrong proxy password: a ProxyError (retried like an outage) naming the setting,
    for https (its CONNECT refused) and plain http alike (there the 407 answers the request
    itself, and must not be read as the vendor's 4xx, which would make the delivery dead)."""
    async with Proxy(require="Basic right") as proxy:
        pool = KeepAlivePool(4, proxy=f"http://u:wrong@127.0.0.1:{proxy.port}")
        try:
            with pytest.raises(httpx.ProxyError, match="407.*ONETAG_FORWARD_PROXY"):
                await send(pool, url)
        finally:
            await pool.aclose()


def _keep_alive_handler(connections: list, hold: dict | None = None):
    """A vendor answering every request on its connection; ``connections`` counts them.
    ``hold``: {the nth request (from 1, over every connection): (seconds held, then
    "answer" or "close")}."""
    requests = 0

    async def handle(reader, writer):
        nonlocal requests
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                requests += 1
                seconds, then = (hold or {}).get(requests, (0, "answer"))
                await asyncio.sleep(seconds)
                if then == "close":
                    writer.close()
                    return
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    return handle


async def test_a_retry_on_a_fresh_connection_keeps_the_first_trys_deadline() -> None:
    """Held 0.8 s on the reused connection, then closed unanswered; the retry, held 0.8 s
    too, ends at the 1 s read timeout the first try started, not 1.6 s later."""
    connections: list = []
    server, url = await _serve(_keep_alive_handler(
        connections, {2: (0.8, "close"), 3: (0.8, "answer")}))
    pool = KeepAlivePool(4)
    timeouts = httpx.Timeout(5.0, read=1.0).as_dict()
    loop = asyncio.get_running_loop()
    try:
        await pool.send("POST", url, [], b"{}", timeouts)  # one idle connection
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout):
            await pool.send("POST", url, [], b"{}", timeouts)
        took = loop.time() - started
    finally:
        await pool.aclose()
        server.close()
    assert len(connections) == 2 and took < 1.4, took


async def test_a_refused_header_takes_no_connection() -> None:
    connections: list = []
    server, url = await _serve(_keep_alive_handler(connections))
    pool = KeepAlivePool(4)
    try:
        await pool.send("POST", url, [], b"{}", TIMEOUTS)
        with pytest.raises(httpx.LocalProtocolError):
            await pool.send("POST", url, [("X-Key", "a\nb")], b"{}", TIMEOUTS)
        await pool.send("POST", url, [], b"{}", TIMEOUTS)
    finally:
        await pool.aclose()
        server.close()
    assert len(connections) == 1 and pool.opened == 1


async def test_a_pool_full_of_one_vendors_usable_connections_keeps_anothers() -> None:
    """Vendor A's four idle connections fill the pool; B's connection is kept in place of
    A's oldest, so five requests to B take one connection, not five."""
    to_a: list = []
    to_b: list = []
    a, url_a = await _serve(_keep_alive_handler(to_a, {1: (0.02, "answer"), 2: (0.02, "answer"),
                                                       3: (0.02, "answer"), 4: (0.02, "answer")}))
    b, url_b = await _serve(_keep_alive_handler(to_b))
    pool = KeepAlivePool(4, 4)
    try:
        await asyncio.gather(*(pool.send("POST", url_a, [], b"{}", TIMEOUTS) for _ in range(4)))
        assert pool._idle_count == 4 and len(to_a) == 4
        for _ in range(5):
            await pool.send("POST", url_b, [], b"{}", TIMEOUTS)
    finally:
        await pool.aclose()
        a.close()
        b.close()
    assert len(to_b) == 1 and pool._idle_count == 0


class _OddProxy:
    """A proxy that answers CONNECT with ``answer`` as given, then closes or keeps quiet."""

    def __init__(self, answer: bytes):
        self.answer = answer

    async def __aenter__(self) -> "_OddProxy":
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.answer)
            await writer.drain()
            if not self.answer.endswith(b"ok"):
                writer.close()
                return
            await asyncio.sleep(5)
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.mark.parametrize("answer, said", [
    (b"", "asked for a tunnel to localhost:443"),  # closed at once
    (b"HTTX/1.1 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 Connection established\r\nContent-Length: 2\r\n\r\nok",
     "sent bytes after opening a tunnel"),
], ids=["closed", "garbled", "content after 200"])
async def test_a_proxy_that_fails_the_tunnel_is_named_not_the_vendor(answer, said) -> None:
    async with _OddProxy(answer) as proxy:
        pool = KeepAlivePool(4, proxy=proxy.url)
        try:
            with pytest.raises(httpx.ProxyError, match=said) as raised:
                await send(pool, "https://localhost/api", timeouts=httpx.Timeout(2.0).as_dict())
        finally:
            await pool.aclose()
    assert "the proxy 127.0.0.1:" in str(raised.value)
