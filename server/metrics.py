"""``GET /metrics``: what the server is doing, in Prometheus' text format.

One ``Metrics`` per app (its own ``CollectorRegistry``: tests build many apps in one
process, and the global registry would mix them). The handlers call it with what they
already know: ``received`` and ``rejected`` from ``server/ingest.py``,
``committed`` from the store's writer replies (so a writer process's commits are counted
here, where the registry lives), ``delivery`` from the forwarder. Each is a dictionary
lookup and an increment or a histogram observation: ``POST /e`` pays ~2 µs.

What the database knows (the outbox's rows per vendor and state, the oldest pending row's
age) is read when scraped, by ``StoreCollector``, at most once per ``CACHE_S`` whatever
the number of scrapers; and the writer's restarts are the store's own count.

Label values are bounded: sites are the configured ones, event names outside the
vocabulary count as ``custom``, a refusal's reason is one of ``REASONS`` (else ``other``),
vendors are onetag's four, a status is its class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .admin.auth import Guess, client_address, shared_throttle
from .events import STANDARD
from .vendors import VENDORS

log = logging.getLogger("onetag.metrics")

CACHE_S = 2.0  # scrape-time figures are read from the database at most this often
# Why a request was refused: a Problem's ``error`` (server/envelope.py, server/ingest.py);
# a 503 is ``unavailable_`` and what was unavailable (its ``field``).
REASONS = frozenset({
    "invalid_json", "invalid_event", "too_large", "unknown_site", "origin_not_allowed",
    "unsupported_media_type", "timeout", "unauthorized", "forbidden", "too_many_requests",
    "internal_error", "unavailable_writer", "unavailable_disk", "unavailable_database", "unavailable_queue"})
# The outbox states worth a gauge: the rows still to send and the dead letters. The
# terminal ones (delivered, browser, expired, ignored) only grow: see the counters.
OUTBOX_STATES = ("pending", "held", "dead")
RETENTION_KINDS = ("deliveries", "events", "sessions")  # Forwarder.prune_history's counts
# Seconds. Ingest answers in ms (p50 ~15 ms under load); vendors in 50 ms to the 15 s timeout.
INGEST_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
VENDOR_BUCKETS = (.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 15, 30)
# Jobs a writer transaction holds: up to TRANSACTION_JOBS (16) in the writer process, up to
# a frame of 256 with the thread writer.
COMMIT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256)


def status_class(status: int | None) -> str:
    """``2xx`` .. ``5xx``; ``none`` for no HTTP answer (timeout, refused, not sent)."""
    return "none" if status is None else f"{status // 100}xx"


class Metrics:
    """The registry, the metrics, and the ``/metrics`` endpoint of one app."""

    def __init__(self, settings: Any, store: Any = None, *, cache_s: float = CACHE_S):
        server = settings.server
        self.admin_token: str | None = server.admin_token or None
        self.public = server.metrics_public
        # The admin token guessed here is bounded with the console's login, one bound for
        # the one secret: wrong ones are answered late, and an address with too many is
        # refused for a while (every node's guesses counted together).
        self.throttle = shared_throttle(store, "admin_token")
        self.sites = frozenset(settings.sites)
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.events = Counter(
            "onetag_events_received", "Events in requests answered 2xx (duplicates included), "
            "by site, source (browser: POST /e; backend: the site API) and event name "
            "(names outside the vocabulary count as custom).",
            ["site", "source", "name"], registry=registry)
        self.rejections = Counter(
            "onetag_requests_rejected", "Ingest requests refused (4xx, 503, 500), by source "
            "and reason: the answer's error, or unavailable_<what> for a 503.",
            ["source", "reason"], registry=registry)
        self.latency = Histogram(
            "onetag_ingest_duration_seconds", "Ingest requests answered 2xx: from the request "
            "reaching its handler to the answer after the commit.",
            ["source"], buckets=INGEST_BUCKETS, registry=registry)
        self.commits = Histogram(
            "onetag_writer_transaction_jobs", "Jobs (ingest requests, forwarder claims and "
            "outcomes, health checks) per committed writer transaction: the group commit size.",
            buckets=COMMIT_BUCKETS, registry=registry)
        self.deliveries = Counter(
            "onetag_deliveries", "Delivery attempts the forwarder finished, by vendor, the "
            "state the attempt left the row in (delivered, pending: retried later, dead) and "
            "the vendor's status class (none: no HTTP answer).",
            ["vendor", "state", "status_class"], registry=registry)
        self.vendor_latency = Histogram(
            "onetag_vendor_request_duration_seconds", "Delivery attempts sent to a vendor: "
            "from the send to its answer or error.",
            ["vendor"], buckets=VENDOR_BUCKETS, registry=registry)
        self.retention = Counter(
            "onetag_retention_pruned", "Rows the retention pass ([server] keep_events_days) "
            "deleted in this process, by kind: deliveries (finished, with their attempts), "
            "events, sessions.", ["kind"], registry=registry)
        for kind in RETENTION_KINDS:
            self.retention.labels(kind)  # 0 from the start: a rate needs a first sample
        # Children by label values: .labels() takes a lock and checks its arguments each call.
        self._events: dict[tuple[str, str, str], Any] = {}
        self._latency = {source: self.latency.labels(source) for source in ("browser", "backend")}
        self.store_collector = StoreCollector(settings, store, cache_s)
        registry.register(self.store_collector)

    # Hooks (hot paths: a lookup and an increment) ----------------------------------------

    def received(self, site: str, source: str, names: Iterable[str], seconds: float) -> None:
        """A request answered 2xx: its events, and how long it took."""
        children = self._events
        for name in names:
            child = children.get((site, source, name))
            if child is None:
                child = self._event_child(site, source, name)
            child.inc()
        self._latency[source].observe(seconds)

    def _event_child(self, site: str, source: str, name: str) -> Any:
        label = name if name in STANDARD else "custom"
        child = self.events.labels(site if site in self.sites else "other", source, label)
        if label == name:  # a custom name is not cached: there may be any number of them
            self._events[(site, source, name)] = child
        return child

    def rejected(self, source: str, error: str, field: str = "") -> None:
        reason = f"unavailable_{field}" if error == "unavailable" else error
        self.rejections.labels(source, reason if reason in REASONS else "other").inc()

    def pruned(self, counts: Mapping[str, int]) -> None:
        """One retention pass's deleted rows by kind (``Forwarder.prune_history``)."""
        for kind, rows in counts.items():
            if kind in RETENTION_KINDS and rows:
                self.retention.labels(kind).inc(rows)

    def committed(self, jobs: int) -> None:
        self.commits.observe(jobs)

    def delivery(self, vendor: str, state: str, status: int | None,
                 seconds: float | None) -> None:
        """One finished attempt; ``seconds`` None when nothing was sent."""
        vendor = vendor if vendor in VENDORS else "other"
        self.deliveries.labels(vendor, state, status_class(status)).inc()
        if seconds is not None:
            self.vendor_latency.labels(vendor).observe(seconds)

    # The endpoint ---------------------------------------------------------------------------

    async def _refusal(self, request: Request) -> Response | None:
        """None if this request may read the metrics; else its 401/404/429. A request
        with a wrong Authorization counts as a guess (``SharedThrottle``); one without is
        just refused."""
        if self.public:
            return None
        if not self.admin_token:
            return _problem(404, "not_found", "metrics", "is off: set [server] admin_token and "
                            "scrape with \"Authorization: Bearer <admin_token>\", or set "
                            "[server] metrics_public = true")
        given = request.headers.get("authorization")
        scheme, _, token = (given or "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
        # a wrong Authorization is a guess, bounded; none at all is just refused
        guess = (await self.throttle.check(client_address(request), bearer, self.admin_token)
                 if given else Guess(0, False))
        if guess.wait:
            return _problem(429, "too_many_requests", "authorization",
                            f"too many wrong tokens from your address; try again in "
                            f"{guess.wait} s", {"Retry-After": str(guess.wait)})
        if not guess.right:
            return _problem(401, "unauthorized", "authorization",
                            "send \"Authorization: Bearer <[server] admin_token>\"",
                            {"WWW-Authenticate": 'Bearer realm="onetag metrics"'})
        # A right token clears nothing here: a scraper posting it every few seconds would
        # reset the count of a guesser sharing its address.
        return None

    async def endpoint(self, request: Request) -> Response:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        await self.store_collector.refresh()
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})


def _problem(status: int, error: str, field: str, problem: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """The shape of every refusal onetag answers (``ingest.HTTPProblem``'s; not imported
    from there, since ``ingest`` imports this module)."""
    return JSONResponse({"error": error, "message": f"{field}: {problem}",
                         "errors": [{"field": field, "problem": problem}]},
                        status_code=status, headers={"Cache-Control": "no-store",
                                                     **(headers or {})})


class StoreCollector:
    """The figures read from the store when scraped: outbox rows per vendor and state, the
    oldest pending row's age per vendor, the writer's restarts.

    ``collect`` is synchronous (``generate_latest`` calls it) and the store's reads are
    not, so the endpoint first awaits ``refresh``, which reads the database only when the
    last read is older than ``cache_s`` and lets concurrent scrapes share one read."""

    def __init__(self, settings: Any, store: Any, cache_s: float = CACHE_S):
        self.store = store
        self.cache_s = cache_s
        self.vendors = sorted({v for site in settings.sites.values() for v in site.vendors})
        self.depth: list[tuple[str, str, int]] = []  # (vendor, state, rows)
        self.oldest: dict[str, float] = {}  # vendor: seconds
        self.read_ok = False
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()
        self.reads = 0  # database reads so far (the tests check the cache with it)

    async def refresh(self) -> None:
        if self.store is None or not hasattr(self.store, "outbox_depth"):
            return
        async with self._lock:
            if time.monotonic() - self._read_at < self.cache_s:
                return
            try:
                depth, oldest = await self.store.outbox_depth(int(time.time() * 1000))
            except Exception as exc:  # the scrape still answers, saying the read failed
                if self.read_ok or self.reads == 0:
                    log.warning("reading the outbox for /metrics failed: %s: %s",
                                type(exc).__name__, exc)
                self.read_ok = False
            else:
                self.depth, self.oldest, self.read_ok = depth, oldest, True
            self.reads += 1
            self._read_at = time.monotonic()

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        return list(self._families())

    def _families(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "onetag_outbox_deliveries", "Delivery rows waiting (pending: due or retrying; held: "
            "waiting for the visitor's email or session) or dead, by vendor and state; read from the "
            f"database when scraped (at most every {self.cache_s:g} s).",
            labels=["vendor", "state"])
        oldest = GaugeMetricFamily(
            "onetag_outbox_oldest_pending_age_seconds", "Age of the oldest pending delivery "
            "row per vendor (0: none pending).", labels=["vendor"])
        found = {(vendor, state): rows for vendor, state, rows in self.depth}
        vendors = sorted(set(self.vendors) | {vendor for vendor, _ in found}
                         | set(self.oldest))
        if self.read_ok:
            for vendor in vendors:
                for state in OUTBOX_STATES:
                    depth.add_metric([vendor, state], found.get((vendor, state), 0))
                oldest.add_metric([vendor], self.oldest.get(vendor, 0.0))
        yield depth
        yield oldest
        yield GaugeMetricFamily(
            "onetag_outbox_read_ok", "1 if the last read of the outbox for /metrics worked.",
            value=1 if self.read_ok else 0)
        yield CounterMetricFamily(
            "onetag_writer_restarts", "Writers started to replace one that died or hung.",
            value=getattr(self.store, "restarts", 0))
