"""Storage behind one small interface (``base.Store``); SQLite now, PostgreSQL later."""

from __future__ import annotations

from typing import Any

from .base import IngestResult, Store


def open_store(settings: Any) -> Store:
    """The store the settings name (only ``sqlite:///`` for now)."""
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.server.sqlite_path, settings.sites,
                       hold_ms=int(settings.server.hold_days * 86_400_000),
                       browser_grace_ms=int(settings.server.browser_grace_s * 1000))


__all__ = ["IngestResult", "Store", "open_store"]
