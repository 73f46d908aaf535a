"""Cheaper ways of reading a body give what the plain ways gave.

``Origin``'s own ``__init__`` against the one ``dataclass`` would generate, and
``text_bounded``'s ``find`` against ``in``.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from server import events
from server.events import Origin

# What ``Origin`` was before its ``__init__`` was written out: the generated one.
Generated = dataclasses.make_dataclass(
    "Origin", [(f.name, f.type, f) for f in dataclasses.fields(Origin)], frozen=True)

_TEXT = st.one_of(st.none(), st.text(max_size=8))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=8), st.sampled_from(["browser", "backend"]), st.text(max_size=4),
       st.integers(), _TEXT, _TEXT)
def test_origin_holds_what_the_generated_init_would(site_id, source, currency, received_ms,
                                                     sc, secret) -> None:
    mine = Origin(site_id, source, currency, received_ms, sc, secret)
    theirs = Generated(site_id, source, currency, received_ms, sc, secret)
    assert dataclasses.astuple(mine) == dataclasses.astuple(theirs)
    assert repr(mine) == repr(theirs)
    assert hash(mine) == hash(theirs)
    assert mine == Origin(site_id=site_id, source=source, currency=currency,
                          received_ms=received_ms, sc=sc, identity_secret=secret)
    assert vars(mine) == vars(theirs)


def test_origin_keeps_its_defaults_signature_and_frozenness() -> None:
    origin = Origin("shop1", "backend", "USD", 1)
    assert (origin.sc, origin.identity_secret) == (None, None)
    generated = Generated("shop1", "backend", "USD", 1)
    assert dataclasses.astuple(origin) == dataclasses.astuple(generated)
    with pytest.raises(dataclasses.FrozenInstanceError):
        origin.sc = "X"  # type: ignore[misc]
    assert dataclasses.replace(origin, sc="ABC").sc == "ABC"
    with pytest.raises(TypeError):
        Origin("shop1", "backend", "USD")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Origin("shop1", "backend", "USD", 1, nonsense=2)  # type: ignore[call-arg]


def _text_bounded_with_in(body: bytes) -> bool:
    return len(body) <= events.MAX_STRING_CHARS and events._encoding(body) in events._UTF8 and (
        b"\\" not in body or b"\\ud" not in body and b"\\uD" not in body
        and b"\\u0000" not in body)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"{", b"}", b"\\", b"u", b"d", b"D", b"0", b"a", b"\x00",
                                 b"\xef\xbb\xbf"]), max_size=30).map(b"".join))
def test_text_bounded_answers_as_with_in(body: bytes) -> None:
    assert events.text_bounded(body) == _text_bounded_with_in(body)
