"""The generated script: one per site, rendered once, served with an ETag, as brotli or gzip.

Only public vendor settings reach the template (``config.public_settings``), so no secret
can end up in anything a browser receives.

Browsers get the minified template (``templates/onetag.min.js.j2``, made by
``tools/js/build.py``); ``?onetag_debug=1`` on the script URL, or a site with ``debug = true``,
gets the readable source (``templates/onetag.js.j2``) instead, comments and all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import brotli
import jinja2
import zopfli.gzip
from starlette.requests import Request
from starlette.responses import Response

from . import routing
from .assets import templates_dir
from .config import public_settings
from .events import echo
from .vendors import VENDORS

# The Consent Mode storage keys a consent-required site's script waits on (``g``): onetag's own
# cookie and events are analytics; the vendor libraries, and the events the server forwards
# to the same vendors, are marketing (Consent Mode's ad_storage), so a site with vendors
# needs both granted.
ANALYTICS_CONSENT, VENDOR_CONSENT = "analytics_storage", "ad_storage"
CACHE_CONTROL = "public, max-age=300"  # short: a config change reaches browsers in minutes
MINIFIED, READABLE = "onetag.min.js.j2", "onetag.js.j2"
JS_TYPE = "application/javascript; charset=utf-8"


@dataclass(frozen=True)
class RenderedScript:
    body: bytes
    gzipped: bytes
    brotli: bytes
    etag: str

    def encoded(self, accept_encoding: str) -> tuple[bytes, str | None]:
        """The body in the smallest coding the request accepts, and its Content-Encoding."""
        codings = accepted_codings(accept_encoding)
        if "br" in codings:
            return self.brotli, "br"
        if "gzip" in codings or "*" in codings:
            return self.gzipped, "gzip"
        return self.body, None


def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                              autoescape=False, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def script_config(settings: Any, site: Any) -> dict[str, Any]:
    """What the runtime is told about its site: public ids, routes, the endpoint.

    One-letter keys (the runtime's own names; templates/onetag.js.j2 documents them): the
    config is paid on every page view. ``v`` maps each enabled vendor to
    ``[routes, settings]``: ``routing.browser_routes`` (over the vendor module's
    ``BROWSER_EVENTS`` when it names them) and ``config.public_settings``. ``u``:
    the site's ``cart_url`` template, when it has one (where a cart can be restored). ``c``:
    the site's currency, which the adapters use for an event that names none, as the server
    does (``PlanContext.currency``), so both copies of an event are in the same currency. ``g``:
    on a site with ``consent = "required"`` only, the Consent Mode keys that must be granted
    before the script does anything (``consent_keys``).
    spa_page_views and capture_form_email are not in it: they pick the parts of the script
    (``features``), so a site gets no code it cannot use.
    """
    cart_url = site.cart_url
    return {
        "e": settings.server.public_url + settings.server.event_path,
        "s": site.id,
        "c": site.currency,
        **({"d": 1} if site.debug else {}),  # absent: false
        **({"u": cart_url} if cart_url else {}),
        **({"g": consent_keys(site)} if site.consent == "required" else {}),
        "v": {name: [routing.browser_routes(vendor, getattr(VENDORS[name], "BROWSER_EVENTS", None)),
                     public_settings(vendor)]
              for name, vendor in site.vendors.items()},
    }


def consent_keys(site: Any) -> list[str]:
    """What a grant must cover: analytics, and marketing too when the site has vendors."""
    return [ANALYTICS_CONSENT, *([VENDOR_CONSENT] if site.vendors else [])]


def _embed_json(value: Any) -> str:
    """JSON that is safe inside a <script> and a JS string context."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def features(site: Any) -> dict[str, bool]:
    """The optional parts of the script (templates/features/) this site's settings use."""
    return {"spa_page_views": site.spa_page_views != "manual",
            "capture_form_email": bool(site.capture_form_email),
            "cart_url": bool(site.cart_url),
            "consent": site.consent == "required"}


def compress(body: bytes) -> bytes:
    """The gzip body browsers get: zopfli's, ordinary gzip (any gzip decoder reads it) ~1.7%
    smaller than gzip -9, for ~15 ms of CPU once per site and process (bench/README.md)."""
    return zopfli.gzip.compress(body)


def compress_brotli(body: bytes) -> bytes:
    """The brotli body (RFC 7932), ~8% smaller than the gzip one: every current browser
    asks for it over https (they send ``br`` in Accept-Encoding only on secure origins).
    Quality 11, the slowest and smallest, costs ~30 ms once per site and process."""
    return brotli.compress(body, mode=brotli.MODE_TEXT, quality=11)


def accepted_codings(header: str) -> set[str]:
    """The content codings an Accept-Encoding header accepts (RFC 9110, 12.5.3): those
    listed without ``q=0``."""
    codings = set()
    for item in header.lower().split(","):
        coding, _, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0  # unreadable: not taken as a yes
        if coding.strip() and quality > 0:
            codings.add(coding.strip())
    return codings


def render(env: jinja2.Environment, settings: Any, site: Any, readable: bool = False) -> RenderedScript:
    text = env.get_template(READABLE if readable else MINIFIED).render(
        config_json=_embed_json(script_config(settings, site)), vendors=list(site.vendors),
        **features(site))
    body = text.encode("utf-8")
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return RenderedScript(body=body, gzipped=compress(body), brotli=compress_brotli(body),
                          etag=etag)


class ScriptServer:
    """Renders each site's script on first request and keeps it for the process's life."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.env = environment()
        self._cache: dict[tuple[str, bool], RenderedScript] = {}

    def get(self, site_id: str, readable: bool = False) -> RenderedScript | None:
        site = self.settings.sites.get(site_id)
        if site is None:
            return None
        readable = readable or bool(site.debug)
        if (site_id, readable) not in self._cache:
            self._cache[site_id, readable] = render(self.env, self.settings, site, readable)
        return self._cache[site_id, readable]

    async def endpoint(self, request: Request) -> Response:
        site_id = request.path_params["site_id"]
        script = self.get(site_id, readable=request.query_params.get("onetag_debug") == "1")
        if script is None:
            return Response(f"/* onetag: no site {echo(site_id)} here */\n".encode(),
                            status_code=404, media_type=JS_TYPE,
                            headers={"Cache-Control": "no-store"})
        headers = {"ETag": script.etag, "Cache-Control": CACHE_CONTROL, "Vary": "Accept-Encoding"}
        if script.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        content, coding = script.encoded(request.headers.get("accept-encoding", ""))
        if coding is not None:
            headers["Content-Encoding"] = coding
        return Response(content, media_type=JS_TYPE, headers=headers)
