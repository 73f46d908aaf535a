"""JSON as the store keeps it: compact UTF-8 text, written with orjson.

Encoding the stored JSON (each event as sent and as normalised, carts, delivery requests)
was a third of the writer's CPU per event with the standard library (callgrind of the
writer under ``bench/ingest.py``'s load); orjson does the same in about a sixth of the time
and writes the same text. Reading stays with the standard library (``loads`` says why),
as does parsing request bodies (``events.parse_json``: ``parse_float=Decimal``, as money
must never pass through a float).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson


def json_number(value: Any) -> Any:
    """``default`` for encoders: a Decimal (from a parsed request) as the JSON number it was
    parsed from; anything else unknown as its text."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


# The standard library's encoder, with the same output, for what orjson refuses: integers
# beyond 64 bits (a storefront may send any JSON number as a custom property).
_fallback = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=json_number).encode


def encode(value: Any) -> bytes:
    """UTF-8 JSON to store: bind it as ``CAST(? AS TEXT)``, and SQLite keeps the bytes as
    they are as TEXT (a ``str`` would be decoded here only to be encoded again by sqlite3)."""
    try:
        return orjson.dumps(value, default=json_number)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _fallback(value).encode()


def loads(text: str | bytes) -> Any:
    """The standard library's parser: orjson would read an integer beyond 64 bits as a
    float, and stored events keep whatever numbers the storefront sent."""
    return json.loads(text)
