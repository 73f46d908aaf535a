"""Storage behind one small interface (``base.Store``); SQLite now, PostgreSQL later."""

from __future__ import annotations

import os
from typing import Any

from .base import IngestResult, Store


def open_store(settings: Any, writer: str | None = None) -> Store:
    """The store the settings name (only ``sqlite:///`` for now).

    ``writer``: ``"process"`` (the default: the writer works on its own core) or
    ``"thread"``; ``$ONETAG_WRITER`` sets the default.
    """
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.server.sqlite_path, settings.sites,
                       hold_ms=int(settings.server.hold_days * 86_400_000),
                       browser_grace_ms=int(settings.server.browser_grace_s * 1000),
                       writer=writer or os.environ.get("ONETAG_WRITER", "process"))


__all__ = ["IngestResult", "Store", "open_store"]
