"""The Sendlane product sync: every changed product at once, and every product nightly.

Sendlane's custom integration guide ("Historical data sync"): "You must sync product data
nightly, and for all changes. Use the product added call to set up a nightly sync of all
product data and sync product data when making changes." So, from the catalog
(``server/catalog.py``), through the outbox like any delivery:

- **Changes.** Every ``every_s`` (``ONETAG_FORWARD_PRODUCT_SYNC_EVERY_S``, 10 s) the
  forwarder plans one ``product-added`` per product whose backend facts changed since the
  last pass (the catalog's ``fact_ms``/``fact_version``, after a cursor kept in
  ``product_sync``): a product changed twice within a pass goes once, with its latest state.
  A ``product_updated`` whose own Sendlane request already carried the product
  (``vendors/sendlane.py``'s mapping: it had a URL and an image) is not sent again
  (``planned_by_event``); the pass covers the rest (a price-only update of a product whose
  URL and image the backend gave earlier, a backend event other than ``product_updated``).
  Dedup key ``product-added:<item_id>:v<fact_version>``: one delivery a version.
- **Nightly.** Once a day, at the site's ``product_sync_time`` (UTC, default 03:00) or at
  the first pass after it, every product again, a page at a time, under
  ``product-added:<item_id>:v<fact_version>:night:<date>``: a pass repeated the same night
  (two workers, a restart) plans nothing twice.

What goes: products the backend stated, with only the fields the backend stated, and only
those with a URL and an image (Sendlane requires ``product_url`` and ``image_url``); not
deleted ones (Sendlane has no call to remove a product). A page's claims never reach
Sendlane through the sync, since "whenever Sendlane receives updated or new data about a
product, the new data will overwrite the product's existing data" (the guide,
Troubleshooting): a forged page view would rewrite the product in the shop's emails. A
site without a backend integration gets no product sync; its pages' views still reach
Sendlane as product views. ``routes = {product_updated = "off"}`` in the site's Sendlane
section turns the sync off with the mapping.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from . import catalog, outbox
from .vendors import sendlane
from .vendors._base import PlanContext, VendorRequest

VENDOR = sendlane.NAME
DEFAULT_EVERY_S = 10.0  # how often changes are planned: also how long changes are gathered
PAGE = 500  # products a writer job plans at most (a short transaction beside ingest)


def enabled(site: Any) -> bool:
    vendor = site.vendors.get(VENDOR)
    return vendor is not None and syncs(vendor)


def syncs(vendor: Any) -> bool:
    """Whether a vendor section runs the product sync: Sendlane's, unless its
    product_updated route is off."""
    return vendor.name == VENDOR and vendor.route("product_updated") != "off"


def planned_by_event(event: dict[str, Any], planned: Iterable[Any]) -> frozenset[str]:
    """The item_ids whose Sendlane product-added a backend event's own deliveries carry."""
    if event["name"] not in catalog.FACT_EVENTS:
        return frozenset()
    return frozenset(row.request["json"]["product_id"] for row in planned
                     if row.vendor == VENDOR and row.state == outbox.PENDING
                     and row.request["url"].endswith("/product-added"))


def nightly_date(now_ms: int, minute: int) -> str | None:
    """The UTC date whose nightly pass is due at ``now_ms`` (the site's sync time has passed
    today), else None."""
    seconds = now_ms // 1000
    if (seconds % 86_400) // 60 < minute:
        return None
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def item_of(item_id: str, product: catalog.Product) -> dict[str, Any] | None:
    """The backend-stated fields of a product as an item (the keys the mapping reads), or
    None when Sendlane can't take it (deleted, or no URL or image from the backend)."""
    fields = catalog.backend_fields(product)
    if product.deleted or not (fields.get("item_url") and fields.get("image_url")):
        return None
    price_minor, currency = fields.get("price") or (None, None)
    return {"item_id": item_id, "item_name": fields.get("title"), "price_minor": price_minor,
            "currency": currency, "item_url": fields["item_url"],
            "image_url": fields["image_url"], "categories": list(fields.get("categories") or ()),
            "item_brand": fields.get("brand"), "item_sku": fields.get("sku")}


def request_for(site: Any, item: dict[str, Any], key: str) -> VendorRequest:
    context = PlanContext(site_id=site.id, vendor=site.vendors[VENDOR], currency=site.currency,
                          cart_url=site.cart_url)
    return sendlane.product_added(item, context, item["currency"] or site.currency, key)


def change_key(item_id: str, product: catalog.Product) -> str:
    return f"product-added:{item_id}:v{product.fact_version}"


def night_key(item_id: str, product: catalog.Product, night: str) -> str:
    return f"{change_key(item_id, product)}:night:{night}"


async def run_once(settings: Any, store: Any, now_ms: int) -> dict[str, int]:
    """One pass over every site with Sendlane: changes, and the nightly pass when due.
    Returns how many deliveries were planned of each kind."""
    total = {"changes": 0, "nightly": 0}
    for site in settings.sites.values():
        if not enabled(site):
            continue
        night = nightly_date(now_ms, site.product_sync_minute)
        while True:
            done = await store.plan_product_sync(site.id, now_ms, night, PAGE)
            total["changes"] += done["changes"]
            total["nightly"] += done["nightly"]
            if not done["more"]:
                break
    return total
