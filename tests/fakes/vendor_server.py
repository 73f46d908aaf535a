"""A fake vendor API on loopback: one real HTTP/1.1 server for all four vendors.

Each vendor lives under its own path prefix (``/rejoiner``, ``/remarkety``, ``/esputnik``,
``/sendlane``), so a test points a site's ``api_base``/``webhook_url``/``tracker_url`` at
``fake.url("rejoiner")`` and so on. Every request is recorded (method, path, query, headers,
body, parsed JSON, what the fake answered), and failures are made on demand per prefix:

    fake.fail("sendlane", 500)                         # the next request under /sendlane gets 500
    fake.fail("remarkety", 429, headers={"Retry-After": "2"}, times=3)
    fake.hang("esputnik", times=None)                  # hold every request open (a timeout)
    fake.reset("rejoiner")                             # drop the connection with a TCP RST
    fake.close_after("sendlane")                       # answer 200, then close the connection
    fake.release()                                     # answer the held requests (200)

It is a plain ``asyncio`` protocol (no framework, no streams) so it can do what a framework
hides (reset a connection, hold a request forever) and so it costs little CPU: a request is
parsed from the bytes received and answered by a timer (``loop.call_later``), with no
coroutine or task of its own. That matters to the benchmarks, which run it on the same
cores as the worker they measure, where a real vendor's CPU is on its own machines
(bench/README.md). In a test it runs in a thread (``with FakeVendors() as fake``); ``python
tests/fakes/vendor_server.py --delay 0.05`` runs it as its own process for the benchmark
(prints ``PORT <n>``; ``GET /_stats`` answers the request counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs

VENDOR_PREFIXES = ("rejoiner", "remarkety", "esputnik", "sendlane")
REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
           409: "Conflict", 422: "Unprocessable Entity", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
OK_BODY = b'{"status":"success"}'
HEAD_LIMIT = 65536  # bytes of request line and headers; a client sending more is cut off


def response_bytes(status: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


OK = response_bytes(200, {}, OK_BODY)


def _timed_out(timeout: float, what: str, describe: Callable[[], Any] | None) -> AssertionError:
    extra = f"; {describe()}" if describe else ""
    return AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")


def wait_sync(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
              describe: Callable[[], Any] | None = None) -> Any:
    """Poll ``condition`` until it is truthy (from a thread without a running loop)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, describe)
        time.sleep(0.02)
    return value


async def until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                describe: Callable[[], Any] | None = None) -> Any:
    """The same from async code, without blocking the caller's event loop."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, describe)
        await asyncio.sleep(0.02)
    return value


@dataclass
class Recorded:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    received: float  # time.time()
    answer: str = ""  # "200", "500", "reset", "hung" (still held), "200 after hold" ...

    @property
    def vendor(self) -> str:
        return self.path.strip("/").split("/", 1)[0]

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Rule:
    prefix: str
    action: str  # "status" | "hang" | "reset" | "close"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    times: int | None = 1  # None: every matching request


class FakeVendors:
    def __init__(self, delay: float = 0.0, record: bool = True):
        self.delay = delay  # seconds before every answer (the benchmark's vendor latency)
        self.record = record
        self.port = 0
        self.count = 0
        self.counts: dict[str, int] = {}
        self.connections = 0  # TCP connections accepted
        self.in_flight: dict[str, int] = {}  # per vendor prefix, requests not yet answered
        self.max_in_flight: dict[str, int] = {}
        self._requests: list[Recorded] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._held: set[_Connection] = set()  # connections whose request is hung

    # Control (thread-safe) --------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, vendor: str, rest: str = "") -> str:
        return f"{self.base_url}/{vendor}{rest}"

    def fail(self, prefix: str, status: int, *, times: int | None = 1,
             headers: dict[str, str] | None = None, body: str | bytes = b"") -> None:
        body = body.encode() if isinstance(body, str) else body
        if not body and status >= 400:
            body = json.dumps({"error": f"fake {status}"}).encode()
        self._add(Rule(self._prefix(prefix), "status", status, dict(headers or {}), body, times))

    def hang(self, prefix: str, *, times: int | None = 1) -> None:
        """Hold matching requests open until ``release()`` or the client gives up."""
        self._add(Rule(self._prefix(prefix), "hang", times=times))

    def reset(self, prefix: str, *, times: int | None = 1) -> None:
        """Read the request, then drop the connection with a TCP RST."""
        self._add(Rule(self._prefix(prefix), "reset", times=times))

    def close_after(self, prefix: str, *, times: int | None = 1) -> None:
        """Answer 200, then close the connection (without saying so in a header): the client's
        idle keep-alive connection goes stale."""
        self._add(Rule(self._prefix(prefix), "close", times=times))

    def heal(self, prefix: str | None = None) -> None:
        """Forget the failure rules (for one prefix, or all)."""
        with self._lock:
            self._rules = [r for r in self._rules
                           if prefix is not None and r.prefix != self._prefix(prefix)]

    def release(self) -> None:
        """Answer every held request with 200 and stop holding new ones."""
        self.heal()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release_now)

    def requests(self, prefix: str | None = None, *, answer: str | None = None) -> list[Recorded]:
        with self._lock:
            found = list(self._requests)
        if prefix is not None:
            found = [r for r in found if r.path.startswith(self._prefix(prefix))]
        if answer is not None:
            found = [r for r in found if r.answer == answer]
        return found

    def delivered(self, prefix: str | None = None) -> list[Recorded]:
        """Requests the fake answered with a 2xx."""
        return [r for r in self.requests(prefix) if r.answer.startswith("2")]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_until(self, condition: Callable[[], Any], timeout: float = 30.0,
                   what: str = "condition") -> Any:
        """Poll ``condition`` (from a thread without a running loop) until it is truthy."""
        return wait_sync(condition, timeout, what, lambda: f"the fake saw {self.summary()}")

    async def until(self, condition: Callable[[], Any], timeout: float = 30.0,
                    what: str = "condition") -> Any:
        """The same from async code: polls without blocking the caller's event loop."""
        return await until(condition, timeout, what, lambda: f"the fake saw {self.summary()}")

    def summary(self) -> str:
        seen = [f"{r.method} {r.path} -> {r.answer}" for r in self.requests()[-30:]]
        return ", ".join(seen) or "nothing"

    # Life cycle -------------------------------------------------------------------------

    def start(self) -> "FakeVendors":
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # surfaced to start()'s caller
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-vendors", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> "FakeVendors":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _open(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for connection in list(self._connections):
            connection.close()
        await self._server.wait_closed()

    # Internals --------------------------------------------------------------------------

    @staticmethod
    def _prefix(prefix: str) -> str:
        return "/" + prefix.strip("/")

    def _add(self, rule: Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _release_now(self) -> None:
        for connection in list(self._held):
            connection.unhold()

    def _take_rule(self, path: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if path.startswith(rule.prefix):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self._rules.remove(rule)
                    return rule
        return None

    def _request(self, connection: "_Connection", method: str, target: str,
                 headers: dict[str, str], body: bytes) -> None:
        """One request read whole from ``connection``: count it, then answer as the rules
        say, after ``delay``."""
        if target == "/_stats":
            connection.answer(None, response_bytes(200, {}, json.dumps(
                {"count": self.count, "by_prefix": self.counts}).encode()))
            return
        path, _, query = target.partition("?")
        if not self.record and not self._rules:
            # The benchmark's vendor (nothing kept, no failures asked for): counted and
            # answered 200 after the delay, without the record a test would read.
            vendor = path.strip("/").split("/", 1)[0]
            self._count(vendor)
            connection.later(self.delay, vendor, "200", OK,
                             headers.get("connection", "").lower() == "close")
            return
        recorded = Recorded(method, path, parse_qs(query) if query else {}, headers, body,
                            time.time())
        self._count(recorded.vendor, recorded if self.record else None)
        rule = self._take_rule(path) if self._rules else None
        close = headers.get("connection", "").lower() == "close"
        if rule is not None and rule.action == "reset":
            recorded.answer = "reset"
            connection.reset(recorded)
        elif rule is not None and rule.action == "hang":
            recorded.answer = "hung"
            connection.hold(recorded, close)
        elif rule is not None and rule.action == "status":
            connection.later(self.delay, recorded, str(rule.status),
                             response_bytes(rule.status, rule.headers, rule.body), close)
        else:  # no rule, or "close": 200, and for "close" the connection ends after it
            close = close or rule is not None
            connection.later(self.delay, recorded, "200", OK, close)

    def _count(self, vendor: str, recorded: Recorded | None = None) -> None:
        """A request read: counted, kept (when recording), in flight until answered."""
        with self._lock:
            self.count += 1
            self.counts[vendor] = self.counts.get(vendor, 0) + 1
            if recorded is not None:
                self._requests.append(recorded)
            self.in_flight[vendor] = self.in_flight.get(vendor, 0) + 1
            self.max_in_flight[vendor] = max(self.max_in_flight.get(vendor, 0),
                                             self.in_flight[vendor])

    def _answered(self, answered: "Recorded | str") -> None:
        vendor = answered if isinstance(answered, str) else answered.vendor
        with self._lock:
            self.in_flight[vendor] -= 1


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from the bytes as they arrive and answered in
    order, one at a time (an HTTP/1.1 client waits for the answer before its next request
    on the connection)."""

    def __init__(self, fake: FakeVendors):
        self.fake = fake
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a request read and not yet answered
        self.closed = False
        self.held: tuple[Recorded, bool] | None = None  # a hung request, and close after it

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.fake.connections += 1
        self.fake._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fake._connections.discard(self)
        self._give_up()

    def data_received(self, data: bytes) -> None:
        if self.held is not None:  # the client gave up on its hung request (or died)
            self.close()
            return
        self.buffer += data
        self._next()

    def eof_received(self) -> bool:
        return False  # the client hung up: close our side too (a held request is given up)

    # Answers ----------------------------------------------------------------------------

    def answer(self, recorded: "Recorded | str | None", payload: bytes,
               close: bool = False) -> None:
        if recorded is not None:
            self.fake._answered(recorded)
        self.busy = False
        if self.closed:
            return
        self.transport.write(payload)  # type: ignore[union-attr]
        if close:
            self.close()
        else:
            self._next()

    def later(self, delay: float, recorded: "Recorded | str", answer: str, payload: bytes,
              close: bool = False) -> None:
        """Answer ``payload`` after ``delay``; ``recorded`` is the request's record, or
        the vendor's name alone where nothing is kept."""
        if isinstance(recorded, Recorded) and not recorded.answer:
            recorded.answer = answer
        if delay:
            asyncio.get_running_loop().call_later(delay, self.answer, recorded, payload, close)
        else:
            self.answer(recorded, payload, close)

    def hold(self, recorded: Recorded, close: bool) -> None:
        self.held = (recorded, close)
        self.fake._held.add(self)

    def unhold(self) -> None:
        """``release()``: answer the held request with 200 (after the fake's delay)."""
        if self.held is None:
            return
        (recorded, close), self.held = self.held, None
        self.fake._held.discard(self)
        recorded.answer = "200 after hold"
        self.later(self.fake.delay, recorded, "200", OK, close)

    def reset(self, recorded: Recorded) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0: closing sends RST, not FIN)."""
        self.fake._answered(recorded)
        self.closed = True
        sock = self.transport.get_extra_info("socket")  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self._give_up()

    def _give_up(self) -> None:
        if self.held is not None:
            recorded, self.held = self.held[0], None
            self.fake._held.discard(self)
            self.fake._answered(recorded)

    def _next(self) -> None:
        """Read the next whole request from the buffer, if it is there."""
        while not self.busy and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > HEAD_LIMIT:
                    self.close()
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
            except ValueError:
                self.close()
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.busy = True
            self.fake._request(self, method, target, headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description="fake vendor APIs on loopback")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    fake = FakeVendors(delay=args.delay, record=False)

    async def serve() -> None:
        await fake._open(port=args.port)
        print(f"PORT {fake.port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
