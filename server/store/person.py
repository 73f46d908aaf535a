"""A shopper's data: everything onetag holds about one person (GDPR Art. 15, ``onetag person
export``) and its erasure (Art. 17, ``onetag person forget``), on both backends.

Written once, for SQLite and PostgreSQL alike: ``gather`` is a generator that yields the
queries it needs (``Query``: SQL with ``?`` placeholders both databases speak) and is sent
their rows, and ``erase`` yields the statements that erase what ``gather`` found. A backend
gives only its ``Dialect`` (a field of stored JSON text, a list bound as one parameter, row
locks) and runs the generator on its connection (``run_sync`` on SQLite's writer
connection, ``run_async`` on aiosqlite's reader or an asyncpg connection).

Who the person is. A selector names them on one site: ``--email`` or ``--customer-id``
finds their identity row; ``--sc`` (the visitor's cookie) finds that session, and through
it the identity it is bound to only if that binding is verified (``sessions.verified``: a
signed identify). Any browser may bind its own session to any email by typing it
(docs/security.md): such a session is not followed (``Person.not_followed`` says so), and
the person is that session alone, its events naming the typed identity included. From the
identity: every session bound to it; the
events of those sessions (anonymous ones included: before the visitor identified), the
events that name the identity without a session (the backend's), and backfilled history,
kept without session or identity and found by the email in the event; the deliveries
planned from those events and their attempts; Remarkety coupon calls naming the email.
Every session and event says how it was found (``found_through``). Events of a session
that name another identity (a shared device on which someone else signed in) are that
person's and are left.

What erasure does, per table (docs/architecture.md, "Shoppers' data"):

- identities, sessions (with their carts), events: deleted (on SQLite, the table's highest
  seq, if it is the person's, stays as an empty event: ``erase`` says why).
- deliveries: every row stays, without the person (its planned request, dedup key, which
  may hold an order id or an email, visitor key and event), so that no delivery id is ever
  given again (SQLite gives a deleted highest id to the next row: a forwarder's late
  outcome, a replay's record or an attempt would then name someone else's delivery). One a
  vendor took (``delivered``; ``browser``: the vendor's own library took it in the page)
  keeps its state and times, the record that this vendor got the person's data then: a
  vendor can't be made to unsend, so the report names those vendors for the operator to
  file the erasure with each. One not sent (pending, held, dead, expired, ignored) is
  closed as ``ignored``, saying why: nothing claims or replays it, so nothing of the
  person is sent after the erasure. Their attempts (the request as sent and the vendor's
  answer, which may echo the person) are deleted.
- coupon calls naming the email: kept for the bridge's record (pruned with the attempts),
  without the email.

A delivery already claimed by a forwarder when the erasure commits (in flight, at most the
forwarder's lease) still reaches the vendor: its vendor is named among those that may have
received the person's data, as is every vendor that was tried and did not answer 2xx. Its
late outcome changes nothing, and its attempt is not kept (both finishes skip a delivery
whose visitor is ``erased``; SQLite's writer, PostgreSQL's ``onetag_finish``, migration
041): it would name the person where nothing finds it again. On PostgreSQL ``gather(lock=
True)`` locks the deliveries (in id order) before reading their attempts, and the finish
first locks its batch's rows, in id order too: one commits first and the other sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, NamedTuple, Sequence

from ..events import SC_RE, email_problem
from ..jsontext import encode, loads

IDENTITY_COLUMNS = ("id", "site_id", "email", "customer_id", "first_name", "last_name", "phone",
                    "accepts_marketing", "created_ms", "updated_ms")
SESSION_COLUMNS = ("id", "site_id", "sc", "identity_id", "first_ms", "last_ms", "user_agent",
                   "last_page", "first_seq", "last_seq", "verified", "cart_id", "cart_guid",
                   "cart_currency", "cart_items", "cart_updated_ms")
EVENT_COLUMNS = ("seq", "site_id", "event_id", "name", "source", "sc", "identity_id",
                 "received_ms", "raw", "data")
DELIVERY_COLUMNS = ("id", "site_id", "vendor", "dedup_key", "claim", "event_seq", "visitor",
                    "state", "request", "attempts", "next_attempt_ms", "last_error",
                    "created_ms", "updated_ms", "delivered_ms", "retry_from_ms", "due_ms",
                    "request_id")
ATTEMPT_COLUMNS = ("id", "delivery_id", "attempt", "started_ms", "duration_ms", "request",
                   "status", "answer", "error")
COUPON_COLUMNS = ("id", "created_ms", "site_id", "request_id", "idempotency_key", "code",
                  "template_id", "expiration", "email", "status", "result", "store_status",
                  "duration_ms", "error")
SENT_STATES = ("delivered", "browser")  # a vendor has it: kept anonymous, vendor named
ERASED_REQUEST = encode({"erased": True}).decode()
CANCELLED = "erased (onetag person forget) before it was sent"
TABLES = {"identities": "id", "sessions": "id", "events": "seq", "deliveries": "id",
          "attempts": "id", "coupon_calls": "id"}  # each table's key
MAX_CUSTOMER_ID = 128
NOT_FOLLOWED = ("the binding is unverified: an email typed in the page, which any browser may "
                "claim for its own session; only a signed identify (user.signature) proves it. "
                "This covers the session's own events and their deliveries; name the person "
                "by --email or --customer-id once the requester is known to be them")


class Query(NamedTuple):
    """One statement: ``?`` placeholders; a ``Many`` parameter is a list bound as one.
    ``write``: answered with its row count, else with its rows as dicts."""

    sql: str
    params: tuple[Any, ...] = ()
    write: bool = False


class Many(NamedTuple):
    """A list bound as one parameter of an ``IN ?`` (``Dialect.bind``)."""

    values: tuple[Any, ...]
    kind: str  # "bigint" | "text"


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends for these queries."""

    name: str
    json_text: Callable[[str, Sequence[str]], str]
    many: Callable[[Many], tuple[str, Any]]  # (``(SELECT ...)`` with one ?, its parameter)
    for_update: str  # appended to a read that locks its rows ("" where the writer's lock holds)
    reuses_ids: bool  # a deleted highest row id is given to the next row (SQLite's rowids)

    def bind(self, query: Query) -> tuple[str, list[Any]]:
        """The query's SQL and parameters, each ``Many`` made one bound parameter."""
        parts = query.sql.split("?")
        if len(parts) != len(query.params) + 1:
            raise ValueError(f"{len(parts) - 1} placeholders for {len(query.params)} params")
        sql, params = [parts[0]], []
        for param, rest in zip(query.params, parts[1:]):
            if isinstance(param, Many):
                fragment, param = self.many(param)
                sql.append(fragment)
            else:
                sql.append("?")
            params.append(param)
            sql.append(rest)
        return "".join(sql), params


def _sqlite_many(many: Many) -> tuple[str, Any]:
    return "(SELECT value FROM json_each(?))", encode(list(many.values)).decode()


def _pg_many(many: Many) -> tuple[str, Any]:
    return f"(SELECT unnest(?::{many.kind}[]))", list(many.values)


SQLITE = Dialect("sqlite", lambda column, path: f"json_extract({column}, '$.{'.'.join(path)}')",
                 _sqlite_many, "", True)
POSTGRESQL = Dialect("postgresql",
                     lambda column, path: f"({column}::json #>> '{{{','.join(path)}}}')",
                     _pg_many, " FOR UPDATE", False)


# The selector ---------------------------------------------------------------------------

class Selector(NamedTuple):
    """One person on one site, by exactly one of email, customer id or sc."""

    site_id: str
    email: str | None = None
    customer_id: str | None = None
    sc: str | None = None

    def describe(self) -> str:
        kind, value = self.named()
        return f"{kind} {value}"

    def named(self) -> tuple[str, str]:
        for kind in ("email", "customer_id", "sc"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        raise ValueError("no selector")


def selector(site_id: str, *, email: str | None = None, customer_id: str | None = None,
             sc: str | None = None) -> Selector:
    """The selector the operator gave, read as events store it (an email trimmed and
    lower-cased), or ``ValueError`` naming the option and what it takes."""
    given = [(name, value) for name, value in (("--email", email), ("--customer-id", customer_id),
                                                ("--sc", sc)) if value is not None]
    if not given:
        raise ValueError("name the person: --email, --customer-id or --sc")
    if len(given) > 1:
        raise ValueError(f"name the person one way: {' and '.join(n for n, _ in given)} given "
                         "(take one of --email, --customer-id, --sc)")
    if email is not None:
        email = email.strip().lower()
        problem = "it is over 254 characters" if len(email) > 254 else email_problem(email)
        if problem:
            raise ValueError(f"--email: not an email address onetag would store: {problem}")
    if customer_id is not None:
        customer_id = customer_id.strip()
        if not 0 < len(customer_id) <= MAX_CUSTOMER_ID or not customer_id.isprintable():
            raise ValueError(f"--customer-id takes 1 to {MAX_CUSTOMER_ID} printable "
                             "characters")
    if sc is not None:
        sc = sc.strip()
        if not SC_RE.fullmatch(sc):
            raise ValueError("--sc takes the visitor's cookie: 8 to 64 letters, digits "
                             "and '-'")
    return Selector(site_id, email, customer_id, sc)


# What is held ---------------------------------------------------------------------------

@dataclass
class Person:
    """The rows ``gather`` found, as stored (JSON columns still text)."""

    selector: Selector
    identities: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    coupon_calls: list[dict[str, Any]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    # Sessions (by ``--sc``) whose identity was not followed: ``NOT_FOLLOWED``.
    not_followed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.identities or self.sessions or self.events or self.coupon_calls)

    def emails(self) -> list[str]:
        found = {row["email"] for row in self.identities if row["email"]}
        if self.selector.email:
            found.add(self.selector.email)
        return sorted(found)

    def sent(self) -> list[dict[str, Any]]:
        return [row for row in self.deliveries if row["state"] in SENT_STATES]

    def unsent(self) -> list[dict[str, Any]]:
        return [row for row in self.deliveries if row["state"] not in SENT_STATES]

    def vendors(self) -> dict[str, list[str]]:
        """``received``: vendors a delivery of the person's reached (delivered, or their
        library took it in the page); ``maybe_received``: vendors tried without a 2xx, or
        with a delivery in flight, that may have kept what they were sent."""
        received = {row["vendor"] for row in self.sent()}
        maybe = {row["vendor"] for row in self.unsent() if row["attempts"]} - received
        return {"received": sorted(received), "maybe_received": sorted(maybe)}

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per table and what erasure does to them."""
        return {"identities": {"delete": len(self.identities)},
                "sessions": {"delete": len(self.sessions)},
                "events": {"delete": len(self.events)},
                "deliveries": {"anonymise": len(self.sent()), "cancel": len(self.unsent())},
                "attempts": {"delete": len(self.attempts)},
                "coupon_calls": {"anonymise": len(self.coupon_calls)}}


def _columns(columns: Sequence[str]) -> str:
    return ", ".join(columns)


class Scanned(NamedTuple):
    """The events naming ``identities`` that a read before the write transaction found
    (``seqs``) when the highest seq was ``high``: the transaction reads those again by seq,
    and the later ones by range, instead of every event under the writer's lock (SQLite)."""

    high: int
    identities: tuple[int, ...]
    seqs: tuple[int, ...]


def scanned(person: Person, high: int) -> Scanned:
    ids = tuple(sorted(row["id"] for row in person.identities))
    return Scanned(high, ids, tuple(row["seq"] for row in person.events
                                    if row["identity_id"] in ids))


def gather(d: Dialect, who: Selector, lock: bool = False, hint: Scanned | None = None
           ) -> Generator[Query, Any, Person]:
    """Everything held about ``who`` (module docstring). ``lock``: the sessions and
    identities found are read again locked, in the order ingest locks them (sessions by
    (site_id, sc), then identities by id), before their events are read (PostgreSQL).
    ``hint``: ``Scanned`` by an earlier read; used when it names the same identities."""
    person = Person(who)
    site = who.site_id
    identity_sql = f"SELECT {_columns(IDENTITY_COLUMNS)} FROM identities WHERE site_id = ? AND "
    session_sql = f"SELECT {_columns(SESSION_COLUMNS)} FROM sessions WHERE site_id = ? AND "
    how: dict[int, str] = {}  # session id -> how it was found
    own: dict[int, int] = {}  # session id -> the identity its unverified binding names
    sessions: dict[int, dict[str, Any]] = {}
    if who.email is not None:
        person.identities = yield Query(identity_sql + "email = ?", (site, who.email))
    elif who.customer_id is not None:
        person.identities = yield Query(identity_sql + "customer_id = ?",
                                        (site, who.customer_id))
    else:
        for row in (yield Query(session_sql + "sc = ?", (site, who.sc))):
            sessions[row["id"]] = row
            how[row["id"]] = f"sc {who.sc}"
            person.links.append(f"sc {who.sc} -> session #{row['id']}")
            if row["identity_id"] is None:
                continue
            if not row["verified"]:
                # Any browser may bind its own session to any email by typing it
                # (docs/security.md): the cookie proves nothing about that identity.
                own[row["id"]] = row["identity_id"]
                person.not_followed.append({"session": row["id"], "sc": row["sc"],
                                            "identity": row["identity_id"],
                                            "why": NOT_FOLLOWED})
                person.links.append(f"session #{row['id']} -> bound to identity "
                                    f"#{row['identity_id']}: not followed (unverified)")
                continue
            person.identities = yield Query(identity_sql + "id = ?",
                                            (site, row["identity_id"]))
            for identity in person.identities:
                person.links.append(f"session #{row['id']} -> bound to identity "
                                    f"#{identity['id']} (verified)")
    kind, value = who.named()
    for identity in person.identities:
        if who.sc is None:
            person.links.append(f"{kind} {value} -> identity #{identity['id']}")
        bound = yield Query(session_sql + "identity_id = ? ORDER BY id", (site, identity["id"]))
        for row in bound:
            if row["id"] not in sessions:
                sessions[row["id"]] = row
                how[row["id"]] = f"bound to identity #{identity['id']}"
                person.links.append(f"identity #{identity['id']} -> session #{row['id']} "
                                    f"(sc {row['sc']})")
    ids = [row["id"] for row in person.identities]
    if lock and d.for_update:
        keys = sorted((row["sc"], row["id"]) for row in sessions.values())
        if keys:
            relocked = yield Query(f"SELECT {_columns(SESSION_COLUMNS)} FROM sessions "
                                   "WHERE id IN ? ORDER BY site_id, sc" + d.for_update,
                                   (Many(tuple(i for _, i in keys), "bigint"),))
            sessions = {row["id"]: row for row in relocked}  # as they are now
        if ids:
            person.identities = yield Query(
                f"{identity_sql}id IN ? ORDER BY id{d.for_update}",
                (site, Many(tuple(ids), "bigint")))
    person.sessions = [{**row, "found_through": how[row["id"]]}
                       for row in sorted(sessions.values(), key=lambda r: r["id"])]

    events: dict[int, dict[str, Any]] = {}

    def keep(rows: list[dict[str, Any]], through: str) -> None:
        for row in rows:
            events.setdefault(row["seq"], {**row, "found_through": through})

    event_sql = f"SELECT {_columns(EVENT_COLUMNS)} FROM events WHERE "
    for session in person.sessions:
        if session["last_seq"] is None:
            continue
        # The session row's seq bounds (SQLite migration 003): no index on (site, sc).
        # A session not followed to its identity: its own events naming that identity
        # (what it did after the typed email) are its own data too.
        named = (*ids, own[session["id"]]) if session["id"] in own else tuple(ids)
        rows = yield Query(event_sql + "seq BETWEEN ? AND ? AND site_id = ? AND sc = ? AND "
                           "(identity_id IS NULL OR identity_id IN ?) ORDER BY seq",
                           (session["first_seq"] or 0, session["last_seq"], site, session["sc"],
                            Many(named, "bigint")))
        keep(rows, f"session #{session['id']} (sc {session['sc']})")
    if ids and hint is not None and hint.identities == tuple(sorted(ids)):
        if hint.seqs:
            keep((yield Query(event_sql + "seq IN ? AND identity_id IN ? ORDER BY seq",
                              (Many(hint.seqs, "bigint"), Many(tuple(ids), "bigint")))),
                 "identity")
        keep((yield Query(event_sql + "seq > ? AND site_id = ? AND identity_id IN ? "
                          "ORDER BY seq", (hint.high, site, Many(tuple(ids), "bigint")))),
             "identity")
    elif ids:
        # Events naming the identity: the backend's without a session, and those of a
        # session since bound to someone else. No index takes identity_id alone: this
        # reads the site's events once (a rare, operator-run command; SQLite does it
        # before its write transaction: ``Scanned``).
        rows = yield Query(event_sql + "site_id = ? AND identity_id IN ? ORDER BY seq",
                           (site, Many(tuple(ids), "bigint")))
        keep(rows, "identity")
    history = ("sc IS NULL AND identity_id IS NULL AND site_id = ? AND coalesce("
               f"{d.json_text('data', ('user', 'email'))}, "
               f"{d.json_text('data', ('identity', 'email'))}) = ? ORDER BY seq")
    emails = person.emails()
    for email in emails:
        # Backfilled history (`onetag backfill`): kept without session or identity, found
        # by its email through events_history_email (SQLite 019, PostgreSQL 029).
        keep((yield Query(event_sql + history, (site, email))), f"history of {email}")
    person.events = [events[seq] for seq in sorted(events)]
    for through in sorted({row["found_through"] for row in person.events}):
        person.links.append(f"{through} -> "
                            f"{sum(row['found_through'] == through for row in person.events)} "
                            "events")

    seqs = tuple(sorted(events))
    if seqs:
        # Locked (PostgreSQL) before their attempts are read: a forwarder's finish locks
        # its batch's rows first, in id order as here (pg_migrations/041), so it either
        # committed before, and its attempt is read here, or waits and then finds the row
        # erased.
        person.deliveries = yield Query(
            f"SELECT {_columns(DELIVERY_COLUMNS)} FROM deliveries WHERE event_seq IN ? "
            "ORDER BY id" + (d.for_update if lock else ""), (Many(seqs, "bigint"),))
    delivery_ids = tuple(row["id"] for row in person.deliveries)
    if delivery_ids:
        person.attempts = yield Query(
            f"SELECT {_columns(ATTEMPT_COLUMNS)} FROM attempts WHERE delivery_id IN ? "
            "ORDER BY id", (Many(delivery_ids, "bigint"),))
    if emails:
        person.coupon_calls = yield Query(
            f"SELECT {_columns(COUPON_COLUMNS)} FROM coupon_calls WHERE site_id = ? AND "
            "email IN ? ORDER BY id", (site, Many(tuple(emails), "text")))
    return person


def erase(d: Dialect, person: Person, now_ms: int
          ) -> Generator[Query, Any, dict[str, dict[str, int]]]:
    """The statements that erase what ``gather`` found (module docstring), children first;
    the rows each changed, per table, as ``Person.counts`` names them."""
    done = {table: dict.fromkeys(actions, 0) for table, actions in person.counts().items()}

    def ids(rows: list[dict[str, Any]], column: str = "id") -> Many:
        return Many(tuple(row[column] for row in rows), "bigint")

    def run(table: str, action: str, rows: list[dict[str, Any]], sql: str,
            *params: Any) -> Generator[Query, Any, None]:
        if rows:
            done[table][action] += yield Query(sql, (*params, ids(rows, TABLES[table])),
                                               write=True)

    yield from run("attempts", "delete", person.attempts, "DELETE FROM attempts WHERE id IN ?")
    # Every delivery row stays, without the person: no id is given again (SQLite gives a
    # deleted highest id to the next row, and a forwarder's late outcome, or a replay's
    # record, would then name someone else's delivery); ``event_seq`` 0, as a row planned
    # from no event. A row not sent is closed as ignored, which nothing claims or replays.
    anonymous = ("request = ?, dedup_key = 'erased:' || id, visitor = 'erased', "
                 "event_seq = 0, updated_ms = ?")
    yield from run("deliveries", "anonymise", person.sent(),
                   f"UPDATE deliveries SET {anonymous}, last_error = NULL WHERE id IN ?",
                   ERASED_REQUEST, now_ms)
    yield from run("deliveries", "cancel", person.unsent(),
                   f"UPDATE deliveries SET {anonymous}, state = 'ignored', last_error = ? "
                   "WHERE id IN ?", ERASED_REQUEST, now_ms, CANCELLED)
    events = person.events
    if events and d.reuses_ids:
        # The highest seq of the table, if it is the person's, stays as an empty row, or
        # SQLite would give it to the next event (the console's Live follows seqs).
        [top] = yield Query("SELECT max(seq) AS seq FROM events")
        kept = [row for row in events if row["seq"] == top["seq"]]
        yield from run("events", "delete", kept,
                       "UPDATE events SET event_id = 'erased:' || seq, name = 'erased', "
                       "sc = NULL, identity_id = NULL, raw = '{}', data = ? WHERE seq IN ?",
                       ERASED_REQUEST)
        events = [row for row in events if row["seq"] != top["seq"]]
    yield from run("events", "delete", events, "DELETE FROM events WHERE seq IN ?")
    yield from run("sessions", "delete", person.sessions, "DELETE FROM sessions WHERE id IN ?")
    yield from run("identities", "delete", person.identities,
                   "DELETE FROM identities WHERE id IN ?")
    yield from run("coupon_calls", "anonymise", person.coupon_calls,
                   "UPDATE coupon_calls SET email = NULL WHERE id IN ?")
    return done


# Running the generators -----------------------------------------------------------------

def run_sync(steps: Generator[Query, Any, Any], execute: Callable[[Query], Any]) -> Any:
    """Drive ``steps``, answering each query with ``execute(query)``; its result."""
    try:
        query = next(steps)
        while True:
            query = steps.send(execute(query))
    except StopIteration as stop:
        return stop.value


async def run_async(steps: Generator[Query, Any, Any], execute: Any) -> Any:
    """``run_sync`` with an ``async`` ``execute``."""
    try:
        query = next(steps)
        while True:
            query = steps.send(await execute(query))
    except StopIteration as stop:
        return stop.value


def sqlite_execute(conn: Any) -> Callable[[Query], Any]:
    """``execute`` on a ``sqlite3`` connection (the writer's)."""
    def execute(query: Query) -> Any:
        sql, params = SQLITE.bind(query)
        cursor = conn.execute(sql, params)
        if query.write:
            return cursor.rowcount
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    return execute


def aiosqlite_execute(db: Any) -> Callable[[Query], Any]:
    """``execute`` on an aiosqlite connection (the store's reader): reads only."""
    async def execute(query: Query) -> Any:
        assert not query.write
        sql, params = SQLITE.bind(query)
        cursor = await db.execute(sql, params)
        try:
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in await cursor.fetchall()]
        finally:
            await cursor.close()
    return execute


def asyncpg_execute(conn: Any) -> Callable[[Query], Any]:
    """``execute`` on an asyncpg connection: ``?`` numbered ``$1``, ``$2``, ..."""
    from .pg_console import numbered

    async def execute(query: Query) -> Any:
        sql, params = POSTGRESQL.bind(query)
        if query.write:
            status = await conn.execute(numbered(sql), *params)
            return int(status.split()[-1])
        return [dict(row) for row in await conn.fetch(numbered(sql), *params)]
    return execute


# The forget job's answer, and the export document ----------------------------------------

def forget_report(person: Person, dry_run: bool, done: dict[str, dict[str, int]] | None
                  ) -> dict[str, Any]:
    """What ``Store.forget_person`` answers: plain data (it crosses the writer's pipe)."""
    return {"site": person.selector.site_id, "selector": dict(zip(("kind", "value"),
                                                                  person.selector.named())),
            "found": person.found, "dry_run": dry_run, "links": person.links,
            "would_change" if dry_run else "changed": person.counts() if dry_run else done,
            "vendors": person.vendors(),
            "sessions": [row["sc"] for row in person.sessions],
            "not_followed": person.not_followed}


def export_document(person: Person, now_ms: int) -> dict[str, Any]:
    """Everything held about the person as one JSON-able document (``onetag person
    export``): stored JSON parsed, each attempt's request with its body put back."""
    from ..sessions import cart_snapshot
    from .sqlite import with_body

    sessions = []
    for row in person.sessions:
        item = {key: row[key] for key in SESSION_COLUMNS if not key.startswith("cart_")}
        item["cart"] = (cart_snapshot(loads(row["cart_items"]), row["cart_currency"],
                                      row["cart_guid"], row["cart_id"])
                        if row["cart_items"] is not None else None)
        item["found_through"] = row["found_through"]
        sessions.append(item)
    events = [{**{key: row[key] for key in EVENT_COLUMNS if key not in ("raw", "data")},
               "raw": loads(row["raw"]), "data": loads(row["data"]),
               "found_through": row["found_through"]} for row in person.events]
    planned = {row["id"]: loads(row["request"]) for row in person.deliveries}
    attempts: dict[int, list[dict[str, Any]]] = {}
    for row in person.attempts:
        attempts.setdefault(row["delivery_id"], []).append({
            **{key: row[key] for key in ATTEMPT_COLUMNS if key not in ("request", "answer")},
            "request": with_body(loads(row["request"]), planned.get(row["delivery_id"], {})),
            "answer": None if row["answer"] is None else loads(row["answer"])})
    deliveries = [{**{key: row[key] for key in DELIVERY_COLUMNS if key != "request"},
                   "request": planned[row["id"]], "attempts_kept": attempts.get(row["id"], [])}
                  for row in person.deliveries]
    kind, value = person.selector.named()
    return {"site": person.selector.site_id, "selector": {"kind": kind, "value": value},
            "exported_ms": now_ms, "links": person.links,
            "not_followed": person.not_followed,
            "vendors": person.vendors(),
            "identities": [dict(row) for row in person.identities],
            "sessions": sessions, "events": events, "deliveries": deliveries,
            "coupon_calls": [dict(row) for row in person.coupon_calls],
            "counts": {"identities": len(person.identities), "sessions": len(sessions),
                       "events": len(events), "deliveries": len(deliveries),
                       "attempts": len(person.attempts),
                       "coupon_calls": len(person.coupon_calls)}}
