"""The CLI as a user runs it: init, check, and serve with no config (the demo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def onetag(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=60)


def test_init_writes_a_config_that_check_accepts(tmp_path) -> None:
    assert onetag("init", cwd=tmp_path).returncode == 0
    assert onetag("init", cwd=tmp_path).returncode == 1  # never overwrites silently
    missing = onetag("check", cwd=tmp_path)
    assert missing.returncode == 2
    assert "environment variable ONETAG_ADMIN_TOKEN is not set" in missing.stderr
    env = {**ENV, **{name: "x" for name in (
        "ONETAG_ADMIN_TOKEN", "SHOP1_API_KEY", "SHOP1_REJOINER_API_KEY", "SHOP1_REMARKETY_API_KEY",
        "SHOP1_ESPUTNIK_API_KEY", "SHOP1_SENDLANE_API_TOKEN")}}
    ok = onetag("check", "--config", "onetag.toml", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "site shop1: rejoiner, remarkety, esputnik, sendlane" in ok.stdout


def test_check_lists_every_problem_and_fails(tmp_path) -> None:
    (tmp_path / "bad.toml").write_text('[[sites]]\nid = "a b"\ncurrency = "usd"\n')
    result = onetag("check", "--config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.toml has 2 problem(s)" in result.stderr
    assert "bad.toml: sites[a b].id:" in result.stderr
    assert "bad.toml: sites[a b].currency:" in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base: str, process: subprocess.Popen, timeout: float = 30) -> None:
    """Until ``base`` answers /healthz 200; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "server did not start"
        time.sleep(0.2)


def test_serve_without_config_runs_the_demo(tmp_path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port)],
                               cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process)
        page = httpx.get(f"{base}/demo/")
        assert page.status_code == 200 and 'src="/s/demo.js"' in page.text
        assert httpx.get(f"{base}/demo/p/anything").status_code == 200  # SPA routes
        assert httpx.get(f"{base}/s/demo.js").status_code == 200
        assert httpx.get(f"{base}/static/demo/demo.css").status_code == 200
        assert (tmp_path / "onetag-demo.db").exists()
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert "serving the demo site 'demo'" in output
