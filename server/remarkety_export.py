"""``onetag export remarkety-orders``: the orders history as the CSV file Remarkety imports.

Remarkety takes a store's order history once, "using a CSV file import" through its support
(Integrating custom platforms with Remarkety, Orders: "If you want to provide a one-time
orders history import ..."). The file follows Remarkety's "Importing Orders into Remarkety
using SFTP": UTF-8, a header row with the column names exactly as listed, one row per order item with
the order's details repeated, datetimes in ISO 8601 with their zone, the file named
``orders_<YYYYMMDD_HHMMSS>.csv``.

The columns up to ``order_discount`` are that article's own (``COLUMNS_DOCUMENTED``); the
rest of its list could not be retrieved, so the others are derived from Remarkety's orders
webhook fields in the same naming style (UNCONFIRMED: ``COLUMNS_DERIVED``; support maps
columns for a one-time import).

The orders are the backend's facts in the database — the live backend API's and the
backfilled ones — never a browser's claim: a purchase gives the order, its lines and
customer; its later ``order_status``/``refund`` events its status and modification time (a
partial refund only its financial status, ``partially_refunded``, as orders/update says it,
repeating the latest status: server/vendors/remarkety.py, ``_latest_status``).
"""

from __future__ import annotations

import csv
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from . import money
from .jsontext import loads
from .vendors import _common as common

COLUMNS_DOCUMENTED = ("order_id", "order_created_at", "order_status", "order_financial_status",
                      "order_modified_at", "order_currency", "order_subtotal", "order_shipping",
                      "order_discount")
COLUMNS_DERIVED = ("order_tax", "order_total", "order_discount_code", "customer_id",
                   "customer_email", "customer_first_name", "customer_last_name",
                   "customer_accepts_marketing", "product_id", "product_sku", "product_name",
                   "product_variant", "product_quantity", "product_price", "product_url",
                   "product_image")
COLUMNS = COLUMNS_DOCUMENTED + COLUMNS_DERIVED


@dataclass
class Order:
    purchase: dict[str, Any] | None = None
    created_ms: int = 0
    status: str | None = None
    status_ms: int = -1  # the time of the event that set ``status``
    modified_ms: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)
    partly_refunded: bool = False  # a partial refund came (its status is not the order's)


def orders(conn: sqlite3.Connection, site_id: str) -> tuple[list[Order], int]:
    """The site's orders from its backend events, oldest first, and how many orders had
    status changes but no purchase (left out: nothing says what was bought)."""
    rows = conn.execute(ORDER_EVENTS_SQL.replace("$1", "?"), (site_id,))
    return orders_from(data for (data,) in rows)


# The site's backend order events, in order (either database: $1 is the site).
ORDER_EVENTS_SQL = ("SELECT data FROM events WHERE site_id = $1 AND source = 'backend' AND "
                    "name IN ('purchase', 'order_status', 'refund') ORDER BY seq")


def orders_from(datas: Iterable[str]) -> tuple[list[Order], int]:
    """``orders`` from the events' stored JSON, in arrival order."""
    found: dict[str, Order] = {}
    for data in datas:
        event = loads(data)
        order_id = (event.get("ecommerce") or {}).get("transaction_id")
        if not order_id:
            continue
        order = found.setdefault(order_id, Order())
        when = event.get("time_ms") or 0
        if event["name"] == "purchase":
            if order.purchase is None or when < order.created_ms:
                order.purchase, order.created_ms = event, when
            status = event.get("status") or common.DEFAULT_ORDER_STATUS
        elif common.refund_is_partial(event, *_value(order.purchase)):
            # Part of the order refunded: the order's status stays (as orders/update says
            # it, the latest status again: server/vendors/remarkety.py, ``_refund_state``).
            order.partly_refunded, status = True, None
        else:
            status = common.order_status(event)
        if status and when >= order.status_ms:
            order.status, order.status_ms = status, when
        order.modified_ms = max(order.modified_ms, when)
    complete = [order for order in found.values() if order.purchase is not None]
    complete.sort(key=lambda order: order.created_ms)
    return complete, len(found) - len(complete)


def _value(purchase: dict[str, Any] | None) -> tuple[int | None, str | None]:
    """A purchase's value (GA4's; the lines' sum when it gave none) and currency."""
    if purchase is None:
        return None, None
    ecom = purchase.get("ecommerce") or {}
    return (common.totals(ecom, ecom.get("items") or []).total
            - (ecom.get("tax_minor") or 0) - (ecom.get("shipping_minor") or 0),
            ecom.get("currency"))


def rows(order: Order) -> Iterator[dict[str, Any]]:
    """One row per order item (an order without items: one row without product columns)."""
    event = order.purchase or {}
    ecom = event.get("ecommerce") or {}
    cur = ecom.get("currency") or "USD"
    items = ecom.get("items") or []
    t = common.totals(ecom, items)
    who = common.person(event)

    def amount(minor: int | None) -> str:
        return "" if minor is None else money.major_str(minor, cur)

    status = order.status or common.DEFAULT_ORDER_STATUS
    base = {
        "order_id": ecom.get("transaction_id"),
        "order_created_at": common.iso_time(order.created_ms),
        "order_status": status,
        "order_financial_status": ("refunded" if status == "refunded" else
                                   "partially_refunded" if order.partly_refunded else ""),
        "order_modified_at": common.iso_time(order.modified_ms),
        "order_currency": cur,
        "order_subtotal": amount(t.subtotal),
        "order_shipping": amount(t.shipping),
        "order_discount": amount(t.discount),
        "order_tax": amount(t.tax),
        "order_total": amount(t.total),
        "order_discount_code": ecom.get("coupon") or "",
        "customer_id": who.get("customer_id") or "",
        "customer_email": who.get("email") or "",
        "customer_first_name": who.get("first_name") or "",
        "customer_last_name": who.get("last_name") or "",
        "customer_accepts_marketing": {True: "1", False: "0"}.get(who.get("accepts_marketing"), ""),
    }
    if not items:
        yield base
    for item in items:
        price = item.get("price_minor")
        yield {**base, "product_id": item["item_id"], "product_sku": common.sku(item),
               "product_name": item.get("item_name") or "",
               "product_variant": item.get("item_variant") or "",
               "product_quantity": item["quantity"], "product_price": amount(price),
               "product_url": item.get("item_url") or "",
               "product_image": item.get("image_url") or ""}


def export(database: str, site_id: str, out: TextIO) -> tuple[int, int, int]:
    """Write the CSV to ``out`` from a read-only connection; returns (orders, rows, orders
    left out for having no purchase)."""
    if database == ":memory:" or not Path(database).is_file():
        raise FileNotFoundError(database)
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        found, missing = orders(conn, site_id)
    finally:
        conn.close()
    return write(found, missing, out)


def write(found: list[Order], missing: int, out: TextIO) -> tuple[int, int, int]:
    """The CSV of ``found`` to ``out``: (orders, rows, ``missing``)."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    written = 0
    for order in found:
        for row in rows(order):
            writer.writerow(row)
            written += 1
    return len(found), written, missing


def default_name(now_s: float) -> str:
    """Remarkety's file name: ``orders_<YYYYMMDD_HHMMSS>.csv``, the export's date (UTC)."""
    import time

    return time.strftime("orders_%Y%m%d_%H%M%S.csv", time.gmtime(now_s))
