"""Small builders shared by the server tests (fixtures stay in the test files that use them)."""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator

import httpx

from server import config
from server.app import create_app

ORIGIN = "https://shop.example"


def settings_for(tmp_path: Any, **site: Any) -> config.Settings:
    """One site ``shop1`` on a fresh SQLite file; keyword arguments override site keys."""
    data = {"server": {"database": f"sqlite:///{tmp_path}/onetag.db",
                       "public_url": "https://data.shop.example", "forward": False},
            "sites": [{"id": "shop1", "origins": [ORIGIN], "api_key": "secret-key-0123456789", **site}]}
    return config.parse(data, env={})


def migrated_config(tmp_path: Any) -> Any:
    """A config file in ``tmp_path`` of one site on ``sqlite:///onetag.db`` (relative: run
    from ``tmp_path``), its database made by ``onetag migrate``."""
    from server import cli

    path = tmp_path / "onetag.toml"
    path.write_text('[server]\ndatabase = "sqlite:///onetag.db"\n\n[[sites]]\n'
                    'id = "shop1"\norigins = ["https://shop.example"]\n', encoding="utf-8")
    assert cli.main(["migrate", "--config", str(path)]) == 0
    return path


@contextlib.asynccontextmanager
async def running(settings: config.Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The real app with its lifespan, and an HTTP client speaking ASGI to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url=settings.server.public_url) as client:
            yield app, client


def beacon(events: list[dict[str, Any]], site_id: str = "shop1", **extra: Any) -> bytes:
    return json.dumps({"site_id": site_id, "events": events, **extra}).encode()


def item(item_id: str = "SKU-1", price: Any = 29.99, quantity: int = 1, **extra: Any) -> dict:
    return {"item_id": item_id, "item_name": f"Item {item_id}", "price": price,
            "quantity": quantity, **extra}
