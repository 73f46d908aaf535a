"""Which deliveries an operator means: one filter, one WHERE clause.

The console's dead-letter list, its dry-run count and the replay itself, and ``onetag
replay``, all select rows through ``where`` here, so what an operator is shown is what a
replay takes: there is no second copy of the conditions to drift apart.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Sequence

# What a filter's ``states`` may name. ``failing``: pending after a failed attempt (it
# retries by itself); ``held``: waiting for the visitor's email (or a browser session of the
# customer: last_error says). Both are shown, neither is
# replayed: a replay makes dead rows due again and re-plans expired ones.
LISTABLE_STATES = ("dead", "expired", "failing", "held")
REPLAYABLE_STATES = ("dead", "expired")
TIME_FIELDS = {"created": "created_ms", "updated": "updated_ms"}  # "updated": last attempt
# When a pending row fell due, the start of its age as the oldest pending row (Vendors page,
# `onetag deliveries`, /metrics): its last replay, or for paced history (``onetag backfill
# --pace``) its due time (both ``retry_from_ms``), or for a backend fact waiting out
# ``[server] browser_grace_s`` its due time (``due_ms``), else when it was made; a row
# waiting for its turn is not late yet. A failed attempt's retry does not restart it.
OLDEST_PENDING = "coalesce(retry_from_ms, due_ms, created_ms)"
MAX_IDS = 1000
# Rows one replay may take: it is one writer transaction, which ingest waits behind; an
# expired row costs a re-planning (its event read and planned again), a dead one an update.
MAX_REPLAY_ROWS = {"dead": 100_000, "expired": 10_000}
MAX_ERROR_TEXT = 200


class ReplayFilter(NamedTuple):
    """An operator's selection of deliveries. A plain tuple: it crosses the writer's pipe."""

    states: tuple[str, ...] = ("dead",)
    vendor: str | None = None
    site_id: str | None = None
    since_ms: int | None = None  # inclusive
    until_ms: int | None = None  # exclusive
    error: str | None = None  # a substring of last_error, matched literally
    ids: tuple[int, ...] | None = None
    time_field: str = "created"  # created | updated (the last attempt or state change)

    def describe(self) -> dict[str, Any]:
        """The filter as JSON-able fields, without the unset ones (the replays record)."""
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in self._asdict().items()
                if value is not None and not (key == "time_field" and value == "created")}


def check(f: ReplayFilter, replay: bool = False) -> str | None:
    """What is wrong with a filter, naming the field; None when it is usable."""
    allowed = REPLAYABLE_STATES if replay else LISTABLE_STATES
    if not f.states:
        return "states: name at least one state"
    for state in f.states:
        if state not in allowed:
            if replay:
                return (f"states: {state} deliveries are not replayed (only "
                        f"{' and '.join(REPLAYABLE_STATES)}: failing rows retry by themselves, "
                        f"held rows wait for the visitor's email or session)")
            return f"states: {state!r} is not one of {', '.join(LISTABLE_STATES)}"
    if f.time_field not in TIME_FIELDS:
        return f"time_field: must be one of {', '.join(TIME_FIELDS)}"
    if f.since_ms is not None and f.until_ms is not None and f.until_ms <= f.since_ms:
        return "until: must be later than since"
    if f.error is not None and len(f.error) > MAX_ERROR_TEXT:
        return f"error: at most {MAX_ERROR_TEXT} characters"
    if f.ids is not None and len(f.ids) > MAX_IDS:
        return f"ids: at most {MAX_IDS}"
    return None


def escape_like(text: str) -> str:
    r"""``text`` as a LIKE pattern matching itself anywhere (``ESCAPE '\'``)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


STATE_CONDITIONS = {
    "dead": "{p}state = 'dead'",
    "expired": "{p}state = 'expired'",
    "held": "{p}state = 'held'",
    "failing": "({p}state = 'pending' AND {p}last_error IS NOT NULL)",
}


def where(f: ReplayFilter, prefix: str = "", states: Sequence[str] | None = None
          ) -> tuple[str, list[Any]]:
    """The SQL condition (over ``deliveries`` aliased by ``prefix``) and its parameters.
    ``states`` narrows the filter's states (the replay takes dead and expired apart)."""
    p = prefix
    chosen = f.states if states is None else [s for s in f.states if s in states]
    if not chosen:
        return "FALSE", []
    parts = ["(" + " OR ".join(STATE_CONDITIONS[s].format(p=p) for s in chosen) + ")"]
    params: list[Any] = []
    if f.vendor:
        parts.append(f"{p}vendor = ?")
        params.append(f.vendor)
    if f.site_id:
        parts.append(f"{p}site_id = ?")
        params.append(f.site_id)
    column = TIME_FIELDS[f.time_field]
    if f.since_ms is not None:
        parts.append(f"{p}{column} >= ?")
        params.append(f.since_ms)
    if f.until_ms is not None:
        parts.append(f"{p}{column} < ?")
        params.append(f.until_ms)
    if f.error:
        # lower() on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's doesn't, and the
        # filter must match the same rows on either backend.
        parts.append(f"lower({p}last_error) LIKE ? ESCAPE '\\'")
        params.append(escape_like(f.error.lower()))
    if f.ids is not None:
        parts.append(f"{p}id IN ({','.join('?' * len(f.ids))})" if f.ids else "FALSE")
        params.extend(f.ids)
    return " AND ".join(parts), params


def fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    """Names a replay set: the rows made due (dead ones by id, re-planned expired ones by
    the rows they replace). A form carries it from the dry run to the replay, which goes
    ahead only if the set is still the same."""
    keys = sorted(f"r{','.join(map(str, row['replaces']))}" if row.get("replaces")
                  else str(row["id"]) for row in rows)
    return hashlib.sha256(" ".join(keys).encode()).hexdigest()[:32]
