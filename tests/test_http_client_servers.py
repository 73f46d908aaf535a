"""The forwarder's HTTP client against real production HTTP servers: nginx, and Caddy (Go's
net/http), on loopback as a vendor stand in for one (vendors' APIs sit behind nginx, CDNs and load balancers). What
the fake vendors of the other tests never do, nginx does here as it does in production:
gzip with chunked framing, ``Keep-Alive: timeout=N``, closing a connection after its
``keepalive_requests``, closing idle ones, a 429 with ``Retry-After``. Skipped, naming the
package, where nginx or caddy is not installed (as tests/test_deploy.py's checks of the examples)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from server.http_client import KeepAlivePool
from test_deploy import nginx_binary

pytestmark = pytest.mark.slow  # a real server process

TIMEOUTS = httpx.Timeout(5.0).as_dict()
ITEMS = [{"sku": f"SKU-{n}", "title": f"Item {n} \u00e9", "price": n * 1.5} for n in range(900)]


def _conf(root: Path, port: int) -> str:
    temp = "\n".join(f"    {kind}_temp_path {root / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}pid {root / 'nginx.pid'};
error_log {root / 'error.log'} info;
events {{}}
http {{
    access_log {root / 'access.log'};
{temp}
    gzip on;
    gzip_types application/json;
    gzip_min_length 0;
    keepalive_timeout 2s 2s;
    keepalive_requests 3;
    server {{
        listen 127.0.0.1:{port};
        root {root / 'www'};
        location = /ok {{ default_type application/json; return 200 '{{"status":"success"}}'; }}
        location = /throttled {{
            default_type application/json;
            add_header Retry-After 7 always;
            return 429 '{{"error":"slow down"}}';
        }}
        location = /items.json {{ default_type application/json; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serving(name: str, command: list[str], port: int, **popen):
    """Run ``command`` until the fixture's test ends; yield its URL once ``port`` takes
    connections (a failure to start names ``name`` and says what it printed)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, **popen)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"{name} did not start: {process.stderr.read()}")
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


def _www(tmp_path: Path) -> Path:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "items.json").write_text(json.dumps(ITEMS), encoding="utf-8")
    return tmp_path / "www"


@pytest.fixture
def nginx(tmp_path):
    binary = nginx_binary()
    _www(tmp_path)
    port = _free_port()
    (tmp_path / "nginx.conf").write_text(_conf(tmp_path, port), encoding="utf-8")
    yield from _serving("nginx", [binary, "-e", str(tmp_path / "error.log"), "-p",
                                  str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g",
                                  "daemon off;"], port)


HEADERS = [("Accept-Encoding", "gzip, deflate"), ("Content-Type", "application/json")]


async def _three_answers(pool: KeepAlivePool, base: str) -> tuple:
    """A small JSON answer, a static file (gzipped on the fly: its length unknown ahead)
    and a 429 with Retry-After, each read whole and right."""
    ok = await pool.send("POST", f"{base}/ok", HEADERS, b'{"order_id":"1"}', TIMEOUTS)
    assert ok.status_code == 200 and json.loads(ok.content) == {"status": "success"}
    assert ok.headers["content-encoding"] == "gzip"
    items = await pool.send("GET", f"{base}/items.json", HEADERS, None, TIMEOUTS)
    assert items.status_code == 200 and json.loads(items.content) == ITEMS
    assert items.headers["content-encoding"] == "gzip" and not items.truncated
    assert 16_384 < len(items.content) < 65_536  # several chunks, within the client's bound
    throttled = await pool.send("POST", f"{base}/throttled", HEADERS, b"{}", TIMEOUTS)
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "7"
    assert json.loads(throttled.content) == {"error": "slow down"}
    return ok, items, throttled


async def test_gzip_in_chunks_a_429_and_keep_alive_as_nginx_sends_them(nginx) -> None:
    pool = KeepAlivePool(4)
    try:
        ok, items, _ = await _three_answers(pool, nginx)
        assert ok.headers["keep-alive"] == "timeout=2"
        assert items.headers["transfer-encoding"] == "chunked"
        # keepalive_requests 3: nginx said "Connection: close" with the third answer, so the
        # fourth request goes on a new connection, first time.
        again = await pool.send("POST", f"{nginx}/ok", HEADERS, b"{}", TIMEOUTS)
        assert again.status_code == 200 and pool.opened == 2
    finally:
        await pool.aclose()


async def test_an_idle_connection_nginx_closes_is_never_reused(nginx) -> None:
    """nginx closes a connection idle for its keepalive_timeout (2 s, said in its
    Keep-Alive header): the pool keeps it a second less, so the next request opens a new
    one instead of meeting the close."""
    pool = KeepAlivePool(4)
    try:
        await pool.send("POST", f"{nginx}/ok", [], b"{}", TIMEOUTS)
        await asyncio.sleep(1.2)  # past the pool's 1 s, before nginx's 2 s
        answer = await pool.send("POST", f"{nginx}/ok", [], b"{}", TIMEOUTS)
        assert answer.status_code == 200 and pool.opened == 2
        await asyncio.sleep(2.5)  # nginx has closed the second one: seen, not used
        answer = await pool.send("POST", f"{nginx}/ok", [], b"{}", TIMEOUTS)
        assert answer.status_code == 200 and pool.opened == 3
    finally:
        await pool.aclose()


# Caddy: Go's net/http, the other server a vendor's API is likely to sit behind ------------


@pytest.fixture
def caddy(tmp_path):
    binary = shutil.which("caddy")
    if binary is None:
        pytest.skip("caddy is not installed (Debian: apt-get install caddy)")
    _www(tmp_path)
    port = _free_port()
    (tmp_path / "Caddyfile").write_text(f"""{{
\tadmin off
\tauto_https off
}}
http://127.0.0.1:{port} {{
\tencode gzip {{
\t\tminimum_length 1
\t}}
\thandle /ok {{
\t\theader Content-Type application/json
\t\trespond `{{"status":"success"}}` 200
\t}}
\thandle /throttled {{
\t\theader Retry-After 7
\t\trespond `{{"error":"slow down"}}` 429
\t}}
\thandle /items.json {{
\t\troot * {tmp_path / 'www'}
\t\tfile_server
\t}}
}}
""", encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path)}
    yield from _serving("caddy", [binary, "run", "--config", str(tmp_path / "Caddyfile"),
                                  "--adapter", "caddyfile"], port, cwd=tmp_path, env=env)


async def test_gzip_chunks_and_keep_alive_as_go_sends_them(caddy) -> None:
    pool = KeepAlivePool(4)
    try:
        await _three_answers(pool, caddy)
        assert pool.opened == 1  # one keep-alive connection carried the three
    finally:
        await pool.aclose()
