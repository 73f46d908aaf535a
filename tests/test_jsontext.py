"""Stored JSON: orjson's text, the standard library's where orjson can't."""

from __future__ import annotations

import json
from decimal import Decimal

from server.jsontext import encode, loads


def dumps(value) -> str:
    return encode(value).decode()


def test_same_text_as_the_standard_library() -> None:
    value = {"event": "add_to_cart", "price": Decimal("29.99"), "qty": Decimal("2"),
             "name": "Mug — Bench Shop", "nested": {"a": [1, None, True]}, "empty": {}}
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          default=lambda d: int(d) if d == d.to_integral_value() else float(d))
    assert dumps(value) == expected
    assert loads(dumps(value))["price"] == 29.99 and loads(dumps(value))["qty"] == 2


def test_integers_beyond_64_bits_are_kept_exactly() -> None:
    value = {"order_ref": 123456789012345678901234567890, "negative": -(2 ** 70)}
    text = dumps(value)
    assert text == '{"order_ref":123456789012345678901234567890,"negative":-1180591620717411303424}'
    assert loads(text) == value
