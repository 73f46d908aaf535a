"""The vocabulary: what is accepted, how it is normalised, and how a problem is named."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal

import pytest

from server import events
from server.events import Invalid, Origin, new_event_id

BROWSER = Origin(site_id="shop1", source="browser", currency="USD", received_ms=1000, sc="ABC-123-DEF")
BACKEND = Origin(site_id="shop1", source="backend", currency="USD", received_ms=1000)


def parse(text: str, origin: Origin = BROWSER) -> dict:
    return events.normalise(events.parse_json(text.encode()), "events[0]", origin)


def problem(text: str, origin: Origin = BROWSER) -> tuple[str, str]:
    with pytest.raises(Invalid) as caught:
        parse(text, origin)
    return caught.value.field, caught.value.problem


@pytest.mark.parametrize("price, minor", [("4.35", 435), ("0.57", 57), ("19.99", 1999),
                                          ("1.005", 101), ("29.999", 3000), ("10", 1000)])
def test_prices_become_exact_minor_units(price: str, minor: int) -> None:
    event = parse('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": '
                  f'[{{"item_id": "A", "price": {price}}}]}}}}')
    assert event["ecommerce"]["items"][0]["price_minor"] == minor


def test_zero_decimal_currency_keeps_whole_units() -> None:
    event = parse('{"event": "purchase", "event_id": "e1", "ecommerce": {"currency": "jpy", '
                  '"transaction_id": 77, "value": 1500, "items": []}}')
    assert event["ecommerce"]["currency"] == "JPY"
    assert event["ecommerce"]["value_minor"] == 1500
    assert event["ecommerce"]["transaction_id"] == "77"


def test_item_is_flattened_and_categories_kept_in_order() -> None:
    event = parse('{"event": "view_item", "event_id": "e1", "ecommerce": {"currency": "USD", '
                  '"value": 29.99, "items": [{"item_id": "SKU-1000", "item_name": "Mug", '
                  '"price": 29.99, "quantity": 1, "item_category": "Kitchen", '
                  '"item_category2": "Mugs", "item_brand": "Acme", "item_url": "https://s/p", '
                  '"image_url": "https://s/i.jpg", "description": "A mug", "in_stock": true}]}}')
    [item] = event["ecommerce"]["items"]
    assert item == {"item_id": "SKU-1000", "item_name": "Mug", "item_brand": "Acme",
                    "item_url": "https://s/p", "image_url": "https://s/i.jpg",
                    "description": "A mug", "price_minor": 2999, "quantity": 1,
                    "categories": ["Kitchen", "Mugs"], "in_stock": True}
    assert event["ecommerce"]["value_minor"] == 2999
    assert event["sc"] == "ABC-123-DEF" and event["source"] == "browser"


def test_email_is_normalised_and_custom_keys_become_properties() -> None:
    event = parse('{"event": "size_guide_opened", "event_id": "e1", "user": '
                  '{"email": "  Ann@Example.COM "}, "size": "M", "score": 4.5, "page_location": "https://s/p"}')
    assert event["user"] == {"email": "ann@example.com"}
    assert event["properties"] == {"size": "M", "score": 4.5}
    assert event["page"] == {"location": "https://s/p"}


def test_backend_event_gets_an_id_and_may_name_a_session() -> None:
    event = parse('{"event": "order_status", "transaction_id": "1001", "status": "cancelled", '
                  '"user": {"email": "a@b.co"}, "sc": "cda68358-94fb-4d83-9655-3feb3c4114a3"}', BACKEND)
    made = uuid.UUID(event["event_id"])
    assert made.version == 7 and made.variant == uuid.RFC_4122, "a UUIDv7, like the browser's"
    assert abs((made.int >> 80) - time.time() * 1000) < 60_000, "led by Unix milliseconds"
    assert event["sc"] == "CDA68358-94FB-4D83-9655-3FEB3C4114A3"
    assert event["ecommerce"]["transaction_id"] == "1001" and event["status"] == "cancelled"


def test_server_made_event_ids_grow_with_time() -> None:
    ids = [new_event_id() for _ in range(50)]
    times = [uuid.UUID(i).int >> 80 for i in ids]
    assert times == sorted(times) and len(set(ids)) == 50


@pytest.mark.parametrize("text, field, words", [
    ('[]', "events[0]", "must be an object"),
    ('{"event_id": "e1"}', "events[0].event", "is required"),
    ('{"event": "1bad name", "event_id": "e1"}', "events[0].event", "not a valid event name"),
    ('{"event": "view_item"}', "events[0].event_id", "is required"),
    ('{"event": "view_item", "event_id": "e1"}', "events[0].ecommerce.items", "is required"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": []}}',
     "events[0].ecommerce.items", "must not be empty"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": [{"price": 1}]}}',
     "events[0].ecommerce.items[0].item_id", "is required"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": [{"item_id": "A", "price": "x"}]}}',
     "events[0].ecommerce.items[0].price", "must be a number"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": [{"item_id": "A", "price": -1}]}}',
     "events[0].ecommerce.items[0].price", "must not be negative"),
    ('{"event": "add_to_cart", "event_id": "e1", "ecommerce": {"items": [{"item_id": "A", "quantity": 1.5}]}}',
     "events[0].ecommerce.items[0].quantity", "whole number"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"currency": "dollars", "items": [{"item_id": "A"}]}}',
     "events[0].ecommerce.currency", "ISO 4217"),
    ('{"event": "purchase", "event_id": "e1", "ecommerce": {"items": []}}',
     "events[0].ecommerce.transaction_id", "is required for purchase"),
    ('{"event": "identify", "event_id": "e1", "user": {"first_name": "Ann"}}',
     "events[0].user.email", "is required for identify"),
    ('{"event": "identify", "event_id": "e1", "user": {"email": "not-an-email"}}',
     "events[0].user.email", "is not an email address"),
    ('{"event": "identify", "event_id": "e1", "user": {"email": "a@b.co", "accepts_marketing": "yes"}}',
     "events[0].user.accepts_marketing", "true or false"),
    ('{"event": "search", "event_id": "e1"}', "events[0].search_term", "is required"),
    ('{"event": "order_status", "event_id": "e1", "transaction_id": "1", "status": "done"}',
     "events[0].event", "backend API only"),
    ('{"event": "view_item", "event_id": "e1", "time": "soon", "ecommerce": {"items": [{"item_id": "A"}]}}',
     "events[0].time", "whole number"),
    ('{"event": "view_item", "event_id": "e1", "loaded": "rejoiner", "ecommerce": {"items": [{"item_id": "A"}]}}',
     "events[0].loaded", "list of vendor names"),
])
def test_bad_input_names_the_field(text: str, field: str, words: str) -> None:
    got_field, got_problem = problem(text)
    assert got_field == field
    assert words in got_problem


def test_backend_rules() -> None:
    assert problem('{"event": "purchase", "ecommerce": {"transaction_id": "1"}}', BACKEND) == (
        "events[0].user", "backend events need user.email or user.customer_id "
        "(or sc to tie them to a browser session)")
    field, words = problem('{"event": "order_status", "transaction_id": "1", "status": "shipped", '
                           '"user": {"email": "a@b.co"}}', BACKEND)
    assert field == "events[0].status" and "completed" in words
    # product_updated is catalog data: no user needed.
    event = parse('{"event": "product_updated", "ecommerce": {"items": [{"item_id": "A", "price": 1}]}}', BACKEND)
    assert event["ecommerce"]["items"][0]["price_minor"] == 100


def test_oversized_event_is_refused() -> None:
    chunk = '"' + "x" * events.MAX_STRING_CHARS + '"'
    blob = ",".join([chunk] * (events.MAX_EVENT_BYTES // events.MAX_STRING_CHARS + 1))
    field, words = problem('{"event": "big", "event_id": "e1", "blob": [' + blob + ']}')
    assert field == "events[0]" and "limit is 32768 bytes" in words
    field, words = problem('{"event": "big", "event_id": "e1", "blob": "x' + chunk[1:] + '}')
    assert field == "events[0].blob" and f"longer than {events.MAX_STRING_CHARS}" in words


def test_malformed_json_is_a_body_problem() -> None:
    with pytest.raises(Invalid) as caught:
        events.parse_json(b"{not json")
    assert caught.value.field == "body"


def test_decimal_parsing_is_used() -> None:
    assert events.parse_json(b'{"a": 4.35}') == {"a": Decimal("4.35")}


def test_onetag_additions_to_items_and_the_cart() -> None:
    """cart_guid (the browser's GUID of the cart state), ecommerce.cart_url, and on items
    item_sku (or sku) and item_category_id: onetag's additions to GA4, docs/mapping.md."""
    event = parse('{"event": "add_to_cart", "event_id": "e1", '
                  '"cart_guid": "6f9619ff-8b86-d011-b42d-00cf4fc964ff", "ecommerce": {'
                  '"cart_url": "https://shop.example/cart/77", "items": ['
                  '{"item_id": "A", "item_sku": "SKU-A", "item_category_id": ["3", 17]}, '
                  '{"item_id": "B", "sku": "SKU-B", "item_category_id": "9"}, {"item_id": "C"}]}}')
    assert event["cart_guid"] == "6F9619FF-8B86-D011-B42D-00CF4FC964FF"
    assert event["ecommerce"]["cart_url"] == "https://shop.example/cart/77"
    a, b, c = event["ecommerce"]["items"]
    assert (a["item_sku"], a["category_ids"]) == ("SKU-A", ["3", "17"])
    assert (b["item_sku"], b["category_ids"]) == ("SKU-B", ["9"])
    assert "item_sku" not in c and "category_ids" not in c
    assert parse('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": '
                 '[{"item_id": "A"}]}}')["cart_guid"] is None
    assert "cart_guid" not in event["properties"]


@pytest.mark.parametrize("text, field, words", [
    ('{"event": "add_to_cart", "event_id": "e1", "cart_guid": "abc", '
     '"ecommerce": {"items": [{"item_id": "A"}]}}', "events[0].cart_guid", "GUID"),
    ('{"event": "add_to_cart", "event_id": "e1", "cart_guid": "6F9619FF 8B86", '
     '"ecommerce": {"items": [{"item_id": "A"}]}}', "events[0].cart_guid", "GUID"),
    ('{"event": "view_cart", "event_id": "e1", "ecommerce": {"cart_url": "javascript:x()", '
     '"items": []}}', "events[0].ecommerce.cart_url", "http(s) URL"),
    ('{"event": "view_cart", "event_id": "e1", "ecommerce": {"cart_url": "https://s/' + "x" * 2048
     + '", "items": []}}', "events[0].ecommerce.cart_url", "longer than 2048"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": [{"item_id": "A", '
     '"item_category_id": {"id": 1}}]}}', "events[0].ecommerce.items[0].item_category_id",
     "string or a list of strings"),
    ('{"event": "view_item", "event_id": "e1", "ecommerce": {"items": [{"item_id": "A", '
     '"item_category_id": ["1", "2", "3", "4", "5", "6"]}]}}',
     "events[0].ecommerce.items[0].item_category_id", "more than 5"),
])
def test_onetag_additions_are_validated(text: str, field: str, words: str) -> None:
    got_field, got_problem = problem(text)
    assert got_field == field
    assert words in got_problem


def test_a_signature_verifies_its_email_and_a_wrong_one_names_the_field() -> None:
    from dataclasses import replace
    from server import trust
    secret = "s" * 32
    signed = replace(BROWSER, identity_secret=secret)
    good = trust.signature(secret, "ann@example.com")
    event = '{"event": "identify", "event_id": "e1", "user": {"email": " Ann@Example.com ", "signature": "%s"}}'
    assert parse(event % good, signed)["source"] == "verified browser"
    assert "signature" not in parse(event % good, signed)["user"]
    assert parse(event % good, BROWSER)["source"] == "browser"  # the site has no secret
    assert parse(event % good, replace(BACKEND, identity_secret=secret))["source"] == "backend"
    other = trust.signature(secret, "bob@example.com")
    assert problem(event % other, signed)[0] == "events[0].user.signature"
    assert problem(event % "not-hex", signed)[0] == "events[0].user.signature"
    assert problem('{"event": "page_view", "event_id": "e2", "user": {"signature": "%s"}}' % good,
                   signed)[0] == "events[0].user.email"


# URLs: only http(s) reaches a feed or a vendor ---------------------------------------------

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

import json  # noqa: E402
import re  # noqa: E402
import unicodedata  # noqa: E402

URL_FIELDS = {  # field as named in the problem: an event carrying `value` there
    "events[0].ecommerce.items[0].item_url": lambda value: {
        "event": "view_item", "event_id": "e1",
        "ecommerce": {"items": [{"item_id": "A", "item_url": value}]}},
    "events[0].ecommerce.items[0].image_url": lambda value: {
        "event": "view_item", "event_id": "e1",
        "ecommerce": {"items": [{"item_id": "A", "image_url": value}]}},
    "events[0].ecommerce.cart_url": lambda value: {
        "event": "view_cart", "event_id": "e1", "ecommerce": {"cart_url": value, "items": []}},
    "events[0].page.location": lambda value: {
        "event": "page_view", "event_id": "e1", "page": {"location": value}},
    "events[0].page_location": lambda value: {
        "event": "page_view", "event_id": "e1", "page": {"location": "https://s/"},
        "page_location": value},
}
HOSTILE_URLS = ["javascript:alert(document.domain)", "JavaScript:alert(1)",
                "data:text/html,<script>alert(1)</script>", "java\tscript:alert(1)",
                "\x01javascript:alert(1)", "vbscript:msgbox(1)", "file:///etc/passwd",
                "about:blank", "/p/mug", "//evil.example/x", "https:relative", "mailto:a@b.co",
                "https://shop.example/p\nX-Injected: 1", "http://[::1/p", "https://"]


def _problem_of(event: dict) -> tuple[str, str]:
    with pytest.raises(Invalid) as caught:
        events.normalise(events.parse_json(json.dumps(event).encode()), "events[0]", BROWSER)
    return caught.value.field, caught.value.problem


@pytest.mark.parametrize("field", list(URL_FIELDS))
@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_a_url_that_is_not_http_is_refused_naming_its_field(field: str, url: str) -> None:
    got_field, got_problem = _problem_of(URL_FIELDS[field](url))
    assert got_field == field
    assert "must be an http(s) URL" in got_problem


@hsettings(max_examples=200, deadline=None)
@given(field=st.sampled_from(list(URL_FIELDS)),
       scheme=st.from_regex(r"[A-Za-z][A-Za-z0-9+.-]{0,10}", fullmatch=True),
       rest=st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                    max_size=40))
def test_only_http_and_https_urls_are_kept(field: str, scheme: str, rest: str) -> None:
    """Any scheme but http(s) is refused, naming the field; http(s) with a host is kept as
    sent. Nothing else about the URL is judged (the property's `rest` is any text)."""
    url = f"{scheme}:{rest}"
    raw = events.parse_json(json.dumps(URL_FIELDS[field](url)).encode())
    try:
        event = events.normalise(raw, "events[0]", BROWSER)
    except Invalid as exc:
        assert exc.field == field, (url, exc)
        assert "http(s) URL" in exc.problem or "longer than" in exc.problem
        return
    kept = url.strip()
    assert scheme.lower() in ("http", "https"), f"{url!r} was accepted in {field}"
    assert kept.lower().startswith(("http://", "https://")), url
    assert kept.isprintable() or not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in kept)
    stored = (event["ecommerce"]["items"][0].get(field.rsplit(".", 1)[1]) if "items" in field
              else event["ecommerce"].get("cart_url") if "cart_url" in field
              else event["page"]["location"])
    assert stored == kept


def test_http_urls_are_kept_and_the_referrer_is_free_text() -> None:
    event = parse('{"event": "view_item", "event_id": "e1", "page": {"location": '
                  '"https://shop.example/p/mug?x=1", "referrer": "android-app://com.google.android.gm/"}, '
                  '"ecommerce": {"items": [{"item_id": "A", "item_url": "HTTPS://shop.example/p", '
                  '"image_url": "http://cdn.example/i.jpg"}]}}')
    assert event["page"] == {"location": "https://shop.example/p/mug?x=1",
                             "referrer": "android-app://com.google.android.gm/"}
    [item] = event["ecommerce"]["items"]
    assert (item["item_url"], item["image_url"]) == ("HTTPS://shop.example/p", "http://cdn.example/i.jpg")


# A person's fields: nothing that ends a mail header or turns the text around ---------------

PERSON_FIELDS = {  # field as named: the event carrying `value` there
    **{f"events[0].user.{key}": (lambda key: lambda value: {
        "event": "identify", "event_id": "e1",
        "user": {"email": "eve@example.com", key: value}})(key)
       for key in ("first_name", "last_name", "phone", "customer_id")},
    **{f"events[0].{where}.{key}": (lambda where, key: lambda value: {
        "event": "purchase", "event_id": "e1", "user": {"email": "eve@example.com"},
        "ecommerce": {"transaction_id": "1", "items": []}, where: {key: value}})(where, key)
       for where in ("billing_address", "shipping_address")
       for key in ("first_name", "last_name", "company", "city", "phone")},
}
# What a person's field refuses (``events.invisible_char``), written out: C0, DEL, C1, the
# line and paragraph separators, the bidirectional controls.
BAD_IN_NAMES_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
BAD_IN_NAMES = ["\r\n", "\n", "\r", "\t", "\x0b", "\x1b", "\x7f", "\x85", "\u2028", "\u2029",
                "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
                "\u2069"]


@pytest.mark.parametrize("field", list(PERSON_FIELDS))
def test_a_header_injection_in_a_name_is_refused_naming_the_field(field: str) -> None:
    got_field, got_problem = _problem_of(PERSON_FIELDS[field]("Eve\r\nX-Injected: 1"))
    assert got_field == field
    assert "U+000D" in got_problem and "mail headers" in got_problem


@pytest.mark.parametrize("char", BAD_IN_NAMES)
def test_control_and_bidi_characters_in_names_are_refused(char: str) -> None:
    field = "events[0].user.first_name"
    got_field, got_problem = _problem_of(PERSON_FIELDS[field](f"Eve{char}Smith"))
    assert got_field == field
    assert f"U+{ord(char[0]):04X}" in got_problem


def test_names_in_any_script_are_kept() -> None:
    """Letters, marks, joiners: names as people write them (a zero-width non-joiner is part
    of Persian spelling; a trailing newline is whitespace, stripped as before)."""
    for name in ("Zoë", "José-María", "O'Brien", "محمد", "מרים", "\u0645\u06cc\u200c\u0631\u0627",
                 "李 小龍", "Eve\n"):
        event = events.normalise(events.parse_json(json.dumps(
            PERSON_FIELDS["events[0].user.first_name"](name)).encode()), "events[0]", BROWSER)
        assert event["user"]["first_name"] == name.strip()


@hsettings(max_examples=300, deadline=None)
@given(field=st.sampled_from(list(PERSON_FIELDS)),
       name=st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                    min_size=1, max_size=30))
def test_a_person_field_is_refused_exactly_when_it_holds_a_bad_character(field: str,
                                                                        name: str) -> None:
    raw = events.parse_json(json.dumps(PERSON_FIELDS[field](name)).encode())
    kept = name.strip()
    bad = [c for c in kept if BAD_IN_NAMES_RE.match(c)]
    try:
        event = events.normalise(raw, "events[0]", BROWSER)
    except Invalid as exc:
        assert bad and exc.field == field, (name, exc)
        assert f"U+{ord(bad[0]):04X}" in exc.problem
        return
    assert not bad, f"{name!r} was accepted in {field}"
    where, key = field.split(".")[1:]
    assert (event[where] or {}).get(key) == (kept or None)


@pytest.mark.parametrize("email", ["ann\u202e@example.com", "ann@exa\u202emple.com",
                                   "\u2066ann@example.com", "ann\u200b@example.com",
                                   "ann\u00ad@example.com", "ann\ufeff@example.com",
                                   "ann\u0085@example.com", "ann\u2069@example.com"])
def test_format_and_control_characters_in_emails_are_refused(email: str) -> None:
    field, problem = _problem_of({"event": "identify", "event_id": "e1", "user": {"email": email}})
    assert field == "events[0].user.email"
    assert "U+" in problem or "not an email address" in problem
    # The billing address's email reaches Sendlane too.
    field, problem = _problem_of(PERSON_FIELDS["events[0].billing_address.city"]("Kyiv") | {
        "billing_address": {"email": email}})
    assert field == "events[0].billing_address.email" and "U+" in problem


@hsettings(max_examples=200, deadline=None)
@given(local=st.from_regex(r"[a-z0-9.]{1,12}", fullmatch=True),
       char=st.characters(categories=("Cf", "Cc"), exclude_characters="\x00"),
       at=st.integers(0, 30))
def test_no_email_with_a_format_or_control_character_is_accepted(local: str, char: str,
                                                                 at: int) -> None:
    email = f"{local}@example.com"
    at = at % (len(email) + 1)
    email = email[:at] + char + email[at:]
    raw = events.parse_json(json.dumps({"event": "identify", "event_id": "e1",
                                        "user": {"email": email}}).encode())
    try:
        event = events.normalise(raw, "events[0]", BROWSER)
    except Invalid as exc:
        assert exc.field == "events[0].user.email", exc
        return
    # Only whitespace stripped from either end may have gone.
    assert char not in event["user"]["email"] and char.isspace(), email


# Names and emails: one rule of invisible characters (``events.invisible_char``) ------------

# The characters the rule is about, and some it must let through (letters, marks, spaces).
_INVISIBLE_OR_NOT = st.characters(categories=("Cc", "Cf", "Zl", "Zp", "Zs", "Mn", "Lo"),
                                  exclude_characters="\x00")
# (the email's field, the name's field beside it, the event holding both)
_PLACES = {
    "user": lambda email, name: {"event": "identify", "event_id": "e1",
                                 "user": {"email": email, "first_name": name}},
    "billing_address": lambda email, name: {
        "event": "purchase", "event_id": "e1", "user": {"email": "eve@example.com"},
        "ecommerce": {"transaction_id": "1", "items": []},
        "billing_address": {"email": email, "first_name": name}},
}


def _refused(event: dict) -> tuple[str, str] | None:
    try:
        events.normalise(events.parse_json(json.dumps(event).encode()), "events[0]", BROWSER)
    except Invalid as exc:
        return exc.field, exc.problem
    return None


@hsettings(max_examples=400, deadline=None)
@given(char=_INVISIBLE_OR_NOT, place=st.sampled_from(list(_PLACES)))
def test_names_and_emails_refuse_the_same_invisible_characters(char: str, place: str) -> None:
    """A name and an email refuse the same invisible characters (controls, line and
    paragraph separators, bidirectional controls), each naming its field and the character;
    an email refuses besides every other format character (Unicode's Cf: zero-width ones,
    soft hyphen, marks), which a name keeps (ZWNJ and ZWJ are spelling in Persian and Indic
    scripts): the difference ``events.invisible_char`` documents, and the address's own
    pattern's (``EMAIL_RE``: whitespace, "/", "@")."""
    email, name = f"eve{char}smith@example.com", f"Eve{char}Smith"
    as_name = _refused(_PLACES[place]("eve@example.com", name))
    as_email = _refused(_PLACES[place](email, "Eve"))
    named = f"U+{ord(char):04X}"
    if as_name:
        assert as_name[0] == f"events[0].{place}.first_name" and named in as_name[1]
        assert as_email, f"{char!r} refused in a name but not in an email"
    if as_email:
        assert as_email[0] == f"events[0].{place}.email"
        assert named in as_email[1] or "not an email address" in as_email[1]
    if as_email and not as_name:
        assert unicodedata.category(char) == "Cf" or not events.EMAIL_RE.fullmatch(email), char
    if unicodedata.category(char) == "Cf":
        assert as_email, f"format character {named} accepted in an email"
    if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
        assert as_name, f"{named} accepted in a name"


@pytest.mark.parametrize("char, in_name", [("\u202e", False), ("\u2066", False),
                                           ("\u2028", False), ("\x85", False),
                                           ("\u200c", True), ("\u200d", True),
                                           ("\u200b", True), ("\u00ad", True)])
def test_what_a_name_keeps_and_an_email_refuses(char: str, in_name: bool) -> None:
    """The documented difference, by example: every character here is refused in an email;
    a name keeps the format characters that are not bidirectional controls."""
    assert _refused(_PLACES["user"](f"eve{char}@example.com", "Eve"))
    assert (_refused(_PLACES["user"]("eve@example.com", f"Eve{char}Smith")) is None) == in_name


# event_id says what it may be; a problem never echoes a long value whole ---------------------

@pytest.mark.parametrize("sent", ["a<b", "a b", "é", "", "x" * 129, "e1\n"])
def test_a_malformed_event_id_says_the_pattern(sent: str) -> None:
    field, words = _problem_of({"event": "page_view", "event_id": sent})
    assert field == "events[0].event_id"
    assert "[A-Za-z0-9_.:-]{1,128}" in words and "is required" not in words
    assert events.echo(sent) in words


def test_a_missing_event_id_is_required_and_a_number_is_named_as_one() -> None:
    assert _problem_of({"event": "page_view"})[1].startswith("is required")
    field, words = _problem_of({"event": "page_view", "event_id": 5})
    assert field == "events[0].event_id" and words.endswith("not a number")


@hsettings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
               max_size=140))
def test_an_event_id_is_taken_exactly_when_it_matches_the_pattern(sent: str) -> None:
    raw = {"event": "page_view", "event_id": sent}
    try:
        event = events.normalise(raw, "events[0]", BROWSER)
    except Invalid as exc:
        assert exc.field == "events[0].event_id" and not events.EVENT_ID_RE.fullmatch(sent)
        assert "[A-Za-z0-9_.:-]{1,128}" in exc.problem
        return
    assert event["event_id"] == sent and events.EVENT_ID_RE.fullmatch(sent)


LONG = "é" * 200  # within each field's length limit, which is said without an echo
ECHOING = {  # field: an event carrying a long invalid value there
    "events[0].event": {"event": "1" + "é" * 5000, "event_id": "e1"},
    "events[0].event_id": {"event": "page_view", "event_id": "<" + LONG},
    "events[0].user.email": {"event": "identify", "event_id": "e1", "user": {"email": LONG}},
    "events[0].ecommerce.currency": {"event": "view_cart", "event_id": "e1",
                                     "ecommerce": {"currency": LONG, "items": []}},
    "events[0].ecommerce.items[0].item_url": {"event": "view_item", "event_id": "e1", "ecommerce":
                                              {"items": [{"item_id": "A", "item_url": LONG}]}},
    "events[0].ecommerce.items[0].price": {"event": "view_item", "event_id": "e1", "ecommerce":
                                           {"items": [{"item_id": "A", "price": LONG}]}},
    "events[0].ecommerce.items[0].availability": {
        "event": "view_item", "event_id": "e1",
        "ecommerce": {"items": [{"item_id": "A", "availability": LONG}]}},
}


@pytest.mark.parametrize("field", list(ECHOING))
def test_a_long_value_is_echoed_as_a_short_prefix(field: str) -> None:
    got_field, words = _problem_of(ECHOING[field])
    assert got_field == field
    assert "…" in words and LONG[:events.ECHO_CHARS + 1] not in words
    assert len(words) < 400, words


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.integers(1, 80))
def test_echo_is_a_prefix_and_an_ellipsis(text: str, limit: int) -> None:
    quoted = events.echo(text, limit)
    if len(text) <= limit:
        assert quoted == repr(text)
    else:
        assert quoted.endswith("…" + quoted[0]) and quoted[0] in "'\""
        assert eval(quoted[:-2] + quoted[0]) == text[:limit]  # noqa: S307 (a repr)
