"""The vendors onetag speaks to, one module each, all of the same shape (see ``_base.py``).

Adding a fifth vendor is one more module here and its browser half in
``templates/vendors/<name>.js.j2``.
"""

from __future__ import annotations

from types import ModuleType

from . import esputnik, rejoiner, remarkety, sendlane

VENDORS: dict[str, ModuleType] = {module.NAME: module
                                  for module in (rejoiner, remarkety, esputnik, sendlane)}


def get(name: str) -> ModuleType:
    """The vendor module called ``name``; a KeyError naming the known ones otherwise."""
    try:
        return VENDORS[name]
    except KeyError:
        raise KeyError(f"unknown vendor {name!r} (known: {', '.join(VENDORS)})") from None
