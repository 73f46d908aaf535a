"""The console's and the backend API's doors on a real ``onetag serve`` process (slow:
tests/conftest.py): what holds across a restart of the process, and the client address
uvicorn gives the app from X-Forwarded-For."""

from __future__ import annotations

import re

import httpx

from fakes.harness import free_port, server_process, settings_data, write_config
from server.admin.web import SESSION_COOKIE

ADMIN = "serve-admin-token-0123456789"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')


def csrf(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, "no csrf_token field in the page"
    return found.group(1)


def log_in(client: httpx.Client, token: str = ADMIN, **headers: str) -> httpx.Response:
    page = client.get("/admin/login", headers=headers)
    assert page.status_code == 200, page.text
    return client.post("/admin/login", headers=headers,
                       data={"csrf_token": csrf(page.text), "token": token})


def test_a_logout_is_refused_after_onetag_serve_restarts(tmp_path, fake) -> None:
    """Logged-out sessions were a list in the process: log in, keep the cookie, log out,
    restart ``onetag serve``, and the kept cookie got 200 on /admin/live."""
    port = free_port()
    data = settings_data(tmp_path, fake, only=("sendlane",), port=port, forward=False)
    data["server"]["admin_token"] = ADMIN
    path = write_config(tmp_path / "onetag.toml", data)
    base = f"http://127.0.0.1:{port}"
    with server_process(path, port, log=tmp_path / "serve.log"):
        with httpx.Client(base_url=base, timeout=10) as client:
            assert log_in(client).status_code == 303
            kept = client.cookies[SESSION_COOKIE]
            live = client.get("/admin/live")
            assert live.status_code == 200
            out = client.post("/admin/logout", headers={"X-CSRF-Token": csrf(live.text)})
            assert out.status_code == 303
            client.cookies.set(SESSION_COOKIE, kept, path="/admin")
            assert client.get("/admin/live").status_code == 303
    with server_process(path, port, log=tmp_path / "serve.log"):
        with httpx.Client(base_url=base, timeout=10) as client:
            client.cookies.set(SESSION_COOKIE, kept, path="/admin")
            assert client.get("/admin/live").status_code == 303
            assert log_in(client).status_code == 303  # a new session is one
            assert client.get("/admin/live").status_code == 200


def guesses(base: str, addresses: list[str]) -> list[int]:
    """A wrong login from each X-Forwarded-For address in turn: the answers' statuses."""
    with httpx.Client(base_url=base, timeout=10) as client:
        return [log_in(client, "a-wrong-token", **{"X-Forwarded-For": address}).status_code
                for address in addresses]


def test_x_forwarded_for_is_believed_only_from_the_trusted_proxies(tmp_path, fake) -> None:
    """uvicorn's default trusted 127.0.0.1: behind a proxy on the same host that passed the
    client's X-Forwarded-For on, a client chose its own address: 12 wrong logins in a row and
    no 429, and the forged address in the access log. By default no proxy is trusted now; a
    listed one is believed."""
    port = free_port()
    data = settings_data(tmp_path, fake, only=("sendlane",), port=port, forward=False)
    data["server"]["admin_token"] = ADMIN
    path = write_config(tmp_path / "onetag.toml", data)
    base = f"http://127.0.0.1:{port}"
    forged = [f"203.0.113.{n}" for n in range(12)]
    log = tmp_path / "default.log"
    with server_process(path, port, log=log, log_level="info"):
        assert guesses(base, forged[:6]) == [401] * 5 + [429]  # one address: the peer's
    access = log.read_text()
    assert "127.0.0.1" in access and "203.0.113." not in access

    data["server"]["trusted_proxies"] = ["127.0.0.1"]
    path = write_config(tmp_path / "onetag.toml", data)
    log = tmp_path / "trusted.log"
    with server_process(path, port, log=log, log_level="info"):
        # The proxy appends what it was reached from: the nearest untrusted address counts.
        appended = [f"198.51.100.9, {address}" for address in ["203.0.113.50"] * 6]
        assert guesses(base, appended) == [401] * 5 + [429]
        assert guesses(base, ["203.0.113.51"]) == [401]  # another client: its own count
    assert "203.0.113.50" in log.read_text() and "198.51.100.9" not in log.read_text()
