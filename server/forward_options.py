"""The forwarder's tuning (``ForwarderOptions``): defaults, and ``ONETAG_FORWARD_*`` read and
checked. Its own module, without httpx, so the commands that only read the options
(``onetag replay``, ``onetag deliveries --state``: a pending row's reason names its attempts
and lease) start without importing the HTTP stack (server/forwarder.py re-exports all of
it)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from . import product_sync
from .vendors import VENDORS

if TYPE_CHECKING:
    import httpx

DEFAULT_CONCURRENCY = 32  # in flight per vendor: 32 at ~50 ms each is ~600 req/s a vendor
DEFAULT_CONNECT_TIMEOUT_S = 5.0  # a vendor that cannot take a TCP connection in 5 s is down
DEFAULT_READ_TIMEOUT_S = 15.0  # APIs answer in < 1 s; Remarkety's own connector waits 10 s
DEFAULT_WRITE_TIMEOUT_S = 15.0  # our bodies are a few KB
DEFAULT_POOL_TIMEOUT_S = 10.0  # never reached: the pool holds every lane's slots
DEFAULT_LEASE_S = 60.0  # > the longest a send can take (connect + write + read timeouts) + finish
DEFAULT_BACKOFF_BASE_S = 2.0  # first retry after 1-2 s: a blip heals at once
DEFAULT_BACKOFF_CAP_S = 3600.0  # never wait more than an hour between tries of one row
DEFAULT_MAX_ATTEMPTS = 20  # with the cap: ~7 h of retrying before a row is dead
DEFAULT_RETRY_WINDOW_S = 86400.0  # a day: past it a fact is stale for email journeys; replayable
DEFAULT_IDLE_POLL_S = 1.0  # rows coming due by time (retries) are found within a second
DEFAULT_EXPIRE_EVERY_S = 60.0  # held rows past the hold window are expired this often
DEFAULT_SHUTDOWN_GRACE_S = 5.0  # on stop, in-flight sends get this long; the rest stay leased
DEFAULT_PRUNE_EVERY_S = 300.0  # attempts and coupon calls past keep_attempts_days go this often
# Requests/s per vendor, per process. None by default: a 429 pauses the vendor's lane anyway.
# Sendlane's 240/min per account (REFERENCE.md 4.2, a secondary source) would be
# ONETAG_FORWARD_RATES=sendlane=4.
DEFAULT_RATES: Mapping[str, float] = {}


@dataclass(frozen=True)
class ForwarderOptions:
    concurrency: int = DEFAULT_CONCURRENCY
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S
    lease_s: float = DEFAULT_LEASE_S
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_window_s: float = DEFAULT_RETRY_WINDOW_S
    idle_poll_s: float = DEFAULT_IDLE_POLL_S
    expire_every_s: float = DEFAULT_EXPIRE_EVERY_S
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    prune_every_s: float = DEFAULT_PRUNE_EVERY_S
    # The Sendlane product sync's pass (server/product_sync.py): changes planned this often
    # (0: no periodic pass; ``sync_products`` runs one).
    product_sync_every_s: float = product_sync.DEFAULT_EVERY_S
    rates: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    # An HTTP proxy every vendor request goes through (``http://[user:password@]host:port``;
    # https vendors through a CONNECT tunnel), for hosts whose only way out is one. Only
    # ONETAG_FORWARD_PROXY sets it: HTTPS_PROXY, set for other programs, is not read.
    proxy: str | None = field(default=None, repr=False)  # its password: never in a repr

    @property
    def timeout(self) -> httpx.Timeout:
        import httpx  # here: only the forwarder asks, and it has httpx loaded

        return httpx.Timeout(connect=self.connect_timeout_s, read=self.read_timeout_s,
                             write=self.write_timeout_s, pool=self.pool_timeout_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ForwarderOptions":
        """Defaults, overridden by ``ONETAG_FORWARD_<FIELD>`` variables. A value out of its
        range is a ``ValueError`` naming the variable and the range: 0 in flight sent
        nothing, a negative count or a non-number was a traceback from deep inside."""
        env = os.environ if env is None else env
        known = {f"ONETAG_FORWARD_{f.name.upper()}" for f in dataclasses.fields(cls)}
        for name in sorted(n for n in env if n.startswith("ONETAG_FORWARD_") and n not in known):
            # A misspelt name (ONETAG_FORWARD_CONCURENCY) was ignored: the default ran.
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ValueError(f"{name} is not a forwarder setting ({hint}known: "
                             f"{', '.join(sorted(known))})")
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"ONETAG_FORWARD_{f.name.upper()}"
            if name not in env:
                continue
            text = env[name].strip()
            try:
                if f.name == "rates":
                    changes["rates"] = _parse_rates(text)
                elif f.name == "proxy":
                    changes["proxy"] = proxy_url(text)
                elif f.name in ("concurrency", "max_attempts"):
                    changes[f.name] = _count(text)
                else:
                    changes[f.name] = _seconds(text, zero=f.name in ZERO_ALLOWED)
            except ValueError as exc:
                shown = _without_password(text) if f.name == "proxy" else text
                raise ValueError(f"{name}={shown!r}: {exc}") from None
        return cls(**changes)


MAX_SECONDS = 365 * 86400  # no tuning value in seconds is longer than a year
ZERO_ALLOWED = frozenset({"product_sync_every_s", "shutdown_grace_s"})  # 0: none / at once


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError("must be a whole number, at least 1")
    return int(text)


def _seconds(text: str, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low = "0 or more" if zero else "more than 0"
    if not (value >= 0 if zero else value > 0) or not value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds, {low} and at most {MAX_SECONDS}")
    return value


def proxy_url(text: str) -> str | None:
    """``http://[user:password@]host:port`` as given, checked (None for "" or "none"). No
    message says the text itself: it may hold a password (``from_env`` shows it redacted)."""
    if text.lower() in ("", "none", "off"):
        return None
    example = "as http://proxy.internal:3128 or http://user:password@proxy.internal:3128"
    userinfo = text.partition("://")[2].rpartition("@")[0]
    if any(char in userinfo for char in "/?#"):  # a URL would end there: percent-encode them
        raise ValueError(f"percent-encode a '/', '?' or '#' in the user or password (%2F, "
                         f"%3F, %23), {example}")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a proxy URL with a port from 1 to 65535, {example}") from None
    if parts.scheme != "http":
        raise ValueError(f"the proxy is reached over http:// (https vendors go through its "
                         f"CONNECT tunnel), {example}")
    if not parts.hostname or not port or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        raise ValueError(f"name the proxy's host and port and nothing else, {example}")
    return text


def _without_password(text: str) -> str:
    """A proxy URL as it may be shown: all before its last ``@`` but the scheme replaced
    (a password may hold anything, its own ``@`` included, or be given without a scheme)."""
    before, at, host = text.rpartition("@")
    if not at:
        return text
    scheme = before.partition("://")[0] + "://" if "://" in before else ""
    return f"{scheme}[redacted]@{host}"


def _parse_rates(text: str) -> dict[str, float]:
    if text.lower() in ("", "none", "off"):
        return {}
    rates = {}
    for part in text.split(","):
        vendor, _, value = part.partition("=")
        vendor = vendor.strip()
        if vendor not in VENDORS:
            raise ValueError(f"unknown vendor {vendor!r} (expected {', '.join(VENDORS)}, as "
                             f"\"sendlane=4,remarkety=20\" or \"none\")")
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not 0 < rate < math.inf:
            raise ValueError(f"{vendor}: must be requests a second, more than 0 "
                             f"(\"sendlane=4,remarkety=20\", or \"none\")")
        rates[vendor] = rate
    return rates
