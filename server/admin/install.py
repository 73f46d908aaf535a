"""Install: per site, the script tag, ``dataLayer`` examples, the backend call (with a
placeholder where the API key goes: the key is never shown), and "last event seen from
this origin" for each configured origin, refreshed by the page from ``install/check.json``."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .web import PREFIX, SECURITY_HEADERS, Console, format_age, now_ms

RECENT_MS = 24 * 3600 * 1000  # an origin seen within a day counts as installed
CHECK_WINDOW = 50_000  # events looked back through per origin (newest first)


def key_variable(site_id: str) -> str:
    """The environment variable the examples name for a site's API key: SHOP1_API_KEY."""
    return re.sub(r"[^A-Z0-9]", "_", site_id.upper()) + "_API_KEY"


async def origin_checks(console: Console) -> list[dict[str, Any]]:
    reads, now, checks = console.reads(), now_ms(), []
    for site in console.settings.sites.values():
        for origin in site.origins:
            found = await reads.last_from_origin(site.id, origin, window=CHECK_WINDOW)
            checks.append({
                "site": site.id, "origin": origin,
                "ok": bool(found) and now - found["received_ms"] < RECENT_MS,
                "seen": format_age(found["received_ms"], now) if found else "never",
                "event": (f"{found['name']} on {found['location']}" if found else
                          "no browser event from this origin yet"),
                "href": f"{PREFIX}/events/{found['seq']}" if found else None,
            })
    return checks


def routes(console: Console) -> list[Route]:
    public_url = console.settings.server.public_url

    async def page(request: Request) -> Response:
        sites = []
        for site in console.settings.sites.values():
            sites.append({
                "id": site.id, "origins": site.origins, "has_api_key": bool(site.api_key),
                "vendors": sorted(site.vendors),
                "script_url": public_url + console.settings.server.script_path.format(
                    site_id=site.id),
                "event_url": public_url + console.settings.server.event_path,
                "api_url": f"{public_url}/api/v1/sites/{site.id}/events",
                "key_variable": key_variable(site.id),
            })
        checks = await origin_checks(console)
        return console.render(request, "admin/install.html", site_list=sites, checks=checks)

    async def check(request: Request) -> Response:
        return JSONResponse(await origin_checks(console), headers=SECURITY_HEADERS)

    return [console.route("/install", page), console.route("/install/check.json", check)]
