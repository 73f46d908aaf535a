"""What a backend gives the operator console: ``ConsoleReads``, the console's read-only
queries over the backend's tables, asked through three primitives.

The queries themselves (their SQL, bounds and the rows' shape) are the backend's neither:
``console_search.SearchReads`` (Live, Search, the event, delivery and install pages) and
``console_ops.OpsReads`` (Vendors, Dead letters, Reconciliation) write them once, in the
SQL both SQLite and PostgreSQL speak, with ``?`` placeholders. A backend supplies only
what really differs: how a query runs (``rows``), how a field inside stored JSON text is
read (``json_text``), how a list of texts is bound as one parameter (``text_in``), and
whether a row can become visible after a later seq (``late_window_s``, for Live), and
whether its planner hashes whole tables for small joins (``hash_joins``, for Vendors).
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

from .console_ops import OpsReads
from .console_search import SearchReads


class ConsoleReads(SearchReads, OpsReads, abc.ABC):
    """The console's reads on one backend; ``Store.console()`` returns one."""

    # Seconds a row may become visible after rows with a higher seq (0: never). One SQLite
    # writer commits in seq order; PostgreSQL nodes draw seqs from one sequence and commit
    # in any order, so Live looks again, for this long, at seqs it found missing.
    late_window_s: float = 0.0

    @abc.abstractmethod
    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """``sql`` (``?`` placeholders) on a read-only path, as dicts by column name."""

    @abc.abstractmethod
    def json_text(self, column: str, *path: str) -> str:
        """An SQL expression: the field at ``path`` inside the JSON text in ``column``, as
        text (NULL when missing)."""

    @abc.abstractmethod
    def text_in(self, values: Sequence[str]) -> tuple[str, Any]:
        """(``IN ...`` fragment with one ``?``, its parameter): membership in ``values``,
        however many, bound as one parameter."""
