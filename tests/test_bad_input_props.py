"""Nothing a sender puts in a body stops intake (issue 10): property-based, both endpoints.

Valid events of every kind (page_view, view_item, add_to_cart, purchase, identify, custom),
then one mutation put anywhere in the body: a lone surrogate (as a JSON ``\\ud800`` escape,
in a value or a key), raw invalid UTF-8, numbers out of every range (``1e300000``, 4,400
digits, ``NaN``), nesting 9 to 50,000 deep, long strings, too many keys, wrong types,
values with a trailing newline. Poison values are raw JSON text spliced into the encoded
body, so they reach the server exactly as an attacker would write them.

Invariants, for every body:
- the answer is never a 5xx other than 503 (and never a dropped connection);
- every 4xx carries the error shape ``{error, message, errors: [{field, problem}]}``;
- a 4xx stores nothing, a 2xx stores every event of its body;
- a valid event sent right after is answered 204/202 and is in the events table.

The in-process app runs under a real uvicorn on loopback (its HTTP layer refuses a header
with a newline, as production's does) with the thread writer; ``test_*_through_serve``
send a smaller set through a real ``onetag serve``, whose writer is a process: errors that
must cross the pipe as data only show there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings, strategies as st

from fakes.harness import free_port, server_process, write_config
from server.app import create_app
from server.store import open_store
from support import ORIGIN, settings_for

SITE = "shop1"
API_KEY = "secret-key-0123456789"
BROWSER_HEADERS = {"content-type": "text/plain;charset=UTF-8", "origin": ORIGIN}
BACKEND_HEADERS = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
BACKEND_PATH = f"/api/v1/sites/{SITE}/events"
SC_COOKIE = re.compile(r"sc=([A-Za-z0-9-]{8,64});")
PROPS = settings(max_examples=50, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Poison: raw JSON text (or bytes) that replaces one sentinel string in the encoded body ----

def _nest(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


POISON_TEXT: list[str] = [
    # lone surrogates: high, low, reversed pair, inside text
    '"\\ud800"', '"\\udfff"', '"a\\udc00\\ud800b"', '"\\ud83d"',
    # numbers out of range, exponents, digits
    "1e30", "-1e30", "1e300000", "-1e300000", "1e-300000", "1E+400", "1e17", "-1", "-0.0",
    "1" + "0" * 4400, "-" + "9" * 4400, "0." + "0" * 5000 + "1",
    "123456789012345678901234567890.1234567890123456789", "NaN", "Infinity", "-Infinity",
    # at the bounds: |n| <= 1e18, 40 significant digits
    "1e18", "1000000000000000001", "-1.5e18", "1" * 41, "0." + "1" * 41, "1e-7", "4.35e-1",
    # nesting
    _nest(9, "list"), _nest(20, "dict"), _nest(1000, "list"), _nest(1000, "dict"),
    _nest(50000, "list"),
    # long strings, too many keys
    '"' + "x" * 9000 + '"', '"' + "y" * 200_000 + '"',
    "{" + ",".join(f'"k{i}":1' for i in range(101)) + "}",
    "{" + ",".join(f'"k{i}":"v"' for i in range(5000)) + "}",
    # wrong types
    "true", "null", "[]", "{}", "0", '""', '"s-@UNIQUE@"', "[1,2,3]",
    # trailing newlines, NUL, things that are almost an sc / name / id / email
    '"ABCDEFGH\\n"', '"page_view\\n"', '"e1\\n"', '"a\\u0000b"', '"a/b@c.de"', '"a b@c.de"',
    '"a@b.co\\n"', '"CDA68358-94FB-4D83-9655-3FEB3C4114A3\\n"',
]
POISON_BYTES: list[bytes] = [b'"\xed\xa0\x80"', b'"\xff\xfe"', b'"caf\xc3"']
SENTINEL = "\x00poison\x00"
SENTINEL_JSON = json.dumps(SENTINEL)  # '"\\u0000poison\\u0000"'


def splice(body: Any, poison: str | bytes) -> bytes:
    """``body`` encoded, with its one sentinel (a value or a key) replaced by ``poison``."""
    text = json.dumps(body)
    assert text.count(SENTINEL_JSON) == 1, text
    if isinstance(poison, str):  # a plain string may land on an event_id: never a duplicate
        poison = poison.replace("@UNIQUE@", uuid.uuid4().hex)
    if isinstance(poison, bytes):
        before, after = text.split(SENTINEL_JSON)
        return before.encode() + poison + after.encode()
    return text.replace(SENTINEL_JSON, poison).encode()


# Valid events ------------------------------------------------------------------------------

def event_id() -> st.SearchStrategy[str]:
    return st.builds(lambda: str(uuid.uuid4()))


texts = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=30)
keys = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
emails = st.from_regex(r"[a-z0-9]{1,12}@[a-z]{1,10}\.(com|org|co)", fullmatch=True)
prices = st.one_of(st.integers(0, 10**7).map(lambda cents: cents / 100),
                   st.integers(0, 10**7).map(lambda cents: f"{cents // 100}.{cents % 100:02d}"),
                   st.integers(0, 10**5))
items = st.fixed_dictionaries(
    {"item_id": st.from_regex(r"[A-Z0-9-]{1,20}", fullmatch=True), "item_name": texts,
     "price": prices, "quantity": st.integers(1, 100)},
    optional={"item_brand": texts, "item_category": texts, "item_variant": texts})
plain = st.one_of(texts, st.integers(-10**9, 10**9), st.booleans(), st.none())
properties = st.dictionaries(keys.filter(lambda k: k not in KNOWN), st.one_of(
    plain, st.lists(plain, max_size=3), st.dictionaries(keys, plain, max_size=3)), max_size=4)
KNOWN = {"event", "event_id", "time", "page", "page_location", "page_referrer", "page_title",
         "loaded", "user", "ecommerce", "search_term", "transaction_id", "status",
         "billing_address", "shipping_address", "sc", "source"}


@st.composite
def valid_event(draw: Any, backend: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["page_view", "view_item", "add_to_cart", "purchase",
                                 "identify", "custom"]))
    event: dict[str, Any] = {"event": kind, "event_id": draw(event_id())}
    if kind == "page_view":
        event["page"] = {"location": "https://shop.example/" + draw(keys), "title": draw(texts)}
    elif kind in ("view_item", "add_to_cart"):
        event["ecommerce"] = {"currency": "USD", "value": draw(prices),
                              "items": draw(st.lists(items, min_size=1, max_size=3))}
    elif kind == "purchase":
        event["ecommerce"] = {"transaction_id": draw(st.from_regex(r"[0-9]{1,10}", fullmatch=True)),
                              "currency": "USD", "value": draw(prices), "tax": draw(prices),
                              "items": draw(st.lists(items, min_size=1, max_size=3))}
    elif kind == "custom":
        event["event"] = "c_" + draw(keys)
        event.update(draw(properties))
    if backend or kind in ("identify", "purchase") or draw(st.booleans()):
        event["user"] = {"email": draw(emails)}
    return event


def valid_browser_body(events: list[dict[str, Any]], sc: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"site_id": SITE, "events": events}
    if sc is not None:
        body["sc"] = sc
    return body


# Mutations: one place in the body gets the sentinel ----------------------------------------

def places(value: Any) -> Iterator[tuple[str, Any, Any]]:
    """Every place a poison can go: ("set", container, key) replaces a value (list
    elements too), ("add", dict, None) adds a key, ("key", dict, key) renames a key."""
    if isinstance(value, dict):
        yield ("add", value, None)
        for key, child in value.items():
            yield ("set", value, key)
            yield ("key", value, key)
            yield from places(child)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield ("set", value, index)
            yield from places(child)


@st.composite
def poisoned(draw: Any, body: Any) -> tuple[Any, str | bytes]:
    """``body`` with the sentinel in one place, and the poison that replaces it."""
    where = draw(st.sampled_from(list(places(body))))
    poison = draw(st.sampled_from(POISON_TEXT + POISON_BYTES))
    how, container, key = where
    if how == "set":
        container[key] = SENTINEL
    elif how == "add":
        container[draw(st.sampled_from(["extra", "sc", "time", "quantity", "price", "email",
                                        "event_id", "event", "items", "value"]))] = SENTINEL
    else:
        container[SENTINEL] = container.pop(key)
    return body, poison


# The app under test -------------------------------------------------------------------------

class LiveApp:
    """The real app under uvicorn in a thread of its own, on a loopback port."""

    def __init__(self, tmp: Path):
        self.settings = settings_for(tmp)
        self.db = self.settings.server.sqlite_path
        app = create_app(self.settings, store=open_store(self.settings, writer="thread"))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                   log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def __enter__(self) -> LiveApp:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    with LiveApp(tmp_path_factory.mktemp("props")) as app:
        yield app


def stored(db: str, where: str = "1", params: tuple = ()) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return conn.execute(f"SELECT count(*) FROM events WHERE {where}", params).fetchone()[0]


# Invariants ------------------------------------------------------------------------------------

def check_answer(response: httpx.Response, what: str) -> None:
    """Never a 5xx but 503; a 4xx/503 has the error shape; a 503 says when to come back."""
    status = response.status_code
    assert status < 500 or status == 503, f"{what}: {status} {response.text[:300]}"
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), (what, body)
        errors = body.get("errors")
        assert isinstance(errors, list) and errors, (what, body)
        assert all(isinstance(e, dict) and isinstance(e.get("field"), str) and e["field"]
                   and isinstance(e.get("problem"), str) and e["problem"] for e in errors), body
        assert body.get("message") == f"{errors[0]['field']}: {errors[0]['problem']}", body
    if status == 503:
        assert response.headers.get("retry-after", "").isdigit(), response.headers
    if status == 204:
        cookie = response.headers.get("set-cookie", "")
        assert SC_COOKIE.match(cookie), f"{what}: 204 with a bad sc cookie {cookie!r}"


def post(client: httpx.Client, backend: bool, content: bytes) -> httpx.Response:
    try:
        if backend:
            return client.post(BACKEND_PATH, content=content, headers=BACKEND_HEADERS)
        return client.post("/e", content=content, headers=BROWSER_HEADERS)
    except httpx.TransportError as exc:  # a dropped connection is an answer too: a wrong one
        raise AssertionError(f"no answer ({exc!r}) to {content[:200]!r}") from None


def send_valid_after(client: httpx.Client, db: str, backend: bool, what: str) -> None:
    """The invariant that matters most: intake still works after whatever came before."""
    event = {"event": "identify", "event_id": str(uuid.uuid4()), "user": {"email": "after@shop.example"}}
    if backend:
        response = post(client, True, json.dumps([event]).encode())
        assert response.status_code == 202, f"after {what}: {response.status_code} {response.text}"
    else:
        response = post(client, False, json.dumps(valid_browser_body([event])).encode())
        assert response.status_code == 204, f"after {what}: {response.status_code} {response.text}"
        check_answer(response, "valid event")
    assert stored(str(db), "event_id = ?", (event["event_id"],)) == 1, f"after {what}: not stored"


def send_and_check(client: httpx.Client, db: str, backend: bool, content: bytes,
                   events: int) -> httpx.Response:
    before = stored(db)
    response = post(client, backend, content)
    what = f"{'backend' if backend else 'browser'} body {content[:300]!r}"
    check_answer(response, what)
    after = stored(db)
    if 400 <= response.status_code < 500 or response.status_code == 503:
        assert after == before, f"{what}: answered {response.status_code} but stored {after - before}"
    else:
        assert response.status_code == (202 if backend else 204), what
        assert after - before == events, f"{what}: 2xx but stored {after - before} of {events}"
    send_valid_after(client, db, backend, what)
    return response


def holds_nul(content: bytes, backend: bool) -> bool:
    """Whether an event of the body holds a NUL (``\\u0000``) in a string or a key: refused
    (422) wherever it is, on either backend (PostgreSQL text can't hold it)."""
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return False
    if backend:
        events = (body["events"] if isinstance(body, dict) and "events" in body
                  and "event" not in body else body if isinstance(body, list) else [body])
    else:
        events = body.get("events") if isinstance(body, dict) else None
    return isinstance(events, list) and any("\\u0000" in json.dumps(e) for e in events)


def check_nul_refused(response: httpx.Response, content: bytes, backend: bool) -> None:
    if holds_nul(content, backend):
        assert response.status_code == 422, f"NUL in an event: {response.status_code} {content!r}"


# Properties -------------------------------------------------------------------------------------

@settings(PROPS, max_examples=20)
@given(data=st.data())
def test_generated_valid_events_are_accepted_and_stored(live: LiveApp, data: Any) -> None:
    """The generator's events are valid: so a 4xx in the poisoned runs is the poison's."""
    backend = data.draw(st.booleans())
    events = data.draw(st.lists(valid_event(backend), min_size=1, max_size=3))
    content = json.dumps(events if backend else valid_browser_body(events)).encode()
    response = send_and_check(live.client, live.db, backend, content, len(events))
    assert response.status_code in (202, 204), response.text


@settings(PROPS, max_examples=60)
@given(data=st.data())
def test_poisoned_browser_body_fails_alone(live: LiveApp, data: Any) -> None:
    events = data.draw(st.lists(valid_event(False), min_size=1, max_size=3))
    sc = data.draw(st.one_of(st.none(), st.just("CDA68358-94FB-4D83-9655-3FEB3C4114A3")))
    body, poison = data.draw(poisoned(valid_browser_body(events, sc)))
    content = splice(body, poison)
    check_nul_refused(send_and_check(live.client, live.db, False, content, len(events)),
                      content, False)


@settings(PROPS, max_examples=60)
@given(data=st.data())
def test_poisoned_backend_body_fails_alone(live: LiveApp, data: Any) -> None:
    events = data.draw(st.lists(valid_event(True), min_size=1, max_size=3))
    body: Any = events if len(events) > 1 or data.draw(st.booleans()) else events[0]
    body, poison = data.draw(poisoned(body))
    content = splice(body, poison)
    check_nul_refused(send_and_check(live.client, live.db, True, content, len(events)),
                      content, True)


# The issue's reproducers, each with the answer the interface names -----------------------------

def _browser(event_text: str, sc: str = "CDA68358-94FB-4D83-9655-3FEB3C4114A3") -> bytes:
    return ('{"site_id": "shop1", "sc": "%s", "events": [%s]}' % (sc, event_text)).encode()


ID = '"event_id": "e-%s"'
EXACT = [
    # (name, body, status (or the statuses allowed), field, for the browser endpoint). Field
    # None: any under events[0] for a 422; "body" for a 400 (refused while parsing, before
    # any field exists: nesting deeper than a parser goes, digits past Python's int limit).
    ("surrogate in page.title",
     _browser('{"event": "page_view", %s, "page": {"title": "\\ud800"}}' % ID), 422,
     "events[0].page.title"),
    ("surrogate in a key",
     _browser('{"event": "c_custom", %s, "\\ud800": 1}' % ID), 422, None),
    # JSON may come as UTF-16 or UTF-32 (json.detect_encoding): an escape is not the bytes
    # "\\ud" there, and the strings are checked one by one.
    ("surrogate in page.title, UTF-16",
     _browser('{"event": "page_view", "event_id": "e-utf16", "page": '
              '{"title": "x\\ud800y"}}').decode().encode("utf-16-le"), 422,
     "events[0].page.title"),
    ("surrogate in page.title, UTF-32",
     _browser('{"event": "page_view", "event_id": "e-utf32", "page": '
              '{"title": "x\\ud800y"}}').decode().encode("utf-32-be"), 422,
     "events[0].page.title"),
    ("raw ED A0 80", _browser('{"event": "page_view", %s, "page": {"title": "@@"}}' % ID)
     .replace(b"@@", b"\xed\xa0\x80"), 400, "body"),
    ("price 1e30", _browser('{"event": "view_item", %s, "ecommerce": {"items": '
                            '[{"item_id": "A", "price": 1e30}]}}' % ID), 422,
     "events[0].ecommerce.items[0].price"),
    ("time 1e17", _browser('{"event": "page_view", %s, "time": 1e17}' % ID), 422,
     "events[0].time"),
    ("time 0", _browser('{"event": "page_view", %s, "time": 0}' % ID), 422, "events[0].time"),
    ("quantity 1e5000", _browser('{"event": "add_to_cart", %s, "ecommerce": {"items": '
                                 '[{"item_id": "A", "quantity": 1e5000}]}}' % ID), 422,
     "events[0].ecommerce.items[0].quantity"),
    ("quantity 1e300000", _browser('{"event": "add_to_cart", %s, "ecommerce": {"items": '
                                   '[{"item_id": "A", "quantity": 1e300000}]}}' % ID), 422,
     "events[0].ecommerce.items[0].quantity"),
    ("quantity 100001", _browser('{"event": "add_to_cart", %s, "ecommerce": {"items": '
                                 '[{"item_id": "A", "quantity": 100001}]}}' % ID), 422,
     "events[0].ecommerce.items[0].quantity"),
    ("custom property 1e5000", _browser('{"event": "c_x", %s, "n": 1e5000}' % ID), 422, None),
    ("4400-digit integer", _browser('{"event": "c_x", %s, "n": %s}' % (ID, "7" * 4400)),
     (400, 422), None),
    ("nesting 1000", _browser('{"event": "c_x", %s, "p": %s}' % (ID, _nest(1000, "dict"))),
     (400, 422), None),
    ("nesting 50000", _browser('{"event": "c_x", %s, "p": %s}' % (ID, _nest(50000, "list"))),
     (400, 422), None),
    ("nesting 10 from the event", _browser('{"event": "c_x", %s, "p": %s}' % (ID, _nest(9, "list"))),
     422, None),
    ("too many keys", _browser('{"event": "c_x", %s, "p": {%s}}' % (
        ID, ",".join(f'"k{i}": 1' for i in range(101)))), 422, None),
    ("long string", _browser('{"event": "c_x", %s, "p": "%s"}' % (ID, "x" * 8193)), 422, None),
    ("event name with newline", _browser('{"event": "page_view\\n", %s}' % ID), 422,
     "events[0].event"),
    ("event id with newline", _browser('{"event": "page_view", "event_id": "e1\\n"}'), 422,
     "events[0].event_id"),
    ("email with a slash", _browser('{"event": "identify", %s, "user": {"email": "a/b@c.de"}}'
                                    % ID), 422, "events[0].user.email"),
    ("email with NUL", _browser('{"event": "identify", %s, "user": {"email": "a\\u0000b@c.de"}}'
                                % ID), 422, "events[0].user.email"),
    # NUL in any string or key: PostgreSQL text can't hold it, so neither backend takes it.
    ("item_name with NUL", _browser('{"event": "add_to_cart", %s, "ecommerce": {"items": '
                                    '[{"item_id": "A", "item_name": "Mug\\u0000 big"}]}}' % ID),
     422, "events[0].ecommerce.items[0].item_name"),
    ("custom property with NUL", _browser('{"event": "c_x", %s, "note": "a\\u0000b"}' % ID), 422,
     "events[0].note"),
    ("custom key with NUL", _browser('{"event": "c_x", %s, "k\\u0000": 1}' % ID), 422,
     "events[0].'k\\x00'"),
    # URLs that reach the feeds and vendors' emails: http(s) only.
    ("item_url javascript:", _browser('{"event": "view_item", %s, "ecommerce": {"items": '
                                      '[{"item_id": "A", "item_url": "javascript:alert(document.domain)"}]}}'
                                      % ID), 422, "events[0].ecommerce.items[0].item_url"),
    ("image_url data:", _browser('{"event": "view_item", %s, "ecommerce": {"items": [{"item_id": '
                                 '"A", "image_url": "data:text/html,<script>alert(1)</script>"}]}}'
                                 % ID), 422, "events[0].ecommerce.items[0].image_url"),
    # A person's fields go into vendors' mail headers: no CR LF, no bidirectional controls.
    ("first_name with CR LF", _browser('{"event": "identify", %s, "user": {"email": "eve@b.co", '
                                       '"first_name": "Eve\\r\\nX-Injected: 1"}}' % ID), 422,
     "events[0].user.first_name"),
    ("email with U+202E", _browser('{"event": "identify", %s, "user": {"email": '
                                   '"ann\\u202e@example.com"}}' % ID), 422, "events[0].user.email"),
    # One rule of invisible characters (events.invisible_char); an email refuses every format
    # character besides, a name keeps them (a zero-width non-joiner is Persian spelling).
    ("first_name with U+202E", _browser('{"event": "identify", %s, "user": {"email": "eve@b.co", '
                                        '"first_name": "Eve\\u202e"}}' % ID), 422,
     "events[0].user.first_name"),
    ("email with U+200C", _browser('{"event": "identify", %s, "user": {"email": '
                                   '"ann\\u200c@example.com"}}' % ID), 422, "events[0].user.email"),
    ("page_location file:", _browser('{"event": "page_view", %s, "page_location": "file:///x"}'
                                     % ID), 422, "events[0].page_location"),
]


@pytest.mark.parametrize("name, body, status, field", EXACT, ids=[case[0] for case in EXACT])
def test_the_issue_reproducers_answer_the_named_4xx(live: LiveApp, name: str, body: bytes,
                                                     status: Any, field: str | None) -> None:
    body = body.replace(b'"e-%s"', json.dumps("e-" + uuid.uuid4().hex).encode())
    check_named(name, send_and_check(live.client, live.db, False, body, 1), status, field)


def check_named(name: str, response: httpx.Response, status: int | tuple[int, ...],
                field: str | None) -> None:
    allowed = status if isinstance(status, tuple) else (status,)
    assert response.status_code in allowed, f"{name}: {response.status_code} {response.text[:300]}"
    error = response.json()["errors"][0]
    if field is not None:
        assert error["field"] == field, response.text
    elif response.status_code == 400:
        assert error["field"] == "body", response.text
    else:
        assert error["field"].startswith("events[0]"), response.text
    # The problem is told to the sender: it names the limit, not the server's internals.
    assert "sys." not in error["problem"] and "Traceback" not in error["problem"], error


def test_a_trailing_newline_on_sc_gets_a_new_sc_not_a_dropped_connection(live: LiveApp) -> None:
    event_id = "e-" + uuid.uuid4().hex
    body = _browser('{"event": "page_view", "event_id": "%s"}' % event_id, sc="ABCDEFGH\\n")
    response = post(live.client, False, body)
    check_answer(response, "sc with a newline")
    assert response.status_code == 204, response.text
    sc = SC_COOKIE.match(response.headers["set-cookie"]).group(1)
    assert sc != "ABCDEFGH"
    with contextlib.closing(sqlite3.connect(live.db)) as conn:
        assert conn.execute("SELECT sc FROM events WHERE event_id = ?", (event_id,)).fetchall() \
            == [(sc,)]


def test_a_backend_sc_with_a_trailing_newline_is_refused_or_stored_without_it(live: LiveApp) -> None:
    """The backend gets no cookie; what matters is that no sc with a newline is stored
    (it would be set as a cookie on the visitor's next request)."""
    event_id = "e-" + uuid.uuid4().hex
    body = json.dumps([{"event": "identify", "event_id": event_id,
                        "user": {"email": "a@b.co"}, "sc": "ABCDEFGH\n"}]).encode()
    response = send_and_check(live.client, live.db, True, body, 1)
    if response.status_code == 422:
        assert response.json()["errors"][0]["field"] == "body[0].sc", response.text
    else:
        assert response.status_code == 202, response.text
        with contextlib.closing(sqlite3.connect(live.db)) as conn:
            assert conn.execute("SELECT sc FROM events WHERE event_id = ?",
                                (event_id,)).fetchall() == [("ABCDEFGH",)]


def test_a_backend_quantity_of_1e300000_is_refused_without_blocking_intake(live: LiveApp) -> None:
    body = ('[{"event": "add_to_cart", "event_id": "e-%s", "user": {"email": "a@b.co"}, '
            '"ecommerce": {"items": [{"item_id": "A", "quantity": 1e300000}]}}]'
            % uuid.uuid4().hex).encode()
    response = send_and_check(live.client, live.db, True, body, 1)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "body[0].ecommerce.items[0].quantity"


# The same through a real `onetag serve`: a writer process ---------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str]]:
    tmp = tmp_path_factory.mktemp("served")
    port = free_port()
    config = write_config(tmp / "onetag.toml", {
        "server": {"database": f"sqlite:///{tmp}/onetag.db",
                   "public_url": f"http://127.0.0.1:{port}", "forward": False},
        "sites": [{"id": SITE, "origins": [ORIGIN], "api_key": API_KEY, "currency": "USD"}]})
    with server_process(config, port, log=tmp / "serve.log"):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, str(tmp / "onetag.db")


@pytest.mark.slow
@pytest.mark.parametrize("name, body, status, field", EXACT, ids=[case[0] for case in EXACT])
def test_the_issue_reproducers_through_serve(served: tuple[httpx.Client, str], name: str,
                                             body: bytes, status: Any, field: str | None) -> None:
    client, db = served
    body = body.replace(b'"e-%s"', json.dumps("e-" + uuid.uuid4().hex).encode())
    check_named(name, send_and_check(client, db, False, body, 1), status, field)


@pytest.mark.slow
@settings(PROPS, max_examples=25)
@given(data=st.data())
def test_poisoned_bodies_through_serve(served: tuple[httpx.Client, str], data: Any) -> None:
    client, db = served
    backend = data.draw(st.booleans())
    events = data.draw(st.lists(valid_event(backend), min_size=1, max_size=3))
    body, poison = data.draw(poisoned(events if backend else valid_browser_body(events)))
    content = splice(body, poison)
    check_nul_refused(send_and_check(client, db, backend, content, len(events)), content, backend)


def test_nesting_within_the_limit_and_ordinary_numbers_are_accepted(live: LiveApp) -> None:
    """The limits refuse only what is past them (MAX_DEPTH 8 counted from the event)."""
    body = _browser('{"event": "c_x", "event_id": "e-%s", "p": %s, "n": 123456789012345678, '
                    '"f": 0.000001, "s": "%s"}' % (uuid.uuid4().hex, _nest(5, "list"), "x" * 4000))
    response = send_and_check(live.client, live.db, False, body, 1)
    assert response.status_code == 204, response.text


def test_a_long_invalid_value_is_not_echoed_back_whole(live: LiveApp) -> None:
    """A 5,000-character invalid event name (or site id) came back whole in the 422 (404):
    a problem quotes a short prefix, with an ellipsis."""
    name = "1" + "x" * 5000
    response = send_and_check(live.client, live.db, False, _browser(
        '{"event": "%s", "event_id": "e-%s"}' % (name, uuid.uuid4().hex)), 1)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "events[0].event"
    assert "x" * 100 not in response.text and "…" in response.json()["message"]
    assert len(response.content) < 600, response.text
    response = post(live.client, False, json.dumps(
        {"site_id": "s" * 5000, "events": [{"event": "page_view", "event_id": "e1"}]}).encode())
    assert response.status_code == 404 and len(response.content) < 400, response.text
    response = live.client.post(BACKEND_PATH.replace(SITE, "s" * 3000), json=[],
                                headers=BACKEND_HEADERS)
    assert response.status_code == 404 and len(response.content) < 400, response.text
