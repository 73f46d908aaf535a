"""The Coupons bridge as an operator runs it: the real ``onetag serve`` (writer process)
answering Remarkety with the store's webhook on loopback, its log lines (access lines
included) free of secrets, then ``onetag coupons`` listing every call, with the secrets'
environment variables unset (it never sends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from fakes.harness import REPO, free_port, server_process, write_config

SITE = "shop1"
ENV = {"SHOP1_COUPON_API_KEY": "rk-cli-coupon-key-0123456789",
       "SHOP1_COUPON_WEBHOOK_SECRET": "whsec-cli-secret-0123456789",
       "SHOP1_API_KEY": "site-cli-api-key-0123"}


def onetag(*args: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ONETAG_", "SHOP1_"))}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture
def served(tmp_path, fake):
    """``onetag serve`` with the bridge on; four calls made; the server stopped."""
    fake.fail("store", 200, body='{"is_success": true}')
    fake.fail("store", 422, body='{"is_success": false, "error_message": "unknown template 9"}')
    port = free_port()
    config = write_config(tmp_path / "onetag.toml", {
        "server": {"database": f"sqlite:///{tmp_path}/onetag.db",
                   "public_url": f"http://127.0.0.1:{port}", "forward": False},
        "sites": [{"id": SITE, "api_key": "env:SHOP1_API_KEY",
                   "coupons": {"remarkety_api_key": "env:SHOP1_COUPON_API_KEY",
                               "webhook_url": fake.url("store", "?shop_token=abc"),
                               "webhook_secret": "env:SHOP1_COUPON_WEBHOOK_SECRET"}}]})
    log = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}/remarkety/{SITE}/discounts"
    key = ENV["SHOP1_COUPON_API_KEY"]
    with server_process(config, port, env=ENV, log=log, log_level="info"):
        answers = [
            httpx.post(base, params={"remarkety_api_key": key, "code": "CLI-1", "templateId": 3,
                                     "email": "jim@example.com"}, timeout=60),
            httpx.post(base, params={"remarkety_api_key": key, "code": "CLI-2", "templateId": 9},
                       timeout=60),
            httpx.post(base, params={"remarkety_api_key": "wrong-key-0123456789",
                                     "code": "CLI-3", "templateId": 3}, timeout=60),
            httpx.post(base, params={"remarkety_api_key": key, "templateId": 3}, timeout=60),
        ]
    return tmp_path, config, log, answers


def test_serve_answers_remarkety_and_logs_no_secret(served, fake):
    tmp_path, _, log, answers = served
    assert [a.status_code for a in answers] == [200, 422, 403, 400]
    assert [a.json()["is_success"] for a in answers] == [True, False, False, False]
    assert answers[1].json()["error_message"] == "unknown template 9"
    assert len(fake.requests("store")) == 2  # the wrong key and the bad request: never sent
    text = log.read_text()
    for secret in (*ENV.values(), "shop_token=abc"):
        assert secret not in text, secret
    assert "remarkety_api_key=[redacted]" in text  # uvicorn's access lines, key redacted
    assert "coupon call for site shop1: created (200)" in text
    for answer in answers:
        assert f"request_id={answer.headers['x-request-id']}" in text


def test_onetag_coupons_lists_every_call_without_the_secrets_set(served):
    tmp_path, config, _, answers = served
    listed = onetag("coupons", "--config", str(config), "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    calls = json.loads(listed.stdout)["calls"]
    assert [c["result"] for c in calls] == ["invalid", "unauthorized", "refused", "created"]
    assert [c["status"] for c in calls] == [400, 403, 422, 200]
    assert [c["request_id"] for c in calls] == [a.headers["x-request-id"]
                                                for a in reversed(answers)]
    assert calls[3]["code"] == "CLI-1" and calls[3]["email"] == "jim@example.com"
    assert calls[2]["store_status"] == 422 and "unknown template 9" in calls[2]["error"]

    text = onetag("coupons", "--config", str(config), "--site", SITE, "--limit", "2",
                  cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"coupon calls in {tmp_path}/onetag.db (latest 2, site shop1; "
                               "bridge on for: shop1)")
    assert "invalid  answered 400" in text.stdout and "unauthorized  answered 403" in text.stdout
    assert "code: is required" in text.stdout and "created" not in text.stdout
    for output in (listed.stdout + listed.stderr, text.stdout + text.stderr):
        for secret in (*ENV.values(), "shop_token=abc"):
            assert secret not in output

    unknown = onetag("coupons", "--config", str(config), "--site", "nosuch", cwd=tmp_path)
    assert unknown.returncode == 2 and "no site 'nosuch'" in unknown.stderr
