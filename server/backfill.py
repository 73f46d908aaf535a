"""``onetag backfill``: a shop's history (customers, products, orders with their statuses)
read from files, checked line by line with the backend API's own validation, and planned as
historical deliveries through the outbox — only to the vendors whose documents offer a
historical path, so that nothing old triggers a live flow.

Input (documented in docs/backfill.md):

- JSONL: one backend-vocabulary event a line (``identify``, ``product_updated``,
  ``purchase``, ``order_status``, ``refund``), each with its original ``time``: Unix
  milliseconds as on the backend API, or an ISO 8601 string with a zone.
- CSV with a header naming its kind: orders (``order_id``: one row per order line, an
  order's rows together), products (``item_id``) or customers (``email``/``customer_id``).

Two passes: the first checks every line and reports every problem with its file and line
(nothing is planned when there is one, unless ``--skip-invalid``); the second plans. With
``--send`` the plan is written in batches (one transaction each, with the run's progress,
``backfill_runs``), so a run killed half-way resumes after its last committed batch, and
stable dedup keys mean nothing is ever planned, so sent, twice.

Which vendor gets what (each vendor's document, by title and section):

- Sendlane: customer-added, product-added and order-placed with ``"initial_sync": true`` and
  the past ``time`` (Sendlane Custom Integration Setup & API v2, "Historical data sync";
  "Time Properties": ``time`` is "a UNIX timestamp of the order date and time").
- Remarkety: nothing through its webhooks; "a one-time orders history import ... using a
  CSV file import" through support (Integrating custom platforms with Remarkety, Orders):
  ``onetag export remarkety-orders`` (server/remarkety_export.py).
- Rejoiner, eSputnik: nothing (``NO_HISTORY`` says why).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

from . import events as vocabulary
from .events import Invalid, Origin
from .jsontext import encode
from .outbox import OrderBodies, order_key, visitor_key
from .store import rules
from .vendors import VENDORS
from .vendors import _common as common
from .vendors._base import PlanContext

MAX_LINE_BYTES = vocabulary.MAX_EVENT_BYTES  # a line is one event: the backend API's limit
MAX_FILE_LINES = 5_000_000  # a file; split a larger history
MAX_FILES = 100
BATCH_LINES = 500  # lines a transaction of --send takes (with the run's progress)
# Historical deliveries a minute per vendor (--pace): history trickles out, and live rows,
# due when made, go out first. Half of the 240 requests a minute Sendlane's API allows an
# account (REFERENCE.md 4.2, quoting Sendlane's rate-limits page: a secondary source), so
# live traffic keeps the other half.
DEFAULT_PACE = 120.0
PROGRESS_EVERY_S = 10.0  # a progress line this often when stderr is not a terminal
REDRAW_EVERY_S = 0.1  # the bar's redraw on a terminal

BACKFILL_EVENTS = ("identify", "product_updated", "purchase", "order_status", "refund")
ORDER_EVENTS = frozenset({"purchase", "order_status", "refund"})

# The vendors without a historical path (``HISTORY_MARKS`` has those with one), and why.
NO_HISTORY = {
    "remarkety": "its webhooks are live events; Remarkety takes order history as a one-time "
                 "CSV import through its support (Integrating custom platforms with "
                 "Remarkety, Orders): run `onetag export remarkety-orders --site {site}` and "
                 "send them the file",
    "rejoiner": "its REST API has no historical path: customer/convert \"will convert the "
                "latest session for a customer\" (a live conversion, no time field), and the "
                "customer endpoints carry no time (Rejoiner REST API)",
    "esputnik": "its tracker events are website behaviour for triggers and recommendations, "
                "each needing the visitor's sc cookie (GeneralInfo.cookies, \"Required\"), "
                "with no historical import (eSputnik, Transferring Website Behavior Data via "
                "REST API); backfilled history has no session",
}

# CSV: the kinds, the column that names each, and every column each takes.
ORDER_COLUMNS = ("order_id", "time", "status", "email", "customer_id", "first_name",
                 "last_name", "phone", "accepts_marketing", "currency", "value", "tax",
                 "shipping", "coupon", "item_id", "item_name", "sku", "item_brand",
                 "item_category", "item_variant", "price", "quantity", "item_url", "image_url")
PRODUCT_COLUMNS = ("item_id", "time", "item_name", "sku", "price", "currency", "item_brand",
                   "item_category", "item_variant", "item_url", "image_url", "description",
                   "in_stock")
CUSTOMER_COLUMNS = ("email", "customer_id", "time", "first_name", "last_name", "phone",
                    "accepts_marketing")
USER_COLUMNS = ("email", "customer_id", "first_name", "last_name", "phone", "accepts_marketing")
ITEM_COLUMNS = ("item_id", "item_name", "sku", "item_brand", "item_category", "item_variant",
                "price", "quantity", "item_url", "image_url", "description", "in_stock")
DIGITS_RE = re.compile(r"[0-9]{1,16}")  # ASCII only: str.isdigit() takes "²", int() does not
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass
class Unit:
    """One event read from a file (a JSONL line, or a CSV order's rows), or the problem of
    those lines. ``last`` is the global line number of its last line (across the files, for
    progress and resuming); ``where`` names it for people: ``orders.csv:5-7``."""

    where: str
    last: int
    raw: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


class Reader:
    """Reads the files line by line (each line bounded before it is parsed), hashing their
    bytes (a run is resumed only over the same bytes) and counting lines."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.hash = hashlib.sha256()
        self.lines = 0  # global, across the files
        self.bytes = 0

    def units(self) -> Iterator[Unit]:
        for path in self.paths:
            if path.suffix.lower() == ".csv":
                yield from self._csv(path)
            else:
                yield from self._jsonl(path)

    def _lines(self, path: Path) -> Iterator[tuple[int, bytes | None, int]]:
        """(line number in the file, its bytes or None when over ``MAX_LINE_BYTES``, size)."""
        with open(path, "rb") as f:
            number = 0
            while True:
                line = f.readline(MAX_LINE_BYTES + 2)
                if not line:
                    return
                number += 1
                self.lines += 1
                self.hash.update(line)
                size = len(line)
                if size > MAX_LINE_BYTES + 1 or (size > MAX_LINE_BYTES
                                                 and not line.endswith(b"\n")):
                    while not line.endswith(b"\n"):  # the rest of the long line
                        line = f.readline(1 << 16)
                        if not line:
                            break
                        self.hash.update(line)
                        size += len(line)
                    self.bytes += size
                    yield number, None, size
                else:
                    self.bytes += size
                    yield number, line, size
                if number >= MAX_FILE_LINES:
                    rest = f.read(1)
                    if rest:
                        raise TooManyLines(path, number)

    def _jsonl(self, path: Path) -> Iterator[Unit]:
        try:
            for number, line, size in self._lines(path):
                where = f"{path.name}:{number}"
                if line is None:
                    yield Unit(where, self.lines, problems=[
                        f"{where}: line: is {size} bytes; the limit is {MAX_LINE_BYTES} a line"])
                elif line.strip():
                    yield parse_jsonl_line(line, where, self.lines)
        except TooManyLines as exc:
            yield Unit(f"{path.name}:{exc.number}", self.lines, problems=[str(exc)])

    def _csv(self, path: Path) -> Iterator[Unit]:
        physical: list[int] = [0]  # the file's line number the csv reader has read up to
        too_long: list[str] = []

        def text_lines() -> Iterator[str]:
            for number, line, size in self._lines(path):
                physical[0] = number
                if line is None:
                    too_long.append(f"{path.name}:{number}: line: is {size} bytes; the limit "
                                    f"is {MAX_LINE_BYTES} a line")
                    yield "\n"
                    continue
                try:
                    yield line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    too_long.append(f"{path.name}:{number}: line: is not valid UTF-8 "
                                    f"({exc.reason} at byte {exc.start})")
                    yield "\n"

        def rows() -> Iterator[list[str] | str]:
            """The rows, and in place of a row the csv reader refused, why (it goes on)."""
            reader = csv.reader(text_lines(), strict=True)
            while True:
                try:
                    yield next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield f"is not valid CSV ({exc})"

        try:
            yield from csv_units(path.name, rows(), physical, lambda: self.lines, too_long)
        except TooManyLines as exc:
            yield Unit(f"{path.name}:{exc.number}", self.lines, problems=[str(exc)])


class TooManyLines(Exception):
    def __init__(self, path: Path, number: int):
        super().__init__(f"{path.name}: has more than {MAX_FILE_LINES:,} lines; the limit is "
                         f"{MAX_FILE_LINES:,} a file (split it)")
        self.number = number


def parse_jsonl_line(line: bytes, where: str, last: int = 0) -> Unit:
    """One JSONL line into a Unit: the event object, or the line's problem. Never raises."""
    try:
        raw = vocabulary.parse_json(line)
    except Invalid as exc:
        return Unit(where, last, problems=[f"{where}: line: {exc.problem}"])
    except Exception as exc:  # anything the parser itself trips on is the line's problem
        return Unit(where, last, problems=[f"{where}: line: could not be read "
                                           f"({type(exc).__name__})"])
    if not isinstance(raw, dict):
        return Unit(where, last, problems=[f"{where}: line: must be one JSON object (an event)"])
    return Unit(where, last, raw=raw)


def csv_units(name: str, rows: Iterator[list[str] | str], physical: list[int], position: Any,
              reading_problems: list[str]) -> Iterator[Unit]:
    """CSV rows into Units: a row per customer or product, an order's consecutive rows
    (one per order line) into one purchase. ``physical[0]`` is the file line read so far; a
    row the csv reader refused comes as the text of its problem. The file is always read
    to its end (its lines are counted and hashed), even past a header it refuses."""
    header = next(rows, None)
    if header is None:
        return
    if isinstance(header, str):
        yield Unit(f"{name}:{physical[0]}", position(),
                   problems=[f"{name}:{physical[0]}: header: {header}"])
        for _ in rows:
            pass
        return
    header = [column.strip() for column in header]
    kind, columns = _csv_kind(header)
    where = f"{name}:1"
    if kind is None or set(header) - set(columns) or len(set(header)) != len(header):
        unknown = sorted(set(header) - set(columns or ()))
        problem = (f"{where}: header: columns {', '.join(unknown)} are not {kind} columns "
                   f"({', '.join(columns)})" if kind and unknown else
                   f"{where}: header: a column is named twice" if kind else
                   f"{where}: header: must name order_id (orders), item_id (products) or "
                   "email/customer_id (customers)")
        yield Unit(where, position(), problems=[problem])
        for _ in rows:
            pass
        return
    order: dict[str, Any] | None = None
    first = 0
    # Rows refused while an order was open that may be its own (a row that can't be read
    # names no order): the order is refused whole rather than sent with a line missing.
    bad_rows: list[int] = []
    order_column = header.index("order_id") if kind == "orders" else -1
    for row in rows:
        line = physical[0]
        problems = list(reading_problems)
        reading_problems.clear()
        if isinstance(row, str):
            problems.append(f"{name}:{line}: row: {row}")
        if problems:
            if order is not None:
                bad_rows.append(line)
            yield Unit(f"{name}:{line}", position(), problems=problems)
            continue
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            if order is not None and (len(row) <= order_column or  # whose order? not known
                                      row[order_column].strip() == order["transaction_id"]):
                bad_rows.append(line)
            yield Unit(f"{name}:{line}", position(), problems=[
                f"{name}:{line}: row: has {len(row)} cells; the header has {len(header)}"])
            continue
        cells = {column: cell.strip() for column, cell in zip(header, row) if cell.strip()}
        if kind != "orders":
            yield Unit(f"{name}:{line}", position(), raw=_csv_event(kind, cells))
            continue
        if order is not None and cells.get("order_id") != order["transaction_id"]:
            yield _order_unit(name, first, last_line, last_position, order, bad_rows)
            order = None
        if order is None:
            order, first, bad_rows = _csv_order(cells), line, []
        elif "item_id" in cells:
            order["ecommerce"]["items"].append(_csv_item(cells))
        last_line, last_position = line, position()
    if reading_problems:
        yield Unit(f"{name}:{physical[0]}", position(), problems=list(reading_problems))
    if order is not None:
        yield _order_unit(name, first, last_line, last_position, order, bad_rows)


def _order_unit(name: str, first: int, last: int, position: int, order: dict[str, Any],
                bad_rows: list[int]) -> Unit:
    """An order read from its rows; refused whole when one of its rows was refused (an
    order with a line missing would reach the vendors with the wrong lines)."""
    where = _span(name, first, last)
    if bad_rows:
        return Unit(where, position, problems=[
            f"{where}: order {order['transaction_id']}: its row at line "
            f"{', '.join(map(str, bad_rows))} is invalid, so the whole order is left out"])
    return Unit(where, position, raw=order)


def _span(name: str, first: int, last: int) -> str:
    return f"{name}:{first}" if first == last else f"{name}:{first}-{last}"


def _csv_kind(header: list[str]) -> tuple[str | None, tuple[str, ...]]:
    if "order_id" in header:
        return "orders", ORDER_COLUMNS
    if "item_id" in header:
        return "products", PRODUCT_COLUMNS
    if "email" in header or "customer_id" in header:
        return "customers", CUSTOMER_COLUMNS
    return None, ()


def _cell(column: str, value: str) -> Any:
    """A cell as the backend API would have it: booleans and whole quantities typed, money
    left as its text (read exactly, as Decimal); anything else refused by the validation."""
    if column in ("accepts_marketing", "in_stock"):
        return BOOLEANS.get(value.lower(), value)
    if column == "quantity" and DIGITS_RE.fullmatch(value):
        return int(value)
    return value


def _csv_user(cells: dict[str, str]) -> dict[str, Any]:
    return {key: _cell(key, cells[key]) for key in USER_COLUMNS if key in cells}


def _csv_item(cells: dict[str, str]) -> dict[str, Any]:
    item = {key: _cell(key, cells[key]) for key in ITEM_COLUMNS if key in cells}
    if "item_category" in item:
        item["item_category"] = cells["item_category"]
    return item


def _csv_order(cells: dict[str, str]) -> dict[str, Any]:
    """A purchase from an order's first row (order fields are read from it alone)."""
    ecommerce = {key: cells[key] for key in ("currency", "value", "tax", "shipping", "coupon")
                 if key in cells}
    ecommerce["items"] = [_csv_item(cells)] if "item_id" in cells else []
    event = {"event": "purchase", "transaction_id": cells.get("order_id"),
             "user": _csv_user(cells), "ecommerce": ecommerce}
    for key in ("time", "status"):
        if key in cells:
            event[key] = cells[key]
    return event


def _csv_event(kind: str | None, cells: dict[str, str]) -> dict[str, Any]:
    event: dict[str, Any]
    if kind == "products":
        item = _csv_item(cells)
        ecommerce: dict[str, Any] = {"items": [item]}
        if "currency" in cells:
            ecommerce["currency"] = cells["currency"]
        event = {"event": "product_updated", "ecommerce": ecommerce}
    else:
        event = {"event": "identify", "user": _csv_user(cells)}
    if "time" in cells:
        event["time"] = cells["time"]
    return event


# Validation ---------------------------------------------------------------------------


def parse_time(value: Any, now_ms: int) -> int:
    """An event's original ``time``: Unix milliseconds (as on the backend API; digits in a
    CSV), or an ISO 8601 date-time with a zone. Required, and in the past."""
    where = "event.time"
    if value is None:
        raise Invalid(where, "is required for a backfill: when it happened (Unix ms, or ISO "
                             "8601 with a zone, e.g. 2024-03-01T12:00:00Z)")
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        value = int(value)
    if isinstance(value, str) and DIGITS_RE.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise Invalid(where, f"{vocabulary.echo(value)} is neither Unix ms nor an ISO 8601 "
                                 "date-time (e.g. 2024-03-01T12:00:00Z)") from None
        if when.tzinfo is None:
            raise Invalid(where, f"{vocabulary.echo(value)} has no zone: add one (Z, +02:00)")
        value = int(when.timestamp() * 1000)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(where, "must be Unix milliseconds or an ISO 8601 date-time string")
    if value > now_ms:
        raise Invalid(where, "must be in the past: a backfill is history")
    return value


def natural_key(event: dict[str, Any]) -> str:
    """What makes two lines the same fact: an order, an order's status, a customer, a
    product. A line without an ``event_id`` gets one made from this, so a second run (or a
    resumed one) stores and plans the same fact under the same keys."""
    name = event["name"]
    ecom = event.get("ecommerce") or {}
    if name == "purchase":
        return f"purchase:{ecom['transaction_id']}"
    if name in ("order_status", "refund"):
        partial = common.refund_lines_ref(event)  # one of an order's partial refunds
        return (f"{name}:{ecom['transaction_id']}:{common.order_status(event)}"
                + (f":{partial}" if partial else ""))
    if name == "identify":
        user = event.get("user") or {}
        return f"identify:{user.get('customer_id') or user.get('email')}"
    return "product_updated:" + "|".join(item["item_id"] for item in ecom.get("items") or [])


def check(unit: Unit, origin: Origin) -> dict[str, Any]:
    """The normalised event of a unit read without a problem; ``Invalid`` otherwise. The
    backend API's own validation (``events.normalise``), plus what a backfill needs."""
    raw = dict(unit.raw or {})
    name = raw.get("event")
    if isinstance(name, str) and name not in BACKFILL_EVENTS:
        raise Invalid("event.event", f"{vocabulary.echo(name, 64)} is not history a backfill "
                                     f"takes: one of {', '.join(BACKFILL_EVENTS)}")
    raw["time"] = parse_time(raw.get("time"), origin.received_ms)
    event = vocabulary.normalise(raw, "event", origin)
    if "event_id" not in (unit.raw or {}):
        stable = "bf-" + hashlib.sha256(natural_key(event).encode()).hexdigest()[:40]
        event["event_id"] = raw["event_id"] = stable
    event["sc"] = None  # history belongs to no browser session
    event["backfill"] = True
    unit.raw = raw
    return event


def check_unit(unit: Unit, origin: Origin) -> dict[str, Any] | None:
    """``check``, its problem (if any) added to the unit's, each naming the unit's file and
    line: ``orders.jsonl:12: event.user.email: 'x' is not an email address``."""
    if unit.problems:
        return None
    try:
        return check(unit, origin)
    except Invalid as exc:
        unit.problems.append(f"{unit.where}: {exc.field}: {exc.problem}")
        return None


# Planning (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    vendor: str
    dedup_key: str
    visitor: str
    request: dict[str, Any]


def plan(site: Any, event: dict[str, Any], orders: OrderBodies | None = None
         ) -> tuple[list[Planned], list[tuple[str, str]]]:
    """The historical deliveries of one event, and (vendor, reason) for each request a
    vendor with a historical path can't take. Vendors without one get nothing here.
    ``orders``: the order requests a status change repeats (``PlanContext.order``), as
    live ingest hands them (``Backfill._plan_batch``)."""
    planned: list[Planned] = []
    skipped: list[tuple[str, str]] = []
    visitor = "backfill:" + visitor_key(event)  # never queued behind (or ahead of) live rows
    for name, vendor in site.vendors.items():
        if name not in HISTORICAL:
            continue
        if vendor.route(event["name"]) == "off":
            skipped.append((name, f"the site's route for {event['name']} is off"))
            continue
        key = order_key(name, event) if orders else None
        context = PlanContext(site_id=site.id, vendor=vendor, currency=site.currency,
                              cart_url=site.cart_url,
                              order=orders.get((site.id, name, key)) if key else None)
        for request in VENDORS[name].plan(event, context):
            if request.skipped:
                skipped.append((name, request.skipped))
            elif request.needs_email and not common.person(event).get("email"):
                skipped.append((name, f"{event['name']} without an email (the vendor binds "
                                      "it to a contact by email)"))
            else:
                row = request.to_row()
                row["json"] = HISTORY_MARKS[name](row["json"], event["time_ms"])
                planned.append(Planned(name, request.dedup_key, visitor, row))
    return planned, skipped


def sendlane_history(body: dict[str, Any], time_ms: int) -> dict[str, Any]:
    """Sendlane's marks of history (Sendlane Custom Integration Setup & API v2, "Historical
    data sync": ``"initial_sync": true`` and ``time`` set in the past; "Time Properties":
    ``time`` is a UNIX timestamp, so seconds)."""
    return {**body, "initial_sync": True, "time": time_ms // 1000}


# The vendors with a historical path: how a request of theirs is marked as history.
HISTORY_MARKS = {"sendlane": sendlane_history}
HISTORICAL = frozenset(HISTORY_MARKS)


# Progress -------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr: redrawn in place (``\\r``) on a terminal, a plain line every
    ``PROGRESS_EVERY_S`` otherwise (a log keeps them). Rate in lines a second, and an ETA."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 tty: bool | None = None, every_s: float = PROGRESS_EVERY_S):
        self.label = label
        self.total = max(total, 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = REDRAW_EVERY_S if self.tty else every_s
        self.started = self.last = time.monotonic()
        self.done = self.lines = 0
        self.drawn = False

    def update(self, done: int, lines: int, force: bool = False) -> None:
        self.done, self.lines = done, lines
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            self._draw(now)

    def finish(self) -> None:
        self._draw(time.monotonic(), final=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-6)
        rate = self.lines / elapsed
        share = min(self.done / self.total, 1.0)
        left = elapsed * (1 - share) / share if share else None
        eta = "--" if left is None else _duration(left)
        return (f"{self.label}: {self.lines:,} lines, {share:4.0%}, {rate:,.0f} lines/s, "
                f"ETA {eta}")

    def _draw(self, now: float, final: bool = False) -> None:
        text = self.line(now)
        if self.tty:
            width = 30
            filled = int(width * min(self.done / self.total, 1.0))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if final:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# The run --------------------------------------------------------------------------------


@dataclass
class Summary:
    site: str
    send: bool
    lines: int = 0  # read
    valid: int = 0  # events
    invalid: int = 0  # units with a problem (an order's rows count once)
    problems: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)  # valid events by name
    planned: Counter = field(default_factory=Counter)  # vendor -> new deliveries
    already: Counter = field(default_factory=Counter)  # vendor -> keys some row holds
    skipped: dict[str, Counter] = field(default_factory=dict)  # vendor -> reason -> count
    events_known: int = 0  # events stored before (same id)
    run_id: int | None = None
    resumed_from: int = 0  # lines a resumed run had done
    nothing: dict[str, str] = field(default_factory=dict)  # vendor -> why it gets nothing
    pace_ms: int = 0  # a vendor's planned rows fall due this far apart

    def restore(self, text: str) -> None:
        data = json.loads(text or "{}")
        self.planned.update(data.get("planned", {}))
        self.already.update(data.get("already", {}))
        for vendor, reasons in data.get("skipped", {}).items():
            self.skipped.setdefault(vendor, Counter()).update(reasons)
        self.events_known += data.get("events_known", 0)

    def skip(self, vendor: str, reason: str) -> None:
        self.skipped.setdefault(vendor, Counter())[reason] += 1

    def text(self) -> str:
        mode = "planned" if self.send else "would plan"
        out = [f"onetag backfill{'' if self.send else ' (dry run)'}: site {self.site}"]
        if self.run_id is not None:
            resumed = (f", resumed after line {self.resumed_from:,}" if self.resumed_from
                       else "")
            out[0] += f", run {self.run_id}{resumed}"
        kinds = ", ".join(f"{name} {count:,}" for name, count in sorted(self.kinds.items()))
        left_out = " (skipped: --skip-invalid)" if self.invalid and not self.problems else ""
        out.append(f"lines: {self.lines:,} read, {self.valid:,} events valid"
                   f"{f' ({kinds})' if kinds else ''}, {self.invalid:,} invalid{left_out}")
        if self.events_known:
            out.append(f"events already stored (same id): {self.events_known:,}")
        vendors = sorted(set(self.planned) | set(self.already) | set(self.skipped))
        for vendor in vendors:
            line = (f"{vendor}: {self.planned[vendor]:,} {mode} (historical: initial_sync, "
                    f"past time), {self.already[vendor]:,} already done")
            if self.pace_ms and self.planned[vendor]:
                line += (f"; paced at {60_000 / self.pace_ms:,.0f} a minute (--pace), the last "
                         f"due in about "
                         f"{_duration((self.planned[vendor] - 1) * self.pace_ms / 1000)}")
            reasons = self.skipped.get(vendor) or Counter()
            if reasons:
                line += f", {sum(reasons.values()):,} skipped"
                line += "".join(f"\n  {count:,} skipped: {reason}"
                                for reason, count in reasons.most_common())
            out.append(line)
        for vendor, why in sorted(self.nothing.items()):
            out.append(f"{vendor}: nothing — {why}")
        if not self.send:
            out.append("Nothing was written. Run again with --send to plan these through the "
                       "outbox; `onetag serve` or `onetag worker` then sends them.")
        elif self.planned:
            out.append("A running `onetag serve` or `onetag worker` sends them (retries and "
                       "all); `onetag deliveries` shows them.")
        return "\n".join(out)


def vendors_without_history(site: Any) -> dict[str, str]:
    """Each of the site's vendors that gets nothing from a backfill, and why."""
    found = {name: why.format(site=site.id) for name, why in NO_HISTORY.items()
             if name in site.vendors}
    for name in HISTORICAL - set(site.vendors):
        found[name] = "not enabled for this site"
    return found


class Backfill:
    """Both passes over the files for one site; ``run`` does them and returns the Summary."""

    def __init__(self, site: Any, paths: list[Path], *, send: bool = False,
                 skip_invalid: bool = False, batch_lines: int = BATCH_LINES,
                 pace: float = DEFAULT_PACE,
                 stream: TextIO | None = None, tty: bool | None = None,
                 every_s: float = PROGRESS_EVERY_S):
        if len(paths) > MAX_FILES:
            raise ValueError(f"{len(paths)} files; the limit is {MAX_FILES} a run")
        self.site = site
        self.paths = paths
        self.send = send
        self.skip_invalid = skip_invalid
        self.batch_lines = max(1, batch_lines)
        if not 0 <= pace <= 60_000:
            raise ValueError(f"--pace {pace:g}: must be 0 (all due at once) to 60,000 a minute")
        self.pace_ms = int(60_000 / pace) if pace else 0
        self.stream = stream
        self.tty = tty
        self.every_s = every_s
        self.now_ms = int(time.time() * 1000)
        self.origin = Origin(site_id=site.id, source="backend", currency=site.currency,
                             received_ms=self.now_ms)
        self.summary = Summary(site.id, send, nothing=vendors_without_history(site),
                               pace_ms=self.pace_ms)
        self.buyers: dict[str, dict[str, Any]] = {}  # order id -> its purchase's user
        self.files_hash = ""

    def _progress(self, label: str, total: int) -> Progress:
        return Progress(label, total, self.stream, self.tty, self.every_s)

    def validate(self) -> bool:
        """Pass 1: every line checked; True when the plan may go ahead."""
        reader = Reader(self.paths)
        total = sum(path.stat().st_size for path in self.paths)
        progress = self._progress("checking", total)
        for unit in reader.units():
            event = self._check(unit)
            if event is not None and event["name"] == "purchase":
                user = event.get("user") or {}
                if user.get("email"):
                    self.buyers.setdefault(event["ecommerce"]["transaction_id"], user)
            progress.update(reader.bytes, reader.lines)
        progress.update(total, reader.lines)
        progress.finish()
        self.summary.lines = reader.lines
        self.files_hash = reader.hash.hexdigest()
        return not self.summary.problems or self.skip_invalid

    def _check(self, unit: Unit) -> dict[str, Any] | None:
        event = check_unit(unit, self.origin)
        if event is not None:
            self.summary.valid += 1
            self.summary.kinds[event["name"]] += 1
            return event
        self.summary.invalid += 1
        self.summary.problems.extend(unit.problems)
        return None

    def events(self) -> Iterator[tuple[Unit, dict[str, Any]]]:
        """Pass 2's input: the valid events again (read anew: a large history is never held
        in memory), an order's status change given its purchase's buyer when it names none."""
        for unit in Reader(self.paths).units():
            event = check_unit(unit, self.origin)
            if event is None:
                continue
            if event["name"] in ("order_status", "refund") and not (
                    event.get("user") or {}).get("email"):
                buyer = self.buyers.get(event["ecommerce"]["transaction_id"])
                if buyer:
                    event["identity"] = dict(buyer)
            yield unit, event

    async def run(self, store: Any = None, existing: Any = None) -> Summary:
        """``store``: where ``--send`` writes; ``existing(vendor, key) -> bool``: what the
        dry run asks of the database (read-only)."""
        summary = self.summary
        if not self.validate():
            return summary
        if self.skip_invalid:
            summary.problems = []  # reported as skipped, not as a refusal
        if not self.send:
            progress = self._progress("planning", summary.lines)
            for unit, event in self.events():
                self._tally(event, existing)
                progress.update(unit.last, unit.last)
            progress.update(summary.lines, summary.lines)
            progress.finish()
            return summary
        files = json.dumps([str(path) for path in self.paths])
        run_id, done, counts = await store.backfill_run(self.site.id, files, self.files_hash,
                                                        summary.lines)
        summary.run_id, summary.resumed_from = run_id, done
        summary.restore(counts)  # what the interrupted run had committed
        progress = self._progress("planning", summary.lines - done)
        pending: list[tuple[Unit, dict[str, Any]]] = []
        first = done
        # One batch in the writer while the next is planned here; batches commit in order.
        writing: asyncio.Future[None] | None = None
        written: dict[tuple[str, str, str], Any] = {}  # the order requests of the batch writing
        for unit, event in self.events():
            if unit.last <= done:  # committed by the interrupted run
                continue
            pending.append((unit, event))
            if unit.last - first >= self.batch_lines:
                batch, skipped, bodies = await self._plan_batch(store, pending, written)
                if writing is not None:
                    await writing
                    progress.update(first - done, first - done)
                writing = asyncio.ensure_future(
                    self._commit(store, run_id, batch, skipped, unit.last, False))
                pending, first, written = [], unit.last, bodies
        batch, skipped, _ = await self._plan_batch(store, pending, written)
        if writing is not None:
            await writing
        await self._commit(store, run_id, batch, skipped, summary.lines, True)
        progress.update(summary.lines - done, summary.lines - done)
        progress.finish()
        return summary

    async def _plan_batch(self, store: Any, pending: list[tuple[Unit, dict[str, Any]]],
                          written: Mapping[tuple[str, str, str], Any]
                          ) -> tuple[list[tuple[Any, ...]], dict[str, Counter],
                                     dict[tuple[str, str, str], Any]]:
        """A batch's rows, its status changes planned with their orders as live ingest plans
        them (``rules.orders_wanted``, ``KnownOrders``): the rows stored under the orders'
        keys (``store.known_orders``), else the purchase the batch still being written
        planned (``written``: not committed yet), else one earlier in this batch. A row
        stored under the key wins: the backfill writes none where one is. Also returns this
        batch's purchases' requests (the next batch's ``written``)."""
        site = self.site
        wanted = rules.orders_wanted({site.id: site}, ((site.id, event) for _, event in pending))
        orders = await store.known_orders(wanted) if wanted else rules.KnownOrders()
        for at in wanted:
            if at not in orders.found and at in written:
                orders.add(*at, False, "pending", written[at])
        batch: list[tuple[Any, ...]] = []
        skipped: dict[str, Counter] = {}
        bodies: dict[tuple[str, str, str], Any] = {}
        for unit, event in pending:
            planned, reasons = plan(site, event, orders)
            if event["name"] == "purchase":
                for p in planned:
                    at = (site.id, p.vendor, p.dedup_key)
                    bodies[at] = p.request
                    if at in orders.wanted and at not in orders.found:
                        orders.add(*at, False, "pending", p.request)
            batch.append((event["event_id"], event["name"], encode(unit.raw), encode(event),
                          [(p.vendor, p.dedup_key, p.visitor, encode(p.request))
                           for p in planned]))
            for vendor, reason in reasons:
                skipped.setdefault(vendor, Counter())[reason] += 1
        return batch, skipped, bodies

    async def _commit(self, store: Any, run_id: int, batch: list[tuple[Any, ...]],
                      skipped: dict[str, Counter], lines_done: int, finished: bool) -> None:
        """One transaction: the batch's events and deliveries, the run's lines done and
        counts. Counted here only once committed."""
        planned, already, known = await store.backfill(
            self.site.id, run_id, batch, {v: dict(c) for v, c in skipped.items()},
            lines_done, finished, self.pace_ms)
        summary = self.summary
        summary.planned.update(planned)
        summary.already.update(already)
        summary.events_known += known
        for vendor, reasons in skipped.items():
            summary.skipped.setdefault(vendor, Counter()).update(reasons)

    def _tally(self, event: dict[str, Any], existing: Any) -> None:
        planned, skipped = plan(self.site, event)
        for vendor, reason in skipped:
            self.summary.skip(vendor, reason)
        for p in planned:
            if existing is not None and existing(p.vendor, p.dedup_key):
                self.summary.already[p.vendor] += 1
            else:
                self.summary.planned[p.vendor] += 1


def existing_keys(database: str, site_id: str) -> Any:
    """``(vendor, key) -> bool`` over a read-only connection: whether a delivery row holds
    that key (the dry run changes nothing, not even the schema). No database: nothing does."""
    import sqlite3

    if database == ":memory:" or not Path(database).is_file():
        def none(vendor: str, key: str) -> bool:
            return False

        none.close = lambda: None  # type: ignore[attr-defined]
        return none
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)

    def exists(vendor: str, key: str) -> bool:
        return conn.execute("SELECT 1 FROM deliveries WHERE site_id = ? AND vendor = ? AND "
                            "dedup_key = ? LIMIT 1", (site_id, vendor, key)).fetchone() is not None

    exists.close = conn.close  # type: ignore[attr-defined]
    return exists


__all__ = ["Backfill", "Progress", "Summary", "csv_units", "existing_keys", "parse_jsonl_line",
           "plan"]
