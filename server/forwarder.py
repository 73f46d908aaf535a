"""The forwarder: claim due delivery rows, send them, record what became of them.

One background task per vendor ("lane") claims that vendor's due rows (``store.claim``, which
leases them and keeps one row in flight per visitor) up to the lane's free slots, and sends
each through the process's ONE shared keep-alive pool (below). A lane never waits on another
vendor: a vendor that times out or answers 500 fills only its own slots, and the other lanes
keep claiming. Outcomes are collected and written in batches: a lane's next claim carries
the ones that piled up (``store.finish_and_claim``: on PostgreSQL one call and one commit for
both), and what no claim took within ``FINISH_DELAY_S`` is written on its own
(``store.finish``); SQLite's single writer group-commits either.

Retry state lives in the rows, not here: a retry is ``pending`` with a later
``next_attempt_ms``, so a restart resumes where the last process stopped. A claim leases its
rows for ``lease_s``; if the process dies mid-send, the row is due again when the lease ends
and the vendor may see that request twice. Every request carries the vendor's natural key
(order id, event id, cart id) in its body, which is what the vendor deduplicates on.

A send goes straight to the process's pool of HTTP/1.1 connections (``KeepAlivePool``,
server/http_client.py: its own small client, why there), with none of an HTTP client's
flows: redirects are not followed, credentials are ``auth_headers``', and no cookie jar (a
vendor's cookies must not travel from one site's request to another's).

What an answer means (``classify``):

- 2xx: delivered.
- 408, 409, 425, 429, 5xx, timeouts, refused or reset connections: retry later, with
  exponential backoff and jitter, or at the time a ``Retry-After`` header names (seconds or
  an HTTP date). A 429, or a 503 with ``Retry-After``, also pauses the whole lane until then:
  the vendor's limit is per account, not per request. The pause is kept by the store
  (``pause_vendor``/``paused_until``): on PostgreSQL every worker reads it before claiming.
- any other 4xx (400 malformed, 401 bad key, 404, 422 invalid data, ...) and 3xx (redirects
  are not followed: a POST API that redirects is misconfigured): permanent, ``dead`` at once,
  with the status and the response body in ``last_error``. A vendor module may say otherwise
  (``retry_policy``): ``RETRY_STATUSES`` names 4xx that are temporary there (Sendlane's 403),
  ``RETRY_ANY_NON_2XX`` retries every answer but a 2xx (Remarkety asks for that).
- a 401/403 is a key problem: ``last_error`` starts ``key rejected (401): check
  sites[<site>].<vendor>.<key setting>``, which ``onetag deliveries`` lists on its own line.
- A row that has used ``max_attempts`` or whose next try would fall past ``retry_window_s``
  (counted from when it was planned or last replayed) is ``dead``: kept, listed by
  ``onetag deliveries``, sent again by ``onetag replay``.

Every attempt is kept (``Attempt`` on the ``Outcome``, written by the same ``finish``): the
request as sent, before ``auth_headers`` adds the credentials, and the vendor's answer or the
transport error; a success keeps the failures before it (``last_error`` is only the latest).
Attempts older than ``[server] keep_attempts_days`` are pruned here, in bounded batches, and
so are the Remarkety coupon calls (``onetag coupons``; they hold shoppers' emails); when
``[server] keep_events_days`` is set, finished deliveries, events and sessions older than
it too (``prune_history``, server/store/retention.py).

Tuning, for ``onetag serve`` and ``onetag worker`` alike, through the environment (the config
file stays about sites): ``ONETAG_FORWARD_CONCURRENCY``, ``_CONNECT_TIMEOUT_S``,
``_READ_TIMEOUT_S``, ``_LEASE_S``, ``_BACKOFF_BASE_S``, ``_BACKOFF_CAP_S``, ``_MAX_ATTEMPTS``,
``_RETRY_WINDOW_S``, ``_IDLE_POLL_S``, ``_EXPIRE_EVERY_S``, ``_PRUNE_EVERY_S``, ``_SHUTDOWN_GRACE_S``,
``_PRODUCT_SYNC_EVERY_S`` (the Sendlane product sync's pass, server/product_sync.py), and
``ONETAG_FORWARD_RATES`` (``"sendlane=4,remarkety=20"`` requests/s per vendor, ``"none"``);
the options and their defaults are server/forward_options.py's.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import httpx

from . import __version__, product_sync
from .forward_options import ForwarderOptions
from .http_client import Answer, KeepAlivePool
from .store.base import Attempt, Delivery, Outcome, Store, StoreUnavailable
from .vendors import VENDORS

log = logging.getLogger("onetag.forwarder")

DEFAULT_KEEPALIVE_EXPIRY_S = 30.0  # idle vendor connections are reused, then let go
# Outcomes wait this long for a lane's claim to carry them (one write for both) before
# the finisher writes them on their own.
FINISH_DELAY_S = 0.01
STORE_RETRY_S = 1.0  # a lane whose claim the store refused (writer restarting, disk full) waits
DEFAULT_MAX_ERROR_CHARS = 2000  # of a vendor's error body kept in last_error
PRUNE_BATCH = 2000  # rows deleted per write: a short transaction beside the deliveries'
PRUNE_BATCHES = 10  # batches a pass at most; a bigger backlog goes over the next passes
LATEST = 2**63 - 1  # the newest (started_ms, id) a labelling pass starts before
ANSWER_BODY_LIMIT = 4096  # characters of a vendor's answer body kept per attempt
# Sent with every request (besides Host, Content-Length, Content-Type and the vendor's own).
BASE_HEADERS = {"User-Agent": f"onetag/{__version__}", "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate"}
# A request's headers start as a copy of one of these: lower-case name -> (name, value), so
# a vendor module's or the credentials' header replaces ours whatever its case.
_BASE_HEADERS = {name.lower(): (name, value) for name, value in BASE_HEADERS.items()}
_JSON_HEADERS = {**_BASE_HEADERS, "content-type": ("Content-Type", "application/json")}
# The answer headers an attempt keeps: what says what the body is, when to come back, where
# a redirect went, and the vendor's own id for the request (to quote to its support).
KEPT_ANSWER_HEADERS = frozenset({"content-type", "retry-after", "location", "date"})
# A header or query parameter named like this is a credential: never stored, whatever the
# vendor module put there (auth headers are added at send time and never recorded anyway).
SECRET_NAME = re.compile(r"auth|token|key|secret|password|signature|cookie", re.IGNORECASE)
REDACTED = "[redacted]"

# Statuses worth retrying for every vendor; every 5xx is too.
RETRYABLE = frozenset({408, 409, 425, 429})
KEY_STATUSES = frozenset({401, 403})  # the vendor refused the credentials

DELIVERED, PENDING, DEAD = "delivered", "pending", "dead"


# Deciding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    state: str  # delivered | pending (retry) | dead
    error: str | None = None
    retry_after_s: float | None = None  # the vendor named when to come back
    pause_lane: bool = False  # the vendor is throttling this account: hold the whole lane
    status: int | None = None  # the vendor's HTTP status (None: no answer)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RetryPolicy:
    """What a vendor module declares about its answers (``server/vendors/_base.py``)."""

    any_non_2xx: bool = False
    statuses: frozenset[int] = frozenset()
    key_setting: str | None = None  # the config key a 401/403 points at


def retry_policy(vendor: str) -> RetryPolicy:
    module = VENDORS.get(vendor)
    if module is None:
        return RetryPolicy()
    secrets = [s.name for s in module.SETTINGS if s.secret]
    return RetryPolicy(any_non_2xx=bool(getattr(module, "RETRY_ANY_NON_2XX", False)),
                       statuses=frozenset(getattr(module, "RETRY_STATUSES", ())),
                       key_setting=getattr(module, "KEY_SETTING", None) or
                       (secrets[0] if secrets else None))


def classify(vendor: str, status: int, headers: Mapping[str, str], body: str,
             now: float, max_error_chars: int = DEFAULT_MAX_ERROR_CHARS,
             site_id: str | None = None) -> Verdict:
    """What one HTTP answer means for the delivery that drew it."""
    if 200 <= status < 300:
        return Verdict(DELIVERED, status=status)
    policy = retry_policy(vendor)
    error = f"HTTP {status}: {body[:max_error_chars]}".rstrip(": ")
    if status in KEY_STATUSES and policy.key_setting:
        where = f"sites[{site_id or '<site>'}].{vendor}.{policy.key_setting}"
        maybe = ", or a temporary block" if status in policy.statuses else ""
        error = f"key rejected ({status}){maybe}: check {where}; {error}"
    if 300 <= status < 400:
        error = (f"HTTP {status} redirect to {headers.get('location', '')!r} (not followed: "
                 f"check the vendor URL in the config)")
    retry = (policy.any_non_2xx or status >= 500 or status in RETRYABLE
             or status in policy.statuses)
    if not retry:
        return Verdict(DEAD, error, status=status)
    after = retry_after_seconds(headers.get("retry-after"), now)
    pause = status == 429 or (status == 503 and after is not None)
    return Verdict(PENDING, error, after, pause, status)


# Sending --------------------------------------------------------------------------------

class _Lane:
    """One vendor's slots, pause and pacing."""

    def __init__(self, name: str, rate: float | None):
        self.name = name
        self.in_flight = 0
        self.wake = asyncio.Event()
        self.paused_until = 0.0  # time.time()
        self.rate = rate
        self.tokens = max(1.0, rate) if rate else 0.0
        self.refilled = time.monotonic()
        self.store_problem: str | None = None  # why the store refused the last claim

    def allowance(self, want: int) -> int:
        if not self.rate:
            return want
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        return min(want, int(self.tokens))

    def spend(self, used: int) -> None:
        if self.rate:
            self.tokens -= used


class Forwarder:
    """Runs inside ``onetag serve`` (when ``[server] forward``) or ``onetag worker``."""

    def __init__(self, settings: Any, store: Store, options: ForwarderOptions | None = None, *,
                 clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random, metrics: Any = None):
        self.settings = settings
        self.metrics = metrics  # server/metrics.py: each finished attempt is counted there
        self.store = store
        self.options = options or ForwarderOptions()
        self.clock = clock
        self.rng = rng
        self.hold_ms = int(settings.server.hold_days * 86_400_000)
        configured = {name for site in settings.sites.values() for name in site.vendors}
        # A lane for every known vendor: rows of a vendor no site enables any more still get
        # claimed, and dead-lettered with a reason instead of waiting forever.
        self.vendors = sorted(configured | set(VENDORS))
        self.enabled = sorted(configured)  # what the log says it forwards to
        self._transport: KeepAlivePool | None = None
        self._timeouts = self.options.timeout.as_dict()
        self._lanes: dict[str, _Lane] = {}
        self._tasks: list[asyncio.Task] = []
        self._sends: set[asyncio.Task] = set()
        self._outcomes: list[tuple[str, Outcome]] = []
        self._outcomes_ready: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._finisher: asyncio.Task | None = None
        # Where the retention pass's walks (events by seq, sessions by id) go on from.
        self._walks: dict[str, int] = {}
        self.sent = 0  # HTTP requests made so far
        self.finished = 0  # outcomes recorded so far

    # Life cycle -------------------------------------------------------------------------

    def wake(self) -> None:
        """New rows may be due (the app calls this after an ingest): claim now, not at the
        next poll. Cheap and safe to call from the event loop at any rate."""
        for lane in self._lanes.values():
            lane.wake.set()

    async def start(self) -> None:
        opts = self.options
        if self._transport is None:
            slots = opts.concurrency * len(self.vendors)  # every lane's slots: no pool waits
            self._transport = KeepAlivePool(slots, slots, DEFAULT_KEEPALIVE_EXPIRY_S,
                                            proxy=opts.proxy)
        self._stop = asyncio.Event()
        self._outcomes_ready = asyncio.Event()
        self._lanes = {name: _Lane(name, opts.rates.get(name)) for name in self.vendors}
        self._tasks = [asyncio.create_task(self._claim_loop(lane), name=f"onetag-lane-{lane.name}")
                       for lane in self._lanes.values()]
        self._tasks.append(asyncio.create_task(
            self._every(self.options.expire_every_s, self._expire_held,
                        "expiring held deliveries"), name="onetag-expire"))
        self._tasks.append(asyncio.create_task(
            self._every(self.options.prune_every_s, self.prune,
                        "the retention pass"), name="onetag-prune"))
        if opts.product_sync_every_s > 0 and any(product_sync.enabled(site)
                                                 for site in self.settings.sites.values()):
            self._tasks.append(asyncio.create_task(
                self._every(opts.product_sync_every_s, self.sync_products,
                            "planning the product sync"), name="onetag-product-sync"))
        self._finisher = asyncio.create_task(self._finish_loop(), name="onetag-finish")
        log.info("%s", self.started_message())

    def started_message(self) -> str:
        """The start's log line: the vendors a site enables (the other lanes only dead-letter
        what an old config left), not every vendor onetag knows."""
        if not self.enabled:
            return "forwarder started: no site enables a vendor"
        via = ""
        if self.options.proxy:  # said without its credentials
            via = f", through the proxy {self.options.proxy.rsplit('@', 1)[-1]}"
        return (f"forwarder started: {', '.join(self.enabled)}, {self.options.concurrency} in "
                f"flight per vendor{via}")

    async def stop(self) -> None:
        """Stop claiming; give in-flight sends the grace period; record what they got.

        Sends still running after the grace are cancelled: their rows stay leased and are
        due again when the lease ends (the vendor deduplicates the repeat by its key).
        """
        if self._stop is None:
            return
        self._stop.set()
        for lane in self._lanes.values():
            lane.wake.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sends:
            _, late = await asyncio.wait(set(self._sends), timeout=self.options.shutdown_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if late:
                log.warning("%d sends cut short by shutdown; they are due again after the lease",
                            len(late))
        if self._finisher is not None:
            self._outcomes_ready.set()  # type: ignore[union-attr]
            await self._finisher
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None
        self._stop = None

    # Loops ------------------------------------------------------------------------------

    async def _rest(self, lane: _Lane, seconds: float) -> None:
        """Sleep until woken, stopped or ``seconds`` pass."""
        if seconds <= 0 or self._stop.is_set():  # type: ignore[union-attr]
            return
        try:
            await asyncio.wait_for(lane.wake.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _claim_loop(self, lane: _Lane) -> None:
        opts = self.options
        backlog = False  # the last claim was full: more rows are waiting
        while not self._stop.is_set():  # type: ignore[union-attr]
            now = self.clock()
            if lane.paused_until > now:
                lane.wake.clear()
                await self._rest(lane, lane.paused_until - now)
                continue
            free = opts.concurrency - lane.in_flight
            # Under a backlog, claim in batches (a quarter of the slots) rather than one row
            # per finished send: fewer, larger claims keep the writer's queue short.
            if free <= 0 or (backlog and free < max(1, opts.concurrency // 4)):
                lane.wake.clear()
                await self._rest(lane, opts.idle_poll_s)
                continue
            want = lane.allowance(free)
            if want <= 0:
                lane.wake.clear()
                await self._rest(lane, 1.0 / lane.rate)  # type: ignore[operator]
                continue
            lane.wake.clear()
            if await self._paused_elsewhere(lane, now):
                continue
            # The outcomes that piled up go with the claim: one write for both (the claim
            # sees them, so a visitor's next row can come with it).
            carried, self._outcomes = self._outcomes, []
            try:
                rows = await self.store.finish_and_claim(
                    [o for _, o in carried], int(now * 1000), int(opts.lease_s * 1000), want,
                    vendors=(lane.name,))
            except StoreUnavailable as exc:  # the store heals itself: wait, say so once
                self._not_recorded(carried, exc)
                if lane.store_problem != exc.message:
                    lane.store_problem = exc.message
                    log.warning("%s: the store can't be written (%s: %s); forwarding waits",
                                lane.name, exc.kind, exc.message)
                await self._rest(lane, STORE_RETRY_S)
                continue
            except Exception as exc:
                self._not_recorded(carried, exc)
                log.exception("claiming %s deliveries failed; trying again shortly", lane.name)
                await self._rest(lane, opts.idle_poll_s)
                continue
            self._recorded(carried)
            if lane.store_problem is not None:
                log.warning("%s: forwarding resumes", lane.name)
                lane.store_problem = None
            lane.spend(len(rows))
            for delivery in rows:
                lane.in_flight += 1
                task = asyncio.create_task(self._send(lane, delivery))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
            backlog = len(rows) == want
            if not backlog:
                await self._rest(lane, opts.idle_poll_s)

    async def _paused_elsewhere(self, lane: _Lane, now: float) -> bool:
        """Whether another forwarder on this store paused the vendor (``store.paused_until``:
        a 429 it got); the pause becomes this lane's too, and the loop rests it out."""
        try:
            until = await self.store.paused_until(lane.name) / 1000
        except Exception:  # the claim that follows meets the same problem and says so
            return False
        if until <= now:
            return False
        lane.paused_until = max(lane.paused_until, until)
        return True

    async def _every(self, interval_s: float, job: Any, what: str) -> None:
        """``job()`` now and every ``interval_s`` until stopped. A store that can't be
        written is waited out quietly (the claim loops say so); anything else is logged."""
        while not self._stop.is_set():  # type: ignore[union-attr]
            try:
                await job()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("%s failed", what)
            try:
                await asyncio.wait_for(self._stop.wait(),  # type: ignore[union-attr]
                                       timeout=interval_s)
            except asyncio.TimeoutError:
                pass

    async def _expire_held(self) -> None:
        now = int(self.clock() * 1000)
        expired = await self.store.expire_held(now - self.hold_ms, now)
        if expired:
            log.info("%d held deliveries expired (no email within %.3g days)", expired,
                     self.settings.server.hold_days)

    async def sync_products(self) -> dict[str, int]:
        """One pass of the Sendlane product sync at this forwarder's clock; the planned rows
        go out through the Sendlane lane like any delivery."""
        planned = await product_sync.run_once(self.settings, self.store,
                                              int(self.clock() * 1000))
        if planned["changes"] or planned["nightly"]:
            log.info("product sync: %d changed and %d nightly product-added planned",
                     planned["changes"], planned["nightly"], extra={"vendor": product_sync.VENDOR})
            lane = self._lanes.get(product_sync.VENDOR)
            if lane is not None:
                lane.wake.set()
        return planned

    async def prune(self) -> None:
        """The retention pass: delivery attempts and Remarkety coupon calls (which hold
        shoppers' emails) older than ``[server] keep_attempts_days``; then, when ``[server]
        keep_events_days`` is set, finished deliveries, events and sessions older than it
        (``prune_history``); then attempts still without their site and vendor are labelled
        (``label_attempts``)."""
        await self.prune_attempts()
        await self.prune_coupon_calls()
        await self.prune_history()
        await self.label_attempts()

    async def prune_history(self) -> dict[str, int]:
        """One pass of ``[server] keep_events_days`` (server/store/retention.py): finished
        deliveries (with their attempts), then events no delivery row refers to any more,
        then sessions (with their carts), each older than the period, each at most
        ``PRUNE_BATCHES`` batches of ``PRUNE_BATCH`` rows, each batch its own short
        transaction. Events and sessions are walked by primary key from where the last
        batch stopped (kept in this process): a pass goes on from there, and the walk starts
        over once it reached the young rows. Returns how many of each; nothing when off."""
        keep_days = self.settings.server.keep_events_days
        if not keep_days:
            return {}
        before = int(self.clock() * 1000 - keep_days * 86_400_000)
        pruned = {"deliveries": 0, "events": 0, "sessions": 0}
        for _ in range(PRUNE_BATCHES):
            deleted = await self.store.prune_deliveries(before, PRUNE_BATCH)
            pruned["deliveries"] += deleted
            if deleted < PRUNE_BATCH or self._stopping():
                break
        for name, walk in (("events", self.store.prune_events),
                           ("sessions", self.store.prune_sessions)):
            for _ in range(PRUNE_BATCHES):
                deleted, last = await walk(before, self._walks.get(name, 0), PRUNE_BATCH)
                pruned[name] += deleted
                self._walks[name] = last or 0
                if last is None or self._stopping():
                    break
        if any(pruned.values()):
            log.info("%d finished deliveries, %d events and %d sessions older than %g days "
                     "pruned (keep_events_days)", pruned["deliveries"], pruned["events"],
                     pruned["sessions"], keep_days)
        if self.metrics is not None:
            self.metrics.pruned(pruned)
        return pruned

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def prune_attempts(self) -> int:
        """One pass: attempts older than ``[server] keep_attempts_days``, oldest first, in
        batches of ``PRUNE_BATCH``, at most ``PRUNE_BATCHES`` of them; returns how many."""
        return await self._prune(self.store.prune_attempts, "delivery attempts")

    async def prune_coupon_calls(self) -> int:
        """``prune_attempts`` for the coupon calls ``onetag coupons`` lists."""
        return await self._prune(self.store.prune_coupon_calls, "coupon calls")

    async def label_attempts(self) -> int:
        """One pass over the attempts written before they carried their delivery's site and
        vendor (SQLite's migration 013, PostgreSQL's 026), newest first (the Vendors page's
        24 hours are labelled by the first pass): at most ``PRUNE_BATCHES``
        batches of ``PRUNE_BATCH``, each its own short transaction; returns how many were
        labelled. Once none is left, a pass is one look at an empty index."""
        labelled, before = 0, (LATEST, LATEST)
        for _ in range(PRUNE_BATCHES):
            done, last = await self.store.label_attempts(before, PRUNE_BATCH)
            labelled += done
            if last is None or (self._stop is not None and self._stop.is_set()):
                break
            before = last
        if labelled:
            log.info("%d delivery attempts labelled with their site and vendor", labelled)
        return labelled

    async def _prune(self, delete: Any, what: str) -> int:
        keep_days = self.settings.server.keep_attempts_days
        before = int(self.clock() * 1000 - keep_days * 86_400_000)
        pruned = 0
        for _ in range(PRUNE_BATCHES):
            deleted = await delete(before, PRUNE_BATCH)
            pruned += deleted
            if deleted < PRUNE_BATCH or (self._stop is not None and self._stop.is_set()):
                break
        if pruned:
            log.info("%d %s older than %g days pruned", pruned, what, keep_days)
        return pruned

    async def _finish_loop(self) -> None:
        """Write the outcomes no lane's claim carried (``_claim_loop``) within
        ``FINISH_DELAY_S``: under a backlog a lane claims every few milliseconds and takes
        them along; otherwise they are written here, in one batch."""
        assert self._outcomes_ready is not None and self._stop is not None
        while True:
            await self._outcomes_ready.wait()
            self._outcomes_ready.clear()
            if not self._stop.is_set():
                await asyncio.sleep(FINISH_DELAY_S)
            batch, self._outcomes = self._outcomes, []
            if batch:
                try:
                    await self.store.finish([o for _, o in batch], int(self.clock() * 1000))
                except Exception as exc:
                    self._not_recorded(batch, exc)
                else:
                    self._recorded(batch)
            if self._stop.is_set() and not self._sends and not self._outcomes:
                return

    def _recorded(self, batch: list[tuple[str, Outcome]]) -> None:
        self.finished += len(batch)
        # A visitor's next row becomes claimable once this one is finished.
        for vendor in {vendor for vendor, _ in batch}:
            lane = self._lanes.get(vendor)
            if lane is not None:
                lane.wake.set()

    @staticmethod
    def _not_recorded(batch: list[tuple[str, Outcome]], exc: BaseException | None = None
                      ) -> None:
        """Said once per batch; the rows stay leased and are sent again after the lease."""
        if not batch:
            return
        if isinstance(exc, StoreUnavailable):
            log.warning("recording %d delivery outcomes failed (%s: %s); they will be sent "
                        "again after their lease", len(batch), exc.kind, exc.message)
        else:
            log.error("recording %d delivery outcomes failed; they will be sent again after "
                      "their lease", len(batch), exc_info=exc)

    def _record(self, vendor: str, outcome: Outcome) -> None:
        self._outcomes.append((vendor, outcome))
        self._outcomes_ready.set()  # type: ignore[union-attr]

    # One delivery -----------------------------------------------------------------------

    async def _send(self, lane: _Lane, delivery: Delivery) -> None:
        trace = _Trace(self.clock())
        try:
            verdict = await self._attempt(delivery, trace)
        except asyncio.CancelledError:
            raise  # shutdown: the row stays leased
        except Exception as exc:  # a bug, not a vendor problem: retry, and say so
            log.exception("delivery %d to %s failed unexpectedly", delivery.id, delivery.vendor)
            verdict = Verdict(PENDING, f"onetag error: {exc!r}")
            trace.error = verdict.error
        finally:
            lane.in_flight -= 1
            lane.wake.set()
        now = self.clock()
        outcome = self._outcome(delivery, verdict, now, trace.record(delivery, now))
        if verdict.pause_lane and outcome.state == PENDING:
            lane.paused_until = max(lane.paused_until, outcome.next_attempt_ms / 1000)
            try:  # every forwarder on the store holds off, not only this one
                await self.store.pause_vendor(delivery.vendor, outcome.next_attempt_ms)
            except Exception as exc:
                log.warning("%s: the pause until %d could not be shared (%s)", delivery.vendor,
                            outcome.next_attempt_ms, exc)
        self._log(delivery, verdict, outcome, now)
        if self.metrics is not None:
            self.metrics.delivery(delivery.vendor, outcome.state, verdict.status,
                                  None if trace.headers is None else now - trace.started)
        self._record(delivery.vendor, outcome)

    @staticmethod
    def _log(delivery: Delivery, verdict: Verdict, outcome: Outcome, now: float) -> None:
        """Retries, successes after a failure or a replay, and dead letters at info and
        above; a first-time success at debug. Each line names the delivery and the HTTP
        request that planned it (``request_id``)."""
        # A replay starts the retry window after the row was made; so does the pacing of
        # history (`onetag backfill --pace`: a row due, its window starting, after it was
        # written), so for a backfilled row that says nothing of a replay.
        replayed = (delivery.retry_from_ms > delivery.created_ms
                    and not (delivery.request_id or "").startswith("backfill-"))
        extra = {"vendor": delivery.vendor, "delivery_id": delivery.id, "site": delivery.site_id,
                 "attempt": delivery.attempts, "status": verdict.status,
                 "state": outcome.state, "request_id": delivery.request_id}
        if outcome.state == DEAD:
            log.warning("delivery %d to %s is dead: %s", delivery.id, delivery.vendor,
                        outcome.error, extra=extra)
        elif outcome.state == PENDING:
            log.info("delivery %d to %s failed (attempt %d: %s); retrying in %.1f s",
                     delivery.id, delivery.vendor, delivery.attempts, verdict.error,
                     max(0.0, outcome.next_attempt_ms / 1000 - now), extra=extra)
        elif delivery.attempts > 1 or replayed:
            after = f"after {delivery.attempts} attempts" if delivery.attempts > 1 else "first try"
            log.info("delivery %d to %s delivered%s (%s)", delivery.id, delivery.vendor,
                     " after a replay" if replayed else "", after,
                     extra={**extra, "replayed": replayed})
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("delivery %d to %s delivered", delivery.id, delivery.vendor, extra=extra)

    async def _attempt(self, delivery: Delivery, trace: "_Trace") -> Verdict:
        verdict = await self._try(delivery, trace)
        if trace.status is None and trace.error is None:
            trace.error = verdict.error  # not sent, or no answer: say why
        return verdict

    async def _try(self, delivery: Delivery, trace: "_Trace") -> Verdict:
        site = self.settings.sites.get(delivery.site_id)
        cfg = site.vendors.get(delivery.vendor) if site is not None else None
        module = VENDORS.get(delivery.vendor)
        if cfg is None or module is None:
            return Verdict(DEAD, f"site {delivery.site_id!r} has no {delivery.vendor} section in "
                                 f"the config any more; add it back and `onetag replay`")
        try:
            auth = module.auth_headers(cfg)
        except Exception as exc:
            return Verdict(DEAD, f"{delivery.vendor} auth_headers failed: {type(exc).__name__}")
        request = delivery.request
        trace.request = request
        try:
            response = await self._request(request, auth, trace)
            if response.status_code == 404 and request.get("if_not_found"):
                trace.first = (request.get("url"), response.status_code)
                request = request["if_not_found"]
                trace.request = request
                response = await self._request(request, auth, trace)
        except httpx.TimeoutException as exc:
            return Verdict(PENDING, f"timeout: {_describe(exc)}")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            trace.headers = None  # refused before a byte left: the attempt says not sent
            return Verdict(DEAD, f"bad vendor URL {request.get('url')!r}: {_describe(exc)}")
        except httpx.LocalProtocolError as exc:  # a header no retry would mend: not sent
            trace.headers = None
            return Verdict(DEAD, f"not sent, a header HTTP cannot carry ({_describe(exc)}): "
                                 f"check sites[{delivery.site_id}].{delivery.vendor}'s keys, "
                                 f"then `onetag replay`")
        except httpx.TransportError as exc:
            return Verdict(PENDING, _describe(exc))
        text = response.content.decode(_text_encoding(response.headers.get("content-type")),
                                       errors="replace")
        trace.answer(response, text)
        return classify(delivery.vendor, response.status_code, response.headers,
                        text, self.clock(), site_id=delivery.site_id)

    async def _request(self, request: Mapping[str, Any], auth: Mapping[str, str],
                       trace: "_Trace | None" = None) -> Answer:
        body = request.get("json")
        content = None
        if body is None:
            headers = _BASE_HEADERS.copy()
        else:
            headers = _JSON_HEADERS.copy()
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        for name, value in (request.get("headers") or {}).items():
            headers[name.lower()] = (name, value)
        if trace is not None:  # what was sent, before the credentials go in
            trace.headers = {key: value for key, (_, value) in headers.items()}
        for name, value in auth.items():
            headers[name.lower()] = (name, value)
        self.sent += 1
        return await self._transport.send(  # type: ignore[union-attr]
            request.get("method", "POST"), request["url"], headers.values(), content,
            self._timeouts)

    def _outcome(self, delivery: Delivery, verdict: Verdict, now: float,
                 attempt: Attempt | None = None) -> Outcome:
        """What becomes of ``delivery`` after ``verdict``; it answers the delivery's claim
        (``lease``: a lease taken over since makes it late)."""
        state, next_ms, error = self._next_state(delivery, verdict, now)
        return Outcome(delivery.id, state, next_ms, error, attempt, delivery.lease)

    def _next_state(self, delivery: Delivery, verdict: Verdict, now: float
                    ) -> tuple[str, int, str | None]:
        """(state, next attempt in ms, error): the verdict's own, or for a retry its time
        (backoff or the vendor's Retry-After), dead once attempts or the window run out."""
        if verdict.state != PENDING:
            return verdict.state, 0, verdict.error
        opts = self.options
        if verdict.retry_after_s is not None:
            # Never before the vendor's time; a little jitter after it spreads the returns.
            delay = verdict.retry_after_s + self.rng() * min(1.0, 0.1 * verdict.retry_after_s)
        else:
            step = min(opts.backoff_cap_s, opts.backoff_base_s * 2 ** (delivery.attempts - 1))
            delay = step / 2 + self.rng() * step / 2  # "equal jitter": never a hot retry loop
        next_ms = int((now + delay) * 1000)
        if delivery.attempts >= opts.max_attempts:
            return DEAD, 0, f"gave up after {delivery.attempts} attempts; last: {verdict.error}"
        window_end = (delivery.retry_from_ms or delivery.created_ms) + opts.retry_window_s * 1000
        if next_ms > window_end:
            return DEAD, 0, (f"retry window of {opts.retry_window_s / 3600:g} h passed after "
                             f"{delivery.attempts} attempts; last: {verdict.error}")
        return PENDING, next_ms, verdict.error


class _Trace:
    """What one attempt sent and got, gathered while it runs; ``record`` makes it the
    ``Attempt`` the store keeps. Cheap: a few references per send; the JSON encoding happens
    in the store's writer."""

    __slots__ = ("started", "request", "headers", "first", "status", "answer_", "error")

    def __init__(self, started: float):
        self.started = started
        self.request: Mapping[str, Any] | None = None
        self.headers: dict[str, str] | None = None  # as sent, lower-case names
        self.first: tuple[Any, int] | None = None  # (url, status) before an if_not_found
        self.status: int | None = None
        self.answer_: dict[str, Any] | None = None
        self.error: str | None = None

    def answer(self, response: Answer, text: str) -> None:
        self.status = response.status_code
        kept = {name: value for name, value in response.headers.items() if _kept_answer(name)}
        cut = len(text) > ANSWER_BODY_LIMIT or response.truncated
        self.answer_ = {"headers": kept, "body": text[:ANSWER_BODY_LIMIT], "truncated": cut}
        if cut:  # the whole length, or (the client cut it too) at least what was read
            self.answer_["length"] = len(text)
            if response.truncated:
                self.answer_["length_known"] = False

    def record(self, delivery: Delivery, now: float) -> Attempt:
        request = self.request or delivery.request
        sent: dict[str, Any] = {"method": request.get("method", "POST"),
                                "url": redact_url(str(request.get("url", ""))),
                                "headers": redact_headers(self.headers if self.headers is not None
                                                          else request.get("headers") or {})}
        # The body is the delivery row's own request (or its if_not_found): the row keeps
        # it, so an attempt names it rather than storing a copy per try; the store's
        # ``attempts`` read puts it back.
        sent["body_of"] = "if_not_found" if self.first is not None else "request"
        if self.first is not None:
            sent["after"] = {"url": redact_url(str(self.first[0])), "status": self.first[1]}
        if self.headers is None and self.status is None:
            sent["sent"] = False  # refused before any byte left (no config, bad URL)
        return Attempt(delivery.attempts, int(self.started * 1000),
                       max(0, int((now - self.started) * 1000)), sent, self.status,
                       self.answer_, self.error)


@functools.lru_cache(maxsize=256)  # a vendor answers with one or two Content-Types
def _text_encoding(content_type: str | None) -> str:
    """The encoding httpx reads an answer's text in for this Content-Type (its charset if
    Python knows it, else UTF-8), worked out once by httpx itself: httpx parses the header
    with ``email.message`` on every answer, 2 % of a delivery's CPU."""
    headers = {} if content_type is None else {"content-type": content_type}
    return httpx.Response(200, headers=headers).encoding or "utf-8"


@functools.lru_cache(maxsize=256)
def _kept_answer(name: str) -> bool:
    return ((name in KEPT_ANSWER_HEADERS or "request-id" in name or "trace-id" in name)
            and not SECRET_NAME.search(name))


@functools.lru_cache(maxsize=256)
def _secret(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: REDACTED if _secret(name) else value for name, value in headers.items()}


@functools.lru_cache(maxsize=1024)  # a vendor's few URLs, over and over
def redact_url(url: str) -> str:
    """The URL with the values of credential-like query parameters replaced."""
    if "?" not in url:
        return url
    try:
        parsed = httpx.URL(url)
    except Exception:
        return url.split("?", 1)[0] + "?" + REDACTED
    params = [(name, REDACTED if SECRET_NAME.search(name) else value)
              for name, value in parsed.params.multi_items()]
    return str(parsed.copy_with(params=params))


def _describe(exc: BaseException) -> str:
    name, text = type(exc).__name__, str(exc)
    return name if not text or text == name else f"{name}: {text}"


async def run_until(stop: asyncio.Event, settings: Any, store: Store,
                    options: ForwarderOptions | None = None) -> Forwarder:
    """Run a forwarder until ``stop`` is set (``onetag worker``)."""
    forwarder = Forwarder(settings, store, options)
    await forwarder.start()
    try:
        await stop.wait()
    finally:
        await forwarder.stop()
    return forwarder
