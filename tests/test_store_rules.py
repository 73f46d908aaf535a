"""The store's rules (server/store/rules.py), checked directly: both backends apply them."""

from __future__ import annotations

import itertools
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as st

from server import outbox, trust
from server.events import ORDER_STATUSES
from server.envelope import Refused
from server.store import rules


def _event(name: str, source: str = "browser", **fields) -> dict:
    return {"name": name, "source": source, "event_id": "e1", "sc": "SC1", **fields}


# Identity ---------------------------------------------------------------------------------

def test_an_unverified_claim_keeps_only_the_email_and_binds_by_it() -> None:
    event = _event("identify", user={"email": "a@x.com", "first_name": "A", "customer_id": "C1"})
    step = rules.identity_step(event, False, None, {})
    assert step == rules.IdentityStep(rules.CLAIMED, "a@x.com")
    assert event["user"] == {"email": "a@x.com"}
    assert event["customer_id_dropped"] is True  # said by Sendlane's ignored customer-added
    plain = _event("identify", user={"email": "a@x.com"})
    rules.identity_step(plain, False, None, {})
    assert "customer_id_dropped" not in plain
    fact = _event("identify", "backend", user={"email": "a@x.com", "customer_id": "C1"})
    rules.identity_step(fact, False, None, {})
    assert "customer_id_dropped" not in fact and fact["user"]["customer_id"] == "C1"
    # Signed, the rest is kept but not the customer id: the signature signs the email only.
    signed = _event("identify", trust.VERIFIED,
                    user={"email": "a@x.com", "first_name": "A", "customer_id": "C1"})
    step = rules.identity_step(signed, False, None, {})
    assert step == rules.IdentityStep(rules.TRUSTED, "a@x.com")
    assert signed["user"] == {"email": "a@x.com", "first_name": "A"}
    assert signed["customer_id_dropped"] is True
    only = _event("purchase", trust.VERIFIED, user={"customer_id": "C1"})
    assert rules.identity_step(only, True, 7, {"email": "a@x.com"}).kind == rules.KEEP
    assert only["user"] is None and only["customer_id_dropped"] is True


def test_a_consent_claim_binds_nobody_and_a_claim_of_the_own_email_looks_nothing_up() -> None:
    event = _event("unsubscribe", user={"email": "b@x.com"})
    assert rules.identity_step(event, False, 7, {"email": "a@x.com"}).kind == rules.KEEP
    event = _event("page_view", user={"email": "a@x.com"})
    assert rules.identity_step(event, False, 7, {"email": "a@x.com"}) == (rules.OWN, "a@x.com")


def test_a_verified_session_speaking_of_its_identity_is_verified_but_not_of_another() -> None:
    current = {"email": "a@x.com", "customer_id": "C1"}
    event = _event("add_to_cart", user={"email": "a@x.com"})
    assert rules.identity_step(event, True, 7, current).kind == rules.TRUSTED
    assert event["source"] == trust.VERIFIED
    other = _event("identify", user={"email": "b@x.com"})
    assert rules.identity_step(other, True, 7, current).kind == rules.CLAIMED
    assert other["source"] == trust.BROWSER


def test_backend_facts_are_trusted_and_an_event_naming_nobody_keeps_the_identity() -> None:
    event = _event("identify", "backend", user={"customer_id": "C9"})
    assert rules.identity_step(event, False, None, {}) == (rules.TRUSTED, None)
    assert rules.identity_step(_event("page_view"), False, 3, {"email": "a@x.com"}).kind == rules.KEEP


def test_match_identity_email_first_and_a_customer_id_with_another_email_is_not_a_match() -> None:
    by_email, by_customer = {"id": 1, "email": "a@x.com"}, {"id": 2, "email": "old@x.com"}
    assert rules.match_identity({"email": "a@x.com"}, by_email, by_customer) is by_email
    assert rules.match_identity({"email": "a@x.com", "customer_id": "C"}, None, by_customer) is None
    assert rules.match_identity({"customer_id": "C"}, None, by_customer) is by_customer


def test_a_customer_id_held_by_another_identity_stays_with_it() -> None:
    fields = {"email": "a@x.com", "customer_id": "C2"}
    assert rules.customer_id_to_check(fields, {"customer_id": "C2"}) is None
    assert rules.customer_id_to_check(fields, None) == "C2"
    assert rules.keep_customer_id(fields, None, True) == {"email": "a@x.com"}
    assert rules.keep_customer_id(fields, {"customer_id": "C1"}, True)["customer_id"] == "C1"
    assert rules.keep_customer_id(fields, None, False) is fields


def test_binding_a_session() -> None:
    # (switch, newly_bound, verified, newly_verified)
    assert rules.bind_session(trust.BROWSER, None, None, 5) == (False, True, None, False)
    assert rules.bind_session(trust.BACKEND, 1, 4, 5) == (True, False, None, False)  # switch
    assert rules.bind_session(trust.VERIFIED, None, 4, 5) == (True, False, 1, True)
    assert rules.bind_session(trust.BACKEND, 1, 5, 5) == (False, False, 1, False)  # stays
    assert rules.bind_session(trust.VERIFIED, None, None, 5) == (False, True, 1, True)
    assert rules.bind_session(trust.VERIFIED, None, 5, 5) == (False, False, 1, True)  # typed first
    assert rules.bind_session(trust.VERIFIED, 1, 5, 5) == (False, False, 1, False)  # already
    assert rules.bind_session(trust.VERIFIED, 1, 4, 5) == (True, False, 1, True)


def test_whose_held_rows_a_binding_releases() -> None:
    who = {"email": "a@b.co", "customer_id": "C-1"}
    typed = rules.bind_session(trust.BROWSER, None, None, 5)
    signed = rules.bind_session(trust.VERIFIED, None, None, 5)
    later = rules.bind_session(trust.VERIFIED, None, 5, 5)
    everyone = ["sc:S", "email:a@b.co", "customer:C-1"]
    assert rules.held_visitors("S", who, typed, signing=False) == everyone
    assert rules.held_visitors("S", who, typed, signing=True) == ["sc:S"]
    assert rules.held_visitors("S", who, signed, signing=True) == everyone
    assert rules.held_visitors("S", who, later, signing=True) == everyone[1:]
    assert rules.held_visitors("S", who, None, signing=True) == []
    assert rules.held_visitors("S", who, rules.bind_session(trust.BROWSER, None, 5, 5),
                               signing=False) == []


# The cart ---------------------------------------------------------------------------------

def _item(item_id: str, quantity: int, price: int = 100) -> dict:
    return {"item_id": item_id, "quantity": quantity, "price_minor": price}


def _guids():
    counter = itertools.count(1)
    return lambda: f"G{next(counter)}"


def test_cart_guid_changes_with_the_cart_and_the_browser_may_name_it() -> None:
    new_guid = _guids()
    step = rules.cart_step(None, _event("add_to_cart", ecommerce={"items": [_item("A", 1)]}),
                           "USD", new_guid)
    assert step.cart == ([_item("A", 1)], "G1", "USD", "G1") and step.snapshot["guid"] == "G1"
    same = rules.cart_step(step.cart, _event("view_cart", ecommerce={"items": [_item("A", 1)]}),
                           "USD", new_guid)
    assert same.cart[1] == "G1"  # the same cart state keeps its GUID
    named = rules.cart_step(same.cart, _event("add_to_cart", cart_guid="PAGE",
                                              ecommerce={"items": [_item("B", 1)]}), "USD", new_guid)
    assert named.cart[1] == "PAGE"
    bought = rules.cart_step(named.cart, _event("purchase", ecommerce={"currency": "EUR"}),
                             "USD", new_guid)
    assert named.cart[3] == "G1"  # a changed cart keeps its id: the GUID of its first state
    assert bought.cart is None and bought.lines == []
    assert bought.snapshot["guid"] == "PAGE" and bought.snapshot["item_count"] == 2
    assert bought.snapshot["id"] == "G1"  # the cart it bought
    assert bought.snapshot["currency"] == "EUR"
    assert rules.cart_step(None, _event("page_view"), "USD", new_guid) is None
    # The purchase closed the cart: the next one is another cart, with an id of its own; the
    # page's first GUID of it names it, so the page and the server name one cart alike.
    after = rules.cart_step(bought.cart, _event("add_to_cart", cart_guid="PAGE2",
                                                ecommerce={"items": [_item("C", 1)]}),
                            "USD", new_guid)
    assert after.cart[3] == after.snapshot["id"] == "PAGE2"
    later = rules.cart_step(after.cart, _event("add_to_cart", ecommerce={"items": [_item("D", 1)]}),
                            "USD", new_guid)
    assert later.cart[1] != "PAGE2" and later.cart[3] == later.snapshot["id"] == "PAGE2"


def test_a_purchase_without_a_cart_has_no_made_up_guid() -> None:
    step = rules.cart_step(None, _event("purchase"), "USD", _guids())
    assert step.snapshot["guid"] is None and step.snapshot["items"] == []


@given(st.lists(st.tuples(st.sampled_from(["add_to_cart", "remove_from_cart"]),
                          st.sampled_from("ABC"), st.integers(1, 3)), max_size=12))
def test_a_new_guid_exactly_when_the_lines_change(ops) -> None:
    new_guid, cart = _guids(), None
    for name, item_id, quantity in ops:
        step = rules.cart_step(cart, _event(name, ecommerce={"items": [_item(item_id, quantity)]}),
                               "USD", new_guid)
        before_lines, before_guid = (cart[0], cart[1]) if cart else ([], None)
        assert (step.cart[1] != before_guid) == (step.lines != before_lines or before_guid is None)
        cart = step.cart


def test_check_cart_bounds_lines_and_bytes() -> None:
    site = SimpleNamespace(max_cart_lines=2)
    assert rules.check_cart([_item("A", 1)], site, "f").startswith(b"[")
    with pytest.raises(Refused) as refused:
        rules.check_cart([_item(c, 1) for c in "ABC"], site, "events[0].ecommerce.items")
    assert refused.value.problem.field == "events[0].ecommerce.items"
    big = [{**_item("A", 1), "item_name": "x" * rules.MAX_CART_BYTES}]
    with pytest.raises(Refused):
        rules.check_cart(big, SimpleNamespace(max_cart_lines=200), "f")


def _fit(cart_lines, event, limit):
    """``cart_step`` then ``check_cart``, as both ingests apply them: the lines, or Refused."""
    cart = (cart_lines, "G0", "USD", "G0") if cart_lines else None
    step = rules.cart_step(cart, event, "USD", _guids(), limit)
    rules.check_cart(step.lines, SimpleNamespace(max_cart_lines=limit), "f")
    return step


def _add(source: str, *ids: str) -> dict:
    return _event("add_to_cart", source, ecommerce={"items": [_item(i, 1) for i in ids]})


def _ids(lines) -> list[str]:
    return [line["item_id"] + ("*" if line.get(rules.FACT) else "") for line in lines]


def test_a_backend_cart_event_drops_claimed_lines_oldest_first_and_never_a_fact() -> None:
    """A browser's lines are claims: a backend add_to_cart that would overflow the cart
    drops them, oldest first, to make room (``*``: a line the backend stated)."""
    claims = _fit(None, _add("browser", "A", "B", "C"), 3).lines
    assert _ids(claims) == ["A", "B", "C"]
    mixed = _fit(claims, _add("backend", "X"), 3).lines
    assert _ids(mixed) == ["B", "C", "X*"]
    assert _ids(_fit(mixed, _add("backend", "Y", "B"), 3).lines) == ["B*", "X*", "Y*"]
    # A claim over the limit is refused, as before; so is a fact its own lines overflow.
    with pytest.raises(Refused):
        _fit(mixed, _add("browser", "D"), 3)
    facts = _fit(None, _add("backend", "X", "Y", "Z"), 3).lines
    with pytest.raises(Refused):
        _fit(facts, _add("backend", "W"), 3)
    # A line the backend stated stays its own when the browser adds to it.
    assert _ids(_fit(facts, _add("browser", "X"), 3).lines) == ["X*", "Y*", "Z*"]
    # A whole cart from the backend is all facts; one from the browser all claims.
    replaced = _fit(claims, _event("view_cart", "backend", ecommerce={
        "items": [_item("P", 1)]}), 3).lines
    assert _ids(replaced) == ["P*"]


def test_a_backend_cart_event_drops_claimed_lines_for_the_byte_bound_too() -> None:
    name = "x" * (rules.MAX_CART_BYTES // 4)
    claims = [{**_item(f"C{i}", 1), "item_name": name} for i in range(3)]
    step = _fit(claims, _event("add_to_cart", "backend", ecommerce={
        "items": [{**_item("F", 1), "item_name": name}]}), 200)
    assert _ids(step.lines) == ["C1", "C2", "F*"]
    assert len(rules.check_cart(step.lines, SimpleNamespace(max_cart_lines=200), "f")) <= (
        rules.MAX_CART_BYTES)


@given(st.lists(st.tuples(st.sampled_from(["browser", "backend"]),
                          st.lists(st.sampled_from("ABCDEFGH"), min_size=1, max_size=4)),
                max_size=12), st.integers(1, 5))
def test_a_claim_never_blocks_nor_removes_a_fact(ops, limit) -> None:
    """Whatever the browser claimed, a backend add_to_cart is refused only when the lines
    the backend stated would overflow the cart alone, and no fact line is dropped."""
    lines: list = []
    for source, ids in ops:
        facts_before = {line["item_id"] for line in lines if line.get(rules.FACT)}
        try:
            step = _fit(lines, _add(source, *ids), limit)
        except Refused:
            assert source == "browser" or len(facts_before | set(ids)) > limit
            continue
        assert source == "browser" or len(facts_before | set(ids)) <= limit
        assert facts_before <= {line["item_id"] for line in step.lines if line.get(rules.FACT)}
        if source == "backend":
            assert set(ids) <= {line["item_id"] for line in step.lines if line.get(rules.FACT)}
        lines = step.cart[0]


# A claim meeting a fact -------------------------------------------------------------------

REQUEST = {"method": "POST", "url": "https://x", "json": {"a": 1},
           "headers": {"x-event-type": "orders/create"}}


def test_a_fact_cancels_a_claim_not_sent_and_goes() -> None:
    plan = rules.fact_meets_claim("remarkety", outbox.PENDING, REQUEST, None,
                                  {"id": 3, "state": outbox.PENDING, "attempts": 0}, False)
    assert plan == (outbox.PENDING, REQUEST, None, True)


def test_a_fact_the_browser_delivered_the_same_is_not_sent_and_a_different_one_corrects() -> None:
    claim = {"id": 3, "state": outbox.DELIVERED, "attempts": 1}
    same = rules.fact_meets_claim("remarkety", outbox.PENDING, REQUEST, None, claim, True)
    assert same.state == outbox.BROWSER and "delivery 3" in same.error and not same.cancel_claim
    other = rules.fact_meets_claim("remarkety", outbox.PENDING, REQUEST, None, claim, False)
    assert other.state == outbox.PENDING
    assert other.request["headers"]["x-event-type"] == "orders/update"


def test_a_claim_tried_and_differing_may_have_reached_the_vendor_so_the_fact_corrects() -> None:
    claim = {"id": 3, "state": outbox.PENDING, "attempts": 2}
    plan = rules.fact_meets_claim("remarkety", outbox.PENDING, REQUEST, None, claim, False)
    assert plan.cancel_claim and plan.request["headers"]["x-event-type"] == "orders/update"


def test_a_dead_claim_changes_nothing_and_no_claim_changes_nothing() -> None:
    for claim in ({"id": 3, "state": outbox.DEAD, "attempts": 5}, None):
        assert rules.fact_meets_claim("sendlane", outbox.PENDING, REQUEST, None, claim, True) \
            == (outbox.PENDING, REQUEST, None, False)


def test_claims_under_a_fact_key_and_waiting_facts() -> None:
    assert rules.claim_taken(outbox.PENDING, True) and rules.claim_taken(outbox.HELD, True)
    assert not rules.claim_taken(outbox.IGNORED, True) and not rules.claim_taken(outbox.PENDING, False)
    assert rules.waiting_fact_superseded(outbox.PENDING, 0, True)
    assert not rules.waiting_fact_superseded(outbox.PENDING, 1, True)
    assert not rules.waiting_fact_superseded(outbox.PENDING, 0, False)


# A customer's latest session --------------------------------------------------------------

_SESSIONS = st.lists(st.tuples(st.integers(0, 2), st.one_of(st.none(), st.integers(1, 6)),
                               st.sampled_from([None, 1])),
                     min_size=1, max_size=6)


@given(_SESSIONS, st.booleans())
def test_the_latest_session_is_one_order_in_memory_and_in_sql(sessions, verified_only) -> None:
    """``rules.latest_session`` (a batch's unwritten sessions) picks what
    ``rules.last_sc_sql`` (``LATEST_SESSION_SQL``) puts first (the stored ones): the session
    last active, in a tie the one of the later event (``last_seq``), then the later row (no
    ``last_seq``); with ``verified_only`` (a site with ``identity_secret``), of the verified
    sessions only, none when none is, and then the same read says that unverified ones are
    known (``rules.LastSession``: one read for both, verified ones first)."""
    import sqlite3

    states = [SimpleNamespace(id=index + 1, last_ms=last_ms, last_seq=last_seq,
                              verified=verified)
              for index, (last_ms, last_seq, verified) in enumerate(sessions)]
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, sc TEXT, last_ms INTEGER, "
               "last_seq INTEGER, verified INTEGER)")
    db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                   [(s.id, f"SC{s.id}", s.last_ms, s.last_seq, s.verified) for s in states])
    first = db.execute(f"SELECT {rules.LAST_SC_COLUMNS} FROM sessions WHERE 1 = 1 "
                       f"{rules.last_sc_sql(verified_only)}").fetchone()
    pairs = [(f"SC{s.id}", s) for s in states]
    stored = rules.LastSession.stored(first, verified_only, False)
    assert stored.last_sc == rules.latest_session(pairs, verified_only)
    assert stored.unverified == (True if verified_only and stored.last_sc is None else None)
    if stored.last_sc is not None and verified_only:
        assert states[int(stored.last_sc[2:]) - 1].verified == 1
    # The same sessions unwritten (a batch's) tell the same.
    unwritten, known = rules.LastSession.unwritten(pairs, verified_only)
    assert known and (unwritten or rules.LastSession.stored(None, verified_only, known)) == stored
    assert rules.LastSession.stored(None, verified_only, False) == (
        None, False if verified_only else None)
    assert rules.latest_session(()) is None
    assert rules.signs_identities(SimpleNamespace(identity_secret="s" * 32))
    assert not rules.signs_identities(SimpleNamespace(identity_secret=None))


def test_a_millisecond_tie_goes_to_the_later_event_not_the_newer_session() -> None:
    older = SimpleNamespace(id=1, last_ms=5, last_seq=9)  # created first, active last
    newer = SimpleNamespace(id=2, last_ms=5, last_seq=8)
    unwritten = SimpleNamespace(id=None, last_ms=5, last_seq=10)  # new in this batch
    assert rules.latest_session([("A", older), ("B", newer)]) == "A"
    assert rules.latest_session([("B", newer), ("A", older)]) == "A"
    assert rules.latest_session([("A", older), ("C", unwritten)]) == "C"


# Held rows --------------------------------------------------------------------------------

def test_held_rows_are_released_per_event_and_an_event_with_a_stale_row_expires() -> None:
    rows = [{"event_seq": 1, "vendor": "rejoiner", "created_ms": 900, "data": "d1"},
            {"event_seq": 1, "vendor": "sendlane", "created_ms": 900, "data": "d1"},
            {"event_seq": 2, "vendor": "rejoiner", "created_ms": 100, "data": "d2"}]
    released = rules.held_release(rows, now=1000, hold_ms=500)
    assert released == [rules.Held(1, "d1", frozenset({"rejoiner", "sendlane"}), True),
                        rules.Held(2, "d2", frozenset({"rejoiner"}), False)]
    event = rules.released_event({"name": "add_to_cart"}, {"id": 4, "email": "a@x.com",
                                                            "is_new": True})
    assert event["identity"] == {"id": 4, "email": "a@x.com", "is_new": False}


def test_the_store_imports_no_http_layer() -> None:
    """store/ reads bodies with envelope (pure): no web framework, no HTTP handler."""
    code = ("import sys, server.store, server.store.sqlite, server.store.postgres, "
            "server.store.sqlite_writer, server.store.rules\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'httpx')"
            " or m in ('server.ingest', 'server.app', 'server.forwarder')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_postgresql_url_without_its_driver_is_a_clear_error(monkeypatch) -> None:
    from server import config
    from server.store import DriverMissing, open_store

    settings = config.parse({"server": {"database": "postgresql://u:pw@db.example:5432/onetag"},
                             "sites": [{"id": "shop1"}]}, env={})
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg now fails
    with pytest.raises(DriverMissing) as missing:
        open_store(settings)
    # Both forms: from a checkout `onetag[postgresql]` would ask the index for another
    # package; from an installed wheel `.[postgresql]` names no project.
    assert "pip install '.[postgresql]' in onetag's checkout" in str(missing.value)
    assert "pip install 'onetag[postgresql]' where onetag came from a package index" \
        in str(missing.value)


@pytest.mark.parametrize("url, problem", [
    ("postgresql://u@db.example:5432/onetag", None),
    ("postgres://u@db.example/onetag", None),
    ("postgresql://db.example:5432/", "names its database"),
    ("postgresql://u@db.example:99999/onetag", "not a valid PostgreSQL URL"),
    ("mysql://u@db.example/onetag", "must be sqlite:///PATH or postgresql://"),
])
def test_database_urls_are_checked_and_a_password_never_shown(url, problem) -> None:
    from server import config

    if problem is None:
        config.check_database(url)
    else:
        with pytest.raises(ValueError, match=problem):
            config.check_database(url)
    shown = config.database_label("postgresql://u:s3cret@db.example:5432/onetag")
    assert "s3cret" not in shown and shown == "postgresql://u:***@db.example:5432/onetag"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="xy\x00\u00e9", max_size=6),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet="ab_\x00", min_size=1, max_size=4), inner, max_size=4),
    max_leaves=12)


def _at(value, path: str):
    """The value a ``_nul_field`` path names (dict keys without dots or brackets only)."""
    import re

    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        value = value[part[0]] if part[0] else value[int(part[1])]
    return value


@given(_json)
def test_the_nul_finder_names_a_string_that_holds_one_or_none(value) -> None:
    from server.jsontext import encode
    from server.store.pg_writer import nul_field

    found = nul_field(value, "events[0]")
    has_nul = b"\\u0000" in encode(value)
    assert (found is not None) == has_nul
    if found is not None:
        named = _at({"events": [value]}, "." + found)  # a string with one, or an object
        assert ("\x00" in named if isinstance(named, str)  # with one in a key
                else any("\x00" in key for key in named))


def test_a_request_applied_again_starts_from_its_events_as_sent() -> None:
    event = {"name": "add_to_cart", "source": trust.BROWSER, "cart": None,
             "user": {"email": "a@x.com", "first_name": "A"}}
    restore = rules.keep_pristine([("shop1", [event], [], None, None)])
    rules.identity_step(event, True, 7, {"email": "a@x.com"})  # upgraded, user cut
    event["identity"], event["cart"] = {"id": 7}, {"guid": "G"}
    assert event["source"] == trust.VERIFIED
    restore()
    assert event == {"name": "add_to_cart", "source": trust.BROWSER, "cart": None,
                     "user": {"email": "a@x.com", "first_name": "A"}}
    assert list(event) == ["name", "source", "cart", "user"]  # stored JSON keeps its order
    claim = {"name": "identify", "source": trust.BROWSER, "user": {"email": "a@x.com",
                                                                     "customer_id": "C1"}}
    restore = rules.keep_pristine([("shop1", [claim], [], None, None)])
    rules.identity_step(claim, False, None, {})
    assert claim["customer_id_dropped"] is True
    restore()
    assert claim == {"name": "identify", "source": trust.BROWSER,
                     "user": {"email": "a@x.com", "customer_id": "C1"}}


# An order's status change repeats the order (PlanContext.order) ---------------------------

def test_known_orders_prefer_the_fact_then_the_first_row_and_never_an_ignored_one() -> None:
    key = ("shop1", "remarkety", "orders/create:1")
    orders = rules.KnownOrders([key])

    def body(n: int) -> dict:
        return {"json": {"n": n}}

    orders.add(*key, 1, outbox.IGNORED, body(0))  # a claim onetag does not forward
    assert orders.get(key) is None and not orders
    orders.add(*key, 1, outbox.DELIVERED, body(1))
    orders.add(*key, 1, outbox.PENDING, body(2))  # a second claim: the first is the row kept
    assert orders.get(key) == {"n": 1}
    orders.add(*key, 0, outbox.PENDING, body(3))  # the fact replaces the claim at the vendor
    orders.add(*key, 0, outbox.PENDING, body(4))
    assert orders.get(key) == {"n": 3}
    orders.add("shop1", "remarkety", "orders/create:2", 0, outbox.PENDING, body(5))
    assert orders.get(("shop1", "remarkety", "orders/create:2")) is None  # not wanted


def test_the_orders_wanted_are_the_order_keys_of_the_status_changes_vendors() -> None:
    site = SimpleNamespace(id="shop1", vendors={"rejoiner": None, "remarkety": None,
                                                "sendlane": None})
    status = _event("order_status", "backend", ecommerce={"transaction_id": "7"})
    refund = _event("refund", "backend", ecommerce={"transaction_id": "8"})
    buy = _event("purchase", "backend", ecommerce={"transaction_id": "9"})
    assert rules.orders_wanted({"shop1": site}, [("shop1", status), ("shop1", refund),
                                                 ("shop1", buy)]) == sorted([
        ("shop1", "rejoiner", "convert:7"), ("shop1", "rejoiner", "convert:8"),
        ("shop1", "remarkety", "orders/create:7"), ("shop1", "remarkety", "orders/create:8"),
        # Remarkety's status changes too (ORDER_UPDATES_KEY), one key a status: a partial
        # refund repeats the latest status
        *[("shop1", "remarkety", f"orders/update:{order}:{name}")
          for order in "78" for name in ORDER_STATUSES],
        ("shop1", "sendlane", "order-placed:7"), ("shop1", "sendlane", "order-placed:8")])


def test_backend_lines_does_not_encode_a_cart_with_no_claim_to_drop(monkeypatch) -> None:
    """A whole backend cart is all facts: nothing could be dropped for size, so the cart is
    not encoded here (``check_cart`` encodes it once, to store and bound it)."""
    calls = []
    real = rules.encode
    monkeypatch.setattr(rules, "encode", lambda value: calls.append(1) or real(value))
    lines = [{"item_id": f"SKU{n}", "quantity": 1} for n in range(3)]
    kept = rules.backend_lines(lines, {"name": "view_cart"}, 10)
    assert [line["item_id"] for line in kept] == ["SKU0", "SKU1", "SKU2"]
    assert all(line.get(rules.FACT) for line in kept) and calls == []
    # A cart with a claim left in it is still measured (the claim may have to go).
    rules.backend_lines(lines, {"name": "remove_from_cart"}, 10)
    assert calls
