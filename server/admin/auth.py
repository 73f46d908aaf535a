"""The console's stateless session and CSRF tokens, and the login throttle.

Everything is signed with one key derived from ``[server] admin_token`` (HMAC-SHA256 of a
fixed label), so changing the token invalidates every session and every form at once, and
nothing is kept server-side but the sessions logged out before they expired (in the
database, ``Store.revoke_session``: until the cookie would expire) and wrong guesses (in the database too, ``SharedThrottle``: every node adds up an address's).

- Session cookie: ``<expiry ms>.<nonce>.<hex HMAC(key, "session|expiry|nonce")>``.
- CSRF token of a page: ``hex HMAC(key, "csrf|nonce")`` of the session's nonce (a
  synchronizer token that needs no storage: only the holder of the cookie's nonce and the
  key can make it).
- The login form's token: the same over the nonce of a short-lived pre-session cookie, so
  the login POST is CSRF-checked like every other.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Any

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


class SharedThrottle:
    """A ``LoginThrottle`` whose counts every node on the database shares, restarts
    included: each wrong guess is kept in the store (``Store.guess_failed``, table
    ``guess_failures``) under ``scope`` (which secret), and the answer, every node's guesses
    from that address within the window, is taken into this process's count. The limits
    and the delay are the throttle's (5 a minute per address, 0.5 s).

    Before a secret is compared, ``retry_after`` asks the database, except for an address
    it found under the bound within ``RECHECK_S`` (a right key posted all day costs a read a
    second). Its last look is this process's count, with no wait between it and the
    caller's comparison and ``wrong``'s count: within one process the bound is exact,
    concurrent guesses included. Another node learns of this one's guesses at its next
    read or its own next wrong guess. A database that can't be reached leaves each process
    its own count (the bound per process, as before), said once a minute in the log."""

    def __init__(self, store: Any, scope: str, throttle: LoginThrottle | None = None,
                 recheck_s: float = RECHECK_S):
        self.store = store
        self.scope = scope
        self.local = throttle if throttle is not None else LoginThrottle()
        self.recheck_s = recheck_s
        self._clear: OrderedDict[str, float] = OrderedDict()  # address -> when found under
        self._said_down: float | None = None

    @property
    def delay_s(self) -> float:
        return self.local.delay_s

    async def retry_after(self, address: str) -> int:
        """0 when ``address`` may try its secret now; else the seconds until it may."""
        now = time.time()
        if not self.local.retry_after(address, now) and not self._fresh(address, now):
            since_ms = int((now - self.local.window_s) * 1000)
            shared = await self._ask("guess_failures", self.scope, address, since_ms)
            now = time.time()
            if shared is not None:
                self.local.merge(address, [t / 1000 for t in shared], now)
                if len(shared) < self.local.max_failures:
                    self._clear[address] = now
                    self._clear.move_to_end(address)
                    while len(self._clear) > self.local.max_addresses:
                        self._clear.popitem(last=False)
        return self.local.retry_after(address, now)  # no wait between this and the compare

    async def wrong(self, address: str) -> None:
        """A wrong guess from ``address``: counted here at once, kept in the database for
        every node, then answered ``delay_s`` late."""
        now = time.time()
        self.local.failed(address, now)
        self._clear.pop(address, None)
        shared = await self._ask("guess_failed", self.scope, address, int(now * 1000),
                                 int(self.local.window_s * 1000))
        if shared is not None:
            self.local.merge(address, [t / 1000 for t in shared])
        await asyncio.sleep(self.delay_s)

    async def right(self, address: str) -> None:
        """The right secret from ``address``: its wrong guesses are forgotten, here and in
        the database when this process knows of any (a right key posted all day writes
        nothing)."""
        had = bool(self.local._recent(address, time.time()))
        self.local.succeeded(address)
        if had:
            await self._ask("guesses_cleared", self.scope, address)

    def _fresh(self, address: str, now: float) -> bool:
        found = self._clear.get(address)
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
