"""Who delivers an event to a vendor: its browser library, onetag's server, or both.

Modes, per vendor and event name (``"*"`` covers custom events):

- ``browser``  only the vendor's own library, in the page;
- ``server``   only onetag's server, from its stored copy;
- ``both``     each side (for calls that are different facts, e.g. a browser identify
               and a server-side profile upsert);
- ``fallback`` the browser; the server only when the vendor's library did not load or threw
               for that event (the event's ``loaded`` list says which);
- ``off``      nobody.

Each vendor's defaults live beside its mapping (``DEFAULT_ROUTES`` in
``server/vendors/<name>.py``), chosen so no vendor counts one purchase twice.
"""

from __future__ import annotations

from typing import Literal

from .vendors._base import ROUTING_MODES, VendorConfig

MODES = ROUTING_MODES  # the names a config's routes may use

BROWSER_MODES = frozenset({"browser", "both", "fallback"})
SERVER_MODES = frozenset({"server", "both", "fallback"})  # ``decide`` may answer "send"


def sends_from_server(vendor: VendorConfig) -> list[str]:
    """The events (``"*"``: custom ones) this vendor's section may send from onetag's
    server; [] when every route stays in the browser or is off."""
    return sorted(event for event, mode in vendor.routes.items() if mode in SERVER_MODES)

Decision = Literal["send", "browser", "skip"]


def browser_routes(vendor: VendorConfig, acts_on: frozenset[str] | None = None) -> list[int | str]:
    """The events the generated script lets this vendor's browser adapter handle, compactly:
    ``[default, event, ...]``, where ``default`` (1 or 0) says whether the browser takes a name
    not listed (the ``"*"`` route) and the listed events are those whose answer is the opposite.

    Only the differences are listed (every byte of the script is paid on every page view);
    the runtime reads it as ``(name is listed) != default``, as ``VendorConfig.route`` falls
    back to ``"*"`` on the server.

    ``acts_on``: the only names the adapter's handler does anything for (the vendor module's
    ``BROWSER_EVENTS``, for an adapter with no side effect on other events). How the other
    names are routed then changes nothing in the page, so the shorter of the two forms that
    are exact over ``acts_on`` is sent: with eSputnik's defaults, ``[1]``.
    """
    if acts_on is not None:
        taken = {name for name in acts_on if vendor.route(name) in BROWSER_MODES}
        return min([1, *sorted(acts_on - taken)], [0, *sorted(taken)], key=len)
    default = vendor.routes.get("*", "off") in BROWSER_MODES
    return [int(default), *sorted(event for event, mode in vendor.routes.items()
                             if event != "*" and (mode in BROWSER_MODES) != default)]


def decide(vendor: VendorConfig, event: dict) -> Decision:
    """What the server does with one stored event for one vendor.

    ``send``: plan and deliver its requests. ``browser``: the vendor got it in the page;
    plan anyway and record the requests as delivered by the browser, so the same fact
    arriving later (the backend's copy of an order) is recognised and not sent again.
    ``skip``: nothing.
    """
    mode = vendor.route(event["name"])
    if mode == "off":
        return "skip"
    if event["source"] == "backend":
        # A backend event never passed through a vendor library (a verified browser one did).
        return "skip" if mode == "browser" else "send"
    took_it = vendor.name in event.get("loaded", ())
    if mode in ("server", "both"):
        return "send"
    if mode == "fallback":
        return "browser" if took_it else "send"
    return "browser" if took_it else "skip"  # mode == "browser"
