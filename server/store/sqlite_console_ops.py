"""The operator console's read-only questions, asked of the SQLite store's reader connection.

Vendors (counts, latency and success over time, last errors), dead letters (the rows an
operator filter selects, through ``deadletters.where``, the same clause a replay uses),
replays recorded, and order reconciliation (backend orders against what each vendor took).
Nothing here writes; everything is bounded before it is asked.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import aiosqlite

from ..jsontext import loads
from . import deadletters
from .deadletters import ReplayFilter

# range name -> (bucket width, number of buckets)
RANGES = {"24h": (3_600_000, 24), "30d": (86_400_000, 30)}
ERROR_GROUPS = 10  # per (site, vendor)
ERROR_MESSAGE_CHARS = 160
MAX_PAGE = 200
MAX_RECONCILE_ORDERS = 20_000
MAX_MISSING_LISTED = 200

# The dedup_key of the delivery a purchase plans, per vendor (what each server adapter in
# server/vendors/ builds from ecommerce.transaction_id; tests/test_console_ops.py checks it
# against their plans). A backend order's row is this key with claim = 0; when the vendor
# could not take it, "skipped:" + the key (outbox.plan).
PURCHASE_KEYS = {
    "rejoiner": "convert:{order}",
    "remarkety": "orders/create:{order}",
    "esputnik": "PurchasedItems:{order}",
    "sendlane": "order-placed:{order}",
}
ACCEPTED = ("delivered", "browser")


def bucket_starts(now_ms: int, range_name: str) -> tuple[int, int, list[int]]:
    """(bucket width, start of the first bucket, each bucket's start): whole hours or days
    (UTC), the last one holding now."""
    width, count = RANGES[range_name]
    last = now_ms - now_ms % width
    first = last - (count - 1) * width
    return width, first, [first + i * width for i in range(count)]


async def vendor_overview(conn: aiosqlite.Connection, now_ms: int, range_name: str = "24h",
                          site_id: str | None = None) -> list[dict[str, Any]]:
    """Per (site, vendor): row counts by state, the oldest pending row's age, and over the
    range: attempts, success rate, p50/p95 latency per bucket, and the last errors."""
    if range_name not in RANGES:
        raise ValueError(f"range: must be one of {', '.join(RANGES)}")
    site_cond, site_params = ("WHERE site_id = ?", [site_id]) if site_id else ("", [])
    rows = await conn.execute_fetchall(
        "SELECT site_id, vendor, "
        "sum(state = 'delivered') AS delivered, "
        "sum(state = 'pending' AND last_error IS NULL) AS pending, "
        "sum(state = 'pending' AND last_error IS NOT NULL) AS failing, "
        "sum(state = 'held') AS held, sum(state = 'dead') AS dead, "
        "sum(state = 'ignored') AS ignored, sum(state = 'browser') AS browser, "
        "sum(state = 'expired') AS expired, "
        "min(CASE WHEN state = 'pending' THEN created_ms END) AS oldest_pending_ms "
        f"FROM deliveries {site_cond} GROUP BY site_id, vendor ORDER BY site_id, vendor",
        site_params)
    overview: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        item = dict(row)
        oldest = item.pop("oldest_pending_ms")
        item["oldest_pending_age_s"] = None if oldest is None else max(0, now_ms - oldest) / 1000
        overview[(row["site_id"], row["vendor"])] = item

    width, first, starts = bucket_starts(now_ms, range_name)
    # Per (site, vendor, bucket): attempts, 2xx answers and the nearest-rank p50/p95,
    # ranked by SQLite (a window over the range's attempts): only the buckets come back.
    rows = await conn.execute_fetchall(
        "WITH a AS (SELECT d.site_id, d.vendor, (a.started_ms - ?1) / ?2 AS bucket, "
        "a.duration_ms, a.status FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
        f"WHERE a.started_ms >= ?1 AND a.started_ms < ?3 {'AND d.site_id = ?4' if site_id else ''}), "
        "r AS (SELECT *, row_number() OVER (PARTITION BY site_id, vendor, bucket "
        "ORDER BY duration_ms) AS rank, count(*) OVER (PARTITION BY site_id, vendor, bucket) "
        "AS n FROM a) "
        "SELECT site_id, vendor, bucket, n, sum(status BETWEEN 200 AND 299) AS ok, "
        # nearest rank: ceil(p * n), in integers
        "max(CASE WHEN rank = (n + 1) / 2 THEN duration_ms END) AS p50, "
        "max(CASE WHEN rank = (95 * n + 99) / 100 THEN duration_ms END) AS p95 "
        "FROM r GROUP BY site_id, vendor, bucket",
        [first, width, first + len(starts) * width, *site_params])
    grouped: dict[tuple[str, str], dict[int, Any]] = {}
    for row in rows:
        grouped.setdefault((row["site_id"], row["vendor"]), {})[row["bucket"]] = row

    errors = await _last_errors(conn, first, site_id)
    for key in set(grouped) | set(errors):
        overview.setdefault(key, {"site_id": key[0], "vendor": key[1], **{
            state: 0 for state in ("delivered", "pending", "failing", "held", "dead",
                                   "ignored", "browser", "expired")},
            "oldest_pending_age_s": None})
    for key, item in overview.items():
        series = grouped.get(key, {})
        buckets = []
        total = succeeded = 0
        for index, start in enumerate(starts):
            row = series.get(index)
            count, ok = (row["n"], row["ok"] or 0) if row is not None else (0, 0)
            total += count
            succeeded += ok
            buckets.append({"start_ms": start, "attempts": count, "succeeded": ok,
                            "success_rate": ok / count if count else None,
                            "p50_ms": row["p50"] if row is not None else None,
                            "p95_ms": row["p95"] if row is not None else None})
        item["range"] = range_name
        item["bucket_ms"] = width
        item["buckets"] = buckets
        item["attempts"] = total
        item["success_rate"] = succeeded / total if total else None
        item["errors"] = errors.get(key, [])
    return [overview[key] for key in sorted(overview)]


async def _last_errors(conn: aiosqlite.Connection, since_ms: int, site_id: str | None
                       ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Failed attempts since ``since_ms`` grouped by status and message (the transport
    error, else the start of the vendor's answer), latest first: count and last seen."""
    rows = await conn.execute_fetchall(
        "SELECT d.site_id, d.vendor, a.status, "
        "substr(coalesce(a.error, json_extract(a.answer, '$.body'), ''), 1, ?2) AS message, "
        "count(*) AS count, max(a.started_ms) AS last_ms FROM attempts a "
        "JOIN deliveries d ON d.id = a.delivery_id "
        "WHERE a.started_ms >= ?1 AND (a.error IS NOT NULL OR a.status >= 400) "
        f"{'AND d.site_id = ?3' if site_id else ''} "
        "GROUP BY d.site_id, d.vendor, a.status, message ORDER BY last_ms DESC",
        [since_ms, ERROR_MESSAGE_CHARS, *([site_id] if site_id else [])])
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        group = found.setdefault((row["site_id"], row["vendor"]), [])
        if len(group) < ERROR_GROUPS:
            group.append({"status": row["status"], "message": row["message"],
                          "count": row["count"], "last_ms": row["last_ms"]})
    return found


async def dead_letters(conn: aiosqlite.Connection, selection: ReplayFilter, limit: int = 50,
                       before_id: int | None = None) -> dict[str, Any]:
    """The rows ``selection`` names, newest first, ``limit`` a page (older pages: the last
    id shown as ``before_id``), with the exact count of all of them."""
    problem = deadletters.check(selection)
    if problem:
        raise ValueError(problem)
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit: must be 1 to {MAX_PAGE}")
    condition, params = deadletters.where(selection)
    total = (await conn.execute_fetchall(
        f"SELECT count(*) FROM deliveries WHERE {condition}", params))[0][0]
    page_cond, page_params = condition, list(params)
    if before_id is not None:
        page_cond += " AND id < ?"
        page_params.append(before_id)
    rows = await conn.execute_fetchall(
        "SELECT id, site_id, vendor, dedup_key, state, attempts, last_error, created_ms, "
        "updated_ms, next_attempt_ms, delivered_ms FROM deliveries "
        f"WHERE {page_cond} ORDER BY id DESC LIMIT ?", [*page_params, limit + 1])
    found = [dict(row) for row in rows]
    for row in found:
        if row["state"] == "pending":
            row["state"] = "failing"  # only failing pending rows match a filter
    more = len(found) > limit
    found = found[:limit]
    return {"rows": found, "total": total,
            "next_before_id": found[-1]["id"] if more and found else None}


async def recent_replays(conn: aiosqlite.Connection, limit: int = 20) -> list[dict[str, Any]]:
    """The latest replays recorded (console and CLI), newest first."""
    rows = await conn.execute_fetchall(
        "SELECT id, at_ms, who, filter, dry_run_count, replayed, ids FROM replays "
        "ORDER BY id DESC LIMIT ?", (min(max(limit, 1), MAX_PAGE),))
    found = []
    for row in rows:
        item = dict(row)
        item["filter"] = loads(item["filter"])
        item["ids"] = None if item["ids"] is None else loads(item["ids"])
        found.append(item)
    return found


def purchase_key(vendor: str, order_id: str) -> str | None:
    template = PURCHASE_KEYS.get(vendor)
    return None if template is None else template.format(order=order_id)


def _no_row_reason(site: Any, vendor: str) -> str:
    """Why a backend order has no delivery row for ``vendor``: the routing that skips it."""
    if site is None:
        return "no delivery planned: the site is not in the config any more"
    cfg = site.vendors.get(vendor)
    if cfg is None:
        return f"no delivery planned: {vendor} is not enabled for site {site.id}"
    mode = cfg.route("purchase")
    if mode == "off":
        return f"no delivery planned: sites[{site.id}].{vendor}.routes.purchase is off"
    if mode == "browser":
        return (f"no delivery planned: sites[{site.id}].{vendor}.routes.purchase is browser "
                f"(only the page's library reports orders) and no page reported this one")
    return ("no delivery planned: the vendor was enabled, or its purchase route changed, "
            "after the order arrived")


async def reconcile(conn: aiosqlite.Connection, sites: Mapping[str, Any], since_ms: int,
                    until_ms: int, site_id: str | None = None, vendor: str | None = None,
                    missing_limit: int = MAX_MISSING_LISTED) -> list[dict[str, Any]]:
    """Per site and vendor: the orders the backend sent in [since, until) (distinct
    ``transaction_id`` of backend ``purchase`` events), how many the vendor accepted
    (its purchase delivery delivered, or ``browser``: its library took it in the page),
    and the others listed with the delivery's state and last error, or why none exists.

    Matching (``PURCHASE_KEYS``): the order's row for a vendor is the delivery with that
    vendor's purchase dedup key for the order id, the backend's (claim = 0) first, else the
    page's (claim = 1); a backend order re-sent under another event id shares the row."""
    if until_ms <= since_ms:
        raise ValueError("until: must be later than since")
    site_cond = "AND site_id = ?" if site_id else ""
    base = [since_ms, until_ms, *([site_id] if site_id else [])]
    count = (await conn.execute_fetchall(
        "SELECT count(*) FROM events WHERE source = 'backend' AND name = 'purchase' "
        f"AND received_ms >= ? AND received_ms < ? {site_cond}", base))[0][0]
    if count > MAX_RECONCILE_ORDERS:
        raise ValueError(f"range: {count} backend orders in it; at most "
                         f"{MAX_RECONCILE_ORDERS} are reconciled at once, narrow it")
    orders = await conn.execute_fetchall(
        "SELECT site_id, json_extract(data, '$.ecommerce.transaction_id') AS order_id, "
        "min(received_ms) AS received_ms FROM events WHERE source = 'backend' "
        f"AND name = 'purchase' AND received_ms >= ? AND received_ms < ? {site_cond} "
        "GROUP BY site_id, order_id ORDER BY received_ms", base)
    by_site: dict[str, list[tuple[str, int]]] = {}
    for row in orders:
        if row["order_id"] is not None:
            by_site.setdefault(row["site_id"], []).append((str(row["order_id"]), row["received_ms"]))
    report = []
    for site in sorted(by_site):
        site_orders = by_site[site]
        config = sites.get(site)
        vendors = set(config.vendors) if config is not None else set()
        for name in set(PURCHASE_KEYS) - vendors:  # no longer configured, rows still there
            if await conn.execute_fetchall("SELECT 1 FROM deliveries WHERE site_id = ? AND "
                                           "vendor = ? LIMIT 1", (site, name)):
                vendors.add(name)
        for name in sorted(vendors):
            if vendor and name != vendor:
                continue
            keys = {purchase_key(name, order): order for order, _ in site_orders}
            found = await conn.execute_fetchall(
                "SELECT id, dedup_key, claim, state, last_error FROM deliveries "
                "WHERE site_id = ? AND vendor = ? AND dedup_key IN "
                "(SELECT value FROM json_each(?) UNION ALL "
                " SELECT 'skipped:' || value FROM json_each(?)) ORDER BY claim, id",
                (site, name, _json_list(keys), _json_list(keys)))
            rows: dict[str, dict[str, Any]] = {}
            for row in found:
                key = row["dedup_key"].removeprefix("skipped:")
                order = keys.get(key)
                if order is None:
                    continue
                current = rows.get(order)
                # The backend's own row decides; the page's counts only where there is none.
                if current is None or (current["claim"] == 1 and row["claim"] == 0):
                    rows[order] = dict(row)
            accepted = 0
            missing = []
            for order, received_ms in site_orders:
                row = rows.get(order)
                if row is not None and row["state"] in ACCEPTED:
                    accepted += 1
                    continue
                if len(missing) >= missing_limit:
                    continue
                missing.append({
                    "order_id": order, "received_ms": received_ms,
                    "delivery_id": row["id"] if row else None,
                    "state": row["state"] if row else None,
                    "from": None if row is None else ("page" if row["claim"] else "backend"),
                    "last_error": row["last_error"] if row else None,
                    "why": None if row else _no_row_reason(config, name)})
            report.append({"site_id": site, "vendor": name, "received": len(site_orders),
                           "accepted": accepted, "missing_count": len(site_orders) - accepted,
                           "missing": missing})
    return report


def _json_list(keys: Mapping[str, Any]) -> str:
    return json.dumps([key for key in keys if key is not None])
