"""What a real ``onetag serve`` bounds per connection (server/connections.py): the time to
send a request's headers, a console form's body, and the log when file descriptors run out.

An attacker's review found 6,000 connections that sent ``GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n``
and nothing more still open after 90 s; at ~20,000 the process ran out of file descriptors,
/healthz and POST /e timed out, and the log took 200,703 accept tracebacks (89 MB in 40 s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from fakes.harness import REPO, free_port, write_config
from server import connections

SITE = "shop1"
ORIGIN = "https://shop.example"
ADMIN_TOKEN = "an-admin-token-long-enough-1234"


class Serve:
    """``python -m server serve`` on a loopback port, its log in a file."""

    def __init__(self, tmp: Path, limit_files: int | None = None, **server: Any) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"serve-{self.port}.log"
        config = write_config(tmp / "onetag.toml", {
            "server": {"database": f"sqlite:///{tmp / 'onetag.db'}", "public_url": self.base,
                       "forward": False, **server},
            "sites": [{"id": SITE, "origins": [ORIGIN], "api_key": "k-0123456789abcdef"}]})

        def limit() -> None:  # in the child: soft and hard, so serve can't raise it back
            if limit_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server", "serve", "--config", str(config),
                 "--port", str(self.port), "--log-level", "warning"],
                cwd=tmp, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=limit)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def healthy(self, timeout: float = 5) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.base}/healthz", timeout=timeout).status_code == 200
        return False

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(timeout=2):
            if self.proc.poll() is not None:
                raise AssertionError(f"onetag serve exited ({self.proc.returncode}):\n"
                                     f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no /healthz 200 within {timeout} s:\n"
                                     f"{self.output()[-3000:]}")
            time.sleep(0.1)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 9)  # the group this test started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def serving(tmp: Path, **kwargs: Any) -> Iterator[Serve]:
    serve = Serve(tmp, **kwargs)
    try:
        serve.wait_healthy()
        yield serve
    finally:
        serve.stop()


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response (head and a Content-Length body) from ``sock``, and not a byte
    of the next one (pipelined answers)."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, body = data[:-4], b""
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # 204: none
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, f"closed inside a response: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def seconds_until_closed(sock: socket.socket, started: float, wait_s: float) -> float:
    """When the server closed ``sock`` (reading and discarding what it sent), measured from
    ``started``; fails when it is still open ``wait_s`` seconds from now."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open {time.monotonic() - started:.1f} s after it "
                             "opened") from None
    return time.monotonic() - started


PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


# Request headers ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_connection_that_never_finishes_its_headers_is_closed(tmp_path: Path) -> None:
    """6,000 such connections were all still open after 90 s. With header_timeout_s = 1 it
    is closed in 1 s (up to a quarter of it late), trickling bytes or not, while another
    connection is answered meanwhile."""
    with serving(tmp_path, header_timeout_s=1) as serve:
        silent, trickling = serve.connect(), serve.connect()
        started = time.monotonic()
        silent.sendall(PARTIAL)
        with serve.connect() as normal:  # a request on another connection is answered
            normal.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(normal).startswith(b"HTTP/1.1 200")
        trickling.setblocking(True)
        for byte in PARTIAL:  # a byte every 0.05 s: the deadline is not moved by them
            try:
                trickling.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.05)
        for sock in (silent, trickling):
            with sock:
                elapsed = seconds_until_closed(sock, started, wait_s=6)
                assert 0.9 <= elapsed < 4, elapsed
        assert serve.healthy()
        assert "Traceback" not in serve.output(), serve.output()[-3000:]


@pytest.mark.slow
def test_a_kept_alive_connection_then_sending_part_of_a_request_is_closed(tmp_path: Path) -> None:
    """After a response, the next request's headers are due within header_timeout_s too:
    uvicorn's keep-alive timer was cancelled by the first byte of them, and nothing else
    timed the connection."""
    with serving(tmp_path, header_timeout_s=1) as serve, serve.connect() as sock:
        for _ in range(3):  # kept alive: each request answered in turn
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        # Two requests in one write (pipelined) are both answered.
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(PARTIAL)  # then part of a request, after the last response
        started = time.monotonic()
        elapsed = seconds_until_closed(sock, started, wait_s=6)
        assert elapsed < 3, elapsed


@pytest.mark.slow
def test_the_header_deadline_does_not_cut_a_request_being_answered(tmp_path: Path) -> None:
    """Once the headers are in, the body has body_timeout_s (3 s here), not the header
    deadline (1 s): a body sent over 2 s is accepted."""
    with serving(tmp_path, header_timeout_s=1, body_timeout_s=3) as serve, \
            serve.connect() as sock:
        body = (b'{"site_id": "shop1", "events": [{"event": "page_view", '
                b'"event_id": "9b2f5f0e-8a31-4c55-9a7c-1f2e3d4c5b6a"}]}')
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nOrigin: "
                     + ORIGIN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n")
        for start in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.5)
            sock.sendall(body[start:start + len(body) // 4 + 1])
        assert read_response(sock).startswith(b"HTTP/1.1 204")


# The console's forms ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_console_login_body_trickled_is_answered_408(tmp_path: Path) -> None:
    """POST /admin/login with Content-Length: 1000 trickling a byte a second was unanswered
    after 30 s: the console's form reader had no deadline. It has body_timeout_s now."""
    with serving(tmp_path, admin_token=ADMIN_TOKEN, body_timeout_s=1) as serve, \
            serve.connect() as sock:
        sock.sendall(b"POST /admin/login HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 1000\r\n\r\ntoken=")
        started = time.monotonic()
        sock.settimeout(0.3)
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 8:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"a")
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(65536)
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), (elapsed, answer[:300])
        assert 0.9 <= elapsed < 4, elapsed
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert b"connection: close" in head and b"x-frame-options: deny" in head, head
        assert serve.healthy()


# Out of file descriptors -----------------------------------------------------------------

@pytest.mark.slow
def test_out_of_file_descriptors_the_log_says_so_once_and_the_server_recovers(
        tmp_path: Path) -> None:
    """At the open-files limit asyncio logged a traceback per accept tried (200,703 in
    40 s). With the limit at 64 and more connections than that, the log has one line saying
    connections are refused and why, no traceback; a connection already open is answered
    meanwhile, and the header deadline closes the silent ones, so /healthz answers again."""
    with serving(tmp_path, limit_files=64, header_timeout_s=3) as serve, \
            serve.connect() as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept).startswith(b"HTTP/1.1 200")
        held = []
        try:
            for _ in range(80):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", serve.port))
                held.append(sock)
            deadline = time.monotonic() + 10
            while "refusing connections" not in serve.output():
                assert time.monotonic() < deadline, serve.output()[-3000:]
                time.sleep(0.1)
            # answered (200, or 503 if the writer's reply is late on a busy machine)
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(kept).startswith((b"HTTP/1.1 200", b"HTTP/1.1 503"))
            deadline = time.monotonic() + 30
            while not serve.healthy(timeout=1):  # the silent ones are closed by then
                assert time.monotonic() < deadline, serve.output()[-3000:]
        finally:
            for sock in held:
                sock.close()
        output = serve.output()
        refused = [line for line in output.splitlines() if "refusing connections" in line]
        assert 1 <= len(refused) <= 8, output[-3000:]
        assert "no file descriptor free (Too many open files; this process may open 64 " \
               "files)" in refused[0], refused
        assert "Traceback" not in output and connections.ACCEPT_ERROR_MESSAGE not in output, \
            output[-3000:]


def accept_error(exc: OSError) -> logging.LogRecord:
    """What asyncio's default exception handler logs when ``accept`` fails."""
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             connections.ACCEPT_ERROR_MESSAGE + "\nsocket: <socket fd=7>", (),
                             (type(exc), exc, None))


def test_the_accept_error_filter_collapses_a_flood_into_a_line_every_few_seconds() -> None:
    now = [100.0]
    keep = connections.AcceptErrorFilter(every_s=5, clock=lambda: now[0])
    emfile = OSError(24, "Too many open files")
    first = accept_error(emfile)
    assert keep.filter(first)
    assert first.exc_info is None and first.args == ()
    assert first.getMessage().startswith("refusing connections: no file descriptor free "
                                         "(Too many open files; this process may open "), \
        first.getMessage()
    assert first.getMessage().endswith(
        " files): accept() failed once; new connections wait in the listen backlog or are "
        "refused (this line is written at most every 5 s)"), first.getMessage()
    passed = 0
    for _ in range(2048):  # a loop turn's worth, and more over the next seconds
        now[0] += 0.001
        passed += keep.filter(accept_error(emfile))
    assert passed == 0
    now[0] = 105.5
    later = accept_error(OSError(105, "No buffer space available"))
    assert keep.filter(later)
    assert later.getMessage().startswith(
        "refusing connections: No buffer space available: accept() failed 2049 times in the "
        "last 6 s; new connections"), later.getMessage()
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was %s",
                              ("never retrieved",), None)
    now[0] += 0.1
    assert keep.filter(other) and other.getMessage() == "Task exception was never retrieved"


def test_the_loop_counts_failed_accepts_and_passes_on_anything_else(
        caplog: pytest.LogCaptureFixture) -> None:
    """The filter left asyncio making and formatting a record per failed accept; the loop's
    exception handler counts them before that, and leaves other errors to the default."""
    import asyncio

    async def run() -> None:
        loop = asyncio.get_running_loop()
        seen: list[dict] = []
        loop.set_exception_handler(lambda loop, context: seen.append(context))
        restore = connections.handle_accept_errors(loop)
        connections.ACCEPT_ERRORS.last, connections.ACCEPT_ERRORS.failed = None, 0
        for _ in range(2048):
            loop.call_exception_handler({"message": connections.ACCEPT_ERROR_MESSAGE,
                                         "exception": OSError(24, "Too many open files")})
        loop.call_exception_handler({"message": "Task exception was never retrieved"})
        assert [context["message"] for context in seen] == ["Task exception was never retrieved"]
        restore()
        loop.call_exception_handler({"message": connections.ACCEPT_ERROR_MESSAGE})
        assert len(seen) == 2

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())
    records = [record for record in caplog.records if record.name == "onetag.serve"]
    lines = [record.getMessage() for record in records]
    assert len(lines) == 1 and lines[0].startswith("refusing connections: no file descriptor "
                                                   "free (Too many open files;"), lines
    assert records[0].exc_info is None


def test_the_accept_error_filter_is_on_asyncios_logger_once() -> None:
    logger = logging.getLogger("asyncio")
    try:
        connections.install_accept_error_filter()
        connections.install_accept_error_filter()
        assert logger.filters.count(connections.ACCEPT_ERRORS) == 1
    finally:
        logger.removeFilter(connections.ACCEPT_ERRORS)


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(
        caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 128:
        pytest.skip(f"a hard limit of {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with caplog.at_level(logging.DEBUG, logger="onetag.serve"):
            assert connections.raise_open_files_limit() == (64, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert f"open files limit raised from 64 to {hard}" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# The protocol classes ----------------------------------------------------------------------

async def hello(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("name", ["h11", "httptools"])
def test_the_header_deadline_works_on_each_of_uvicorns_http11_protocols(name: str) -> None:
    """``serve`` runs uvicorn's ``auto`` protocol: httptools where it is installed, else h11."""
    import asyncio

    import uvicorn

    if name == "httptools":
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    protocol = connections.header_deadline_protocol(1.0, base)
    assert issubclass(protocol, base)
    port = free_port()

    def client() -> list[float]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as fresh, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            started = time.monotonic()
            fresh.sendall(PARTIAL)
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)  # pipelined
            assert read_response(kept).endswith(b"\r\n\r\nok")
            assert read_response(kept).endswith(b"\r\n\r\nok")
            kept.sendall(PARTIAL)
            kept_started = time.monotonic()
            return [seconds_until_closed(fresh, started, wait_s=6),
                    seconds_until_closed(kept, kept_started, wait_s=6)]

    async def run() -> list[float]:
        server = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=port, http=protocol,
                                               log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not task.done(), task
                await asyncio.sleep(0.01)
            return await asyncio.to_thread(client)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)

    fresh, kept = asyncio.run(run())
    assert 0.9 <= fresh < 3 and 0.9 <= kept < 3, (fresh, kept)
    assert not protocol.header_deadlines.due  # none left behind by connections gone
