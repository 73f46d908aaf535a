"""The console's reads on PostgreSQL (``console_reads.ConsoleReads``): the store's pool,
``?`` turned into ``$n``, JSON fields read from the TEXT columns with ``::json #>>``, lists
bound as ``text[]``. Each query runs on its own pooled connection, outside any transaction
that writes; PostgreSQL's snapshot isolation lets it read beside ingest without waiting."""

from __future__ import annotations

import re
from typing import Any, Sequence

from .console_reads import ConsoleReads

# A quoted SQL literal (kept as it is) or a placeholder (numbered).
_TOKEN = re.compile(r"'(?:[^']|'')*'|\?")
# Seconds a seq Live found missing is looked for again: an ingest transaction draws its
# seqs and commits within milliseconds, unless it is run again after losing a race.
LATE_WINDOW_S = 5.0


def numbered(sql: str) -> str:
    """``sql`` with each ``?`` outside a quoted literal as ``$1``, ``$2``, ..."""
    counter = iter(range(1, 1_000_000))
    return _TOKEN.sub(lambda m: m.group(0) if m.group(0) != "?" else f"${next(counter)}", sql)


class PgConsole(ConsoleReads):
    late_window_s = LATE_WINDOW_S
    hash_joins = True

    def __init__(self, pool: Any):
        self.pool = pool

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in await self.pool.fetch(numbered(sql), *params)]

    def json_text(self, column: str, *path: str) -> str:
        return f"({column}::json #>> '{{{','.join(path)}}}')"

    def text_in(self, values: Sequence[str]) -> tuple[str, Any]:
        # A subquery, not ``= ANY(array)``: the planner then probes the index per value
        # instead of scanning the table for a long array (bench/pg_console_plan.py).
        return "IN (SELECT unnest(?::text[]))", list(values)
