"""Configured secrets kept out of console pages that show what vendors answered.

onetag never stores a secret in a delivery or an attempt (the forwarder adds credentials
at send time), but a vendor's answer or error text is the vendor's: one that echoes the
request's key would otherwise reach the page. ``scrub`` replaces every configured secret
value found in a text shown to the operator.
"""

from __future__ import annotations

from typing import Any

from ..vendors import VENDORS

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 4  # shorter values would blank out ordinary text


def secret_values(settings: Any) -> tuple[str, ...]:
    """Every secret the config holds: the admin token, sites' api_key, identity_secret and
    feed_token, the coupons bridge's two, and each vendor's keys declared ``secret`` in its
    module's SETTINGS. Longest first."""
    found = {settings.server.admin_token}
    for site in settings.sites.values():
        found |= {site.api_key, site.identity_secret, getattr(site, "feed_token", None)}
        coupons = getattr(site, "coupons", None)  # [sites.coupons]: the Remarkety bridge's
        if coupons is not None:
            found |= {coupons.remarkety_api_key, coupons.webhook_secret}
        for name, vendor in site.vendors.items():
            for setting in getattr(VENDORS.get(name), "SETTINGS", ()):
                if setting.secret:
                    found.add(vendor.values.get(setting.name))
    return tuple(sorted((value for value in found
                         if isinstance(value, str) and len(value) >= MIN_SECRET_CHARS),
                        key=len, reverse=True))


def scrub(text: Any, secrets: tuple[str, ...]) -> Any:
    """``text`` with each secret in it replaced by ``[redacted]`` (non-text passes through)."""
    if not isinstance(text, str) or not text:
        return text
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
