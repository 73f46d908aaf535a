"""The shortcuts that make reading a body cheaper give the answers of the long way round.

Each shortcut in ``server/events.py`` and ``server/money.py`` answers the common case
itself and leaves the rest to the code it stands in for; these properties hold it to that.
"""

from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import example, given, settings, strategies as st

from server import events, money

_DECIMALS = st.decimals(allow_nan=True, allow_infinity=True, places=None).filter(
    lambda d: not d.is_finite() or len(d.as_tuple().digits) <= events.MAX_DIGITS)
_SMALL = st.builds(Decimal, st.from_regex(r"-?[0-9]{1,13}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,2})?",
                                          fullmatch=True))


@settings(max_examples=400, deadline=None)
@given(_SMALL, st.sampled_from(["USD", "JPY", "KWD", "CLF", "usd"]))
def test_exact_to_minor_is_to_minor(amount: Decimal, currency: str) -> None:
    if amount.adjusted() < 12:
        assert money.exact_to_minor(amount, currency) == money.to_minor(amount, currency)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_DECIMALS, _SMALL))
def test_a_plainly_fitting_number_fits(value: Decimal) -> None:
    if events._plainly_fits(value):
        assert events._leaf_fits(value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=' \t\n{}[]":,0123456789.eE-abc\\u', max_size=40))
def test_the_direct_scan_answers_as_decode(text: str) -> None:
    def answer(decode):
        try:
            return ("value", repr(decode(text)))
        except json.JSONDecodeError as exc:
            return ("error", str(exc))
        except (RecursionError, ValueError) as exc:
            return (type(exc).__name__,)
    assert answer(events._decode) == answer(events._DECODER.decode)


@given(st.binary(max_size=12))
def test_the_encoding_shortcut_is_detect_encoding(body: bytes) -> None:
    assert events._encoding(body) == json.detect_encoding(body)
    assert events._encoding(b"{" + body) == json.detect_encoding(b"{" + body)


@example(b"\x00\x00\x00\x00")  # UTF-32 by JSON's detection: its escapes are other bytes
@given(st.binary(max_size=60).map(lambda b: b.replace(b"x", b"\\")))
def test_text_bounded_is_the_two_searches(body: bytes) -> None:
    assert events.text_bounded(body) == (len(body) <= events.MAX_STRING_CHARS
                                         and json.detect_encoding(body) in ("utf-8", "utf-8-sig")
                                         and b"\\ud" not in body and b"\\uD" not in body)


def test_every_standard_event_name_passes_the_name_pattern() -> None:
    # normalise skips EVENT_NAME_RE for a standard name.
    assert all(events.EVENT_NAME_RE.fullmatch(name) for name in events.STANDARD)
