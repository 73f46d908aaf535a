"""The storage interface every backend implements, and what each must guarantee.

Writes are few and shaped by the product, not by tables: ``ingest`` is the whole of what
accepting a batch of events means (event rows, session, identity, cart, delivery rows) and
must be atomic and durable before it returns; the delivery calls are what the forwarder
and the operator CLI need. Two backends: SQLite (``sqlite.py``: one writer, group commit)
and PostgreSQL (``postgres.py``: any number of nodes on one database).

The contract (tests/test_store.py runs it against both):

- Durable before answered: ``ingest`` returns only after the commit that stored the events
  (SQLite ``synchronous=FULL``, PostgreSQL ``synchronous_commit = on``), and either all of
  a request's rows are stored or none (a ``Problem``, or ``StoreUnavailable`` with nothing
  stored: the client's retry is safe, event ids make it idempotent).
- Idempotent by event id: an id is unique per (site, id, backend-or-not); an id stored
  before answers ``duplicate=True`` with the stored seq and changes nothing at all (no
  session, identity, cart or delivery effect).
- The same rules, applied in event order within a request and in commit order across
  requests: identity matching and session binding (``rules.identity_step``,
  ``match_identity``, ``merge_identity``, ``keep_customer_id``, ``bind_session``), the cart
  and its GUID (``rules.cart_step``, bounded by ``rules.check_cart``), delivery planning
  (``outbox.plan``), a browser claim meeting a backend fact under one key
  (``rules.claim_taken``, ``waiting_fact_superseded``, ``fact_meets_claim``: a claim never
  overwrites a fact), held rows released when the session gets an email
  (``rules.held_release``, ``released_event``) or dropped when it switches identity.
- No lost update: two writers (threads, processes or nodes) applying events of one visitor
  or one identity at once leave the session, cart and identity as if the events had been
  applied one after the other (PostgreSQL: row locks in a fixed order, a transaction that
  loses a race run again).
- Deliveries unique per (site, vendor, dedup key, claim): planning the same fact twice
  stores one row.
- A status change (order_status, refund) is planned with the order as onetag reported it:
  before planning, the rows under the keys ``rules.orders_wanted`` names for the batch's
  status changes are read in the same transaction, in one set-based read a batch (not one
  an event) that probes the unique key, into ``rules.KnownOrders``, which also takes each
  row the batch plans (``KnownOrders.planned``); ``outbox.plan(..., orders=...)`` hands
  each adapter its order (``PlanContext.order``). The same on every re-planning (held rows
  released, expired rows replayed). With several writers, a purchase being committed
  elsewhere is waited for (PostgreSQL: the key's advisory lock), not missed.
- Bounded: more than a backend's queue bound of writes waiting is refused with
  ``StoreUnavailable("queue")``, never buffered without limit.
- No HTTP here: the store reads a browser body with ``envelope.read_browser_body`` (pure:
  bytes and facts in, a batch or a ``Problem`` out; it imports no web framework), so a
  backend may read it wherever it stores it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

from ..envelope import BrowserFacts, Problem, read_browser_body

if TYPE_CHECKING:
    from .console_reads import ConsoleReads


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


class SchemaNotCurrent(Exception):
    """The database lacks migrations this onetag needs (or has ones it does not know)."""


def newer_schema(names: Sequence[str]) -> str:
    """What onetag says of a database a newer onetag migrated (docs/postgresql.md, "Upgrading")."""
    return (f"the database has migrations this onetag does not know ({', '.join(names)}): "
            "a newer onetag migrated it; run this node on that release")


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
    lease: int = 0  # names this claim (PostgreSQL: a claim token); 0 where a backend has none


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
    # The claim it answers (``Delivery.lease``): a backend with several workers ignores an
    # outcome whose lease another worker has since taken over (the late-outcome guard).
    lease: int = 0


class Store(abc.ABC):
    sites: Mapping[str, Any]  # the configured sites, by id

    @abc.abstractmethod
    async def open(self) -> None:
        """Ready to write: SQLite migrates its file; PostgreSQL checks that the schema is
        current and raises ``pg_migrate.SchemaNotCurrent`` if not (``onetag migrate``)."""

    @abc.abstractmethod
    async def close(self, grace_s: float = 10) -> None:
        """Writes already being committed finish (within ``grace_s``) and are answered;
        writes not started fail with ``StoreUnavailable``."""

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
        the HTTP request's, recorded on the deliveries planned and in the store's log.

        ``events`` are ``events.normalise_batch``'s output and are changed in place (each
        gets its ``identity``, its ``cart`` for cart events, and a browser event of a
        verified session the source ``verified browser``): what is stored as the event's
        ``data`` and what the vendors' requests are built from. A request's rows may be
        committed together with other requests' (group commit), never split across
        commits. Refusals: a cart over ``rules.check_cart``'s bounds (422), a request that
        would store more than 16 MiB (413)."""

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
        """A visitor's identity, cart and latest events (the demo's panel), read-only:
        ``{sc, session (its row, without the cart columns) or None, identity (fields and
        id) or None, cart (``sessions.cart_snapshot``) or None, events (latest first, at
        most ``limit``), deliveries (of those events: vendor, state, dedup_key, attempts,
        last_error, name)}``."""

    # A shopper's data (store/person.py: GDPR access and erasure) -------------------------

    async def person(self, who: Any) -> Any:
        """Everything held about one person (``person.Selector``), read-only, as a
        ``person.Person`` (``person.gather``'s rows)."""
        raise NotImplementedError

    async def forget_person(self, who: Any, dry_run: bool = True) -> dict[str, Any]:
        """Erase one person (``person.erase``: deleted, or kept anonymous where a vendor
        has the data) in one transaction, and answer ``person.forget_report``;
        ``dry_run`` changes nothing and counts what would change. Idempotent: a second
        run finds nothing (``found`` false)."""
        raise NotImplementedError

    def console(self) -> "ConsoleReads":
        """The operator console's read-only queries on this backend (``server/admin/`` asks
        nothing else of the database). ``console_reads.ConsoleReads`` says what a backend
        provides: a way to run a query, to read a field of stored JSON text, to bind a
        list, and whether Live must look again for rows committed after higher seqs. The
        queries (bounded, indexed) and their rows' shape are shared by every backend.
        ``StoreUnavailable`` while the store is not open."""
        raise NotImplementedError

    # The console's logouts (server/admin/login.py) ---------------------------------------

    async def revoke_session(self, nonce: str, expires_ms: int, now_ms: int) -> None:
        """Keep a logged-out console session's ``nonce`` until ``expires_ms`` (its cookie's
        expiry) in the database, durably, so every process and node on it refuses that
        cookie, restarts included; rows past their expiry are pruned meanwhile."""
        raise NotImplementedError

    async def session_revoked(self, nonce: str) -> bool:
        """Whether a console session was logged out (``revoke_session``): one read by
        primary key, made only for a cookie whose signature is right."""
        raise NotImplementedError

    # Wrong guesses of a secret (server/admin/auth.py, ``SharedThrottle``) ----------------

    async def guess_failed(self, scope: str, address: str, now_ms: int, window_ms: int,
                           earlier_ms: Sequence[int] = ()) -> list[int]:
        """Keep a wrong guess of ``scope``'s secret from ``address`` at ``now_ms`` (and the
        ones at ``earlier_ms`` this process had not written yet), durably, prune the
        scope's guesses older than ``window_ms``, and answer the times of the address's
        guesses within it (every node's), oldest first. A write that may be refused
        (``StoreUnavailable``) rather than take room events need: SQLite's queue gives it
        none of ``max_pending_writes``, and refuses it while events wait."""
        raise NotImplementedError

    async def guess_failures(self, scope: str, address: str, since_ms: int) -> list[int]:
        """The times of ``address``'s wrong guesses of ``scope``'s secret after
        ``since_ms``, oldest first (every node's): one indexed read."""
        raise NotImplementedError

    async def guesses_cleared(self, scope: str, address: str) -> None:
        """Forget ``address``'s wrong guesses of ``scope``'s secret (it gave the right one)."""
        raise NotImplementedError

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

    async def finish_and_claim(self, outcomes: Sequence[Outcome], now_ms: int, lease_ms: int,
                               limit: int, vendors: Iterable[str] | None = None
                               ) -> list[Delivery]:
        """``finish(outcomes)``, then ``claim``: the claim sees the outcomes (a visitor's
        next row is claimable once its row before is finished). A backend may do both in
        one round trip and transaction (PostgreSQL: one commit where there were two). If it
        raises, treat the outcomes as not recorded, as after a failed ``finish``."""
        await self.finish(outcomes, now_ms)
        return await self.claim(now_ms, lease_ms, limit, vendors)

    # A vendor's pause (429 / Retry-After), seen by every forwarder on this store. This
    # default keeps it in the process (one SQLite writer, one forwarder); PostgreSQL keeps it
    # in ``vendor_pauses``, so every worker on the database honours it.

    async def pause_vendor(self, vendor: str, until_ms: int) -> None:
        """Nothing goes to ``vendor`` before ``until_ms`` (a later pause wins)."""
        pauses = self.__dict__.setdefault("_vendor_pauses", {})
        pauses[vendor] = max(pauses.get(vendor, 0), int(until_ms))

    async def paused_until(self, vendor: str) -> int:
        """When ``vendor``'s pause ends (epoch ms); 0 when it was never paused."""
        return self.__dict__.get("_vendor_pauses", {}).get(vendor, 0)

    async def prune_attempts(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` attempts started before ``before_ms``; returns how many."""
        raise NotImplementedError

    # Retention of events, sessions and finished deliveries (``[server] keep_events_days``,
    # store/retention.py): each call one short transaction, at most ``limit`` rows read.

    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        """Delete at most ``limit`` finished deliveries (``retention.FINISHED``) planned and
        last changed before ``before_ms``, oldest first, with their attempts; returns how
        many. Pending, held and dead rows are never deleted."""
        raise NotImplementedError

    async def prune_events(self, before_ms: int, after: int, limit: int
                           ) -> tuple[int, int | None]:
        """Of the ``limit`` events after seq ``after``, delete those received before
        ``before_ms`` that no delivery row refers to. Returns how many, and the seq the
        next batch starts after, or None when this one reached young events or the end."""
        raise NotImplementedError

    async def prune_sessions(self, before_ms: int, after: int, limit: int
                             ) -> tuple[int, int | None]:
        """Of the ``limit`` sessions after id ``after``, delete (with their carts) those whose
        last activity was before ``before_ms``. Returns how many, and the id the next batch
        starts after, or None when this one reached sessions first seen since or the end."""
        raise NotImplementedError

    async def label_attempts(self, before: tuple[int, int], limit: int
                             ) -> tuple[int, tuple[int, int] | None]:
        """The attempts still without their delivery's site and vendor (written before
        SQLite's migration 013, PostgreSQL's 026), newest first: the next ``limit`` of them
        before ``before`` (started_ms, id) get those, in one short transaction. Returns how
        many were labelled (an attempt without a delivery is not) and where the next batch
        starts, or None when none was left."""
        raise NotImplementedError

    async def prune_coupon_calls(self, before_ms: int, limit: int) -> int:
        """Delete coupon calls made before ``before_ms``, looking at the ``limit`` oldest
        only; returns how many."""
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

    async def replay(self, now_ms: int, *, vendor: str | None = None, since_ms: int | None = None,
                     states: Sequence[str] = ("dead",)) -> int:
        """Make matching deliveries due again; returns how many (``replay_rows``, counted)."""
        return len(await self.replay_rows(now_ms, vendor=vendor, since_ms=since_ms,
                                          states=states))

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

    async def known_orders(self, wanted: Sequence[tuple[str, str, str]]) -> Any:
        """The stored order requests under ``wanted`` (site id, vendor, dedup key) as
        ``rules.KnownOrders``, read as ingest reads them (PostgreSQL: under the keys' advisory
        locks, so a purchase being committed is waited for): what a backfill batch's status
        changes repeat (server/backfill.py)."""
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
