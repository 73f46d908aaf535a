"""Storage behind one small interface (``base.Store``): SQLite (the default) or PostgreSQL."""

from __future__ import annotations

import os
from typing import Any

from .base import IngestResult, Store, StoreUnavailable

DRIVER_MISSING = ("the database URL names PostgreSQL, but its driver is not installed: "
                  "pip install '.[postgresql]' in onetag's checkout (asyncpg), or "
                  "pip install 'onetag[postgresql]' where onetag came from a package index")


# Which onetag process a PostgreSQL connection is (pg_stat_activity's application_name):
# ``onetag`` said nothing of serve, worker or migrate. ``cli.main`` sets it for the command;
# a child (the node's writer process) inherits it.
APPLICATION_NAME_ENV = "ONETAG_APPLICATION_NAME"


def application_name(part: str = "") -> str:
    """``onetag serve``, ``onetag worker``, ``onetag serve (writer)``, ...: at most the 63
    bytes PostgreSQL keeps."""
    name = os.environ.get(APPLICATION_NAME_ENV) or "onetag"
    return (f"{name} ({part})" if part else name)[:63]


class DriverMissing(RuntimeError):
    """``database`` names PostgreSQL and asyncpg can't be imported."""


def open_store(settings: Any, writer: str | None = None, ingest: bool = True) -> Store:
    """The store the settings name: ``sqlite:///PATH`` or ``postgresql://...``.

    ``writer``: ``"process"`` (the default: the writer works on its own core) or
    ``"thread"`` (in this process: SQLite's connection thread, PostgreSQL's ``"inline"``
    writer on this process's loop); ``$ONETAG_WRITER`` sets the default. ``ingest=False``:
    the caller takes no events (a worker, a CLI command), so PostgreSQL, whose writer does
    nothing else, runs it in this process instead of starting one.
    """
    server = settings.server
    writer = writer or os.environ.get("ONETAG_WRITER", "process")
    if getattr(server, "is_postgresql", False):
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            raise DriverMissing(DRIVER_MISSING) from None
        from .postgres import PostgresStore

        return PostgresStore(server.database, settings.sites,
                             hold_ms=int(server.hold_days * 86_400_000),
                             browser_grace_ms=int(server.browser_grace_s * 1000),
                             writer="process" if writer == "process" and ingest else "inline",
                             writer_timeout_s=server.writer_timeout_s,
                             max_pending_writes=server.max_pending_writes,
                             max_pending_bytes=server.max_pending_bytes)
    from .sqlite import SQLiteStore

    return SQLiteStore(server.sqlite_path, settings.sites,
                       hold_ms=int(server.hold_days * 86_400_000),
                       browser_grace_ms=int(server.browser_grace_s * 1000),
                       writer=writer,
                       writer_timeout_s=server.writer_timeout_s,
                       max_pending_writes=server.max_pending_writes,
                       max_pending_bytes=server.max_pending_bytes)


__all__ = ["DriverMissing", "IngestResult", "Store", "StoreUnavailable", "open_store"]
