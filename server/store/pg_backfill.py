"""One batch of ``onetag backfill --send`` on PostgreSQL: SQLite's ``WriteOps.backfill`` in
asyncpg's terms, in the caller's transaction.

History is stored as backend events (an id already stored is skipped) and pending
deliveries, none whose (site, vendor, dedup key) any row holds; a paced one is created now,
due (its retry window starting) later. The key's advisory lock (the one ``pg_ingest``
takes for facts) orders a backfilled row against a live fact or claim of the same order
planned by a node at the same moment.
"""

from __future__ import annotations

import time
from typing import Any

from ..jsontext import encode, loads
from .rules import add_backfill_counts

_DELIVERY = (
    "INSERT INTO deliveries (site_id, vendor, dedup_key, claim, event_seq, visitor, state, "
    "request, next_attempt_ms, retry_from_ms, created_ms, updated_ms, request_id) "
    "SELECT $1, $2, $3, 0, $4, $5, 'pending', $6, $7, $7, $8, $8, $9 "
    "WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE site_id = $1 AND vendor = $2 "
    "AND dedup_key = $3) ON CONFLICT (site_id, vendor, dedup_key, claim) DO NOTHING "
    "RETURNING id")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def backfill(conn: Any, site_id: str, run_id: int, events: list[tuple[Any, ...]],
                   skipped: dict[str, dict[str, int]], lines_done: int, finished: bool,
                   pace_ms: int) -> tuple[dict[str, int], dict[str, int], int]:
    now = int(time.time() * 1000)
    planned: dict[str, int] = {}
    already: dict[str, int] = {}
    known = 0
    request_id = f"backfill-{run_id}"
    next_due: dict[str, int] = {}
    keys = sorted({f"{site_id}\x1f{vendor}\x1f{key}"
                   for *_, deliveries in events for vendor, key, _, _ in deliveries})
    for key in keys:  # in key order, as pg_ingest takes them
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
    for event_id, name, raw, data, deliveries in events:
        seq = await conn.fetchval(
            "INSERT INTO events (site_id, event_id, name, source, sc, identity_id, received_ms, "
            "raw, data) VALUES ($1, $2, $3, 'backend', NULL, NULL, $4, $5, $6) "
            "ON CONFLICT DO NOTHING RETURNING seq",
            site_id, event_id, name, now, _text(raw), _text(data))
        if seq is None:
            known += 1
            seq = await conn.fetchval("SELECT seq FROM events WHERE site_id = $1 AND "
                                      "event_id = $2 AND source = 'backend'", site_id, event_id)
        for vendor, key, visitor, request in deliveries:
            due = next_due.get(vendor)
            if due is None:
                due = now if not pace_ms else max(now, pace_ms + await conn.fetchval(
                    "SELECT coalesce(max(next_attempt_ms), 0) FROM deliveries WHERE "
                    "state = 'pending' AND vendor = $1", vendor))
            made = await conn.fetchval(_DELIVERY, site_id, vendor, key, seq, visitor,
                                       _text(request), due, now, request_id) is not None
            tally = planned if made else already
            tally[vendor] = tally.get(vendor, 0) + 1
            next_due[vendor] = due + pace_ms if made else due
    row = await conn.fetchrow("SELECT counts FROM backfill_runs WHERE id = $1 FOR UPDATE",
                              run_id)
    counts = add_backfill_counts(loads(row[0]) if row is not None else {}, planned, already,
                                 skipped, known)
    await conn.execute(
        "UPDATE backfill_runs SET lines_done = $1, counts = $2, updated_ms = $3, "
        "finished_ms = CASE WHEN $4::boolean THEN $3::bigint END WHERE id = $5",
        lines_done, encode(counts).decode(), now, finished, run_id)
    return planned, already, known


async def existing_keys(dsn: str, site_id: str) -> Any:
    """``backfill.existing_keys`` for a dry run on PostgreSQL: the site's delivery keys,
    read once (a dry run asks about each of its rows, from synchronous code), as a set.
    The cost is one scan of the site's keys, bounded by its deliveries."""
    import asyncpg

    from . import application_name

    conn = await asyncpg.connect(
        dsn, server_settings={"application_name": application_name()})
    try:
        keys = {(vendor, key) for vendor, key in await conn.fetch(
            "SELECT vendor, dedup_key FROM deliveries WHERE site_id = $1", site_id)}
    finally:
        await conn.close()

    def exists(vendor: str, key: str) -> bool:
        return (vendor, key) in keys

    exists.close = keys.clear  # type: ignore[attr-defined]
    return exists


async def order_events(dsn: str, site_id: str) -> list[str]:
    """``onetag export remarkety-orders`` on PostgreSQL: the site's backend order events'
    stored JSON, in arrival order (``remarkety_export.ORDER_EVENTS_SQL``)."""
    import asyncpg

    from ..remarkety_export import ORDER_EVENTS_SQL
    from . import application_name

    conn = await asyncpg.connect(
        dsn, server_settings={"application_name": application_name()})
    try:
        return [row[0] for row in await conn.fetch(ORDER_EVENTS_SQL, site_id)]
    finally:
        await conn.close()
