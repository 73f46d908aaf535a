"""The browser's request body — ``{site_id, sc, events: [...]}`` — read into what to store.

Reading a body (parse, find the site, check the origin, choose the visitor's ``sc``,
validate and normalise every event) is pure CPU work with no I/O. The endpoint does not do
it on the event loop: it hands the bytes to the store (``Store.ingest_browser``), whose
writer reads them on its own core and stores them in the same step (``bench/ingest.py``:
the loop's time per request was the limit on throughput). The answer is the batch's
results, or a ``Problem`` the endpoint turns into its 4xx.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from . import events as vocabulary
from .events import Invalid, Origin
from .sessions import new_sc, valid_sc

MAX_BATCH_EVENTS = 500


class Problem(NamedTuple):
    """Why a request is refused, as its 4xx answer names it (a tuple: it crosses the pipe)."""

    status: int
    error: str
    field: str
    problem: str

    @classmethod
    def invalid(cls, exc: Invalid) -> Problem:
        if exc.field == "body":
            return cls(400, "invalid_json", exc.field, exc.problem)
        return cls(422, "invalid_event", exc.field, exc.problem)


class Refused(Exception):
    """A ``Problem`` raised."""

    def __init__(self, problem: Problem):
        super().__init__(f"{problem.field}: {problem.problem}")
        self.problem = problem


class BrowserFacts(NamedTuple):
    """What the endpoint knows of a browser request besides its body."""

    origin: str | None  # the Origin header
    cookie_sc: str | None  # the sc cookie the request carried
    user_agent: str | None
    received_ms: int


class BrowserBatch(NamedTuple):
    site_id: str
    sc: str  # the visitor's: from the body, else the cookie, else new
    events: list[dict[str, Any]]  # normalised
    raws: list[Any]  # as sent


def event_list(value: Any, field: str) -> list[Any]:
    """The events of a body: a non-empty list of at most ``MAX_BATCH_EVENTS``."""
    if not isinstance(value, list):
        raise Refused(Problem(422, "invalid_event", field, "must be a list of events"))
    if not value:
        raise Refused(Problem(422, "invalid_event", field, "must not be empty"))
    if len(value) > MAX_BATCH_EVENTS:
        raise Refused(Problem(413, "too_large", field, f"has {len(value)} events; the limit is "
                              f"{MAX_BATCH_EVENTS} a request"))
    return value


def _unsigned(raws: list[Any]) -> list[Any]:
    """The events as sent, to store, without ``user.signature``: it is a bearer credential
    for that email (docs/security.md), and the database need not hold one."""
    unsigned = []  # a loop, not a comprehension: see events.normalise_batch
    for raw in raws:
        unsigned.append(_without_signature(raw) if isinstance(raw, dict) and "user" in raw
                        else raw)
    return unsigned


def _without_signature(raw: dict[str, Any]) -> dict[str, Any]:
    user = raw["user"]
    if isinstance(user, dict) and "signature" in user:
        return {**raw, "user": {k: v for k, v in user.items() if k != "signature"}}
    return raw


def read_browser_body(data: bytes, facts: BrowserFacts,
                      sites: Mapping[str, Any]) -> BrowserBatch | Problem:
    """The batch a browser body asks to store, or why it may not be stored."""
    try:
        body = vocabulary.parse_json(data)
        if not isinstance(body, dict):
            return Problem(422, "invalid_event", "body",
                           "must be an object {site_id, sc, events: [...]}")
        site_id = body.get("site_id")
        site = sites.get(site_id) if isinstance(site_id, str) else None
        if site is None:
            return Problem(404, "unknown_site", "site_id", f"no site {vocabulary.echo(site_id)} here")
        if facts.origin and facts.origin not in site.origins:
            return Problem(403, "origin_not_allowed", "origin",
                           f"{vocabulary.echo(facts.origin, 100)} is not in this site's origins")
        sent_sc = body.get("sc")
        sc = (valid_sc(sent_sc if isinstance(sent_sc, str) else None)
              or valid_sc(facts.cookie_sc) or new_sc())
        raws = event_list(body.get("events"), "events")
        # Positional (site_id, source, currency, received_ms, sc, identity_secret): a fifth
        # fewer instructions than by keyword, for an object made for every request.
        origin = Origin(site.id, "browser", site.currency, facts.received_ms, sc,
                        site.identity_secret)
        events = vocabulary.normalise_batch(raws, "events", origin, data)
        return BrowserBatch(site.id, sc, events, _unsigned(raws))
    except Invalid as exc:
        return Problem.invalid(exc)
    except Refused as exc:
        return exc.problem
