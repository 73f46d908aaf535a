"""A site with consent = "required" (templates/features/consent.js.j2) in real Chromium.

Until the page grants consent the script sets no cookie, writes no localStorage, loads no
vendor library and sends nothing; the pushes wait in dataLayer and are read, in order, once it
does. A grant is Consent Mode's (gtag('consent', 'default' | 'update', {...})) or onetag's own
push ({event: "onetag_consent", granted: true}).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_runtime import has, names, open_shop, queue_drained, sc_of

SITES = """
[[sites]]
id = "gated"
origins = ["{origin}"]
consent = "required"

[[sites]]
id = "gatedvend"
origins = ["{origin}"]
consent = "required"

[sites.sendlane]
integration_token = "sl-token"
api_token = "sl-key"
script_url = "{origin}/lib/consent-pusher.js"
api_base = "http://127.0.0.1:9/v2"

[[sites]]
id = "open"
origins = ["{origin}"]
"""
GTAG = "function gtag(){dataLayer.push(arguments);}"
DENIED = GTAG + "gtag('consent', 'default', {analytics_storage: 'denied', ad_storage: 'denied'});"
VENDOR_LIBRARY = "/lib/consent-pusher.js"


@pytest.fixture(scope="module")
def server(onetag_server: Any) -> Any:
    return onetag_server(SITES)


def requests_to(page: Any, server: Any) -> list[str]:
    """Every request the page makes to onetag's server from now on (fetch and beacon alike).
    Sync Playwright delivers the page's events only during its own calls: read the list after
    one (the helpers below end with one)."""
    seen: list[str] = []
    page.on("request", lambda request: request.url.startswith(server.url + "/e")
            and seen.append(request.url))
    return seen


def stored_keys(page: Any) -> list[str]:
    return page.evaluate("Object.keys(localStorage).filter(key => key.startsWith('onetag_'))")


def settle(page: Any) -> None:
    """Waits past the runtime's send delay (300 ms) and asks it to flush: an absence checked
    after this is no request still on its way. (An absence has no event to wait on.)"""
    page.wait_for_timeout(1000)
    page.evaluate("window.onetag.flush()")
    page.wait_for_timeout(200)


def assert_untouched(page: Any, sent: list[str]) -> None:
    assert sent == [], "no request before consent"
    assert sc_of(page) is None, "no sc cookie before consent"
    assert stored_keys(page) == [], "no localStorage before consent"


def test_gtag_grant_replays_the_waiting_pushes_in_order(page, static_server, server, wait_until):
    sent = requests_to(page, server)
    open_shop(page, static_server, server, site="gated",
              before=DENIED + "dataLayer.push({event: 'first', n: 1});")
    page.evaluate("dataLayer.push({event: 'second'})")
    settle(page)
    assert_untouched(page, sent)

    page.evaluate("""gtag('consent', 'update', {analytics_storage: 'granted'});
                     dataLayer.push({event: 'third'});""")
    sc = wait_until(lambda: sc_of(page), "the sc cookie, once granted")
    rows = server.wait_events(has("third"), "the waiting pushes", site_id="gated", sc=sc)
    assert names(rows) == ["page_view", "first", "second", "third"]
    assert rows[1]["data"]["properties"] == {"n": 1}
    assert sc_of(page) and sent, "sent once granted (and the listener sees requests)"


def test_a_vendor_site_waits_for_ad_storage_too(page, static_server, server, wait_until):
    """Vendor libraries are marketing: on a site with vendors analytics_storage alone is no
    grant; the vendor's library is neither stubbed nor requested until ad_storage is granted."""
    static_server.add("window.__pusherLoaded = true;", "application/javascript", path=VENDOR_LIBRARY)
    sent = requests_to(page, server)
    open_shop(page, static_server, server, site="gatedvend",
              before=DENIED + "dataLayer.push({event: 'first'});")
    page.evaluate("gtag('consent', 'update', {analytics_storage: 'granted'})")
    settle(page)
    assert_untouched(page, sent)
    assert static_server.hits(VENDOR_LIBRARY) == 0
    assert page.evaluate("typeof window._Sendlane") == "undefined"

    page.evaluate("gtag('consent', 'update', {ad_storage: 'granted'})")
    sc = wait_until(lambda: sc_of(page), "the sc cookie, once granted")
    rows = server.wait_events(has("first"), "the waiting push", site_id="gatedvend", sc=sc)
    assert names(rows) == ["page_view", "first"]
    assert static_server.hits(VENDOR_LIBRARY) == 1
    assert [r["data"]["loaded"] for r in rows] == [["sendlane"], ["sendlane"]]


def test_onetag_consent_push_grants_and_a_revoke_forgets_the_visitor(page, static_server, server,
                                                                      wait_until):
    open_shop(page, static_server, server, site="gated", before="dataLayer.push({event: 'first'});")
    page.evaluate("dataLayer.push({event: 'onetag_consent', granted: true})")
    sc = wait_until(lambda: sc_of(page), "the sc cookie, once granted")
    server.wait_events(has("first"), "the waiting push", site_id="gated", sc=sc)
    queue_drained(page, "gated")
    assert stored_keys(page) != []

    sent = requests_to(page, server)
    page.evaluate("""dataLayer.push({event: 'onetag_consent', granted: false});
                     dataLayer.push({event: 'after_revoke'});""")
    settle(page)
    assert_untouched(page, sent)
    assert names(server.events(site_id="gated", sc=sc)) == ["page_view", "first"], \
        "onetag_consent is no event, and nothing is read after a revoke"


def test_a_grant_made_before_the_tag_loads_counts_and_is_not_remembered(page, static_server, server,
                                                                        wait_until):
    """A CMP pushes the visitor's recorded choice on every page, before or after the tag
    loads. onetag keeps no grant of its own: a page that pushes none waits."""
    granted = GTAG + "gtag('consent', 'update', {analytics_storage: 'granted'});"
    open_shop(page, static_server, server, site="gated", before=granted + "dataLayer.push({event: 'early'});")
    sc = wait_until(lambda: sc_of(page), "the sc cookie")
    server.wait_events(has("early"), "the push on a granted page", site_id="gated", sc=sc)
    queue_drained(page, "gated")

    sent = requests_to(page, server)
    open_shop(page, static_server, server, site="gated", before="dataLayer.push({event: 'unasked'});")
    settle(page)
    assert sent == []
    assert "unasked" not in names(server.events(site_id="gated", sc=sc))


def test_a_site_without_consent_required_ignores_consent_signals(page, static_server, server,
                                                                 wait_until):
    """consent = "none" (the default): the script runs at once, as it always has; the page's
    consent pushes are no events."""
    open_shop(page, static_server, server, site="open",
              before=DENIED + "dataLayer.push({event: 'onetag_consent', granted: false});"
              "dataLayer.push({event: 'first'});")
    sc = wait_until(lambda: sc_of(page), "the sc cookie")
    rows = server.wait_events(has("first"), "the pushes", site_id="open", sc=sc)
    assert names(rows) == ["page_view", "first"]


def test_a_region_denied_default_outweighs_a_granted_general_default(page, static_server, server,
                                                                     wait_until):
    """Google's documented regional setup: a denied default for the EEA (``region``), a granted
    one for everyone else. onetag cannot know the visitor's region, so it waits as if in the
    EEA; only an update (the visitor's choice) grants then."""
    sent = requests_to(page, server)
    open_shop(page, static_server, server, site="gated",
              before=GTAG + "gtag('consent', 'default', {analytics_storage: 'denied', "
                            "ad_storage: 'denied', region: ['ES', 'FR', 'DE']});"
                            "gtag('consent', 'default', {analytics_storage: 'granted', "
                            "ad_storage: 'granted'});"
                            "dataLayer.push({event: 'first'});")
    settle(page)
    assert_untouched(page, sent)

    page.evaluate("gtag('consent', 'update', {analytics_storage: 'granted'})")
    sc = wait_until(lambda: sc_of(page), "the sc cookie, once the update grants")
    rows = server.wait_events(has("first"), "the waiting push", site_id="gated", sc=sc)
    assert names(rows) == ["page_view", "first"]


def test_a_region_default_after_an_update_does_not_undo_it(page, static_server, server, wait_until):
    """A default is what holds until the visitor's choice: one pushed after an update (a CMP
    that answers first) does not revoke it. A region's granted default grants nothing."""
    sent = requests_to(page, server)
    open_shop(page, static_server, server, site="gated",
              before=GTAG + "gtag('consent', 'default', {analytics_storage: 'granted', region: ['US']});"
                            "dataLayer.push({event: 'first'});")
    settle(page)
    assert_untouched(page, sent)
    page.evaluate("""gtag('consent', 'update', {analytics_storage: 'granted'});
                     gtag('consent', 'default', {analytics_storage: 'denied', region: ['ES']});
                     gtag('consent', 'default', {analytics_storage: 'denied'});
                     dataLayer.push({event: 'second'});""")
    sc = wait_until(lambda: sc_of(page), "the sc cookie, once the update grants")
    rows = server.wait_events(has("second"), "the pushes", site_id="gated", sc=sc)
    assert names(rows) == ["page_view", "first", "second"]
