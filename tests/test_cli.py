"""The CLI as a user runs it: init, check, and serve with no config (the demo)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fakes.harness import healthz

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def onetag(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=60)


def test_inits_config_points_at_docs_that_exist_and_signing_at_trust() -> None:
    from server.cli import EXAMPLE_CONFIG

    root = Path(__file__).parent.parent
    named = re.findall(r"docs/[\w-]+\.md", EXAMPLE_CONFIG)
    assert named and all((root / page).is_file() for page in named), named
    [line] = [line for line in EXAMPLE_CONFIG.splitlines() if "identity_secret" in line]
    assert line.endswith("docs/trust.md")  # where the signing how-to is


def test_init_writes_a_config_that_check_accepts(tmp_path) -> None:
    assert onetag("init", cwd=tmp_path).returncode == 0
    assert onetag("init", cwd=tmp_path).returncode == 1  # never overwrites silently
    missing = onetag("check", cwd=tmp_path)
    assert missing.returncode == 2
    assert "environment variable ONETAG_ADMIN_TOKEN is not set" in missing.stderr
    env = {**ENV, **{name: "x" for name in (
        "SHOP1_REJOINER_API_KEY", "SHOP1_REMARKETY_API_KEY",
        "SHOP1_ESPUTNIK_API_KEY", "SHOP1_SENDLANE_API_TOKEN")}}
    short = onetag("check", "--config", "onetag.toml", cwd=tmp_path, env={
        **env, "ONETAG_ADMIN_TOKEN": "x", "SHOP1_API_KEY": "x"})
    assert short.returncode == 2
    for where in ("server.admin_token", "sites[shop1].api_key"):
        assert f"onetag.toml: {where}: must be at least 16 characters" in short.stderr, short.stderr
    env.update({"ONETAG_ADMIN_TOKEN": "admin-token-0123456789", "SHOP1_API_KEY": "api-key-0123456789"})
    ok = onetag("check", "--config", "onetag.toml", cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "site shop1: rejoiner, remarkety, esputnik, sendlane" in ok.stdout
    # Retention is off unless asked for (docs/config.md, "Retention"); the example shows the key.
    assert "retention: events, sessions and finished deliveries kept forever " \
        "(keep_events_days = 0)" in ok.stdout, ok.stdout
    text = (tmp_path / "onetag.toml").read_text()
    assert "# keep_events_days = 0 " in text
    (tmp_path / "onetag.toml").write_text(text.replace("# keep_events_days = 0 ",
                                                       "keep_events_days = 395 "))
    kept = onetag("check", "--config", "onetag.toml", cwd=tmp_path, env=env)
    assert kept.returncode == 0, kept.stderr
    assert "events, sessions and finished deliveries pruned after 395 days " \
        "(keep_events_days)" in kept.stdout, kept.stdout
    (tmp_path / "onetag.toml").write_text(text.replace("# keep_events_days = 0 ",
                                                       "keep_events_days = 0.5 "))
    half = onetag("check", "--config", "onetag.toml", cwd=tmp_path, env=env)
    assert half.returncode == 2
    assert "onetag.toml: server.keep_events_days: must be 0 (keep events forever) or at " \
        "least 1 day, not 0.5" in half.stderr, half.stderr


def test_check_lists_every_problem_and_fails(tmp_path) -> None:
    (tmp_path / "bad.toml").write_text('[[sites]]\nid = "a b"\ncurrency = "usd"\n')
    result = onetag("check", "--config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.toml has 2 problem(s)" in result.stderr
    assert "bad.toml: sites[a b].id:" in result.stderr
    assert "bad.toml: sites[a b].currency:" in result.stderr


def test_check_refuses_values_that_passed_and_failed_later(tmp_path) -> None:
    """Each of these passed `onetag check` and then lost events (an in-memory database),
    crashed serve (nan, port 99999), turned the console off (an empty env: secret), made the
    backend API unreachable (event_path) or refused every browser event (port 99999)."""
    (tmp_path / "onetag.toml").write_text(
        '[server]\ndatabase = "sqlite:///:memory:"\npublic_url = "http://127.0.0.1:99999"\n'
        'event_path = "/api/v1/sites/shop1/events"\nadmin_token = "env:X"\n'
        'shutdown_grace_s = inf\nbody_timeout_s = nan\n'
        '\n[[sites]]\nid = "shop1"\napi_key = ""\n'
        'origins = ["https://Shop.Example:443", "https://a.example:99999"]\n'
        '\n[sites.sendlane]\nintegration_token = "T"\napi_token = "t"\n'
        'api_base = "https://exa mple.com/"\n')
    result = onetag("check", cwd=tmp_path, env={**ENV, "X": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "onetag.toml has 9 problem(s)" in result.stderr, result.stderr
    for where in ("server.database", "server.public_url", "server.event_path",
                  "server.admin_token", "server.shutdown_grace_s", "server.body_timeout_s",
                  "sites[shop1].api_key", "sites[shop1].origins[1]",
                  "sites[shop1].sendlane.api_base"):
        assert f"onetag.toml: {where}: " in result.stderr, (where, result.stderr)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base: str, process: subprocess.Popen, timeout: float = 30) -> None:
    """Until ``base`` answers /healthz 200; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if healthz(base, timeout=5) is not None:
            return
        assert time.monotonic() < deadline and process.poll() is None, "server did not start"
        time.sleep(0.02)


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


def test_check_flags_vendor_urls_and_suggests_the_nearest_key(tmp_path) -> None:
    (tmp_path / "onetag.toml").write_text(
        '[server]\ndatabase = "sqlite:///onetag.db"\npublic_urll = "http://127.0.0.1:8000"\n'
        '\n[[sites]]\nid = "shop1"\norigins = ["https://shop.example"]\ncurency = "USD"\n'
        '\n[sites.rejoiner]\nsite_id = "R"\napi_base = "rj2.rejoiner.com/api/v1"\n'
        '\n[sites.sendlane]\nintegration_token = "T"\nscript_url = "https://cdn.example/p.js"\n'
        'api_bsae = "https://api.sendlane.example"\n')
    result = onetag("check", cwd=tmp_path)
    assert result.returncode == 2
    assert "onetag.toml has 6 problem(s)" in result.stderr
    # Both sections route events to the server without the key their APIs need.
    assert "sites[shop1].rejoiner.api_key: is required" in result.stderr
    assert "sites[shop1].sendlane.api_token: is required" in result.stderr
    lines = result.stderr.splitlines()
    assert any(line.strip().startswith("onetag.toml: server.public_urll: unknown key (did you "
                                       "mean 'public_url'?") for line in lines)
    assert "sites[shop1].curency: unknown key (did you mean 'currency'?" in result.stderr
    assert "sites[shop1].sendlane.api_bsae: unknown key (did you mean 'api_base'?" in result.stderr
    assert ("sites[shop1].rejoiner.api_base: must be an absolute http(s) URL like "
            "\"https://host/path\", not 'rj2.rejoiner.com/api/v1'") in result.stderr


def serve_output(tmp_path: Path, public_port: int, port: int) -> str:
    """`onetag serve` with a config whose public_url names ``public_port``, bound to ``port``:
    its output once it answers /healthz."""
    (tmp_path / "onetag.toml").write_text(
        f'[server]\ndatabase = "sqlite:///onetag.db"\npublic_url = "http://localhost:{public_port}"'
        f'\nforward = false\n\n[[sites]]\nid = "shop1"\norigins = ["https://shop.example"]\n')
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port),
                                "--log-level", "warning"], cwd=tmp_path, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
    return out + "\n--stderr--\n" + err


def test_serve_warns_when_a_loopback_public_url_names_another_port(tmp_path) -> None:
    port = free_port()
    output = serve_output(tmp_path, port + 1, port)
    warnings = [line for line in output.split("--stderr--")[1].splitlines()
                if line.startswith("onetag: warning: [server] public_url")]
    assert warnings == [f"onetag: warning: [server] public_url http://localhost:{port + 1} names "
                        f"port {port + 1}, but this server binds port {port}: scripts would load "
                        f"and post events where nothing listens (set public_url to "
                        f"http://localhost:{port} or run with --port {port + 1})"]
    output = serve_output(tmp_path, port, port)
    assert "warning" not in output
    # Once serving: the banner, naming the database by its absolute path.
    assert (f"onetag: serving 1 site(s) (shop1) from onetag.toml on {tmp_path / 'onetag.db'}"
            in output.split("--stderr--")[0]), output


def test_public_url_warning_only_for_loopback_hosts() -> None:
    from server.cli import public_url_warning

    assert public_url_warning("https://shop.example", 8000) is None  # behind a proxy: fine
    assert public_url_warning("http://10.0.0.5:9000", 8000) is None
    assert public_url_warning("http://127.0.0.1:8000", 8000) is None
    assert "names port 80," in public_url_warning("http://127.0.0.1", 8000)
    assert "http://[::1]:8000" in public_url_warning("http://[::1]:9000", 8000)
    # The unspecified addresses reach this machine too (a copied bind address): warned.
    assert "http://0.0.0.0:8000" in public_url_warning("http://0.0.0.0:9000", 8000)
    assert "http://[::]:8000" in public_url_warning("http://[::]:9000", 8000)
    assert "names port 80," in public_url_warning("http://LOCALHOST", 8000)
    assert public_url_warning("http://0.0.0.0:8000", 8000) is None


def ipv6_loopback() -> str | None:
    """Why this machine can't serve on IPv6 loopback, or None."""
    if not socket.has_ipv6:
        return "Python was built without IPv6 (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1 ({exc})"
    return None


def free_port6() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]


def test_the_demo_config_brackets_ipv6_hosts() -> None:
    from server.config import demo

    for host, shown in (("::1", "[::1]"), ("::", "[::]"), ("0.0.0.0", "0.0.0.0"),
                        ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost")):
        settings = demo(host, 8000)
        assert settings.server.public_url == f"http://{shown}:8000"
        [site] = settings.sites.values()
        assert site.origins == (f"http://{shown}:8000",)
        assert site.vendors["sendlane"].values["api_base"] == f"http://{shown}:8000/demo/sink/sendlane"
        # setDomain gets what the page's location.hostname is: brackets and all.
        assert site.vendors["rejoiner"].values["domain"] == shown


def test_serve_without_config_on_ipv6_serves_the_demo_there(tmp_path) -> None:
    """``--host ::`` bound nothing: the demo's URLs read 'http://:::8000/...' and the config
    was refused. Now the demo names the wildcard as URLs write it (http://[::]:port, as it
    names 0.0.0.0 verbatim; a browser on this machine reaches both), listens on IPv6 and
    the whole road runs: a page's event from that origin is accepted and the vendor
    stand-ins at the same address get the order."""
    import pytest

    if (why := ipv6_loopback()) is not None:
        pytest.skip(f"no IPv6 loopback here: {why}")
    port = free_port6()
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--host", "::",
                                "--port", str(port)], cwd=tmp_path, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    public = f"http://[::]:{port}"
    try:
        wait_healthy(f"http://[::1]:{port}", process)  # listening on IPv6
        with httpx.Client(base_url=public, timeout=30) as client:  # the URL it prints
            assert client.get("/demo/").status_code == 200
            assert f'"{public}/e"' in client.get("/s/demo.js").text
            events = [{"event": "page_view", "event_id": "v6-1",
                       "page": {"location": f"{public}/demo/"}}]
            answer = client.post("/e", content=json.dumps({"site_id": "demo", "events": events}),
                                 headers={"content-type": "text/plain", "origin": public})
            assert answer.status_code == 204, answer.text
            order = client.post("/demo/order", json={
                "user": {"email": "ann@example.com"},
                "ecommerce": {"currency": "USD", "transaction_id": "V6-1", "value": "12.00",
                              "items": [{"item_id": "SKU-1", "item_name": "One",
                                         "price": "12.00", "quantity": 1}]}})
            assert order.status_code == 202, order.text
            deadline = time.monotonic() + 30
            while not any(r["path"].endswith("/order-placed")
                          for r in client.get("/demo/sink").json()):
                assert time.monotonic() < deadline, client.get("/demo/sink").json()
                time.sleep(0.2)
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert f"onetag: open {public}/demo/ " in output, output


def test_check_refuses_an_unknown_placeholder_in_a_configured_url(tmp_path) -> None:
    """The contract's own webhook_url passed check and was sent as written; a misspelt
    placeholder must be named."""
    (tmp_path / "onetag.toml").write_text(
        '[[sites]]\nid = "shop1"\n\n[sites.remarkety]\nstore_id = "ST1"\napi_key = "rm-key"\n'
        'webhook_url = "https://webhooks.remarkety.com/webhooks/?storeId={store_id}"\n')
    assert onetag("check", cwd=tmp_path).returncode == 0
    (tmp_path / "onetag.toml").write_text(
        (tmp_path / "onetag.toml").read_text().replace("{store_id}", "{storeId}"))
    result = onetag("check", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "onetag.toml: sites[shop1].remarkety.webhook_url: names {storeId}, which is no " \
           "placeholder: the placeholders are {store_id}" in result.stderr, result.stderr


def test_serve_refuses_to_start_with_a_weak_admin_token_or_api_key(tmp_path) -> None:
    (tmp_path / "onetag.toml").write_text(
        f'[server]\ndatabase = "sqlite:///{tmp_path}/o.db"\nadmin_token = "a"\n'
        '\n[[sites]]\nid = "shop1"\napi_key = "a"\n')
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--port", "19851"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    for where in ("server.admin_token", "sites[shop1].api_key"):
        assert f"onetag.toml: {where}: must be at least 16 characters" in result.stderr, \
            result.stderr
