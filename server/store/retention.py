"""The retention of events, sessions and finished deliveries (``[server] keep_events_days``).

Off by default (0: kept forever, as before this setting existed). When set, the forwarder's
retention pass (``Forwarder.prune``) deletes, in bounded batches, each its own short
transaction (docs/config.md, "Retention"; docs/architecture.md, "The forwarder"):

1. Finished deliveries (``FINISHED``: delivered, recorded as sent by the browser, expired,
   ignored) planned (``created_ms``) and last changed (``updated_ms``) before the period,
   oldest first through ``deliveries_finished`` (SQLite migration 022, PostgreSQL 038: a
   partial index of those rows alone, by ``created_ms``), and their attempts with them.
   Pending (in flight or retrying), held and dead rows are never pruned: a dead row waits
   for the operator.
2. Events received before the period that no delivery row refers to any more
   (``deliveries.event_seq``): the forwarder, a held row's release and a replay read the
   event's ``data``, so an event stays while any row of it is left, whatever its state.
   Walked in ``seq`` order (arrival order, the primary key) from a cursor the forwarder
   keeps between batches and passes; the walk ends at the first event young enough.
3. Sessions (with their carts, which are columns of the session) whose last activity
   (``last_ms``) is older than the period, walked in ``id`` order (first visit, the
   primary key) the same way; the walk ends at the first session first seen within it.

Identities are kept (docs/config.md, "Retention"): whether any event still names one is not
indexed (``events.identity_id``, which every ingested event would pay for), and a visitor
identified again by email or customer id is matched to the identity.

The statements are shared by both backends (``{placeholders}`` formatted per driver). Each
batch reads at most ``limit`` rows through a primary key or the partial index: never the
table.
"""

from __future__ import annotations

from typing import NamedTuple

# Delivery states that will not change again unless an operator replays an expired row.
FINISHED = ("delivered", "browser", "expired", "ignored")
_FINISHED_SQL = f"state IN ({', '.join(repr(state) for state in FINISHED)})"  # as migration 022

# The oldest finished deliveries planned and changed before ``before``: deliveries_finished,
# in order (a row replayed or finished within the period is passed over, and kept).
# Never a table's newest row: SQLite gives the highest id of a table again to the next row
# once it is deleted (no AUTOINCREMENT), and a delivery's id, an event's seq, are named
# elsewhere (replay records, the console's Live cursor, links); store/person.py keeps it too.
_NOT_NEWEST = "{key} < (SELECT max({key}) FROM {table})"
_OLD = (f"{_FINISHED_SQL} AND created_ms < {{before}} AND updated_ms < {{before}} AND "
        + _NOT_NEWEST.format(key="id", table="deliveries"))
# SQLite names the index ({indexed}): with no statistics (onetag runs no ANALYZE) its planner
# took deliveries_due for ``state IN (...)`` and sorted every finished row.
PICK_DELIVERIES = ("SELECT id FROM deliveries{indexed} WHERE " + _OLD
                   + " ORDER BY created_ms LIMIT {limit}")
SQLITE_INDEXED = " INDEXED BY deliveries_finished"
# Checked again as the rows are deleted (PostgreSQL: a replay may have made one due since).
DELETE_DELIVERIES_WHERE = _OLD

class Walk(NamedTuple):
    """A table walked by its primary key ``key``: a batch reads the next ``limit`` rows after
    the cursor; those whose ``time`` is before the period are deleted if ``extra`` holds too
    (checked as each is deleted); a row whose ``time`` is not ends the walk."""

    table: str
    key: str
    time: str
    extra: str

    def read(self) -> str:
        return (f"SELECT {self.key}, {self.time} FROM {self.table} WHERE {self.key} > {{after}} "
                f"ORDER BY {self.key} LIMIT {{limit}}")

    def delete(self) -> str:
        """``{keys}``: the batch's rows whose time is before ``{before}``."""
        return (f"DELETE FROM {self.table} WHERE {self.key} IN ({{keys}}) AND {self.extra} "
                "AND " + _NOT_NEWEST.format(key=self.key, table=self.table))


# Events by seq (arrival order) that no delivery row refers to (deliveries_event).
NO_DELIVERY = "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)"
EVENTS = Walk("events", "seq", "received_ms", NO_DELIVERY)
# Sessions by id (first visit order) whose last activity is before the period.
SESSIONS = Walk("sessions", "id", "first_ms", "last_ms < {before}")


def walk_end(times: list[int], before: int, limit: int) -> bool:
    """Whether a walk's batch (its rows' times, in key order) reached the young rows or the
    table's end: the next pass starts from the beginning again."""
    return len(times) < limit or any(t >= before for t in times)
