"""GET /s/{site}.js: only public ids, only enabled vendors, ETag, gzip, a JS 404."""

from __future__ import annotations

import gzip
import json

from support import running, settings_for

SECRETS = {"rejoiner": {"site_id": "RJSITE1", "domain": ".shop.example", "api_key": "rj-SECRET-1"},
           "remarkety": {"store_id": "RMSTORE", "api_key": "rm-SECRET-2"},
           "esputnik": {"site_id": "ESSITE", "api_key": "es-SECRET-3"},
           "sendlane": {"integration_token": "sl-public-token", "api_token": "sl-SECRET-4"}}


def embedded_config(js: str) -> dict:
    """The config JSON the runtime is called with (its last argument), under readable names:
    server/script.py script_config gives it one-letter keys."""
    start = js.rfind("(window,document,{")
    assert start >= 0, "the runtime should embed its config as JSON"
    raw = json.JSONDecoder().raw_decode(js, start + len("(window,document,"))[0]
    names = {"e": "endpoint", "s": "site_id", "m": "spa_manual", "f": "capture_form_email",
             "d": "debug", "v": "vendors"}
    config = {names[k]: v for k, v in raw.items()}
    config["vendors"] = {name: {"routes": routes, "settings": settings}
                         for name, (routes, settings) in config["vendors"].items()}
    return config


async def test_no_secret_ever_reaches_the_browser(tmp_path) -> None:
    settings = settings_for(tmp_path, **SECRETS)
    async with running(settings) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    for secret in ("rj-SECRET-1", "rm-SECRET-2", "es-SECRET-3", "sl-SECRET-4", "secret-key"):
        assert secret not in js
    for public in ("RJSITE1", "RMSTORE", "ESSITE", "sl-public-token"):
        assert public in js
    config = embedded_config(js)
    assert set(config["vendors"]) == {"rejoiner", "remarkety", "esputnik", "sendlane"}
    assert "api_key" not in json.dumps(config) and "api_token" not in json.dumps(config)
    assert config["endpoint"] == "https://data.shop.example/e"


async def test_only_enabled_vendors_are_compiled_in(tmp_path) -> None:
    settings = settings_for(tmp_path, rejoiner=SECRETS["rejoiner"])
    async with running(settings) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    assert list(embedded_config(js)["vendors"]) == ["rejoiner"]
    assert "_rejoiner" in js
    for other in ("_rmData", "_Sendlane", "esputnik"):
        assert other not in js


async def test_routes_and_settings_are_sent_compactly(tmp_path) -> None:
    # routes: [default for unlisted names, names answering the opposite]; settings: only the
    # public ones the adapter reads (eSputnik's script_id is already inside script_url).
    settings = settings_for(tmp_path, esputnik={"site_id": "ESSITE", "script_id": "ESLOADER"},
                            remarkety={"store_id": "RMSTORE",
                                       "routes": {"*": "off", "quiz": "browser", "search": "off"}})
    async with running(settings) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    vendors = embedded_config(js)["vendors"]
    routes = vendors["remarkety"]["routes"]
    assert routes[0] == 0 and "quiz" in routes and "search" not in routes
    assert vendors["esputnik"]["routes"][0] == 0 and "purchase" in vendors["esputnik"]["routes"]
    assert vendors["esputnik"]["settings"] == {
        "site_id": "ESSITE", "script_url": "https://cdn.esputnik.com/scripts/ESLOADER.js"}


async def test_etag_cache_control_and_gzip(tmp_path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (_, client):
        plain = await client.get("/s/shop1.js", headers={"accept-encoding": "identity"})
        assert plain.status_code == 200
        assert plain.headers["content-type"] == "application/javascript; charset=utf-8"
        assert plain.headers["cache-control"] == "public, max-age=300"
        etag = plain.headers["etag"]
        zipped = await client.get("/s/shop1.js", headers={"accept-encoding": "gzip, br"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.text == plain.text  # httpx decodes it
        async with client.stream("GET", "/s/shop1.js", headers={"accept-encoding": "gzip"}) as wire:
            raw = b"".join([chunk async for chunk in wire.aiter_raw()])
        assert len(raw) < len(plain.content) and gzip.decompress(raw) == plain.content
        again = await client.get("/s/shop1.js", headers={"if-none-match": etag})
        assert again.status_code == 304 and again.content == b""


async def test_unknown_site_is_a_js_404(tmp_path) -> None:
    async with running(settings_for(tmp_path)) as (_, client):
        response = await client.get("/s/nosuch.js")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/javascript")
    assert response.text.startswith("/* onetag: no site 'nosuch'")
