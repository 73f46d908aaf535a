"""The operator console's read-only questions, the same on every backend (``OpsReads``,
through a backend's ``ConsoleReads`` primitives: ``console_reads.py``).

Vendors (counts, latency and success over time, last errors), dead letters (the rows an
operator filter selects, through ``deadletters.where``, the same clause a replay uses),
replays recorded, and order reconciliation (backend orders against what each vendor took).
Nothing here writes; everything is bounded before it is asked.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..jsontext import loads
from . import deadletters
from .deadletters import OLDEST_PENDING, ReplayFilter

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


STATE_COUNTS = ("delivered", "pending", "failing", "held", "dead", "ignored", "browser",
                "expired")
# The Vendors page counts the rows still in the outbox exactly, and the settled ones among
# the latest SETTLED_WINDOW deliveries (``OpsReads._state_counts``).
OPEN_STATES = ("pending", "failing", "held", "dead")
SETTLED_STATES = ("delivered", "ignored", "browser", "expired")
SETTLED_WINDOW = 200_000
STATE_CONDITIONS = {"pending": "state = 'pending' AND last_error IS NULL",
                    "failing": "state = 'pending' AND last_error IS NOT NULL"}


def _no_rows(site_id: str, vendor: str) -> dict[str, Any]:
    """A (site, vendor) on the Vendors page before its counts are filled in."""
    return {"site_id": site_id, "vendor": vendor, **{state: 0 for state in STATE_COUNTS},
            "oldest_pending_age_s": None}


class OpsReads:
    """Vendors, Dead letters, Reconciliation (``?`` placeholders). A backend's
    ``ConsoleReads`` provides ``rows``, ``json_text``, ``text_in`` and ``hash_joins``."""

    # Whether the planner may hash a whole table to join a few rows to it, and prices a
    # scalar subquery for every row it might run for (PostgreSQL): the latency series then
    # reads the attempts it must join in a branch of their own (``_series_attempts``).
    hash_joins: bool = False

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def json_text(self, column: str, *path: str) -> str:
        raise NotImplementedError

    def text_in(self, values: Sequence[str]) -> tuple[str, Any]:
        raise NotImplementedError

    async def vendor_overview(self, now_ms: int, range_name: str = "24h",
                              site_id: str | None = None) -> list[dict[str, Any]]:
        """Per (site, vendor): row counts by state (``_state_counts``), the oldest pending
        row's age, and over the range: attempts, success rate, p50/p95 latency per bucket,
        and the last errors."""
        if range_name not in RANGES:
            raise ValueError(f"range: must be one of {', '.join(RANGES)}")
        overview, window = await self._state_counts(now_ms, site_id)
        width, first, starts = bucket_starts(now_ms, range_name)
        # Per (site, vendor, bucket): attempts, 2xx answers and the nearest-rank p50/p95,
        # ranked by the database (a window over the range's attempts): only the buckets
        # come back.
        timed, params = self._series_attempts(first, width, first + len(starts) * width,
                                              site_id)
        rows = await self.rows(
            f"WITH timed AS ({timed}), "
            "ranked AS (SELECT *, row_number() OVER (PARTITION BY site_id, vendor, bucket "
            "ORDER BY duration_ms) AS pos, count(*) OVER (PARTITION BY site_id, vendor, bucket) "
            "AS n FROM timed) "
            "SELECT site_id, vendor, bucket, n, "
            "count(*) FILTER (WHERE status BETWEEN 200 AND 299) AS ok, "
            # nearest rank: ceil(p * n), in integers
            "max(CASE WHEN pos = (n + 1) / 2 THEN duration_ms END) AS p50, "
            "max(CASE WHEN pos = (95 * n + 99) / 100 THEN duration_ms END) AS p95 "
            "FROM ranked GROUP BY site_id, vendor, bucket, n", params)
        grouped: dict[tuple[str, str], dict[int, Any]] = {}
        for row in rows:
            if row["site_id"] is None:
                continue  # attempts without a delivery: the join never counted them
            grouped.setdefault((row["site_id"], row["vendor"]), {})[row["bucket"]] = row

        errors = await self._last_errors(first, site_id)
        for key in set(grouped) | set(errors):
            overview.setdefault(key, _no_rows(*key))
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
            item["settled_window"] = window
            item["range"] = range_name
            item["bucket_ms"] = width
            item["buckets"] = buckets
            item["attempts"] = total
            item["success_rate"] = succeeded / total if total else None
            item["errors"] = errors.get(key, [])
        return [overview[key] for key in sorted(overview)]

    def _series_attempts(self, first: int, width: int, end: int, site_id: str | None
                         ) -> tuple[str, list[Any]]:
        """The range's attempts with their site, vendor and bucket (SQL, parameters),
        through attempts_started. Each carries its delivery's site and vendor (SQLite's
        migration 013, PostgreSQL's 026) unless it was written before and is not labelled
        yet: only those look their delivery up. SQLite probes it in a scalar subquery, run
        for those rows alone. PostgreSQL's planner prices that subquery for every row (its
        JIT compiled the statement, 0.6 s for a day) and, offered a join, hashed the whole
        deliveries table for it (a sequential scan on each view): there the unlabelled
        attempts are a branch of their own, found by time in attempts_unlabelled and
        joined to their deliveries by primary key. An attempt without a delivery has no
        site and is left out, as the join left it out."""
        params: list[Any] = [first, width, first, end]
        if self.hash_joins:
            where = "a.started_ms >= ? AND a.started_ms < ?"
            sql = ("SELECT a.site_id, a.vendor, (a.started_ms - ?) / ? AS bucket, a.duration_ms, "
                   f"a.status FROM attempts a WHERE {where} AND a.site_id IS NOT NULL "
                   f"{'AND a.site_id = ?' if site_id else ''} UNION ALL "
                   "SELECT d.site_id, d.vendor, (a.started_ms - ?) / ? AS bucket, "
                   "a.duration_ms, a.status FROM attempts a JOIN deliveries d "
                   f"ON d.id = a.delivery_id WHERE {where} AND a.site_id IS NULL "
                   f"{'AND d.site_id = ?' if site_id else ''}")
            branch = params + ([site_id] if site_id else [])
            return sql, branch + branch
        site, vendor = (f"coalesce(a.{column}, (SELECT {column} FROM deliveries "
                        "WHERE id = a.delivery_id))" for column in ("site_id", "vendor"))
        sql = (f"SELECT {site} AS site_id, {vendor} AS vendor, (a.started_ms - ?) / ? AS bucket, "
               "a.duration_ms, a.status FROM attempts a WHERE a.started_ms >= ? "
               f"AND a.started_ms < ? {f'AND {site} = ?' if site_id else ''}")
        return sql, params + ([site_id] if site_id else [])

    async def _state_counts(self, now_ms: int, site_id: str | None
                            ) -> tuple[dict[tuple[str, str], dict[str, Any]], int | None]:
        """Per (site, vendor): the rows still in the outbox by state, exactly (an index of
        open rows reads them, however long the history), and the settled ones (delivered,
        ignored, browser, expired) among the latest ``SETTLED_WINDOW`` deliveries: rows are
        kept for good, and counting every one was a scan of the whole table on each page
        view (950 ms at 1,000,000 deliveries on SQLite). Also the window, when it cut
        (None: every row was counted)."""
        site_cond, site_params = ("AND site_id = ?", [site_id]) if site_id else ("", [])

        def counts(states: Sequence[str]) -> str:
            return ", ".join(
                f"count(*) FILTER (WHERE {STATE_CONDITIONS.get(state, f'state = {state!r}')}) "
                f"AS {state}" for state in states)

        open_rows = await self.rows(
            f"SELECT site_id, vendor, {counts(OPEN_STATES)}, "
            f"min({OLDEST_PENDING}) FILTER (WHERE state = 'pending') AS oldest_pending_ms "
            f"FROM deliveries WHERE state IN ('pending', 'held', 'dead') {site_cond} "
            "GROUP BY site_id, vendor", site_params)
        newest = (await self.rows("SELECT max(id) AS id FROM deliveries"))[0]["id"] or 0
        since = max(0, newest - SETTLED_WINDOW)
        settled = ", ".join(f"'{state}'" for state in SETTLED_STATES)
        settled_rows = await self.rows(
            f"SELECT site_id, vendor, {counts(SETTLED_STATES)} FROM deliveries "
            f"WHERE id > ? AND state IN ({settled}) {site_cond} GROUP BY site_id, vendor",
            [since, *site_params])
        overview: dict[tuple[str, str], dict[str, Any]] = {}
        for row in [*open_rows, *settled_rows]:
            key = (row["site_id"], row["vendor"])
            item = overview.setdefault(key, _no_rows(*key))
            oldest = row.pop("oldest_pending_ms", None)
            if oldest is not None:
                item["oldest_pending_age_s"] = max(0, now_ms - oldest) / 1000
            item.update({k: v for k, v in row.items() if k in STATE_COUNTS})
        return overview, SETTLED_WINDOW if since else None

    async def _last_errors(self, since_ms: int, site_id: str | None
                           ) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Failed attempts since ``since_ms`` grouped by status and message (the transport
        error, else the start of the vendor's answer), latest first: count and last seen."""
        body = self.json_text("a.answer", "body")
        rows = await self.rows(
            "SELECT d.site_id, d.vendor, a.status, "
            f"substr(coalesce(a.error, {body}, ''), 1, ?) AS message, "
            "count(*) AS count, max(a.started_ms) AS last_ms FROM attempts a "
            "JOIN deliveries d ON d.id = a.delivery_id "
            "WHERE a.started_ms >= ? AND (a.error IS NOT NULL OR a.status >= 400) "
            f"{'AND d.site_id = ?' if site_id else ''} "
            "GROUP BY d.site_id, d.vendor, a.status, message ORDER BY last_ms DESC",
            [ERROR_MESSAGE_CHARS, since_ms, *([site_id] if site_id else [])])
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            group = found.setdefault((row["site_id"], row["vendor"]), [])
            if len(group) < ERROR_GROUPS:
                group.append({"status": row["status"], "message": row["message"],
                              "count": row["count"], "last_ms": row["last_ms"]})
        return found

    async def dead_letters(self, selection: ReplayFilter, limit: int = 50,
                           before_id: int | None = None) -> dict[str, Any]:
        """The rows ``selection`` names, newest first, ``limit`` a page (older pages: the
        last id shown as ``before_id``), with the exact count of all of them."""
        problem = deadletters.check(selection)
        if problem:
            raise ValueError(problem)
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit: must be 1 to {MAX_PAGE}")
        condition, params = deadletters.where(selection)
        total = (await self.rows(f"SELECT count(*) AS n FROM deliveries WHERE {condition}",
                                 params))[0]["n"]
        page_cond, page_params = condition, list(params)
        if before_id is not None:
            page_cond += " AND id < ?"
            page_params.append(before_id)
        found = await self.rows(
            "SELECT id, site_id, vendor, dedup_key, state, attempts, last_error, created_ms, "
            "updated_ms, next_attempt_ms, delivered_ms FROM deliveries "
            f"WHERE {page_cond} ORDER BY id DESC LIMIT ?", [*page_params, limit + 1])
        for row in found:
            if row["state"] == "pending":
                row["state"] = "failing"  # only failing pending rows match a filter
        more = len(found) > limit
        found = found[:limit]
        return {"rows": found, "total": total,
                "next_before_id": found[-1]["id"] if more and found else None}

    async def recent_replays(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest replays recorded (console and CLI), newest first."""
        found = await self.rows(
            "SELECT id, at_ms, who, filter, dry_run_count, replayed, ids FROM replays "
            "ORDER BY id DESC LIMIT ?", [min(max(limit, 1), MAX_PAGE)])
        for item in found:
            item["filter"] = loads(item["filter"])
            item["ids"] = None if item["ids"] is None else loads(item["ids"])
        return found

    async def reconcile(self, sites: Mapping[str, Any], since_ms: int, until_ms: int,
                        site_id: str | None = None, vendor: str | None = None,
                        missing_limit: int = MAX_MISSING_LISTED) -> list[dict[str, Any]]:
        """Per site and vendor: the orders the backend sent in [since, until) (distinct
        ``transaction_id`` of backend ``purchase`` events, not backfilled ones), how many
        the vendor accepted (its purchase delivery delivered, or ``browser``: its library
        took it in the page), and the others listed with the delivery's state and last
        error, or why none exists.

        Matching (``PURCHASE_KEYS``): the order's row for a vendor is the delivery with that
        vendor's purchase dedup key for the order id, the backend's (claim = 0) first, else
        the page's (claim = 1); a backend order re-sent under another event id shares the
        row. The orders are read through the index on backend purchases (site, time)."""
        if until_ms <= since_ms:
            raise ValueError("until: must be later than since")
        site_cond = "AND site_id = ?" if site_id else ""
        base = [since_ms, until_ms, *([site_id] if site_id else [])]
        # Backfilled history (``onetag backfill``: data.backfill) is not an order the backend
        # sent now, and only vendors with a historical path get it: it is not reconciled.
        orders_of = ("FROM events WHERE source = 'backend' AND name = 'purchase' "
                     f"AND received_ms >= ? AND received_ms < ? {site_cond} "
                     f"AND {self.json_text('data', 'backfill')} IS NULL")
        count = (await self.rows(f"SELECT count(*) AS n {orders_of}", base))[0]["n"]
        if count > MAX_RECONCILE_ORDERS:
            raise ValueError(f"range: {count} backend orders in it; at most "
                             f"{MAX_RECONCILE_ORDERS} are reconciled at once, narrow it")
        order_id = self.json_text("data", "ecommerce", "transaction_id")
        orders = await self.rows(
            f"SELECT site_id, {order_id} AS order_id, min(received_ms) AS first_ms "
            f"{orders_of} GROUP BY site_id, {order_id} ORDER BY first_ms", base)
        by_site: dict[str, list[tuple[str, int]]] = {}
        for row in orders:
            if row["order_id"] is not None:
                by_site.setdefault(row["site_id"], []).append((str(row["order_id"]),
                                                               row["first_ms"]))
        report = []
        for site in sorted(by_site):
            site_orders = by_site[site]
            config = sites.get(site)
            vendors = set(config.vendors) if config is not None else set()
            for name in set(PURCHASE_KEYS) - vendors:  # no longer configured, rows still there
                if await self.rows("SELECT 1 AS found FROM deliveries WHERE site_id = ? AND "
                                   "vendor = ? LIMIT 1", [site, name]):
                    vendors.add(name)
            for name in sorted(vendors):
                if vendor and name != vendor:
                    continue
                keys = {purchase_key(name, order): order for order, _ in site_orders}
                rows = await self._purchase_rows(site, name, keys)
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

    async def _purchase_rows(self, site: str, vendor: str, keys: Mapping[str | None, str]
                             ) -> dict[str, dict[str, Any]]:
        """Per order: the vendor's purchase row for it (or its ``skipped:`` row), looked up
        by the unique (site, vendor, dedup key, claim) index; the backend's own row first."""
        wanted = [key for key in keys if key is not None]
        in_list, value = self.text_in(wanted + [f"skipped:{key}" for key in wanted])
        found = await self.rows(
            "SELECT id, dedup_key, claim, state, last_error FROM deliveries "
            f"WHERE site_id = ? AND vendor = ? AND dedup_key {in_list} ORDER BY claim, id",
            [site, vendor, value])
        rows: dict[str, dict[str, Any]] = {}
        for row in found:
            order = keys.get(row["dedup_key"].removeprefix("skipped:"))
            if order is None:
                continue
            current = rows.get(order)
            # The backend's own row decides; the page's counts only where there is none.
            if current is None or (current["claim"] == 1 and row["claim"] == 0):
                rows[order] = row
        return rows
