"""What ``onetag serve`` bounds per connection, under uvicorn: the time to send a request's
headers, the log of accepts refused for want of file descriptors, the process's open files.

uvicorn times a connection only between requests (its keep-alive timer, armed after each
response and cancelled by the next byte received), so a client that sends part of a request
head and then nothing (``GET / HTTP/1.1\\r\\nHost: x\\r\\n`` and no blank line) held its
connection, and a file descriptor, for good: 20,000 of them and the process could accept
nothing more, not even /healthz. ``header_deadline_protocol`` subclasses the HTTP/1.1
protocol class ``serve`` runs (uvicorn's ``auto``: httptools when installed, else h11) so a
connection whose next request's headers are not complete ``[server] header_timeout_s``
after it opened, or after the previous response ended, is closed. The body has its own
deadline in the app (``body_timeout_s``: 408).

Out of descriptors, asyncio logs "socket.accept() out of system resource" with a traceback
for every accept it tries (it goes on trying up to uvicorn's backlog, 2,048 times, in the
loop turn that failed, and each retry a second later starts another such turn: 200,000
tracebacks, 89 MB, in 40 s). ``handle_accept_errors`` (the app's lifespan sets it on the
loop) counts them instead, and ``AcceptErrorFilter`` on asyncio's logger catches any record
that still gets there: one line every few seconds saying how many failed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any, Callable

log = logging.getLogger("onetag.serve")

ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's, and uvloop's
ACCEPT_ERROR_EVERY_S = 5.0


class HeaderDeadlines:
    """When each connection waiting for a request's headers must have them all.

    One timer a period (up to 1 s; a quarter of the timeout if less), not one a
    connection: arming is a dict insert, cancelling a dict pop, both cheaper than a timer
    handle per request. Every deadline is armed ``timeout_s`` from its arming on one
    monotonic clock, so the dict's order (a re-armed connection moves to the end) is the
    deadlines' order and a sweep stops at the first one not yet due. A connection is closed
    up to a period after its deadline."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.period = min(1.0, timeout_s / 4)
        self.due: dict[Any, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # a closed one's never fires

    def arm(self, protocol: Any, loop: asyncio.AbstractEventLoop) -> None:
        due = self.due
        due.pop(protocol, None)
        due[protocol] = loop.time() + self.timeout_s
        if self._sweep is None or self._loop is not loop:
            self._loop = loop
            self._sweep = loop.call_later(self.period, self._expire, loop)

    def cancel(self, protocol: Any) -> None:
        self.due.pop(protocol, None)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        late = []
        for protocol, deadline in self.due.items():
            if deadline > now:
                break
            late.append(protocol)
        closed = 0
        for protocol in late:
            del self.due[protocol]
            transport = protocol.transport
            if transport is not None and not transport.is_closing():
                closed += 1
                transport.close()
        if closed:
            log.debug("closed %d connection(s) whose request headers were not all in within "
                      "%g s", closed, self.timeout_s)
        self._sweep = loop.call_later(self.period, self._expire, loop) if self.due else None


class _HeaderDeadline:
    """Mixed into uvicorn's ``H11Protocol`` or ``HttpToolsProtocol`` (``header_deadline_protocol``).

    Both make a new ``self.cycle`` when a request's headers are complete (a pipelined one's
    too), call ``on_response_complete`` when a response has been sent, and leave
    ``self.cycle`` as the last request parsed: so the connection waits for headers from
    ``connection_made`` until a new cycle appears, and again after a response when no
    request parsed since is still unanswered."""

    header_deadlines: HeaderDeadlines
    transport: Any
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.header_deadlines.arm(self, self.loop)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # headers complete: the request is the app's now
            self.header_deadlines.cancel(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        cycle = self.cycle
        if not self.transport.is_closing() and (cycle is None or cycle.response_complete):
            self.header_deadlines.arm(self, self.loop)

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self.header_deadlines.cancel(self)  # no request cycle: the socket is a WebSocket's
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self.header_deadlines.cancel(self)
        super().connection_lost(exc)  # type: ignore[misc]


def header_deadline_protocol(timeout_s: float, base: type | None = None) -> type:
    """``base`` (uvicorn's ``auto`` HTTP protocol class unless given) closing a connection
    whose request headers are not all received ``timeout_s`` after it opened or after the
    previous response; for ``uvicorn.Config(http=...)``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    return type(f"HeaderDeadline{base.__name__}", (_HeaderDeadline, base),
                {"header_deadlines": HeaderDeadlines(timeout_s),
                 "__module__": __name__, "__doc__": _HeaderDeadline.__doc__})


class AcceptErrorFilter(logging.Filter):
    """On asyncio's logger: its "socket.accept() out of system resource" records, each with a
    traceback and up to 2,048 a loop turn, become one line every ``every_s`` seconds saying
    connections are being refused, why, and how many accepts failed since the last line.
    Other records pass untouched. ``handle_accept_errors`` uses the same count on the loop,
    before any record is made."""

    def __init__(self, every_s: float = ACCEPT_ERROR_EVERY_S,
                 clock: Any = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self.failed = 0  # accepts failed since the last line written
        self.last: float | None = None  # when that line was written

    def count(self, exc: BaseException | None) -> str | None:
        """One more failed accept: the line to write now, or None (one was written lately)."""
        self.failed += 1
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            return None
        code = getattr(exc, "errno", None)
        if code in (errno.EMFILE, errno.ENFILE):
            why = (f"no file descriptor free ({getattr(exc, 'strerror', exc)}; this process "
                   f"may open {open_files_limit()})")
        else:
            why = f"{getattr(exc, 'strerror', None) or exc or 'out of system resource'}"
        times = "once" if self.failed == 1 else f"{self.failed} times"
        since = "" if self.last is None else f" in the last {now - self.last:.0f} s"
        self.failed = 0
        self.last = now
        return (f"refusing connections: {why}: accept() failed {times}{since}; new "
                f"connections wait in the listen backlog or are refused (this line is "
                f"written at most every {self.every_s:g} s)")

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(ACCEPT_ERROR_MESSAGE)):
            return True
        line = self.count(record.exc_info[1] if record.exc_info else None)
        if line is None:
            return False
        record.msg = line
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


ACCEPT_ERRORS = AcceptErrorFilter()


def install_accept_error_filter() -> None:
    """On the logger asyncio (and uvloop) log accept errors to; adding it twice is a no-op,
    and ``logging.config.dictConfig`` (uvicorn's ``log_config``) keeps a logger's filters."""
    logging.getLogger("asyncio").addFilter(ACCEPT_ERRORS)


def handle_accept_errors(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """The loop's exception handler counts failed accepts itself (``ACCEPT_ERRORS``), and
    passes anything else on to the handler it replaces (else the loop's default). The
    filter alone left asyncio formatting and logging a record per failed accept (80 µs
    each, thousands a second on the event loop); this is the accept and its count. Returns
    what puts the previous handler back."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR_MESSAGE:
            line = ACCEPT_ERRORS.count(context.get("exception"))
            if line is not None:
                log.error("%s", line)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


def open_files_limit() -> str:
    try:
        import resource
    except ImportError:  # not on this platform
        return "an unknown number of files"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "any number of files" if soft == resource.RLIM_INFINITY else f"{soft} files"


def raise_open_files_limit() -> tuple[int, int] | None:
    """The soft limit on open files raised to the hard one (a connection is a file: the
    soft limit, often 1,024, is what a crowd of clients exhausts first). Returns (before,
    after), or None where there is no such limit; logged at debug."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # macOS: refused above OPEN_MAX
        target = max(soft, 10240) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("open files limit stays %d (raising it to %d failed: %s)", soft, target,
                      exc)
            return soft, soft
        log.debug("open files limit raised from %d to %d", soft, target)
        return soft, target
    log.debug("open files limit is %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
    return soft, soft
