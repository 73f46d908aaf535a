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
@given(st.one_of(st.binary(max_size=60).map(lambda b: b.replace(b"x", b"\\")),
                 st.lists(st.sampled_from([b"\\", b"u", b"0", b"d", b"{", b"a", b"\\u0000",
                                           b"\\uD8"]), max_size=20).map(b"".join)))
def test_text_bounded_is_the_three_searches(body: bytes) -> None:
    assert events.text_bounded(body) == (len(body) <= events.MAX_STRING_CHARS
                                         and json.detect_encoding(body) in ("utf-8", "utf-8-sig")
                                         and b"\\ud" not in body and b"\\uD" not in body
                                         and b"\\u0000" not in body)


_PIECES = st.sampled_from(["a", "\u00e9", "\\", "\\u0000", "\u0000", "\\ud800",
                           "\\u00e9", "\\\\"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=6).map("".join), st.lists(_PIECES, max_size=4).map("".join))
def test_a_text_bounded_body_holds_no_string_or_key_out_of_bounds(value: str, key: str) -> None:
    """What ``text_bounded`` passes, ``normalise`` reads without checking its strings: it
    must hold no lone surrogate and no NUL (``\\u0000``, refused on both backends)."""
    body = ('{"events":[{"%s":"%s"}]}' % (key, value)).encode()
    try:
        parsed = events.parse_json(body)
    except events.Invalid:
        return
    if events.text_bounded(body):
        assert events._fits(parsed, 1, True)
    (parsed_key, parsed_value), = parsed["events"][0].items()
    if "\x00" in parsed_value or "\x00" in parsed_key:
        assert not events._fits(parsed, 1, True)
        try:
            events.check_bounds(parsed["events"][0], "events[0]")
        except events.Invalid as exc:
            assert exc.problem == events.NUL_PROBLEM or "lone surrogate" in exc.problem
        else:
            raise AssertionError("a NUL passed check_bounds")


def test_every_standard_event_name_passes_the_name_pattern() -> None:
    # normalise skips EVENT_NAME_RE for a standard name.
    assert all(events.EVENT_NAME_RE.fullmatch(name) for name in events.STANDARD)
