"""A browser's ``user.customer_id`` is never a key to an identity, signed or not, on both
backends. Found by review: ``user.signature`` signs the normalised email only (the contract,
section 8; ``trust.signature``), yet a signed identify kept its ``customer_id``, and with no
identity for its email it matched the identity holding that customer id and wrote its email
onto it. An attacker signing their own email with the victim's customer id took over the
victim's identity: the victim's held backend order went with the attacker's cookie, and
``person export --sc <attacker's cookie>`` returned the victim's record. The customer id
comes only from the backend; the rest of a signed identify (names, phone, consent of its
own email's identity) still counts.
"""

from __future__ import annotations

from server import trust
from server.jsontext import loads
from server.store import person
from server.store.base import SessionInfo

from support import item
from test_held_for_session import OTHER_SC, SECRET, T0, VENDORS, deliveries, event

EVIL = "evil@x.co"
INFO = SessionInfo(user_agent="UA")


def victims_order(order_id: str = "1001") -> dict:
    """The backend knows its customer by customer id only."""
    return event({"event": "purchase", "event_id": f"o-{order_id}", "time": T0,
                  "user": {"customer_id": "C-VICTIM", "first_name": "Victoria"},
                  "ecommerce": {"transaction_id": order_id, "currency": "USD",
                                "items": [item("SKU-1", 10.00)]}})


def signed_identify(email: str = EVIL, **user: object) -> dict:
    return event({"event": "identify", "event_id": "x-1",
                  "user": {"email": email, "signature": trust.signature(SECRET, email),
                           **user}},
                 source="browser", sc=OTHER_SC, secret=SECRET)


async def test_a_signed_identify_with_the_victims_customer_id_takes_nothing(backend) -> None:
    store = await backend.open(backend.settings(identity_secret=SECRET, **VENDORS))
    try:
        await store.ingest("shop1", [victims_order()], [{}], INFO)
        await store.ingest("shop1", [signed_identify(customer_id="C-VICTIM",
                                                     first_name="Eve")], [{}], INFO)
        found = await store.person(person.selector("shop1", sc=OTHER_SC))
        doc = person.export_document(found, 1)
    finally:
        await store.close()
    rows = {key: state for key, state, _, _ in await deliveries(backend)
            if key.startswith("PurchasedItems")}
    assert rows == {"PurchasedItems:1001": "held"}  # still waiting for the victim's session
    assert sorted(await backend.rows("SELECT email, customer_id, first_name FROM identities"),
                  key=str) == sorted([(None, "C-VICTIM", "Victoria"), (EVIL, None, "Eve")],
                                     key=str)
    assert "o-1001" not in [e["event_id"] for e in doc["events"]]
    assert [i.get("customer_id") for i in doc["identities"]] == [None]
    [stored] = [data for data, in await backend.rows(
        "SELECT data FROM events WHERE event_id = 'x-1'")]
    stored = loads(stored)
    assert stored["source"] == trust.VERIFIED and stored["customer_id_dropped"] is True
    assert "customer_id" not in stored["user"] and stored["user"]["first_name"] == "Eve"


async def test_a_verified_session_cannot_add_a_customer_id_either(backend) -> None:
    """A session verified for its own email, then an event naming its own email and the
    victim's customer id: the identity of the email gets no customer id, the victim's no
    email."""
    store = await backend.open(backend.settings(identity_secret=SECRET, **VENDORS))
    try:
        await store.ingest("shop1", [victims_order()], [{}], INFO)
        await store.ingest("shop1", [signed_identify()], [{}], INFO)
        later = event({"event": "identify", "event_id": "x-2",
                       "user": {"email": EVIL, "customer_id": "C-VICTIM"}},
                      source="browser", sc=OTHER_SC)
        await store.ingest("shop1", [later], [{}], INFO)
    finally:
        await store.close()
    assert sorted(await backend.rows("SELECT email, customer_id FROM identities"),
                  key=str) == sorted([(None, "C-VICTIM"), (EVIL, None)], key=str)


async def test_sendlane_says_a_signed_identifys_customer_id_comes_from_the_backend(
        backend) -> None:
    """The ``customer_id_dropped`` reason Sendlane's ignored customer-added row gives, now
    for a signed identify too: a browser's customer id is never kept."""
    store = await backend.open(backend.settings(
        identity_secret=SECRET, sendlane={"integration_token": "t", "api_token": "k"}))
    try:
        await store.ingest("shop1", [signed_identify(customer_id="C-42")], [{}], INFO)
    finally:
        await store.close()
    [(state, why)] = await backend.rows(
        "SELECT state, last_error FROM deliveries WHERE dedup_key LIKE '%customer-added:%'")
    assert state == "ignored"
    assert "never kept, signed or not" in why and "only from the backend" in why
    assert "C-42" not in why
    assert await backend.rows("SELECT customer_id FROM identities") == [(None,)]
