"""Builders for normalised events (docs/architecture.md, "The normalised event") and vendor
contexts, so each golden test states only what it is about."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from server.vendors._base import PlanContext, VendorConfig

T_MS = 1764000000000  # 2025-11-24T16:00:00Z
T_ISO = "2025-11-24T16:00:00+00:00"
T_UNIX = "1764000000"
SC = "CDA68358-94FB-4D83-9655-3FEB3C4114A3"
GUID = "6F9619FF-8B86-D011-B42D-00CF4FC964FF"
EMAIL = "jimmy@example.com"
PAGE = {"location": "https://shop.example/checkout", "title": "Checkout"}

# What each vendor section of onetag.toml says in these tests; secrets are recognisable so a
# test can prove none leaks into a planned request.
CONFIG: dict[str, dict[str, str]] = {
    "rejoiner": {"site_id": "RJSITE1", "domain": "shop.example", "api_key": "RJ-SECRET-KEY"},
    "remarkety": {"store_id": "RMSTORE", "api_key": "RM-SECRET-KEY"},
    "esputnik": {"site_id": "8A412DC", "api_key": "ES-SECRET-KEY"},
    "sendlane": {"integration_token": "ABCDEFGHIJKLM1234567890", "api_token": "SL-SECRET-TOKEN"},
}
SECRETS = ("RJ-SECRET-KEY", "RM-SECRET-KEY", "ES-SECRET-KEY", "SL-SECRET-TOKEN")


def context(vendor: ModuleType, **values: str) -> PlanContext:
    """The vendor's config as the config loader resolves it: given values, then defaults in
    SETTINGS order with ``{key}`` filled in."""
    resolved = {**CONFIG[vendor.NAME], **values}
    for setting in vendor.SETTINGS:
        if setting.name not in resolved and setting.default is not None:
            resolved[setting.name] = setting.default.format_map(resolved)
    config = VendorConfig(name=vendor.NAME, values=resolved, routes=dict(vendor.DEFAULT_ROUTES))
    return PlanContext(site_id="shop1", vendor=config, currency="USD")


def item(item_id: str = "SKU-1000", price_minor: int | None = 2999, quantity: int = 1,
         **fields: Any) -> dict[str, Any]:
    """A normalised item: optional strings only when given; categories and in_stock always."""
    out = {"item_id": item_id, "price_minor": price_minor, "quantity": quantity,
           "categories": [], "in_stock": None}
    out.update(fields)
    return out


MUG = item("SKU-1000", 2999, 1, item_name="Mug", categories=["Kitchen", "Mugs"],
           item_brand="Acme", item_url="https://shop.example/p/mug",
           image_url="https://shop.example/i/mug.jpg", description="A mug", in_stock=True)
# The money cases: 4.35 -> 435 cents, 0.57 -> 57, 3 x 19.99 -> 5997.
PEN = item("SKU-435", 435, 1, item_name="Pen")
CLIP = item("SKU-057", 57, 1, item_name="Clip")
BOOK = item("SKU-1999", 1999, 3, item_name="Book")


def ecommerce(*items: dict[str, Any], currency: str = "USD", value: int | None = None,
              tax: int | None = None, shipping: int | None = None,
              transaction_id: str | None = None, coupon: str | None = None,
              item_list_id: str | None = None, item_list_name: str | None = None) -> dict[str, Any]:
    return {"currency": currency, "value_minor": value, "tax_minor": tax,
            "shipping_minor": shipping, "transaction_id": transaction_id, "coupon": coupon,
            "item_list_id": item_list_id, "item_list_name": item_list_name, "items": list(items)}


def cart(*items: dict[str, Any], guid: str = GUID, currency: str = "USD") -> dict[str, Any]:
    return {"currency": currency, "items": list(items),
            "value_minor": sum((i["price_minor"] or 0) * i["quantity"] for i in items),
            "item_count": sum(i["quantity"] for i in items), "guid": guid}


def identity(email: str | None = EMAIL, *, is_new: bool = False, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"email": email} if email else {}
    out.update(fields)
    return {**out, "id": 7, "is_new": is_new}


def event(name: str, *, event_id: str = "EVT-1", source: str = "browser", sc: str | None = SC,
          page: dict[str, Any] | None = None, user: dict[str, Any] | None = None,
          ecommerce: dict[str, Any] | None = None, status: str | None = None,
          billing_address: dict[str, Any] | None = None,
          shipping_address: dict[str, Any] | None = None,
          properties: dict[str, Any] | None = None, loaded: tuple[str, ...] = (),
          cart: dict[str, Any] | None = None,
          identity: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id, "name": name, "source": source, "site_id": "shop1",
        "time_ms": T_MS, "received_ms": T_MS + 123, "sc": sc, "page": page, "user": user,
        "ecommerce": ecommerce, "search_term": None, "status": status,
        "billing_address": billing_address, "shipping_address": shipping_address,
        "properties": properties or {}, "loaded": list(loaded), "cart": cart,
        "identity": identity,
    }


def samples() -> dict[str, dict[str, Any]]:
    """One representative, identified event per name of the vocabulary (and a custom one)."""
    who = identity(customer_id="42", first_name="Jimmy", last_name="Kim", phone="8885552664",
                   accepts_marketing=True)
    order = ecommerce(MUG, PEN, value=3434, tax=275, shipping=499, transaction_id="1001",
                      coupon="SALE")
    whole = cart(MUG, PEN)
    samples = {
        "page_view": event("page_view", page=PAGE, identity=who),
        "identify": event("identify", user={"email": EMAIL, "first_name": "Jimmy"}, identity=who),
        "view_item": event("view_item", ecommerce=ecommerce(MUG, value=2999), identity=who),
        "view_item_list": event("view_item_list", identity=who, ecommerce=ecommerce(
            MUG, item_list_id="kitchen", item_list_name="Kitchen")),
        "search": {**event("search", identity=who, ecommerce=ecommerce()),
                   "search_term": "mug"},
        "add_to_cart": event("add_to_cart", ecommerce=ecommerce(PEN), cart=whole, identity=who),
        "remove_from_cart": event("remove_from_cart", ecommerce=ecommerce(CLIP), cart=whole,
                                  identity=who),
        "view_cart": event("view_cart", ecommerce=ecommerce(MUG, PEN), cart=whole, identity=who),
        "cart_updated": event("cart_updated", ecommerce=ecommerce(MUG, PEN), cart=whole,
                              identity=who),
        "begin_checkout": event("begin_checkout", ecommerce=ecommerce(MUG, PEN), cart=whole,
                                page=PAGE, identity=who),
        "purchase": event("purchase", ecommerce=order, cart=whole, identity=who),
        "refund": event("refund", ecommerce=ecommerce(transaction_id="1001"), identity=who),
        "order_status": event("order_status", source="backend", sc=None, status="cancelled",
                              user={"email": EMAIL},
                              ecommerce=ecommerce(transaction_id="1001"), identity=who),
        "add_to_wishlist": event("add_to_wishlist", ecommerce=ecommerce(MUG), identity=who),
        "product_updated": event("product_updated", source="backend", sc=None,
                                 ecommerce=ecommerce(MUG)),
        "unsubscribe": event("unsubscribe", user={"email": EMAIL}, identity=who),
        "opt_in": event("opt_in", user={"email": EMAIL}, identity=who,
                        properties={"type": "accepts marketing checkbox"}),
        "*": event("newsletter_popup_shown", identity=who,
                   properties={"popup": "spring", "variant": 2}),
    }
    # Each its own fact: its own event id, and each cart change its own cart state.
    for name, sample in samples.items():
        sample["event_id"] = f"EVT-{name}"
        if sample["cart"] and name != "purchase":
            sample["cart"] = {**sample["cart"], "guid": f"GUID-{name}"}
    return samples
