"""``GET /metrics`` over real HTTP (uvicorn on loopback, a real SQLite file, its writer
process, the fake vendors): who may read it, that it parses, and that its figures follow
what happened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from typing import Any

import httpx
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from server import config
from server.events import EVENT_NAME_RE, STANDARD
from server.metrics import REASONS, Metrics, status_class
from server.store.sqlite_writer import ProcessWriter

from fakes.harness import (API_KEY, ORIGIN, SECRETS, SITE, item, purchase, serve, settings_data,
                           until)

ADMIN = "admin-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {ADMIN}"}


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(found: dict[str, Any], metric: str, sample: str = "", /, **labels: str) -> float:
    """The sum of family ``metric``'s samples called ``metric + sample`` whose labels
    include ``labels`` (0 if there are none)."""
    family = found.get(metric)
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name == metric + sample
               and all(s.labels.get(k) == v for k, v in labels.items()))


def make(tmp_path, fake, *, admin: str | None = ADMIN, public: bool | None = None,
         forward: bool = False, only: tuple[str, ...] = ("sendlane",)) -> config.Settings:
    data = settings_data(tmp_path, fake, only=only, forward=forward)
    if admin is not None:
        data["server"]["admin_token"] = admin
    if public is not None:
        data["server"]["metrics_public"] = public
    return config.parse(data, env={})


async def scrape(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics", headers=BEARER)
    assert response.status_code == 200, response.text
    return families(response.text)


async def poll(client: httpx.AsyncClient, condition: Any, what: str,
               timeout: float = 60.0) -> dict[str, Any]:
    """Scrape until ``condition(families)`` holds (a generous deadline: 2 noisy cores)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await scrape(client)
        if condition(found):
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def post_browser(client: httpx.AsyncClient, events: list[dict], *, site: str = SITE,
                       origin: str = ORIGIN, content: bytes | None = None,
                       content_type: str = "text/plain") -> httpx.Response:
    body = content if content is not None else json.dumps(
        {"site_id": site, "sc": "SC-METRICS-0001", "events": events}).encode()
    return await client.post("/e", content=body,
                             headers={"content-type": content_type, "origin": origin})


async def post_backend(client: httpx.AsyncClient, events: Any, key: str | None = API_KEY
                       ) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return await client.post(f"/api/v1/sites/{SITE}/events", json=events, headers=headers)


# Who may read it ---------------------------------------------------------------------------


async def test_bearer_admin_token_is_required(tmp_path, fake) -> None:
    async with serve(make(tmp_path, fake)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN},
                        {"Authorization": f"Basic {ADMIN}"},
                        {"Authorization": f"Bearer {ADMIN}x"}):
            refused = await client.get("/metrics", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.json()["errors"][0]["field"] == "authorization"
            assert "onetag_" not in refused.text and ADMIN not in refused.text
        ok = await client.get("/metrics", headers=BEARER)
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/plain; version=")
        found = families(ok.text)
    for name in ("onetag_events_received", "onetag_requests_rejected",
                 "onetag_ingest_duration_seconds", "onetag_writer_transaction_jobs",
                 "onetag_writer_restarts", "onetag_deliveries",
                 "onetag_vendor_request_duration_seconds", "onetag_outbox_deliveries",
                 "onetag_outbox_oldest_pending_age_seconds"):
        assert name in found, name
    assert found["onetag_events_received"].type == "counter"
    assert found["onetag_ingest_duration_seconds"].type == "histogram"
    assert found["onetag_outbox_deliveries"].type == "gauge"


async def test_public_mode_needs_no_token(tmp_path, fake) -> None:
    async with serve(make(tmp_path, fake, admin=None, public=True)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert "onetag_outbox_deliveries" in families(response.text)


async def test_without_a_token_metrics_are_off_and_say_how_to_turn_them_on(tmp_path,
                                                                           fake) -> None:
    async with serve(make(tmp_path, fake, admin=None)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            response = await client.get("/metrics", headers=headers)
            assert response.status_code == 404
            message = response.json()["message"]
            assert "admin_token" in message and "metrics_public = true" in message
            assert "onetag_" not in response.text


def test_metrics_public_is_parsed_and_validated(tmp_path, fake) -> None:
    assert make(tmp_path, fake).server.metrics_public is False
    assert make(tmp_path, fake, public=True).server.metrics_public is True
    data = settings_data(tmp_path, fake)
    data["server"]["metrics_public"] = "yes"
    with pytest.raises(config.ConfigError) as caught:
        config.parse(data, env={})
    assert "server.metrics_public: must be true or false" in str(caught.value)
    data["server"] = {**data["server"], "metrics_publc": True}
    del data["server"]["metrics_public"]
    with pytest.raises(config.ConfigError) as caught:
        config.parse(data, env={})
    assert "did you mean 'metrics_public'" in str(caught.value)


# Figures follow what happened --------------------------------------------------------------


async def test_counters_move_as_events_arrive(tmp_path, fake) -> None:
    async with serve(make(tmp_path, fake)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        before = await scrape(client)
        assert value(before, "onetag_events_received", "_total") == 0
        # Accepted: 3 browser requests (4 events, one custom), 1 backend request (2 events).
        stored = [
            await post_browser(client, [{"event": "page_view", "event_id": "pv-1"}]),
            await post_browser(client, [
                {"event": "add_to_cart", "event_id": "atc-1", "ecommerce": {"items": [item()]}},
                {"event": "wishlist_shared_on_tuesday", "event_id": "custom-1"}]),
            await post_browser(client, [{"event": "page_view", "event_id": "pv-1"}]),  # again
        ]
        assert [r.status_code for r in stored] == [204, 204, 204]
        accepted = await post_backend(client, [purchase("1001"), purchase("1002")])
        assert accepted.status_code == 202
        # Refused, each for its own reason.
        refusals = {
            "invalid_json": await post_browser(client, [], content=b"{not json"),
            "unknown_site": await post_browser(client, [{"event": "page_view",
                                                         "event_id": "x"}], site="nope"),
            "origin_not_allowed": await post_browser(client, [{"event": "page_view",
                                                               "event_id": "y"}],
                                                     origin="https://evil.example"),
            "unsupported_media_type": await post_browser(client, [], content=b"{}",
                                                         content_type="image/png"),
            "invalid_event": await post_browser(client, [{"event": "page_view"}]),
        }
        backend_refusals = {
            "unauthorized": await post_backend(client, [purchase("1003")], key=None),
            "forbidden": await post_backend(client, [purchase("1004")], key="not-the-key"),
            "invalid_event": await post_backend(client, [{"event": "purchase"}]),
        }
        for reason, response in {**refusals, **backend_refusals}.items():
            assert response.status_code in (400, 401, 403, 404, 415, 422), (reason, response.text)
            assert response.json()["error"] == reason
        found = await scrape(client)
        commits = app.state.store.commits  # the writer's own count of transactions

    received = lambda **labels: value(found, "onetag_events_received", "_total", **labels)
    assert received(site=SITE, source="browser", name="page_view") == 2
    assert received(site=SITE, source="browser", name="add_to_cart") == 1
    assert received(site=SITE, source="browser", name="custom") == 1
    assert received(name="wishlist_shared_on_tuesday") == 0  # not a label of its own
    assert received(site=SITE, source="backend", name="purchase") == 2
    assert received() == 6
    rejected = lambda **labels: value(found, "onetag_requests_rejected", "_total", **labels)
    for reason in refusals:
        assert rejected(source="browser", reason=reason) == 1, reason
    for reason in backend_refusals:
        assert rejected(source="backend", reason=reason) == 1, reason
    assert rejected() == len(refusals) + len(backend_refusals)
    histogram = "onetag_ingest_duration_seconds"
    assert value(found, histogram, "_count", source="browser") == 3
    assert value(found, histogram, "_count", source="backend") == 1
    assert value(found, histogram, "_sum", source="browser") > 0
    assert value(found, histogram, "_bucket", source="browser", le="+Inf") == 3
    # Every job the writer got is in one counted transaction: the 3 stored browser bodies,
    # the 3 the writer refused (bad JSON, unknown site, wrong origin) and the invalid
    # event, and the backend request (the others were refused before the store; one wrong
    # api key from an address is counted in memory only, auth.SHARE_AFTER).
    assert value(found, "onetag_writer_transaction_jobs", "_sum") == 8
    assert 1 <= value(found, "onetag_writer_transaction_jobs", "_count") == commits


async def test_deliveries_and_vendor_latency_move_with_forwarding(tmp_path, fake) -> None:
    fake.fail("sendlane", 500, body='{"error": "boom"}')  # the first try; then 200s
    fake.fail("rejoiner", 400, times=None)  # permanent: dead at once
    settings = make(tmp_path, fake, forward=True, only=("sendlane", "rejoiner"))
    async with serve(settings) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        assert (await post_backend(client, [purchase("2001")])).status_code == 202

        app.state.metrics.store_collector.cache_s = 0  # every scrape reads the database
        found = await poll(client, lambda found: (
            value(found, "onetag_deliveries", "_total", vendor="sendlane", state="delivered")
            and value(found, "onetag_outbox_deliveries", vendor="sendlane", state="pending") == 0
            and value(found, "onetag_outbox_deliveries", vendor="rejoiner", state="dead")),
            what="sendlane delivered and rejoiner dead")
    sendlane = fake.requests("sendlane")
    rejoiner = fake.requests("rejoiner")
    deliveries = lambda **labels: value(found, "onetag_deliveries", "_total", **labels)
    assert deliveries(vendor="sendlane", state="pending", status_class="5xx") == 1
    assert deliveries(vendor="sendlane", state="delivered", status_class="2xx") == len(sendlane) - 1
    assert deliveries(vendor="rejoiner", state="dead", status_class="4xx") == len(rejoiner) >= 1
    assert deliveries(status_class="none") == 0
    latency = "onetag_vendor_request_duration_seconds"
    assert value(found, latency, "_count", vendor="sendlane") == len(sendlane)
    assert value(found, latency, "_count", vendor="rejoiner") == len(rejoiner)
    assert value(found, latency, "_sum", vendor="sendlane") > 0
    assert value(found, "onetag_outbox_deliveries", vendor="rejoiner", state="dead") == len(rejoiner)


async def test_outbox_gauges_are_the_rows_in_the_database(tmp_path, fake) -> None:
    settings = make(tmp_path, fake, only=("sendlane", "rejoiner", "remarkety"))  # no forwarder
    db = tmp_path / "onetag.db"
    async with serve(settings) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        collector = app.state.metrics.store_collector
        collector.cache_s = 3600.0  # the next scrapes share one read
        empty = await scrape(client)
        for vendor in ("sendlane", "rejoiner", "remarkety"):  # configured: 0, not absent
            assert value(empty, "onetag_outbox_deliveries", vendor=vendor, state="pending") == 0
            assert value(empty, "onetag_outbox_oldest_pending_age_seconds", vendor=vendor) == 0
        reads = collector.reads
        assert (await post_backend(client, [purchase("3001"), purchase("3002")])).status_code == 202
        assert (await post_browser(client, [{"event": "add_to_cart", "event_id": "anon-1",
                                             "ecommerce": {"items": [item()]}}])).status_code == 204
        with sqlite3.connect(db) as conn:  # one row made dead, as the forwarder would
            conn.execute("UPDATE deliveries SET state = 'dead' WHERE id = (SELECT min(id) "
                         "FROM deliveries WHERE state = 'pending')")
        cached = await scrape(client)
        assert collector.reads == reads  # within the cache: the database was not read
        assert value(cached, "onetag_outbox_deliveries") == 0
        collector.cache_s = 0.0
        found = await scrape(client)
        assert collector.reads == reads + 1
    with sqlite3.connect(db) as conn:
        counts = conn.execute("SELECT vendor, state, count(*) FROM deliveries "
                              "WHERE state IN ('pending', 'held', 'dead') GROUP BY 1, 2").fetchall()
        oldest = dict(conn.execute("SELECT vendor, min(created_ms) FROM deliveries "
                                   "WHERE state = 'pending' GROUP BY vendor").fetchall())
    assert {state for _, state, _ in counts} >= {"pending", "dead"}
    for vendor, state, count in counts:
        assert value(found, "onetag_outbox_deliveries", vendor=vendor, state=state) == count
    assert value(found, "onetag_outbox_deliveries") == sum(count for _, _, count in counts)
    assert value(found, "onetag_outbox_read_ok") == 1
    for vendor in oldest:
        assert value(found, "onetag_outbox_oldest_pending_age_seconds", vendor=vendor) >= 0
    assert set(oldest) <= {s.labels["vendor"] for s in
                           found["onetag_outbox_oldest_pending_age_seconds"].samples}


async def test_writer_restarts_are_counted(tmp_path, fake) -> None:
    async with serve(make(tmp_path, fake)) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        store = app.state.store
        if store.writer_kind != "process":
            pytest.skip("the writer runs in a thread here ($ONETAG_WRITER)")
        assert value(await scrape(client), "onetag_writer_restarts", "_total") == 0
        first = store._writer.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: store.restarts == 1 and store._writer is not None,
                    timeout=60, what="a new writer")
        assert store._writer.pid != first
        response = await post_browser(client, [{"event": "page_view", "event_id": "after"}])
        assert response.status_code == 204
        found = await scrape(client)
    assert value(found, "onetag_writer_restarts", "_total") == 1
    assert value(found, "onetag_events_received", "_total", name="page_view") == 1


async def test_no_secret_in_the_output(tmp_path, fake) -> None:
    settings = make(tmp_path, fake, forward=True, only=tuple(SECRETS))
    async with serve(settings) as app, \
            httpx.AsyncClient(base_url=app.state.base_url) as client:
        assert (await post_backend(client, [purchase("4001")])).status_code == 202
        await until(lambda: len(fake.requests()) >= 1, what="a vendor request")
        text = (await client.get("/metrics", headers=BEARER)).text
    assert "onetag_deliveries_total" in text
    for secret in (ADMIN, API_KEY, *SECRETS.values()):
        assert secret not in text


# The hooks' bounds, without HTTP ------------------------------------------------------------


@hypothesis_settings(max_examples=60, deadline=None)
@given(names=st.lists(st.one_of(st.sampled_from(sorted(STANDARD)),
                                 st.from_regex(EVENT_NAME_RE, fullmatch=True)),
                      min_size=1, max_size=20),
       site=st.sampled_from([SITE, "not-configured"]))
def test_label_values_stay_within_the_vocabulary(names, site) -> None:
    metrics = Metrics(config.parse(
        {"server": {"database": "sqlite:///x.db"}, "sites": [{"id": SITE}]}, env={}))
    metrics.received(site, "browser", names, 0.001)
    found = families(_text(metrics))
    labels = [s.labels for s in found["onetag_events_received"].samples if s.name.endswith("_total")]
    assert {label["name"] for label in labels} <= STANDARD | {"custom"}
    assert {label["site"] for label in labels} <= {SITE, "other"}
    assert sum(s.value for s in found["onetag_events_received"].samples
               if s.name.endswith("_total")) == len(names)


def _text(metrics: Metrics) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(metrics.registry).decode()


def test_reasons_and_status_classes_are_bounded() -> None:
    metrics = Metrics(config.parse(
        {"server": {"database": "sqlite:///x.db"}, "sites": [{"id": SITE}]}, env={}))
    metrics.rejected("browser", "unavailable", "queue")
    metrics.rejected("browser", "unavailable", "something new")
    metrics.rejected("backend", "a_reason_nobody_declared")
    metrics.delivery("sendlane", "pending", None, None)
    metrics.delivery("not-a-vendor", "delivered", 204, 0.05)
    found = families(_text(metrics))
    reasons = {s.labels["reason"] for s in found["onetag_requests_rejected"].samples
               if s.name.endswith("_total")}
    assert reasons == {"unavailable_queue", "other"} and reasons <= REASONS | {"other"}
    assert value(found, "onetag_deliveries", "_total", vendor="sendlane", status_class="none") == 1
    assert value(found, "onetag_deliveries", "_total", vendor="other", status_class="2xx") == 1
    assert value(found, "onetag_vendor_request_duration_seconds", "_count") == 1  # sent only
    assert [status_class(s) for s in (None, 200, 302, 404, 503)] == [
        "none", "2xx", "3xx", "4xx", "5xx"]


def test_group_commit_sizes_from_the_writer_processes_replies() -> None:
    """The replies of one transaction share its number; it is counted once complete: when
    a later number arrives or nothing is left waiting. A failed commit is not counted."""
    writer = ProcessWriter(":memory:", {}, 0, 0)
    seen: list[int] = []
    writer.on_commit = seen.append

    def reply(transaction: int, jobs: int, still_waiting: int) -> None:
        writer._waiting = {n: (None, 0.0) for n in range(still_waiting)}
        writer._count_commit(transaction, jobs)

    reply(1, 8, still_waiting=1)  # transaction 1: two frames of 8
    assert seen == []
    reply(1, 8, still_waiting=0)
    assert seen == [16]
    reply(1, 3, still_waiting=0)  # a failed commit repeats the last number
    assert seen == [16]
    reply(2, 5, still_waiting=2)  # transaction 2, then 3 while frames are still out
    reply(3, 4, still_waiting=1)
    assert seen == [16, 5]
    reply(4, 2, still_waiting=0)
    assert seen == [16, 5, 4, 2]


async def test_on_postgresql_each_node_counts_its_own_and_reads_the_shared_outbox(
        tmp_path, fake, pg_database) -> None:
    """Two nodes on one database: each node's counters are what that process handled (sum
    them across nodes); the outbox gauges are read from the shared table, the same on
    both."""
    data = settings_data(tmp_path, fake, only=("sendlane",), forward=False)
    data["server"].update(admin_token=ADMIN, database=pg_database)
    settings = config.parse(data, env={})
    async with serve(settings) as one, serve(settings) as two, \
            httpx.AsyncClient(base_url=one.state.base_url) as a, \
            httpx.AsyncClient(base_url=two.state.base_url) as b:
        assert (await post_backend(a, [purchase("4001"), purchase("4002")])).status_code == 202
        assert (await post_backend(b, [purchase("4003")])).status_code == 202
        first, second = await scrape(a), await scrape(b)
    received = "onetag_events_received"
    assert value(first, received, "_total", name="purchase") == 2
    assert value(second, received, "_total", name="purchase") == 1
    for found in (first, second):
        assert value(found, "onetag_outbox_read_ok") == 1
        assert value(found, "onetag_outbox_deliveries", vendor="sendlane", state="pending") == 3
        assert value(found, "onetag_writer_transaction_jobs", "_count") >= 1
