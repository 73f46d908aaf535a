"""The console's stateless session and CSRF tokens, and the login throttle.

Everything is signed with one key derived from ``[server] admin_token`` (HMAC-SHA256 of a
fixed label), so changing the token invalidates every session and every form at once, and
nothing is kept server-side but the sessions logged out before they expired (in the
database, ``Store.revoke_session``: until the cookie would expire) and failed logins.

- Session cookie: ``<expiry ms>.<nonce>.<hex HMAC(key, "session|expiry|nonce")>``.
- CSRF token of a page: ``hex HMAC(key, "csrf|nonce")`` of the session's nonce (a
  synchronizer token that needs no storage: only the holder of the cookie's nonce and the
  key can make it).
- The login form's token: the same over the nonce of a short-lived pre-session cookie, so
  the login POST is CSRF-checked like every other.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict

SESSION_TTL_MS = 12 * 3600 * 1000  # a login lasts 12 hours
LOGIN_TTL_MS = 3600 * 1000  # a login form is good for an hour
LOGIN_DELAY_S = 0.5  # a wrong token is answered this late
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
    """Slows guessing the token: each wrong attempt is answered after ``delay_s``, and an
    address with ``max_failures`` wrong attempts within ``window_s`` is refused (429, the
    right token included) until the window has passed. At most ``max_addresses`` are
    remembered (the oldest dropped). The address is the connection's, or, from a proxy in
    ``[server] trusted_proxies``, the client's as that proxy reports it in X-Forwarded-For
    (uvicorn). Behind a proxy not listed there every client has the proxy's address: wrong
    guesses by anyone then lock everyone out for the window, the safe side (a listed proxy
    that passed the client's own X-Forwarded-For on would let a client choose its address,
    and so escape the bound)."""

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
        now = time.monotonic() if now is None else now
        times = self._recent(address, now)
        if len(times) < self.max_failures:
            return 0
        return max(1, int(times[0] + self.window_s - now + 0.999))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._recent(address, now)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
