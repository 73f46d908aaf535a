"""Builders for the operator console's tests: a config full of secrets, and a login."""

from __future__ import annotations

import re
from typing import Any

import httpx

from server import config

ADMIN_TOKEN = "admin-token-Zq8rT2vW9xY4"
# Every secret the config holds: no console page may contain any of them.
SECRETS = {
    "admin_token": ADMIN_TOKEN,
    "site api_key": "site-api-key-Hk3Lm9Pq",
    "identity_secret": "identity-secret-Vb7Nc2Xz-0123456789",
    "rejoiner api_key": "rejoiner-key-Aa1Bb2Cc",
    "remarkety api_key": "remarkety-key-Dd3Ee4Ff",
    "esputnik api_key": "esputnik-key-Gg5Hh6Ii",
    "sendlane api_token": "sendlane-token-Jj7Kk8Ll",
    "coupons remarkety_api_key": "coupons-remarkety-key-Mm9Nn0Oo",
    "coupons webhook_secret": "coupons-webhook-secret-Pp1Qq2Rr",
    "feed_token": "feed-token-Ss3Tt4Uu-0123456789",
}
ORIGIN = "https://shop.example"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')


def console_settings(tmp_path: Any, *, admin_token: str | None = ADMIN_TOKEN,
                     public_url: str = "http://console.example",
                     vendor_base: str = "http://127.0.0.1:9", forward: bool = False,
                     database: str | None = None) -> config.Settings:
    """Site ``shop1`` with all four vendors (secrets set) on a fresh SQLite file, or on
    ``database`` (a ``backends.Backend``'s)."""
    server: dict[str, Any] = {"database": database or f"sqlite:///{tmp_path}/onetag.db",
                              "public_url": public_url, "forward": forward}
    if admin_token is not None:
        server["admin_token"] = admin_token
    site = {
        "id": "shop1", "origins": [ORIGIN], "api_key": SECRETS["site api_key"],
        "identity_secret": SECRETS["identity_secret"], "feed_token": SECRETS["feed_token"],
        "rejoiner": {"site_id": "REJ1", "domain": "shop.example",
                     "api_key": SECRETS["rejoiner api_key"],
                     "api_base": f"{vendor_base}/rejoiner"},
        "remarkety": {"store_id": "store-1", "api_key": SECRETS["remarkety api_key"],
                      "webhook_url": f"{vendor_base}/remarkety"},
        "esputnik": {"site_id": "ESP1", "api_key": SECRETS["esputnik api_key"],
                     "tracker_url": f"{vendor_base}/esputnik"},
        "sendlane": {"integration_token": "sl-public", "api_token": SECRETS["sendlane api_token"],
                     "api_base": f"{vendor_base}/sendlane"},
        "coupons": {"webhook_url": f"{vendor_base}/shop/coupons",
                    "remarkety_api_key": SECRETS["coupons remarkety_api_key"],
                    "webhook_secret": SECRETS["coupons webhook_secret"]},
    }
    return config.parse({"server": server, "sites": [site]}, env={})


def csrf_of(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, "no csrf_token field in the page"
    return found.group(1)


async def login(client: httpx.AsyncClient, token: str = ADMIN_TOKEN,
                next_path: str = "/admin/live") -> httpx.Response:
    """Log in through the form, as a browser would; returns the POST's answer."""
    page = await client.get("/admin/login")
    assert page.status_code == 200, page.text
    return await client.post("/admin/login", data={"csrf_token": csrf_of(page.text),
                                                   "token": token, "next": next_path})


def assert_no_secret(where: str, text: str) -> None:
    for name, secret in SECRETS.items():
        assert secret not in text, f"{where} contains the {name}"
