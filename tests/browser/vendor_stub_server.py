"""Stand-ins for the four vendor libraries, test pages, and the onetag config the vendor
tests run against (on conftest.py's ``static_server`` and ``onetag_server``).

Every vendor's ``script_url`` points at the static server, which serves per vendor:

- ``/vendors/ok/<vendor>.js``     a library that only records it ran (``window.__stub_<vendor>
  = 1``); it never consumes the vendor's queue (``_rejoiner``, ``_rmData``, ``eS.q``,
  ``_Sendlane``), so a test reads back every call onetag made;
- ``/vendors/throw/<vendor>.js``  a library that makes the vendor's global throw on every call
  once loaded (``push`` throws; for eSputnik ``eS`` itself throws);
- ``/vendors/blocked/<vendor>.js`` nothing: 404, as an ad blocker would answer.

Sites (one onetag server for every vendor test module): ``all`` (every library loads),
``blocked`` (every library 404s), ``throwing`` (Rejoiner's and eSputnik's throw), ``routed``
(routes overridden), ``shop`` (every library loads; currency EUR and a ``cart_url``: the site
settings the adapters fall back to). Every secret in the config is a unique marker
(``secret()``).

Test pages: an empty page with ``window.dataLayer``, the helpers below, then
``<script async src=".../s/<site>.js">``; ``pre`` adds pushes made before the script loads.
In the page, ``__t(event)`` pushes one event and returns (as JSON text, so Python parses prices
as Decimal) every vendor call it caused, per vendor; ``__d(fn)`` does the same for any function
(``history.pushState`` ...); ``__q()`` is every call so far. Once the runtime has started it
handles a push synchronously, so "the calls this push caused" is exact: no timing involved.
"""

from __future__ import annotations

import json
import time
import urllib.request
from decimal import Decimal
from typing import Any

import pytest

VENDORS = ("rejoiner", "remarkety", "esputnik", "sendlane")
QUEUE = {"rejoiner": "_rejoiner", "remarkety": "_rmData", "esputnik": "eS", "sendlane": "_Sendlane"}


# Installed in every test page before the onetag script.
PAGE_JS = """
window.__q=function(){
  function a(x){return Array.isArray(x)?x:[]}
  // eSputnik's loader: eS(...) calls f.c(arguments) and f.c pushes ITS arguments, so each
  // eS.q entry is an arguments object whose [0] is the call's own arguments object.
  var es=window.eS&&window.eS.q?Array.prototype.map.call(window.eS.q,function(x){return Array.prototype.slice.call(x[0])}):[];
  return {rejoiner:a(window._rejoiner),remarkety:a(window._rmData),esputnik:es,sendlane:a(window._Sendlane)};
};
window.__d=function(f){
  var b=window.__q(),n={},k,l={};for(k in b)l[k]=b[k].length;
  f();var q=window.__q();for(k in q)n[k]=q[k].slice(l[k]);
  return JSON.stringify(n);
};
window.__t=function(e){return window.__d(function(){window.dataLayer.push(e)})};
window.__ready=function(){return !!(window.onetag&&window.dataLayer.push!==Array.prototype.push)};
"""


def stub_library(vendor: str, kind: str) -> str:
    if kind == "ok":
        return f"window.__stub_{vendor}=1;"
    if vendor == "esputnik":
        return ("window.eS=function(){throw new Error('stub eS throws')};"
                f"window.__stub_{vendor}=1;")
    return (f"window.{QUEUE[vendor]}={{push:function(){{throw new Error('stub {vendor} throws')}}}};"
            f"window.__stub_{vendor}=1;")


def page_html(onetag_url: str, site: str, pre: list[Any] | None = None) -> str:
    pushes = "".join(f"window.dataLayer.push({json.dumps(p)});" for p in pre or [])
    return ("<!doctype html><html><head><meta charset='utf-8'><title>vendor test</title>"
            f"<script>window.dataLayer=window.dataLayer||[];{pushes}</script>"
            f"<script>{PAGE_JS}</script>"
            f"<script async src='{onetag_url}/s/{site}.js'></script>"
            "</head><body><form><input id='email' name='email' type='email'></form></body></html>")


# --- the onetag config the vendor tests run against -------------------------------------------

PUBLIC = {
    "rejoiner": {"site_id": "RJ2SITE", "domain": "127.0.0.1"},
    "remarkety": {"store_id": "rm-store-1"},
    "esputnik": {"site_id": "8A412DC", "script_id": "ES-SCRIPT-1"},
    "sendlane": {"integration_token": "SL-INTEGRATION-TOKEN"},
}
SECRET_KEYS = {"rejoiner": "api_key", "remarkety": "api_key", "esputnik": "api_key",
               "sendlane": "api_token"}

# site id -> (library per vendor: "ok" | "throw" | "blocked", routes overrides per vendor)
SITES: dict[str, tuple[dict[str, str], dict[str, dict[str, str]]]] = {
    "all": ({v: "ok" for v in VENDORS}, {}),
    "blocked": ({v: "blocked" for v in VENDORS}, {}),
    "throwing": ({"rejoiner": "throw", "remarkety": "ok", "esputnik": "throw", "sendlane": "ok"}, {}),
    "routed": ({v: "ok" for v in VENDORS}, {
        "rejoiner": {"purchase": "server", "identify": "server"},
        "remarkety": {"*": "off", "view_item": "server", "quiz_special": "browser"},
        "esputnik": {"search": "off", "page_view": "off"},
        "sendlane": {"view_item": "off"},
    }),
    "shop": ({v: "ok" for v in VENDORS}, {}),
}
# Site settings other than the defaults (currency "USD", no cart_url).
SHOP_CART_URL = "https://shop.example/cart?restore={cart_guid}&s={sc}"
SITE_SETTINGS: dict[str, dict[str, str]] = {"shop": {"currency": "EUR", "cart_url": SHOP_CART_URL}}


def secret(site: str, vendor: str | None = None) -> str:
    """The secret a site (or one of its vendors) is configured with: unique, easy to grep."""
    return f"SECRET-{site}-{vendor or 'site'}-7f3a9c"


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def config_toml() -> str:
    """For conftest's onetag_server: {database}, {public_url}, {origin} are filled in there."""
    lines = ["[server]", 'database = "{database}"', 'public_url = "{public_url}"',
             "forward = false", f"admin_token = {_toml(secret('server', 'admin'))}", ""]
    for site, (kinds, routes) in SITES.items():
        lines += ["[[sites]]", f"id = {_toml(site)}", 'origins = ["{origin}"]',
                  f"api_key = {_toml(secret(site))}"]
        lines += [f"{key} = {_toml(value)}"
                  for key, value in {"currency": "USD", **SITE_SETTINGS.get(site, {})}.items()]
        lines.append("")
        for vendor in VENDORS:
            lines.append(f"[sites.{vendor}]")
            for key, value in PUBLIC[vendor].items():
                lines.append(f"{key} = {_toml(value)}")
            lines.append(f"{SECRET_KEYS[vendor]} = {_toml(secret(site, vendor))}")
            lines.append(f'script_url = "{{origin}}/vendors/{kinds[vendor]}/{vendor}.js"')
            if routes.get(vendor):
                lines.append(f"routes = {_toml(routes[vendor])}")
            lines.append("")
    return "\n".join(lines)


def all_secrets() -> list[str]:
    out = [secret("server", "admin")]
    for site in SITES:
        out.append(secret(site))
        out += [secret(site, v) for v in VENDORS]
    return out


# --- page helpers ------------------------------------------------------------------------------

def parse(text: str) -> Any:
    """JSON with prices as Decimal: 59.97 must be exactly 59.97 on the wire, not 59.970000001."""
    return json.loads(text, parse_float=Decimal)


def open_page(context: Any, url: str) -> Any:
    """A new page at ``url``, returned once the runtime has started (dataLayer.push hooked).

    Every POST to the event endpoint is recorded on ``page.beacons`` (request body, status)."""
    page = context.new_page()
    page.beacons = []

    def on_response(response: Any) -> None:
        req = response.request
        if req.method == "POST" and req.url.endswith("/e"):
            page.beacons.append((parse(req.post_data or "{}"), response.status))

    page.on("response", on_response)
    page.goto(url)
    page.wait_for_function("() => window.__ready && window.__ready()")
    return page


def push(page: Any, event: dict[str, Any]) -> dict[str, list[Any]]:
    """Push one event; the vendor calls it caused, per vendor."""
    return parse(page.evaluate("e => window.__t(e)", event))


def during(page: Any, script: str) -> dict[str, list[Any]]:
    """Run JS (a function body); the vendor calls it caused, per vendor."""
    return parse(page.evaluate(f"() => window.__d(function(){{ {script} }})"))


def queues(page: Any) -> dict[str, list[Any]]:
    return parse(page.evaluate("() => JSON.stringify(window.__q())"))


def sent_event(page: Any, event_id: str) -> tuple[dict[str, Any], int]:
    """Wait (on the condition, not a clock) until onetag's endpoint answered for ``event_id``;
    the event as sent and the answer's status."""
    page.evaluate("() => window.onetag.flush()")
    deadline = time.monotonic() + 60
    while True:
        for body, status in page.beacons:
            for event in body.get("events", []):
                if event.get("event_id") == event_id and 200 <= status < 300:
                    return event, status
        if time.monotonic() > deadline:
            raise AssertionError(f"event {event_id} never reached onetag: {page.beacons}")
        page.wait_for_timeout(50)



class VendorEnv:
    """The static server with the stubs, and the onetag server with the four sites."""

    def __init__(self, static: Any, onetag: Any):
        self.static, self.onetag = static, onetag
        for vendor in VENDORS:
            for kind in ("ok", "throw"):
                static.add(stub_library(vendor, kind), "application/javascript",
                           f"/vendors/{kind}/{vendor}.js")

    def page(self, site: str, pre: list[Any] | None = None) -> str:
        """URL of a test page for ``site`` (a new one when ``pre`` pushes are given)."""
        html = page_html(self.onetag.url, site, pre)
        return self.static.add(html, path=None if pre else f"/vendors/page/{site}.html")

    def script(self, site: str, debug: bool = False) -> str:
        url = self.onetag.script_url(site) + ("?onetag_debug=1" if debug else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read().decode()


_ENV: list[VendorEnv] = []


@pytest.fixture
def vendors(static_server: Any, onetag_server: Any) -> VendorEnv:
    """One onetag server for every vendor test module (started on first use)."""
    if not _ENV:
        _ENV.append(VendorEnv(static_server, onetag_server(config_toml())))
    return _ENV[0]


# --- the server's copy of the same event --------------------------------------------------------

def server_bodies(vendors: VendorEnv, site: str, vendor: str, event_id: str) -> list[dict[str, Any]]:
    """What the server adapter (server/vendors/<vendor>.py plan()) makes of the event the page
    sent: the event as onetag stored it (normalised, with the session's cart and identity),
    planned with the site's real config. Prices parse as Decimal, as ``push`` gives them."""
    import importlib

    from server.config import load
    from server.vendors._base import PlanContext

    rows = vendors.onetag.wait_events(
        lambda rows: any(r["data"]["event_id"] == event_id for r in rows),
        f"event {event_id} stored", site_id=site)
    event = next(r["data"] for r in rows if r["data"]["event_id"] == event_id)
    site_config = load(vendors.onetag.config_path).sites[site]
    module = importlib.import_module(f"server.vendors.{vendor}")
    ctx = PlanContext(site_id=site, vendor=site_config.vendors[vendor], currency=site_config.currency,
                      cart_url=site_config.cart_url)
    return [parse(json.dumps(request.json)) for request in module.plan(event, ctx)]


def page_with_site_settings(env: VendorEnv, site: str, **overrides: Any) -> str:
    """A test page whose script is ``site``'s, rendered by server/script.py with site settings
    changed (e.g. ``cart_url``, a setting this branch's config may not know yet), served from
    the static server; its events still go to the onetag server's endpoint."""
    import dataclasses
    from types import SimpleNamespace

    from server.config import load
    from server.script import environment, render

    settings = load(env.onetag.config_path)
    real = settings.sites[site]
    fake = SimpleNamespace(**{**{f.name: getattr(real, f.name) for f in dataclasses.fields(real)}, **overrides})
    script = render(environment(), settings, fake).body
    script_url = env.static.add(script, "application/javascript")
    html = page_html(env.onetag.url, site).replace(f"{env.onetag.url}/s/{site}.js", script_url)
    return env.static.add(html)
