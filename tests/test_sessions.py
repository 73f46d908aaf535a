"""Cart and identity rules, without a database."""

from __future__ import annotations

from server.sessions import apply_cart, cart_snapshot, cookie_header, identity_update, new_sc, valid_sc


def line(item_id: str, quantity: int, price: int = 100, **extra) -> dict:
    return {"item_id": item_id, "quantity": quantity, "price_minor": price, **extra}


def event(name: str, *items: dict, **extra) -> dict:
    return {"name": name, "ecommerce": {"items": list(items)}, **extra}


def test_add_and_remove_are_deltas() -> None:
    cart = apply_cart([], event("add_to_cart", line("A", 1)))
    cart = apply_cart(cart, event("add_to_cart", line("A", 2), line("B", 1)))
    assert [(i["item_id"], i["quantity"]) for i in cart] == [("A", 3), ("B", 1)]
    cart = apply_cart(cart, event("remove_from_cart", line("A", 1)))
    assert [(i["item_id"], i["quantity"]) for i in cart] == [("A", 2), ("B", 1)]
    cart = apply_cart(cart, event("remove_from_cart", line("B", 5)))
    assert [(i["item_id"], i["quantity"]) for i in cart] == [("A", 2)]


def test_variants_are_separate_lines() -> None:
    cart = apply_cart([], event("add_to_cart", line("A", 1, item_variant="red")))
    cart = apply_cart(cart, event("add_to_cart", line("A", 1, item_variant="blue")))
    assert len(cart) == 2


def test_whole_cart_events_replace_and_purchase_empties() -> None:
    cart = [line("A", 1)]
    for name in ("view_cart", "begin_checkout", "cart_updated"):
        assert apply_cart(cart, event(name, line("C", 2))) == [line("C", 2)]
    assert apply_cart(cart, event("purchase", line("A", 1))) == []
    assert apply_cart(cart, event("view_item", line("A", 1))) is None


def test_snapshot_totals_in_minor_units() -> None:
    snap = cart_snapshot([line("A", 3, 1999), line("B", 1, 435)], "USD", "G")
    assert snap["value_minor"] == 5997 + 435 and snap["item_count"] == 4 and snap["guid"] == "G"


def test_identity_update_merges_and_consent_events_set_consent() -> None:
    current = {"email": "a@b.co", "first_name": "Ann"}
    assert identity_update(current, {"name": "identify", "user": {"last_name": "Lee"}}) == {
        "email": "a@b.co", "first_name": "Ann", "last_name": "Lee"}
    assert identity_update(current, {"name": "unsubscribe", "user": {"email": "a@b.co"}})[
        "accepts_marketing"] is False
    assert identity_update(current, {"name": "opt_in", "user": {"email": "a@b.co"}})[
        "accepts_marketing"] is True


def test_sc_values() -> None:
    sc = new_sc()
    assert sc == sc.upper() and len(sc) == 36
    assert valid_sc("cda68358-94fb-4d83-9655-3feb3c4114a3") == "CDA68358-94FB-4D83-9655-3FEB3C4114A3"
    assert valid_sc("bad value;") is None and valid_sc(None) is None
    assert cookie_header("X", secure=True) == "sc=X; Path=/; Max-Age=31536000; SameSite=Lax; Secure"
    assert "Secure" not in cookie_header("X", secure=False)


def test_a_browser_claim_names_a_person_but_never_their_consent_or_customer_id() -> None:
    from server.sessions import claimed_fields
    user = {"email": "a@b.co", "first_name": "Ann", "phone": "+1555", "customer_id": "42",
            "accepts_marketing": True, "last_name": ""}
    assert claimed_fields(user) == {"email": "a@b.co", "first_name": "Ann", "phone": "+1555"}
    assert claimed_fields(None) == {}
