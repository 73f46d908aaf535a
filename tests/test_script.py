"""GET /s/{site}.js: only public ids, only enabled vendors, ETag, gzip and brotli, a JS 404."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import brotli
from hypothesis import given
from hypothesis import strategies as st
from support import running, settings_for

from server.script import accepted_codings

SECRETS = {"rejoiner": {"site_id": "RJSITE1", "domain": ".shop.example", "api_key": "rj-SECRET-1"},
           "remarkety": {"store_id": "RMSTORE", "api_key": "rm-SECRET-2"},
           "esputnik": {"site_id": "ESSITE", "api_key": "es-SECRET-3"},
           "sendlane": {"integration_token": "sl-public-token", "api_token": "sl-SECRET-4"}}


def embedded_config(js: str) -> dict:
    """The config JSON the runtime is called with (its last argument), under readable names:
    server/script.py script_config gives it one-letter keys."""
    calls = list(re.finditer(r"\(window, ?document, ?(?=\{)", js))
    assert calls, "the runtime should embed its config as JSON"
    raw = json.JSONDecoder().raw_decode(js, calls[-1].end())[0]
    names = {"e": "endpoint", "s": "site_id", "m": "spa_manual", "f": "capture_form_email",
             "d": "debug", "u": "cart_url", "c": "currency", "v": "vendors",
             "g": "consent_keys"}
    config = {names[k]: v for k, v in raw.items()}
    config["vendors"] = {name: {"routes": routes, "settings": settings}
                         for name, (routes, settings) in config["vendors"].items()}
    return config


async def test_no_secret_ever_reaches_the_browser(tmp_path) -> None:
    settings = settings_for(tmp_path, **SECRETS)
    async with running(settings) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    for secret in ("rj-SECRET-1", "rm-SECRET-2", "es-SECRET-3", "sl-SECRET-4", "secret-key-0123456789"):
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
    # public ones the adapter reads (eSputnik's reads script_url only: site_id is the server's,
    # script_id is already inside script_url).
    settings = settings_for(tmp_path, esputnik={"site_id": "ESSITE", "script_id": "ESLOADER"},
                            remarkety={"store_id": "RMSTORE", "api_key": "rm-secret-key",
                                       "routes": {"*": "off", "quiz": "browser", "search": "off"}})
    async with running(settings) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    vendors = embedded_config(js)["vendors"]
    routes = vendors["remarkety"]["routes"]
    assert routes[0] == 0 and "quiz" in routes and "search" not in routes
    # eSputnik's adapter acts on its BROWSER_EVENTS only, all of them browser-routed by default:
    # nothing else to say.
    assert vendors["esputnik"]["routes"] == [1]
    assert vendors["esputnik"]["settings"] == {"script_url": "https://cdn.esputnik.com/scripts/ESLOADER.js"}


async def test_etag_cache_control_and_gzip(tmp_path) -> None:
    settings = settings_for(tmp_path)
    async with running(settings) as (_, client):
        plain = await client.get("/s/shop1.js", headers={"accept-encoding": "identity"})
        assert plain.status_code == 200
        assert plain.headers["content-type"] == "application/javascript; charset=utf-8"
        assert plain.headers["cache-control"] == "public, max-age=300"
        etag = plain.headers["etag"]
        zipped = await client.get("/s/shop1.js", headers={"accept-encoding": "gzip, deflate"})
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.headers["vary"] == "Accept-Encoding"
        assert zipped.text == plain.text  # httpx decodes it
        async with client.stream("GET", "/s/shop1.js", headers={"accept-encoding": "gzip"}) as wire:
            raw = b"".join([chunk async for chunk in wire.aiter_raw()])
        assert len(raw) < len(plain.content) and gzip.decompress(raw) == plain.content
        again = await client.get("/s/shop1.js", headers={"if-none-match": etag})
        assert again.status_code == 304 and again.content == b""


async def test_brotli_for_a_browser_that_asks_for_it(tmp_path) -> None:
    """A current browser on https sends "gzip, deflate, br, zstd": it gets brotli, the
    smallest; a coding refused with q=0 is never chosen."""
    async with running(settings_for(tmp_path)) as (_, client):
        plain = await client.get("/s/shop1.js", headers={"accept-encoding": "identity"})
        sizes = {}
        for header, coding in [("gzip, deflate, br, zstd", "br"), ("br;q=0.5, gzip", "br"),
                               ("br;q=0, gzip", "gzip"), ("BR", "br"), ("*", "gzip"),
                               ("br;q=0, gzip;q=0", None), ("deflate", None)]:
            async with client.stream("GET", "/s/shop1.js",
                                     headers={"accept-encoding": header}) as wire:
                raw = b"".join([chunk async for chunk in wire.aiter_raw()])
                assert wire.headers.get("content-encoding") == coding, header
                assert wire.headers["etag"] == plain.headers["etag"]
            decoded = {"br": brotli.decompress, "gzip": gzip.decompress, None: bytes}[coding](raw)
            assert decoded == plain.content, header
            sizes[coding] = len(raw)
    assert sizes["br"] < sizes["gzip"] < sizes[None]


@given(st.text(max_size=80))
def test_accepted_codings_reads_any_header(header: str) -> None:
    codings = accepted_codings(header)
    assert all(coding and coding == coding.strip() and not set(coding) & {",", ";"}
               for coding in codings)
    assert accepted_codings("gzip;q=0.001, br;q=0, identity;q=bad") == {"gzip"}


async def test_unknown_site_is_a_js_404(tmp_path) -> None:
    async with running(settings_for(tmp_path)) as (_, client):
        response = await client.get("/s/nosuch.js")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/javascript")
    assert response.text.startswith("/* onetag: no site 'nosuch'")
    async with running(settings_for(tmp_path)) as (_, client):
        long = await client.get("/s/" + "x" * 3000 + ".js")
    # A site id from the path is quoted short ("/" can't be in it: no "*/" ends the comment).
    assert long.status_code == 404 and len(long.content) < 200, long.text


# The wire form: minified by tools/js/build.py; the readable source on request. ---------------


async def test_browsers_get_the_minified_script_and_debug_the_readable_one(tmp_path) -> None:
    settings = settings_for(tmp_path, **SECRETS)
    async with running(settings) as (_, client):
        wire = (await client.get("/s/shop1.js")).text
        readable = (await client.get("/s/shop1.js?onetag_debug=1")).text
    assert "/*" not in wire and "\n  " not in wire  # no comments, no indentation
    assert "function mergeIdentity(user)" in readable and "Basic Snippet" in readable
    assert embedded_config(wire) == embedded_config(readable)
    assert len(wire) < len(readable) // 2
    for secret in ("rj-SECRET-1", "rm-SECRET-2", "es-SECRET-3", "sl-SECRET-4", "secret-key-0123456789"):
        assert secret not in readable


async def test_the_wire_form_has_no_logging_and_no_debug_switch(tmp_path) -> None:
    """The minified build has no logging (the debug build has), nor code that looks for a debug
    switch: debugging is asking for the readable build (?onetag_debug=1 on the script URL)."""
    async with running(settings_for(tmp_path, **SECRETS)) as (_, client):
        wire = (await client.get("/s/shop1.js")).text
        readable = (await client.get("/s/shop1.js?onetag_debug=1")).text
    assert "console.log" not in wire and "console.log" in readable
    assert "onetag_debug" not in wire and "sessionStorage" not in wire


async def test_features_a_site_turns_off_are_compiled_out(tmp_path) -> None:
    """spa_page_views = "manual" leaves out the history hooks, capture_form_email = false the
    form listeners (templates/features/): a site gets no code it cannot use."""
    async with running(settings_for(tmp_path)) as (_, client):
        default = (await client.get("/s/shop1.js")).text
    async with running(settings_for(tmp_path, spa_page_views="manual",
                                    capture_form_email=False)) as (_, client):
        off = (await client.get("/s/shop1.js")).text
        off_readable = (await client.get("/s/shop1.js?onetag_debug=1")).text
    for marker in ('"pushState"', '"popstate"', '"blur"', "@\\S+"):
        assert marker in default, marker
        assert marker not in off and marker not in off_readable, marker
    # Exactly their code: each feature's generated part, less its header line.
    features = Path(__file__).resolve().parent.parent / "templates" / "features"
    parts = [(features / f"{name}.min.js.j2").read_text().split("\n", 1)[1].rstrip("\n")
             for name in ("spa_page_views", "capture_form_email")]
    assert all(part in default for part in parts)
    assert len(default) - len(off) == sum(map(len, parts)) > 400


async def test_a_debug_site_is_served_the_readable_script(tmp_path) -> None:
    async with running(settings_for(tmp_path, debug=True)) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    assert "function mergeIdentity(user)" in js and embedded_config(js)["debug"] == 1


async def test_the_sites_currency_reaches_the_runtime(tmp_path) -> None:
    """``c``: the site's currency, which the browser adapters fall back to for an event that
    names none, as the server adapters do (PlanContext.currency)."""
    settings = settings_for(tmp_path)
    async with running(settings) as (_, client):
        js = (await client.get("/s/shop1.js")).text
    assert embedded_config(js)["currency"] == settings.sites["shop1"].currency == "USD"
    from types import SimpleNamespace

    from server.script import script_config
    site = settings.sites["shop1"]
    other = SimpleNamespace(**{**{k: getattr(site, k) for k in site.__dataclass_fields__}, "currency": "EUR"})
    assert script_config(settings, other)["c"] == "EUR"


def test_the_sites_cart_url_reaches_the_runtime(tmp_path) -> None:
    """``cart_url`` (a per-site setting: a template with {cart_guid} and {sc}) is passed as `u`;
    read with getattr, so a site without the setting has no `u`."""
    import dataclasses
    from types import SimpleNamespace

    from server.script import script_config

    settings = settings_for(tmp_path)
    site = settings.sites["shop1"]
    assert "u" not in script_config(settings, site)
    fields = {f.name: getattr(site, f.name) for f in dataclasses.fields(site)}
    with_url = SimpleNamespace(**{**fields, "cart_url": "https://shop.example/cart/{cart_guid}"})
    assert script_config(settings, with_url)["u"] == "https://shop.example/cart/{cart_guid}"
    # The code that fills the template in (templates/features/cart_url.js.j2) comes only with one.
    from server.script import environment, render
    # Its mark: the placeholders' pattern, /\{(cart_guid|sc)\}|.../.
    for readable in (False, True):
        assert "(cart_guid|sc)" not in render(environment(), settings, site, readable).body.decode()
        filled = render(environment(), settings, with_url, readable).body.decode()
        assert "(cart_guid|sc)" in filled and "cartUrl" in filled


def test_the_minified_templates_are_up_to_date() -> None:
    """The checked-in *.min.js.j2 are what `python tools/js/build.py` makes from the readable
    sources now (terser pinned in tools/js/package-lock.json; `npm ci` on first use)."""
    import shutil
    import sys
    from pathlib import Path

    import pytest

    if shutil.which("node") is None:
        pytest.skip("node is not installed: the minifier (terser) runs on Node.js")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "js"))
    import build

    try:
        stale = build.stale()
    except build.BuildError as exc:
        pytest.fail(str(exc))
    assert stale == [], f"stale generated files, run `python tools/js/build.py`: {stale}"


def test_no_line_of_the_readable_sources_is_over_160_characters() -> None:
    from pathlib import Path

    templates = Path(__file__).resolve().parent.parent / "templates"
    for path in [templates / "onetag.js.j2", *sorted((templates / "features").glob("*.js.j2")),
                 *sorted((templates / "vendors").glob("*.js.j2"))]:
        if path.name.endswith(".min.js.j2"):
            continue
        long = [n for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 160]
        assert long == [], (path.name, long)


async def test_a_helper_only_some_adapters_call_comes_only_with_them(tmp_path) -> None:
    """identityDue (templates/vendors/_identity.js.j2) is Rejoiner's and Sendlane's: a site with
    neither gets no copy of it."""
    async with running(settings_for(tmp_path, remarkety=SECRETS["remarkety"])) as (_, client):
        without = (await client.get("/s/shop1.js?onetag_debug=1")).text
    async with running(settings_for(tmp_path, sendlane=SECRETS["sendlane"])) as (_, client):
        with_it = (await client.get("/s/shop1.js?onetag_debug=1")).text
    assert "function identityDue(" not in without and "function identityDue(" in with_it


async def test_esputnik_routes_are_said_over_the_names_its_adapter_acts_on(tmp_path) -> None:
    """The eSputnik adapter makes calls for its BROWSER_EVENTS only, so the script's routes for
    it are exact over those names and silent about the rest (routing.browser_routes)."""
    from server.vendors import esputnik

    source = (Path(__file__).parent.parent / "templates" / "vendors" / "esputnik.js.j2").read_text()
    cart_events = {"add_to_cart", "remove_from_cart", "view_cart", "cart_updated", "begin_checkout"}
    assert "else if (cartEvent)" in source  # the runtime's cart events, below
    assert set(re.findall(r'eventName == "(\w+)"', source)) | cart_events == esputnik.BROWSER_EVENTS
    few = {"site_id": "ESSITE", "routes": {"purchase": "server", "search": "off"}}
    most = {"site_id": "ESSITE", "routes": {name: "off" for name in esputnik.BROWSER_EVENTS - {"view_item"}}}
    for section, routes in ((few, [1, "purchase", "search"]), (most, [0, "view_item"])):
        async with running(settings_for(tmp_path, esputnik=section)) as (_, client):
            js = (await client.get("/s/shop1.js")).text
        assert embedded_config(js)["vendors"]["esputnik"]["routes"] == routes


def test_the_size_bench_splits_a_script_into_its_parts(tmp_path) -> None:
    """bench/script_size.py --parts: every included part of a served script is found in it and
    costs gzip bytes; the runtime takes the rest, so the costs add up to the whole."""
    import sys

    from server.script import environment, render
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import script_size

    settings = settings_for(tmp_path, **SECRETS)
    script = render(environment(), settings, settings.sites["shop1"])
    costs = script_size.part_costs(script.body, script_size.parts())
    assert set(costs) == {"config", "runtime", "features/spa_page_views.min.js.j2",
                          "features/capture_form_email.min.js.j2", "vendors/_money.min.js.j2",
                          "vendors/_identity.min.js.j2", *(f"vendors/{v}.min.js.j2" for v in SECRETS)}
    assert all(cost > 20 for cost in costs.values()), costs
    assert sum(costs.values()) == len(script.gzipped)


async def test_consent_required_adds_the_gate_and_its_keys_and_none_leaves_both_out(tmp_path) -> None:
    """consent = "required" includes features/consent.js.j2 and tells it the Consent Mode keys
    that must be granted (``g``): analytics_storage, and ad_storage when the site loads vendor
    libraries. The default ("none") script has neither."""
    gate = (Path(__file__).resolve().parent.parent / "templates" / "features"
            / "consent.min.js.j2").read_text().split("\n", 1)[1].rstrip("\n")
    async with running(settings_for(tmp_path, rejoiner=SECRETS["rejoiner"])) as (_, client):
        default = (await client.get("/s/shop1.js")).text
    async with running(settings_for(tmp_path, consent="required")) as (_, client):
        alone = (await client.get("/s/shop1.js")).text
    async with running(settings_for(tmp_path, consent="required",
                                    rejoiner=SECRETS["rejoiner"])) as (_, client):
        vendors = (await client.get("/s/shop1.js")).text
    assert "consent_keys" not in embedded_config(default) and gate not in default
    assert embedded_config(alone)["consent_keys"] == ["analytics_storage"] and gate in alone
    assert embedded_config(vendors)["consent_keys"] == ["analytics_storage", "ad_storage"]
