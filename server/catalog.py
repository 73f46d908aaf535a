"""The product catalog's rules: what an event says about a product, and how it merges.

Pure, no I/O: the store (``store/sqlite_ingest.py``, ``CatalogWriter``) applies them inside
the ingest transaction, the feeds (``server/feeds.py``) and the Sendlane product sync
(``server/product_sync.py``) read the rows they made.

Claims and facts (docs/security.md): what a page shows (``view_item``, ``view_item_list``,
the items of cart events) is a claim; a backend ``product_updated`` is a fact. A claim may
set any field the backend has not stated (filling gaps, and correcting an earlier claim:
a browser-only shop's prices change too), never one it has; only the backend deletes a
product or brings it back. So a forged page view can't change a backend product.
"""

from __future__ import annotations

from typing import Any, Iterable

from . import events, trust

# Events whose items describe products. Not purchase/refund: an order's line prices are
# what was paid then (coupons, old prices), not the catalog's.
CLAIM_EVENTS = frozenset({"view_item", "view_item_list", "add_to_cart", "remove_from_cart",
                          "view_cart", "begin_checkout", "cart_updated", "add_to_wishlist"})
FACT_EVENTS = frozenset({"product_updated"})
EVENTS = CLAIM_EVENTS | FACT_EVENTS

# The catalog's fields (columns of ``products``) and the normalised item key each comes
# from. ``price`` is one field of two columns: an amount means nothing without its currency.
ITEM_KEYS = {"title": "item_name", "item_url": "item_url", "image_url": "image_url",
             "brand": "item_brand", "variant": "item_variant",
             "item_group_id": "item_group_id", "sku": "item_sku", "description": "description",
             "google_product_category": "google_product_category"}
FIELDS = ("title", "item_url", "image_url", "price", "availability", "categories",
          *[name for name in ITEM_KEYS if name not in ("title", "item_url", "image_url")])
COLUMNS = ("title", "item_url", "image_url", "price_minor", "currency", "availability",
           "categories", "brand", "variant", "item_group_id", "sku", "description",
           "google_product_category")
# Google Merchant Center's availability values (Product data specification, Availability).
AVAILABILITY = events.AVAILABILITY
BACKEND, BROWSER = "backend", "browser"
# A product's last_seen_ms is written again only after this long: a page view of a known,
# unchanged product then writes nothing (bench/ingest.py's add_to_cart stays as cheap).
LAST_SEEN_STEP_MS = 3_600_000


_ITEM_KEYS = tuple((key, name) for name, key in ITEM_KEYS.items())


def stated(item: dict[str, Any], currency: str) -> dict[str, Any]:
    """The catalog fields one normalised item states (absent and empty ones left out).
    On the ingest hot path: one pass over the item's own keys."""
    fields: dict[str, Any] = {}
    for key, name in _ITEM_KEYS:
        if key in item:
            value = item[key]
            if value:
                fields[name] = value
    price = item.get("price_minor")
    if price is not None:
        fields["price"] = (price, currency)
    availability = item.get("availability")
    if availability is None:
        in_stock = item.get("in_stock")
        if in_stock is not None:
            availability = "in_stock" if in_stock else "out_of_stock"
    if availability is not None:
        fields["availability"] = availability
    categories = item.get("categories")
    if categories:
        fields["categories"] = tuple(categories)
    return fields


def observations(event: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any], bool, bool | None]]:
    """(item_id, fields stated, is a fact, deleted) for each item of a catalog event.
    ``deleted`` is None unless the backend said true or false. A claim's items are the
    page's; a fact's, the backend's (``product_updated``, or any catalog event it sends)."""
    name = event["name"]
    if name not in EVENTS:
        return
    ecommerce = event.get("ecommerce") or {}
    currency = ecommerce.get("currency")
    fact = event["source"] == trust.BACKEND
    for item in ecommerce.get("items") or ():
        deleted = item.get("deleted") if fact and name in FACT_EVENTS else None
        yield item["item_id"], stated(item, currency), fact, deleted


class Product:
    """A product row as the writer last read or wrote it. ``fields`` maps each field of
    ``FIELDS`` that is set to its value (``price``: (minor units, currency); ``categories``:
    a tuple); ``sources`` maps it to ``backend`` or ``browser``."""

    __slots__ = ("fields", "sources", "deleted", "first_seen_ms", "last_seen_ms", "changed_ms",
                 "version", "fact_version", "fact_ms", "planned_version", "stored")

    def __init__(self, fields: dict[str, Any], sources: dict[str, str], deleted: bool,
                 first_seen_ms: int, last_seen_ms: int, changed_ms: int, version: int,
                 fact_version: int = 0, fact_ms: int | None = None, planned_version: int = 0,
                 stored: bool = True):
        self.fields = fields
        self.sources = sources
        self.deleted = deleted
        self.first_seen_ms = first_seen_ms
        self.last_seen_ms = last_seen_ms
        self.changed_ms = changed_ms
        self.version = version
        self.fact_version = fact_version
        self.fact_ms = fact_ms
        # The fact_version whose Sendlane product-added its own event planned already
        # (server/product_sync.py): the sync's change pass does not send it again.
        self.planned_version = planned_version
        self.stored = stored  # the row exists in the database

    @property
    def source(self) -> str:
        return BACKEND if BACKEND in self.sources.values() or self.fact_version else BROWSER


def merge(product: Product | None, fields: dict[str, Any], fact: bool, deleted: bool | None,
          now: int, planned: bool = False) -> tuple[Product, bool]:
    """The product after one observation, and whether it must be written.

    A fact sets every field it states and says whether the product is deleted; a claim sets
    only the fields no fact has set. Written when a field (or ``deleted``) changed, or when
    ``last_seen_ms`` is older than ``LAST_SEEN_STEP_MS``.
    """
    if product is None:
        product = Product({}, {}, False, now, now, now, 0, stored=False)
    changed = fact_changed = False
    for name, value in fields.items():
        source = product.sources.get(name)
        if not fact and source == BACKEND:
            continue  # a claim never replaces a fact
        if product.fields.get(name) != value:
            product.fields[name] = value
            changed = True
            fact_changed = fact_changed or fact
        if fact and source != BACKEND:
            product.sources[name] = BACKEND
            fact_changed = True  # now stated by the backend: the sync sends it
        elif not fact and source is None:
            product.sources[name] = BROWSER
    if deleted is not None and bool(deleted) != product.deleted:
        product.deleted = bool(deleted)
        changed = fact_changed = True
    if fact and not product.fact_version:
        fact_changed = True  # the backend's first word about it
    if changed or not product.stored:
        product.version += 1
        product.changed_ms = now
    if fact_changed:
        product.fact_version += 1
        product.fact_ms = now
    if planned and fact and product.planned_version != product.fact_version:
        product.planned_version = product.fact_version  # its event sent this version
        fact_changed = True
    write = (changed or fact_changed or not product.stored
             or now - product.last_seen_ms >= LAST_SEEN_STEP_MS)
    if write:  # last_seen_ms is what the row says: moved only when the row is written
        product.last_seen_ms = max(product.last_seen_ms, now)
    return product, write


def priceless(event: dict[str, Any]) -> list[str]:
    """The item_ids of an event's lines (its items, and the cart the store added) that came
    without a price, in order, once each."""
    lines = [*((event.get("ecommerce") or {}).get("items") or ()),
             *((event.get("cart") or {}).get("items") or ())]
    return list(dict.fromkeys(line["item_id"] for line in lines
                              if line.get("price_minor") is None))


def add_prices(event: dict[str, Any], prices: dict[str, tuple[int, str]]) -> None:
    """Gives each line of ``event`` without a price the catalog's, from ``prices`` (item_id
    -> (minor units, currency)), as ``catalog_price_minor`` and ``catalog_currency``: apart
    from ``price_minor``, which stays what the page or backend said (none), so an adapter
    takes it only where its vendor requires a price (``_common.item_price_minor``, in the
    event's currency). The lines are replaced by copies: a cart line is also the session's
    stored cart, which keeps no catalog price."""
    if not prices:
        return
    for holder in (event.get("ecommerce"), event.get("cart")):
        if holder and holder.get("items"):
            holder["items"] = [_priced(line, prices) for line in holder["items"]]


def _priced(line: dict[str, Any], prices: dict[str, tuple[int, str]]) -> dict[str, Any]:
    price = prices.get(line["item_id"]) if line.get("price_minor") is None else None
    if price is None:
        return line
    return {**line, "catalog_price_minor": price[0], "catalog_currency": price[1]}


def backend_fields(product: Product) -> dict[str, Any]:
    """The fields the backend stated: what the Sendlane sync sends (server/product_sync.py)."""
    return {name: value for name, value in product.fields.items()
            if product.sources.get(name) == BACKEND}


def feed_problem(row: dict[str, Any]) -> str | None:
    """Why a stored product is left out of the feeds, or None. The first reason counts:
    deleted; no item_url (the feed's link) or image_url (image_link), which Google Merchant
    Center requires and the vendors' emails show; no title or price, which Remarkety's
    "Google Product Feed API" marks mandatory. A link that is not http(s) (a
    ``javascript:`` one stored before events refused them) is no link: the rule is
    events' (``events.is_http_url``), a host and no control character included."""
    if row["deleted"]:
        return "deleted"
    if not events.is_http_url(row["item_url"]):
        return "no item_url"
    if not events.is_http_url(row["image_url"]):
        return "no image_url"
    if not row["title"]:
        return "no title"
    if row["price_minor"] is None or not row["currency"]:
        return "no price"
    return None


FEED_PROBLEMS = ("deleted", "no item_url", "no image_url", "no title", "no price")
