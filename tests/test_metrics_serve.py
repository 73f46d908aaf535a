"""``GET /metrics`` of a real ``onetag serve`` process (slow: tests/conftest.py): the
writer is a process of its own there, and what it commits is counted in the server."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fakes.harness import (API_KEY, ORIGIN, SITE, free_port, purchase, server_process,
                           settings_data, wait_sync, write_config)

ADMIN = "serve-admin-token-0123456789"


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=10)
    assert response.status_code == 200, response.text
    assert ADMIN not in response.text and API_KEY not in response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(found: dict[tuple[str, tuple], float], sample: str, /, **labels: str) -> float:
    return sum(v for (n, have), v in found.items() if n == sample
               and all((k, w) in have for k, w in labels.items()))


def test_a_serve_process_counts_what_its_writer_commits(tmp_path, fake) -> None:
    port = free_port()
    data = settings_data(tmp_path, fake, only=("sendlane",), port=port)
    data["server"]["admin_token"] = ADMIN
    path = write_config(tmp_path / "onetag.toml", data)
    base = f"http://127.0.0.1:{port}"
    with server_process(path, port, log=tmp_path / "serve.log"):
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401
        for n in range(3):
            response = httpx.post(f"{base}/e", content=json.dumps(
                {"site_id": SITE, "sc": "SC-SERVE-METRICS-1",
                 "events": [{"event": "page_view", "event_id": f"pv-{n}"}]}),
                headers={"content-type": "text/plain", "origin": ORIGIN}, timeout=10)
            assert response.status_code == 204
        response = httpx.post(f"{base}/api/v1/sites/{SITE}/events", json=[purchase("9001")],
                              headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert response.status_code == 202
        found = wait_sync(lambda: (lambda f: f if total(
            f, "onetag_deliveries_total", vendor="sendlane", state="delivered") else None)(
                scrape(base)), timeout=60, what="a delivery to sendlane")
    assert total(found, "onetag_events_received_total", source="browser", name="page_view") == 3
    assert total(found, "onetag_events_received_total", source="backend", name="purchase") == 1
    assert total(found, "onetag_ingest_duration_seconds_count", source="browser") == 3
    # The writer process's transactions, counted from its replies: at least the 4 ingest
    # requests and the health checks the harness made, and the forwarder's claims.
    assert total(found, "onetag_writer_transaction_jobs_count") >= 1
    assert total(found, "onetag_writer_transaction_jobs_sum") >= 5
    assert total(found, "onetag_vendor_request_duration_seconds_count", vendor="sendlane") >= 1
    assert total(found, "onetag_writer_restarts_total") == 0
