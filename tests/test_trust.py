"""Browser events are claims, backend events are facts (docs/security.md), tried as an attacker
would: each case against a real ``onetag serve`` process and the fake vendors over loopback.

The attacker is a browser without a key posting to ``POST /e`` what the generated script
would post; the shop's backend posts with its key. What counts is what reaches the vendors'
servers (the fake records every request) and what the delivery rows say.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from typing import Any, Iterator

import httpx
import pytest

from fakes.harness import (ALL, API_KEY, ORIGIN, SITE, free_port, healthz, item, rows,
                           server_process, settings_data, wait_sync, write_config)
from fakes.vendor_server import FakeVendors, Recorded
from server import trust

SECRET = "identity-secret-for-tests-0123456789"
ATTACKER_SC = "A77AC4E2-0000-4000-8000-000000000001"
VICTIM_SC = "B0B0B0B0-0000-4000-8000-000000000002"
BUYER_SC = "BEA00000-0000-4000-8000-000000000003"  # the checkout sc a backend order names
ATTACKER, BUYER, VICTIM = "attacker@evil.example", "buyer@example.com", "victim@example.com"


@pytest.fixture
def fake() -> Iterator[FakeVendors]:
    with FakeVendors() as server:
        yield server


class Onetag:
    """A running ``onetag serve``, its database, and the two ways in."""

    def __init__(self, base: str, db: Any, fake: FakeVendors):
        self.client = httpx.Client(base_url=base, timeout=30)
        self.db = db
        self.fake = fake

    def beacon(self, *events: dict[str, Any], sc: str = ATTACKER_SC) -> httpx.Response:
        body = json.dumps({"site_id": SITE, "sc": sc, "events": list(events)})
        return self.client.post("/e", content=body, headers={"content-type": "text/plain",
                                                             "origin": ORIGIN})

    def browser(self, *events: dict[str, Any], sc: str = ATTACKER_SC) -> None:
        response = self.beacon(*events, sc=sc)
        assert response.status_code == 204, response.text

    def backend(self, *events: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(f"/api/v1/sites/{SITE}/events", json=list(events),
                                    headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 202, response.text
        return response.json()

    def settle(self) -> None:
        """Every row decided (none pending), none dead."""
        wait_sync(lambda: not rows(self.db, "d.state = 'pending'"), what="deliveries to settle",
                  describe=lambda: [(r["vendor"], r["dedup_key"], r["state"], r["last_error"])
                                    for r in rows(self.db, "d.state = 'pending'")])
        assert not rows(self.db, "d.state = 'dead'"), rows(self.db, "d.state = 'dead'")

    def take(self) -> list[Recorded]:
        """What the vendors received since the last take."""
        got = self.fake.requests()
        self.fake.clear()
        return got

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as conn:
            return conn.execute(query, params).fetchall()


@contextlib.contextmanager
def onetag(tmp_path, fake: FakeVendors, **site: Any) -> Iterator[Onetag]:
    port = free_port()
    data = settings_data(tmp_path, fake, port=port, site=site)
    config_path = write_config(tmp_path / "onetag.toml", data)
    with server_process(config_path, port, env={"SHOP1_IDENTITY_SECRET": SECRET},
                        log=tmp_path / "serve.log"):
        shop = Onetag(f"http://127.0.0.1:{port}", tmp_path / "onetag.db", fake)
        try:
            yield shop
        finally:
            shop.client.close()


def order(event_id: str, transaction_id: str, value: str, items: list[dict], **extra: Any) -> dict:
    return {"event": "purchase", "event_id": event_id,
            "ecommerce": {"currency": "USD", "transaction_id": transaction_id, "value": value,
                          "items": items}, **extra}


def carries(request: Recorded, text: str) -> bool:
    return text.lower() in request.body.decode("utf-8", "replace").lower()


def by(requests: list[Recorded], path_end: str = "", event_type: str | None = None) -> list[Recorded]:
    return [r for r in requests if r.path.endswith(path_end)
            and (event_type is None or r.headers.get("x-event-type") == event_type)]


def one(requests: list[Recorded]) -> Recorded:
    assert len(requests) == 1, [(r.method, r.path, r.json) for r in requests]
    return requests[0]


REAL_ITEMS = [item("SKU-1", "200.00"), item("SKU-2", "50.00")]


def assert_real_order_everywhere(got: list[Recorded]) -> None:
    """The real order 2002 ($250, the buyer) at every vendor taking orders server-side."""
    convert = one(by(got, "/customer/convert/"))
    assert convert.json["email"] == BUYER and convert.json["cart_data"]["cart_value"] == 25000
    remarkety = one([r for r in got if r.vendor == "remarkety"
                     and r.headers.get("x-event-type", "").startswith("orders/")])
    assert remarkety.json["email"] == BUYER and remarkety.json["total_price"] == 250
    assert remarkety.json["id"] == "2002"
    esputnik = one([r for r in got if r.vendor == "esputnik"])
    assert esputnik.json["PurchasedItems"]["OrderNumber"] == "2002"
    assert esputnik.json["GeneralInfo"]["user_email"] == BUYER
    sendlane = one(by(got, "/order-placed"))
    assert sendlane.json["email"] == BUYER and sendlane.json["total"] == 250
    assert sendlane.json["order_id"] == "2002"


# 1. Forged orders -----------------------------------------------------------------------------


def test_a_forged_order_blocks_nothing_and_the_real_one_reaches_every_vendor(tmp_path, fake):
    with onetag(tmp_path, fake) as shop:  # an api_key: order_source is "backend"
        shop.browser(order("forged-2002", "2002", "0.01", [item("SKU-1", "0.01")],
                           user={"email": ATTACKER}, loaded=["rejoiner", "esputnik"]))
        shop.settle()
        assert not [r for r in shop.take() if carries(r, ATTACKER)]
        ignored = rows(shop.db, "d.state = 'ignored'")
        assert {r["vendor"] for r in ignored} == {"remarkety", "sendlane"}
        assert all(r["last_error"].startswith("unverified: purchase from a browser")
                   for r in ignored)

        # The backend names the buyer's checkout sc: eSputnik requires one (cookies.sc).
        answer = shop.backend(order("crm-2002", "2002", "250.00", REAL_ITEMS, sc=BUYER_SC,
                                    user={"email": BUYER, "first_name": "Bea"}))
        assert answer["duplicates"] == []
        shop.settle()
        got = shop.take()
    assert_real_order_everywhere(got)
    assert not [r for r in got if carries(r, ATTACKER)]


def test_with_browser_orders_a_backend_fact_corrects_a_forged_one(tmp_path, fake):
    """order_source = "browser": the forged order is forwarded (what such a site trusts); the
    backend's fact then reaches every vendor as its update (Remarkety orders/update, Sendlane
    order-placed under a new event_id), never blocked by the browser's copy."""
    with onetag(tmp_path, fake, order_source="browser") as shop:
        shop.browser(order("forged-2002", "2002", "0.01", [item("SKU-1", "0.01")],
                           user={"email": ATTACKER}, loaded=["rejoiner", "esputnik"]))
        shop.settle()
        forged = shop.take()
        assert one(by(forged, "/order-placed")).json["email"] == ATTACKER
        shop.backend(order("crm-2002", "2002", "250.00", REAL_ITEMS, sc=BUYER_SC,
                           user={"email": BUYER}))
        shop.settle()
        got = shop.take()
    assert_real_order_everywhere(got)
    assert one([r for r in got if r.vendor == "remarkety"]).headers["x-event-type"] == "orders/update"
    assert one(by(got, "/order-placed")).json["event_id"] == "2002:backend"


# 2. Blocked event ids --------------------------------------------------------------------------


def test_a_browser_event_id_never_suppresses_a_backend_event(tmp_path, fake):
    with onetag(tmp_path, fake) as shop:
        shop.browser({"event": "page_view", "event_id": "os-3003-cancelled", "loaded": ALL})
        status = {"event": "order_status", "event_id": "os-3003-cancelled", "status": "cancelled",
                  "user": {"email": BUYER}, "ecommerce": {"transaction_id": "3003"}}
        assert shop.backend(status)["duplicates"] == []
        assert shop.backend(status)["duplicates"] == ["os-3003-cancelled"]  # its own retry
        shop.settle()
        got = shop.take()
        sources = shop.sql("SELECT source FROM events WHERE event_id = 'os-3003-cancelled' "
                           "ORDER BY seq")
    assert sources == [("browser",), ("backend",)]
    assert one(by(got, "/customer/cancel/")).json["email"] == BUYER
    assert one(by(got, event_type="orders/update")).json["status"]["code"] == "cancelled"
    assert one(by(got, "/order-placed")).json["status"] == "cancelled"


# 3. Consent and order state for someone else ------------------------------------------------------


def test_browser_consent_and_order_state_for_someone_else_reach_no_vendor(tmp_path, fake):
    with onetag(tmp_path, fake) as shop:
        # The attacker checked out as a guest under the victim's email: the shop's backend
        # reports that order with the attacker's sc. It binds the session, it verifies nothing.
        shop.backend({"event": "identify", "event_id": "crm-victim", "sc": ATTACKER_SC,
                      "user": {"email": VICTIM, "first_name": "Vic", "accepts_marketing": True}})
        shop.settle()
        shop.take()
        shop.browser({"event": "unsubscribe", "event_id": "u-1", "user": {"email": VICTIM}},
                     {"event": "opt_in", "event_id": "o-1", "user": {"email": ATTACKER},
                      "type": "made-up consent record"},
                     {"event": "refund", "event_id": "r-1", "user": {"email": VICTIM},
                      "ecommerce": {"transaction_id": "1001", "value": "10.00"}})
        refused = shop.beacon({"event": "order_status", "event_id": "s-1", "status": "cancelled",
                               "user": {"email": VICTIM}, "ecommerce": {"transaction_id": "1001"}})
        assert refused.status_code == 422 and "events[0].event" in refused.text
        shop.settle()
        assert shop.take() == []
        reasons = {(r["event_name"], r["vendor"]): r["last_error"]
                   for r in rows(shop.db, "d.state = 'ignored'")}
        consent = shop.sql("SELECT accepts_marketing, first_name FROM identities WHERE email = ?",
                           (VICTIM,))
        attacker_identity = shop.sql("SELECT count(*) FROM identities WHERE email = ?", (ATTACKER,))
    assert consent == [(1, "Vic")] and attacker_identity == [(0,)]
    assert reasons[("unsubscribe", "rejoiner")].startswith("unverified: unsubscribe needs")
    assert reasons[("opt_in", "remarkety")].startswith("unverified: opt_in needs")
    assert {vendor for name, vendor in reasons if name == "refund"} == {
        "rejoiner", "remarkety", "sendlane"}
    # The operator sees them: `onetag deliveries` counts the ignored rows per vendor.
    assert all(r["state"] != "pending" for r in rows(shop.db))


# 4. Profile overwrite ---------------------------------------------------------------------------


def test_an_unverified_identify_overwrites_no_known_profile(tmp_path, fake):
    with onetag(tmp_path, fake) as shop:
        shop.backend({"event": "identify", "event_id": "crm-victim",
                      "user": {"email": VICTIM, "first_name": "Vic", "phone": "+15550100",
                               "accepts_marketing": False}})
        shop.settle()
        shop.take()
        shop.browser({"event": "identify", "event_id": "pwn", "loaded": [],
                      "user": {"email": VICTIM, "first_name": "Pwned", "phone": "+19990000",
                               "accepts_marketing": True}},
                     {"event": "begin_checkout", "event_id": "pwn-cart", "loaded": [],
                      "user": {"email": VICTIM, "first_name": "Pwned"},
                      "ecommerce": {"currency": "USD", "items": [item("SKU-9", "9.99")]}})
        # A new email: a browser may create its profile, but never with consent.
        shop.browser({"event": "identify", "event_id": "new", "loaded": [],
                      "user": {"email": "nina@example.com", "first_name": "Nina",
                               "accepts_marketing": True}}, sc=VICTIM_SC)
        shop.settle()
        got = shop.take()
        stored = shop.sql("SELECT first_name, phone, accepts_marketing FROM identities "
                          "WHERE email = ?", (VICTIM,))
    assert got and not [r for r in got if carries(r, "Pwned") or carries(r, "+19990000")]
    assert not [r for r in got if '"accepts_marketing": true' in r.body.decode().replace(
        '":true', '": true')]
    assert stored == [("Vic", "+15550100", 0)]
    # The cart reached the vendors under the email typed (what a guest's form does), with the
    # profile onetag knows from the backend.
    assert one(by(got, event_type="carts/update")).json["customer"]["first_name"] == "Vic"
    nina = one([r for r in got if r.vendor == "rejoiner" and "nina" in r.path])
    assert nina.json == {"email": "nina@example.com", "first_name": "Nina"}
    assert one(by(got, event_type="customers/create")).json["email"] == "nina@example.com"


# 5. customer_id takeover -----------------------------------------------------------------------


def test_an_unverified_customer_id_binds_no_session(tmp_path, fake):
    with onetag(tmp_path, fake) as shop:
        shop.backend({"event": "identify", "event_id": "crm-42",
                      "user": {"email": VICTIM, "customer_id": "CUST-42"}})
        shop.settle()
        shop.take()
        shop.browser({"event": "identify", "event_id": "claim-42", "loaded": [],
                      "user": {"customer_id": "CUST-42"}},
                     {"event": "begin_checkout", "event_id": "bc-1", "loaded": [],
                      "ecommerce": {"currency": "USD", "items": [item("SKU-66", "66.00")]}})
        shop.settle()
        got = shop.take()
        bound = shop.sql("SELECT identity_id FROM sessions WHERE sc = ?", (ATTACKER_SC,))
    assert bound == [(None,)]
    assert not [r for r in got if carries(r, VICTIM)]
    assert not by(got, event_type="carts/update") and not by(got, "/checkout-started")


# 6. Identity switch -----------------------------------------------------------------------------


def test_a_session_that_changes_identity_starts_clean(tmp_path, fake):
    with onetag(tmp_path, fake) as shop:
        # A's era, with an identity the backend gave by customer id only (no email yet), so
        # the cart waits (held) for an email.
        shop.backend({"event": "identify", "event_id": "crm-a", "sc": VICTIM_SC,
                      "user": {"customer_id": "CUST-A"}})
        shop.browser({"event": "add_to_cart", "event_id": "a-cart", "loaded": [],
                      "ecommerce": {"currency": "USD", "items": [item("SKU-A", "10.00")]}},
                     sc=VICTIM_SC)
        assert rows(shop.db, "d.state = 'held'")
        # Another person on the same sc identifies as B.
        shop.browser({"event": "identify", "event_id": "b-id", "loaded": [],
                      "user": {"email": "b@example.com"}},
                     {"event": "add_to_cart", "event_id": "b-cart", "loaded": [],
                      "ecommerce": {"currency": "USD", "items": [item("SKU-B", "20.00")]}},
                     sc=VICTIM_SC)
        shop.settle()
        got = shop.take()
        held = rows(shop.db, "e.event_id = 'a-cart' AND d.vendor IN ('remarkety', 'sendlane')")
        session = shop.sql("SELECT i.email, s.cart_items FROM sessions s JOIN identities i "
                           "ON i.id = s.identity_id WHERE s.sc = ?", (VICTIM_SC,))
        # Then a signed-in A' (email) on a fresh sc, switching to C: C's cart is C's alone.
        shop.browser({"event": "identify", "event_id": "a2-id", "loaded": [],
                      "user": {"email": "a2@example.com"}},
                     {"event": "add_to_cart", "event_id": "a2-cart", "loaded": [],
                      "ecommerce": {"currency": "USD", "items": [item("SKU-A2", "5.00")]}},
                     {"event": "identify", "event_id": "c-id", "loaded": [],
                      "user": {"email": "c@example.com"}},
                     {"event": "view_cart", "event_id": "c-view", "loaded": [],
                      "ecommerce": {"currency": "USD", "items": []}})
        shop.settle()
        later = shop.take()
    assert {r["state"] for r in held} == {"ignored"}
    [(email, cart)] = session
    assert email == "b@example.com" and [line["item_id"] for line in json.loads(cart)] == ["SKU-B"]
    assert all(r["last_error"].startswith("identity switch") for r in held)
    under_b = [r for r in got if carries(r, "b@example.com")]
    assert under_b and not [r for r in under_b if carries(r, "SKU-A")]
    assert [r.json["line_items"] for r in by(got, event_type="carts/update")] == [
        [{"product_id": "SKU-B", "sku": "SKU-B", "name": "Item SKU-B", "title": "Item SKU-B",
          "quantity": 1, "price": 20}]]
    under_c = [r for r in later if carries(r, "c@example.com")]
    assert under_c and not [r for r in under_c if carries(r, "SKU-A2")]


# 7. Verified identity ---------------------------------------------------------------------------


def test_a_signed_identify_is_verified_and_a_wrong_signature_is_refused(tmp_path, fake):
    signed = trust.signature(SECRET, "Vera@Example.com")
    with onetag(tmp_path, fake, identity_secret="env:SHOP1_IDENTITY_SECRET") as shop:
        shop.backend({"event": "identify", "event_id": "crm-vera",
                      "user": {"email": "vera@example.com", "first_name": "Old"}})
        shop.settle()
        shop.take()
        wrong = shop.beacon({"event": "identify", "event_id": "w-1", "loaded": [],
                             "user": {"email": "vera@example.com", "first_name": "Pwned",
                                      "signature": trust.signature(SECRET, ATTACKER)}})
        assert wrong.status_code == 422
        assert wrong.json()["errors"][0]["field"] == "events[0].user.signature"
        assert shop.sql("SELECT count(*) FROM events WHERE event_id = 'w-1'") == [(0,)]
        # The store's page, for its signed-in customer Vera.
        shop.browser({"event": "identify", "event_id": "v-1", "loaded": [],
                      "user": {"email": "Vera@Example.com", "first_name": "Vera",
                               "accepts_marketing": True, "signature": signed.upper()}},
                     sc=VICTIM_SC)
        # Later in that session, unsigned: the session's identity is verified.
        shop.browser({"event": "unsubscribe", "event_id": "v-2", "user": {"email": "vera@example.com"}},
                     sc=VICTIM_SC)
        # The same unsubscribe from another browser is a claim.
        shop.browser({"event": "unsubscribe", "event_id": "x-2", "user": {"email": "vera@example.com"}})
        shop.settle()
        got = shop.take()
        sources = dict(shop.sql("SELECT event_id, source FROM events WHERE event_id IN "
                                "('v-1', 'v-2', 'x-2')"))
        stored = shop.sql("SELECT raw || data FROM events WHERE event_id = 'v-1'")[0][0]
    assert sources == {"v-1": "verified browser", "v-2": "verified browser", "x-2": "browser"}
    assert signed not in stored.lower()  # neither the event as sent nor its normalised form
    profile = one([r for r in got if r.vendor == "rejoiner" and r.method == "PUT"])
    assert profile.json["first_name"] == "Vera"
    assert one(by(got, event_type="customers/update")).json["accepts_marketing"] is True
    assert one(by(got, "/customer/unsubscribe/")).json == {"email": "vera@example.com"}
    assert one(by(got, event_type="newsletter/unsubscribe")).json == {"email": "vera@example.com"}
    assert not [r for r in got if carries(r, "Pwned")]


# The demo: its own buttons use the verified path and the backend ----------------------------


def test_the_demo_signs_its_identify_and_reports_orders_from_its_backend(tmp_path):
    """``onetag serve`` without a config: the demo's stand-in for the shop's server signs the
    email its consent buttons push, and reports a placed order as a backend fact."""
    import os
    import subprocess
    import sys

    from fakes.harness import REPO

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)],
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_sync(lambda: _healthy(base), timeout=60, what="the demo to start")
        with httpx.Client(base_url=base, timeout=30) as client:
            signature = client.post("/demo/identity", json={"email": "Ann@Example.com"}).json()
            assert signature["email"] == "ann@example.com"
            events = [{"event": "opt_in", "event_id": "demo-o-1",
                       "user": {"email": "ann@example.com", "signature": signature["signature"]}},
                      {"event": "unsubscribe", "event_id": "demo-u-1",
                       "user": {"email": "bob@example.com"}}]  # unsigned: a claim
            answer = client.post("/e", content=json.dumps({"site_id": "demo", "events": events}),
                                 headers={"content-type": "text/plain", "origin": base})
            assert answer.status_code == 204, answer.text
            order_answer = client.post("/demo/order", json={
                "user": {"email": "ann@example.com", "first_name": "Ann"},
                "ecommerce": {"currency": "USD", "transaction_id": "DEMO-1", "value": "12.00",
                              "items": [item("SKU-1", "12.00")]}})
            assert order_answer.status_code == 202, order_answer.text

            def sink() -> list[dict]:
                return client.get("/demo/sink").json()
            wait_sync(lambda: {"/demo/sink/rejoiner/DEMO123/customer/opt_in/",
                               "/demo/sink/sendlane/tracking/order-placed"}
                      <= {r["path"] for r in sink()}, what="the demo's sink to get them",
                      describe=sink)
            got = sink()
    finally:
        process.terminate()
        process.wait(30)
    assert not [r for r in got if "unsubscribe" in r["path"]
                or (r["headers"].get("x-event-type") == "newsletter/unsubscribe")]
    [placed] = [r for r in got if r["path"].endswith("/order-placed")]
    assert placed["json"]["email"] == "ann@example.com" and placed["json"]["total"] == 12


def _healthy(base: str) -> bool:
    return healthz(base) is not None


def test_the_readme_signature_snippets_compute_what_onetag_checks(tmp_path):
    """docs/trust.md's Python and Node snippets sign as ``trust.signature`` verifies."""
    import os
    import re
    import shutil
    import subprocess

    from fakes.harness import REPO

    readme = (REPO / "docs" / "trust.md").read_text(encoding="utf-8")
    block = r"```{}\n((?:(?!```).)*{}(?:(?!```).)*)```"
    python = re.search(block.format("python", "onetag_signature"), readme, re.S).group(1)
    node = re.search(block.format("js", "onetagSignature"), readme, re.S).group(1)
    email, expected = " Ann@Example.com ", trust.signature(SECRET, "ann@example.com")
    env = {**os.environ, "SHOP1_IDENTITY_SECRET": SECRET}
    scope: dict[str, Any] = {}
    old = os.environ.get("SHOP1_IDENTITY_SECRET")
    os.environ["SHOP1_IDENTITY_SECRET"] = SECRET
    try:
        exec(python, scope)
        assert scope["onetag_signature"](email) == expected
    finally:
        if old is None:
            os.environ.pop("SHOP1_IDENTITY_SECRET")
        else:
            os.environ["SHOP1_IDENTITY_SECRET"] = old
    if shutil.which("node"):
        script = node + f"\nprocess.stdout.write(onetagSignature({json.dumps(email)}));\n"
        out = subprocess.run(["node", "-e", script], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.stdout == expected, out.stderr
    assert trust.signature_valid(SECRET, "ann@example.com", expected.upper())
    assert not trust.signature_valid(SECRET, "ann@example.com", trust.signature(SECRET, "bob@x.io"))
