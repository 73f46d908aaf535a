"""The console's reads on SQLite (``console_reads.ConsoleReads``): the store's aiosqlite
reader connection (WAL: never waiting for the writer), ``json_extract``, ``json_each``."""

from __future__ import annotations

import json
from typing import Any, Sequence

import aiosqlite

from .console_reads import ConsoleReads


class SQLiteConsole(ConsoleReads):
    def __init__(self, db: aiosqlite.Connection):
        self.db = db

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = await self.db.execute(sql, list(params))
        try:
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in await cursor.fetchall()]
        finally:
            await cursor.close()

    def json_text(self, column: str, *path: str) -> str:
        return f"json_extract({column}, '$.{'.'.join(path)}')"

    def text_in(self, values: Sequence[str]) -> tuple[str, Any]:
        return "IN (SELECT value FROM json_each(?))", json.dumps(list(values))
