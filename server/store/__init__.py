"""Storage behind one small interface (``base.Store``); SQLite now, PostgreSQL later."""

from __future__ import annotations

import os
from typing import Any

from .base import IngestResult, Store, StoreUnavailable


def open_store(settings: Any, writer: str | None = None) -> Store:
    """The store the settings name (only ``sqlite:///`` for now).

    ``writer``: ``"process"`` (the default: the writer works on its own core) or
    ``"thread"``; ``$ONETAG_WRITER`` sets the default.
    """
    from .sqlite import SQLiteStore

    server = settings.server
    return SQLiteStore(server.sqlite_path, settings.sites,
                       hold_ms=int(server.hold_days * 86_400_000),
                       browser_grace_ms=int(server.browser_grace_s * 1000),
                       writer=writer or os.environ.get("ONETAG_WRITER", "process"),
                       writer_timeout_s=server.writer_timeout_s,
                       max_pending_writes=server.max_pending_writes,
                       max_pending_bytes=server.max_pending_bytes)


__all__ = ["IngestResult", "Store", "StoreUnavailable", "open_store"]
