"""The store's correctness rules, free of SQL: what every backend applies the same way.

Each backend loads the rows a rule needs (with the locks its concurrency needs), calls the
rule, and writes what it returns. Tested directly (tests/test_store_rules.py) and through
both backends (tests/test_store.py, tests/test_store_pg.py).
"""

from __future__ import annotations

from typing import Any, Mapping


def identity_fields(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """An ``identities`` row as the identity's fields (None columns left out; consent a bool)."""
    if row is None:
        return {}
    fields = {key: row[key] for key in ("email", "customer_id", "first_name", "last_name", "phone")
              if row[key] is not None}
    if row["accepts_marketing"] is not None:
        fields["accepts_marketing"] = bool(row["accepts_marketing"])
    return fields
