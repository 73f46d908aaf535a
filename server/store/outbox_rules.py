"""The outbox's ordering rule, once: which pending deliveries a claim may take.

A delivery goes out only after every earlier delivery of the same visitor to the same
vendor (of the same site) has an outcome: a visitor's "identify" reaches the vendor before
the order it explains, and at most one row per (site, vendor, visitor) is ever in flight.
It is the whole of the ordering guarantee, on every backend and with any number of
workers, because a claimed (leased) row stays ``pending`` until its outcome is recorded:
the visitor's next row is not claimable meanwhile, whichever worker holds the lease.

``claimable`` says it in Python (the tests hold both stores' claims to it); ``CLAIMABLE``
is the same condition as SQL, which both claims use (``sqlite_writer.WriteOps.claim`` and
``postgres_outbox.claim_sql``).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

# Over ``deliveries`` aliased ``{d}`` (the candidate) and ``{p}`` (an earlier row).
CLAIMABLE = ("NOT EXISTS (SELECT 1 FROM deliveries {p} WHERE {p}.site_id = {d}.site_id "
             "AND {p}.vendor = {d}.vendor AND {p}.visitor = {d}.visitor "
             "AND {p}.state = 'pending' AND {p}.id < {d}.id)")


class Row(NamedTuple):
    """What the rule reads of a delivery row."""

    id: int
    site_id: str
    vendor: str
    visitor: str
    state: str
    next_attempt_ms: int


def claimable(rows: Iterable[Row], now_ms: int, limit: int,
              vendors: Iterable[str] | None = None) -> list[int]:
    """The ids one claim at ``now_ms`` takes, at most ``limit``, due longest ago first: due
    pending rows of the given vendors whose visitor has no earlier pending row."""
    rows = list(rows)
    chosen = None if vendors is None else set(vendors)
    first_pending: dict[tuple[str, str, str], int] = {}
    for row in rows:
        if row.state == "pending":
            key = (row.site_id, row.vendor, row.visitor)
            first_pending[key] = min(first_pending.get(key, row.id), row.id)
    due = [row for row in rows
           if row.state == "pending" and row.next_attempt_ms <= now_ms
           and (chosen is None or row.vendor in chosen)
           and first_pending[(row.site_id, row.vendor, row.visitor)] == row.id]
    due.sort(key=lambda row: (row.next_attempt_ms, row.id))
    return [row.id for row in due[:max(0, limit)]]
