"""Running the real onetag against the fake vendors: settings, an in-process uvicorn server
on a loopback port, a ``python -m server serve`` subprocess, and reading the delivery rows.

Nothing here sleeps for a fixed time to let something happen: callers wait on conditions
with generous deadlines (2 noisy cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import uvicorn

from server import config
from server.app import create_app
from server.forwarder import ForwarderOptions

from .vendor_server import FakeVendors, until, wait_sync  # noqa: F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent.parent
ORIGIN = "https://shop.example"
SITE = "shop1"
API_KEY = "site-api-key-0123456789"
SECRETS = {"rejoiner": "RJ-SECRET", "remarkety": "RM-SECRET", "esputnik": "ES-SECRET",
           "sendlane": "SL-SECRET"}

# Small numbers so retries happen within a test, large timeouts' worth of slack elsewhere.
FAST = ForwarderOptions(concurrency=8, connect_timeout_s=2.0, read_timeout_s=2.0,
                        write_timeout_s=2.0, lease_s=30.0, backoff_base_s=0.05,
                        backoff_cap_s=0.2, max_attempts=5, retry_window_s=3600.0,
                        idle_poll_s=0.05, expire_every_s=0.2, shutdown_grace_s=2.0)


def vendor_sections(fake: FakeVendors, only: tuple[str, ...] | None = None,
                    routes: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    sections = {
        "rejoiner": {"site_id": "RJSITE1", "domain": "shop.example",
                     "api_key": SECRETS["rejoiner"], "api_base": fake.url("rejoiner")},
        "remarkety": {"store_id": "RMSTORE", "api_key": SECRETS["remarkety"],
                      "webhook_url": fake.url("remarkety", "?storeId=RMSTORE")},
        "esputnik": {"site_id": "8A412DC", "api_key": SECRETS["esputnik"],
                     "tracker_url": fake.url("esputnik")},
        "sendlane": {"integration_token": "SLTOKEN123", "api_token": SECRETS["sendlane"],
                     "api_base": fake.url("sendlane")},
    }
    if only is not None:
        sections = {name: section for name, section in sections.items() if name in only}
    for name, extra in (routes or {}).items():
        sections[name] = {**sections[name], "routes": extra}
    return sections


def settings_data(tmp_path: Path, fake: FakeVendors, *, hold_days: float | None = None,
                  only: tuple[str, ...] | None = None,
                  routes: dict[str, dict[str, str]] | None = None, port: int = 8000,
                  forward: bool = True, browser_grace_s: float = 0,
                  site: dict[str, Any] | None = None) -> dict:
    # No grace by default: these tests send backend orders and want them out at once.
    server: dict[str, Any] = {"database": f"sqlite:///{tmp_path}/onetag.db",
                              "public_url": f"http://127.0.0.1:{port}", "forward": forward,
                              "browser_grace_s": browser_grace_s}
    if hold_days is not None:
        server["hold_days"] = hold_days
    return {"server": server,
            "sites": [{"id": SITE, "origins": [ORIGIN], "api_key": API_KEY, "currency": "USD",
                       **(site or {}), **vendor_sections(fake, only, routes)}]}


def make_settings(tmp_path: Path, fake: FakeVendors, **kwargs: Any) -> config.Settings:
    return config.parse(settings_data(tmp_path, fake, **kwargs), env={})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(settings: config.Settings, options: ForwarderOptions = FAST
                ) -> AsyncIterator[Any]:
    """The real app (lifespan: store + forwarder) under uvicorn on a loopback port, in this
    event loop. Yields the app; ``app.state.base_url`` is where it listens."""
    app = create_app(settings, forward_options=options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        if time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start within 30 s")
        await asyncio.sleep(0.01)
    app.state.base_url = f"http://127.0.0.1:{port}"
    try:
        yield app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)


# Sending events the two ways a shop does ------------------------------------------------

SC = "CDA68358-94FB-4D83-9655-3FEB3C4114A3"
ALL = ["rejoiner", "remarkety", "esputnik", "sendlane"]


def purchase(order: str, email: str = "jim@example.com", **extra: Any) -> dict:
    """A backend order event: its id, the buyer's email, one item at 29.99."""
    return {"event": "purchase", "event_id": f"order-{order}", "user": {"email": email},
            "ecommerce": {"currency": "USD", "transaction_id": order, "value": "29.99",
                          "items": [item()]}, **extra}


def item(item_id: str = "SKU-1", price: str = "29.99", quantity: int = 1, **extra: Any) -> dict:
    return {"item_id": item_id, "item_name": f"Item {item_id}", "price": price,
            "quantity": quantity, **extra}


async def browser(client: Any, *events: dict[str, Any], sc: str = SC) -> None:
    """The generated script's beacon: text/plain JSON to POST /e."""
    body = json.dumps({"site_id": SITE, "sc": sc, "events": list(events)})
    response = await client.post("/e", content=body,
                                 headers={"content-type": "text/plain", "origin": ORIGIN})
    assert response.status_code == 204, response.text


async def backend(client: Any, *events: dict[str, Any]) -> dict:
    """The shop's backend: POST /api/v1/sites/{site}/events with the site's Bearer key."""
    response = await client.post(f"/api/v1/sites/{SITE}/events", json=list(events),
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 202, response.text
    return response.json()


# Reading the database (sqlite3 beside the server: WAL lets it) --------------------------


def rows(db: Path | str, where: str = "1", params: tuple = ()) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute(
            "SELECT d.*, e.name AS event_name, e.event_id FROM deliveries d "
            f"JOIN events e ON e.seq = d.event_seq WHERE {where} ORDER BY d.id", params).fetchall()
    out = []
    for row in found:
        item = dict(row)
        item["request"] = json.loads(item["request"]) if item["request"] else None
        out.append(item)
    return out


def states(db: Path | str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows(db):
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return counts


# The server as its own process (kill -9) ------------------------------------------------

FORWARD_ENV = {"ONETAG_FORWARD_CONCURRENCY": "8", "ONETAG_FORWARD_BACKOFF_BASE_S": "0.05",
               "ONETAG_FORWARD_BACKOFF_CAP_S": "0.2", "ONETAG_FORWARD_IDLE_POLL_S": "0.05",
               "ONETAG_FORWARD_READ_TIMEOUT_S": "60"}


def write_config(path: Path, data: dict) -> Path:
    """A TOML file for ``data`` (the small subset of TOML these settings need)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    lines = ["[server]"] + [f"{k} = {value(v)}" for k, v in data["server"].items()]
    for site in data["sites"]:
        lines.append("\n[[sites]]")
        sections = {k: v for k, v in site.items() if isinstance(v, dict)}
        lines += [f"{k} = {value(v)}" for k, v in site.items() if not isinstance(v, dict)]
        for name, section in sections.items():
            lines.append(f"\n[sites.{name}]")
            lines += [f"{k} = {value(v)}" for k, v in section.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def healthz(base: str, timeout: float = 2) -> dict | None:
    """``GET {base}/healthz``: its JSON when 200, else None (refused, another status, no
    answer in time). urllib, not ``httpx.get``: each ``httpx.get`` builds a client and its
    TLS context, ~40 ms of CPU a poll, taken from the server starting beside it."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=timeout) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):  # URLError, HTTPError, resets
        return None


@contextlib.contextmanager
def server_process(config_path: Path, port: int, env: dict[str, str] | None = None,
                   log: Path | None = None, log_level: str = "warning"
                   ) -> Iterator[subprocess.Popen]:
    """``python -m server serve`` on ``port``; waits for /healthz; kills it on exit."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **FORWARD_ENV, **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config", str(config_path),
                             "--port", str(port), "--log-level", log_level],
                            cwd=config_path.parent, env=full_env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"onetag serve exited with {proc.returncode}"
                                     + (f": {log.read_text()[-2000:]}" if log else ""))
            if healthz(f"http://127.0.0.1:{port}") is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError("onetag serve did not answer /healthz within 60 s")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if out is not subprocess.DEVNULL:
            out.close()
