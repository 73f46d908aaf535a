"""``onetag``: serve | init | check | deliveries | replay."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

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
# forward   = true                         # run the vendor forwarder inside `onetag serve`

[[sites]]
id       = "shop1"                         # [A-Za-z0-9_-]{1,64}; the script is /s/shop1.js
origins  = ["https://shop.example"]        # who may send events (CORS allow-list)
api_key  = "env:SHOP1_API_KEY"             # secret: Authorization: Bearer ... for the backend API
currency = "USD"                           # default when an event names none
# spa_page_views     = "auto"              # "manual": only pushed page_view events count
# capture_form_email = true                # pick up emails typed into the page's forms
# debug              = false               # log every event and vendor call in the console

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


def _load(path: str | None) -> config_module.Settings:
    try:
        return config_module.load(path)
    except config_module.ConfigError as exc:
        print(f"onetag: {path} has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    path = _find_config(args.config)
    if path is None:
        settings = config_module.demo(args.host, args.port)
        print(f"onetag: no config file (--config, $ONETAG_CONFIG or ./onetag.toml), so serving "
              f"the demo site 'demo' on {settings.server.database}.\n"
              f"onetag: open {settings.server.public_url}/demo/ — its events land in the store "
              f"and show in the page's side panel.", flush=True)
    else:
        settings = _load(path)
        sites = ", ".join(settings.sites)
        print(f"onetag: serving {len(settings.sites)} site(s) ({sites}) from {path} on "
              f"{settings.server.database}", flush=True)
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                proxy_headers=True, server_header=False)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"onetag: {path} exists; not overwriting it (use --force)", file=sys.stderr)
        return 1
    path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    print(f"onetag: wrote {path}; edit it, then `onetag check --config {path}`")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    path = _find_config(args.config)
    if path is None:
        print("onetag: no config file to check (--config PATH, $ONETAG_CONFIG or ./onetag.toml)",
              file=sys.stderr)
        return 2
    settings = _load(path)
    for site in settings.sites.values():
        vendors = ", ".join(site.vendors) or "no vendors"
        print(f"site {site.id}: {vendors}; origins {', '.join(site.origins) or '(none)'}")
    print(f"onetag: {path} is valid")
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
    serve.set_defaults(func=cmd_serve)

    init = commands.add_parser("init", help="write a commented example config")
    init.add_argument("path", nargs="?", default="onetag.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    check = commands.add_parser("check", help="validate a config, printing every problem")
    check.add_argument("--config", help="config file (default: $ONETAG_CONFIG or ./onetag.toml)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
