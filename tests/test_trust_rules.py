"""The trust rules as properties, on the real store (SQLite file, thread writer): whatever
sequence of unverified browser events names a customer the backend knows, the customer's
stored identity does not change, and no request onetag would send carries what the browser
claimed about them (names, phone, consent), nor an order, a refund or a consent change.

On both backends (tests/backends.py): a fresh SQLite file, or the test's PostgreSQL
database emptied, for each example."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from server.events import Origin, normalise
from server.store.base import SessionInfo

from backends import Backend
from support import item

VICTIM = "victim@example.com"
FORGED_NAME = "Pwned-Name"
FORGED_PHONE = "+19990001111"

sessions = st.sampled_from(["SC-ATTK-0001", "SC-ATTK-0002", "SC-VICT-0003"])
emails = st.sampled_from([VICTIM, "other@example.com", None])


@st.composite
def claims(draw) -> dict:
    name = draw(st.sampled_from(["identify", "unsubscribe", "opt_in", "add_to_cart",
                                 "begin_checkout", "purchase", "refund", "page_view"]))
    email = draw(emails)
    if email is None and name == "identify":
        user = {"customer_id": "CUST-42"}  # the takeover by customer id
    else:
        user = {"email": email or VICTIM}
    if draw(st.booleans()):
        user.update(first_name=FORGED_NAME, phone=FORGED_PHONE)
    if draw(st.booleans()):
        user["accepts_marketing"] = draw(st.booleans())
    if draw(st.booleans()):
        user["customer_id"] = "CUST-42"
    raw: dict = {"event": name, "loaded": draw(st.sampled_from([[], ["rejoiner", "esputnik"]])),
                 "user": user}
    if name in ("add_to_cart", "begin_checkout", "purchase", "refund"):
        raw["ecommerce"] = {"currency": "USD", "value": "1.00", "transaction_id": "1001",
                            "items": [item("SKU-X", "1.00")]}
    return raw


def sites(backend: Backend):
    sections = {"rejoiner": {"site_id": "R1", "domain": "d", "api_key": "k"},
                "remarkety": {"store_id": "S", "api_key": "k"},
                "esputnik": {"site_id": "E", "api_key": "k"},
                "sendlane": {"integration_token": "t", "api_token": "k"}}
    return backend.settings(**sections)


async def empty(backend: Backend) -> None:
    import asyncpg

    conn = await asyncpg.connect(backend.database)
    try:
        # DELETE, not TRUNCATE: the same four tables emptied (in foreign-key order), and
        # their sequences restarted as RESTART IDENTITY did (test_store_pg compares ids
        # across backends), without TRUNCATE's new files and their fsyncs (~0.25 s an
        # example, against ~0.07 s).
        await conn.execute(
            "DELETE FROM deliveries; DELETE FROM events; DELETE FROM sessions; "
            "DELETE FROM identities; "
            "SELECT setval(s, 1, false) FROM (SELECT pg_get_serial_sequence("
            "quote_ident(table_name), column_name) AS s FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name IN "
            "('deliveries', 'events', 'sessions', 'identities')) AS owned WHERE s IS NOT NULL")
    finally:
        await conn.close()


async def run(backend: Backend, events: list[tuple[str, dict]]) -> None:
    config = sites(backend)
    store = await backend.open(config)
    try:
        crm = normalise({"event": "identify", "event_id": "crm", "user": {
            "email": VICTIM, "customer_id": "CUST-42", "first_name": "Vic", "phone": "+15550100",
            "accepts_marketing": False}}, "e", Origin("shop1", "backend", "USD", 1))
        await store.ingest("shop1", [crm], [{}], SessionInfo())
        for index, (sc, raw) in enumerate(events):
            event = normalise({**raw, "event_id": f"claim-{index}"}, "e",
                              Origin("shop1", "browser", "USD", 1, sc=sc))
            await store.ingest("shop1", [event], [raw], SessionInfo())
    finally:
        await store.close()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(sessions, claims()), min_size=1, max_size=8))
def test_no_sequence_of_browser_claims_changes_a_known_customer(backend, events) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if backend.name == "sqlite":  # the fixture's database is per test, not per example
            db = Backend("sqlite", f"sqlite:///{Path(tmp) / 'onetag.db'}")
        else:
            db = backend
            asyncio.run(empty(db))
        asyncio.run(run(db, events))
        identity = asyncio.run(db.rows(
            "SELECT customer_id, first_name, phone, accepts_marketing FROM identities "
            "WHERE email = ?", VICTIM))
        sendable = asyncio.run(db.rows(
            "SELECT d.vendor, d.dedup_key, d.request, e.name FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            "WHERE e.source = 'browser' AND d.state IN ('pending', 'held')"))
        bound = asyncio.run(db.rows("SELECT s.sc FROM sessions s JOIN identities i "
                                    "ON i.id = s.identity_id WHERE i.customer_id = 'CUST-42'"))
    assert identity == [("CUST-42", "Vic", "+15550100", 0)]
    for vendor, key, request, name in sendable:
        assert name not in ("purchase", "refund", "unsubscribe", "opt_in"), (vendor, key)
        assert '"accepts_marketing":true' not in request.replace(" ", ""), (vendor, key)
        if VICTIM in request:  # a new email's profile may carry the names its browser gave
            assert FORGED_NAME not in request and FORGED_PHONE not in request, (vendor, key)
    # A session is bound to the customer only by the email it typed, never by the customer id:
    # every bound session sent an event naming the victim's email.
    victim_sessions = {sc for sc, raw in events if raw["user"].get("email") == VICTIM
                       and raw["event"] not in ("unsubscribe", "opt_in")}
    assert {sc for (sc,) in bound} <= victim_sessions
