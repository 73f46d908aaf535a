"""Where the templates and static files are: in the repo, or inside an installed wheel.

The repository keeps ``templates/`` and ``static/`` at the top level; ``pyproject.toml``
packages them as ``server._templates`` and ``server._static`` so a plain ``pip install .``
carries them too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _find(package: str, folder: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location).is_dir():
                return Path(location)
    path = _REPO / folder
    if path.is_dir():
        return path
    raise RuntimeError(f"cannot find onetag's {folder}/ (looked for {package} and {path})")


def templates_dir() -> Path:
    return _find("server._templates", "templates")


def static_dir() -> Path:
    return _find("server._static", "static")
