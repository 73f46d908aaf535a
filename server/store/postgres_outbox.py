"""The outbox half of the PostgreSQL store (claims with leases, outcomes, replays, stats):
written on the ``pgscale`` branch, which replaces this file. ``PostgresStore`` inherits it
and lends it ``self.pool`` (asyncpg).

Until then each outbox call says so, rather than the store failing to instantiate: ingest,
``onetag migrate`` and ``session_view`` work without it.
"""

from __future__ import annotations

from typing import Any


def _missing(name: str) -> Any:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"PostgresStore.{name}: the PostgreSQL outbox is not in "
                                  "this build (branch pgscale)")
    method.__name__ = name
    return method


class PostgresOutbox:
    for _name in ("claim", "finish", "expire_held", "delivery_stats", "replay", "replay_rows",
                  "list_deliveries"):
        locals()[_name] = _missing(_name)
    del _name
