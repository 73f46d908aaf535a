"""Each request gets its own answer, even beside one that fails (issue 10).

Once a frame to the writer process failed (a backend property nested 500+ deep did not
pickle), every later reply went to the request queued after it: visitors got each other's
``sc`` cookie, an unknown site's body got a 204 with nothing stored, a valid body a 422 and
yet stored. Here a failing request and the requests after it are sent at once, on their own
connections, so they share the writer's group commits, against a real ``onetag serve``
(the writer in its own process); each answer must be that request's own.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import contextlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_faults import BROWSER_HEADERS, SITE, serving

pytestmark = pytest.mark.slow

ROUNDS = 5  # a race lost once is a bug: a few rounds make losing it likely


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value


def deep_backend_body() -> bytes:
    """A backend event whose property nests 600 deep: refused by the depth limit now."""
    return json.dumps([{"event": "c_deep", "event_id": str(uuid.uuid4()),
                        "user": {"email": "deep@shop.example"}, "p": nested(600)}]).encode()


def writer_failing_browser_body() -> bytes:
    """A browser body read in the writer, which a lone surrogate used to fail there."""
    return (b'{"site_id": "shop1", "events": [{"event": "page_view", "event_id": "%s", '
            b'"page": {"title": "\\ud800"}}]}' % str(uuid.uuid4()).encode())


BAD = {"backend nested 600 deep": ("backend", deep_backend_body),
       "browser surrogate read in the writer": ("browser", writer_failing_browser_body)}


async def one_round(client: httpx.AsyncClient, kind: str, bad_body: bytes) -> dict[str, Any]:
    visitors = [(str(uuid.uuid4()).upper(), str(uuid.uuid4())) for _ in range(4)]

    async def bad() -> httpx.Response:
        if kind == "backend":
            return await client.post(f"/api/v1/sites/{SITE}/events", content=bad_body,
                                     headers={"content-type": "application/json",
                                              "authorization": "Bearer " + "k" * 16})
        return await client.post("/e", content=bad_body, headers=BROWSER_HEADERS)

    async def good(sc: str, event_id: str) -> httpx.Response:
        await asyncio.sleep(0)  # after the bad one is on its way
        body = {"site_id": SITE, "sc": sc, "events": [{"event": "page_view", "event_id": event_id}]}
        return await client.post("/e", content=json.dumps(body), headers=BROWSER_HEADERS)

    async def unknown_site(event_id: str) -> httpx.Response:
        await asyncio.sleep(0)
        body = {"site_id": "nosuch", "events": [{"event": "page_view", "event_id": event_id}]}
        return await client.post("/e", content=json.dumps(body), headers=BROWSER_HEADERS)

    stray = str(uuid.uuid4())
    answers = await asyncio.gather(bad(), *(good(sc, event_id) for sc, event_id in visitors),
                                   unknown_site(stray))
    return {"bad": answers[0], "good": list(zip(visitors, answers[1:5])),
            "unknown": (stray, answers[5])}


def stored(db: Path) -> dict[str, str | None]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return dict(conn.execute("SELECT event_id, sc FROM events"))


@pytest.mark.parametrize("case", list(BAD))
def test_a_failing_request_does_not_shift_the_answers_of_the_ones_after_it(tmp_path: Path,
                                                                          case: str) -> None:
    kind, make_bad = BAD[case]
    with serving(tmp_path) as serve:
        async def run() -> list[dict[str, Any]]:
            # One connection a request: the requests of a round are in flight together.
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=serve.base, timeout=30, limits=limits) as client:
                return [await one_round(client, kind, make_bad()) for _ in range(ROUNDS)]

        rounds = asyncio.run(run())
        rows = stored(serve.db)
        for number, result in enumerate(rounds):
            bad = result["bad"]
            assert 400 <= bad.status_code < 500, f"round {number}: bad request answered " \
                f"{bad.status_code} {bad.text[:200]}"
            assert bad.json()["errors"][0]["field"], bad.text
            for (sc, event_id), answer in result["good"]:
                assert answer.status_code == 204, f"round {number}: {answer.status_code} " \
                    f"{answer.text[:200]}"
                cookie = answer.headers["set-cookie"].split(";", 1)[0]
                assert cookie == f"sc={sc}", f"round {number}: sent sc {sc}, got {cookie}"
                assert rows.get(event_id) == sc, f"round {number}: {event_id} stored as " \
                    f"{rows.get(event_id)!r}, not under {sc}"
            stray, answer = result["unknown"]
            assert answer.status_code == 404, f"round {number}: unknown site answered " \
                f"{answer.status_code}"
            assert answer.json()["errors"][0]["field"] == "site_id"
            assert stray not in rows, f"round {number}: an unknown site's event was stored"
        serve.terminate()  # and the server still stops
