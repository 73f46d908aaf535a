"""Storage behind one small interface (``base.Store``): SQLite (the default) or PostgreSQL."""

from __future__ import annotations

import os
from typing import Any

from .base import IngestResult, Store, StoreUnavailable

DRIVER_MISSING = ("the database URL names PostgreSQL, but its driver is not installed: "
                  "pip install 'onetag[postgresql]' (asyncpg)")


class DriverMissing(RuntimeError):
    """``database`` names PostgreSQL and asyncpg can't be imported."""


def open_store(settings: Any, writer: str | None = None) -> Store:
    """The store the settings name: ``sqlite:///PATH`` or ``postgresql://...``.

    ``writer`` (SQLite only): ``"process"`` (the default: the writer works on its own core)
    or ``"thread"``; ``$ONETAG_WRITER`` sets the default.
    """
    server = settings.server
    if getattr(server, "is_postgresql", False):
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            raise DriverMissing(DRIVER_MISSING) from None
        from .postgres import PostgresStore

        return PostgresStore(server.database, settings.sites,
                             hold_ms=int(server.hold_days * 86_400_000),
                             browser_grace_ms=int(server.browser_grace_s * 1000),
                             max_pending_writes=server.max_pending_writes,
                             max_pending_bytes=server.max_pending_bytes)
    from .sqlite import SQLiteStore

    return SQLiteStore(server.sqlite_path, settings.sites,
                       hold_ms=int(server.hold_days * 86_400_000),
                       browser_grace_ms=int(server.browser_grace_s * 1000),
                       writer=writer or os.environ.get("ONETAG_WRITER", "process"),
                       writer_timeout_s=server.writer_timeout_s,
                       max_pending_writes=server.max_pending_writes,
                       max_pending_bytes=server.max_pending_bytes)


__all__ = ["DriverMissing", "IngestResult", "Store", "StoreUnavailable", "open_store"]
