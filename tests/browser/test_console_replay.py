"""The console's dead letters and replay in real Chromium against a real `onetag serve`
(admin_token, forward = true) and the fake vendor server, which fails on demand: orders die
(two attempts, ONETAG_FORWARD_MAX_ATTEMPTS=2), the operator logs in, filters the dead
letters, replays exactly the dry run's set from the console, and the vendor, recovered, gets
them; one delivery replayed from its own page is delivered too. Screenshots of the Vendors,
Dead letters and Reconciliation pages at 1280 and 360 px go to $ONETAG_ARTIFACTS (default
test-artifacts/)."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from fakes.vendor_server import FakeVendors

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "console-admin-token-Rq4Zt8Wx"
API_KEY = "console-site-key-Pm2Vn6Bc"
VENDOR_SECRETS = {"sendlane": "sl-api-token-Qw3Er5Ty", "remarkety": "rm-api-key-Ui7Op9As"}
ORDERS = ["C-101", "C-102", "C-103"]


def artifacts() -> Path:
    folder = Path(os.environ.get("ONETAG_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def config(fake: FakeVendors) -> str:
    return f"""
[server]
database = "{{database}}"
public_url = "{{public_url}}"
forward = true
admin_token = "{ADMIN_TOKEN}"

[[sites]]
id = "shop1"
api_key = "{API_KEY}"

[sites.sendlane]
integration_token = "sl-public-token"
api_token = "{VENDOR_SECRETS['sendlane']}"
api_base = "{fake.url('sendlane')}"

[sites.remarkety]
store_id = "rm-store"
api_key = "{VENDOR_SECRETS['remarkety']}"
webhook_url = "{fake.url('remarkety')}"
"""


def send_order(server, order: str) -> None:
    body = json.dumps([{"event": "purchase", "event_id": f"order-{order}",
                        "user": {"email": f"{order.lower()}@example.com"},
                        "ecommerce": {"currency": "USD", "transaction_id": order,
                                      "value": "12.50",
                                      "items": [{"item_id": "SKU-1", "item_name": "Mug",
                                                 "price": "12.50", "quantity": 1}]}}]).encode()
    request = urllib.request.Request(
        f"{server.url}/api/v1/sites/shop1/events", data=body, method="POST",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 202


def states(server, vendor: str) -> dict[int, str]:
    return {row["id"]: row["state"] for row in server.query(
        "SELECT id, state FROM deliveries WHERE vendor = ?", (vendor,))}


def no_secret(html: str) -> None:
    for secret in (ADMIN_TOKEN, API_KEY, *VENDOR_SECRETS.values()):
        assert secret not in html


def screenshots(page, base: str, name: str) -> None:
    """The page at 1280 px and at 360 px; at 360 px the page itself never scrolls sideways
    (wide tables scroll inside their own box)."""
    folder = artifacts()
    for width in (1280, 360):
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(base)
        page.screenshot(path=str(folder / f"console-{name}-{width}.png"), full_page=True)
        if width == 360:
            overflow = page.evaluate("() => document.documentElement.scrollWidth")
            assert overflow <= 360, f"{name} is {overflow} px wide at 360 px"
        no_secret(page.content())
    page.set_viewport_size({"width": 1280, "height": 900})


@pytest.fixture
def dead_orders(onetag_server, wait_until, monkeypatch):
    """A running onetag whose sendlane and remarkety deliveries of three orders are dead."""
    monkeypatch.setenv("ONETAG_FORWARD_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("ONETAG_FORWARD_BACKOFF_BASE_S", "0.05")
    monkeypatch.setenv("ONETAG_FORWARD_BACKOFF_CAP_S", "0.1")
    monkeypatch.setenv("ONETAG_FORWARD_IDLE_POLL_S", "0.05")
    with FakeVendors() as fake:
        fake.fail("sendlane", 500, times=None, body='{"error":"sendlane is down"}')
        fake.fail("remarkety", 503, times=None)
        server = onetag_server(config(fake))
        for order in ORDERS:
            send_order(server, order)
        wait_until(lambda: list(states(server, "sendlane").values()) == ["dead"] * 3
                   and list(states(server, "remarkety").values()) == ["dead"] * 3,
                   "six dead deliveries", timeout=60)
        fake.heal()  # the vendors are back
        try:
            yield server, fake
        finally:
            server.stop()  # before the fake vendors go away


def log_in(page, server) -> None:
    page.goto(f"{server.url}/admin/deadletters")
    assert "/admin/login" in page.url
    page.fill("#token", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/admin/deadletters$"))


def test_dead_letters_replayed_from_the_console_are_delivered(dead_orders, page, wait_until):
    server, fake = dead_orders
    page.on("dialog", lambda dialog: dialog.accept())  # "Replay these 3 deliveries?"
    log_in(page, server)
    # Filter: sendlane's dead deliveries whose last error says 500.
    page.select_option("select[name=vendor]", "sendlane")
    page.fill("input[name=error]", "HTTP 500")
    page.click("#filter button[type=submit]")
    page.wait_for_selector("#match-count")
    listed = page.url
    screenshots(page, listed, "deadletters")  # the rows and the "Replay these 3" button
    page.goto(listed)
    assert page.inner_text("#match-count strong") == "3"
    ids = sorted(int(a) for a in page.locator("#rows tbody tr td:first-child a").all_inner_texts())
    assert ids == sorted(states(server, "sendlane"))
    button = page.locator("#replay button")
    assert button.inner_text() == "Replay these 3"
    shown = int(page.locator("#replay input[name=shown]").get_attribute("value"))
    button.click()
    page.wait_for_selector("#notice")
    assert "Replayed 3 deliveries" in page.inner_text("#notice")
    # The dry-run count is what was replayed, and the replay is recorded.
    [record] = server.query("SELECT who, dry_run_count, replayed, ids FROM replays")
    assert record["who"] == "console:127.0.0.1"
    assert record["dry_run_count"] == shown == record["replayed"] == 3
    assert sorted(json.loads(record["ids"])) == ids
    wait_until(lambda: list(states(server, "sendlane").values()) == ["delivered"] * 3,
               "the replayed deliveries delivered", timeout=60)
    delivered = {r.json["order_id"] for r in fake.delivered("sendlane")}
    assert delivered == set(ORDERS)
    assert set(states(server, "remarkety").values()) == {"dead"}  # not in the filter
    assert page.locator("#replays tbody tr").count() >= 1
    no_secret(page.content())

    screenshots(page, f"{server.url}/admin/vendors", "vendors")
    screenshots(page, f"{server.url}/admin/reconcile", "reconcile")
    page.goto(f"{server.url}/admin/reconcile")
    summary = page.inner_text("#summary")
    assert re.search(r"sendlane\s+3\s+3\s+0", summary), summary
    assert re.search(r"remarkety\s+3\s+0\s+3", summary), summary


def test_one_delivery_replayed_from_its_own_page_is_delivered(dead_orders, page, wait_until):
    server, fake = dead_orders
    page.on("dialog", lambda dialog: dialog.accept())
    log_in(page, server)
    target = min(states(server, "remarkety"))
    page.goto(f"{server.url}/admin/deliveries/{target}")
    page.click("text=Replay this delivery")
    wait_until(lambda: states(server, "remarkety")[target] == "delivered",
               f"delivery #{target} delivered", timeout=60)
    others = {i: s for i, s in states(server, "remarkety").items() if i != target}
    assert set(others.values()) == {"dead"}
    [record] = server.query("SELECT who, replayed, ids FROM replays")
    assert (record["who"], record["replayed"], json.loads(record["ids"])) == (
        "console:127.0.0.1", 1, [target])
    page.goto(f"{server.url}/admin/deadletters?vendor=remarkety")
    assert page.inner_text("#match-count strong") == "2"
