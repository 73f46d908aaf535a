"""The store's cart GUIDs, for any sequence of cart events (hypothesis): the one rule both
paths rely on so that eSputnik's StatusCart and PurchasedItems GUIDs agree ("Transferring
Website Behavior Data via REST API": the GUID "Should be identical" in both).

- an event with ``cart_guid`` names the cart state after it: the store adopts it;
- without one, a changed cart (or the first) gets a new GUID, an unchanged one keeps its own;
- a purchase's cart as bought keeps the GUID of the last state, else the one the purchase
  names, else none (no StatusCart was ever sent).
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid

from hypothesis import HealthCheck, given, settings, strategies as st

from server.events import Origin, normalise
from server.store.base import SessionInfo
from server.store.sqlite import SQLiteStore

from support import item, settings_for

SC = "SC-AAAA-0001"
ITEMS = st.lists(st.tuples(st.sampled_from(["A", "B"]), st.sampled_from([None, "red"]),
                           st.integers(1, 3)), min_size=1, max_size=3)
GUIDS = st.one_of(st.none(), st.uuids().map(lambda u: str(u).lower()))
STEP = st.tuples(st.sampled_from(["add_to_cart", "remove_from_cart", "view_cart"]), ITEMS, GUIDS)


def _event(n: int, name: str, lines, guid: str | None, **ecommerce) -> dict:
    items = [item(item_id, 1.5, quantity, **({"item_variant": variant} if variant else {}))
             for item_id, variant, quantity in lines]
    raw = {"event": name, "event_id": f"e{n}", "ecommerce": {"items": items, **ecommerce}}
    if guid:
        raw["cart_guid"] = guid
    origin = Origin(site_id="shop1", source="browser", currency="USD", received_ms=1, sc=SC)
    return normalise(raw, "e", origin)


async def _run(steps, purchase_guid: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = settings_for(tmp)
        store = SQLiteStore(config.server.sqlite_path, config.sites)
        await store.open()
        try:
            seen: list[str] = []
            before = None  # (items, guid) of the last cart state
            for n, (name, lines, guid) in enumerate(steps):
                event = _event(n, name, lines, guid)
                await store.ingest("shop1", [event], [event], SessionInfo(user_agent="UA"))
                cart = (await store.session_view("shop1", SC))["cart"]
                items = cart["items"]
                if guid:
                    assert cart["guid"] == guid.upper()
                elif before is None or items != before[0]:
                    assert cart["guid"] not in seen  # a new state, a new GUID
                else:
                    assert cart["guid"] == before[1]
                seen.append(cart["guid"])
                before = (items, cart["guid"])
            buy = _event(len(steps), "purchase", [("A", None, 1)], purchase_guid,
                         transaction_id="T1")
            await store.ingest("shop1", [buy], [buy], SessionInfo(user_agent="UA"))
            view = await store.session_view("shop1", SC)
        finally:
            await store.close()
    bought = view["events"][0]["cart"]
    expected = before[1] if before else (purchase_guid.upper() if purchase_guid else None)
    assert bought["guid"] == expected
    assert view["cart"] is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, max_size=6), purchase_guid=GUIDS)
def test_the_stores_cart_guid_rule(steps, purchase_guid) -> None:
    asyncio.run(_run(steps, purchase_guid))


def test_the_rule_holds_for_a_known_sequence() -> None:
    """The story of issue 12: the page names the state, an older page does not, the purchase
    quotes the last state's GUID."""
    named = str(uuid.uuid4())
    asyncio.run(_run([("add_to_cart", [("A", None, 1)], named),
                      ("view_cart", [("A", None, 1)], None),
                      ("add_to_cart", [("B", "red", 2)], None)], None))
