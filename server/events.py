"""The event vocabulary: one validator and normaliser for browser and backend events alike.

Input is GA4 e-commerce as a storefront pushes it, parsed with ``parse_float=Decimal`` so
prices never pass through binary floats. Output is the normalised event documented in
docs/architecture.md: money in integer minor units, emails lower-cased, items flattened.
Every problem names its field with a path (``events[2].ecommerce.items[0].price``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable
from urllib.parse import urlsplit

from . import money
from . import jsontext
from . import trust

MAX_EVENT_BYTES = 32 * 1024

ORDER_STATUSES = ("pending", "processing", "completed", "fulfilled", "cancelled", "refunded",
                  "failed")
# Events whose ecommerce.items must be a non-empty list / may be an empty list (a cart).
ITEMS_REQUIRED = frozenset({"view_item", "add_to_cart", "remove_from_cart", "add_to_wishlist",
                            "product_updated"})
ITEMS_LIST = frozenset({"view_cart", "begin_checkout", "cart_updated", "view_item_list",
                        "purchase", "refund", "search"})
CART_REPLACING = frozenset({"view_cart", "begin_checkout", "cart_updated"})
CART_DELTAS = frozenset({"add_to_cart", "remove_from_cart"})
STANDARD = frozenset({
    "page_view", "view_item", "view_item_list", "search", "add_to_cart", "remove_from_cart",
    "view_cart", "begin_checkout", "purchase", "refund", "add_to_wishlist", "identify",
    "cart_updated", "order_status", "product_updated", "unsubscribe", "opt_in"})
BACKEND_ONLY = frozenset({"order_status", "product_updated"})

# Always used with ``fullmatch``: ``match`` with ``$`` lets a trailing newline through, and
# an ``sc`` with one was committed, then refused by h11 as a Set-Cookie header.
EVENT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:/-]{0,63}")
EVENT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# Local part and domain without whitespace, "/", "@", NUL or any control character: vendors
# put the email in URL paths (Rejoiner's customers/by_email/{email}) and mail headers.
_EMAIL_CHAR = r"[^@\s/\x00-\x1f\x7f]"
EMAIL_RE = re.compile(rf"{_EMAIL_CHAR}{{1,64}}@{_EMAIL_CHAR}+\.{_EMAIL_CHAR}{{2,}}")
SC_RE = re.compile(r"[A-Za-z0-9-]{8,64}")
# Person fields (user's first_name, last_name, phone, customer_id; every address field):
# vendors put names in mail headers and subject lines ("Hi Eve" in a Subject:), so no
# invisible character (``invisible_char``): no control character (CR LF there would add a
# header), no line or paragraph separator, and no bidirectional embedding, override or
# isolate, which change how the text around them reads in the console and at the vendors.
PERSON_PROBLEM = ("contains {char}: no control characters (line breaks, tabs), line separators "
                  "or bidirectional controls (U+202A-U+202E, U+2066-U+2069) in a person's "
                  "fields, which vendors put in mail headers and subject lines")
EMAIL_PROBLEM = ("contains {char}: an email address may hold no control or format character "
                 "(bidirectional controls, zero-width characters), which change how it reads")
# The cart state's GUID the browser used with the event (eSputnik's StatusCart/PurchasedItems
# GUID): the store adopts it, so both paths quote one GUID per cart state.
CART_GUID_RE = re.compile(r"[A-Za-z0-9-]{8,64}")
MAX_URL_CHARS = 2048
ITEM_URLS = frozenset({"item_url", "image_url"})  # item strings that must be http(s) URLs
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: Unicode's Cc
CURRENCY_RE = re.compile(r"[A-Za-z]{3}")

# Bounds on anything an event carries, checked (``check_bounds``) before any conversion:
# a 1e300000 quantity took ~9 s in ``int(Decimal(...))``, a 4,400-digit integer or a lone
# surrogate failed deep in the store. Documented in docs/operations.md ("Bad input and faults").
MAX_DEPTH = 8  # objects and lists inside an event, the event object counting as 1
MAX_STRING_CHARS = 8192  # any string or key (most fields allow less)
MAX_KEYS = 100  # keys in one object
MAX_LIST = 500  # entries in one list
MAX_NUMBER = 10**18  # |n| of any number
MAX_DIGITS = 40  # significant digits of any number, and digits after its point
MAX_MONEY_MAJOR = 10**12  # value, price, tax, shipping, in major units
MAX_QUANTITY = 100_000
MIN_TIME_MS = 946_684_800_000  # 2000-01-01: an event's ``time`` (Unix ms) is after it ...
MAX_FUTURE_MS = 86_400_000  # ... and at most a day ahead of the server's clock
# No string or key may hold U+0000 (JSON's ``\u0000``): PostgreSQL text can't, so both
# backends refuse it here, before anything is stored, and no vendor is ever sent one.
NUL_PROBLEM = "contains a NUL character (\\u0000), which onetag does not store or send"

USER_STRINGS = ("customer_id", "first_name", "last_name", "phone")
ITEM_STRINGS = ("item_name", "item_brand", "item_variant", "item_url", "image_url", "description",
                "item_list_id", "item_list_name", "coupon", "affiliation",
                "item_sku",  # onetag addition to GA4 items: the SKU when it is not item_id
                # onetag additions for the catalog and its feeds (server/catalog.py): Google
                # Merchant Center's item_group_id (the variants' parent) and category
                "item_group_id", "google_product_category")
# onetag addition: an item's availability in Google Merchant Center's words (the feeds'
# g:availability); "in stock" is read as in_stock. ``in_stock`` alone still works.
AVAILABILITY = ("in_stock", "out_of_stock", "preorder", "backorder")
CATEGORY_KEYS = ("item_category", "item_category2", "item_category3", "item_category4",
                 "item_category5")
ADDRESS_KEYS = ("first_name", "last_name", "company", "address_1", "address_2", "city", "state",
                "state_code", "postal_code", "country", "country_code", "phone", "email")
# Keys read into the normalised event; anything else on a custom event becomes a property.
KNOWN_KEYS = frozenset({"event", "event_id", "time", "page", "page_location", "page_referrer",
                        "page_title", "loaded", "user", "ecommerce", "search_term",
                        "transaction_id", "status", "billing_address", "shipping_address",
                        "sc", "source", "cart_guid"})
# Events that have an ``ecommerce`` object even when they are sent without one.
_ECOMMERCE_EVENTS = ITEMS_REQUIRED | (ITEMS_LIST - {"search", "view_item_list"}) | {"order_status"}


ECHO_CHARS = 40  # of a value a problem quotes back: a 5,000-character name is not echoed


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """``value`` quoted for a problem message, cut to its first ``limit`` characters with an
    ellipsis: ``'aaaa…'``. Every message that quotes what a sender sent goes through here,
    so a 4xx never echoes a long value back whole."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    cut = repr(text[:limit])
    return cut[:-1] + "…" + cut[-1]


class Invalid(Exception):
    """An input problem; ``field`` is a path into the request body."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem}


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562: 48 bits of Unix milliseconds, then random bits), as the browser
    runtime makes them: ids that grow with time keep inserts into the events table's
    ``(site_id, event_id)`` index at its end instead of on a random page each."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return str(uuid.UUID(int=value))


class LongNumber(str):
    """A JSON number whose text is too long for any bound (``MAX_NUMBER_TEXT``), kept as its
    text: never converted (``int()`` refuses over 4,300 digits, with a message about its own
    settings), and refused by ``check_bounds`` naming the field."""


MAX_NUMBER_TEXT = MAX_DIGITS + 12  # the digits, a sign, a point, an exponent


def _parse_int(text: str) -> int | LongNumber:
    return int(text) if len(text) <= MAX_NUMBER_TEXT else LongNumber(text)


def _parse_float(text: str) -> Decimal | LongNumber:
    return Decimal(text) if len(text) <= MAX_NUMBER_TEXT else LongNumber(text)


# One decoder for every body: json.loads(..., parse_float=...) builds a new one per call.
_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int)


def _encoding(body: bytes) -> str:
    """``json.detect_encoding``'s answer; a body that opens with ``{`` then a byte other
    than NUL (every beacon) is UTF-8 to it, answered without its BOM and NUL tests."""
    if body[:1] == b"{" and body[1:2] != b"\x00":
        return "utf-8"
    return json.detect_encoding(body)


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``. A document with no whitespace around it (every beacon)
    goes straight to the scanner, without ``decode``'s two whitespace matches; anything
    else, and every error, goes through ``decode``, which says what is wrong and where."""
    try:
        value, end = _DECODER.scan_once(text, 0)
    except StopIteration:  # leading whitespace, or no JSON value at all
        return _DECODER.decode(text)
    return value if end == len(text) else _DECODER.decode(text)


def parse_json(body: bytes) -> Any:
    """Decode a request body (as ``json.loads`` would); floats become Decimal so money
    stays exact. Bytes that are not UTF-8 (a surrogate encoded as ``ED A0 80``), nesting
    past the interpreter's recursion limit and integers past its digit limit are refused
    here; ``check_bounds`` refuses what parses but is out of bounds."""
    try:
        text = body.decode(_encoding(body))
    except UnicodeDecodeError as exc:
        raise Invalid("body", f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return _decode(text)
    except json.JSONDecodeError as exc:
        raise Invalid("body", f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise Invalid("body", f"nests too deep (the limit is {MAX_DEPTH} levels an event)") from None


def check_bounds(value: Any, where: str, text: bool = True) -> None:
    """Refuse, naming the field, any value out of the bounds above (``MAX_*``, ``NUL_PROBLEM``).

    Walks the parsed event once, without building a path per field (``_fits``: about a fifth
    of the writer's time per event, that way); only a value that does not fit is walked
    again to name its field (``_explain``). The depth of both walks is bounded.
    """
    if not _fits(value, 1, text):
        _explain(value, where, 1)


def _text_fits(text: str) -> bool:
    if len(text) > MAX_STRING_CHARS or "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fits(value: Any, depth: int, text: bool = True) -> bool:
    """Whether ``value`` is within every bound: ``_explain``'s rules, leaves checked inline.
    ``text=False`` skips strings and keys, for a body that can hold no string out of bounds
    (``text_bounded``)."""
    kind = type(value)
    if kind is dict:
        if depth > MAX_DEPTH or len(value) > MAX_KEYS:
            return False
        items: Iterable[Any] = value.values()
        if text:
            for key in value:
                if not (len(key) <= 64 and key.isascii() and "\x00" not in key) \
                        and not _text_fits(key):
                    return False
    elif kind is list:
        if depth > MAX_DEPTH or len(value) > MAX_LIST:
            return False
        items = value
    else:
        return _leaf_fits(value)
    for item in items:
        kind = type(item)
        if kind is str:
            if text and (len(item) > MAX_STRING_CHARS or "\x00" in item
                         or not item.isascii() and not _text_fits(item)):
                return False
        elif kind is int:
            if not -MAX_NUMBER <= item <= MAX_NUMBER:
                return False
        elif kind is Decimal:
            if not _plainly_fits(item) and not _leaf_fits(item):
                return False
        elif kind is dict or kind is list:
            if not _fits(item, depth + 1, text):
                return False
        elif not _leaf_fits(item):
            return False
    return True


def text_bounded(body: bytes) -> bool:
    """Whether no string or key parsed from ``body`` can be out of bounds: none can be longer
    than the body, and a lone surrogate can only come from a ``\\ud...`` escape, a NUL only
    from ``\\u0000`` (the bytes themselves are decoded strictly, and a raw control
    character is not JSON). Substring searches instead of a look at each string:
    most beacons are a few KB, and most have no backslash at all, which one ``memchr``
    finds (a three-byte pattern is searched for at about ten instructions a byte). Only
    for UTF-8 (JSON may also come as UTF-16 or UTF-32, where an escape is other bytes).
    ``find`` rather than ``in``: ``bytes.__contains__`` first tries its argument as an
    integer, raising and clearing a TypeError, about 1,100 instructions a search."""
    return len(body) <= MAX_STRING_CHARS and _encoding(body) in _UTF8 and (
        body.find(b"\\") < 0 or body.find(b"\\ud") < 0 and body.find(b"\\uD") < 0
        and body.find(b"\\u0000") < 0)


_UTF8 = ("utf-8", "utf-8-sig")


_MAX_DECIMAL = Decimal(MAX_NUMBER)
_MAX_MONEY = Decimal(MAX_MONEY_MAJOR)
_NUMBER_EXPONENT = len(str(MAX_NUMBER)) - 1  # |n| < MAX_NUMBER when n.adjusted() is below it


def _plainly_fits(value: Decimal) -> bool:
    """A sufficient test for a Decimal within bounds (``_leaf_fits`` decides the rest):
    finite, and its leading digit's exponent neither too small nor large enough to pass
    ``MAX_NUMBER``. Two cheap calls instead of two Decimal comparisons for every price."""
    return -MAX_DIGITS <= value.adjusted() < _NUMBER_EXPONENT and value.is_finite()


def _leaf_fits(value: Any) -> bool:
    if type(value) is Decimal:  # the digits were bounded by the parser (MAX_NUMBER_TEXT)
        return value.is_finite() and (not value or (
            value.adjusted() >= -MAX_DIGITS and -_MAX_DECIMAL <= value <= _MAX_DECIMAL))
    if isinstance(value, LongNumber):
        return False
    if isinstance(value, str):
        return _text_fits(value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -MAX_NUMBER <= value <= MAX_NUMBER
    if isinstance(value, Decimal):
        return _decimal_problem(value, MAX_NUMBER) is None
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= MAX_NUMBER
    return True


def _explain(value: Any, where: str, depth: int) -> None:
    """Raise ``Invalid`` naming the first field of ``value`` out of bounds."""
    if isinstance(value, LongNumber):
        raise Invalid(where, f"has more than {MAX_DIGITS} digits")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        if depth > MAX_DEPTH:
            raise Invalid(where, f"nests too deep (the limit is {MAX_DEPTH} levels an event)")
        if len(value) > MAX_KEYS:
            raise Invalid(where, f"has {len(value)} keys; the limit is {MAX_KEYS}")
        for key, item in value.items():
            _check_text(key, f"{where}.{key[:64]!r}" if not key.isidentifier() else f"{where}.{key}")
            _explain(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        if depth > MAX_DEPTH:
            raise Invalid(where, f"nests too deep (the limit is {MAX_DEPTH} levels an event)")
        if len(value) > MAX_LIST:
            raise Invalid(where, f"has {len(value)} entries; the limit is {MAX_LIST}")
        for i, item in enumerate(value):
            _explain(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -MAX_NUMBER <= value <= MAX_NUMBER:
            raise Invalid(where, f"is out of bounds (at most {MAX_NUMBER:.0e} either way)")
    elif isinstance(value, Decimal):
        _check_decimal(value, where, MAX_NUMBER)
    elif isinstance(value, float):  # from a parsed body, only NaN and Infinity
        if not math.isfinite(value):
            raise Invalid(where, "must be a finite number")
        if abs(value) > MAX_NUMBER:
            raise Invalid(where, f"is out of bounds (at most {MAX_NUMBER:.0e} either way)")


def _check_text(text: str, where: str) -> None:
    if len(text) > MAX_STRING_CHARS:
        raise Invalid(where, f"is longer than {MAX_STRING_CHARS} characters")
    if "\x00" in text:
        raise Invalid(where, NUL_PROBLEM)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Invalid(where, f"has a lone surrogate (\\u{ord(text[exc.start]):04x}); "
                          "send text as valid UTF-8") from None


def _check_decimal(value: Decimal, where: str, limit: int) -> None:
    """A parsed JSON number: finite, within ``limit`` and ``MAX_DIGITS``, read without ever
    expanding its exponent (``Decimal('1e300000')`` is cheap; ``int()`` of it is not)."""
    problem = _decimal_problem(value, limit)
    if problem is not None:
        raise Invalid(where, problem)


def _decimal_problem(value: Decimal, limit: int) -> str | None:
    if not value.is_finite():
        return "must be a finite number"
    digits, exponent = value.as_tuple()[1:]
    if len(digits) > MAX_DIGITS or exponent < -MAX_DIGITS:  # type: ignore[operator]
        return f"has more than {MAX_DIGITS} digits"
    if value and value.adjusted() >= len(str(limit)) - 1 and abs(value) > limit:
        return f"is out of bounds (at most {limit:.0e} either way)"
    return None


@dataclass(frozen=True)
class Origin:
    """Facts about how an event arrived, added by the endpoint, not by the sender."""

    site_id: str
    source: str  # "browser" | "backend"
    currency: str  # the site's default
    received_ms: int
    sc: str | None = None
    identity_secret: str | None = None  # the site's, for user.signature (server/trust.py)

    def __init__(self, site_id: str, source: str, currency: str, received_ms: int,
                 sc: str | None = None, identity_secret: str | None = None) -> None:
        """The generated one's signature and fields, stored straight into the instance's
        dict: a frozen dataclass's own ``__init__`` sets each field through
        ``object.__setattr__``, about 1,400 instructions a field, and the writer makes an
        ``Origin`` for every browser request (10,500 instructions of a 203,000-instruction
        beacon read; 4,300 this way)."""
        fields = self.__dict__
        fields["site_id"] = site_id
        fields["source"] = source
        fields["currency"] = currency
        fields["received_ms"] = received_ms
        fields["sc"] = sc
        fields["identity_secret"] = identity_secret


def normalise(raw: Any, where: str, origin: Origin, *, check_size: bool = True,
              check_text: bool = True) -> dict[str, Any]:
    """Validate one event and return its normalised form; raises ``Invalid``.

    ``check_size=False`` when the whole body is already within one event's limit;
    ``check_text=False`` when no string in it can be out of bounds (``text_bounded``).
    """
    if not isinstance(raw, dict):
        raise Invalid(where, "must be an object")
    check_bounds(raw, where, check_text)
    if check_size:
        size = len(json.dumps(raw, default=str, separators=(",", ":")))
        if size > MAX_EVENT_BYTES:
            raise Invalid(where, f"is {size} bytes; the limit is {MAX_EVENT_BYTES} bytes an event")
    name = raw.get("event")
    if not isinstance(name, str) or not name:
        raise Invalid(f"{where}.event", "is required: the event name, e.g. \"view_item\"")
    if name not in STANDARD and not EVENT_NAME_RE.fullmatch(name):  # a set look-up, mostly
        raise Invalid(f"{where}.event", f"{echo(name)} is not a valid event name "
                      "(a letter, then up to 63 of A-Z a-z 0-9 _ . : / -)")
    if name in BACKEND_ONLY and origin.source == "browser":
        raise Invalid(f"{where}.event", f"{echo(name)} is accepted from the backend API only")

    event_id = raw.get("event_id")
    if event_id is None and origin.source == "backend":
        event_id = new_event_id()
    if event_id is None:
        raise Invalid(f"{where}.event_id", "is required: a string id (a UUID) kept across retries")
    if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
        sent = echo(event_id) if isinstance(event_id, str) else _type(event_id)
        raise Invalid(f"{where}.event_id", f"must be 1 to 128 of A-Z a-z 0-9 _ . : - "
                      f"([A-Za-z0-9_.:-]{{1,128}}; a UUID kept across retries), not {sent}")

    time_ms = _optional_int(raw, "time", where, minimum=MIN_TIME_MS,
                            maximum=origin.received_ms + MAX_FUTURE_MS)
    sc = origin.sc
    if origin.source == "backend" and raw.get("sc") is not None:
        sc = _string(raw, "sc", where)
        if not SC_RE.fullmatch(sc):
            raise Invalid(f"{where}.sc", "must be the visitor's sc cookie value")
        sc = sc.upper()

    sent_user = raw.get("user")
    if sent_user is None:  # most browser events: nothing to read or verify
        user, source = None, origin.source
    else:
        user = _user(sent_user, f"{where}.user")
        source = _signed_source(sent_user, user, where, origin)
    event: dict[str, Any] = {
        "event_id": event_id,
        "name": name,
        "source": source,
        "site_id": origin.site_id,
        "time_ms": time_ms if time_ms is not None else origin.received_ms,
        "received_ms": origin.received_ms,
        "sc": sc,
        "page": _page(raw, where),
        "user": user,
        "ecommerce": None,
        "search_term": None,
        "status": None,
        # Each helper below answers None for a key not sent (most events): not called then.
        "billing_address": (_address(raw, "billing_address", where)
                            if "billing_address" in raw else None),
        "shipping_address": (_address(raw, "shipping_address", where)
                             if "shipping_address" in raw else None),
        "properties": _properties(raw),
        "loaded": _loaded(raw, where) if origin.source == "browser" else [],
        "cart": None,
        "identity": None,
        "cart_guid": _cart_guid(raw, where) if "cart_guid" in raw else None,
    }
    ecommerce = raw.get("ecommerce")
    if (ecommerce is not None or raw.get("transaction_id") is not None
            or name in _ECOMMERCE_EVENTS):
        event["ecommerce"] = _ecommerce(ecommerce, f"{where}.ecommerce", name, origin.currency, raw)
    if "search_term" in raw or name == "search":
        event["search_term"] = _string(raw, "search_term", where, required=name == "search")
    if "status" in raw or name == "order_status":
        status = _string(raw, "status", where, required=name == "order_status")
        if status is not None and status not in ORDER_STATUSES:
            raise Invalid(f"{where}.status", f"must be one of {', '.join(ORDER_STATUSES)}")
        event["status"] = status
    _check_requirements(event, where, origin)
    return event


def normalise_batch(raws: Iterable[Any], where: str, origin: Origin,
                    body: bytes | None = None) -> list[dict[str, Any]]:
    """``body``: the bytes the events were parsed from, when the caller has them: a small
    body spares each event its size check, and its strings their bounds (``text_bounded``)."""
    check = body is None or len(body) > MAX_EVENT_BYTES
    text = body is None or not text_bounded(body)
    # A loop, not a comprehension: one is a function made, called and freed for every body,
    # and the names it reads become cells (about 2,000 instructions a beacon).
    events = []
    for i, raw in enumerate(raws):
        events.append(normalise(raw, f"{where}[{i}]", origin, check_size=check, check_text=text))
    return events


# Events that must name their person (user.email), or their order (transaction_id); every
# backend event must say whom it is about (``_check_requirements``).
_NEEDS_PERSON = frozenset({"identify", "unsubscribe", "opt_in"})
_NEEDS_ORDER = frozenset({"purchase", "refund", "order_status"})


def _check_requirements(event: dict[str, Any], where: str, origin: Origin) -> None:
    name, user = event["name"], event["user"] or {}
    if name in _NEEDS_PERSON and not user.get("email") and not (
            name == "identify" and user.get("customer_id")):
        need = "email or user.customer_id" if name == "identify" else "email"
        raise Invalid(f"{where}.user.email", f"is required for {name} (user.{need})")
    if name in _NEEDS_ORDER:
        if not (event["ecommerce"] or {}).get("transaction_id"):
            raise Invalid(f"{where}.ecommerce.transaction_id", f"is required for {name} "
                          "(the order id; top-level transaction_id is accepted too)")
    if origin.source == "backend" and name != "product_updated" and not (
            user.get("email") or user.get("customer_id") or event["sc"]):
        raise Invalid(f"{where}.user", "backend events need user.email or user.customer_id "
                      "(or sc to tie them to a browser session)")


def _signed_source(sent: Any, user: dict[str, Any] | None, where: str, origin: Origin) -> str:
    """``verified browser`` when a browser event's ``user.signature`` signs its email with the
    site's identity secret. A wrong one is refused (422), not taken as unverified: it is a
    page computing it wrongly, which its developer must see. Ignored where the site has no
    secret, and from the backend (already trusted). ``where``: the event's path."""
    signed = sent.get("signature") if isinstance(sent, dict) else None
    if origin.source != "browser" or signed is None or origin.identity_secret is None:
        return origin.source
    where = f"{where}.user"
    if not isinstance(signed, str) or not trust.SIGNATURE_RE.match(signed):
        raise Invalid(f"{where}.signature", "must be 64 hex characters: "
                      "hex(HMAC-SHA256(identity_secret, lower-cased email))")
    if not (user or {}).get("email"):
        raise Invalid(f"{where}.email", "is required with user.signature (the signature signs it)")
    if not trust.signature_valid(origin.identity_secret, user["email"], signed):
        raise Invalid(f"{where}.signature", "does not sign user.email: it must be "
                      "hex(HMAC-SHA256(the site's identity_secret, the lower-cased email))")
    return trust.VERIFIED


def _string(table: dict, key: str, where: str, *, required: bool = False,
            max_len: int = 2048) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise Invalid(f"{where}.{key}", "is required")
        return None
    if type(value) is str:  # the usual case, without the checks below
        value = value.strip()
    elif isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise Invalid(f"{where}.{key}", f"must be a string, not {_type(value)}")
    else:
        value = str(value).strip()
    if len(value) > max_len:
        raise Invalid(f"{where}.{key}", f"is longer than {max_len} characters")
    if required and not value:
        raise Invalid(f"{where}.{key}", "must not be empty")
    return value


def _optional_int(table: dict, key: str, where: str, *, minimum: int | None = None,
                  maximum: int | None = None) -> int | None:
    """A whole number (``check_bounds`` has already bounded its size and digits)."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, Decimal) and value == value.to_integral_value():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{where}.{key}", f"must be a whole number, not {_type(value)}")
    if minimum is not None and value < minimum:
        raise Invalid(f"{where}.{key}", f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise Invalid(f"{where}.{key}", f"must be at most {maximum}")
    return value


def _money(table: dict, key: str, where: str, currency: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if type(value) is Decimal and value.is_finite() and value.adjusted() < 12:
        minor = money.exact_to_minor(value, currency)  # parsed from the body: the usual case
    else:
        minor = money.to_minor(_amount(value, f"{where}.{key}"), currency)
    if minor < 0:
        raise Invalid(f"{where}.{key}", "must not be negative")
    return minor


def _amount(value: Any, where: str) -> Decimal:
    """A money field's value as a finite Decimal within ``MAX_MONEY_MAJOR``."""
    if type(value) is Decimal:
        amount = value
    elif isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise Invalid(where, f"must be a number (major units, e.g. 29.99), not {_type(value)}")
    else:
        if isinstance(value, float):  # an in-process caller's: its shortest repr is what JS shows
            value = repr(value)
        try:
            amount = Decimal(value.strip() if isinstance(value, str) else value)
        except ArithmeticError:
            raise Invalid(where, f"must be a number (major units, e.g. 29.99), "
                          f"not {echo(value)}") from None
    # Before any scaling: finite, and small enough that its minor units fit any context. Its
    # digits need no bound here (a long number, as text, rounds in linear time).
    if not amount.is_finite() or (amount and amount.adjusted() >= 12 and abs(amount) > _MAX_MONEY):
        _check_decimal(amount, where, MAX_MONEY_MAJOR)
    return amount


def _page(raw: dict, where: str) -> dict[str, Any] | None:
    page = raw.get("page")
    if page is not None and not isinstance(page, dict):
        raise Invalid(f"{where}.page", "must be an object {location, referrer, title}")
    page = page or {}
    aliased = "page_location" in raw or "page_referrer" in raw or "page_title" in raw
    if aliased:
        page = dict(page)  # the top-level aliases win; the body's own dict stays as sent
        for key, alias in (("location", "page_location"), ("referrer", "page_referrer"),
                           ("title", "page_title")):
            if raw.get(alias) is not None:
                page[key] = raw[alias]
    # The page's URL is location.href, http(s) on any storefront (a file: or about: page is
    # no shop); vendors link to it as the cart's URL when the event names none. The referrer
    # and title are kept as sent: document.referrer may be "" or an app's android-app:// URL,
    # and neither reaches a vendor or a feed.
    page_where = f"{where}.page"
    if aliased and raw.get("page_location") is not None:  # the alias, named as sent
        location = _url(raw, "page_location", where, max_len=4096)
    else:
        location = _url(page, "location", page_where, max_len=4096)
    out = {"location": location} if location is not None else {}
    for key in ("referrer", "title"):
        value = _string(page, key, page_where, max_len=4096)
        if value is not None:
            out[key] = value
    return out or None


def _user(user: Any, where: str) -> dict[str, Any] | None:
    if user is None:
        return None
    if not isinstance(user, dict):
        raise Invalid(where, "must be an object {email, customer_id, ...}")
    out: dict[str, Any] = {}
    email = _string(user, "email", where, max_len=254)
    if email:
        problem = email_problem(email)
        if problem:
            raise Invalid(f"{where}.email", problem)
        out["email"] = email.lower()
    for key in USER_STRINGS:
        value = _person(user, key, where, 256)
        if value:
            out[key] = value
    if user.get("accepts_marketing") is not None:
        if not isinstance(user["accepts_marketing"], bool):
            raise Invalid(f"{where}.accepts_marketing", "must be true or false")
        out["accepts_marketing"] = user["accepts_marketing"]
    return out or None


def _address(raw: dict, key: str, where: str) -> dict[str, str] | None:
    """The event's ``key`` address; ``where`` is the event's path."""
    address = raw.get(key)
    if address is None:
        return None
    where = f"{where}.{key}"
    if not isinstance(address, dict):
        raise Invalid(where, "must be an object {first_name, address_1, city, ...}")
    out = {}
    for key in ADDRESS_KEYS:
        value = _person(address, key, where, 512)
        if value and key == "email" and not value.isascii():  # Sendlane's billing email
            _check_email_text(value, f"{where}.email")
        if value:
            out[key] = value
    return out or None


def _person(table: dict, key: str, where: str, max_len: int) -> str | None:
    """A person's field: refused, naming it, with an invisible character (``invisible_char``)
    that could end a mail header or turn the text around it."""
    value = _string(table, key, where, max_len=max_len)
    bad = invisible_char(value) if value else None
    if bad:
        raise Invalid(f"{where}.{key}", PERSON_PROBLEM.format(char=_char_name(bad)))
    return value


def email_problem(email: str) -> str | None:
    """Why ``email`` is not an address onetag keeps (an event's, a coupon call's, the one
    ``onetag person`` looks for), else None: one rule wherever an email comes in."""
    if not EMAIL_RE.fullmatch(email):
        return f"{echo(email)} is not an email address"
    bad = None if email.isascii() else invisible_char(email, address=True)
    return EMAIL_PROBLEM.format(char=_char_name(bad)) if bad else None


def _check_email_text(email: str, where: str) -> None:
    """No invisible character in an email beyond ``EMAIL_RE``'s (``invisible_char`` for an
    address: C1 controls and every format character) makes ``ann\u202e@example.com`` read as
    another address in the console and at the vendors."""
    bad = invisible_char(email, address=True)
    if bad:
        raise Invalid(where, EMAIL_PROBLEM.format(char=_char_name(bad)))


# The invisible characters: one rule for a person's fields and emails.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def invisible_char(value: str, address: bool = False) -> str | None:
    """The first character of ``value`` that is invisible and may change what the text says
    or how it reads, else None. In any text a person's field or an email holds: a control
    character (Unicode's Cc: C0, DEL, C1; CR LF would end a mail header), a line or paragraph
    separator (Zl, Zp: a line break too), a bidirectional embedding, override or isolate
    (U+202A-U+202E, U+2066-U+2069: they turn the text around them).

    ``address``: in an email also every other format character (Cf: zero-width space,
    non-joiner and joiner, soft hyphen, left-to-right and right-to-left marks, byte-order
    mark, tag characters). They differ because an email is an identifier, compared exactly:
    the key of the customer's identity here and at every vendor, so an invisible character
    makes another customer that reads as the same one. A name or an address is text people
    read, where those characters are spelling: the zero-width non-joiner and joiner are
    required in Persian, Urdu and Indic scripts and join emoji sequences, tag characters
    make subdivision flags, and none ends a header or turns the text around it."""
    if value.isprintable():  # the common case: every Cc, Cf, Zl and Zp is unprintable
        return None
    for char in value:
        category = unicodedata.category(char)
        if (category in ("Cc", "Zl", "Zp") or char in _BIDI_CONTROLS
                or (address and category == "Cf")):
            return char
    return None


def _char_name(char: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character named, never shown."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


def _cart_guid(raw: dict, where: str) -> str | None:
    guid = raw.get("cart_guid")
    if guid is None:
        return None
    if not isinstance(guid, str) or not CART_GUID_RE.fullmatch(guid):
        raise Invalid(f"{where}.cart_guid", "must be the cart state's GUID: 8-64 characters of "
                      "A-Z a-z 0-9 -")
    return guid.upper()


def is_http_url(value: str | None) -> bool:
    """Whether ``value`` is an absolute http(s) URL with a host and no control character:
    the one rule for a link or image onetag passes on (events take only these; the feeds
    leave out a stored one that is not, e.g. from before events refused it). Every such URL
    reaches a feed or a vendor's email: ``javascript:`` or ``data:`` there runs script
    wherever it is clicked or shown. A tab or newline inside a scheme is dropped by URL
    parsers, browsers' and this one's alike, so ``java\tscript:`` reads as ``javascript:``;
    one unparseable (``http://[::1``) is no URL."""
    if not value:
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.netloc)
            and (value.isprintable() or not _CONTROL_RE.search(value)))


def _url(table: dict, key: str, where: str, max_len: int = MAX_URL_CHARS) -> str | None:
    """An http(s) URL (``is_http_url``), or None when absent or empty."""
    value = _string(table, key, where, max_len=max_len)
    if not value:
        return None
    if not is_http_url(value):
        raise Invalid(f"{where}.{key}", f"must be an http(s) URL, not {echo(value)}")
    return value


def _loaded(raw: dict, where: str) -> list[str]:
    if "loaded" not in raw:
        return []
    loaded = raw["loaded"]
    if not isinstance(loaded, list):
        raise Invalid(f"{where}.loaded", "must be a list of vendor names")
    if not loaded:  # most beacons: nothing to check or sort
        return []
    for name in loaded:
        if not isinstance(name, str):
            raise Invalid(f"{where}.loaded", "must be a list of vendor names")
    return sorted(set(loaded))


_ECOMMERCE_MONEY = (("value", "value_minor"), ("tax", "tax_minor"), ("shipping", "shipping_minor"))
_ECOMMERCE_STRINGS = ("coupon", "item_list_id", "item_list_name")


def _ecommerce(ecommerce: Any, where: str, name: str, default_currency: str,
               raw: dict) -> dict[str, Any]:
    if ecommerce is None:
        ecommerce = {}
    if not isinstance(ecommerce, dict):
        raise Invalid(where, "must be an object {currency, value, items, ...}")
    currency = _string(ecommerce, "currency", where) or default_currency
    if not CURRENCY_RE.fullmatch(currency):
        raise Invalid(f"{where}.currency", f"must be a 3-letter ISO 4217 code, not {echo(currency)}")
    currency = currency.upper()
    transaction_id = (_string(ecommerce, "transaction_id", where, max_len=256)
                      if "transaction_id" in ecommerce else None)
    if transaction_id is None and raw.get("transaction_id") is not None:
        transaction_id = _string(raw, "transaction_id", where.rsplit(".", 1)[0], max_len=256)
    out: dict[str, Any] = {
        "currency": currency, "value_minor": None, "tax_minor": None, "shipping_minor": None,
        "transaction_id": transaction_id, "coupon": None, "item_list_id": None,
        "item_list_name": None, "items": [],
    }
    # Only the keys sent: most events carry a value and none of the rest.
    for key, field in _ECOMMERCE_MONEY:
        if key in ecommerce:
            out[field] = _money(ecommerce, key, where, currency)
    for key in _ECOMMERCE_STRINGS:
        if key in ecommerce:
            out[key] = _string(ecommerce, key, where, max_len=256)
    items = ecommerce.get("items")
    if items is None:
        if name in ITEMS_REQUIRED:
            raise Invalid(f"{where}.items", f"is required for {name}: a list of items")
        items = []
    if not isinstance(items, list):
        raise Invalid(f"{where}.items", "must be a list of items")
    if not items and name in ITEMS_REQUIRED:
        raise Invalid(f"{where}.items", f"must not be empty for {name}")
    if len(items) > 500:
        raise Invalid(f"{where}.items", "has more than 500 items")
    read = out["items"]  # a loop, not a comprehension: see normalise_batch
    for i, item in enumerate(items):
        read.append(_item(item, f"{where}.items[{i}]", currency))
    if "cart_url" in ecommerce:  # onetag addition: where the cart can be had
        cart_url = _url(ecommerce, "cart_url", where)
        if cart_url:
            out["cart_url"] = cart_url
    return out


def _item(item: Any, where: str, currency: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise Invalid(where, "must be an object {item_id, item_name, price, quantity, ...}")
    out: dict[str, Any] = {"item_id": _string(item, "item_id", where, required=True, max_len=256)}
    for key in ITEM_STRINGS:
        if key in item:  # most items carry a few of these: skip the call for the rest
            if key in ITEM_URLS:  # shown as links and images by feeds and vendors' emails
                value = _url(item, key, where, max_len=4096)
            else:
                value = _string(item, key, where, max_len=4096)
            if value is not None:
                out[key] = value
    out["price_minor"] = _money(item, "price", where, currency)
    quantity = item.get("quantity", 1)
    if isinstance(quantity, Decimal) and quantity == quantity.to_integral_value():
        quantity = int(quantity)
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
        raise Invalid(f"{where}.quantity", f"must be a whole number >= 0, not {echo(quantity)}")
    if quantity > MAX_QUANTITY:
        raise Invalid(f"{where}.quantity", f"must be at most {MAX_QUANTITY}")
    out["quantity"] = quantity
    categories = []
    for key in CATEGORY_KEYS:
        if key in item:
            value = _string(item, key, where, max_len=512)
            if value:
                categories.append(value)
    out["categories"] = categories
    if "sku" in item and "item_sku" not in out:  # `sku` is accepted for `item_sku`
        sku = _string(item, "sku", where, max_len=256)
        if sku:
            out["item_sku"] = sku
    if "item_category_id" in item:
        category_ids = _category_ids(item["item_category_id"], f"{where}.item_category_id")
        if category_ids:
            out["category_ids"] = category_ids
    in_stock = item.get("in_stock")
    if in_stock is not None and not isinstance(in_stock, bool):
        raise Invalid(f"{where}.in_stock", "must be true or false")
    out["in_stock"] = in_stock
    if "availability" in item:
        availability = _availability(item["availability"], f"{where}.availability")
        if availability is not None:
            out["availability"] = availability
    if "deleted" in item:  # product_updated: the backend removed the product (server/catalog.py)
        deleted = item["deleted"]
        if deleted is not None and not isinstance(deleted, bool):
            raise Invalid(f"{where}.deleted", "must be true or false")
        if deleted is not None:
            out["deleted"] = deleted
    return out


def _availability(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(where, f"must be one of {', '.join(AVAILABILITY)}, not {_type(value)}")
    text = value.strip().lower().replace(" ", "_")
    if text not in AVAILABILITY:
        raise Invalid(where, f"must be one of {', '.join(AVAILABILITY)}, not {echo(value)}")
    return text


def _category_ids(value: Any, where: str) -> list[str]:
    """onetag addition to GA4 items: the category ids (Remarkety productCategoriesIds), one
    string or a list of up to 5 (GA4 items carry up to five categories)."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if len(values) > 5:
        raise Invalid(where, "has more than 5 category ids")
    out = []
    for index, one in enumerate(values):
        if isinstance(one, bool) or not isinstance(one, (str, int, Decimal)):
            raise Invalid(where if value is one else f"{where}[{index}]",
                          f"must be a string or a list of strings, not {_type(one)}")
        text = str(one).strip()
        if len(text) > 256:
            raise Invalid(where, "is longer than 256 characters")
        if text:
            out.append(text)
    return out


def _properties(raw: dict[str, Any]) -> dict[str, Any]:
    """Any other top-level keys, as plain JSON numbers and strings (custom events)."""
    if KNOWN_KEYS.issuperset(raw):  # most events: a set operation instead of a look at each key
        return {}
    extra = {k: v for k, v in raw.items() if k not in KNOWN_KEYS}
    return jsontext.loads(jsontext.encode(extra))


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", str: "a string",
            int: "a number", Decimal: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)
