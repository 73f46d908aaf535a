"""What each migration declares about the release before it (server/store/compat.py), what
``onetag migrate`` records of it, and a SQLite process opening a database a newer onetag
migrated. PostgreSQL's nodes (health check, start-up, ingest): tests/test_store_pg.py."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3

import pytest
from hypothesis import given, strategies as st

from server.store import compat, pg_migrate
from server.store.base import SessionInfo
from server.store.compat import MigrationUndeclared, compatible_from
from server.store.sqlite import SQLiteStore, migrate, migrations

from support import migrated_config, settings_for


@pytest.mark.parametrize("files", [migrations, pg_migrate.migrations],
                         ids=["sqlite", "postgresql"])
def test_every_migration_file_declares_what_it_does_to_the_previous_release(files) -> None:
    """A new migration without its declaration fails here (and ``onetag migrate`` refuses
    to apply anything): whether the nodes still running the previous release keep running
    on the schema after it decides whether an upgrade can be rolling (docs/postgresql.md,
    "Upgrading")."""
    known = {version for version, _, _ in files()}
    for version, name, sql in files():
        assert sql.startswith("-- previous release: "), name  # the first line, by convention
        floor = compatible_from(name, sql)
        assert floor in (0, version) or floor in known, name  # a migration of its own it names


def test_the_migrations_known_to_break_the_previous_release_say_so() -> None:
    """034 changed the composite row type the previous release's ingest statement takes
    (docs/postgresql.md, "Upgrading"); 027 added attributes to it the same way."""
    pg = {name: compatible_from(name, sql) for _, name, sql in pg_migrate.migrations()}
    assert pg["034_cart_id.sql"] == 34 and pg["027_ingest_write.sql"] == 27
    assert pg["021_console_search.sql"] == 0 and pg["040_migration_compat.sql"] == 0


@given(form=st.sampled_from(["compatible", "breaks", "compatible from 7"]),
       before=st.text(alphabet="abc -;\n", max_size=40), after=st.text(max_size=40),
       spaces=st.sampled_from(["", " ", "  "]))
def test_a_declaration_is_found_on_its_own_line_wherever_it_is(form, before, after,
                                                                 spaces) -> None:
    """The declaration parser, on any text around one declaration line."""
    sql = f"{before}\n--{spaces}previous release: {form}{spaces}\n{after.replace('--', '')}"
    if "previous release:" in before + after:
        return
    assert compatible_from("012_x.sql", sql) == {"compatible": 0, "breaks": 12,
                                                 "compatible from 7": 7}[form]


@given(text=st.text(max_size=200))
def test_text_without_a_declaration_line_is_refused_naming_the_file(text) -> None:
    if "previous release:" in text:
        text = text.replace("previous release:", "")
    with pytest.raises(MigrationUndeclared, match="012_x.sql"):
        compatible_from("012_x.sql", text)


@pytest.mark.parametrize("line", ["-- previous release: maybe",
                                  "-- previous release: compatible from 12",  # itself
                                  "-- previous release: compatible from 30",  # later
                                  "-- previous release: compatible\n"
                                  "-- previous release: breaks"])  # two
def test_a_malformed_or_repeated_declaration_is_refused(line) -> None:
    with pytest.raises(MigrationUndeclared, match="012_x.sql"):
        compatible_from("012_x.sql", line + "\nCREATE TABLE t (a INTEGER)")


def test_what_a_node_runs_with() -> None:
    """Compatible: any older code; compatible from N: code that knows N; breaks (its own
    version) and not recorded (None): no code that does not know it."""
    known = {1, 2, 36}
    recorded = [(1, "001", 1), (2, "002", 0), (37, "037_index", 0), (38, "038_contract", 36),
                (39, "039_contract", 37), (40, "040_type", 40), (41, "041_by_hand", None)]
    assert compat.sort_unknown(recorded, known) == (
        ["039_contract", "040_type", "041_by_hand"], ["037_index", "038_contract"])


def _plan(pending, applied={1: "001_a.sql", 2: "002_b.sql"}, declared=True):
    return compat.Plan(applied=applied, pending=pending, declared=declared, newer=[])


def test_the_plan_says_whether_the_upgrade_is_rolling() -> None:
    rolling = _plan([(3, "003_index.sql", 0), (4, "004_contract.sql", 2)])
    said = "\n".join(rolling.lines("db"))
    assert rolling.breaking() == [] and "rolling upgrade" in said and "not a" not in said
    assert re.search(r"003_index.sql +previous release: compatible\n", said)
    assert re.search(r"004_contract.sql +previous release: compatible from 002\n", said)
    assert "002_b.sql" in said  # the newest migration of the release running now
    breaking = _plan([(3, "003_index.sql", 0), (4, "004_type.sql", 4)])
    assert breaking.breaking() == ["004_type.sql"]
    assert "not a rolling upgrade: 004_type.sql" in "\n".join(breaking.lines("db"))
    # A contract step whose named migration is pending too: the release running now lacks it.
    assert _plan([(3, "003_expand.sql", 0), (4, "004_contract.sql", 3)]).breaking() == [
        "004_contract.sql"]
    # A database whose release records no declarations refuses every migration it lacks.
    older = _plan([(3, "003_index.sql", 0)], declared=False)
    assert older.breaking() == ["003_index.sql"]
    assert "refuses every migration it does not know" in "\n".join(older.lines("db"))
    new = _plan([(1, "001_a.sql", 1)], applied={}, declared=False)
    assert new.breaking() == [] and "a new database" in "\n".join(new.lines("db"))
    assert _plan([]).lines("db") == []


# SQLite: a process opening a database a newer onetag migrated -----------------------------

def _newer(path, floor, version: int = 999) -> None:
    """What a newer onetag's migrate leaves: its migration applied, recorded with ``floor``."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE future_things (id INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0, ?)",
                   (version, f"{version}_future.sql", floor))


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_sqlite_runs_on_a_newer_compatible_migration_and_says_so_once(
        tmp_path, writer, caplog) -> None:
    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
    await store.open()
    await store.close()
    _newer(tmp_path / "onetag.db", 0)
    caplog.set_level(logging.WARNING, logger="onetag.store")
    compat._said.clear()
    for _ in range(2):
        store = SQLiteStore(settings.server.sqlite_path, settings.sites, writer=writer)
        await store.open()
        try:
            await store.ping()
            from test_store import event, ingest

            answer = await ingest(store, event({"event": "page_view", "event_id": f"e{_}"}))
            assert not answer[0].duplicate
        finally:
            await store.close()
    said = [r.getMessage() for r in caplog.records if "999_future.sql" in r.getMessage()]
    if writer == "thread":  # (the process writer's migrate says it in its own process)
        assert len(said) == 1 and "restart it on that release" in said[0]
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert migrate(db) == []


@pytest.mark.parametrize("floor", [999, None, 998], ids=["breaks", "not recorded",
                                                          "compatible from unknown"])
async def test_sqlite_refuses_a_newer_migration_that_is_not_compatible(tmp_path,
                                                                       floor) -> None:
    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()
    await store.close()
    _newer(tmp_path / "onetag.db", floor)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    with pytest.raises(Exception, match="999_future.sql.*newer onetag"):
        await store.open()


async def test_sqlite_runs_on_a_contract_step_whose_expand_step_it_knows(tmp_path) -> None:
    settings = settings_for(tmp_path)
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()
    await store.close()
    _newer(tmp_path / "onetag.db", migrations()[-1][0])  # from this release's newest
    store = SQLiteStore(settings.server.sqlite_path, settings.sites)
    await store.open()
    try:
        await store.ingest("shop1", [], [], SessionInfo())
    finally:
        await store.close()


def test_migrate_records_each_declaration_and_fills_in_a_database_from_before(
        tmp_path) -> None:
    """A database an older onetag made (no compatible_from column) gets it from migration
    024, and every row its files' declaration."""
    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.execute("CREATE TABLE schema_migrations "
               "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)")
    for version, name, sql in [m for m in migrations() if m[0] <= 20]:
        for statement in sql.split(";\n"):
            db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    # every migration after 020 (024 among them; 022: the retention index)
    assert migrate(db) == [name for version, name, _ in migrations() if version > 20]
    assert "024_migration_compat.sql" in [name for _, name, _ in migrations()]
    recorded = db.execute("SELECT version, compatible_from FROM schema_migrations "
                          "ORDER BY version").fetchall()
    assert recorded == [(version, compatible_from(name, sql))
                        for version, name, sql in migrations()]
    assert dict(recorded)[18] == 18 and dict(recorded)[19] == 0


def test_migrate_check_lists_the_pending_migrations_and_applies_nothing(tmp_path, capsys,
                                                                        monkeypatch) -> None:
    from server import cli

    monkeypatch.chdir(tmp_path)
    config = migrated_config(tmp_path)
    assert cli.main(["migrate", "--config", str(config), "--check"]) == 0
    assert "is current; nothing to apply" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "onetag.db") as db:  # as if 019 and 020 were new
        db.execute("DELETE FROM schema_migrations WHERE version IN (19, 20)")
    assert cli.main(["migrate", "--config", str(config), "--check"]) == 0
    said = capsys.readouterr().out
    assert "2 migration(s) pending" in said and "rolling upgrade" in said
    assert re.search(r"020_due_after_grace.sql +previous release: compatible\n", said)
    with sqlite3.connect(tmp_path / "onetag.db") as db:  # and 018, which breaks
        db.execute("DELETE FROM schema_migrations WHERE version = 18")
        db.execute("DROP TABLE guess_failures")
    assert cli.main(["migrate", "--config", str(config), "--check"]) == 3
    said = capsys.readouterr().out
    assert re.search(r"018_cart_id.sql +previous release: breaks\n", said)
    assert "not a rolling upgrade: 018_cart_id.sql" in said
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert db.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
            migrations()) - 3  # nothing applied


# PostgreSQL migrations run outside a transaction (pg_migrate.OUTSIDE) ----------------------

def test_a_migration_outside_a_transaction_only_builds_indexes_it_can_build_again() -> None:
    """Every PostgreSQL file that says ``-- onetag migrate: outside a transaction`` is made
    of statements safe to run again after an interruption: each index built
    ``CONCURRENTLY IF NOT EXISTS`` (``pg_migrate.CONCURRENT_INDEX``, whose INVALID leftover
    the next run drops), nothing else; and no other file builds one CONCURRENTLY
    (PostgreSQL refuses it inside a transaction)."""
    outside = []
    for _, name, sql in pg_migrate.migrations():
        if pg_migrate.outside_transaction(sql):
            outside.append(name)
            parts = pg_migrate.statements(sql)
            assert parts and len(parts) == len(pg_migrate.CONCURRENT_INDEX.findall(sql)), name
            assert all(pg_migrate.CONCURRENT_INDEX.match(part) for part in parts), name
        else:
            assert "CONCURRENTLY" not in sql.upper(), name
    assert "038_retention.sql" in outside


# A statement's text: words, and literals (a quote doubled inside) holding no ';'.
PART = st.lists(st.from_regex(r"[A-Za-z0-9_ (),=]{1,20}", fullmatch=True)
                | st.from_regex(r"'(?:[A-Za-z0-9 ,()=-]|''){0,10}'", fullmatch=True),
                min_size=1, max_size=4).map("".join).filter(lambda text: text.strip())


@given(st.lists(PART, min_size=1, max_size=5),
       st.lists(st.from_regex(r"[^\n\r]{0,30}", fullmatch=True), max_size=3))
def test_statements_are_a_files_parts_between_semicolons_without_comment_lines(
        parts: list[str], comments: list[str]) -> None:
    lines = [f"-- {comment}" for comment in comments]
    sql = "\n".join(lines + [part + ";" for part in parts])
    assert pg_migrate.statements(sql) == [part.strip() for part in parts]


@given(st.lists(PART, min_size=1, max_size=3), st.integers(0, 2),
       st.sampled_from(["-- a; b", "/* a; b */", "'a;b'", '"a;b"', "'open", "$$ a; b $$",
                        "$body$ SELECT 1; $body$"]))
def test_statements_refuses_a_file_it_would_split_wrongly(
        parts: list[str], where: int, odd: str) -> None:
    """What ``statements`` does not parse (a comment after a statement, a ``;`` quoted, a
    function body) makes it refuse the file, naming it, rather than split it wrongly."""
    lines = [part + ";" for part in parts]
    at = min(where, len(lines) - 1)
    lines[at] = lines[at][:-1] + " " + odd + ";"
    with pytest.raises(ValueError, match="split on ';' alone"):
        pg_migrate.statements("\n".join(lines))


def test_migrate_refuses_a_file_outside_a_transaction_it_would_split_wrongly(
        monkeypatch) -> None:
    """Before it takes its lock or applies anything, naming the file."""
    files = [(38, "038_retention.sql", "-- onetag migrate: outside a transaction\n"
              "CREATE INDEX CONCURRENTLY IF NOT EXISTS x ON t (a); -- then; more\n")]
    monkeypatch.setattr(pg_migrate, "migrations", lambda: files)
    monkeypatch.setattr(pg_migrate.compat, "compatible_from", lambda name, sql: 0)

    class NoConnection:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"the database was used: {name}")

    with pytest.raises(ValueError, match="^038_retention.sql: .* cannot hold '-- then; more"):
        asyncio.run(pg_migrate.migrate(NoConnection()))
