"""The delivery outbox on PostgreSQL: claims, leases and outcomes shared by many workers.

A mixin for ``PostgresStore`` (``self.pool``: an asyncpg pool; ``self.sites``). Where the
SQLite store has one writer that serialises every claim, here any number of ``onetag
worker`` processes (and ``serve`` nodes with ``forward = true``) claim from one table at
once. The protocol (docs/architecture.md, "The claim protocol"):

- A claim takes due rows with ``FOR UPDATE SKIP LOCKED`` and leases them in the same
  statement: ``lease_until`` is the lease's end (a dead worker's row is due again then)
  and ``claim_token`` gets a new number from the ``delivery_claims`` sequence (neither is
  indexed: the claim is a HOT update). Two workers never get the same row while its lease
  runs: the second either skips the locked row or, once the first committed, re-checks it
  and finds it leased.
- One row in flight per (site, vendor, visitor), and in order: a row is claimable only if
  its visitor has no earlier pending row for that vendor (``outbox_rules.CLAIMABLE``, the
  same rule SQLite's claim applies). A leased row is still pending, so the visitor's next
  row waits for its outcome, whichever worker holds it.
- A finish changes a row only while it is still pending under the token it was claimed
  with: an outcome that comes back after its lease was taken over is ignored (the attempt
  itself is still kept, it happened; not for a delivery erased since: migration 041).
- A vendor's pause (429 / Retry-After) is a row of ``vendor_pauses`` that every worker reads
  before claiming for that vendor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from typing import Any, Iterable, Mapping, Sequence

from ..jsontext import encode, loads
from .. import outbox
from . import deadletters, outbox_rules, retention, rules
from .base import Delivery, Outcome, StoreUnavailable
from .deadletters import OLDEST_PENDING, ReplayFilter
from .pg_ingest import load_orders
from .pg_writer import drop_if_failed, is_database_failure, must_drop, sqlstate
from .rules import identity_fields

log = logging.getLogger("onetag.store")

# A lane asks for its vendor's pause before every claim; the answer is reused this long, so
# a busy lane reads the table a few times a second rather than once a claim. A pause another
# worker records is seen within it (this worker's own pauses are seen at once).
PAUSE_CHECK_S = 0.25
REPLAY_IDS_KEPT = 100  # as sqlite_writer: a replay record lists the rows when at most this many
# Per vendor named ($1, text[]), when its oldest pending row fell due: a seek into
# deliveries_oldest_pending (pg_migrations/030, 036; the same expression, so the planner matches
# it). A GROUP BY over the pending rows read each from the heap.
OLDEST_PENDING_BY_VENDOR = (
    f"SELECT v.vendor, (SELECT min({OLDEST_PENDING}) FROM deliveries "
    "WHERE state = 'pending' AND vendor = v.vendor) AS created FROM unnest($1::text[]) AS v(vendor)")

_CLAIM_COLUMNS = ("d.id, d.site_id, d.vendor, d.dedup_key, d.visitor, d.request, d.attempts, "
                  "d.created_ms, coalesce(d.retry_from_ms, d.created_ms) AS retry_from_ms, "
                  "d.request_id, d.claim_token")


def claim_sql(vendor_filter: str) -> str:
    """The claim: pick due rows the rule allows, lock them (skipping rows another claim
    holds), lease them, in one statement. ``$1`` now, ``$2`` the vendor(s), ``$3`` limit,
    ``$4`` lease in ms. Due longest ago first, as SQLite's."""
    return (
        "WITH picked AS (SELECT d.id FROM deliveries d "
        f"WHERE d.state = 'pending' AND d.next_attempt_ms <= $1 {vendor_filter} "
        "AND (d.lease_until IS NULL OR d.lease_until <= $1) "
        f"AND {outbox_rules.CLAIMABLE.format(d='d', p='p')} "
        "ORDER BY d.next_attempt_ms, d.id LIMIT $3 FOR UPDATE OF d SKIP LOCKED) "
        "UPDATE deliveries d SET attempts = d.attempts + 1, lease_until = $1 + $4, "
        "updated_ms = $1, claim_token = nextval('delivery_claims') "
        f"FROM picked WHERE d.id = picked.id RETURNING {_CLAIM_COLUMNS}")


# The forwarder's claim (one lane, one vendor): the same statement, run by the function
# migration 022 makes of it, so that it is planned once per connection rather than on every
# call (asyncpg's prepared statement got a custom plan each time).
CLAIM_ONE_VENDOR = "SELECT * FROM onetag_claim($1, $2, $3, $4)"
CLAIM_ONE_VENDOR_STATEMENT = claim_sql("AND d.vendor = $2")  # what onetag_claim runs
CLAIM_SOME_VENDORS = claim_sql("AND d.vendor = ANY($2::text[])")
CLAIM_ANY_VENDOR = claim_sql("AND $2::text IS NULL")

# An outcome batch in one call (one round trip, no BEGIN/COMMIT of its own) of the function
# migration 022 makes (planned once per connection): the rows' outcomes, then the attempts.
# The late-outcome guard: a row changes only while pending (a final state is never undone)
# and still this claim's; its attempt is kept either way (it happened), but for a delivery
# erased since (``onetag person forget``: visitor 'erased'; migration 041), whose attempt
# would name the person where nothing finds it again.
# A deadlock's victim (one statement, so its whole transaction, rolled back) is run again,
# up to DEADLOCK_RETRIES times: the finish takes its rows in id order (041), as the erasure
# does, but a lock taken otherwise (an operator's transaction) would make the forwarder drop
# the batch's outcomes and send every row of it again after its lease. Each retry waits a
# few random milliseconds first: run at once, it can take a row back before the transaction
# that won the deadlock gets it, and deadlock with it again (seen under load).
DEADLOCK = "40P01"
DEADLOCK_RETRIES = 3
DEADLOCK_BACKOFF_S = 0.02  # a retry waits up to this, times its number, at random
FINISH = ("SELECT onetag_finish($1::bigint[], $2::text[], $3::bigint[], $4::text[], "
          "$5::bigint[], $6, $7::bigint[], $8::int[], $9::bigint[], $10::bigint[], $11::text[], "
          "$12::int[], $13::text[], $14::text[])")

# A lane's claim with the outcomes that piled up (migration 024): FINISH's arrays, then
# the claim's vendor, limit and lease; one call, one transaction, one commit.
FINISH_CLAIM = ("SELECT * FROM onetag_finish_claim($1::bigint[], $2::text[], $3::bigint[], "
                "$4::text[], $5::bigint[], $6, $7::bigint[], $8::int[], $9::bigint[], "
                "$10::bigint[], $11::text[], $12::int[], $13::text[], $14::text[], $15, $16, "
                "$17)")


def pg_condition(condition: str, first: int) -> str:
    """A ``deadletters.where`` condition (SQLite's ``?`` and ``0``) in PostgreSQL's terms:
    ``$first``, ``$first+1``, ... and ``false``. The conditions are deadletters' own, so
    the console's list and a replay still select through one WHERE clause."""
    condition = re.sub(r"(?<![\w$.'])0(?![\w'])", "false", condition)
    pieces = condition.split("?")
    return pieces[0] + "".join(f"${first + n}{piece}" for n, piece in enumerate(pieces[1:]))


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable("database", f"PostgreSQL: {type(exc).__name__}: {exc}")


class PostgresOutbox:
    """The outbox half of ``PostgresStore``; see the module's docstring."""

    pool: Any
    sites: Mapping[str, Any]

    # Claims and outcomes ------------------------------------------------------------------

    async def claim(self, now_ms: int, lease_ms: int, limit: int,
                    vendors: Iterable[str] | None = None) -> list[Delivery]:
        if vendors is None:
            sql, chosen = CLAIM_ANY_VENDOR, None
        else:
            chosen = list(vendors)
            if not chosen or limit <= 0:
                return []
            sql, chosen = ((CLAIM_ONE_VENDOR, chosen[0]) if len(chosen) == 1
                           else (CLAIM_SOME_VENDORS, chosen))
        if limit <= 0:
            return []
        return self._deliveries(await self._fetch(sql, now_ms, chosen, limit, lease_ms))

    async def finish_and_claim(self, outcomes: Sequence[Outcome], now_ms: int, lease_ms: int,
                               limit: int, vendors: Iterable[str] | None = None
                               ) -> list[Delivery]:
        """A lane's claim (one vendor) with outcomes: one call of ``onetag_finish_claim``."""
        chosen = None if vendors is None else list(vendors)
        if not outcomes or chosen is None or len(chosen) != 1 or limit <= 0:
            await self.finish(outcomes, now_ms)
            return await self.claim(now_ms, lease_ms, limit, chosen)
        args = (*self._finish_args(outcomes, now_ms), chosen[0], limit, lease_ms)
        return self._deliveries(await self._on_connection(
            lambda conn: conn.fetch(FINISH_CLAIM, *args), deadlock_retries=DEADLOCK_RETRIES))

    @staticmethod
    def _deliveries(rows: list[Any]) -> list[Delivery]:
        rows.sort(key=lambda row: row["id"])
        return [Delivery(id=row["id"], site_id=row["site_id"], vendor=row["vendor"],
                         dedup_key=row["dedup_key"], visitor=row["visitor"],
                         request=loads(row["request"]), attempts=row["attempts"],
                         created_ms=row["created_ms"], retry_from_ms=row["retry_from_ms"],
                         request_id=row["request_id"], lease=row["claim_token"])
                for row in rows]

    async def finish(self, outcomes: Sequence[Outcome], now_ms: int) -> None:
        if not outcomes:
            return
        args = self._finish_args(outcomes, now_ms)
        await self._on_connection(lambda conn: conn.execute(FINISH, *args),
                                  deadlock_retries=DEADLOCK_RETRIES)

    @staticmethod
    def _finish_args(outcomes: Sequence[Outcome], now_ms: int) -> list[Any]:
        """FINISH's 14 parameters: the outcomes' columns, then their attempts'."""
        ordered = sorted(outcomes, key=lambda o: o.id)  # one lock order: no deadlocks
        kept = [(o.id, a) for o in ordered if (a := o.attempt) is not None]
        return [
            [o.id for o in ordered], [o.state for o in ordered],
            [o.next_attempt_ms for o in ordered], [o.error for o in ordered],
            [o.lease for o in ordered], now_ms,
            [i for i, _ in kept], [a.attempt for _, a in kept],
            [a.started_ms for _, a in kept], [a.duration_ms for _, a in kept],
            [encode(a.request).decode() for _, a in kept], [a.status for _, a in kept],
            [None if a.answer is None else encode(a.answer).decode() for _, a in kept],
            [a.error for _, a in kept]]

    async def expire_held(self, before_ms: int, now_ms: int) -> int:
        status = await self._execute(
            "UPDATE deliveries SET state = 'expired', updated_ms = $1 "
            "WHERE state = 'held' AND created_ms < $2", now_ms, before_ms)
        return int(status.split()[-1])

    async def prune_attempts(self, before_ms: int, limit: int) -> int:
        """The oldest first, at most ``limit`` (the forwarder calls it in bounded passes)."""
        status = await self._execute(
            "DELETE FROM attempts WHERE id IN (SELECT id FROM attempts WHERE started_ms < $1 "
            "ORDER BY started_ms LIMIT $2)", before_ms, limit)
        return int(status.split()[-1])

    async def prune_deliveries(self, before_ms: int, limit: int) -> int:
        """``Store.prune_deliveries``: through deliveries_finished (migration 038), the rows
        checked again as they are deleted, their attempts in the same statement."""
        [row] = await self._fetch(
            "WITH gone AS (DELETE FROM deliveries WHERE id IN ("
            + retention.PICK_DELIVERIES.format(before="$1", limit="$2", indexed="") + ") AND "
            + retention.DELETE_DELIVERIES_WHERE.format(before="$1") + " RETURNING id), "
            "tried AS (DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM gone)) "
            "SELECT count(*) AS n FROM gone", before_ms, limit)
        return int(row["n"])

    async def prune_events(self, before_ms: int, after: int, limit: int
                           ) -> tuple[int, int | None]:
        """``Store.prune_events``: a batch of the walk by seq, in one statement."""
        return await self._prune_walk(retention.EVENTS, before_ms, after, limit)

    async def prune_sessions(self, before_ms: int, after: int, limit: int
                             ) -> tuple[int, int | None]:
        """``Store.prune_sessions``: a batch of the walk by id, in one statement. The last
        activity is checked as each row is deleted: an ingest that holds the row's lock
        meanwhile makes it young again, and it stays (its ``last_ms`` is read after it)."""
        return await self._prune_walk(retention.SESSIONS, before_ms, after, limit)

    async def _prune_walk(self, walk: retention.Walk, before_ms: int, after: int, limit: int
                          ) -> tuple[int, int | None]:
        keys = f"SELECT {walk.key} FROM walk WHERE {walk.time} < $3"
        [row] = await self._fetch(
            "WITH walk AS (" + walk.read().format(after="$1", limit="$2") + "), "
            "gone AS (" + walk.delete().format(keys=keys, before="$3") + " RETURNING 1) "
            "SELECT (SELECT count(*) FROM gone) AS n, (SELECT count(*) FROM walk) AS walked, "
            f"(SELECT max({walk.key}) FROM walk) AS last, "
            f"(SELECT count(*) FROM walk WHERE {walk.time} >= $3) AS young",
            after, limit, before_ms)
        end = row["walked"] < limit or row["young"] > 0
        return int(row["n"]), None if end else int(row["last"])

    async def label_attempts(self, before: tuple[int, int], limit: int
                             ) -> tuple[int, tuple[int, int] | None]:
        """``Store.label_attempts``: the batch through attempts_unlabelled (migration 026)."""
        [row] = await self._fetch(
            "WITH batch AS (SELECT started_ms, id FROM attempts WHERE site_id IS NULL "
            "AND (started_ms, id) < ($1, $2) ORDER BY started_ms DESC, id DESC LIMIT $3), "
            "labelled AS (UPDATE attempts a SET site_id = d.site_id, vendor = d.vendor "
            "FROM batch b, deliveries d WHERE a.id = b.id AND d.id = a.delivery_id "
            "RETURNING a.id), last AS (SELECT started_ms, id FROM batch "
            "ORDER BY started_ms, id LIMIT 1) "
            "SELECT (SELECT count(*) FROM labelled) AS n, (SELECT started_ms FROM last) AS ms, "
            "(SELECT id FROM last) AS id", before[0], before[1], limit)
        return int(row["n"]), None if row["id"] is None else (row["ms"], row["id"])

    # Vendor pauses ----------------------------------------------------------------------

    async def pause_vendor(self, vendor: str, until_ms: int) -> None:
        """Recorded for every worker; a later pause wins, an earlier one changes nothing."""
        import time

        seen = self.__dict__.setdefault("_pauses_seen", {})
        _, known = seen.get(vendor, (0.0, 0))
        seen[vendor] = (time.monotonic(), max(known, int(until_ms)))
        await self._execute(
            "INSERT INTO vendor_pauses (vendor, until_ms, updated_ms) VALUES ($1, $2, $3) "
            "ON CONFLICT (vendor) DO UPDATE SET until_ms = greatest(vendor_pauses.until_ms, "
            "excluded.until_ms), updated_ms = excluded.updated_ms",
            vendor, int(until_ms), int(time.time() * 1000))

    async def paused_until(self, vendor: str) -> int:
        import time

        seen = self.__dict__.setdefault("_pauses_seen", {})
        checked, known = seen.get(vendor, (-PAUSE_CHECK_S, 0))
        now = time.monotonic()
        if now - checked < PAUSE_CHECK_S:
            return known
        rows = await self._fetch("SELECT until_ms FROM vendor_pauses WHERE vendor = $1", vendor)
        until = max(known, rows[0]["until_ms"]) if rows else known
        seen[vendor] = (now, until)
        return until

    # Reads ------------------------------------------------------------------------------

    async def attempts(self, delivery_id: int) -> list[dict[str, Any]]:
        from .sqlite import with_body

        rows = await self._fetch(
            "SELECT attempt, started_ms, duration_ms, request, status, answer, error "
            "FROM attempts WHERE delivery_id = $1 ORDER BY id", delivery_id)
        planned = await self._fetch("SELECT request FROM deliveries WHERE id = $1", delivery_id)
        planned_request = loads(planned[0]["request"]) if planned and planned[0]["request"] else {}
        found = []
        for row in rows:
            item = dict(row)
            item["request"] = with_body(loads(item["request"]), planned_request)
            item["answer"] = None if item["answer"] is None else loads(item["answer"])
            found.append(item)
        return found

    async def delivery_stats(self, now_ms: int) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT vendor, "
            "count(*) FILTER (WHERE state = 'pending' AND last_error IS NULL) AS pending, "
            "count(*) FILTER (WHERE state = 'pending' AND last_error IS NOT NULL) AS failing, "
            "count(*) FILTER (WHERE state = 'held') AS held, "
            "count(*) FILTER (WHERE state = 'delivered') AS delivered, "
            "count(*) FILTER (WHERE state = 'dead') AS dead, "
            "count(*) FILTER (WHERE state = 'browser') AS browser, "
            "count(*) FILTER (WHERE state = 'expired') AS expired, "
            "count(*) FILTER (WHERE state = 'ignored') AS ignored, "
            f"min({OLDEST_PENDING}) FILTER (WHERE state = 'pending') AS oldest_pending_ms "
            "FROM deliveries GROUP BY vendor ORDER BY vendor")
        stats = []
        for row in rows:
            item = dict(row)
            oldest = item.pop("oldest_pending_ms")
            item["oldest_pending_age_s"] = None if oldest is None else max(0, now_ms - oldest) / 1000
            stats.append(item)
        return stats

    async def outbox_depth(self, now_ms: int
                           ) -> tuple[list[tuple[str, str, int]], dict[str, float]]:
        """For ``/metrics``: rows per (vendor, state) still in the outbox, and per vendor the
        age of its oldest pending row. The counts read the claim index (``deliveries_due``);
        the age is one seek per vendor with pending rows into ``deliveries_oldest_pending``
        (pg_migrations/030, 036): a GROUP BY read every pending row from the heap."""
        depth = await self._fetch(
            "SELECT vendor, state, count(*) AS n FROM deliveries "
            "WHERE state IN ('pending', 'held', 'dead') GROUP BY state, vendor")
        pending = sorted({r["vendor"] for r in depth if r["state"] == "pending"})
        oldest = await self._fetch(OLDEST_PENDING_BY_VENDOR, pending) if pending else []
        return ([(r["vendor"], r["state"], r["n"]) for r in depth],
                {r["vendor"]: max(0, now_ms - r["created"]) / 1000 for r in oldest
                 if r["created"] is not None})

    async def list_deliveries(self, *, state: str | None = None, vendor: str | None = None,
                              limit: int = 50, ids: Sequence[int] | None = None
                              ) -> list[dict[str, Any]]:
        where, params = ["true"], []
        if state == "failing":
            where.append("d.state = 'pending' AND d.last_error IS NOT NULL")
        elif state:
            params.append(state)
            where.append(f"d.state = ${len(params)}")
        if vendor:
            params.append(vendor)
            where.append(f"d.vendor = ${len(params)}")
        if ids is not None:
            params.append(list(ids))
            where.append(f"d.id = ANY(${len(params)}::bigint[])")
        params.append(limit)
        rows = await self._fetch(
            "SELECT d.id, d.site_id, d.vendor, d.dedup_key, d.state, d.attempts, "
            # A leased row is next due when its lease ends (as SQLite's row says it).
            "greatest(d.next_attempt_ms, d.lease_until) AS next_attempt_ms, d.last_error, "
            "d.created_ms, d.updated_ms, d.delivered_ms, "
            "coalesce(d.retry_from_ms, d.created_ms) AS retry_from_ms, d.request_id, "
            "CASE WHEN d.state = 'pending' THEN (SELECT min(p.id) FROM deliveries p "
            "WHERE p.site_id = d.site_id AND p.vendor = d.vendor AND p.visitor = d.visitor "
            "AND p.state = 'pending' AND p.id < d.id) END AS waits_for "
            f"FROM deliveries d WHERE {' AND '.join(where)} ORDER BY d.id DESC "
            f"LIMIT ${len(params)}", *params)
        return [dict(row) for row in rows]

    # Replays ----------------------------------------------------------------------------

    async def replay_rows(self, now_ms: int, *, vendor: str | None = None,
                          since_ms: int | None = None, states: Sequence[str] = ("dead",),
                          ids: Sequence[int] | None = None, dry_run: bool = False,
                          site_id: str | None = None, until_ms: int | None = None,
                          error: str | None = None, time_field: str = "created"
                          ) -> list[dict[str, Any]]:
        """As SQLite's: rows selected by ``deadletters.where``; a dry run makes the same
        changes in a transaction it rolls back, so it names exactly what a replay would."""
        from .sqlite import _log_replay

        selection = ReplayFilter(tuple(states), vendor, site_id, since_ms, until_ms, error,
                                 None if ids is None else tuple(ids), time_field)
        await self._check_replay(selection)
        made = await self._in_transaction(self._replay_in, now_ms, selection, commit=not dry_run)
        if not dry_run:
            _log_replay(len(made), selection)
        return made

    async def replay_preview(self, now_ms: int, selection: ReplayFilter) -> tuple[int, str]:
        await self._check_replay(selection)
        rows = await self._in_transaction(self._replay_in, now_ms, selection, commit=False)
        return len(rows), deadletters.fingerprint(rows)

    async def replay_recorded(self, now_ms: int, selection: ReplayFilter, who: str,
                              expect: str | None = None, shown: int | None = None
                              ) -> dict[str, Any]:
        """Checked and replayed in one transaction; the rows it selects are locked by the
        replay's own UPDATE, so a claim or finish meanwhile waits for it or is not seen."""

        await self._check_replay(selection)
        return await self._in_transaction(self._recorded_in, now_ms, selection, who, expect,
                                          shown)

    async def _recorded_in(self, conn: Any, now: int, selection: ReplayFilter, who: str,
                           expect: str | None, shown: int | None) -> dict[str, Any]:
        from .sqlite import _log_replay

        if expect is not None:
            current = await self._look(conn, now, selection)
            if deadletters.fingerprint(current) != expect:
                return {"changed": True, "rows": current, "replay_id": None,
                        "fingerprint": deadletters.fingerprint(current)}
        made = await self._replay_in(conn, now, selection)
        replay_id = await self._record_in(conn, now, who, selection.describe(), shown,
                                          [row["id"] for row in made])
        _log_replay(len(made), selection, who)
        return {"changed": False, "rows": made, "replay_id": replay_id,
                "fingerprint": deadletters.fingerprint(made)}

    async def record_replay(self, now_ms: int, who: str, scope: Mapping[str, Any],
                            rows: Sequence[Mapping[str, Any]], shown: int | None = None) -> int:
        return await self._in_transaction(self._record_in, now_ms, who, dict(scope), shown,
                                          [row["id"] for row in rows])

    async def _record_in(self, conn: Any, now: int, who: str, scope: dict[str, Any],
                         shown: int | None, ids: list[int]) -> int:
        return await conn.fetchval(
            "INSERT INTO replays (at_ms, who, filter, dry_run_count, replayed, ids) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            now, who, encode(scope).decode(), shown, len(ids),
            encode(ids).decode() if len(ids) <= REPLAY_IDS_KEPT else None)

    async def _look(self, conn: Any, now: int, selection: ReplayFilter) -> list[dict[str, Any]]:
        """What ``_replay_in`` would make due, in a savepoint rolled back."""
        savepoint = conn.transaction()
        await savepoint.start()
        try:
            return await self._replay_in(conn, now, selection)
        finally:
            await savepoint.rollback()

    async def _check_replay(self, selection: ReplayFilter) -> None:
        """``ValueError`` naming the field, before any work (as SQLite's)."""
        problem = deadletters.check(selection, replay=True)
        if problem:
            raise ValueError(problem)
        for state in selection.states:
            limit = deadletters.MAX_REPLAY_ROWS[state]
            condition, params = deadletters.where(selection, states=(state,))
            rows = await self._fetch(
                f"SELECT count(*) AS n FROM (SELECT 1 FROM deliveries "
                f"WHERE {pg_condition(condition, 1)} LIMIT ${len(params) + 1}) AS matching",
                *params, limit + 1)
            if rows[0]["n"] > limit:
                raise ValueError(f"states: more than {limit} {state} deliveries match; one "
                                 f"replay takes at most {limit}: narrow the filter (vendor, "
                                 f"site, since/until, error text)")

    async def _replay_in(self, conn: Any, now: int, selection: ReplayFilter
                         ) -> list[dict[str, Any]]:
        problem = deadletters.check(selection, replay=True)
        if problem:
            raise ValueError(problem)
        made: list[dict[str, Any]] = []
        if "dead" in selection.states:
            condition, params = deadletters.where(selection, states=("dead",))
            rows = await conn.fetch(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_ms = $1, "
                "retry_from_ms = $1, updated_ms = $1, last_error = NULL, claim_token = NULL, "
                "lease_until = NULL "
                f"WHERE {pg_condition(condition, 2)} RETURNING id, site_id, vendor, dedup_key",
                now, *params)
            made += sorted(({"id": r["id"], "site_id": r["site_id"], "vendor": r["vendor"],
                             "dedup_key": r["dedup_key"], "from_state": "dead", "replaces": []}
                            for r in rows), key=lambda row: row["id"])
        if "expired" in selection.states:
            made += await self._replay_expired(conn, now, selection)
        return made

    async def _replay_expired(self, conn: Any, now: int, selection: ReplayFilter
                              ) -> list[dict[str, Any]]:
        """Expired rows never had an email; re-plan those whose visitor has one now (the
        rule of ``sqlite_writer._replay_expired``: the planner decides, the expired rows of
        the vendors it plans are replaced)."""
        condition, params = deadletters.where(selection, prefix="d.", states=("expired",))
        rows = await conn.fetch(
            "SELECT d.id, d.event_seq, d.vendor, e.site_id, e.data, d.request_id, "
            "coalesce(s.identity_id, e.identity_id) AS identity_id FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            "LEFT JOIN sessions s ON s.site_id = e.site_id AND s.sc = e.sc "
            f"WHERE {pg_condition(condition, 1)} ORDER BY d.id", *params)
        by_event: dict[int, tuple[str, Any, int | None, dict[str, list[int]], str | None]] = {}
        for row in rows:
            entry = by_event.setdefault(row["event_seq"], (row["site_id"], row["data"],
                                                           row["identity_id"], {},
                                                           row["request_id"]))
            entry[3].setdefault(row["vendor"], []).append(row["id"])
        inserted: list[dict[str, Any]] = []
        # The orders the replayed status changes repeat, in one look-up (PlanContext.order).
        events = {seq: loads(entry[1]) if isinstance(entry[1], (str, bytes)) else dict(entry[1])
                  for seq, entry in by_event.items() if entry[0] in self.sites}
        orders = await load_orders(conn, rules.orders_wanted(
            self.sites, ((by_event[seq][0], event) for seq, event in events.items())))
        for seq, (site_id, data, identity_id, vendors, request_id) in by_event.items():
            site = self.sites.get(site_id)
            identity = None
            if identity_id:
                found = await conn.fetchrow("SELECT * FROM identities WHERE id = $1", identity_id)
                if found is not None:
                    identity = {**identity_fields(found), "id": identity_id, "is_new": False}
            if site is None or not identity or not identity.get("email"):
                continue
            event = events[seq]
            event["identity"] = identity
            planned = [r for r in outbox.plan(site, event, vendors, orders=orders)
                       if r.state == outbox.PENDING]
            replanned = sorted({r.vendor for r in planned})
            if not replanned:
                continue
            await conn.execute("DELETE FROM deliveries WHERE event_seq = $1 AND state = 'expired' "
                               "AND vendor = ANY($2::text[])", seq, replanned)
            for r in planned:
                new_id = await conn.fetchval(
                    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, "
                    "visitor, state, request, next_attempt_ms, last_error, created_ms, "
                    "updated_ms, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                    "$11, $11, $12) ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING "
                    "RETURNING id", site_id, r.vendor, r.dedup_key, 1 if r.claim else 0, seq,
                    r.visitor, r.state, encode(r.request).decode(), now + r.delay_ms, r.error,
                    now, request_id)
                if new_id is not None:
                    inserted.append({"id": new_id, "site_id": site_id, "vendor": r.vendor,
                                     "dedup_key": r.dedup_key, "from_state": "expired",
                                     "replaces": vendors[r.vendor]})
        return inserted

    # Plumbing ---------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._on_connection(lambda conn: conn.fetch(sql, *args))

    async def _execute(self, sql: str, *args: Any) -> str:
        return await self._on_connection(lambda conn: conn.execute(sql, *args))

    async def _on_connection(self, call: Any, deadlock_retries: int = 0) -> Any:
        """``call(conn)`` on a pooled connection; a connection whose database failed is
        not kept (``pg_writer.drop_if_failed``: a read-only session would outlive the
        database becoming writable again). A call of one statement outside a transaction
        may be run again after PostgreSQL chose it as a deadlock's victim (40P01), at most
        ``deadlock_retries`` times, each after a short random wait: the statement's whole
        transaction was rolled back."""
        try:
            async with self.pool.acquire() as conn:
                for attempt in range(deadlock_retries + 1):
                    try:
                        return await call(conn)
                    except Exception as exc:
                        if sqlstate(exc) == DEADLOCK and attempt < deadlock_retries:
                            await asyncio.sleep(random.uniform(0.5, 1.0) * DEADLOCK_BACKOFF_S
                                                * (attempt + 1))
                            continue
                        drop_if_failed(conn, exc)
                        raise
        except Exception as exc:
            if is_database_failure(exc):  # not the statement: waited out, said once
                raise _unavailable(exc) from exc
            raise

    async def _in_transaction(self, fn: Any, *args: Any, commit: bool = True) -> Any:
        """``fn(conn, *args)`` in a transaction, committed or (a dry run) rolled back."""
        try:
            async with self.pool.acquire() as conn:
                transaction = conn.transaction()
                await transaction.start()
                try:
                    result = await fn(conn, *args)
                except BaseException as exc:
                    if isinstance(exc, Exception) and must_drop(exc):
                        conn.terminate()  # nothing to roll back on a dropped one
                        raise
                    await transaction.rollback()
                    raise
                if commit:
                    await transaction.commit()
                else:
                    await transaction.rollback()
                return result
        except Exception as exc:
            if is_database_failure(exc):  # not the statement: waited out, said once
                raise _unavailable(exc) from exc
            raise
