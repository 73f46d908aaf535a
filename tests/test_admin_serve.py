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
