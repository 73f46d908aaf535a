"""What holds for every vendor module: the same exported shape, routing defaults that never
count one purchase twice, no secret in a planned request, stable dedup keys, pure planning."""

from __future__ import annotations

import copy
import json

import pytest

import server.vendors as vendors
from server.vendors import esputnik, rejoiner, remarkety, sendlane
from server.vendors._base import ROUTING_MODES, Setting, VendorRequest

from ._events import SECRETS, context, ecommerce, event, identity, samples

MODULES = [rejoiner, remarkety, esputnik, sendlane]
VOCABULARY = {"page_view", "view_item", "view_item_list", "search", "add_to_cart",
              "remove_from_cart", "view_cart", "cart_updated", "begin_checkout", "purchase",
              "refund", "add_to_wishlist", "identify", "order_status", "product_updated",
              "unsubscribe", "opt_in", "*"}
EXPORTS = ("NAME", "SETTINGS", "DEFAULT_ROUTES", "plan", "auth_headers")


def test_registry_order_and_lookup():
    assert list(vendors.VENDORS) == ["rejoiner", "remarkety", "esputnik", "sendlane"]
    assert list(vendors.VENDORS.values()) == MODULES
    assert vendors.get("esputnik") is esputnik
    with pytest.raises(KeyError, match="known: rejoiner, remarkety, esputnik, sendlane"):
        vendors.get("klaviyo")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_every_module_exports_the_same_shape(module):
    for name in EXPORTS:
        assert hasattr(module, name), name
    assert isinstance(module.NAME, str)
    assert callable(module.plan) and callable(module.auth_headers)
    assert all(isinstance(s, Setting) for s in module.SETTINGS)
    names = [s.name for s in module.SETTINGS]
    assert len(names) == len(set(names))
    for setting in module.SETTINGS:
        assert not (setting.secret and setting.public), setting.name
        assert setting.help, setting.name
        if setting.default:  # a default may only name keys defined before it
            earlier = {s.name: "x" for s in module.SETTINGS[:names.index(setting.name)]}
            setting.default.format_map(earlier)
    # The runtime adds every adapter's library from settings.script_url: always in the script.
    assert "script_url" in names
    script_url = next(s for s in module.SETTINGS if s.name == "script_url")
    assert script_url.public and script_url.browser and script_url.default


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_routes_cover_the_whole_vocabulary_with_valid_modes(module):
    assert set(module.DEFAULT_ROUTES) == VOCABULARY
    assert set(module.DEFAULT_ROUTES.values()) <= set(ROUTING_MODES)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_no_vendor_counts_a_purchase_twice(module):
    # "both" would send the page's conversion and the server's: a purchase is one side's,
    # or the server's only when the page's library failed.
    assert module.DEFAULT_ROUTES["purchase"] in ("server", "fallback")


def test_contract_defaults():
    routes = {m.NAME: m.DEFAULT_ROUTES for m in MODULES}
    assert routes["remarkety"]["purchase"] == "server"
    assert routes["sendlane"]["purchase"] == "server"
    assert routes["rejoiner"]["purchase"] == "fallback"
    assert routes["esputnik"]["purchase"] == "fallback"
    assert routes["esputnik"]["view_item"] == "fallback"
    assert routes["rejoiner"]["identify"] == "both"
    for module in MODULES:  # backend-only facts never have a browser side
        for name in ("order_status", "refund", "product_updated", "unsubscribe", "opt_in"):
            assert module.DEFAULT_ROUTES[name] in ("server", "off"), (module.NAME, name)


def test_default_urls_are_the_vendors_real_ones():
    assert context(rejoiner).vendor["script_url"] == "https://cdn.rejoiner.com/js/v4/rj2.lib.js"
    assert context(rejoiner).vendor["api_base"] == "https://rj2.rejoiner.com/api/v1"
    assert context(remarkety).vendor["script_url"] == \
        "https://d3ryumxhbd2uw7.cloudfront.net/webtracking/track.js"
    assert context(sendlane).vendor["script_url"] == "https://sendlane.com/scripts/pusher.js"
    assert context(sendlane).vendor["api_base"] == "https://api.sendlane.com/v2"
    assert context(esputnik).vendor["tracker_url"] == "https://tracker.esputnik.com/api/v2"


def _planned() -> list[tuple[str, str, VendorRequest]]:
    out = []
    for module in MODULES:
        ctx = context(module)
        for name, evt in samples().items():
            out += [(module.NAME, name, req) for req in module.plan(evt, ctx)]
    return out


def test_every_vendor_plans_something_for_its_server_routes():
    for module in MODULES:
        ctx = context(module)
        for name, evt in samples().items():
            planned = module.plan(evt, ctx)
            if module.DEFAULT_ROUTES[name] == "off":
                assert planned == [], (module.NAME, name)
    planned = {(vendor, name) for vendor, name, _ in _planned()}
    for module in MODULES:  # every "server" route has something to send
        for name, mode in module.DEFAULT_ROUTES.items():
            if mode == "server":
                assert (module.NAME, name) in planned, (module.NAME, name)


def test_no_secret_in_any_planned_request():
    planned = _planned()
    assert len(planned) > 30
    for vendor, name, req in planned:
        text = json.dumps({"url": req.url, "row": req.to_row(), "key": req.dedup_key})
        for secret in SECRETS:
            assert secret not in text, (vendor, name)
        assert not any(h.lower() in ("authorization", "x-token", "x-api-key")
                       for h in req.headers), (vendor, name)


def test_requests_are_plain_json():
    for vendor, name, req in _planned():
        assert req.method in ("POST", "PUT"), (vendor, name)
        assert req.url.startswith("https://"), (vendor, name)
        json.dumps(req.json, allow_nan=False)  # no Decimal, no NaN
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in req.headers.items())


def test_dedup_keys_are_stable_and_distinct():
    for module in MODULES:
        ctx = context(module)
        for name, evt in samples().items():
            first = module.plan(copy.deepcopy(evt), ctx)
            second = module.plan(copy.deepcopy(evt), ctx)
            assert first == second, (module.NAME, name)  # keys, bodies, everything
            keys = [r.dedup_key for r in first]
            assert len(keys) == len(set(keys)), (module.NAME, name)
    keys = [(vendor, req.dedup_key) for vendor, _, req in _planned()]
    assert len(keys) == len(set(keys))  # no two facts of one vendor share a key


def test_a_status_change_never_reuses_the_order_key():
    purchase = samples()["purchase"]
    for module in MODULES:
        ctx = context(module)
        placed = {r.dedup_key for r in module.plan(purchase, ctx)}
        seen = set()
        for status in ("cancelled", "refunded", "failed", "fulfilled"):
            evt = event("order_status", source="backend", sc=None, status=status,
                        user={"email": "jimmy@example.com"},
                        ecommerce=ecommerce(transaction_id="1001"), identity=identity())
            for req in module.plan(evt, ctx):
                assert req.dedup_key not in placed, (module.NAME, status)
                assert status in req.dedup_key
                assert req.dedup_key not in seen
                seen.add(req.dedup_key)


def test_held_requests_keep_their_key_once_the_email_is_known():
    """The outbox holds a needs_email request and re-plans it after identification: the fact
    (an order, a cart state, an event) must keep its key so it is still sent once."""
    for module in MODULES:
        ctx = context(module)
        for name, evt in samples().items():
            if name in ("identify", "unsubscribe", "opt_in", "order_status"):
                continue  # these carry their own email
            anonymous = {**copy.deepcopy(evt), "identity": None, "user": None}
            held = module.plan(anonymous, ctx)
            known = module.plan(evt, ctx)
            assert [r.dedup_key for r in held] == [r.dedup_key for r in known], (module.NAME, name)
            assert [r.needs_email for r in held] == [r.needs_email for r in known]


def test_plan_does_not_touch_the_event():
    for module in MODULES:
        ctx = context(module)
        for name, evt in samples().items():
            before = copy.deepcopy(evt)
            module.plan(evt, ctx)
            assert evt == before, (module.NAME, name)
