"""Every relative link in README.md and docs/*.md leads somewhere: the file (or folder) exists,
and a ``#anchor`` names a heading of that page, as GitHub makes anchors of headings. And the
README stays a page a new user reads through, with every docs page in its table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK_RE = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code spans blanked."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(re.sub(r"`[^`]*`", lambda m: "`" + "x" * (len(m.group()) - 2) + "`",
                                line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    each space a ``-`` (inline code keeps its words)."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        match = None if fence else re.match(r"^#{1,6} (.*?)\s*#*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    return [(number, target) for number, line in enumerate(
                prose(path.read_text(encoding="utf-8")), 1)
            for target in LINK_RE.findall(line)]


def test_slugs_are_githubs() -> None:
    assert slug("Behind a reverse proxy") == "behind-a-reverse-proxy"
    assert slug("Vendors (`/admin/vendors`)") == "vendors-adminvendors"
    assert slug("The console and `/metrics` on several nodes") == \
        "the-console-and-metrics-on-several-nodes"
    assert slug("Trust: browser claims, backend facts") == "trust-browser-claims-backend-facts"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        where = (page.parent / path_part).resolve() if path_part else page
        if not where.exists():
            broken.append(f"{page.name}:{number}: {target}: no such file")
        elif anchor:
            if where.is_dir() or where.suffix != ".md":
                broken.append(f"{page.name}:{number}: {target}: an anchor into a non-page")
            elif anchor not in anchors(where):
                broken.append(f"{page.name}:{number}: {target}: no heading #{anchor} in "
                              f"{where.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_the_links_are_found() -> None:
    """The checker sees links (a regex that matched nothing would pass everything)."""
    found = [target for page in PAGES for _, target in links(page)]
    assert "docs/config.md" in found and "operations.md#behind-a-reverse-proxy" in found
    assert len(found) > 40


def test_the_readme_is_short_and_its_table_names_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200, "README.md: reference material goes in docs/"
    table = readme.split("\n## Documentation\n", 1)[1]
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in table, f"{page.name} is not in README's Documentation"


def test_the_vendor_url_table_gives_each_url_settings_default_as_the_code_has_it() -> None:
    """docs/config.md, "Vendor URLs": one row per vendor URL setting, its default the
    adapter's (``SETTINGS``), so the table stays true when a default changes."""
    from server.vendors import VENDORS

    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    section = text.split("\n## Vendor URLs\n", 1)[1].split("\n## ", 1)[0]
    row_re = re.compile(r"^\| `\[sites\.(\w+)\] (\w+)` \| `([^`]*)` \|", re.M)
    documented = {(vendor, key): default for vendor, key, default in row_re.findall(section)}
    in_code = {(name, setting.name): setting.default for name, module in VENDORS.items()
               for setting in module.SETTINGS if setting.url}
    assert len(in_code) == 8 and documented == in_code
