"""The fake vendor in the benchmarks' mode (``record=False``: nothing kept per request):
still an HTTP server that reads each request whole, counts it per vendor and answers it
after its delay, and still fails on demand."""

from __future__ import annotations

import httpx

from fakes.vendor_server import FakeVendors


def test_the_benchmark_fake_reads_counts_and_answers_every_request() -> None:
    with FakeVendors(delay=0.01, record=False) as fake, httpx.Client() as client:
        body = {"order_id": "1", "email": "a@example.com"}
        answers = [client.post(fake.url(vendor, "/api/v1/event?storeId=X"), json=body)
                   for vendor in ("sendlane", "rejoiner", "sendlane")]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert answers[0].json() == {"status": "success"}
        assert (fake.count, fake.counts) == (3, {"sendlane": 2, "rejoiner": 1})
        assert fake.in_flight == {"sendlane": 0, "rejoiner": 0}
        assert fake.requests() == []  # nothing kept
        fake.fail("sendlane", 500)
        assert client.post(fake.url("sendlane"), json=body).status_code == 500
        assert client.post(fake.url("sendlane"), json=body).status_code == 200
        stats = client.get(f"{fake.base_url}/_stats").json()
        assert stats == {"count": 5, "by_prefix": {"sendlane": 4, "rejoiner": 1}}
