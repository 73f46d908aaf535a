"""``onetag person export/forget --sc``, on both backends: a session is followed to the
identity it is bound to only when that binding is verified (a signed identify). Any browser
may bind its own session to any email by typing it (docs/security.md), so an unverified
binding proves nothing: ``--sc`` then covers that session's own data (its events and their
deliveries), and the report says the binding was not followed, and why. Found by review:
``export --sc <attacker's cookie>`` handed over the victim's whole record and ``forget``
erased them."""

from __future__ import annotations

from server import trust
from server.events import Origin, normalise
from server.store import person

from fakes.harness import purchase, vendor_sections
from test_person import backend_event, browser, cart, ingest

V = "victim@example.com"
VSC, ASC = "VICT-0000-0001", "ATTK-0000-0001"
SECRET = "test-identity-secret-0123456789"


def signed(raw: dict, sc: str) -> dict:
    """A browser event whose identify the shop signed (``user.signature``)."""
    raw = {**raw, "user": {**raw["user"], "signature": trust.signature(SECRET,
                                                                     raw["user"]["email"])}}
    return normalise(raw, "e", Origin(site_id="shop1", source="browser", currency="USD",
                                      received_ms=1, sc=sc, identity_secret=SECRET))


async def victim_and_attacker(store, victim_signed: bool = False) -> None:
    identify = {"event": "identify", "event_id": "v1", "user": {"email": V, "first_name": "Vic"}}
    await ingest(store, signed(identify, VSC) if victim_signed else browser(identify, VSC))
    await ingest(store, backend_event({**purchase("1001", V), "user": {
        "email": V, "customer_id": "C-VIC", "first_name": "Victoria", "phone": "+15551234"}}))
    # The attacker types the victim's email in a form of their own session, then shops.
    await ingest(store, browser({"event": "page_view", "event_id": "a0"}, ASC),
                 browser({"event": "identify", "event_id": "a1", "user": {"email": V}}, ASC),
                 browser({"event": "add_to_cart", "event_id": "a2", "ecommerce": cart(7)}, ASC))


async def test_an_unverified_binding_is_not_followed(backend, fake) -> None:
    store = await backend.open(backend.settings(**vendor_sections(fake)))
    try:
        await victim_and_attacker(store)
        who = person.selector("shop1", sc=ASC)
        found = await store.person(who)
        doc = person.export_document(found, 1)
        assert doc["identities"] == []
        assert [s["sc"] for s in doc["sessions"]] == [ASC]
        # The session's own events, those after the typed email (naming the identity) too.
        assert [e["event_id"] for e in doc["events"]] == ["a0", "a1", "a2"]
        seqs = {e["seq"] for e in doc["events"]}
        assert doc["deliveries"] and all(d["event_seq"] in seqs for d in doc["deliveries"])
        [skipped] = doc["not_followed"]
        assert (skipped["sc"], skipped["session"]) == (ASC, doc["sessions"][0]["id"])
        assert "unverified" in skipped["why"] and "signed identify" in skipped["why"]
        assert any("not followed" in link for link in doc["links"])

        dry = await store.forget_person(who, dry_run=True)
        assert dry["not_followed"] == doc["not_followed"]
        report = await store.forget_person(who, dry_run=False)
        assert report["changed"]["identities"] == {"delete": 0}
        assert report["changed"]["sessions"] == {"delete": 1}
        assert report["changed"]["events"] == {"delete": 3}
        assert report["sessions"] == [ASC] and report["not_followed"] == doc["not_followed"]
        # The victim is untouched: identity, session, events.
        victim = await store.person(person.selector("shop1", email=V))
        assert [i["customer_id"] for i in victim.identities] == ["C-VIC"]
        assert [s["sc"] for s in victim.sessions] == [VSC]
        assert sorted(e["event_id"] for e in victim.events) == ["order-1001", "v1"]
        # The victim's own session, bound only by a typed email too, covers itself alone.
        own = await store.person(person.selector("shop1", sc=VSC))
        assert own.identities == [] and [e["event_id"] for e in own.events] == ["v1"]
    finally:
        await store.close()
    assert await backend.rows("SELECT sc FROM sessions ORDER BY sc") == [(VSC,)]


async def test_a_verified_binding_is_followed(backend, fake) -> None:
    store = await backend.open(backend.settings(identity_secret=SECRET,
                                                **vendor_sections(fake)))
    try:
        await victim_and_attacker(store, victim_signed=True)
        found = await store.person(person.selector("shop1", sc=VSC))
        doc = person.export_document(found, 1)
        assert [i["customer_id"] for i in doc["identities"]] == ["C-VIC"]
        assert doc["not_followed"] == []
        assert any("bound to identity #" in link for link in doc["links"])
        # Every session bound to the identity, the attacker's typed one too (the identity's
        # data as onetag holds it, as --email finds it).
        assert sorted(s["sc"] for s in doc["sessions"]) == [ASC, VSC]
        assert "order-1001" in {e["event_id"] for e in doc["events"]}
        # The attacker's cookie still reaches only the attacker's session.
        theirs = await store.person(person.selector("shop1", sc=ASC))
        assert theirs.identities == [] and [s["sc"] for s in theirs.sessions] == [ASC]
    finally:
        await store.close()
