"""The storage interface every backend implements.

Writes are few and shaped by the product, not by tables: ``ingest`` is the whole of what
accepting a batch of events means (event rows, session, identity, cart, delivery rows) and
must be atomic and durable before it returns; the delivery calls are what the forwarder
and the operator CLI need.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from ..envelope import BrowserFacts, Problem, read_browser_body


class IngestResult(NamedTuple):
    """One per event of an ingest call, in order. A tuple: made by the thousand a second."""

    event_id: str
    seq: int
    duplicate: bool  # already stored by an earlier request: accepted, not stored again


class BrowserIngested(NamedTuple):
    """What ``ingest_browser`` stored: the visitor's ``sc`` (for the cookie) and the results;
    the body's site and event names, which only the store read (``/metrics`` counts them)."""

    sc: str
    results: list[IngestResult]
    site_id: str = ""
    names: tuple[str, ...] = ()


class JobFailure(NamedTuple):
    """A write the store could not make for a reason that is not the request's own: the
    writer died or hung, the disk is full, the database can't be written. It crosses the
    writer's pipe as this plain tuple (never a pickled exception) and is answered 503."""

    kind: str  # "writer" | "disk" | "database" | "queue"
    message: str


class StoreUnavailable(Exception):
    """Raised to the caller of a write that was not made (and will not be): answer 503 with
    ``Retry-After``, the client's retry finds the store again (event ids make it idempotent)."""

    def __init__(self, kind: str, message: str, retry_after_s: int = 1):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SessionInfo:
    """What the endpoint knows of the visitor beyond the events themselves."""

    user_agent: str | None = None


@dataclass(frozen=True)
class Delivery:
    id: int
    site_id: str
    vendor: str
    dedup_key: str
    visitor: str
    request: dict[str, Any]
    attempts: int  # including the one this claim starts
    created_ms: int
    retry_from_ms: int = 0  # the retry window starts here: planned, or last replayed
    request_id: str | None = None  # of the HTTP request that planned it (server/logs.py)


class Attempt(NamedTuple):
    """One HTTP attempt of a delivery, as the ``attempts`` table keeps it: the request as
    sent minus its secrets (the vendor's auth headers are never in it), and the vendor's
    answer (status, headers worth keeping, body up to a limit) or the transport error."""

    attempt: int  # the delivery's attempt number (1 = first try)
    started_ms: int
    duration_ms: int
    request: dict[str, Any]  # method, url, headers, body
    status: int | None = None  # None: no HTTP answer (timeout, reset, not sent)
    answer: dict[str, Any] | None = None  # headers, body, truncated
    error: str | None = None  # the transport error, or why it was not sent


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed delivery."""

    id: int
    state: str  # delivered | pending (retry at next_attempt_ms) | dead
    next_attempt_ms: int = 0
    error: str | None = None
    attempt: Attempt | None = None  # kept in the attempts table beside the row's new state


class Store(abc.ABC):
    sites: Mapping[str, Any]  # the configured sites, by id

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self, grace_s: float = 10) -> None: ...

    @abc.abstractmethod
    async def ping(self, timeout_s: float = 2.0) -> int | None:
        """A committed write through the writer within ``timeout_s``: the writer's pid (None
        in-process); ``StoreUnavailable`` naming the problem otherwise."""

    @abc.abstractmethod
    async def ingest(self, site_id: str, events: Sequence[dict[str, Any]],
                     raws: Sequence[Any], session: SessionInfo,
                     request_id: str | None = None) -> list[IngestResult] | Problem:
        """Store normalised events durably, in one transaction, with everything they imply;
        or the ``Problem`` (4xx) that refused them, having stored nothing. ``request_id``:
        the HTTP request's, recorded on the deliveries planned and in the store's log."""

    async def ingest_browser(self, data: bytes, facts: BrowserFacts,
                             request_id: str | None = None) -> BrowserIngested | Problem:
        """A browser's body as received: read (``envelope.read_browser_body``), then ingested.

        One call, so that a backend can read the body where it stores it, off the event
        loop (the SQLite writer does). This default reads it here.
        """
        batch = read_browser_body(data, facts, self.sites)
        if isinstance(batch, Problem):
            return batch
        results = await self.ingest(batch.site_id, batch.events, batch.raws,
                                    SessionInfo(user_agent=facts.user_agent), request_id)
        if isinstance(results, Problem):
            return results
        return BrowserIngested(batch.sc, results, batch.site_id,
                               tuple(event["name"] for event in batch.events))

    @abc.abstractmethod
    async def session_view(self, site_id: str, sc: str, limit: int = 50) -> dict[str, Any]:
        """A visitor's identity, cart and latest events (the demo's panel)."""

    # The outbox -------------------------------------------------------------------------

    # The catalog (server/catalog.py): the feeds read it, the product sync plans from it.
    async def catalog_state(self, site_id: str) -> tuple[int, int, int]:
        raise NotImplementedError

    async def catalog_page(self, site_id: str, after: str | None,
                           limit: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def catalog_sites(self) -> list[str]:
        raise NotImplementedError

    async def plan_product_sync(self, site_id: str, now_ms: int, night: str | None,
                                limit: int) -> dict[str, Any]:
        raise NotImplementedError

    @abc.abstractmethod
    async def claim(self, now_ms: int, lease_ms: int, limit: int,
                    vendors: Iterable[str] | None = None) -> list[Delivery]:
        """Take due deliveries, due longest ago first, at most one in flight per (vendor, visitor).

        A claimed row is leased: if the process dies, it is due again when the lease ends.
        """

    @abc.abstractmethod
    async def finish(self, outcomes: Sequence[Outcome], now_ms: int) -> None: ...

    async def prune_attempts(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` attempts started before ``before_ms``; returns how many."""
        raise NotImplementedError

    async def attempts(self, delivery_id: int) -> list[dict[str, Any]]:
        """A delivery's attempts, first first (read-only)."""
        raise NotImplementedError

    async def record_coupon_call(self, call: Mapping[str, Any]) -> int:
        """Keep one call of the Remarkety Coupons bridge (``coupon_calls``); returns its id."""
        raise NotImplementedError

    async def coupon_calls(self, *, site_id: str | None = None, limit: int = 20
                           ) -> list[dict[str, Any]]:
        """The latest coupon calls first (read-only), of one site or all."""
        raise NotImplementedError

    @abc.abstractmethod
    async def expire_held(self, before_ms: int, now_ms: int) -> int:
        """Held rows older than the hold window stop waiting; returns how many."""

    @abc.abstractmethod
    async def delivery_stats(self, now_ms: int) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def replay(self, now_ms: int, *, vendor: str | None = None, since_ms: int | None = None,
                     states: Sequence[str] = ("dead",)) -> int:
        """Make matching deliveries due again; returns how many."""

    @abc.abstractmethod
    async def replay_rows(self, now_ms: int, *, vendor: str | None = None,
                          since_ms: int | None = None, states: Sequence[str] = ("dead",),
                          ids: Sequence[int] | None = None, dry_run: bool = False,
                          site_id: str | None = None, until_ms: int | None = None,
                          error: str | None = None, time_field: str = "created"
                          ) -> list[dict[str, Any]]:
        """``replay``, naming the rows made due (id, site_id, vendor, dedup_key, from_state,
        replaces); ``dry_run`` changes nothing and names exactly what the same call would.
        The rows are those ``deadletters.where`` selects (``store/deadletters.py``)."""

    async def replay_preview(self, now_ms: int, selection: Any) -> tuple[int, str]:
        """A dry run's (count, ``deadletters.fingerprint``) for a ``ReplayFilter``."""
        raise NotImplementedError

    async def replay_recorded(self, now_ms: int, selection: Any, who: str,
                              expect: str | None = None, shown: int | None = None
                              ) -> dict[str, Any]:
        """Replay a ``ReplayFilter``'s set and record it, unless it is no longer the set
        whose fingerprint is ``expect``: ``{changed, rows, replay_id, fingerprint}``."""
        raise NotImplementedError

    async def record_replay(self, now_ms: int, who: str, scope: Mapping[str, Any],
                            rows: Sequence[Mapping[str, Any]], shown: int | None = None) -> int:
        """Record a replay made by ``replay_rows`` elsewhere; the record's id."""
        raise NotImplementedError

    # Backfill (server/backfill.py) --------------------------------------------------------

    async def backfill_run(self, site_id: str, files: str, files_hash: str,
                           lines_total: int) -> tuple[int, int, str]:
        """The unfinished backfill run over these files (``files_hash``), to resume, else a
        new one: (run id, lines done, counts as JSON text)."""
        raise NotImplementedError

    async def backfill(self, site_id: str, run_id: int, events: list[tuple[Any, ...]],
                       skipped: dict[str, dict[str, int]], lines_done: int, finished: bool,
                       pace_ms: int = 0) -> tuple[dict[str, int], dict[str, int], int]:
        """One batch of history, atomically with the run's progress and counts: event rows
        (source ``backend``; an id already stored is skipped) and pending deliveries, none
        whose (site, vendor, dedup key) any row holds, a vendor's falling due ``pace_ms``
        apart. Returns (planned per vendor, already there per vendor, events already
        stored)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def list_deliveries(self, *, state: str | None = None, vendor: str | None = None,
                              limit: int = 50, ids: Sequence[int] | None = None
                              ) -> list[dict[str, Any]]:
        """Latest rows first. ``state="failing"``: pending after a failed attempt. A pending
        row carries ``waits_for``: the id of the visitor's earliest pending row for the same
        vendor, which goes first (one in flight per visitor), else None."""
