"""``onetag``: serve | init | check | migrate | deliveries | replay | worker | coupons | backfill |
export | person."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from . import __version__
from . import config as config_module

EXAMPLE_CONFIG = '''\
# onetag.toml — one file for the server and every site it tracks.
# Any string value may be "env:NAME" to read it from the environment: keep secrets there.

[server]
database    = "sqlite:///onetag.db"        # embedded SQLite file (WAL, synchronous=FULL)
public_url  = "http://127.0.0.1:8000"      # where browsers reach onetag (https in production)
script_path = "/s/{site_id}.js"            # neutral names: ad-block lists match "analytics", "track"
event_path  = "/e"
admin_token = "env:ONETAG_ADMIN_TOKEN"
# hold_days = 7                            # how long anonymous activity waits for an email
# keep_events_days = 0                     # events, sessions, finished deliveries kept this
#                                          # many days (GDPR storage limitation); 0: forever
# forward   = true                         # run the vendor forwarder inside `onetag serve`
# log_format = "text"                      # "json": one object a line (or --log-format json)
# metrics_public = false                   # true: GET /metrics without the admin_token bearer
# trusted_proxies = ["127.0.0.1"]          # your proxy, if it appends to X-Forwarded-For

[[sites]]
id       = "shop1"                         # [A-Za-z0-9_-]{1,64}; the script is /s/shop1.js
origins  = ["https://shop.example"]        # who may send events (CORS allow-list)
api_key  = "env:SHOP1_API_KEY"             # secret: Authorization: Bearer ... for the backend API
currency = "USD"                           # default when an event names none
# spa_page_views     = "auto"              # "manual": only pushed page_view events count
# capture_form_email = true                # pick up emails typed into the page's forms
# consent            = "none"              # "required": wait for the page's consent (Google
#                                          # Consent Mode, or {event: "onetag_consent", granted: true})
# debug              = false               # log every event and vendor call in the console
# cart_url = "https://shop.example/cart/restore?guid={cart_guid}"  # public: where abandoned-
#                                          # cart emails lead ({cart_guid}, {sc} filled in)
# order_source       = "backend"           # orders only from the backend API (default with api_key)
# identity_secret    = "env:SHOP1_IDENTITY_SECRET"  # pages sign identify: docs/trust.md
# feed_token         = "env:SHOP1_FEED_TOKEN"  # publishes /feeds/shop1/products.xml?token=...
# product_sync_time  = "03:00"             # UTC: Sendlane's nightly product sync

# A vendor section present = that vendor enabled for this site. Remove what you don't use.
[sites.rejoiner]
site_id = "ABC1234"                        # public (setAccount)
domain  = ".shop.example"                  # public (setDomain)
api_key = "env:SHOP1_REJOINER_API_KEY"     # secret: REST API
# routes = { purchase = "server" }         # browser | server | both | fallback | off

[sites.remarkety]
store_id = "AbCdEf"                        # public (setStoreKey)
api_key  = "env:SHOP1_REMARKETY_API_KEY"   # secret: x-token header

[sites.esputnik]
site_id = "8A412DC"                        # public: GeneralInfo.siteId
# script_id = "..."                        # public: loader id, defaults to site_id
api_key = "env:SHOP1_ESPUTNIK_API_KEY"     # secret, optional: tracker Basic auth

[sites.sendlane]
integration_token = "0123456789abcdef"     # public: pusher.js data-token
api_token = "env:SHOP1_SENDLANE_API_TOKEN" # secret: Authorization: Bearer ...

# Remarkety's Coupons API (docs/coupons.md): give Remarkety the base URL
# <public_url>/remarkety/shop1 and this remarkety_api_key; the store creates the coupons.
# [sites.coupons]
# remarkety_api_key = "env:SHOP1_COUPON_API_KEY"      # secret, 16+ chars: Remarkety sends it
# webhook_url       = "https://shop.example/onetag/coupons"  # the store's coupon webhook
# webhook_secret    = "env:SHOP1_COUPON_WEBHOOK_SECRET" # secret, 16+ chars: signs each call
# timeout_s         = 5                                # the whole store call
'''


def _find_config(path: str | None) -> str | None:
    """--config, else $ONETAG_CONFIG, else ./onetag.toml if present; None means the demo."""
    if path:
        return path
    if os.environ.get("ONETAG_CONFIG"):
        return os.environ["ONETAG_CONFIG"]
    if Path("onetag.toml").is_file():
        return "onetag.toml"
    return None


NO_CONFIG = "no config file (--config, $ONETAG_CONFIG or ./onetag.toml)"


def _refuse(message: str) -> SystemExit:
    """A CLI mistake: one ``onetag: ...`` line on stderr, exit status 2 (raise the result)."""
    print(f"onetag: {message}", file=sys.stderr)
    return SystemExit(2)


def _settings(config: str | None, require_secrets: Any = True
              ) -> tuple[config_module.Settings, str | None]:
    """The config's settings and its path; with no config, the demo's, said on stderr: a
    command run where its config isn't found must not pass the demo's database off as the
    one meant (migrate made it, export wrote an empty file, all without a word)."""
    path = _find_config(config)
    if path is not None:
        return _load(path, require_secrets=require_secrets), path
    settings = config_module.demo()
    print(f"onetag: {NO_CONFIG}: using the demo's database {_shown(settings)}", file=sys.stderr)
    return settings, None


def _relative_rule(settings: config_module.Settings, path: str | None) -> str:
    """Where a relative SQLite path is looked for, when the config sits in another folder
    (kept from the working directory: existing databases stay where they are); else ""."""
    database = settings.server.sqlite_path
    if path is None or os.path.isabs(database):
        return ""
    here, folder = Path.cwd(), Path(path).resolve().parent
    if folder == here.resolve():
        return ""
    return (f"{path}'s {settings.server.database} is relative, so it is from the working "
            f"directory, {here}, not from the config's folder, {folder}")


def _new_database_note(settings: config_module.Settings, path: str | None) -> None:
    """Before a command makes a SQLite file from a relative path and another folder's
    config: where, and why there."""
    if settings.server.is_postgresql or Path(settings.server.sqlite_path).exists():
        return
    rule = _relative_rule(settings, path)
    if rule:
        print(f"onetag: no database at {_shown(settings)} yet: creating it ({rule})",
              file=sys.stderr)


def _forward_options() -> Any:
    """``ONETAG_FORWARD_*``, or one line naming the variable and its range (exit 2)."""
    from .forward_options import ForwarderOptions

    try:
        return ForwarderOptions.from_env()
    except ValueError as exc:
        raise _refuse(str(exc)) from None


def _row_id(value: int | None, option: str = "--id") -> None:
    """A delivery id SQLite can hold (a larger one overflowed into a traceback)."""
    if value is not None and not 0 < value < 2**63:
        raise _refuse(f"{option} takes a delivery number from 1 to {2**63 - 1}, not {value}")


def _load(path: str | None, require_secrets: Any = True) -> config_module.Settings:
    try:
        return config_module.load(path, require_secrets=require_secrets)
    except config_module.ConfigError as exc:
        print(f"onetag: {path} has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


# The ``env:`` values each process refuses to start without (``config.load``'s
# ``require_secrets``). A worker sends: the vendors' secrets, not the sites' (the nodes check
# those). ``serve`` is decided by its config (``load_for``).
WORKER_SECRETS = config_module.SENDER_SECRETS


def load_for(path: str, process: str) -> config_module.Settings:
    """The config as ``process`` (serve | worker | all) loads it, refusing what it lacks. A
    node that does not forward never sends, so the vendors' secrets may live only where the
    workers run (docs/postgresql.md, "What each process needs"); one that forwards needs them too."""
    if process == "worker":
        return _load(path, require_secrets=WORKER_SECRETS)
    if process == "serve":
        settings = _load(path, require_secrets=config_module.NODE_SECRETS)
        if not settings.server.forward:
            return settings
    return _load(path)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    if not 0 < args.port < 65536:
        raise _refuse(f"--port takes 1 to 65535, not {args.port}")
    path = _find_config(args.config)
    warning = serving = None
    if path is None:
        settings = config_module.demo(args.host, args.port)
        print(f"onetag: {NO_CONFIG}, so serving "
              f"the demo site 'demo' on {_shown(settings)}.\n"
              f"onetag: open {settings.server.public_url}/demo/ — its events land in the store "
              f"and show in the page's side panel.", flush=True)
    else:
        settings = load_for(path, "serve")
        sites = ", ".join(settings.sites)
        # Said once the database is known usable: before, a stale schema or a read-only
        # file printed "serving ..." and then "not serving".
        serving = (f"onetag: serving {len(settings.sites)} site(s) ({sites}) from {path} on "
                   f"{_shown(settings)}")
        warning = public_url_warning(settings.server.public_url, args.port)
    from . import connections, logs

    options = _forward_options() if settings.server.forward else None
    log_format = args.log_format or settings.server.log_format
    if warning and log_format == "json":  # stderr stays one JSON object a line
        logs.configure(log_format, args.log_level)
        logging.getLogger("onetag").warning(warning.removeprefix("onetag: warning: "))
    elif warning:
        print(warning, file=sys.stderr, flush=True)
    if settings.server.is_postgresql:
        problem = postgresql_problem(settings)
        if problem is not None:
            print(f"onetag: {problem}; not serving.", file=sys.stderr)
            return 2
        problem = None
    else:
        from .store.base import SchemaNotCurrent
        from .store.sqlite_writer import check_writable

        try:
            problem = check_writable(settings.server.sqlite_path)
        except SchemaNotCurrent as exc:  # a downgrade: the file is fine, this release is not
            print(f"onetag: {exc}; not serving.", file=sys.stderr)
            return 2
    if problem is not None:
        print(f"onetag: cannot write the database at {_shown(settings)} ({problem}); "
              "not serving. Check the path, its permissions, the mount and free space.",
              file=sys.stderr)
        return 2
    if serving:
        print(serving, flush=True)
    log_config = logs.configure(log_format, args.log_level)
    connections.raise_open_files_limit()
    connections.install_accept_error_filter()
    app = create_app(settings, forward_options=options)
    # Access lines are info: at a quieter level none is ever written, but uvicorn still
    # formats each one's client address and path before the logger drops it (~1.5 µs a
    # request on the event loop).
    access_log = logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)
    # The app, its modules and settings live as long as the process: out of the collector's
    # full passes, which walked these ~48,000 objects on the event loop each time (5-50 ms,
    # every request in flight waiting).
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                http=connections.header_deadline_protocol(settings.server.header_timeout_s),
                log_config=log_config, server_header=False, access_log=access_log,
                **proxy_options(settings.server.trusted_proxies),
                timeout_graceful_shutdown=max(1, int(settings.server.shutdown_grace_s / 2)))
    return 0


def proxy_options(trusted: tuple[str, ...]) -> dict[str, Any]:
    """uvicorn's options for ``[server] trusted_proxies``. None (the default): X-Forwarded-*
    is read from no one, and the client address is the TCP peer's (uvicorn's own default
    trusted 127.0.0.1, so a proxy on the same host that passed a client's X-Forwarded-For
    through let that client choose its address: no login throttle, a forged address in the
    access log and in the replays' record). Named proxies: uvicorn takes the nearest address
    in X-Forwarded-For that is not one of them."""
    if not trusted:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(trusted)}


def public_url_warning(public_url: str, port: int) -> str | None:
    """A public_url on this machine (loopback, ``localhost``, or the unspecified 0.0.0.0 and
    ``[::]``, which reach this machine too) on another port than the one served: the script
    tag and the event URL the script posts to would point where nothing listens (a copied
    config)."""
    parts = urlsplit(public_url)
    host = parts.hostname or ""
    try:
        address = None if host == "localhost" else ipaddress.ip_address(host)
        loopback = address is None or address.is_loopback or address.is_unspecified
    except ValueError:
        loopback = False
    url_port = parts.port or (443 if parts.scheme == "https" else 80)
    if not loopback or url_port == port:
        return None
    host_text = parts.netloc.rpartition("@")[2]
    if parts.port is not None:
        host_text = host_text.rsplit(":", 1)[0]
    return (f"onetag: warning: [server] public_url {public_url} names port {url_port}, but this "
            f"server binds port {port}: scripts would load and post events where nothing "
            f"listens (set public_url to {parts.scheme}://{host_text}:{port} or run with "
            f"--port {url_port})")


def postgresql_problem(settings: config_module.Settings, write: bool = True) -> str | None:
    """Why a command can't run on the configured PostgreSQL database (the driver missing,
    the server unreachable, the schema not current), or None. ``write`` (``serve``,
    ``worker``): and no write commits, a read-only database. ``export`` and ``backfill``,
    which read it directly, ask without: a missing table was a traceback."""
    from .store import open_store

    async def probe() -> None:
        store = open_store(settings, ingest=False)
        await store.open()  # checks the schema (store/pg_migrate.py)
        try:
            if write:
                await store.ping()  # a committed write: a read-only database is refused here
        finally:
            await store.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return _database_problem(settings, exc)
    return None


def _database_problem(settings: config_module.Settings, exc: Exception) -> str:
    from .store import DriverMissing
    from .store.pg_migrate import SchemaNotCurrent

    if isinstance(exc, SchemaNotCurrent) and not settings.is_demo:
        return str(exc).replace("--config <file>", f"--config {settings.source}")
    if isinstance(exc, (DriverMissing, SchemaNotCurrent)):
        return str(exc)
    return f"cannot use the database {_shown(settings)} ({type(exc).__name__}: {exc})"


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply the pending migrations of the configured database and name them; first say
    whether the release running on it now keeps running through them (``compat.Plan``).
    ``--check``: say that alone and apply nothing (exit 3: not a rolling upgrade)."""
    settings, path = _settings(args.config, require_secrets=False)
    label = _shown(settings)

    def said(plan: Any) -> None:
        if plan.applied or args.check:  # a new database: nothing runs on it to be told of
            for line in plan.lines(label):
                print(line, flush=True)

    if settings.server.is_postgresql:
        try:
            from .store.pg_migrate import migrate_url
            import asyncpg  # noqa: F401
        except ImportError:
            from .store import DRIVER_MISSING

            print(f"onetag: {DRIVER_MISSING}", file=sys.stderr)
            return 2
        try:
            applied = asyncio.run(migrate_url(settings.server.database,
                                              check_only=args.check, said=said))
        except Exception as exc:
            hint = getattr(exc, "hint", None)
            print(f"onetag: cannot migrate {label} ({type(exc).__name__}: {exc})"
                  + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 1
    else:
        import sqlite3

        from .store.base import SchemaNotCurrent
        from .store.compat import MigrationUndeclared
        from .store.sqlite_writer import migrate, plan

        db_path = Path(settings.server.sqlite_path)
        if args.check and not db_path.exists():
            raise _refuse(f"no database at {label} yet: nothing runs on it; "
                          f"`onetag migrate --config {path}` makes it")
        _new_database_note(settings, path)
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise _refuse(f"cannot migrate {label}: cannot open it ({exc})") from None
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            found = plan(conn)
            if args.check:
                applied = found
            else:
                said(found)
                applied = migrate(conn)
        except (sqlite3.Error, SchemaNotCurrent, MigrationUndeclared) as exc:
            print(f"onetag: cannot migrate {label} ({exc})", file=sys.stderr)
            return 1
        finally:
            conn.close()
    if args.check:
        said(applied)
        if not applied.pending:
            print(f"onetag: {label} is current; nothing to apply")
        return 3 if applied.breaking() else 0
    if applied:
        print(f"onetag: applied {len(applied)} migration(s) to {label}: {', '.join(applied)}")
    else:
        print(f"onetag: {label} is current; nothing to apply")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"onetag: {path} exists; not overwriting it (use --force)", file=sys.stderr)
        return 1
    try:
        path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    except OSError as exc:
        raise _refuse(f"cannot write {path} ({exc.strerror or exc})") from None
    # Its secrets are env: values: check refuses each one not exported, so name them.
    active = "\n".join(line.split("#", 1)[0] for line in EXAMPLE_CONFIG.splitlines())
    names = re.findall(r'"env:([A-Z0-9_]+)"', active)
    print(f"onetag: wrote {path}; edit it, export the secrets it reads from the environment "
          f"(export {' '.join(f'{name}=...' for name in names)}), then "
          f"`onetag check --config {path}`")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    path = _find_config(args.config)
    if path is None:
        print("onetag: no config file to check (--config PATH, $ONETAG_CONFIG or ./onetag.toml)",
              file=sys.stderr)
        return 2
    settings = load_for(path, args.process)
    for site in settings.sites.values():
        vendors = ", ".join(site.vendors) or "no vendors"
        print(f"site {site.id}: {vendors}; origins {', '.join(site.origins) or '(none)'}")
    print(f"retention: {_retention(settings.server)}")
    if args.process == "all":
        print(f"onetag: {path} is valid")
    else:
        print(f"onetag: {path} is valid for `onetag {args.process}` (with this environment)")
    return 0


def _retention(server: config_module.ServerConfig) -> str:
    """What ``onetag check`` says is kept how long (``[server] keep_events_days``)."""
    days = server.keep_events_days
    kept = ("kept forever (keep_events_days = 0)" if not days else
            f"pruned after {days:g} days (keep_events_days)")
    return (f"events, sessions and finished deliveries {kept}; delivery attempts and coupon "
            f"calls pruned after {server.keep_attempts_days:g} days (keep_attempts_days)")


# Deliveries: the operator's view of the outbox ----------------------------------------------
# These open the database directly (no server needed); SQLite's WAL lets them run beside a
# live `onetag serve` or `onetag worker`.

STAT_COLUMNS = ("pending", "failing", "held", "delivered", "dead", "browser", "expired",
                "ignored")
# "5m" ago; "-5m" too (journalctl's way of saying it), the minus sign being the "ago".
RELATIVE_RE = re.compile(r"^\s*-?\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_TIME_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z


def _shown(settings: config_module.Settings) -> str:
    """The database as output names it: the SQLite file's absolute path, or the URL without
    its password."""
    if settings.server.is_postgresql:
        return config_module.database_label(settings.server.database)
    path = settings.server.sqlite_path
    # Absolute: a relative path is from the working directory, which the output must show.
    return path if path in ("", ":memory:") else os.path.abspath(path)


def _ops_settings(config: str | None) -> config_module.Settings:
    """The settings an operator command works on: the config, else the demo's database."""
    if _find_config(config) is None:
        demo = config_module.demo()
        if not Path(demo.server.sqlite_path).is_file():
            raise _refuse(f"{NO_CONFIG}, and no demo database at {_shown(demo)}: nothing has "
                          f"been stored yet")
    # They never send, so vendor secrets need not be set (env: values left unset read as absent).
    settings, path = _settings(config, require_secrets=False)
    if settings.server.is_postgresql:
        return settings  # the store says what is missing (the schema check)
    database = settings.server.sqlite_path
    if database != ":memory:" and not Path(database).is_file():
        where = _relative_rule(settings, path) or f"from {path}"
        raise _refuse(f"no database at {_shown(settings)} ({where}); nothing has been stored "
                      f"yet")
    return settings


def parse_since(text: str, now: float | None = None) -> int:
    """``--since``: ``30m``, ``2h``, ``3d``, ``1w`` ago (``-30m`` too), or an ISO 8601
    date/time (a time without a zone is local time). Returns epoch milliseconds."""
    now = time.time() if now is None else now
    match = RELATIVE_RE.match(text)
    if match:
        ms = (now - float(match.group(1)) * UNIT_S[match.group(2)]) * 1000
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a relative time nor an ISO date/time") from None
        try:
            ms = (when if when.tzinfo else when.astimezone()).timestamp() * 1000  # local time
        except (OverflowError, OSError, ValueError):
            ms = -1.0
    # A time SQLite's integers and the output's dates can hold (99999999999w overflowed).
    if not 0 <= ms <= MAX_TIME_MS:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return int(ms)


TIME_FORMS = ("30m, 2h, 3d or 1w ago, or an ISO 8601 date/time like 2026-01-31 or "
              "2026-01-31T14:00 (local time without a zone), from 1970 to 9999")


TIME_OPTIONS = ("--since", "--until")


def times_attached(argv: Sequence[str]) -> list[str]:
    """``--since -5m`` as ``--since=-5m``: argparse takes a value starting with ``-`` (that
    is not a plain negative number) for an option and stops with its usage block, so a value
    of a time option that starts with a minus and a digit is attached to it here. Nothing
    after ``--`` is touched (a file name there is a file name)."""
    out: list[str] = []
    rest = iter(argv)
    for arg in rest:
        if arg == "--":
            out.append(arg)
            out.extend(rest)
            break
        if arg in TIME_OPTIONS:
            value = next(rest, None)
            if value is not None and re.match(r"-\d", value):
                out.append(f"{arg}={value}")
                continue
            out.append(arg)
            if value is not None:
                out.append(value)
            continue
        out.append(arg)
    return out


def _times(args: argparse.Namespace, *options: str) -> None:
    """``--since``/``--until`` read into epoch ms here, not by argparse: a bad one is one
    line naming the option and what it takes (argparse printed its usage block first)."""
    for option in options:
        text = getattr(args, option)
        if text is not None:
            try:
                setattr(args, option, parse_since(text))
            except argparse.ArgumentTypeError as exc:
                raise _refuse(f"--{option}: {exc}; it takes {TIME_FORMS}") from None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


async def _with_store(settings: config_module.Settings, work: Any,
                      one_shot: bool = True) -> Any:
    """``work(store)`` on the configured store. A database that can't be used (a PostgreSQL
    schema behind or a server unreachable, a file that is no SQLite database) is a one-line
    message and exit status 2, not a traceback.

    ``one_shot``: the commands that open the store briefly (deliveries, replay, catalog,
    coupons) write at most a transaction or two, so SQLite's writer runs in this process's
    connection thread, as other tools' do, unless ``$ONETAG_WRITER`` says otherwise: a
    writer process of its own was a second Python start (about half of ``onetag
    deliveries``' time). Not one-shot (worker, backfill --send, which write for as long as
    they run): the store's default, a process."""
    from .store import open_store

    import sqlite3

    writer = os.environ.get("ONETAG_WRITER", "thread") if one_shot else None
    store = open_store(settings, writer=writer, ingest=False)
    try:
        await store.open()
    except Exception as exc:  # the file is no database, the server is unreachable, ...
        with contextlib.suppress(Exception):
            await store.close()  # whatever the failed open left running
        raise _refuse(_database_problem(settings, exc)) from None
    try:
        return await work(store)
    except sqlite3.Error as exc:  # opened, then refused (locked, damaged)
        raise _refuse(_database_problem(settings, exc)) from None
    finally:
        await store.close()


def delivery_report(settings: config_module.Settings, stats: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """One row per vendor (every configured vendor, even with no rows yet), numbers as ints."""
    by_vendor = {row["vendor"]: row for row in stats}
    vendors = sorted({v for site in settings.sites.values() for v in site.vendors} | set(by_vendor))
    report = []
    for vendor in vendors:
        row = by_vendor.get(vendor, {})
        item: dict[str, Any] = {"vendor": vendor}
        item.update({column: int(row.get(column) or 0) for column in STAT_COLUMNS})
        item["oldest_pending_age_s"] = row.get("oldest_pending_age_s")
        report.append(item)
    return report


def format_report(report: list[dict[str, Any]]) -> str:
    headers = ("vendor", *STAT_COLUMNS, "oldest pending")
    rows = [(r["vendor"], *(str(r[c]) for c in STAT_COLUMNS), _age(r["oldest_pending_age_s"]))
            for r in report]
    if len(report) > 1:
        ages = [r["oldest_pending_age_s"] for r in report if r["oldest_pending_age_s"] is not None]
        rows.append(("total", *(str(sum(r[c] for r in report)) for c in STAT_COLUMNS),
                     _age(max(ages) if ages else None)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(headers, widths)))]
    for row in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _when(ms: int | None) -> str:
    """A stored time as output shows it: in UTC, said (as the logs' are), not a local time
    with no zone that read as the logs' UTC."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _clock(ms: int, now_ms: int) -> str:
    """A time of day (UTC) when it is within a day of now, else the date too."""
    when = datetime.fromtimestamp(ms / 1000, timezone.utc)
    return when.strftime("%H:%M:%S UTC" if abs(ms - now_ms) < 86_400_000
                         else "%Y-%m-%d %H:%M:%S UTC")


def _error_head(error: str) -> str:
    """"HTTP 503: <body>" -> "HTTP 503"; a key problem or other error up to its first clause."""
    head = error.split(";", 1)[0].split("\n", 1)[0]
    if head.startswith("HTTP ") and ":" in head:
        head = head.split(":", 1)[0]
    return head if len(head) <= 80 else head[:79] + "…"


def pending_reason(row: dict[str, Any], now_ms: int, max_attempts: int, lease_ms: int) -> str:
    """Why a pending row waits and when it is next due, read from the row (``waits_for``,
    ``attempts``, ``next_attempt_ms``, ``updated_ms``, ``last_error``) the way ``claim``
    and the forwarder use them: a claim leases a row until ``updated_ms + lease``, a failed
    attempt sets the retry time and ``last_error``."""
    due, attempts, error = row["next_attempt_ms"], row["attempts"], row.get("last_error")
    if due > now_ms and attempts > 0 and (not error or due - row["updated_ms"] == lease_ms):
        return (f"in flight: attempt {attempts} of {max_attempts} claimed at "
                f"{_clock(row['updated_ms'], now_ms)}, lease until {_clock(due, now_ms)}")
    if row.get("waits_for") is not None:
        return (f"waiting for the visitor's earlier row #{row['waits_for']} (one in flight "
                f"per visitor and vendor, in order)")
    if error:
        when = (f"at {_clock(due, now_ms)}" if due > now_ms
                else f"due now (since {_clock(due, now_ms)})")
        return f"retry {attempts + 1} of {max_attempts} {when} after {_error_head(error)}"
    if due > now_ms and (row.get("request_id") or "").startswith("backfill-"):
        return f"paced history (`onetag backfill --pace`): due at {_clock(due, now_ms)}"
    if due > now_ms:
        return (f"held back until {_clock(due, now_ms)} for the browser's own copy "
                f"([server] browser_grace_s)")
    return (f"due now (since {_clock(due, now_ms)}): a running `onetag serve` or `onetag worker` "
            f"sends it")


def format_rows(rows: list[dict[str, Any]], width: int | None = 100) -> str:
    """Delivery rows, each with its last_error on a line, shortened to ``width`` (the
    lists); ``width=None``: whole (``deliveries --id``, docs/commands.md)."""
    lines = []
    for row in rows:
        error = (row.get("last_error") or "").replace("\n", " ")
        if width is not None and len(error) > width:
            error = error[:width - 1] + "…"
        lines.append(f"#{row['id']}  {row['vendor']}  {row['state']}  {row['dedup_key']}  "
                     f"attempts {row['attempts']}  created {_when(row['created_ms'])}  "
                     f"updated {_when(row['updated_ms'])}" + (f"\n    {error}" if error else "")
                     + (f"\n    waits: {row['why']}" if row.get("why") else ""))
    return "\n".join(lines) or "(none)"


def format_attempts(attempts: list[dict[str, Any]]) -> str:
    """Each attempt: when, how long, the request sent (secrets never stored) and the answer."""
    lines = []
    for a in attempts:
        request, answer = a["request"], a.get("answer")
        outcome = f"HTTP {a['status']}" if a["status"] is not None else (a.get("error") or "-")
        lines.append(f"  attempt {a['attempt']}  {_when(a['started_ms'])}  "
                     f"{a['duration_ms']} ms  {outcome}")
        if request.get("after"):
            lines.append(f"    after {request['after']['status']} from {request['after']['url']}")
        sent = "" if request.get("sent", True) else "  (not sent)"
        lines.append(f"    > {request['method']} {request['url']}{sent}")
        for name, value in (request.get("headers") or {}).items():
            lines.append(f"    > {name}: {value}")
        if request.get("body") is not None:
            lines.append(f"    > {json.dumps(request['body'], ensure_ascii=False)}")
        if answer is not None:
            for name, value in (answer.get("headers") or {}).items():
                lines.append(f"    < {name}: {value}")
            body = answer.get("body") or ""
            if body:
                lines.append(f"    < {body}")
            if answer.get("truncated"):
                if answer.get("length_known", True):
                    lines.append(f"    < (truncated: {answer.get('length', '?')} characters "
                                 f"in all)")
                else:  # the forwarder read no further than its bound
                    lines.append(f"    < (truncated: over {answer.get('length', '?')} "
                                 f"characters; read no further)")
        if a.get("error") and a["status"] is not None:
            lines.append(f"    error: {a['error']}")
    return "\n".join(lines) or "  (no attempts recorded)"


KEY_PROBLEM_SCAN = 500  # latest failing and dead rows searched for a refused key


def key_problems(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose last answer was a 401/403 (the forwarder's "key rejected (401): check
    sites[x].<vendor>.<key>" errors), one entry per vendor, key and state."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        error = row.get("last_error") or ""
        if "key rejected (" not in error:
            continue
        head = error[error.index("key rejected ("):].split(";", 1)[0]
        state = "failing" if row["state"] == "pending" else row["state"]
        entry = found.setdefault((row["vendor"], head, state),
                                 {"vendor": row["vendor"], "error": head, "state": state,
                                  "rows": 0})
        entry["rows"] += 1
    return list(found.values())


def _explain_pending(rows: list[dict[str, Any]], now_ms: int) -> None:
    """Adds ``why`` to each pending row, with this environment's forwarder settings."""
    options = _forward_options()
    for row in rows:
        if row["state"] == "pending":
            row["why"] = pending_reason(row, now_ms, options.max_attempts,
                                        int(options.lease_s * 1000))


def cmd_deliveries(args: argparse.Namespace) -> int:
    if args.limit < 1:  # as coupons: -1 listed every row, 0 none
        raise _refuse("--limit must be at least 1")
    _row_id(args.id)
    if args.state or args.id is not None:
        _forward_options()  # a pending row's reason reads them
    settings = _ops_settings(args.config)
    now_ms = int(time.time() * 1000)
    if args.id is not None:
        return _show_delivery(settings, args, now_ms)

    async def work(store: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None,
                                        list[dict[str, Any]]]:
        stats = await store.delivery_stats(now_ms)
        rows = None
        if args.state:
            rows = await store.list_deliveries(state=args.state, vendor=args.vendor,
                                               limit=args.limit)
        failing = [row for state in ("pending", "dead") for row in await store.list_deliveries(
            state=state, vendor=args.vendor, limit=KEY_PROBLEM_SCAN)]
        return stats, rows, key_problems(failing)

    stats, rows, problems = asyncio.run(_with_store(settings, work))
    if rows is not None:
        _explain_pending(rows, now_ms)
    report = delivery_report(settings, stats)
    if args.vendor:
        report = [r for r in report if r["vendor"] == args.vendor]
    if args.json:
        out: dict[str, Any] = {"database": _shown(settings), "now_ms": now_ms,
                               "vendors": report, "key_problems": problems}
        if rows is not None:
            out["rows"] = rows
        print(json.dumps(out, indent=2))
        return 0
    print(f"deliveries in {_shown(settings)}")
    print(format_report(report))
    if problems:
        print("\nkey problems (the vendor refused the credentials):")
        for problem in problems:
            print(f"  {problem['vendor']}: {problem['error']} ({problem['rows']} "
                  f"{'delivery' if problem['rows'] == 1 else 'deliveries'} {problem['state']})")
    if rows is not None:
        print(f"\nlatest {args.state} deliveries{f' for {args.vendor}' if args.vendor else ''}:")
        print(format_rows(rows))
    return 0


async def catalog_report(settings: config_module.Settings, store: Any,
                         only: str | None = None) -> list[dict[str, Any]]:
    """``onetag catalog``: per site, its products, how many the feeds list, how many they
    leave out and why (server/catalog.py, ``feed_problem``), how many of those listed
    products.csv alone leaves out (``feeds.csv_listed``), the last change, and the feed URLs
    with the token left as a placeholder (it is a secret)."""
    from . import catalog, feeds
    from .store import sqlite_catalog

    sites = sorted(set(settings.sites) | set(await store.catalog_sites()))
    report = []
    for site_id in sites:
        if only is not None and site_id != only:
            continue
        rows: list[dict[str, Any]] = []
        after = None
        while page := await store.catalog_page(site_id, after, 1000):
            rows.extend({key: row[key] for key in ("deleted", "item_url", "image_url", "title",
                                                   "price_minor", "currency", "source",
                                                   "changed_ms", *feeds.IDENTIFIERS)}
                        for row in page)
            after = page[-1]["item_id"]
        item = {"site": site_id, **sqlite_catalog.stats(rows)}
        item["not_in_csv"] = sum(1 for row in rows if catalog.feed_problem(row) is None
                                 and not feeds.csv_listed(row))
        site = settings.sites.get(site_id)
        base = f"{settings.server.public_url.rstrip('/')}/feeds/{site_id}/products"
        item["feeds"] = ({"xml": f"{base}.xml?token=<feed_token>",
                          "csv": f"{base}.csv?token=<feed_token>"}
                         if site is not None and site.feed_token else None)
        report.append(item)
    return report


def format_catalog(report: list[dict[str, Any]], database: str) -> str:
    lines = [f"product catalog in {database}"]
    if not report:
        lines.append("  no site configured and no product stored")
    for item in report:
        left = ", ".join(f"{count} {why}" for why, count in sorted(item["left_out"].items()))
        not_in_csv = (f" ({item['not_in_csv']} of them not in products.csv: its id, sku or "
                      "item_group_id opens as a spreadsheet formula)" if item["not_in_csv"] else "")
        when = "never" if item["last_change_ms"] is None else time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(item["last_change_ms"] / 1000))
        lines.append(f"{item['site']}: {item['products']} products ({item['backend']} from the "
                     f"backend, {item['browser_only']} seen only in pages); "
                     f"{item['in_feed']} in the feeds{not_in_csv}; "
                     f"{item['products'] - item['in_feed']} "
                     f"left out{f' ({left})' if left else ''}; last change {when}")
        if item["feeds"]:
            lines.append(f"  feeds: {item['feeds']['xml']}")
            lines.append(f"         {item['feeds']['csv']}")
        else:
            lines.append(f"  no feed: set sites[{item['site']}].feed_token to publish one")
    return "\n".join(lines)


def cmd_catalog(args: argparse.Namespace) -> int:
    settings = _ops_settings(args.config)
    if args.site is not None:
        _site_of(settings, args.site)
    report = asyncio.run(_with_store(settings, lambda store: catalog_report(settings, store,
                                                                             args.site)))
    if args.json:
        print(json.dumps({"database": _shown(settings), "sites": report}, indent=2))
    else:
        print(format_catalog(report, _shown(settings)))
    return 0


def _show_delivery(settings: Any, args: argparse.Namespace, now_ms: int) -> int:
    """``deliveries --id N``: one delivery row and every attempt kept of it."""
    async def work(store: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        found = await store.list_deliveries(ids=[args.id], limit=1)
        return found, (await store.attempts(args.id) if found else [])

    found, attempts = asyncio.run(_with_store(settings, work))
    if not found:
        print(f"onetag: no delivery #{args.id} in {_shown(settings)}", file=sys.stderr)
        return 1
    _explain_pending(found, now_ms)
    row = found[0]
    if args.json:
        print(json.dumps({"database": _shown(settings), "now_ms": now_ms,
                          "delivery": row, "attempts": attempts}, indent=2,
                         ensure_ascii=False))
        return 0
    print(format_rows([row], width=None))
    print(f"attempts kept ({len(attempts)}; [server] keep_attempts_days = "
          f"{settings.server.keep_attempts_days:g}):")
    print(format_attempts(attempts))
    return 0


REPLAYABLE = ("dead", "expired")  # what `replay --id` takes; see refusal() for the rest
REPLAY_LISTED = 50  # rows a text dry run names


def refusal(row: dict[str, Any]) -> str:
    """Why ``replay --id`` leaves a row in a state that cannot be replayed alone."""
    where = f"delivery #{row['id']} ({row['vendor']}) is {row['state']}"
    state = row["state"]
    if state == "delivered":
        return (f"{where}: the vendor accepted it at {_when(row['delivered_ms'])}; onetag never "
                f"sends a delivered delivery again")
    if state == "pending":
        return f"{where} already: {row.get('why') or 'due'}"
    if state == "held":
        return (f"{where}: it waits for the visitor's email ([server] hold_days) and goes out "
                f"when the visitor identifies"
                + (f" ({row['last_error']})" if row.get("last_error") else ""))
    if state == "browser":
        return (f"{where}: the vendor's own library took it in the page; sending it too would "
                f"duplicate it")
    if state == "ignored":
        reason = row.get("last_error") or "no reason recorded"
        return (f"{where}: planned but never sent on purpose ({reason}); replaying it would "
                f"undo that decision")
    return f"{where}: only {' or '.join(REPLAYABLE)} deliveries can be replayed"


def _os_user() -> str:
    """Who ran an operator command, for the replays record."""
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container's uid without a passwd entry)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def cmd_replay(args: argparse.Namespace) -> int:
    from .store.deadletters import MAX_ERROR_TEXT, ReplayFilter

    _times(args, "since", "until")
    if args.id is not None and (args.dead or args.expired or args.vendor or args.since
                                or args.until or args.error or args.site):
        print("onetag: --id names one delivery; it takes no --vendor, --site, --since, --until, "
              "--error, --dead or --expired", file=sys.stderr)
        return 2
    if args.since is not None and args.until is not None and args.until <= args.since:
        print("onetag: --until must be later than --since", file=sys.stderr)
        return 2
    if args.error is not None and not 0 < len(args.error) <= MAX_ERROR_TEXT:
        print(f"onetag: --error takes 1 to {MAX_ERROR_TEXT} characters", file=sys.stderr)
        return 2
    _row_id(args.id)
    if args.id is not None:
        _forward_options()  # a pending row's refusal says why it waits
    settings = _ops_settings(args.config)
    if args.site is not None:  # as catalog: an unknown site matched nothing, silently
        _site_of(settings, args.site)
    states = [state for state, wanted in (("dead", args.dead), ("expired", args.expired))
              if wanted] or ["dead"]
    since_ms = args.since
    now_ms = int(time.time() * 1000)
    who = f"cli:{_os_user()}"

    async def replay(store: Any, selection: ReplayFilter) -> list[dict[str, Any]]:
        if args.dry_run:
            return await store.replay_rows(
                now_ms, vendor=selection.vendor, since_ms=selection.since_ms,
                states=selection.states, ids=selection.ids, dry_run=True,
                site_id=selection.site_id, until_ms=selection.until_ms, error=selection.error)
        return (await store.replay_recorded(now_ms, selection, who))["rows"]

    async def work(store: Any) -> tuple[list[dict[str, Any]], str | None]:
        if args.id is None:
            return await replay(store, ReplayFilter(
                tuple(states), args.vendor, args.site, since_ms, args.until, args.error)), None
        found = await store.list_deliveries(ids=[args.id], limit=1)
        if not found:
            return [], f"no delivery #{args.id} in {_shown(settings)}"
        row = found[0]
        if row["state"] not in REPLAYABLE:
            _explain_pending([row], now_ms)
            return [], refusal(row)
        made = await replay(store, ReplayFilter((row["state"],), ids=(args.id,)))
        if not made:  # expired, and re-planning found nothing to send it with
            return [], (f"delivery #{args.id} ({row['vendor']}) expired without the visitor's "
                        f"email, and the visitor still has none: nothing to send it with")
        return made, None

    try:
        made, error = asyncio.run(_with_store(settings, work))
    except ValueError as exc:  # a filter the store refused (too many rows for one replay)
        print(f"onetag: {exc}", file=sys.stderr)
        return 2
    if error:
        print(f"onetag: {error}", file=sys.stderr)
        return 1
    if args.dry_run:  # the rows a re-planned expired delivery would get were rolled back
        for row in made:
            if row["from_state"] == "expired":
                row["id"] = None
    if args.id is not None:
        scope = f"delivery #{args.id}"
    else:
        scope = " and ".join(states)
        if args.vendor:
            scope += f", vendor {args.vendor}"
        if args.site:
            scope += f", site {args.site}"
        if since_ms is not None:
            scope += f", created since {_when(since_ms)}"
        if args.until is not None:
            scope += f", created before {_when(args.until)}"
        if args.error:
            scope += f", last error containing {args.error!r}"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "count": len(made), "scope": scope,
                          "id": args.id, "vendor": args.vendor, "site": args.site,
                          "since_ms": since_ms, "until_ms": args.until, "error": args.error,
                          "states": states if args.id is None else None, "rows": made},
                         indent=2))
        return 0
    if args.dry_run:
        print(f"onetag: dry run: {len(made)} deliveries would be made due again ({scope}); "
              f"nothing changed")
        for row in made[:REPLAY_LISTED]:
            if row["from_state"] == "expired":
                print(f"  expired #{', #'.join(map(str, row['replaces']))} -> planned again: "
                      f"{row['vendor']}  {row['site_id']}  {row['dedup_key']}")
            else:
                print(f"  #{row['id']}  {row['vendor']}  {row['site_id']}  {row['dedup_key']}  "
                      f"({row['from_state']})")
        if len(made) > REPLAY_LISTED:
            print(f"  ... and {len(made) - REPLAY_LISTED} more (--json lists them all)")
        return 0
    print(f"onetag: {len(made)} deliveries made due again ({scope}), recorded as a replay by "
          f"{who}; a running `onetag serve` "
          f"or `onetag worker` sends them within a second or two")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from . import logs
    from .forwarder import run_until

    settings, path = _settings(args.config, require_secrets=WORKER_SECRETS)
    options = _forward_options()
    logs.configure(args.log_format or settings.server.log_format, args.log_level)
    if settings.server.is_postgresql:
        problem = postgresql_problem(settings)
        if problem is not None:
            print(f"onetag: {problem}; not forwarding.", file=sys.stderr)
            return 2
    _new_database_note(settings, path)
    print(f"onetag: forwarding deliveries from {_shown(settings)} "
          f"({len(settings.sites)} site(s)); Ctrl-C or SIGTERM stops", flush=True)

    received: list[str] = []

    def stop_on(sig: signal.Signals, stop: asyncio.Event) -> None:
        received.append(sig.name)
        stop.set()

    async def work(store: Any) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_on, sig, stop)
        gc.freeze()  # modules, settings and the store live as long as the process, as serve's
        await run_until(stop, settings, store, options)

    asyncio.run(_with_store(settings, work, one_shot=False))
    logging.getLogger("onetag.worker").info(
        "worker stopped (%s): in-flight sends finished or left leased", received[0]
        if received else "its forwarder ended")
    return 0


def _site_of(settings: config_module.Settings, site_id: str) -> Any:
    site = settings.sites.get(site_id)
    if site is None:
        print(f"onetag: no site {site_id!r} in the config (sites: "
              f"{', '.join(settings.sites) or 'none'})", file=sys.stderr)
        raise SystemExit(2)
    return site


def cmd_backfill(args: argparse.Namespace) -> int:
    """Check every line, then print the plan (dry run) or write it (``--send``)."""
    from .backfill import Backfill, existing_keys
    from .store.base import StoreUnavailable

    # Planning sends nothing: vendor secrets need not be set (the worker needs them).
    settings, _ = _settings(args.config, require_secrets=False)
    site = _site_of(settings, args.site)
    if settings.server.is_postgresql and (problem := postgresql_problem(settings, write=False)):
        raise _refuse(problem)
    files = [Path(name) for name in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"onetag: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        job = Backfill(site, files, send=args.send, skip_invalid=args.skip_invalid,
                       batch_lines=args.batch_lines, pace=args.pace)
    except ValueError as exc:  # a bound on the run itself (files, pace)
        print(f"onetag: {exc}", file=sys.stderr)
        return 2

    async def send(store: Any) -> Any:
        return await job.run(store)

    try:
        if args.send:
            summary = asyncio.run(_with_store(settings, send, one_shot=False))
        else:
            if settings.server.is_postgresql:
                from .store.pg_backfill import existing_keys as pg_existing_keys

                exists = asyncio.run(pg_existing_keys(settings.server.database, site.id))
            else:
                exists = existing_keys(settings.server.sqlite_path, site.id)
            try:
                summary = asyncio.run(job.run(existing=exists))
            finally:
                exists.close()
    except StoreUnavailable as exc:
        print(f"onetag: the store can't take the backfill ({exc.kind}: {exc.message}); what "
              f"was committed stays, and the same command resumes after it", file=sys.stderr)
        return 1
    if summary.problems:
        for problem in summary.problems:
            print(problem, file=sys.stderr)
        print(f"onetag: {summary.invalid:,} of {summary.invalid + summary.valid:,} events "
              f"invalid; nothing was planned (fix them, or --skip-invalid to leave them out)",
              file=sys.stderr)
        return 1
    print(summary.text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import sqlite3

    from . import remarkety_export

    settings = _ops_settings(args.config)
    site = _site_of(settings, args.site)
    out_path = Path(args.out or remarkety_export.default_name(time.time()))
    if settings.server.is_postgresql:
        from .store.pg_backfill import order_events

        if problem := postgresql_problem(settings, write=False):
            raise _refuse(problem)
        try:
            found, left_out = remarkety_export.orders_from(
                asyncio.run(order_events(settings.server.database, site.id)))
        except Exception as exc:
            raise _refuse(_database_problem(settings, exc)) from None
    try:
        out = open(out_path, "w", encoding="utf-8", newline="")
    except OSError as exc:
        raise _refuse(f"cannot write {out_path} ({exc.strerror or exc})") from None
    with out:
        if settings.server.is_postgresql:
            count, written, missing = remarkety_export.write(found, left_out, out)
        else:
            try:
                count, written, missing = remarkety_export.export(settings.server.sqlite_path,
                                                                   site.id, out)
            except sqlite3.Error as exc:  # no half-written file is left to be sent
                out.close()
                out_path.unlink(missing_ok=True)
                raise _refuse(_database_problem(settings, exc)) from None
    print(f"onetag: wrote {count:,} orders ({written:,} rows, one per order item) to "
          f"{out_path}; send it to Remarkety's support for a one-time orders history import")
    if missing:
        print(f"onetag: {missing:,} orders have status changes but no purchase; left out",
              file=sys.stderr)
    return 0


def format_coupon_calls(calls: list[dict[str, Any]], width: int = 100) -> str:
    """One block per call: when, site, result, statuses, duration, what was asked, the error."""
    lines = []
    for call in calls:
        store = "-" if call["store_status"] is None else str(call["store_status"])
        lines.append(f"#{call['id']}  {_when(call['created_ms'])}  {call['site_id']}  "
                     f"{call['result']}  answered {call['status']}  store {store}  "
                     f"{call['duration_ms']} ms  request {call['request_id'] or '-'}")
        if call["code"] is not None:
            asked = [f"code {call['code']}", f"template {call['template_id']}"]
            if call["expiration"]:
                asked.append(f"expires {call['expiration']}")
            if call["email"]:
                asked.append(f"for {call['email']}")
            lines.append("    " + "  ".join(asked))
        if call["error"]:
            error = call["error"].replace("\n", " ")
            lines.append("    " + (error if len(error) <= width else error[:width - 1] + "…"))
    return "\n".join(lines) or "(none)"


# A shopper's data: access and erasure (store/person.py) ------------------------------------

PERSON_TABLES = ("identities", "sessions", "events", "deliveries", "attempts", "coupon_calls")
# What ``forget`` does to a table's rows (store/person.py, ``Person.counts``), as a dry run
# says it and as the erasure reports it.
PERSON_TODO = {"delete": "delete", "anonymise": "keep anonymous",
               "cancel": "cancel (not sent; kept anonymous)"}
PERSON_DONE = {"delete": "deleted", "anonymise": "kept anonymous",
               "cancel": "cancelled (not sent; kept anonymous)"}


def _person_selector(settings: config_module.Settings, args: argparse.Namespace) -> Any:
    """The person the options name on a configured site, or one line and exit 2."""
    from .store import person

    _site_of(settings, args.site)
    try:
        return person.selector(args.site, email=args.email, customer_id=args.customer_id,
                               sc=args.sc)
    except ValueError as exc:
        raise _refuse(str(exc)) from None


def _person_store(settings: config_module.Settings, work: Any) -> Any:
    """``work(store)`` as the other operator commands run it (``_with_store``: SQLite's WAL
    lets it run beside a live ``onetag serve``); a store that can't take it now is one line
    and exit 2."""
    from .store.base import StoreUnavailable

    try:
        return asyncio.run(_with_store(settings, work))
    except StoreUnavailable as exc:
        raise _refuse(f"the database {_shown(settings)} can't take it now ({exc.message}); "
                      "nothing changed, try again") from None


def _nobody(settings: config_module.Settings, who: Any) -> int:
    print(f"onetag: nothing held about {who.describe()} on site {who.site_id} in "
          f"{_shown(settings)} (never seen, or already erased)", file=sys.stderr)
    return 1


def _vendor_lines(vendors: dict[str, list[str]]) -> list[str]:
    lines = []
    if vendors["received"]:
        lines.append(f"  vendors that received this person's data: "
                     f"{', '.join(vendors['received'])} (file the erasure with each: onetag "
                     "can't unsend)")
    if vendors["maybe_received"]:
        lines.append(f"  vendors that may have it (tried without a 2xx answer, or in flight): "
                     f"{', '.join(vendors['maybe_received'])}")
    if not lines:
        lines.append("  no vendor received this person's data through onetag's server")
    return lines


def cmd_person_export(args: argparse.Namespace) -> int:
    """Everything held about one person as one JSON document (GDPR Art. 15)."""
    from .store import person

    settings = _ops_settings(args.config)
    who = _person_selector(settings, args)
    found = _person_store(settings, lambda store: store.person(who))
    if not found.found:
        return _nobody(settings, who)
    document = {"database": _shown(settings),
                **person.export_document(found, int(time.time() * 1000))}
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    try:  # written whole or not at all: a partial file is not handed to a shopper
        partial = out.with_name(out.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(out)
    except OSError as exc:
        raise _refuse(f"cannot write {out} ({exc.strerror or exc})") from None
    counts = ", ".join(f"{count} {table}" for table, count in document["counts"].items())
    print(f"onetag: wrote everything held about {who.describe()} on site {who.site_id} to "
          f"{out}: {counts}")
    for line in _not_followed_lines(document["not_followed"]) + _vendor_lines(
            document["vendors"]):
        print(line)
    return 0


def _not_followed_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """The sessions ``--sc`` found whose identity was not followed (store/person.py)."""
    return [f"  session #{row['session']} (sc {row['sc']}) is bound to identity "
            f"#{row['identity']}, not followed: {row['why']}" for row in skipped]


def cmd_person_forget(args: argparse.Namespace) -> int:
    """Erase one person (GDPR Art. 17): a dry run unless ``--yes``."""
    settings = _ops_settings(args.config)
    who = _person_selector(settings, args)
    report = _person_store(settings, lambda store: store.forget_person(who,
                                                                       dry_run=not args.yes))
    if not report["found"]:
        return _nobody(settings, who)
    report["database"] = _shown(settings)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    counts = report["changed"] if args.yes else report["would_change"]
    print(f"{'dry run: would erase' if not args.yes else 'erased'} {who.describe()} on site "
          f"{who.site_id} in {_shown(settings)}")
    print("  found through:")
    for link in report["links"]:
        print(f"    {link}")
    words = PERSON_DONE if args.yes else PERSON_TODO
    for table in PERSON_TABLES:
        print(f"  {table:<13} " + ", ".join(f"{words[action]} {count}"
                                           for action, count in counts[table].items()))
    for line in _not_followed_lines(report["not_followed"]) + _vendor_lines(report["vendors"]):
        print(line)
    deleted = sum(counts[table].get("delete", 0) for table in PERSON_TABLES)
    anonymous = sum(count for table in PERSON_TABLES for action, count in counts[table].items()
                    if action != "delete")
    if not args.yes:
        print(f"onetag: dry run: {deleted} rows would be deleted and {anonymous} kept "
              "anonymous; nothing changed. Run again with --yes to erase.")
        return 0
    print(f"onetag: erased {who.describe()} on site {who.site_id}: {deleted} rows deleted, "
          f"{anonymous} kept anonymous, in one transaction"
          + (f"; file the erasure with {', '.join(report['vendors']['received'])}"
             if report["vendors"]["received"] else ""))
    return 0


def cmd_coupons(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise _refuse("--limit must be at least 1")
    settings = _ops_settings(args.config)
    if args.site is not None:
        _site_of(settings, args.site)

    async def work(store: Any) -> list[dict[str, Any]]:
        return await store.coupon_calls(site_id=args.site, limit=args.limit)

    calls = asyncio.run(_with_store(settings, work))
    if args.json:
        print(json.dumps({"database": _shown(settings), "site": args.site,
                          "calls": calls}, indent=2, ensure_ascii=False))
        return 0
    bridged = [site.id for site in settings.sites.values() if site.coupons is not None]
    print(f"coupon calls in {_shown(settings)} (latest {args.limit}"
          f"{f', site {args.site}' if args.site else ''}; bridge on for: "
          f"{', '.join(bridged) or 'no site'})")
    print(format_coupon_calls(calls))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onetag", description="One tag, every vendor.")
    parser.add_argument("--version", action="version", version=f"onetag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (the demo when no config is given)")
    serve.add_argument("--config", help="config file (default: $ONETAG_CONFIG or ./onetag.toml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="text lines, or one JSON object a line (default: [server] "
                            "log_format, else text)")
    serve.set_defaults(func=cmd_serve)

    init = commands.add_parser("init", help="write a commented example config")
    init.add_argument("path", nargs="?", default="onetag.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    check = commands.add_parser("check", help="validate a config, printing every problem")
    check.add_argument("--config", help="config file (default: $ONETAG_CONFIG or ./onetag.toml)")
    check.add_argument("--for", dest="process", choices=["serve", "worker", "all"],
                       default="all",
                       help="check only the env: variables that process reads (default: all; "
                            "serve wants the vendors' secrets only with forward = true)")
    check.set_defaults(func=cmd_check)

    config_help = "config file (default: $ONETAG_CONFIG or ./onetag.toml; else the demo's database)"
    migrate = commands.add_parser(
        "migrate", help="apply the database's pending migrations and name them",
        description="Apply every migration the configured database lacks (SQLite or "
                    "PostgreSQL), each in its own transaction, and print which. On PostgreSQL "
                    "`onetag serve` and `onetag worker` refuse to start until the schema is "
                    "current; SQLite migrates itself at start as well. Safe to run twice or "
                    "from two places at once. Before applying, it lists the pending "
                    "migrations with what each declares about the previous release, and says "
                    "whether the release running now keeps running through them (a rolling "
                    "upgrade: restart the nodes one at a time) or not (stop them, migrate, "
                    "start them on this release).")
    migrate.add_argument("--config", help=config_help)
    migrate.add_argument("--check", action="store_true",
                         help="list the pending migrations and whether the release running "
                              "now keeps running through them; apply nothing (exit 3: it "
                              "does not, not a rolling upgrade)")
    migrate.set_defaults(func=cmd_migrate)
    deliveries = commands.add_parser(
        "deliveries", help="per vendor: pending, failing, held, delivered, dead, ... deliveries",
        description="Counts of delivery rows per vendor, read straight from the database (no "
                    "server needed; safe beside a running server). pending: due or in flight; "
                    "failing: pending after at least one failed attempt (retrying with backoff); "
                    "held: waiting for the visitor's email (or, last_error says, a browser session of the customer); delivered: the vendor answered 2xx; "
                    "dead: permanent error, attempts or retry window used up (see --state dead, "
                    "then `onetag replay`); browser: the vendor's own library took it; expired: "
                    "held past the hold window without an email; ignored (--state ignored): "
                    "planned but never sent, last_error says why (a vendor could not take it, "
                    "or a browser's unverified claim: docs/trust.md). A vendor that refused "
                    "the credentials (401/403) is named on a line of its own. Vendor secrets "
                    "need not be set: nothing is sent.")
    deliveries.add_argument("--config", help=config_help)
    deliveries.add_argument("--json", action="store_true", help="machine-readable output")
    deliveries.add_argument("--vendor", choices=vendor_names(), help="only this vendor")
    deliveries.add_argument("--state", choices=["pending", "failing", "held", "delivered",
                                                "dead", "browser", "expired", "ignored"],
                            help="also list the latest deliveries in this state, with last "
                                 "errors; a pending row says why it waits and when it is due "
                                 "(pending lists failing rows too; failing: only those)")
    deliveries.add_argument("--limit", type=int, default=20, help="rows listed with --state (20)")
    deliveries.add_argument("--id", "--attempts", type=int, metavar="N", dest="id",
                            help="show delivery N with every attempt kept: when, how long, the "
                                 "request sent (secrets never stored) and the vendor's answer")
    deliveries.set_defaults(func=cmd_deliveries)

    replay = commands.add_parser(
        "replay", help="make dead (or expired) deliveries due again",
        description="Make matching deliveries due again, with a fresh attempt count and retry "
                    "window, and print how many. Default scope: dead deliveries (permanent "
                    "errors, attempts or retry window used up), of every vendor, of any age. "
                    "--expired takes held deliveries that expired without an email: those "
                    "whose visitor has an email by now are planned again with it; the rest "
                    "stay expired. Delivered deliveries are never sent again. Opens the "
                    "database directly; a running server or worker picks the rows up (vendor "
                    "secrets need not be set here). --dry-run names what would be made due and "
                    "changes nothing: the same command without it then replays exactly those. "
                    "--id N replays one dead or expired delivery; any other state is refused "
                    "with the reason (delivered: never sent twice; pending: already due or "
                    "retrying; held: waits for an email; browser: the page's library took it; "
                    "ignored: not sent on purpose). Each replay (not a dry run) is recorded "
                    "in the replays table as cli:<OS user>, listed on the console's Dead "
                    "letters page. One replay takes at most 100,000 dead or 10,000 expired "
                    "deliveries: narrow a larger set with --vendor, --site, --since/--until "
                    "or --error.")
    replay.add_argument("--config", help=config_help)
    replay.add_argument("--vendor", choices=vendor_names(), help="only this vendor")
    replay.add_argument("--since", metavar="T",
                        help="only deliveries created since T: 30m, 2h, 3d, 1w ago (-30m "
                             "too), or an ISO "
                             "date/time (2026-01-31, 2026-01-31T14:00; local time unless it "
                             "has a zone)")
    replay.add_argument("--until", metavar="T",
                        help="only deliveries created before T (same forms as --since)")
    replay.add_argument("--site", help="only this site's deliveries")
    replay.add_argument("--error", metavar="TEXT",
                        help="only deliveries whose last error contains TEXT (literally; "
                             "case-insensitive for ASCII letters)")
    replay.add_argument("--dead", action="store_true",
                        help="dead deliveries (the default when no state option is given)")
    replay.add_argument("--expired", action="store_true",
                        help="expired held deliveries whose visitor has an email now")
    replay.add_argument("--id", type=int, metavar="N",
                        help="only delivery N (dead, or expired with an email now)")
    replay.add_argument("--dry-run", action="store_true",
                        help="print how many and which would be made due; change nothing")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.set_defaults(func=cmd_replay)

    catalog = commands.add_parser(
        "catalog", help="products by site: how many the feeds list, left out and why",
        description="The product catalog onetag keeps from page views, carts and the "
                    "backend's product_updated: per site, its products (from the backend, or "
                    "seen only in pages), how many the product feeds list, how many they leave "
                    "out and why (deleted, no item_url, no image_url, no title, no price), the "
                    "last change, and the feed URLs to give the vendors (the token is left "
                    "out: it is a secret). Reads the database; safe beside a running server.")
    catalog.add_argument("--config", help=config_help)
    catalog.add_argument("--site", help="only this site")
    catalog.add_argument("--json", action="store_true", help="machine-readable output")
    catalog.set_defaults(func=cmd_catalog)

    worker = commands.add_parser(
        "worker", help="run only the vendor forwarder (pair with [server] forward = false)",
        description="Forward due deliveries to the vendors without serving HTTP. Run it "
                    "beside `onetag serve` with `[server] forward = false`, or several of "
                    "them: claims are leased, so each delivery goes to one of them. Tuning "
                    "via ONETAG_FORWARD_* environment variables (see server/forwarder.py).")
    worker.add_argument("--config", help=config_help)
    worker.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    worker.add_argument("--log-format", choices=["text", "json"],
                        help="default: [server] log_format, else text")
    worker.set_defaults(func=cmd_worker)

    backfill = commands.add_parser(
        "backfill", help="check and plan a shop's history (customers, products, orders)",
        description="Read history from JSONL (one backend-vocabulary event a line: identify, "
                    "product_updated, purchase, order_status, refund, each with its original "
                    "time) and CSV files (orders, products or customers; docs/backfill.md). "
                    "Every line is checked first, and every problem printed with its file "
                    "and line: nothing is planned then, unless --skip-invalid. A dry "
                    "run by default: it prints what each vendor would get and which get "
                    "nothing, and why. --send plans the historical deliveries through the "
                    "outbox (Sendlane with initial_sync and the past time); `onetag serve` or "
                    "`onetag worker` sends them. Interrupted, the same command resumes after "
                    "its last committed batch; nothing is planned twice.")
    backfill.add_argument("--config", help=config_help)
    backfill.add_argument("--site", required=True, help="the site the history is of")
    backfill.add_argument("--send", action="store_true",
                          help="plan the deliveries (default: a dry run that writes nothing)")
    backfill.add_argument("--skip-invalid", action="store_true",
                          help="leave invalid lines out (counted) instead of refusing the run")
    backfill.add_argument("--batch-lines", type=int, default=500, metavar="N",
                          help="lines a transaction takes with --send (500)")
    backfill.add_argument("--pace", type=float, default=120.0, metavar="N",
                          help="historical deliveries a minute per vendor, so live ones go "
                               "first (120: half of the 240 a minute Sendlane is reported "
                               "to allow an account); 0: all due at once")
    backfill.add_argument("files", nargs="+", metavar="FILE", help=".jsonl or .csv files")
    backfill.set_defaults(func=cmd_backfill)

    export = commands.add_parser(
        "export", help="write the orders history file Remarkety imports",
        description="remarkety-orders: every order the backend stated (live or backfilled), "
                    "as Remarkety's orders import CSV (one row per order item); Remarkety "
                    "imports it once through its support. Reads the database only.")
    export.add_argument("what", choices=["remarkety-orders"])
    export.add_argument("--config", help=config_help)
    export.add_argument("--site", required=True)
    export.add_argument("--out", metavar="FILE",
                        help="where to write it (default: orders_<YYYYMMDD_HHMMSS>.csv, "
                             "Remarkety's name for it)")
    export.set_defaults(func=cmd_export)

    person = commands.add_parser(
        "person", help="a shopper's data: export it (GDPR access) or erase it (erasure)",
        description="Everything onetag holds about one person on one site, found by their "
                    "email, customer id or sc cookie: `export` writes it as one JSON document "
                    "(reads only); `forget` erases it (a dry run unless --yes). Both open the "
                    "database directly, safely beside a running server.")
    person_commands = person.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, text in (
            ("export", cmd_person_export,
             "Write everything held about the person as one JSON document: identity, "
             "sessions with their carts, events (as sent and normalised), deliveries (state, "
             "vendor, request as planned) with the attempts kept, coupon calls naming the "
             "email, and which link found each session and event. Reads only."),
            ("forget", cmd_person_forget,
             "Erase the person in one transaction: identity, sessions and events are "
             "deleted; deliveries not sent are cancelled (nothing of theirs is sent after "
             "it); a vendor that already took one is named, to file the erasure with it too; "
             "delivery rows stay as an anonymous record, their attempts are deleted; coupon "
             "calls lose the email. A dry run printing the rows per table unless --yes. "
             "Running it again finds nothing. Events arriving later for the same sc start a "
             "fresh session.")):
        sub = person_commands.add_parser(action, help=text.split(":")[0].split(".")[0],
                                         description=text)
        sub.add_argument("--config", help=config_help)
        sub.add_argument("--site", required=True, help="the site the person is a shopper of")
        sub.add_argument("--email", help="their email (as events carry it; any case)")
        sub.add_argument("--customer-id", help="their customer_id in the shop's platform")
        sub.add_argument("--sc", help="their sc cookie: that session, and the identity it "
                                      "is bound to")
        if action == "export":
            sub.add_argument("--out", metavar="FILE", help="write it there (default: stdout)")
        else:
            sub.add_argument("--yes", action="store_true",
                             help="erase (default: a dry run that changes nothing)")
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(func=func)

    coupons = commands.add_parser(
        "coupons", help="the latest calls of Remarkety's Coupons API, and what became of each",
        description="Every call Remarkety made to POST /remarkety/{site_id}/discounts, latest "
                    "first: when, the site, the result (created; refused: the store said no; "
                    "invalid, unauthorized: refused before the store was asked; store_down, "
                    "store_timeout, store_auth, store_error, store_garbage: the store's webhook "
                    "failed), what onetag answered Remarkety and the webhook's HTTP status, how "
                    "long it took, the coupon asked for and the error. Reads the database "
                    "directly (no server needed); secrets need not be set and are never shown.")
    coupons.add_argument("--config", help=config_help)
    coupons.add_argument("--site", help="only this site")
    coupons.add_argument("--limit", type=int, default=20, help="calls listed (20)")
    coupons.add_argument("--json", action="store_true", help="machine-readable output")
    coupons.set_defaults(func=cmd_coupons)
    return parser


def vendor_names() -> list[str]:
    from .vendors import VENDORS

    return sorted(VENDORS)


def main(argv: Sequence[str] | None = None) -> int:
    from .store import APPLICATION_NAME_ENV

    args = build_parser().parse_args(times_attached(sys.argv[1:] if argv is None else argv))
    os.environ[APPLICATION_NAME_ENV] = f"onetag {args.command}"  # PostgreSQL's view of us
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (``onetag replay --dry-run | head``): stop quietly, as a Unix
        # tool does, and keep the interpreter's own flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
