"""The operator console in real headless Chromium against a real ``onetag serve`` that
forwards to the fake vendor server: log in through the page, Live shows a posted event,
Search shows what each vendor got and answered, a POST without its CSRF token is refused
from the page itself, no page holds a secret, and every page fits 360 px. Screenshots of
each page at 1280 and 360 px go to $ONETAG_ARTIFACTS (or test-artifacts/)/console/."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from fakes.vendor_server import FakeVendors

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "console-admin-token-9Qx2Lm7Rt"
SECRETS = [ADMIN_TOKEN, "site-api-key-5Fh8", "identity-secret-console-0123456789",
           "RJ-KEY-c0nsole", "RM-KEY-c0nsole", "ES-KEY-c0nsole", "SL-TOKEN-c0nsole"]
EMAIL = "ann.console@example.com"
TOML = """
[server]
database = "{database}"
public_url = "{public_url}"
forward = true
admin_token = "%(admin)s"
browser_grace_s = 0

[[sites]]
id = "shop1"
origins = ["{origin}"]
api_key = "%(api_key)s"
identity_secret = "%(identity)s"

[sites.rejoiner]
site_id = "RJSITE1"
domain = "127.0.0.1"
api_key = "%(rj)s"
api_base = "%(fake)s/rejoiner"

[sites.remarkety]
store_id = "RMSTORE"
api_key = "%(rm)s"
webhook_url = "%(fake)s/remarkety?storeId=RMSTORE"

[sites.esputnik]
site_id = "8A412DC"
api_key = "%(es)s"
tracker_url = "%(fake)s/esputnik"

[sites.sendlane]
integration_token = "SLTOKEN123"
api_token = "%(sl)s"
api_base = "%(fake)s/sendlane"
"""
FORWARD_ENV = {"ONETAG_FORWARD_BACKOFF_BASE_S": "0.05", "ONETAG_FORWARD_BACKOFF_CAP_S": "0.2",
               "ONETAG_FORWARD_IDLE_POLL_S": "0.05"}


def artifacts() -> Path:
    base = Path(os.environ.get("ONETAG_ARTIFACTS") or REPO / "test-artifacts")
    where = base / "console"
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVendors]:
    with FakeVendors() as server:
        yield server


@pytest.fixture(scope="module")
def shop(onetag_server, fake) -> Iterator[Any]:
    saved = {name: os.environ.get(name) for name in FORWARD_ENV}
    os.environ.update(FORWARD_ENV)
    try:
        server = onetag_server(TOML % {
            "admin": ADMIN_TOKEN, "api_key": SECRETS[1], "identity": SECRETS[2],
            "rj": SECRETS[3], "rm": SECRETS[4], "es": SECRETS[5], "sl": SECRETS[6],
            "fake": fake.base_url})
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield server


def post(url: str, body: Any, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status


def beacon(shop, origin: str, *events: dict[str, Any], sc: str | None = None) -> None:
    body: dict[str, Any] = {"site_id": "shop1", "events": list(events)}
    if sc:
        body["sc"] = sc
    assert post(shop.url + "/e", body, {"content-type": "text/plain", "origin": origin}) == 204


def log_in(page, shop, target: str = "/admin/live") -> None:
    page.goto(shop.url + target)
    assert "/admin/login" in page.url
    page.fill("#token", "not-it")
    page.click("button[type=submit]")
    page.wait_for_selector("p.error")
    assert "not the admin token" in page.text_content("p.error")
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{target}")


def shoot(page, name: str) -> None:
    """A screenshot at 1280 and at 360 px wide; at 360 the page itself must not scroll
    sideways (wide tables scroll inside their own box)."""
    for width in (1280, 360):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(artifacts() / f"{name}-{width}.png"), full_page=True)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{name} is {overflow}px wider than a {width}px screen"
    page.set_viewport_size({"width": 1280, "height": 900})


def assert_no_secret(page, where: str) -> None:
    html = page.content()
    leaked = [secret for secret in SECRETS if secret in html]
    assert leaked == [], f"{where} shows {leaked}"


def test_the_console_in_a_browser(shop, fake, static_server, context, wait_until):
    page = context.new_page()
    page.goto(shop.url + "/admin/login")
    shoot(page, "login")
    assert_no_secret(page, "the login page")
    log_in(page, shop)
    # The cookie as the browser keeps it.
    [cookie] = [c for c in context.cookies() if c["name"] == "onetag_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"

    # Live: a posted event appears within 2 s of its 204 (the stream is connected first).
    wait_until(lambda: page.text_content("#live-status") == "live", "the live stream")
    sc = str(uuid.uuid4()).upper()
    event_id = f"console-{uuid.uuid4()}"
    beacon(shop, static_server.origin, {
        "event": "page_view", "event_id": event_id,
        "page": {"location": static_server.origin + "/p/mug", "title": "Mug"}}, sc=sc)
    row = f'#live-events tr[data-seq] >> text="{static_server.origin}/p/mug"'
    page.wait_for_selector(row, timeout=2000)
    beacon(shop, static_server.origin,
           {"event": "identify", "event_id": f"id-{event_id}", "user": {"email": EMAIL}},
           {"event": "add_to_cart", "event_id": f"atc-{event_id}",
            "ecommerce": {"currency": "USD", "value": 29.99, "items": [
                {"item_id": "SKU-1000", "item_name": "Mug", "price": 29.99, "quantity": 1}]}},
           sc=sc)
    assert post(shop.url + "/api/v1/sites/shop1/events", [
        {"event": "purchase", "event_id": f"order-{event_id}", "user": {"email": EMAIL},
         "ecommerce": {"currency": "USD", "transaction_id": "A-1001", "value": 29.99,
                       "items": [{"item_id": "SKU-1000", "price": 29.99, "quantity": 1}]}}],
        {"content-type": "application/json", "authorization": f"Bearer {SECRETS[1]}"}) == 202
    page.wait_for_selector('#live-events >> text="order A-1001 · $29.99 · 1 item: SKU-1000"')
    shoot(page, "live")
    assert_no_secret(page, "Live")

    # Search by email, once the vendors have answered everything.
    wait_until(lambda: shop.query("SELECT count(*) FROM deliveries") [0][0] > 0
               and not shop.query("SELECT 1 FROM deliveries WHERE state = 'pending'"),
               "every delivery to be sent")
    page.goto(f"{shop.url}/admin/search?q={EMAIL}")
    shown = page.evaluate("""() => Array.from(document.querySelectorAll('pre.body'))
        .map(pre => { try { return JSON.parse(pre.textContent) } catch (e) { return pre.textContent } })""")
    received = [json.loads(r.body) for r in fake.requests() if r.body]
    assert received
    for body in received:
        assert body in shown, body
    assert {"status": "success"} in shown and "HTTP 200" in page.content()
    page.click("details.attempt summary")  # open one attempt: request beside answer
    shoot(page, "search")
    assert_no_secret(page, "Search")

    # The event page, then a delivery page, from the links.
    page.click(f'a[href^="/admin/events/"] >> nth=0')
    page.wait_for_selector("text=Normalised")
    shoot(page, "event")
    assert_no_secret(page, "the event page")
    [delivery_id] = shop.query("SELECT min(id) FROM deliveries WHERE state = 'delivered'")[0]
    page.goto(f"{shop.url}/admin/deliveries/{delivery_id}")
    page.wait_for_selector("text=Replay this delivery")
    shoot(page, "delivery")
    assert_no_secret(page, "the delivery page")

    # POSTs without the CSRF token are refused, from the page's own origin and cookies.
    statuses = page.evaluate("""async (id) => {
        const out = {};
        for (const path of ['/admin/logout', `/admin/deliveries/${id}/replay`, '/admin/login']) {
          const answer = await fetch(path, {method: 'POST', body: new URLSearchParams({x: '1'}),
                                            redirect: 'manual'});
          out[path] = [answer.status, await answer.text()];
        }
        const token = document.body.dataset.csrf;
        const ok = await fetch(`/admin/deliveries/${id}/replay`, {method: 'POST',
            body: new URLSearchParams({csrf_token: token}), redirect: 'manual'});
        out.with_token = [ok.status, ''];
        return out;
    }""", delivery_id)
    for path in ("/admin/logout", f"/admin/deliveries/{delivery_id}/replay", "/admin/login"):
        assert statuses[path] == [403, "CSRF token missing or wrong"], (path, statuses)
    assert statuses["with_token"][0] == 409  # let in; a delivered delivery is not resent

    page.goto(shop.url + "/admin/install")
    wait_until(lambda: "ago" in (page.text_content(f'tr[data-origin="shop1 {static_server.origin}"] .seen') or ""),
               "the origin check to see the page's events")
    page.click("button.refresh")
    page.wait_for_selector(".checked >> text=checked")
    # A time with its zone, like every other time in the console.
    assert re.fullmatch(r"checked \d\d:\d\d:\d\d UTC", page.text_content(".checked"))
    shoot(page, "install")
    assert_no_secret(page, "Install")

    # Log out through the nav: the console asks for the token again.
    page.click("button:has-text('Log out')")
    page.wait_for_url("**/admin/login")
    page.goto(shop.url + "/admin/live")
    assert "/admin/login" in page.url


def test_logging_out_elsewhere_stops_the_live_page(shop, context, wait_until):
    """The stream ends with the login; the page says it stopped rather than 'reconnecting'
    forever (its reconnection is sent to the login page, which is not a stream)."""
    page = context.new_page()
    log_in(page, shop)
    wait_until(lambda: page.text_content("#live-status") == "live", "the live stream")
    other = context.new_page()  # another tab of the same login logs out
    other.goto(shop.url + "/admin/install")
    other.click("button:has-text('Log out')")
    other.wait_for_url("**/admin/login")
    wait_until(lambda: page.text_content("#live-status") == "stopped: reload the page",
               "the Live page to say its stream stopped")
    page.reload()
    assert "/admin/login" in page.url
