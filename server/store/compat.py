"""What each migration declares about the release before it, and what a node makes of a
database with migrations it does not know (docs/postgresql.md, "Upgrading").

Every migration file (``migrations/`` and ``pg_migrations/``) says, in a comment line of its
own, whether nodes still running an older release keep working on the schema after it:

- ``-- previous release: compatible``: it only adds (a table, an index, a nullable column, a
  function or type no older code calls, a function replaced with the same signature and
  meaning). Every older release that ran on the schema before it keeps running on it, and
  what such a node writes meanwhile is valid for the new release.
- ``-- previous release: compatible from NNN``: the contract step of an expand/contract
  change. It removes what only releases without migration NNN use (NNN being a migration
  of the release whose code stopped using it): a node that knows NNN keeps running, an
  older one does not (docs/architecture.md, "Writing a migration").
- ``-- previous release: breaks``: older nodes must not run on it (034 changed the row
  type the previous release's ingest statement takes).

``onetag migrate`` records each declaration in ``schema_migrations.compatible_from`` (SQLite
migration 024, PostgreSQL 040), as the oldest code that keeps running: 0 for compatible,
NNN for compatible from NNN, the migration's own version for breaks (only code that knows
it). A node then runs on a database with migrations it does not know (a newer release
migrated it: a rolling upgrade) when every one of them was recorded compatible, or
compatible from a migration the node knows; any other refuses it, as before, and so does
one with no record (NULL), conservatively. Which release reads what: the column is read
only by this release and later ones, and only for migrations they do not know, which a
newer release's ``onetag migrate`` applied and recorded; a release older than the column
records only migrations every later release knows (their rows get their files'
declarations from the next ``onetag migrate``), so a NULL met is a record made by hand or
by another line of releases. Releases older than the column read nothing of it: they
refuse every migration they do not know, 040 (024) included.

A node two releases behind meets the migrations of both later releases: it keeps running
if each is compatible (they only add), and refuses a contract step from a migration it
does not know. Releases are not numbered in the schema, so the contract step's
``from NNN`` is what tells the two apart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

# The declaration: a comment line of its own, anywhere in the file (by convention the first).
DECLARATION = re.compile(r"^--\s*previous release:\s*(.*?)\s*$", re.MULTILINE)
_FORMS = re.compile(r"(compatible)(?:\s+from\s+(\d+))?|(breaks)")


class MigrationUndeclared(ValueError):
    """A migration file without (or with more than one, or a malformed) declaration."""


def compatible_from(name: str, sql: str) -> int:
    """The oldest code that keeps running after the migration ``name`` (its file's text
    ``sql``), as recorded in ``schema_migrations.compatible_from``: 0 for ``compatible``,
    NNN for ``compatible from NNN``, the migration's own version for ``breaks``."""
    version = int(name.split("_", 1)[0])
    found = DECLARATION.findall(sql)
    if len(found) != 1:
        raise MigrationUndeclared(
            f"migration {name} must declare, on one comment line of its own, "
            f"`-- previous release: compatible`, `-- previous release: compatible from NNN` "
            f"or `-- previous release: breaks` (docs/architecture.md, \"Writing a "
            f"migration\"); it has {len(found) or 'no'} such line(s)")
    form = _FORMS.fullmatch(found[0])
    if form is None:
        raise MigrationUndeclared(
            f"migration {name}: `-- previous release: {found[0]}` is not one of compatible, "
            f"compatible from NNN, breaks")
    if form.group(3):
        return version
    floor = int(form.group(2) or 0)
    if floor >= version:
        raise MigrationUndeclared(
            f"migration {name}: `compatible from {form.group(2)}` must name an earlier "
            f"migration (one of the release whose code stopped using what this removes)")
    return floor


def describe(version: int, floor: int | None) -> str:
    """A recorded ``compatible_from`` said as the file declares it."""
    if floor is None:
        return "not declared"
    if floor == version:
        return "breaks"
    return "compatible" if floor == 0 else f"compatible from {floor:03d}"


def runs_on(floor: int | None, known: Collection[int]) -> bool:
    """Whether code that has the migrations ``known`` keeps running after a migration it
    does not know, recorded with ``floor``. The same rule as ``TOLERATED_SQL``."""
    return floor is not None and (floor == 0 or floor in known)


def tolerated_sql(known: str) -> str:
    """``runs_on`` in SQL, over a schema_migrations row; ``known``: the expression that is
    the known versions (PostgreSQL ``ANY($2::int[])``)."""
    return f"(compatible_from = 0 OR compatible_from = {known})"


class Unknown(NamedTuple):
    """What a node makes of the migrations it does not know: those that refuse it, and
    those it keeps running with (file names, in version order)."""

    refused: list[str]
    tolerated: list[str]


def sort_unknown(recorded: Iterable[tuple[int, str, int | None]],
                 known: Collection[int]) -> Unknown:
    """``recorded``: (version, name, compatible_from) of every applied migration."""
    refused, tolerated = [], []
    for version, name, floor in sorted(recorded):
        if version in known:
            continue
        (tolerated if runs_on(floor, known) else refused).append(name)
    return Unknown(refused, tolerated)


def newer_compatible(names: Sequence[str]) -> str:
    """What a node says once of the newer migrations it keeps running with."""
    return (f"the database has migrations this onetag does not know ({', '.join(names)}), "
            "each declared compatible with it: a newer onetag migrated it; this node keeps "
            "running, restart it on that release")


# The newer migrations this process said it runs with: each set said once a process.
_said: set[tuple[str, ...]] = set()


def say_newer(log: logging.Logger, names: Sequence[str]) -> None:
    """Warn, once a process for each set of ``names``, that the database has these newer
    migrations and this node keeps running (a restart on the new release is due)."""
    if names and tuple(names) not in _said:
        _said.add(tuple(names))
        log.warning("%s", newer_compatible(names))


_STOP = ("its processes refuse the schema from the migration on (on PostgreSQL /healthz "
         "answers 503) until they run this release: stop them, migrate, start them on it")


class Plan(NamedTuple):
    """What ``onetag migrate`` would apply, and whether the nodes running now keep running
    through it (``onetag migrate --check``)."""

    applied: dict[int, str]  # the database's migrations now
    pending: list[tuple[int, str, int]]  # (version, name, compatible_from) to apply
    declared: bool  # the database records declarations (its release has this check)
    newer: list[str]  # migrations the database has that this onetag does not know

    def breaking(self) -> list[str]:
        """The pending migrations the release running now does not keep running through."""
        if not self.applied:
            return []
        if not self.declared:  # that release refuses every migration it does not know
            return [name for _, name, _ in self.pending]
        return [name for _, name, floor in self.pending if not runs_on(floor, self.applied)]

    def lines(self, label: str) -> list[str]:
        """The plan said, one line each (``onetag migrate`` prints them before applying)."""
        said = [f"onetag: {label} has migrations this onetag does not know "
                f"({', '.join(self.newer)}): a newer onetag migrated it"] if self.newer else []
        if not self.pending:
            return said
        said.append(f"onetag: {len(self.pending)} migration(s) pending on {label}:")
        width = max(len(name) for _, name, _ in self.pending)
        for version, name, floor in self.pending:
            said.append(f"  {name:<{width}}  previous release: {describe(version, floor)}")
        if not self.applied:
            said.append("onetag: a new database: no release runs on it yet")
            return said
        newest = self.applied[max(self.applied)]
        breaking = self.breaking()
        if not breaking:
            said.append(f"onetag: rolling upgrade: every pending migration is compatible with "
                        f"the release running now (its newest migration: {newest}); its "
                        f"nodes keep running; restart them on this release one at a time")
        elif not self.declared:
            said.append(f"onetag: not a rolling upgrade: the release running now (its newest "
                        f"migration: {newest}) refuses every migration it does not know; "
                        f"{_STOP}")
        else:
            said.append(f"onetag: not a rolling upgrade: {', '.join(breaking)} break(s) the "
                        f"release running now (its newest migration: {newest}); {_STOP}")
        return said


def plan(applied: dict[int, str], files: Sequence[tuple[int, str, str]],
         declared: bool) -> Plan:
    """The ``Plan`` for a database with the migrations ``applied`` (and, with ``declared``,
    their declarations recorded), of this code's migration ``files``."""
    known = {version for version, _, _ in files}
    return Plan(applied=applied,
                pending=[(version, name, compatible_from(name, sql))
                         for version, name, sql in files if version not in applied],
                declared=declared,
                newer=[applied[version] for version in sorted(set(applied) - known)])
