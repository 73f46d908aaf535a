"""The console's stateless session and CSRF tokens, and the login throttle.

Everything is signed with one key derived from ``[server] admin_token`` (HMAC-SHA256 of a
fixed label), so changing the token invalidates every session and every form at once, and
nothing is kept server-side but the sessions logged out before they expired (in the
database, ``Store.revoke_session``: until the cookie would expire) and wrong guesses (in the
database too, ``SharedThrottle``: every node adds up an address's, from its second).

- Session cookie: ``<expiry ms>.<nonce>.<hex HMAC(key, "session|expiry|nonce")>``.
- CSRF token of a page: ``hex HMAC(key, "csrf|nonce")`` of the session's nonce (a
  synchronizer token that needs no storage: only the holder of the cookie's nonce and the
  key can make it).
- The login form's token: the same over the nonce of a short-lived pre-session cookie, so
  the login POST is CSRF-checked like every other.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, NamedTuple

from ..store.base import StoreUnavailable

log = logging.getLogger("onetag.auth")

SESSION_TTL_MS = 12 * 3600 * 1000  # a login lasts 12 hours
LOGIN_TTL_MS = 3600 * 1000  # a login form is good for an hour
LOGIN_DELAY_S = 0.5  # a wrong token is answered this late
# How long an address the database found under its bound is let in without asking again: a
# busy backend posting with its right key costs one read a second, not one a request.
RECHECK_S = 1.0
_COOKIE_RE = re.compile(r"^([0-9]{1,15})\.([A-Za-z0-9_-]{16,64})\.([0-9a-f]{64})$")


def derive_key(admin_token: str) -> bytes:
    """The console's signing key: never the token itself, and it changes with the token."""
    return hmac.new(admin_token.encode(), b"onetag admin console v1", hashlib.sha256).digest()


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "|".join(parts).encode(), hashlib.sha256).hexdigest()


def make_signed(key: bytes, purpose: str, now_ms: int, ttl_ms: int) -> tuple[str, str]:
    """A new signed value for ``purpose`` ("session" or "login"): (cookie value, nonce)."""
    nonce = secrets.token_urlsafe(24)
    expiry = str(now_ms + ttl_ms)
    return f"{expiry}.{nonce}.{_mac(key, purpose, expiry, nonce)}", nonce


def read_signed(key: bytes, purpose: str, value: str | None, now_ms: int) -> str | None:
    """The nonce of a cookie value signed by ``make_signed`` for ``purpose`` and not
    expired; None for anything else (absent, malformed, forged, expired)."""
    if not value or len(value) > 200:
        return None
    match = _COOKIE_RE.match(value)
    if match is None:
        return None
    expiry, nonce, mac = match.groups()
    if not hmac.compare_digest(mac, _mac(key, purpose, expiry, nonce)):
        return None
    if int(expiry) <= now_ms:
        return None
    return nonce


def csrf_token(key: bytes, nonce: str) -> str:
    return _mac(key, "csrf", nonce)


def csrf_ok(key: bytes, nonce: str | None, given: object) -> bool:
    """Constant-time check of a submitted token against the one ``nonce`` implies."""
    if nonce is None or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(given.encode(), csrf_token(key, nonce).encode())


def token_ok(configured: str, given: object) -> bool:
    """The login: the submitted token against ``[server] admin_token``, in constant time."""
    if not isinstance(given, str) or not given or len(given) > 1024:
        return False
    return hmac.compare_digest(given.encode(), configured.encode())


class Revoked:
    """This process's memory of sessions logged out before they expired (the cookie alone
    can't be recalled), so it refuses them without a query. Not the record: that is the
    database's (``Store.revoke_session``), which outlives a restart and reaches every node;
    a nonce forgotten here (the oldest go first) is still found there."""

    def __init__(self, limit: int = 10_000):
        self.limit = limit
        self._nonces: OrderedDict[str, int] = OrderedDict()

    def add(self, nonce: str, until_ms: int) -> None:
        self._nonces[nonce] = until_ms
        while len(self._nonces) > self.limit:
            self._nonces.popitem(last=False)

    def __contains__(self, nonce: str) -> bool:
        return nonce in self._nonces


class LoginThrottle:
    """Slows guessing a secret: each wrong attempt is answered after ``delay_s``, and an
    address with ``max_failures`` wrong attempts within ``window_s`` is refused (429, the
    right token included) until the window has passed. At most ``max_addresses`` are
    remembered (the oldest dropped). The address is the connection's, or, from a proxy in
    ``[server] trusted_proxies``, the client's as that proxy reports it in X-Forwarded-For
    (uvicorn). Behind a proxy not listed there every client has the proxy's address: wrong
    guesses by anyone then lock everyone out for the window, the safe side (a listed proxy
    that passed the client's own X-Forwarded-For on would let a client choose its address,
    and so escape the bound). This is one process's count; ``SharedThrottle`` adds every
    node's."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0,
                 delay_s: float | None = None, max_addresses: int = 10_000):
        self.max_failures = max_failures
        self.window_s = window_s
        self.delay_s = LOGIN_DELAY_S if delay_s is None else delay_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(address, ()) if now - t < self.window_s]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def retry_after(self, address: str, now: float | None = None) -> int:
        """0 when ``address`` may try; else the seconds until it may."""
        now = time.time() if now is None else now
        times = self._recent(address, now)
        if len(times) < self.max_failures:
            return 0
        return max(1, int(times[0] + self.window_s - now + 0.999))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        times = self._recent(address, now)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def merge(self, address: str, shared: list[float], now: float | None = None) -> None:
        """Take the database's times of ``address``'s wrong guesses (every node's) when they
        are more than this process counted: an answer that missed a guess still being
        written here never lowers the count."""
        now = time.time() if now is None else now
        times = [t for t in shared if now - t < self.window_s]
        if len(times) > len(self._recent(address, now)):
            self._failures[address] = sorted(times)
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)


# Wrong guesses are written to the store only when they could matter to another node, and
# never at the cost of the writes events need (a guess count is no acknowledged event: one
# left unwritten costs at most that other nodes learn of it late):
SHARE_AFTER = 2  # an address's guesses are written once it has this many within the window
GUESS_WRITES_PER_S = 20  # per process (its store): beyond, guesses are counted locally
GUESS_WRITES_IN_FLIGHT = 4  # guess writes waiting for the store at once, per process
# Reads are bounded the same way: a flood of guesses from many distinct addresses (each new
# to the process, so none found clear within RECHECK_S) would read the store once a request.
GUESS_READS_PER_S = 50  # per process (its store): beyond, the process's own count answers
GUESS_READS_IN_FLIGHT = 8  # guess reads waiting for the store at once, per process


@functools.lru_cache(maxsize=4096)  # asked before every api key: a few hosts post all day
def guess_address(host: str) -> str:
    """What a guess bound counts as one client: an IPv4 address, or an IPv6 /64 (one host
    or one customer's network gets a /64, and every address in it for free; counted per
    /128, one machine had billions of bounds). An IPv4-mapped IPv6 address is its IPv4
    address; anything else (no address known) is counted as it is."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class GuessBudget:
    """One process's allowance of guess writes (per store): ``GUESS_WRITES_PER_S`` a second
    (a token bucket) and ``GUESS_WRITES_IN_FLIGHT`` at once. A guess with no allowance left
    is counted in the process only, and written with that address's next one that has.

    ``reads``: the allowance of guess reads instead (``GUESS_READS_PER_S``,
    ``GUESS_READS_IN_FLIGHT``): a check with none left is answered by the process's own
    count, without asking the store."""

    clock = staticmethod(time.monotonic)

    def __init__(self, reads: bool = False) -> None:
        self.reads = reads
        self.tokens = 0.0
        self.at: float | None = None
        self.in_flight = 0

    def limits(self) -> tuple[int, int]:
        """(a second, at once): read when asked, so a test may change them."""
        if self.reads:
            return GUESS_READS_PER_S, GUESS_READS_IN_FLIGHT
        return GUESS_WRITES_PER_S, GUESS_WRITES_IN_FLIGHT

    def take(self) -> bool:
        per_s, at_once = self.limits()
        now, rate = self.clock(), float(per_s)
        if self.at is None:
            self.tokens = rate
        else:
            self.tokens = min(rate, self.tokens + max(0.0, now - self.at) * rate)
        self.at = now
        if self.tokens < 1 or self.in_flight >= at_once:
            return False
        self.tokens -= 1
        self.in_flight += 1
        return True

    def done(self) -> None:
        self.in_flight -= 1


class Guess(NamedTuple):
    """``SharedThrottle.check``'s answer: ``wait`` seconds (0 when under the bound) and,
    when compared, whether the secret was right."""
    wait: int
    right: bool


def client_address(request: Any) -> str:
    """The address a request came from, as guess bounds and replay records name it
    ("unknown" when the server was given none)."""
    return request.client.host if request.client else "unknown"


def shared_throttle(store: Any, scope: str) -> "SharedThrottle":
    """The one ``SharedThrottle`` of ``scope`` on ``store`` (a new one without a store), so
    that two handlers guarding one secret (the console's login and /metrics: the admin
    token) count into one bound, and every guess of the process (one store per app) draws
    on one ``GuessBudget`` of writes and one of reads. Kept on the store itself: it lives
    and goes with it."""
    if store is None:
        return SharedThrottle(None, scope)
    budget, reads, throttles = vars(store).setdefault(
        "_guess_throttles", (GuessBudget(), GuessBudget(reads=True), {}))
    if scope not in throttles:
        throttles[scope] = SharedThrottle(store, scope, budget=budget, read_budget=reads)
    return throttles[scope]


class SharedThrottle:
    """A ``LoginThrottle`` whose counts every node on the database shares, restarts
    included: wrong guesses are kept in the store (``Store.guess_failed``, table
    ``guess_failures``) under ``scope`` (which secret; with ``site``, ``scope:site``: each
    site's secret is its own bound) and the client's ``guess_address``, and the answer,
    every node's guesses from that address within the window, is taken into this process's
    count. The limits and the delay are the throttle's (5 a minute per address, 0.5 s).

    Not every guess is a write. An address's first wrong guess in the window is counted
    here only (a flood of one-off guesses from many addresses writes nothing); once this
    process knows of ``SHARE_AFTER`` (its own and those the database told of), its guesses
    not yet written are written, if the process's ``GuessBudget`` allows; if not, they stay
    counted here and go with its next write. The store gives guess writes no room that
    events need (SQLite: outside ``max_pending_writes``, refused while the queue is busy).
    So across N nodes an address may get up to ``max_failures + (N - 1) * (SHARE_AFTER -
    1)`` guesses a window, more while guesses outrun the budget (then each node bounds its
    own), and a restart forgets the guesses it had not written.

    Before a secret is compared, ``retry_after`` asks the database, except for an address
    it found under the bound within ``RECHECK_S`` (a right key posted all day costs a read a
    second), and within the process's ``read_budget`` (``GUESS_READS_PER_S`` reads a second,
    ``GUESS_READS_IN_FLIGHT`` at once, every scope together): a flood of guesses from many
    distinct addresses costs at most that many reads, and beyond it each check is answered
    by this process's count (each node bounds an address on its own meanwhile, as while
    writes outrun ``budget``), said once a minute in the log. Its last look is this
    process's count, with no wait between it and the caller's comparison and ``wrong``'s
    count: within one process the bound is exact, concurrent guesses included. A database
    that can't be reached leaves each process its own count (the bound per process, as
    before), said once a minute in the log."""

    def __init__(self, store: Any, scope: str, throttle: LoginThrottle | None = None,
                 recheck_s: float = RECHECK_S, budget: GuessBudget | None = None,
                 read_budget: GuessBudget | None = None):
        self.store = store
        self.scope = scope
        self.local = throttle if throttle is not None else LoginThrottle()
        self.recheck_s = recheck_s
        self.budget = budget if budget is not None else GuessBudget()
        self.read_budget = read_budget if read_budget is not None else GuessBudget(reads=True)
        self._clear: OrderedDict[str, float] = OrderedDict()  # key -> when found under
        self._unshared: OrderedDict[str, list[float]] = OrderedDict()  # key -> not written
        self._said_down: float | None = None
        self._said_budget: float | None = None
        self._said_reads: float | None = None

    @property
    def delay_s(self) -> float:
        return self.local.delay_s

    def _where(self, address: str, site: str | None) -> tuple[str, str, str]:
        """(the store's scope, the store's address, this process's key) of a guess."""
        scope = f"{self.scope}:{site}" if site else self.scope
        client = guess_address(address)
        return scope, client, f"{scope} {client}"

    async def retry_after(self, address: str, site: str | None = None) -> int:
        """0 when ``address`` may try its secret (``site``'s) now; else the seconds until
        it may."""
        scope, client, key = self._where(address, site)
        now = time.time()
        if (not self.local.retry_after(key, now) and not self._fresh(key, now)
                and self._may_read()):
            since_ms = int((now - self.local.window_s) * 1000)
            try:
                shared = await self._ask("guess_failures", scope, client, since_ms)
            finally:
                self.read_budget.done()
            now = time.time()
            if shared is not None:
                self._merge(key, shared, now)
                if len(shared) < self.local.max_failures:
                    self._clear[key] = now
                    self._clear.move_to_end(key)
                    while len(self._clear) > self.local.max_addresses:
                        self._clear.popitem(last=False)
        return self.local.retry_after(key, now)  # no wait between this and the compare

    async def check(self, address: str, given: str | None, expected: str | None,
                    site: str | None = None) -> "Guess":
        """One guess at a secret: the seconds ``address`` must wait when over the bound
        (the secret is then not compared), else whether ``given`` is ``expected`` (compared
        in constant time; None or an empty ``expected`` is never right). A wrong guess is
        counted (``wrong``) before this returns; a right one clears nothing (callers that
        want that call ``right``)."""
        wait = await self.retry_after(address, site)
        if wait:
            return Guess(wait, False)
        if given is not None and expected and hmac.compare_digest(
                given.encode("utf-8"), expected.encode("utf-8")):
            return Guess(0, True)
        await self.wrong(address, site)
        return Guess(0, False)

    async def wrong(self, address: str, site: str | None = None) -> None:
        """A wrong guess from ``address``: counted here at once, written for every node
        when it is not the address's only one (and the budget allows), then answered
        ``delay_s`` late."""
        scope, client, key = self._where(address, site)
        now = time.time()
        self.local.failed(key, now)
        self._clear.pop(key, None)
        unshared = self._recent_unshared(key, now)
        unshared.append(now)
        self._unshared[key] = unshared
        self._unshared.move_to_end(key)
        while len(self._unshared) > self.local.max_addresses:
            self._unshared.popitem(last=False)
        if len(self.local._recent(key, now)) >= SHARE_AFTER:
            await self._share(scope, client, key, now)
        await asyncio.sleep(self.delay_s)

    def _may_read(self) -> bool:
        """Whether to read the store now: there is one, and the process's ``read_budget``
        allows it (taken: ``done`` after)."""
        if self.store is None:  # nothing to read (``_ask`` would answer None)
            return False
        if self.read_budget.take():
            return True
        if self._said_reads is None or time.monotonic() - self._said_reads >= 60:
            self._said_reads = time.monotonic()
            log.warning("more %s guess checks than %d reads a second: the rest are answered "
                        "by this process's own count for now", self.scope,
                        self.read_budget.limits()[0])
        return False

    async def _share(self, scope: str, client: str, key: str, now: float) -> None:
        """Write ``key``'s guesses not yet written, within the process's budget."""
        if not self.budget.take():
            if self._said_budget is None or time.monotonic() - self._said_budget >= 60:
                self._said_budget = time.monotonic()
                log.warning("more wrong %s guesses than %d writes a second: the rest are "
                            "counted per process for now", self.scope, GUESS_WRITES_PER_S)
            return
        batch = self._unshared.pop(key, [])  # taken: a concurrent guess writes only its own
        if not batch:
            self.budget.done()
            return
        try:
            shared = await self._ask("guess_failed", scope, client, int(batch[-1] * 1000),
                                     int(self.local.window_s * 1000),
                                     [int(t * 1000) for t in batch[:-1]])
        finally:
            self.budget.done()
        if shared is None:  # not written: still this process's to write
            self._unshared[key] = sorted(batch + self._unshared.get(key, []))
            return
        self._merge(key, shared, time.time())

    async def right(self, address: str, site: str | None = None) -> None:
        """The right secret from ``address``: its wrong guesses are forgotten, here and in
        the database when some were written there (a right key posted all day writes
        nothing)."""
        scope, client, key = self._where(address, site)
        now = time.time()
        known = len(self.local._recent(key, now))
        unshared = len(self._recent_unshared(key, now))
        self.local.succeeded(key)
        self._unshared.pop(key, None)
        if known > unshared:
            await self._ask("guesses_cleared", scope, client)

    def _recent_unshared(self, key: str, now: float) -> list[float]:
        return [t for t in self._unshared.get(key, ()) if now - t < self.local.window_s]

    def _merge(self, key: str, shared_ms: list[int], now: float) -> None:
        """The database's guesses of ``key`` and this process's not written yet."""
        self.local.merge(key, [t / 1000 for t in shared_ms] + self._recent_unshared(key, now),
                         now)

    def _fresh(self, key: str, now: float) -> bool:
        found = self._clear.get(key)
        return found is not None and now - found < self.recheck_s

    async def _ask(self, method: str, *args: Any) -> Any:
        """The store's answer, or None when there is no store or it can't answer."""
        if self.store is None:
            return None
        try:
            return await getattr(self.store, method)(*args)
        except (StoreUnavailable, NotImplementedError) as exc:
            if self._said_down is None or time.monotonic() - self._said_down >= 60:
                self._said_down = time.monotonic()
                log.warning("wrong %s guesses are counted per process for now: the store "
                            "can't keep them (%s)", self.scope, exc)
            return None
