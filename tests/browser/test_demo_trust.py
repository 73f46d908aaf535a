"""The demo in real Chromium under the trust model (docs/security.md): its sign-in and consent
buttons push a signed identity, its checkout reports the order from the demo's backend, and
each reaches the demo's vendor sinks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import REPO, free_port, wait_until



@pytest.fixture
def demo(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)],
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/healthz", timeout=2).status == 200
        except OSError:
            return process.poll() is not None and pytest.fail("the demo server exited")
    wait_until(healthy, "the demo server to answer", timeout=60)
    yield base
    process.terminate()
    process.wait(30)


def sink(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/demo/sink", timeout=10) as answer:
        return json.loads(answer.read())


def paths(base: str) -> set[str]:
    return {entry["path"] for entry in sink(base)}


def test_the_demo_buttons_use_the_verified_path_and_the_backend(page, demo) -> None:
    rejoiner = "/demo/sink/rejoiner/DEMO123"
    page.goto(f"{demo}/demo/")
    page.fill("[data-testid=signin-email]", "Ann@Example.com")
    page.click("[data-testid=signin-submit]")
    page.fill("[data-testid=consent-email]", "ann@example.com")
    page.click("[data-testid=unsubscribe]")
    wait_until(lambda: f"{rejoiner}/customer/unsubscribe/" in paths(demo),
               "the signed unsubscribe to reach Rejoiner's sink")
    page.click("[data-testid=opt-in]")
    wait_until(lambda: f"{rejoiner}/customer/opt_in/" in paths(demo),
               "the signed opt-in to reach Rejoiner's sink")
    # A purchase: the page pushes it for the vendors' libraries, the demo's backend reports it.
    page.click("[data-testid=product-link] >> nth=0")
    page.click("[data-testid=add-to-cart]")
    page.goto(f"{demo}/demo/checkout")
    page.fill("[data-testid=checkout-email]", "ann@example.com")
    page.click("[data-testid=place-order]")
    placed = wait_until(lambda: [e for e in sink(demo)
                                 if e["path"] == "/demo/sink/sendlane/tracking/order-placed"],
                        "the order to reach Sendlane's sink from the demo's backend")
    assert placed[0]["json"]["email"] == "ann@example.com"
    assert placed[0]["json"]["order_id"].startswith("DEMO-")
