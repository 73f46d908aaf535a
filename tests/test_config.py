"""Config: env: values, defaults, and every problem reported with its location."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from server import config
from server.config import ConfigError
from server.vendors import VENDORS


def problems(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(data, file="onetag.toml", env=env or {})
    return [str(p) for p in caught.value.problems]


def test_env_values_defaults_and_vendor_url_templates() -> None:
    settings = config.parse({
        "server": {"database": "sqlite:///x.db", "admin_token": "env:ADMIN"},
        "sites": [{"id": "shop1", "origins": ["https://shop.example/"], "api_key": "env:KEY",
                   "remarkety": {"store_id": "ST1", "api_key": "env:RM"},
                   "esputnik": {"site_id": "8A412DC"}}],
    }, env={"ADMIN": "a" * 16, "KEY": "k" * 16, "RM": "r"})
    site = settings.sites["shop1"]
    assert settings.server.admin_token == "a" * 16 and site.api_key == "k" * 16
    assert site.origins == ("https://shop.example",)
    assert site.vendors["remarkety"]["api_key"] == "r"
    assert site.vendors["remarkety"]["webhook_url"].endswith("storeId=ST1")
    assert site.vendors["esputnik"]["script_id"] == "8A412DC"
    assert site.vendors["esputnik"]["script_url"].endswith("/8A412DC.js")
    assert settings.server.public_url == "http://127.0.0.1:8000"
    assert settings.server.sqlite_path == "x.db"


def test_every_problem_is_reported_with_its_location() -> None:
    found = problems({
        "server": {"database": "postgres://x", "public_url": "ftp://x", "colour": "red"},
        "sites": [
            {"id": "shop 1", "origins": ["shop.example"], "currency": "dollars",
             "api_key": "env:MISSING", "spa_page_views": "sometimes",
             "rejoiner": {"domain": "x", "routes": {"purchase": "twice"}, "apikey": "typo"}},
            {"id": "shop2", "sendlane": "yes"},
            {"id": "shop2"},
        ],
    })
    expected = [
        "onetag.toml: server.colour: unknown key",
        "onetag.toml: server.database: a PostgreSQL URL names its database",
        "onetag.toml: server.public_url: must be an http(s) URL",
        "onetag.toml: sites[shop 1].id: must be 1-64 characters",
        "onetag.toml: sites[shop 1].origins[0]: 'shop.example' is not an origin",
        "onetag.toml: sites[shop 1].currency: must be a 3-letter ISO 4217 code",
        "onetag.toml: sites[shop 1].spa_page_views: must be \"auto\" or \"manual\"",
        "onetag.toml: sites[shop 1].rejoiner.apikey: unknown key",
        "onetag.toml: sites[shop 1].rejoiner.site_id: is required",
        "onetag.toml: sites[shop 1].rejoiner.routes.purchase: must be one of browser, server, both, fallback, off",
        # The misspelt key leaves the REST API's key unset, which server routes need.
        "onetag.toml: sites[shop 1].rejoiner.api_key: is required",
        "onetag.toml: sites[shop 1].api_key: environment variable MISSING is not set",
        "onetag.toml: sites[shop2].sendlane: must be a table",
        "onetag.toml: sites[shop2].id: is used by two sites",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in found), (line, found)
    assert len(found) == len(expected), found


def test_no_sites_is_a_problem() -> None:
    assert problems({"server": {}}) == [
        "onetag.toml: sites: no [[sites]] defined: add at least one site"]


def test_routes_override_defaults_only_where_given() -> None:
    settings = config.parse({"sites": [{"id": "s", "rejoiner": {
        "site_id": "R", "api_key": "k", "routes": {"purchase": "server"}}}]}, env={})
    vendor = settings.sites["s"].vendors["rejoiner"]
    assert vendor.route("purchase") == "server"
    from server.vendors import rejoiner
    for event, mode in rejoiner.DEFAULT_ROUTES.items():
        if event != "purchase":
            assert vendor.route(event) == mode


def test_load_reads_toml_and_names_the_file(tmp_path) -> None:
    path = tmp_path / "onetag.toml"
    path.write_text('[[sites]]\nid = "s"\ncurrency = 5\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})
    assert str(caught.value.problems[0]) == f"{path}: sites[s].currency: must be a string, not int"
    path.write_text("[[sites]\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, env={})
    assert "not valid TOML" in str(caught.value)


def test_demo_settings_point_every_vendor_at_loopback() -> None:
    settings = config.demo("127.0.0.1", 8123)
    assert settings.is_demo and list(settings.sites) == ["demo"]
    site = settings.sites["demo"]
    assert set(site.vendors) == {"rejoiner", "remarkety", "esputnik", "sendlane"}
    for vendor in site.vendors.values():
        for key, value in vendor.values.items():
            if key.endswith("_url") or key == "api_base":
                assert value.startswith("http://127.0.0.1:8123/"), (vendor.name, key, value)


def test_cart_url_is_a_template_of_cart_guid_and_sc() -> None:
    site = {"id": "shop1", "cart_url": "https://shop.example/cart/{cart_guid}?s={sc}"}
    assert config.parse({"sites": [site]}, env={}).sites["shop1"].cart_url == site["cart_url"]
    assert config.parse({"sites": [{"id": "shop1"}]}, env={}).sites["shop1"].cart_url is None
    assert problems({"sites": [{"id": "shop1", "cart_url": "https://s/{order}"}]}) == [
        "onetag.toml: sites[shop1].cart_url: names 'order'; the only placeholders are "
        "{cart_guid} and {sc}"]
    assert problems({"sites": [{"id": "shop1", "cart_url": "/cart/{cart_guid}"}]}) == [
        "onetag.toml: sites[shop1].cart_url: must be an http(s) URL like "
        "\"https://shop.example/cart?id={cart_guid}\", not '/cart/{cart_guid}'"]
    [unbalanced] = problems({"sites": [{"id": "shop1", "cart_url": "https://s/{cart_guid"}]})
    assert unbalanced.startswith("onetag.toml: sites[shop1].cart_url: is not a valid template")


def test_order_source_defaults_with_the_api_key_and_the_identity_secret_is_checked() -> None:
    settings = config.parse({"sites": [
        {"id": "with_key", "api_key": "k" * 16, "identity_secret": "env:SECRET"},
        {"id": "without_key"},
        {"id": "chosen", "api_key": "k" * 16, "order_source": "browser"}]},
        env={"SECRET": "s" * 32})
    assert settings.sites["with_key"].order_source == "backend"
    assert settings.sites["with_key"].identity_secret == "s" * 32
    assert settings.sites["without_key"].order_source == "browser"
    assert settings.sites["without_key"].identity_secret is None
    assert settings.sites["chosen"].order_source == "browser"
    found = problems({"sites": [
        {"id": "a", "order_source": "backend"},
        {"id": "b", "api_key": "k" * 16, "order_source": "page"},
        {"id": "c", "identity_secret": "short"},
        {"id": "d", "identity_secret": "env:UNSET"}]})
    assert [p.split(":", 2)[1].strip() for p in found] == [
        "sites[a].order_source", "sites[b].order_source", "sites[c].identity_secret",
        "sites[d].identity_secret"]
    assert "needs the site's api_key" in found[0]
    assert "environment variable UNSET is not set" in found[3]


def test_commands_that_never_send_load_without_secrets() -> None:
    data = {"server": {"admin_token": "env:ADMIN"},
            "sites": [{"id": "shop1", "api_key": "env:KEY", "order_source": "backend",
                       "identity_secret": "env:IDENTITY",
                       "sendlane": {"integration_token": "T", "api_token": "env:SL"}}]}
    found = problems(data)
    assert found == [f"onetag.toml: {where}: environment variable {name} is not set"
                     for where, name in (("server.admin_token", "ADMIN"),
                                         ("sites[shop1].sendlane.api_token", "SL"),
                                         ("sites[shop1].api_key", "KEY"),
                                         ("sites[shop1].identity_secret", "IDENTITY"))]
    settings = config.parse(data, env={"SL": "s"}, require_secrets=False)
    site = settings.sites["shop1"]
    assert settings.server.admin_token is None and site.api_key is None
    assert site.order_source == "backend"  # an unset api_key is still a configured one
    assert site.vendors["sendlane"]["api_token"] == "s"
    assert settings.unset == ("server.admin_token", "sites[shop1].api_key",
                              "sites[shop1].identity_secret")
    # Everything else is still checked.
    with pytest.raises(ConfigError) as caught:
        config.parse({**data, "server": {"public_url": "nope"}}, env={}, require_secrets=False)
    assert [p.where for p in caught.value.problems] == ["onetag.toml: server.public_url"]


def test_an_unset_database_variable_is_a_problem_even_for_commands_that_never_send() -> None:
    """``database = "env:..."`` names what every command works on: unset, ``migrate`` or
    ``deliveries`` must not fall back to the default SQLite file (migrate made and migrated
    a new onetag.db there, and said so as if the PostgreSQL database had been)."""
    data = {"server": {"database": "env:ONETAG_DATABASE_URL", "admin_token": "env:ADMIN"},
            "sites": [{"id": "shop1"}]}
    for require_secrets in (True, False):
        with pytest.raises(ConfigError) as caught:
            config.parse(data, env={}, require_secrets=require_secrets)
        found = [f"{p.where}: {p.message}" for p in caught.value.problems]
        assert ("onetag.toml: server.database: environment variable ONETAG_DATABASE_URL is "
                "not set") in found
        assert any("admin_token" in line for line in found) == require_secrets
    settings = config.parse(data, env={"ONETAG_DATABASE_URL": "postgresql://u@h:5432/db"},
                            require_secrets=False)
    assert settings.server.database == "postgresql://u@h:5432/db"
    assert settings.unset == ("server.admin_token",)


def test_unknown_keys_suggest_the_nearest_known_one() -> None:
    found = problems({
        "server": {"public_ur": "http://127.0.0.1:8000", "zzz": 1},
        "sites": [{"id": "shop1", "origin": ["https://shop.example"],
                   "rejoiner": {"site_id": "R", "api_bse": "https://x.example"},
                   "remarkety": {"store_id": "S", "webhook": "https://x.example"}}],
    })
    by_where = {p.split(": ")[1]: p for p in found}
    assert "unknown key (did you mean 'public_url'? expected one of: " in by_where["server.public_ur"]
    assert "did you mean" not in by_where["server.zzz"]
    assert "(did you mean 'origins'? " in by_where["sites[shop1].origin"]
    assert "(did you mean 'api_base'? " in by_where["sites[shop1].rejoiner.api_bse"]
    assert "(did you mean 'webhook_url'? " in by_where["sites[shop1].remarkety.webhook"]


def test_vendor_urls_must_be_absolute_http_urls() -> None:
    from server.vendors import VENDORS

    found = problems({"sites": [{"id": "shop1",
        "rejoiner": {"site_id": "R", "api_key": "k", "api_base": "rj2.rejoiner.com/api/v1"},
        "remarkety": {"store_id": "S", "api_key": "k", "webhook_url": "/webhooks/?storeId=S"},
        "esputnik": {"site_id": "E", "tracker_url": "ftp://tracker.example/api",
                     "script_url": "//cdn.example/e.js"},
        "sendlane": {"integration_token": "T", "api_base": "https://api.sendlane.example/v2",
                     "api_token": "k", "script_url": "http://127.0.0.1:9000/pusher.js"}}]})
    assert sorted(p.split(": ")[1] for p in found) == [
        "sites[shop1].esputnik.script_url", "sites[shop1].esputnik.tracker_url",
        "sites[shop1].rejoiner.api_base", "sites[shop1].remarkety.webhook_url"]
    assert all("must be an absolute http(s) URL like" in p for p in found)
    # Every setting whose default is a URL is checked as one (a new vendor's too).
    for module in VENDORS.values():
        for setting in module.SETTINGS:
            is_url_default = (setting.default or "").startswith(("http://", "https://"))
            assert setting.url == is_url_default, (module.NAME, setting.name)


def test_no_secret_in_a_settings_repr():
    """Debug logs print a site's config whole (aiosqlite's does): no secret may be in it."""
    settings = config.parse({
        "server": {"admin_token": "admin-token-secret-1234",
                   "database": "postgresql://onetag:db-password-secret-1234@db.example/onetag"},
        "sites": [{"id": "shop", "origins": ["https://shop.example"], "api_key": "site-key-secret-1234",
                   "identity_secret": "identity-secret-secret-1234",
                   "sendlane": {"integration_token": "integration-secret-1234",
                                "api_token": "api-token-secret-1234"}}]}, env={})
    text = repr(settings)
    assert "sendlane" in text and "shop" in text
    for secret in ("admin-token-secret-1234", "site-key-secret-1234", "db-password-secret-1234",
                   "identity-secret-secret-1234", "integration-secret-1234",
                   "api-token-secret-1234"):
        assert secret not in text


def wheres(found: list[str]) -> list[str]:
    """The key each problem names (``onetag.toml: <key>: message``)."""
    return [p.split(": ", 2)[1] for p in found]


def test_an_empty_or_in_memory_sqlite_database_is_refused() -> None:
    """An acknowledged event must be durable: ``sqlite:///`` and ``:memory:`` passed check,
    and serve answered 202 for events that were gone when it stopped."""
    for database in ("sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:",
                     "sqlite:///file:onetag.db?mode=memory&cache=shared"):
        found = problems({"server": {"database": database}, "sites": [{"id": "shop1"}]})
        assert wheres(found) == ["server.database"], (database, found)
    [empty] = problems({"server": {"database": "sqlite:///"}, "sites": [{"id": "shop1"}]})
    assert "names no file" in empty
    [memory] = problems({"server": {"database": "env:DB"}, "sites": [{"id": "shop1"}]},
                        env={"DB": "sqlite:///:memory:"})
    assert "in memory" in memory and "acknowledged" in memory
    for good in ("sqlite:///onetag.db", "sqlite:////var/lib/onetag/onetag.db"):
        settings = config.parse({"server": {"database": good}, "sites": [{"id": "s"}]}, env={})
        assert settings.server.sqlite_path == good[len("sqlite:///"):]


NUMBER_KEYS = {  # key: (a value inside its range, one just below it, one just above it)
    "hold_days": (0.5 / 86400, 0, 366),
    "browser_grace_s": (0, -1, 86401),
    "writer_timeout_s": (1, 0.999, 601),
    "shutdown_grace_s": (1, 0.5, 601),
    "header_timeout_s": (1, 0.5, 601),
    "body_timeout_s": (1, 0.5, 601),
    "keep_attempts_days": (1, 0, 3651),
    "keep_events_days": (1, -1, 3651),  # 0: kept forever (tests/test_retention.py)
    "max_pending_writes": (1, 0, 1_000_001),
    "max_pending_bytes": (1024, 1023, 16 * 1024 ** 3 + 1),
}


def test_a_key_pasted_with_its_line_break_is_refused_where_it_is_set() -> None:
    """A vendor key or id with a control character (an env: value set from a file with its
    newline) would make every request to that vendor one HTTP cannot carry: onetag check
    says so, naming the key, instead of each delivery dying at its first attempt."""
    found = problems({"sites": [{"id": "shop1", "api_key": "env:SITE",
                                 "sendlane": {"integration_token": "tok\r\n",
                                              "api_token": "env:SL"}}]},
                     env={"SITE": "s" * 32 + "\n", "SL": "abcdef0123456789\n"})
    by_where = dict(zip(wheres(found), found))
    assert sorted(by_where) == ["sites[shop1].api_key", "sites[shop1].sendlane.api_token",
                                "sites[shop1].sendlane.integration_token"], found
    assert all("control character" in text for text in by_where.values())
    assert "abcdef" not in " ".join(found)  # a secret is never echoed


def test_number_keys_are_finite_and_within_their_range() -> None:
    """nan and inf passed check: serve then died (shutdown_grace_s, hold_days), ran with no
    body timeout (body_timeout_s = nan), answered every request 503 (writer_timeout_s =
    0.001), or failed /healthz for good (keep_attempts_days = 1e300)."""
    for key, (inside, below, above) in NUMBER_KEYS.items():
        for bad in (float("nan"), float("inf"), float("-inf"), 1e300, below, above):
            found = problems({"server": {key: bad}, "sites": [{"id": "s"}]})
            assert wheres(found) == [f"server.{key}"], (key, bad, found)
            assert f"not {bad!r}" in found[0]
        settings = config.parse({"server": {key: inside}, "sites": [{"id": "s"}]}, env={})
        assert getattr(settings.server, key) == inside
    [nan] = problems({"server": {"writer_timeout_s": float("nan")}, "sites": [{"id": "s"}]})
    assert nan == ("onetag.toml: server.writer_timeout_s: must be a number of seconds from 1 "
                   "to 600, not nan")
    for key, bad in (("max_cart_lines", float("nan")), ("max_cart_lines", 10_001)):
        assert wheres(problems({"sites": [{"id": "s", key: bad}]})) == [f"sites[s].{key}"]
    for bad in (float("nan"), float("inf"), "nan"):
        found = problems({"sites": [{"id": "s", "coupons": {
            "webhook_url": "https://shop.example/c", "remarkety_api_key": "r" * 16,
            "webhook_secret": "w" * 16, "timeout_s": bad}}]})
        assert wheres(found) == ["sites[s].coupons.timeout_s"], (bad, found)


def test_the_number_ranges_are_the_ones_the_config_reference_states() -> None:
    """The Config reference (docs/config.md) gives every number key the range enforced."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert set(NUMBER_KEYS) == set(config.NUMBERS)
    for key in config.NUMBERS:
        [row] = [line for line in readme.splitlines() if line.startswith(f"| `[server] {key}` |")]
        assert f"({config.number_range(key)}" in row, (key, config.number_range(key), row)


def test_every_server_key_has_a_row_in_the_config_reference() -> None:
    """The Config reference (docs/config.md) names every [server] key the parser knows, with
    its default, and every [[sites]] key."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    site_rows = {line.split("`")[1].removeprefix("[[sites]] ") for line in readme.splitlines()
                 if line.startswith("| `[[sites]] ")}
    site_rows |= {line.split("`")[1].strip("[]").removeprefix("sites.")
                  for line in readme.splitlines() if line.startswith("| `[sites.")}
    assert config.SITE_KEYS | set(VENDORS) <= site_rows, config.SITE_KEYS - site_rows
    rows = {line.split("`")[1].removeprefix("[server] ") for line in readme.splitlines()
            if line.startswith("| `[server] ")}
    assert config.SERVER_KEYS <= rows, config.SERVER_KEYS - rows
    [row] = [line for line in readme.splitlines()
             if line.startswith("| `[server] trusted_proxies` | none |")]
    for stated in ("IP addresses and CIDR networks", "no host names, no `*`", "comma-separated"):
        assert stated in row


def test_trusted_proxies_are_ip_addresses_or_networks_and_none_by_default() -> None:
    """uvicorn believed X-Forwarded-For from 127.0.0.1 whatever the config said; the proxies
    to believe are a setting now, checked: an address or a CIDR network, never "*"."""
    site = [{"id": "s"}]
    assert config.parse({"sites": site}, env={}).server.trusted_proxies == ()
    given = ["127.0.0.1", "::1", "10.0.0.0/8", "2001:DB8::/32", " 192.0.2.7 "]
    assert config.parse({"server": {"trusted_proxies": given}, "sites": site},
                        env={}).server.trusted_proxies == (
        "127.0.0.1", "::1", "10.0.0.0/8", "2001:db8::/32", "192.0.2.7")
    from_env = config.parse({"server": {"trusted_proxies": "env:TP"}, "sites": site},
                            env={"TP": "127.0.0.1, 10.1.0.0/16"})
    assert from_env.server.trusted_proxies == ("127.0.0.1", "10.1.0.0/16")
    found = problems({"server": {"trusted_proxies": [
        "127.0.0.1", "*", "10.0.0.1/8", "proxy.internal", "300.1.1.1", "10.0.0.0/33", ""]},
        "sites": site})
    assert wheres(found) == [f"server.trusted_proxies[{n}]" for n in range(1, 7)], found
    assert "X-Forwarded-For from any client" in found[0]
    assert "10.0.0.0/8" in found[1]  # the network it likely meant
    assert "no host names" in found[2] and "'proxy.internal'" in found[2]
    for bad in (3, [1], {"a": "b"}, True):
        [one] = problems({"server": {"trusted_proxies": bad}, "sites": site})
        assert wheres([one]) == ["server.trusted_proxies"], bad
    [unset] = problems({"server": {"trusted_proxies": "env:NOPE"}, "sites": site})
    assert "NOPE is not set" in unset


def test_serve_passes_only_the_trusted_proxies_to_uvicorn() -> None:
    from server.cli import proxy_options

    assert proxy_options(()) == {"proxy_headers": False}
    assert proxy_options(("127.0.0.1", "10.0.0.0/8")) == {
        "proxy_headers": True, "forwarded_allow_ips": ["127.0.0.1", "10.0.0.0/8"]}


def test_origins_are_normalised_as_browsers_send_them() -> None:
    """``Origin`` comes with a lowercase scheme and host and without the scheme's default
    port: ``https://Shop.Example`` or ``https://b.example:443`` in the config matched nothing,
    and every event from the shop was refused 403."""
    settings = config.parse({"sites": [{"id": "shop1", "origins": [
        "HTTPS://Shop.Example/", "https://b.example:443", "http://c.example:80",
        "http://d.example:8080", "https://e.example:80", "https://[::1]:8443",
        "https://bücher.example"]}]}, env={})
    assert settings.sites["shop1"].origins == (
        "https://shop.example", "https://b.example", "http://c.example", "http://d.example:8080",
        "https://e.example:80", "https://[::1]:8443", "https://xn--bcher-kva.example")
    found = problems({"sites": [{"id": "shop1", "origins": [
        "https://a.example", "https://a.example:99999", "https://a.example:0",
        "https://a b.example", "https://a.example/shop", "https://a.example?x=1",
        "https://user@a.example", "https://a.example:https"]}]})
    assert wheres(found) == [f"sites[shop1].origins[{i}]" for i in range(1, 8)], found
    assert "port" in found[0] and "'https://a.example:99999'" in found[0]


def test_an_empty_secret_is_refused_saying_how_to_turn_the_feature_off() -> None:
    """``X=`` (set, empty) behind ``env:X``, or a literal "", passed check and quietly turned
    the console off (admin_token) or the site's backend API (api_key)."""
    data = {"server": {"admin_token": "env:ADMIN"},
            "sites": [{"id": "shop1", "api_key": "env:KEY", "identity_secret": "",
                       "feed_token": "env:FEED",
                       "rejoiner": {"site_id": "R", "api_key": "env:RJ"},
                       "coupons": {"webhook_url": "https://shop.example/c",
                                   "remarkety_api_key": "", "webhook_secret": "w" * 16}}]}
    env = {"ADMIN": "", "KEY": "", "FEED": "", "RJ": ""}
    for require_secrets in (True, False):
        with pytest.raises(ConfigError) as caught:
            config.parse(data, env=env, require_secrets=require_secrets)
        found = [str(p) for p in caught.value.problems]
        assert sorted(wheres(found)) == sorted([
            "server.admin_token", "sites[shop1].api_key", "sites[shop1].identity_secret",
            "sites[shop1].feed_token", "sites[shop1].rejoiner.api_key",
            "sites[shop1].coupons.remarkety_api_key"]), found
    by_where = dict(zip(wheres(found), found))
    assert by_where["server.admin_token"].endswith(
        "is empty (environment variable ADMIN is set to \"\"); remove the key to turn the "
        "operator console off")
    assert by_where["sites[shop1].api_key"].endswith(
        "remove the key to turn the site's backend API off")
    assert "is empty; " in by_where["sites[shop1].identity_secret"]
    [literal] = problems({"sites": [{"id": "shop1", "api_key": ""}]})
    assert literal.startswith("onetag.toml: sites[shop1].api_key: is empty; ")
    # Absent keys keep their meaning: no console, no backend API, browser-sourced orders.
    settings = config.parse({"sites": [{"id": "shop1"}]}, env={})
    assert settings.server.admin_token is None and settings.sites["shop1"].api_key is None
    assert settings.sites["shop1"].order_source == "browser"


def test_urls_with_a_bad_port_or_host_are_refused_naming_the_key() -> None:
    """``api_base = "http://127.0.0.1:99999/sl"`` passed check and every delivery failed with
    IndexError; ``public_url`` with port 99999 gave a traceback at serve."""
    bad_urls = ("http://127.0.0.1:99999/sl", "https://exa mple.com/", "https://a.example:0/",
                "https://a.example:x/", "https://a..example/")
    for url in bad_urls:
        found = problems({
            "server": {"public_url": url},
            "sites": [{"id": "shop1",
                       "rejoiner": {"site_id": "R", "api_base": url, "script_url": url,
                                    "api_key": "k"},
                       "remarkety": {"store_id": "S", "webhook_url": url, "api_key": "k"},
                       "esputnik": {"site_id": "E", "tracker_url": url},
                       "coupons": {"webhook_url": url, "remarkety_api_key": "r" * 16,
                                   "webhook_secret": "w" * 16}}]})
        assert sorted(wheres(found)) == sorted([
            "server.public_url", "sites[shop1].rejoiner.api_base",
            "sites[shop1].rejoiner.script_url", "sites[shop1].remarkety.webhook_url",
            "sites[shop1].esputnik.tracker_url", "sites[shop1].coupons.webhook_url"]), (url, found)
        assert all(repr(url.rstrip("/")) in p or repr(url) in p for p in found), found
    [port] = problems({"server": {"public_url": "http://127.0.0.1:99999"}, "sites": [{"id": "s"}]})
    assert "port" in port
    settings = config.parse({"server": {"public_url": "https://[::1]:8443/"}, "sites": [
        {"id": "s", "sendlane": {"integration_token": "T", "api_token": "k",
                                 "api_base": "http://127.0.0.1:65535/sl"}}]}, env={})
    assert settings.server.public_url == "https://[::1]:8443"


def test_event_path_may_not_shadow_another_route() -> None:
    """``event_path = "/api/v1/sites/shop1/events"`` passed check and made the backend API
    answer 404 ``no site None here``."""
    for path in ("/api/v1/sites/shop1/events", "/healthz", "/metrics", "/admin", "/admin/",
                 "/admin/login", "/feeds/shop1/products.xml", "/static/x.js",
                 "/remarkety/shop1/discounts", "/s/shop1.js", "/e/{site_id}", "/e?x=1"):
        found = problems({"server": {"event_path": path}, "sites": [{"id": "s"}]})
        assert wheres(found) == ["server.event_path"], (path, found)
    [script] = problems({"server": {"event_path": "/t/x.js", "script_path": "/t/{site_id}.js"},
                         "sites": [{"id": "s"}]})
    assert "script_path" in script
    for path in ("/e", "/collect", "/api-e", "/administer", "/t/e"):
        settings = config.parse({"server": {"event_path": path}, "sites": [{"id": "s"}]}, env={})
        assert settings.server.event_path == path


def test_a_missing_required_key_is_one_problem_not_its_defaults_follow_ons() -> None:
    """eSputnik's script_id defaults to site_id and script_url to script_id: without site_id,
    check said three things for one mistake."""
    found = problems({"sites": [{"id": "shop1", "esputnik": {"api_key": "k"}}]})
    assert found == ["onetag.toml: sites[shop1].esputnik.site_id: is required"]
    # Given, script_id fills script_url's default as before.
    settings = config.parse({"sites": [{"id": "shop1", "esputnik": {"site_id": "S1"}}]}, env={})
    assert settings.sites["shop1"].vendors["esputnik"]["script_url"].endswith("/S1.js")


def test_number_keys_may_come_from_the_environment() -> None:
    """docs/config.md: any value may be ``"env:NAME"``. A number key's variable is read as the number
    it spells (it was refused as ``not '7'``, and an unset one was two problems)."""
    data = {"server": {"hold_days": "env:HD", "max_pending_writes": "env:MPW"},
            "sites": [{"id": "s"}]}
    settings = config.parse(data, env={"HD": "7", "MPW": "100"})
    assert settings.server.hold_days == 7.0 and settings.server.max_pending_writes == 100
    assert problems(data, env={"MPW": "100"}) == [
        "onetag.toml: server.hold_days: environment variable HD is not set"]
    found = problems(data, env={"HD": "a week", "MPW": "1.5"})
    assert wheres(found) == ["server.hold_days", "server.max_pending_writes"]
    assert "not 'a week'" in found[0] and "a whole number" in found[1]
    assert config.parse(data, env={"MPW": "100"}, require_secrets=False).server.hold_days \
        == config.ServerConfig().hold_days


CONTRACT_SECTIONS = '''
[[sites]]
id = "shop1"

[sites.remarkety]
store_id    = "ST1"
api_key     = "rm-key"
webhook_url = "https://webhooks.remarkety.com/webhooks/?storeId={store_id}"

[sites.esputnik]
site_id     = "8A412DC"
script_url  = "https://cdn.esputnik.com/scripts/{script_id}.js"
'''


def test_the_contracts_configured_urls_have_their_placeholders_filled_in(tmp_path: Path) -> None:
    """The contract's own lines (section 3) passed check, and every Remarkety call went to
    ?storeId={store_id}, the eSputnik script to .../{script_id}.js: only defaults were filled."""
    path = tmp_path / "onetag.toml"
    path.write_text(CONTRACT_SECTIONS, encoding="utf-8")
    site = config.load(path, env={}).sites["shop1"]
    assert site.vendors["remarkety"]["webhook_url"] == \
        "https://webhooks.remarkety.com/webhooks/?storeId=ST1"
    assert site.vendors["esputnik"]["script_url"] == "https://cdn.esputnik.com/scripts/8A412DC.js"
    explicit = path.read_text().replace('site_id     = "8A412DC"',
                                        'site_id = "8A412DC"\nscript_id = "LOADER9"')
    path.write_text(explicit, encoding="utf-8")
    site = config.load(path, env={}).sites["shop1"]
    assert site.vendors["esputnik"]["script_url"] == "https://cdn.esputnik.com/scripts/LOADER9.js"
    # Braces doubled are braces; a URL without placeholders is kept as written.
    settings = config.parse({"sites": [{"id": "s", "remarkety": {
        "store_id": "S", "api_key": "k",
        "webhook_url": "https://h.example/w?x={{y}}&s={store_id}"},
        "sendlane": {"integration_token": "T", "api_token": "k",
                     "api_base": "https://api.example/v2"}}]}, env={})
    assert settings.sites["s"].vendors["remarkety"]["webhook_url"] == "https://h.example/w?x={y}&s=S"
    assert settings.sites["s"].vendors["sendlane"]["api_base"] == "https://api.example/v2"


@pytest.mark.parametrize("url, words", [
    ("https://webhooks.remarkety.com/webhooks/?storeId={storeid}", "names {storeid}, which is no "
     "placeholder: the placeholders are {store_id}"),
    ("https://h.example/{api_key}", "names {api_key}, which is no placeholder"),  # a secret
    ("https://h.example/{webhook_url}", "names {webhook_url}, which is no placeholder"),
    ("https://h.example/{store_id!r}", "names {store_id!r}, which is no placeholder"),
    ("https://h.example/{store_id:>9}", "names {store_id:>9}, which is no placeholder"),
    ("https://h.example/{store_id[0]}", "which is no placeholder"),
    ("https://h.example/{}", "names {}, which is no placeholder"),
    ("https://h.example/{store_id", "is not a valid template"),
    ("https://h.example/}", "is not a valid template"),
])
def test_an_unknown_placeholder_in_a_configured_url_is_a_problem_naming_the_key(
        url: str, words: str) -> None:
    found = problems({"sites": [{"id": "shop1", "remarkety": {"store_id": "S", "api_key": "k",
                                                              "webhook_url": url}}]})
    assert len(found) == 1, found
    assert found[0].startswith("onetag.toml: sites[shop1].remarkety.webhook_url: "), found
    assert words in found[0], found


def test_a_placeholder_naming_an_unset_key_is_a_problem() -> None:
    found = problems({"sites": [{"id": "shop1", "rejoiner": {
        "site_id": "R", "api_key": "k", "api_base": "https://rj.example/{domain}/api"}}]})
    assert found == ["onetag.toml: sites[shop1].rejoiner.api_base: names {domain}, which is not set"]


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["https://h.example/", "{store_id}", "{", "}", "{{", "}}",
                                 "{x}", "{api_key}", "{store_id!s}", "a", "?s=", "{0}"]),
                max_size=6))
def test_any_configured_url_is_filled_in_or_one_problem_naming_it(parts: list[str]) -> None:
    url = "".join(parts)
    data = {"sites": [{"id": "shop1", "remarkety": {"store_id": "S1", "api_key": "k",
                                                     "webhook_url": url}}]}
    try:
        settings = config.parse(data, env={})
    except ConfigError as exc:
        found = [str(p) for p in exc.problems]
        assert len(found) == 1 and found[0].startswith(
            "onetag.toml: sites[shop1].remarkety.webhook_url: "), found
        return
    got = settings.sites["shop1"].vendors["remarkety"]["webhook_url"]
    assert got == url.format(store_id="S1"), (url, got)


@pytest.mark.parametrize("where, data", [
    ("server.admin_token", {"server": {"admin_token": "a"}, "sites": [{"id": "shop1"}]}),
    ("server.admin_token", {"server": {"admin_token": "x" * 15}, "sites": [{"id": "shop1"}]}),
    ("server.admin_token", {"server": {"admin_token": "env:T"}, "sites": [{"id": "shop1"}]}),
    ("sites[shop1].api_key", {"sites": [{"id": "shop1", "api_key": "a"}]}),
    ("sites[shop1].api_key", {"sites": [{"id": "shop1", "api_key": "env:T"}]}),
])
def test_a_weak_admin_token_or_api_key_is_refused_naming_it(where: str, data: dict) -> None:
    """admin_token = "a" and api_key = "a" were taken; identity_secret, feed_token and the
    coupons' keys already needed 16 characters. All that guards the console or a site's
    backend API now needs as many."""
    found = problems(data, env={"T": "short-secret"})
    assert found == [f"onetag.toml: {where}: must be at least 16 characters (a random secret, "
                     f"e.g. \"env:{'ONETAG_ADMIN_TOKEN' if 'admin' in where else 'SHOP1_API_KEY'}"
                     f"\"): it is all that guards "
                     f"{'the operator console' if 'admin' in where else 'the site' + chr(39) + 's backend API'}"]


@hsettings(max_examples=100, deadline=None)
@given(admin_token=st.text(st.characters(codec="utf-8"), min_size=1, max_size=24),
       api_key=st.text(st.characters(codec="utf-8"), min_size=1, max_size=24))
def test_a_secret_is_taken_exactly_when_it_has_16_characters(admin_token: str,
                                                             api_key: str) -> None:
    """... and no control character (a line break pasted with it)."""
    data = {"server": {"admin_token": admin_token},
            "sites": [{"id": "shop1", "api_key": api_key}]}
    taken = lambda v: len(v) >= 16 and not re.search("[\x00-\x1f\x7f-\x9f]", v)  # noqa: E731
    try:
        settings = config.parse(data, env={})
    except ConfigError as exc:
        wheres = sorted(p.where.split(": ", 1)[1] for p in exc.problems)
        assert wheres == sorted(w for w, v in (("server.admin_token", admin_token),
                                               ("sites[shop1].api_key", api_key))
                                if not taken(v)), wheres
        return
    assert taken(admin_token) and taken(api_key)
    assert settings.server.admin_token == admin_token
    assert settings.sites["shop1"].api_key == api_key


def test_consent_defaults_to_none_and_takes_required() -> None:
    """``consent`` (per site): "none" keeps today's script, "required" makes it wait for the
    page's consent; anything else is a problem naming the key and both choices."""
    site = lambda **extra: {"id": "shop1", **extra}  # noqa: E731
    assert config.parse({"sites": [site()]}, env={}).sites["shop1"].consent == "none"
    assert config.parse({"sites": [site(consent="required")]}, env={}).sites["shop1"].consent == "required"
    for bad in ("yes", "Required", ""):
        assert problems({"sites": [site(consent=bad)]}) == [
            f"onetag.toml: sites[shop1].consent: must be \"none\" or \"required\", not {bad!r}"]
    assert problems({"sites": [site(consent=True)]}) == [
        "onetag.toml: sites[shop1].consent: must be a string, not bool"]


def test_the_docs_nginx_block_and_its_server_settings_agree() -> None:
    """docs/operations.md, "Behind a reverse proxy": the nginx block appends the address it was reached
    from and the scheme, and the TOML beside it trusts that proxy (on 127.0.0.1) and names
    the proxy's host as public_url: a valid config, which uvicorn is told to believe."""
    import re
    import tomllib

    from server.cli import proxy_options

    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    part = page.split("\n## Behind a reverse proxy\n", 1)[1].split("\n## ", 1)[0]
    [nginx] = re.findall(r"```nginx\n(.*?)```", part, re.S)
    [toml] = re.findall(r"```toml\n(.*?)```", part, re.S)
    for line in ("proxy_pass http://127.0.0.1:8000;", "proxy_set_header Host $host;",
                 "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                 "proxy_set_header X-Forwarded-Proto $scheme;"):
        assert line in nginx, line
    server_name = re.search(r"server_name (\S+);", nginx).group(1)
    settings = config.parse({**tomllib.loads(toml), "sites": [{"id": "shop1"}]}, env={})
    assert settings.server.public_url == f"https://{server_name}"
    assert proxy_options(settings.server.trusted_proxies) == {
        "proxy_headers": True, "forwarded_allow_ips": ["127.0.0.1"]}


@pytest.mark.parametrize("vendor, section, key", [
    ("rejoiner", {"site_id": "ABC1234"}, "api_key"),
    ("remarkety", {"store_id": "AbCdEf"}, "api_key"),
    ("sendlane", {"integration_token": "t" * 16}, "api_token"),
])
def test_a_vendor_without_the_secret_its_server_api_needs_is_a_problem(vendor, section,
                                                                        key) -> None:
    """The forwarder sent such a section's server-side calls unauthenticated, and the vendor
    refused every one (Rejoiner REST API "Authentication", Remarkety "x-token", Sendlane
    "API v2 authorization"). It is one problem naming the key, unless every route of the
    section stays in the browser (or is off): then nothing is sent from the server."""
    found = problems({"sites": [{"id": "s", vendor: section}]})
    assert wheres(found) == [f"sites[s].{vendor}.{key}"], found
    assert "server" in found[0] and "routes" in found[0]
    browser_only = {"*": "browser", **{event: "browser" for event in
                                        VENDORS[vendor].DEFAULT_ROUTES}}
    browser_only["purchase"] = "off"
    browser_only["product_updated"] = "off"
    settings = config.parse({"sites": [{"id": "s", vendor: {**section, "routes": browser_only}}]},
                            env={})
    assert vendor in settings.sites["s"].vendors
    # Sendlane's product sync sends whenever product_updated is not off.
    syncing = {**browser_only, "product_updated": "browser"}
    data = {"sites": [{"id": "s", vendor: {**section, "routes": syncing}}]}
    if vendor == "sendlane":
        assert "the product sync" in problems(data)[0]
    else:
        config.parse(data, env={})
    # A node that never sends (NODE_SECRETS) still sees the key missing: it is the file's
    # problem, not the environment's; an env: value left unset is the process's business.
    settings = config.parse({"sites": [{"id": "s", vendor: {**section, key: "env:UNSET"}}]},
                            env={}, require_secrets=config.NODE_SECRETS)
    assert key not in settings.sites["s"].vendors[vendor].values


def test_esputnik_needs_no_secret_to_send_from_the_server() -> None:
    """The eSputnik tracker API: "No authorization is required"; the key is optional."""
    settings = config.parse({"sites": [{"id": "s", "esputnik": {"site_id": "8A412DC",
                                                                "routes": {"*": "server"}}}]},
                            env={})
    assert "api_key" not in settings.sites["s"].vendors["esputnik"].values


def test_the_config_reference_lists_every_forwarder_variable_with_its_default() -> None:
    """docs/config.md's ONETAG_FORWARD_* table is the ForwarderOptions fields, defaults as the
    code has them: a setting added or a default changed fails here until the docs say so."""
    import dataclasses

    from server.forward_options import ForwarderOptions

    readme = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    rows = {}
    for line in readme.splitlines():
        if line.startswith("| `ONETAG_FORWARD_"):
            name, default, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
            rows[name.strip("`")] = default
            assert meaning, name
    defaults = ForwarderOptions()
    expected = {}
    for f in dataclasses.fields(ForwarderOptions):
        value = getattr(defaults, f.name)
        expected[f"ONETAG_FORWARD_{f.name.upper()}"] = (
            ",".join(f"{k}={v:g}" for k, v in value.items()) or "none"
            if isinstance(value, dict) else "none" if value is None else f"{value:g}")
    assert rows == expected
    # Each name the table gives is one from_env takes.
    for name in rows:
        ForwarderOptions.from_env({name: "none" if name.endswith(("RATES", "PROXY")) else "1"})


def test_init_names_the_variables_to_export_and_then_check_passes(tmp_path, capsys,
                                                                  monkeypatch) -> None:
    """Quick start step 1: `onetag init`, export the env: variables it names, `onetag check`.
    init's message lists them, and with them set (random values) the file is valid."""
    import re

    from server import cli

    path = tmp_path / "onetag.toml"
    assert cli.main(["init", str(path)]) == 0
    said = capsys.readouterr().out
    active = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    names = re.findall(r'"env:([A-Z0-9_]+)"', active)
    assert names and f"export {' '.join(f'{n}=...' for n in names)}" in said, said
    for name in names:
        monkeypatch.setenv(name, "x" * 32)
    assert cli.main(["check", "--config", str(path)]) == 0
    assert "is valid" in capsys.readouterr().out
