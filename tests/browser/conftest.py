"""Fixtures for tests that drive real Chromium against a real `python -m server serve`.

Session-scoped (shared by every browser test module):

``chromium`` -> playwright ``Browser`` (sync API)
    $ONETAG_CHROMIUM or /usr/bin/chromium. When missing and running as root, runs
    ``apt-get install -y chromium`` once; otherwise every browser test is skipped with the
    reason. Never downloads Playwright's own browsers.

``static_server`` -> ``StaticServer``
    A threaded ``http.server`` on 127.0.0.1:<free port>, another origin than onetag's, that
    hosts test pages: ``static_server.add(body, content_type="text/html", path=None) -> url``
    (a fresh unique path unless given); any other path answers 404. ``.origin``, ``.url(path)``,
    ``.hits(path) -> int`` (GET requests seen for a path, 404s included).

``onetag_server`` -> ``start(toml, *, port=None, db=None) -> OnetagServer``
    A factory. Writes ``toml`` to a fresh tmp dir as onetag.toml and runs
    ``python -m server serve --config <it> --port <free or given>`` from the repo, then waits
    for ``GET /healthz``. In ``toml``, the tokens ``{public_url}``, ``{database}``, ``{port}``
    and ``{origin}`` (the static server's origin) are replaced; a ``toml`` without a
    ``[server]`` table gets one (database in the tmp dir, public_url, forward = false).
    Every server it started is stopped at the end of the session.

``OnetagServer``: ``.url``, ``.port``, ``.db_path``, ``.script_url(site_id)``,
    ``.stop()`` (SIGINT, graceful), ``.kill()`` (SIGKILL: a crash), ``.start()`` (again, same
    port and database), ``.query(sql, params) -> list[sqlite3.Row]`` (read-only connection),
    ``.events(site_id=None, sc=None) -> list[dict]`` (rows in arrival order, with ``data`` and
    ``raw`` decoded), ``.wait_events(predicate, what, timeout=30, **filters)``: polls
    ``events()`` until ``predicate(rows)`` holds and returns the rows.

Browser tests are ordered after all other tests (see pytest_collection_modifyitems below).

Function-scoped: ``context`` (a fresh BrowserContext: no cookies, no storage) and ``page``.

``wait_until`` -> ``wait_until(fn, what, timeout=30)``: polls ``fn`` until truthy and returns
    its value; fails naming ``what`` at the deadline (a deadline for a condition, never a
    timed assertion). A fixture because test modules here are not a package.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until(fn: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}")
        time.sleep(0.05)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the browser tests after every other test.

    Sync Playwright keeps its event loop marked as running in the main thread while the
    session's browser is open, so pytest-asyncio tests collected after it would fail with
    "cannot be called from a running event loop". Ordering them last keeps one shared browser.
    """
    here = Path(__file__).resolve().parent
    browser = [item for item in items if here in Path(str(item.path)).resolve().parents]
    if browser and len(browser) < len(items):
        moved = set(browser)
        items[:] = [item for item in items if item not in moved] + browser


@pytest.fixture(name="wait_until", scope="session")
def wait_until_fixture() -> Callable[..., Any]:
    return wait_until


# Chromium -------------------------------------------------------------------------------


def _chromium_executable() -> str:
    explicit = os.environ.get("ONETAG_CHROMIUM")
    exe = explicit or "/usr/bin/chromium"
    if os.path.exists(exe):
        return exe
    if explicit:
        pytest.skip(f"ONETAG_CHROMIUM={explicit} does not exist")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        # One install at a time: with `pytest -n` every worker process gets here, and a second
        # apt-get would fail on dpkg's lock. The one that waited finds chromium installed.
        with open(os.path.join(tempfile.gettempdir(), "onetag-chromium-install.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(exe):
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
                if subprocess.run(install, env=env, capture_output=True).returncode != 0:
                    subprocess.run(["apt-get", "update"], env=env, capture_output=True)
                    subprocess.run(install, env=env, capture_output=True)
        if os.path.exists(exe):
            return exe
        pytest.skip("chromium is not installed and `apt-get install -y chromium` failed")
    pytest.skip("chromium is not installed (/usr/bin/chromium or $ONETAG_CHROMIUM); "
                "install it with `apt-get install -y chromium` (root) to run the browser tests")


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _chromium_executable()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(chromium: Any) -> Iterator[Any]:
    ctx = chromium.new_context()
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: Any) -> Any:
    return context.new_page()


# Static pages on another origin ---------------------------------------------------------


class StaticServer:
    def __init__(self) -> None:
        self.pages: dict[str, tuple[bytes, str]] = {}
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                with owner._lock:
                    owner._hits[path] = owner._hits.get(path, 0) + 1
                page = owner.pages.get(path)
                body, ctype = page if page else (b"not found", "text/plain")
                self.send_response(200 if page else 404)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://{HOST}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return self.origin + path

    def add(self, body: str | bytes, content_type: str = "text/html; charset=utf-8",
            path: str | None = None) -> str:
        path = path or f"/p/{uuid.uuid4().hex}.html"
        self.pages[path] = (body.encode() if isinstance(body, str) else body, content_type)
        return self.url(path)

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits.get(path, 0)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def static_server() -> Iterator[StaticServer]:
    server = StaticServer()
    yield server
    server.close()


# onetag server ----------------------------------------------------------------------------


class OnetagServer:
    def __init__(self, config_path: Path, port: int, db_path: Path, log_path: Path):
        self.config_path, self.port, self.db_path, self.log_path = config_path, port, db_path, log_path
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def script_url(self, site_id: str) -> str:
        return f"{self.url}/s/{site_id}.js"

    def start(self, timeout: float = 60.0) -> "OnetagServer":
        assert self.proc is None, "already running"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--config", str(self.config_path),
             "--host", HOST, "--port", str(self.port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"onetag server exited at start:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"onetag server not healthy after {timeout:.0f}s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Graceful: SIGINT (uvicorn closes the store), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed beyond what was committed."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def events(self, site_id: str | None = None, sc: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM events WHERE 1=1", []
        if site_id is not None:
            sql, params = sql + " AND site_id = ?", [*params, site_id]
        if sc is not None:
            sql, params = sql + " AND sc = ?", [*params, sc]
        rows = []
        for row in self.query(sql + " ORDER BY seq", tuple(params)):
            event = dict(row)
            event["data"] = json.loads(event["data"])
            if event.get("raw"):
                event["raw"] = json.loads(event["raw"])
            rows.append(event)
        return rows

    def wait_events(self, predicate: Callable[[list[dict[str, Any]]], Any], what: str,
                    timeout: float = 30.0, **filters: Any) -> list[dict[str, Any]]:
        found: list[list[dict[str, Any]]] = []

        def check() -> bool:
            rows = self.events(**filters)
            found[:] = [rows]
            return bool(predicate(rows))

        try:
            wait_until(check, what, timeout)
        except AssertionError as exc:
            names = [(r["name"], r["sc"]) for r in (found[0] if found else [])]
            raise AssertionError(f"{exc}\nevents so far: {names}\nserver log:\n{self.log()}") from None
        return found[0]


@pytest.fixture(scope="session")
def onetag_server(tmp_path_factory: pytest.TempPathFactory,
                  static_server: StaticServer) -> Iterator[Callable[..., OnetagServer]]:
    started: list[OnetagServer] = []

    def start(toml: str, *, port: int | None = None, db: Path | None = None) -> OnetagServer:
        tmp = tmp_path_factory.mktemp("onetag")
        port = port or free_port()
        db = db or tmp / "onetag.db"
        public_url = f"http://{HOST}:{port}"
        if "[server]" not in toml:
            toml = ('[server]\ndatabase = "{database}"\npublic_url = "{public_url}"\n'
                    "forward = false\n\n" + toml)
        for token, value in (("{public_url}", public_url), ("{database}", f"sqlite:///{db}"),
                             ("{port}", str(port)), ("{origin}", static_server.origin)):
            toml = toml.replace(token, value)
        config_path = tmp / "onetag.toml"
        config_path.write_text(toml)
        server = OnetagServer(config_path, port, db, tmp / "server.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
