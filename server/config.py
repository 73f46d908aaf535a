"""Typed settings from ``onetag.toml``.

Every problem is collected, not just the first, and each names where it is
(``onetag.toml: sites[shop1].rejoiner.api_key``) so ``onetag check`` can print them all.
Any string value may be ``"env:NAME"``: secrets live in the environment, not the file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping
from urllib.parse import urlsplit

from . import routing
from .vendors import VENDORS
from .vendors._base import VendorConfig

# A control character (C0, DEL, C1) in a secret or a vendor setting: a line break pasted with
# a key would split the vendor request it goes into.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SITE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
DEFAULT_DATABASE = "sqlite:///onetag.db"
DEFAULT_HOLD_DAYS = 7.0
DEFAULT_BROWSER_GRACE_S = 600.0
DEFAULT_MAX_CART_LINES = 200
# The nightly Sendlane product sync (server/product_sync.py), UTC: a quiet hour in Europe and
# the Americas. Per site: [[sites]] product_sync_time = "HH:MM".
DEFAULT_PRODUCT_SYNC_TIME = "03:00"
DEFAULT_PRODUCT_SYNC_MINUTE = 180
SYNC_TIME_RE = re.compile(r"([0-9]{2}):([0-9]{2})")
DEFAULT_KEEP_ATTEMPTS_DAYS = 30.0  # delivery attempts (request and answer) kept this long
# Events, sessions and finished deliveries kept this long (server/store/retention.py); 0, the
# default, keeps them forever: an upgrade never starts deleting a storefront's data unasked.
DEFAULT_KEEP_EVENTS_DAYS = 0.0
MIN_KEEP_EVENTS_DAYS = 1.0  # when on: a shorter period would forget retried events' ids
# The number keys of [server]: default, lowest, highest, whether the lowest itself is allowed,
# and the unit ("" for a whole number). Finite and in range, or serve crashed (inf, nan),
# ran without a body timeout (nan), answered every request 503 (writer_timeout_s = 0.001) or
# failed /healthz for good (keep_attempts_days = 1e300). docs/config.md states them.
NUMBERS: dict[str, tuple[float, float, float, bool, str]] = {
    "hold_days": (DEFAULT_HOLD_DAYS, 0, 365, False, "days"),
    "browser_grace_s": (DEFAULT_BROWSER_GRACE_S, 0, 86_400, True, "seconds"),
    "writer_timeout_s": (10.0, 1, 600, True, "seconds"),
    "shutdown_grace_s": (10.0, 1, 600, True, "seconds"),
    "header_timeout_s": (10.0, 1, 600, True, "seconds"),
    "body_timeout_s": (10.0, 1, 600, True, "seconds"),
    "keep_attempts_days": (DEFAULT_KEEP_ATTEMPTS_DAYS, 0, 3650, False, "days"),
    "keep_events_days": (DEFAULT_KEEP_EVENTS_DAYS, 0, 3650, True, "days"),
    "max_pending_writes": (2000, 1, 1_000_000, True, ""),
    "max_pending_bytes": (64 * 1024 * 1024, 1024, 16 * 1024 ** 3, True, ""),
}


# Every key of [server] (docs/config.md has a row for each).
SERVER_KEYS = frozenset({
    "database", "public_url", "script_path", "event_path", "admin_token", "hold_days",
    "forward", "browser_grace_s", "log_format", "keep_attempts_days", "metrics_public",
    "trusted_proxies", *NUMBERS})

# Every key of a [[sites]] table but its vendor sections, one a name of VENDORS (docs/config.md
# has a row for each).
SITE_KEYS = frozenset({
    "id", "origins", "api_key", "currency", "spa_page_views", "capture_form_email", "consent",
    "debug", "max_cart_lines", "cart_url", "order_source", "identity_secret", "coupons",
    "feed_token", "product_sync_time"})


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found, so one run of ``onetag check`` shows them all."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class SiteConfig:
    id: str
    origins: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)  # secrets stay out of any repr
    currency: str = "USD"
    spa_page_views: str = "auto"  # or "manual"
    capture_form_email: bool = True
    # "required": the script waits for the page's consent (features/consent.js.j2); "none":
    # it runs at once, the site having dealt with consent itself.
    consent: str = "none"
    debug: bool = False
    max_cart_lines: int = DEFAULT_MAX_CART_LINES  # lines a session's cart may hold
    vendors: Mapping[str, VendorConfig] = field(default_factory=dict)
    # Where a returning visitor finds the cart (Remarkety's abandoned_checkout_url, Rejoiner's
    # return_url): a URL template with {cart_guid} and {sc}. Public.
    cart_url: str | None = None
    # Who states orders (docs/trust.md): "backend" (its API only) or "browser".
    order_source: str = "browser"
    identity_secret: str | None = field(default=None, repr=False)  # signs identify (user.signature)
    coupons: CouponConfig | None = None  # [sites.coupons]: the Remarkety Coupons API bridge
    # The product feeds' secret (GET /feeds/{site}/products.xml?token=...): no feed without it.
    feed_token: str | None = field(default=None, repr=False)
    # When the nightly Sendlane product sync runs, as minutes after 00:00 UTC ("03:00").
    product_sync_minute: int = DEFAULT_PRODUCT_SYNC_MINUTE


DEFAULT_COUPON_TIMEOUT_S = 5.0
MAX_COUPON_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class CouponConfig:
    """``[sites.coupons]``: Remarkety calls ``POST /remarkety/{site_id}/discounts`` with
    ``remarkety_api_key``; onetag asks the store's ``webhook_url`` to create the coupon,
    signing the body with ``webhook_secret`` (server/coupons.py). Secrets stay out of repr."""

    webhook_url: str
    remarkety_api_key: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    timeout_s: float = DEFAULT_COUPON_TIMEOUT_S  # the whole store call, connect to last byte


@dataclass(frozen=True)
class ServerConfig:
    # Out of repr: a PostgreSQL URL may carry its password (``database_label`` shows it masked).
    database: str = field(default=DEFAULT_DATABASE, repr=False)
    public_url: str = DEFAULT_PUBLIC_URL
    script_path: str = "/s/{site_id}.js"
    event_path: str = "/e"
    admin_token: str | None = field(default=None, repr=False)  # secrets stay out of any repr
    hold_days: float = DEFAULT_HOLD_DAYS  # how long anonymous activity waits for an identity
    forward: bool = True  # run the forwarder inside `serve`
    # A backend copy of an event the browser normally delivers (a `fallback` route) waits this
    # long, so a browser copy arriving just after it is recognised and the vendor gets one.
    browser_grace_s: float = DEFAULT_BROWSER_GRACE_S
    writer_timeout_s: float = 10.0  # a writer leaving a frame unanswered this long is replaced
    shutdown_grace_s: float = 10.0  # SIGTERM: requests and the writer get this long to finish
    # A connection whose request headers are not all in this long after it opened, or after
    # its previous response, is closed (server/connections.py).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0  # a request body not received in this time: 408
    max_pending_writes: int = 2000  # writes waiting for the store before new ones get 503
    max_pending_bytes: int = 64 * 1024 * 1024  # ... and the bytes of their bodies
    log_format: str = "text"  # or "json": one object a line (server/logs.py)
    keep_attempts_days: float = DEFAULT_KEEP_ATTEMPTS_DAYS  # delivery attempts kept this long
    keep_events_days: float = DEFAULT_KEEP_EVENTS_DAYS  # events, sessions, deliveries; 0: forever
    metrics_public: bool = False  # GET /metrics without the admin token (server/metrics.py)
    # The proxies whose X-Forwarded-For (and -Proto) uvicorn believes: IP addresses and CIDR
    # networks, normalised. None by default: the client address is the TCP peer's.
    trusted_proxies: tuple[str, ...] = ()

    @property
    def sqlite_path(self) -> str:
        return sqlite_path(self.database)

    @property
    def is_postgresql(self) -> bool:
        return is_postgresql(self.database)


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    sites: Mapping[str, SiteConfig]
    source: str  # the config file, or "demo"
    # Where an ``env:`` secret was not set, when loaded with ``require_secrets=False`` (the
    # commands that never send): those values read as absent.
    unset: tuple[str, ...] = ()

    @property
    def is_demo(self) -> bool:
        return self.source == "demo"


def sqlite_path(database: str) -> str:
    """``sqlite:///relative.db`` / ``sqlite:////abs/path.db`` → a filesystem path."""
    if not database.startswith("sqlite:///"):
        if is_postgresql(database):
            raise ValueError("a PostgreSQL database has no file path")
        raise ValueError("must be sqlite:///PATH or postgresql://user@host:5432/dbname")
    return database[len("sqlite:///"):]


def is_postgresql(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def check_database(database: str) -> None:
    """``ValueError`` saying what is wrong with a ``database`` URL (never echoing a password)."""
    if not is_postgresql(database):
        problem = sqlite_problem(sqlite_path(database))
        if problem:
            raise ValueError(problem)
        return
    try:
        parts = urlsplit(database)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid PostgreSQL URL ({exc})") from None
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError("a PostgreSQL URL names its host: postgresql://user@host:5432/dbname")
    if not parts.path.strip("/"):
        raise ValueError("a PostgreSQL URL names its database: postgresql://user@host:5432/dbname")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")


def sqlite_problem(path: str) -> str | None:
    """Why a SQLite path is not a file that keeps what is acknowledged, or None."""
    if not path:
        return "names no file: sqlite:///onetag.db (relative) or sqlite:////var/lib/onetag.db"
    if path == ":memory:" or path.startswith("file:") or "mode=memory" in path:
        return ("is a database in memory (or a file: URI): every acknowledged event would be "
                "lost when the process stops; name a file, like sqlite:///onetag.db")
    return None


def database_label(database: str) -> str:
    """The database URL as logs and CLI output may show it: a password replaced by ***."""
    if not is_postgresql(database):
        return database
    parts = urlsplit(database)
    if "@" not in parts.netloc or ":" not in parts.netloc.rpartition("@")[0]:
        return database
    user = parts.netloc.rpartition("@")[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}").geturl()


# Which ``env:`` values a process needs set (``load``'s ``require_secrets``). A vendor's
# secrets (``Setting.secret``: its API key or token) are added to a request only when it is
# sent, so a node that does not forward never reads them; everything else ("site": the
# sites' keys, the admin token, public ids and URLs) is what a node serves and checks
# requests with, and a worker never reads it, but for the vendors' public settings, which
# both read (the script names them; the product sync plans requests with them). So the
# internet-facing nodes need not hold the vendors' secrets, nor the workers the sites'.
NODE_SECRETS = frozenset({"site"})
SENDER_SECRETS = frozenset({"vendor"})
ALL_SECRETS = NODE_SECRETS | SENDER_SECRETS


def number_range(key: str) -> str:
    """The range of a ``[server]`` number key in words, as messages and docs/config.md give it."""
    _, low, high, low_ok, _ = NUMBERS[key]
    if low_ok:
        return f"from {_num(low)} to {_num(high)}"
    return f"> {_num(low)} and at most {_num(high)}"


def _number_text(text: str, whole: bool) -> Any:
    """An environment variable's text as the number it spells, else the text (refused by
    the caller, which names it)."""
    try:
        return int(text) if whole else float(text)
    except ValueError:
        return text


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def address_problem(url: str) -> str | None:
    """Why the host or port of an http(s) URL is not one a client can connect to, or None.
    A port out of range or a host with a space passed before, and failed at each use
    (IndexError in every delivery, a traceback at serve)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        return "has a port outside 1-65535"
    if _host(parts.hostname or "") is None:
        return f"has an invalid host {parts.hostname!r}"
    return None


def _host(host: str) -> str | None:
    """``host`` as a browser sends it (lowercase; IDN as punycode; IPv6 in brackets), or
    None if it is not a valid host name or address."""
    if ":" in host:
        try:
            return f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            return None
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    return ascii_host if re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", ascii_host) else None


DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_origin(origin: str) -> str:
    """``origin`` as a browser's ``Origin`` header states it: lowercase scheme and host, no
    default port, no trailing slash. ``ValueError`` saying why it is not an origin."""
    parts = urlsplit(origin)
    if (parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname
            or parts.path not in ("", "/") or parts.query or parts.fragment or "?" in origin
            or "#" in origin or "@" in parts.netloc):
        raise ValueError("is not an origin like \"https://shop.example\"")
    problem = address_problem(origin)
    if problem:
        raise ValueError(problem)
    scheme = parts.scheme.lower()
    port = parts.port
    host = _host(parts.hostname)
    return f"{scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[scheme]) else f":{port}")


ROUTES = ("/healthz", "/metrics", "/api/v1/sites/{site_id}/events",
          "/feeds/{site_id}/products.xml", "/feeds/{site_id}/products.csv",
          "/remarkety/{site_id}/discounts")
MOUNTS = ("/admin", "/static", "/demo", "/api", "/feeds")  # everything under them is taken


def event_path_problem(event_path: str, script_path: str) -> str | None:
    """Why ``event_path`` would shadow (or be shadowed by) another route of server/app.py, or
    None. ``/api/v1/sites/shop1/events`` made the backend API answer 404 for that site."""
    if not re.fullmatch(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*", event_path):
        return "must be a plain path starting with / (no {placeholders}, ? or #)"
    for mount in MOUNTS:
        if event_path == mount or event_path.startswith(mount + "/"):
            return f"is under {mount}, which onetag serves itself; pick another path like /e"
    for route in (*ROUTES, script_path):
        pattern = re.escape(route).replace(r"\{site_id\}", "[^/]+")
        if re.fullmatch(pattern, event_path):
            where = "script_path" if route == script_path else "another route"
            return f"is {route} ({where}), which onetag serves itself; pick another path like /e"
    return None


class _Reader:
    """Reads typed values out of a TOML table, recording problems instead of raising."""

    def __init__(self, file: str, env: Mapping[str, str],
                 require_secrets: bool | Collection[str] = True):
        self.file = file
        self.env = env
        self.required = (ALL_SECRETS if require_secrets is True else
                         frozenset() if require_secrets is False else frozenset(require_secrets))
        self.problems: list[Problem] = []
        self.unset: list[str] = []  # where an env: value was missing and not required

    def problem(self, where: str, message: str) -> None:
        self.problems.append(Problem(f"{self.file}: {where}", message))

    def resolve(self, where: str, value: Any, always: bool = False,
                kinds: frozenset[str] = NODE_SECRETS) -> Any:
        """``value``, or the variable an ``"env:NAME"`` value names. Unset, it is a problem
        if this process reads values of its ``kinds`` (``NODE_SECRETS``), or ``always``."""
        if isinstance(value, str) and value.startswith("env:"):
            name = value[4:]
            if name not in self.env:
                if always or kinds & self.required:
                    self.problem(where, f"environment variable {name} is not set")
                else:
                    self.unset.append(where)
                return None
            return self.env[name]
        return value

    def string(self, table: Mapping[str, Any], key: str, where: str, *,
               default: str | None = None, required: bool = False,
               always: bool = False, kinds: frozenset[str] = NODE_SECRETS) -> str | None:
        if key not in table:
            if required:
                self.problem(f"{where}.{key}", "is required")
            return default
        value = self.resolve(f"{where}.{key}", table[key], always, kinds)
        if value is None:
            return default
        if not isinstance(value, str):
            self.problem(f"{where}.{key}", f"must be a string, not {type(value).__name__}")
            return default
        return value

    def choice(self, table: Mapping[str, Any], key: str, where: str,
               choices: tuple[str, ...]) -> str:
        """One of ``choices`` (the first is the default), or the default after a problem
        naming them all."""
        value = self.string(table, key, where, default=choices[0])
        if value not in choices:
            said = " or ".join(f'"{choice}"' for choice in choices)
            self.problem(f"{where}.{key}", f"must be {said}, not {value!r}")
            return choices[0]
        return value

    def secret(self, table: Mapping[str, Any], key: str, where: str, *, off: str,
               required: bool = False, kinds: frozenset[str] = NODE_SECRETS,
               example: str | None = None, guards: str | None = None) -> str | None:
        """A secret: an empty one (a literal "" or an ``env:`` variable set to "") is refused,
        not read as absent, which quietly turned its feature off. ``off`` says how to. With
        ``example`` (an ``env:`` name), a guessable one is refused: ``MIN_SECRET`` characters
        at least, and the message says what it ``guards``."""
        value = self.string(table, key, where, required=required, kinds=kinds)
        if value == "":
            raw = table[key]
            source = (f" (environment variable {raw[4:]} is set to \"\")"
                      if isinstance(raw, str) and raw.startswith("env:") else "")
            self.problem(f"{where}.{key}", f"is empty{source}; {off}")
            return None
        if value is not None and _CONTROL.search(value):
            self.problem(f"{where}.{key}", "holds a control character (a line break pasted "
                         "with it?): a secret travels in HTTP headers and signatures, which "
                         "can't carry one")
            return None
        if example is not None and value is not None and len(value) < MIN_SECRET:
            self.problem(f"{where}.{key}", f"must be at least {MIN_SECRET} characters (a "
                         f"random secret, e.g. \"env:{example}\")"
                         + (f": it is all that guards {guards}" if guards else ""))
        return value

    def number(self, table: Mapping[str, Any], key: str, where: str) -> float | int:
        """A ``[server]`` number key (``NUMBERS``): finite and within its range."""
        default, low, high, low_ok, unit = NUMBERS[key]
        raw = table.get(key, default)
        value = self.resolve(f"{where}.{key}", raw)
        whole = not unit
        if isinstance(raw, str) and raw.startswith("env:"):
            if value is None:  # unset: resolve said so (or this process does not need it)
                return default
            value = _number_text(value, whole)  # a variable is text: "7", "2.5"
        if (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
                or not math.isfinite(value) or not (low <= value <= high)
                or (value == low and not low_ok)):
            kind = "a whole number" if whole else f"a number of {unit}"
            self.problem(f"{where}.{key}", f"must be {kind} {number_range(key)}, not {value!r}")
            return default
        return value if whole else float(value)

    def unknown(self, where: str, key: str, known: Any) -> None:
        """An unknown key, with the nearest known one when it looks like a typo."""
        names = list(known)
        near = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        self.problem(f"{where}.{key}", f"unknown key ({hint}expected one of: {', '.join(names)})")

    def boolean(self, table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = self.resolve(f"{where}.{key}", table.get(key, default))
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            value = value.lower() in ("true", "1")
        if not isinstance(value, bool):
            self.problem(f"{where}.{key}", f"must be true or false, not {value!r}")
            return default
        return value


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *,
         require_secrets: bool | Collection[str] = True) -> Settings:
    """Load and validate a config file; raises ``ConfigError`` listing every problem.

    ``require_secrets=False`` is for the commands that never send (``deliveries``,
    ``replay``): an ``env:`` variable that is not set leaves its value absent (listed in
    ``Settings.unset``) instead of being a problem. ``NODE_SECRETS`` (a node that does not
    forward) and ``SENDER_SECRETS`` (a worker) require only the values that process reads."""
    file = str(path)
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(file, f"is not UTF-8 text (byte {exc.start}); TOML files "
                                         f"are UTF-8")]) from exc
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(file, f"not valid TOML: {exc}")]) from exc
    return parse(data, file=file, env=os.environ if env is None else env,
                 require_secrets=require_secrets)


def parse(data: Mapping[str, Any], *, file: str = "onetag.toml",
          env: Mapping[str, str] | None = None,
          require_secrets: bool | Collection[str] = True) -> Settings:
    reader = _Reader(file, os.environ if env is None else env, require_secrets)
    known_top = {"server", "sites"}
    for key in data:
        if key not in known_top:
            reader.problem(key, f"unknown section (expected one of: {', '.join(sorted(known_top))})")
    server = _parse_server(reader, data.get("server", {}))
    sites: dict[str, SiteConfig] = {}
    raw_sites = data.get("sites", [])
    if not isinstance(raw_sites, list):
        reader.problem("sites", "must be an array of tables ([[sites]])")
        raw_sites = []
    if not raw_sites:
        reader.problem("sites", "no [[sites]] defined: add at least one site")
    for index, table in enumerate(raw_sites):
        site = _parse_site(reader, table, index)
        if site is None:
            continue
        if site.id in sites:
            reader.problem(f"sites[{site.id}].id", "is used by two sites")
        sites[site.id] = site
    if reader.problems:
        raise ConfigError(reader.problems)
    return Settings(server=server, sites=sites, source=file, unset=tuple(reader.unset))


def _trusted_proxies(reader: _Reader, table: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """``[server] trusted_proxies``: a list of IP addresses and CIDR networks (or one string
    of them, comma-separated, as an ``env:`` variable gives it), each checked and written
    the one way ``ipaddress`` writes it."""
    key = "trusted_proxies"
    if key not in table:
        return ()
    raw = reader.resolve(f"{where}.{key}", table[key], always=True)
    if raw is None:
        return ()
    if isinstance(raw, str):
        items = [item.strip() for item in raw.split(",") if item.strip()]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = raw
    else:
        reader.problem(f"{where}.{key}", "must be a list of the proxies' IP addresses or CIDR "
                                         "networks, like [\"127.0.0.1\", \"10.0.0.0/8\"]")
        return ()
    found = []
    for position, item in enumerate(items):
        try:
            found.append(proxy_address(item))
        except ValueError as exc:
            reader.problem(f"{where}.{key}[{position}]", f"{exc}, not {item!r}")
    return tuple(found)


def proxy_address(text: str) -> str:
    """An IP address or a CIDR network, normalised (``ValueError`` saying what is wrong):
    not ``*`` (uvicorn's "trust everyone": any client could then choose its address), not
    a host name, not a network with host bits set (``10.0.0.1/8``: a typo for which?)."""
    text = text.strip()
    if text == "*":
        raise ValueError("must name the proxies: \"*\" would believe X-Forwarded-For from any "
                         "client, so anyone could choose the address onetag sees")
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=True))
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        if "host bits" in str(exc):
            network = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"has host bits set: a CIDR network is written {network}, or "
                             f"name the one proxy without the /") from None
        raise ValueError("must be an IP address or a CIDR network (no host names)") from None


# The shortest secret onetag takes where a secret is all that guards something: admin_token,
# a site's api_key, identity_secret, feed_token, the coupons bridge's two.
MIN_SECRET = 16


def _parse_server(reader: _Reader, table: Any) -> ServerConfig:
    where = "server"
    if not isinstance(table, dict):
        reader.problem(where, "must be a table")
        return ServerConfig()
    known = SERVER_KEYS
    for key in table:
        if key not in known:
            reader.unknown(where, key, sorted(known))
    # What every command works on, secrets or not: unset, falling back to the default file
    # would have `onetag migrate` make and migrate a new SQLite file, saying it had.
    database = reader.string(table, "database", where, default=DEFAULT_DATABASE, always=True)
    try:
        check_database(database)
    except ValueError as exc:
        reader.problem(f"{where}.database", f"{exc} (got {database_label(database)!r})")
    public_url = reader.string(table, "public_url", where, default=DEFAULT_PUBLIC_URL).rstrip("/")
    if urlsplit(public_url).scheme not in ("http", "https") or not urlsplit(public_url).netloc:
        reader.problem(f"{where}.public_url", f"must be an http(s) URL, not {public_url!r}")
    elif problem := address_problem(public_url):
        reader.problem(f"{where}.public_url", f"{problem}, not {public_url!r}")
    script_path = reader.string(table, "script_path", where, default="/s/{site_id}.js")
    if "{site_id}" not in script_path or not script_path.startswith("/"):
        reader.problem(f"{where}.script_path", "must start with / and contain {site_id}")
    event_path = reader.string(table, "event_path", where, default="/e")
    problem = event_path_problem(event_path, script_path)
    if problem:
        reader.problem(f"{where}.event_path", f"{problem}, not {event_path!r}")
    log_format = reader.choice(table, "log_format", where, ("text", "json"))
    numbers = {key: reader.number(table, key, where) for key in NUMBERS}
    if 0 < numbers["keep_events_days"] < MIN_KEEP_EVENTS_DAYS:
        reader.problem(f"{where}.keep_events_days",
                       f"must be 0 (keep events forever) or at least {MIN_KEEP_EVENTS_DAYS:g} "
                       f"day, not {numbers['keep_events_days']!r}")
        numbers["keep_events_days"] = DEFAULT_KEEP_EVENTS_DAYS
    admin_token = reader.secret(table, "admin_token", where,
                                off="remove the key to turn the operator console off",
                                example="ONETAG_ADMIN_TOKEN", guards="the operator console")
    return ServerConfig(
        database=database, public_url=public_url, script_path=script_path,
        event_path=event_path, admin_token=admin_token,
        trusted_proxies=_trusted_proxies(reader, table, where),
        forward=reader.boolean(table, "forward", where, True), log_format=log_format,
        metrics_public=reader.boolean(table, "metrics_public", where, False), **numbers)


def _parse_site(reader: _Reader, table: Any, index: int) -> SiteConfig | None:
    if not isinstance(table, dict):
        reader.problem(f"sites[{index}]", "must be a table")
        return None
    site_id = reader.string(table, "id", f"sites[{index}]", required=True)
    if site_id is None:
        return None
    where = f"sites[{site_id}]"
    if not SITE_ID_RE.match(site_id):
        reader.problem(f"{where}.id", "must be 1-64 characters of A-Z a-z 0-9 _ -")
    known = SITE_KEYS | set(VENDORS)  # VENDORS as it is now (a test may add one)
    for key in table:
        if key not in known:
            reader.unknown(where, key, sorted(known))
    origins = table.get("origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        reader.problem(f"{where}.origins", "must be a list of origins like \"https://shop.example\"")
        origins = []
    normalised = []
    for position, origin in enumerate(origins):
        try:
            normalised.append(normalise_origin(origin))
        except ValueError as exc:
            reader.problem(f"{where}.origins[{position}]", f"{origin!r} {exc}")
    currency = reader.string(table, "currency", where, default="USD")
    if not re.fullmatch(r"[A-Z]{3}", currency or ""):
        reader.problem(f"{where}.currency", f"must be a 3-letter ISO 4217 code, not {currency!r}")
    spa = reader.choice(table, "spa_page_views", where, ("auto", "manual"))
    consent = reader.choice(table, "consent", where, ("none", "required"))
    max_cart_lines = table.get("max_cart_lines", DEFAULT_MAX_CART_LINES)
    if isinstance(max_cart_lines, bool) or not isinstance(max_cart_lines, int) or not (
            1 <= max_cart_lines <= 10_000):
        reader.problem(f"{where}.max_cart_lines",
                       f"must be a whole number from 1 to 10000, not {max_cart_lines!r}")
        max_cart_lines = DEFAULT_MAX_CART_LINES
    cart_url = _cart_url(reader, reader.string(table, "cart_url", where), f"{where}.cart_url")
    vendors = {}
    for name, module in VENDORS.items():
        if name in table:
            vendor = _parse_vendor(reader, module, table[name], f"{where}.{name}")
            if vendor is not None:
                vendors[name] = vendor
    api_key = reader.secret(table, "api_key", where,
                            off="remove the key to turn the site's backend API off",
                            example="SHOP1_API_KEY", guards="the site's backend API")
    # An api_key written is configured even when unset or empty (each reported on its own,
    # or an unset one read as absent by the commands that never send).
    has_key = "api_key" in table
    order_source = reader.string(table, "order_source", where,
                                 default="backend" if has_key else "browser")
    if order_source not in ("backend", "browser"):
        reader.problem(f"{where}.order_source", f"must be \"backend\" or \"browser\", not {order_source!r}")
    elif order_source == "backend" and not has_key:
        reader.problem(f"{where}.order_source", "\"backend\" needs the site's api_key: without it "
                       "no backend can send orders")
    identity_secret = reader.secret(table, "identity_secret", where,
                                    off="remove the key to leave identify unsigned",
                                    example="SHOP1_IDENTITY_SECRET")
    feed_token = reader.secret(table, "feed_token", where,
                               off="remove the key to publish no product feed",
                               example="SHOP1_FEED_TOKEN", guards="the feed")
    sync_time = reader.string(table, "product_sync_time", where, default=DEFAULT_PRODUCT_SYNC_TIME)
    sync_minute = parse_sync_time(sync_time or "")
    if sync_minute is None:
        reader.problem(f"{where}.product_sync_time", "must be a UTC time of day \"HH:MM\" "
                       f"(00:00 to 23:59), not {sync_time!r}")
        sync_minute = DEFAULT_PRODUCT_SYNC_MINUTE
    return SiteConfig(
        id=site_id, origins=tuple(normalised),
        api_key=api_key, currency=currency, spa_page_views=spa,
        capture_form_email=reader.boolean(table, "capture_form_email", where, True),
        consent=consent, debug=reader.boolean(table, "debug", where, False), max_cart_lines=max_cart_lines,
        vendors=vendors, cart_url=cart_url, order_source=order_source,
        identity_secret=identity_secret, feed_token=feed_token,
        product_sync_minute=sync_minute,
        coupons=_coupons(reader, table["coupons"], f"{where}.coupons") if "coupons" in table else None)


def parse_sync_time(text: str) -> int | None:
    """``"HH:MM"`` (24-hour, UTC) as minutes after midnight; None if it is not one."""
    match = SYNC_TIME_RE.fullmatch(text)
    if match is None:
        return None
    hours, minutes = int(match[1]), int(match[2])
    return hours * 60 + minutes if hours < 24 and minutes < 60 else None


COUPON_KEYS = ("remarkety_api_key", "webhook_url", "webhook_secret", "timeout_s")


def _coupons(reader: _Reader, table: Any, where: str) -> CouponConfig | None:
    """``[sites.coupons]``: every key checked; the two secrets at least 16 characters."""
    if not isinstance(table, dict):
        reader.problem(where, "must be a table ([sites.coupons])")
        return None
    for key in table:
        if key not in COUPON_KEYS:
            reader.unknown(where, key, COUPON_KEYS)
    url = reader.string(table, "webhook_url", where, required=True)
    parts = urlsplit(url or "")
    if url is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        reader.problem(f"{where}.webhook_url", f"must be an absolute http(s) URL like "
                                               f"\"https://shop.example/onetag/coupons\", not {url!r}")
    elif url is not None and (problem := address_problem(url)):
        reader.problem(f"{where}.webhook_url", f"{problem}, not {url!r}")
    secrets = {}
    for key in ("remarkety_api_key", "webhook_secret"):
        value = reader.secret(table, key, where, required=True,
                              off="remove [sites.coupons] to turn the coupons bridge off",
                              example=f"SHOP1_COUPON_{key.upper()}")
        secrets[key] = value
    timeout = reader.resolve(f"{where}.timeout_s", table.get("timeout_s", DEFAULT_COUPON_TIMEOUT_S))
    if isinstance(timeout, str):
        try:
            timeout = float(timeout)
        except ValueError:
            pass
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout <= MAX_COUPON_TIMEOUT_S):
        reader.problem(f"{where}.timeout_s", f"must be a number of seconds > 0 and <= "
                                             f"{MAX_COUPON_TIMEOUT_S:g}, not {timeout!r}")
        timeout = DEFAULT_COUPON_TIMEOUT_S
    return CouponConfig(webhook_url=url or "", timeout_s=float(timeout), **secrets)


CART_URL_FIELDS = ("cart_guid", "sc")


def _cart_url(reader: _Reader, template: str | None, where: str) -> str | None:
    """A URL template naming only {cart_guid} and {sc}, an http(s) URL once filled in."""
    if not template:
        return None
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        reader.problem(where, f"is not a valid template ({exc}); use {{cart_guid}} and {{sc}}")
        return None
    unknown = names - set(CART_URL_FIELDS)
    if unknown:
        reader.problem(where, f"names {', '.join(sorted(repr(n) for n in unknown))}; the only "
                              "placeholders are {cart_guid} and {sc}")
        return None
    example = urlsplit(template.format(cart_guid="GUID", sc="SC"))
    if example.scheme not in ("http", "https") or not example.netloc:
        reader.problem(where, f"must be an http(s) URL like "
                              f"\"https://shop.example/cart?id={{cart_guid}}\", not {template!r}")
        return None
    return template


def _fill_placeholders(reader: _Reader, module: Any, values: dict[str, str],
                       where: str) -> str | None:
    """A configured URL with its ``{key}`` placeholders filled in from the section's public
    keys (as its default's are), or None after a problem naming it: an unknown name (a typo
    was sent to the vendor as written), a secret (a script_url reaches every browser), a key
    not set, or a template ``str.format`` can't read."""
    key = where.rsplit(".", 1)[1]
    template = values[key]
    names = [s.name for s in module.SETTINGS if not s.secret and not s.url]
    known = ", ".join("{" + name + "}" for name in names)
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion
                  in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        reader.problem(where, f"is not a valid template ({exc}); its placeholders are {known} "
                              "(write {{ and }} for a brace)")
        return None
    for name, spec, conversion in fields:
        if name not in names or spec or conversion:
            reader.problem(where, f"names {{{name}{'!' + conversion if conversion else ''}"
                                  f"{':' + spec if spec else ''}}}, which is no placeholder: "
                                  f"the placeholders are {known}")
            return None
        if name not in values:
            reader.problem(where, f"names {{{name}}}, which is not set")
            return None
    return template.format_map(values) if fields or "{" in template or "}" in template \
        else template


def _parse_vendor(reader: _Reader, module: Any, table: Any, where: str) -> VendorConfig | None:
    if not isinstance(table, dict):
        reader.problem(where, "must be a table")
        return None
    settings = {s.name: s for s in module.SETTINGS}
    for key in table:
        if key not in settings and key != "routes":
            reader.unknown(where, key, [*settings, "routes"])
    values: dict[str, str] = {}
    for setting in module.SETTINGS:
        if setting.secret:
            value = reader.secret(table, setting.name, where, required=setting.required,
                                  off="remove the key to leave it unset", kinds=SENDER_SECRETS)
        else:
            value = reader.string(table, setting.name, where, required=setting.required,
                                  kinds=ALL_SECRETS)
            if value is not None and _CONTROL.search(value):
                reader.problem(f"{where}.{setting.name}", "holds a control character (a line "
                               "break pasted with it?): it goes into the vendor's requests")
                value = None
        if value is not None:
            values[setting.name] = value
    missing = {s.name for s in module.SETTINGS if s.name not in values}
    for setting in module.SETTINGS:  # defaults may name other keys: "{store_id}"
        if setting.name not in values and setting.default is not None:
            try:
                values[setting.name] = setting.default.format_map(values)
            except KeyError as exc:
                # A required key already reported missing: its follow-ons are not problems.
                needed = exc.args[0]
                if not (needed in missing and (settings[needed].required
                                               or settings[needed].default is not None)):
                    reader.problem(f"{where}.{setting.name}",
                                   f"its default needs {needed}, which is not set")
    # A URL written in the config names the section's keys as its default does (the contract's
    # own `webhook_url = ".../?storeId={store_id}"`): they were sent as written, braces and all.
    for setting in module.SETTINGS:
        if setting.url and setting.name not in missing and setting.name in values:
            filled = _fill_placeholders(reader, module, values, f"{where}.{setting.name}")
            if filled is None:
                del values[setting.name]
            else:
                values[setting.name] = filled
    for setting in module.SETTINGS:
        value = values.get(setting.name)
        if setting.url and value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                reader.problem(f"{where}.{setting.name}", f"must be an absolute http(s) URL like "
                                                         f"\"https://host/path\", not {value!r}")
            elif problem := address_problem(value):
                reader.problem(f"{where}.{setting.name}", f"{problem}, not {value!r}")
    routes_table = table.get("routes", {})
    if not isinstance(routes_table, dict):
        reader.problem(f"{where}.routes", "must be a table like {purchase = \"server\"}")
        routes_table = {}
    routes = dict(module.DEFAULT_ROUTES)
    for event, mode in routes_table.items():
        if mode not in routing.MODES:
            reader.problem(f"{where}.routes.{event}", f"must be one of {', '.join(routing.MODES)}, not {mode!r}")
            continue
        routes[event] = mode
    vendor = VendorConfig(name=module.NAME, values=values, routes=routes)
    server_side = routing.sends_from_server(vendor)
    from . import product_sync  # here: it imports the outbox, which imports this module

    if product_sync.syncs(vendor) and "product_updated" not in server_side:
        server_side.append("the product sync")  # it sends unless product_updated is off
    for setting in module.SETTINGS:
        # Absent from the file (an env: value unset is the process's own check, above). The
        # commands that never send nor serve (``require_secrets=False``: deliveries, replay,
        # migrate ...) still read such a file.
        if (setting.server_auth and setting.name not in table and server_side
                and reader.required):
            named = [("custom events" if event == "*" else event) for event in server_side]
            shown = ", ".join(named[:4]) + (", ..." if len(named) > 4 else "")
            reader.problem(f"{where}.{setting.name}",
                           f"is required: this section's routes send events from the server "
                           f"({shown}), and {module.NAME}'s API refuses a request without it "
                           f"({setting.help.split(';')[0]}); set it, or route every event "
                           f"\"browser\" or \"off\"")
    return vendor


def demo(host: str = "127.0.0.1", port: int = 8000, database: str | None = None) -> Settings:
    """The no-config demo: site ``demo`` with every vendor pointed at local stand-ins.

    Its URLs name the bound ``host`` as a URL writes it: an IPv6 address in brackets
    (``--host ::1`` -> ``http://[::1]:8000``). A wildcard bind keeps its address, as a
    browser on this machine reaches both ``http://0.0.0.0:8000`` and ``http://[::]:8000``."""
    url_host = _host(host) or host  # an invalid host is left for the URL checks to report
    public_url = f"http://{url_host}:{port}"
    stub = f"{public_url}/static/demo/stubs"
    sink = f"{public_url}/demo/sink"
    data = {
        "server": {"database": database or "sqlite:///onetag-demo.db", "public_url": public_url},
        "sites": [{
            "id": "demo", "origins": [public_url], "api_key": "demo-api-key-not-secret",
            "currency": "USD",
            # Not a secret: the demo signs any email it is asked to (server/demo.py).
            "identity_secret": "demo-identity-secret-not-secret",
            "rejoiner": {"site_id": "DEMO123", "domain": url_host, "api_key": "demo",
                         "script_url": f"{stub}/rejoiner.js", "api_base": f"{sink}/rejoiner"},
            "remarkety": {"store_id": "demo-store", "api_key": "demo",
                          "script_url": f"{stub}/remarkety.js",
                          "webhook_url": f"{sink}/remarkety?storeId=demo-store"},
            "esputnik": {"site_id": "DEMO", "api_key": "demo", "script_url": f"{stub}/esputnik.js",
                         "tracker_url": f"{sink}/esputnik"},
            "sendlane": {"integration_token": "demo-token", "api_token": "demo",
                         "script_url": f"{stub}/sendlane.js", "api_base": f"{sink}/sendlane"},
        }],
    }
    settings = parse(data, file="demo", env={})
    return Settings(server=settings.server, sites=settings.sites, source="demo")


def public_settings(vendor: VendorConfig) -> dict[str, str]:
    """The vendor settings the generated script carries: only those its module marks public,
    and of those only the ones its browser adapter reads (``Setting.browser``)."""
    module = VENDORS[vendor.name]
    return {s.name: vendor.values[s.name] for s in module.SETTINGS
            if s.public and s.browser and not s.secret and s.name in vendor.values}
