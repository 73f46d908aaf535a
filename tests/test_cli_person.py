"""`onetag person export` and `onetag person forget` as an operator runs them, on both
backends: the export is one JSON document, a dry run changes nothing, --yes erases, the
mistakes are one line (exit 2) and an unknown person exit 1, never a traceback; and the
commands run beside a live writer process (`onetag serve`'s), whose later events of the
same sc start a fresh session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from server import cli

from test_person import B1, BOB, J1, J2, JANE, backend_event, browser, ingest, jane_and_bob
from test_person import snapshot


def write_config(tmp_path: Path, database: str) -> str:
    path = tmp_path / "onetag.toml"
    path.write_text(f'[server]\ndatabase = "{database}"\nforward = false\n'
                    '[[sites]]\nid = "shop1"\napi_key = "k1k1k1k1k1k1k1k1"\n', encoding="utf-8")
    return str(path)


async def seeded(backend, **options):
    store = await backend.open(backend.settings(), **options)
    await jane_and_bob(store)
    return store


async def arun(capsys, *args: str) -> tuple[int, str, str]:
    """``run`` from a test's event loop: the command runs its own (``asyncio.run``)."""
    return await asyncio.to_thread(run, capsys, *args)


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


async def test_export_dry_run_forget_and_again(backend, tmp_path, capsys) -> None:
    store = await seeded(backend)
    await store.close()
    config = write_config(tmp_path, backend.database)
    before = await snapshot(backend)

    code, out, err = await arun(capsys, "person", "export", "--config", config, "--site", "shop1",
                         "--email", JANE)
    assert code == 0 and err == ""
    document = json.loads(out)
    assert [row["email"] for row in document["identities"]] == [JANE]
    assert sorted(s["sc"] for s in document["sessions"]) == [J1, J2]
    assert document["counts"]["events"] == 6 and BOB not in out

    exported = tmp_path / "jane.json"
    code, out, _ = await arun(capsys, "person", "export", "--config", config, "--site", "shop1",
                       "--customer-id", "C-JANE", "--out", str(exported))
    assert code == 0 and f"to {exported}" in out
    by_customer = json.loads(exported.read_text(encoding="utf-8"))
    assert by_customer["identities"] == document["identities"]

    code, out, _ = await arun(capsys, "person", "forget", "--config", config, "--site", "shop1",
                       "--sc", J2)
    assert code == 0 and out.startswith(f"dry run: would erase sc {J2}")
    # J2 is bound to Jane by a typed email (unverified): its own events only.
    assert f"sc {J2} -> session #" in out and "not followed (unverified)" in out
    assert "identities    delete 0" in out and "events        delete 2" in out
    assert "only a signed identify (user.signature) proves it" in out
    assert "nothing changed" in out.splitlines()[-1]
    assert await snapshot(backend) == before  # a dry run changes nothing
    code, out, _ = await arun(capsys, "person", "export", "--config", config, "--site", "shop1",
                              "--sc", J2, "--out", str(tmp_path / "j2.json"))
    assert code == 0 and "0 identities, 1 sessions, 2 events" in out
    assert f"(sc {J2}) is bound to identity #" in out and ", not followed: " in out

    code, out, _ = await arun(capsys, "person", "forget", "--config", config, "--site", "shop1",
                       "--email", JANE.upper(), "--yes", "--json")
    report = json.loads(out)
    assert code == 0 and report["changed"]["events"] == {"delete": 6}
    assert report["changed"]["identities"] == {"delete": 1}
    assert await backend.rows("SELECT count(*) FROM events") == [(3,)]  # Bob's
    assert await backend.rows("SELECT sc FROM sessions") == [(B1,)]

    code, out, err = await arun(capsys, "person", "forget", "--config", config, "--site", "shop1",
                         "--email", JANE, "--yes")
    assert code == 1 and out == ""
    assert err.strip() == (f"onetag: nothing held about email {JANE} on site shop1 in "
                           f"{cli._shown(cli._ops_settings(config))} (never seen, or already "
                           "erased)")


@pytest.mark.parametrize("args, said", [
    (["--site", "shop2", "--email", JANE], "no site 'shop2' in the config (sites: shop1)"),
    (["--site", "shop1"], "name the person: --email, --customer-id or --sc"),
    (["--site", "shop1", "--email", JANE, "--sc", J1], "--email and --sc given"),
    (["--site", "shop1", "--email", "jane"], "--email: not an email address onetag would store: 'jane' is not"),
])
def test_mistakes_are_one_line_and_change_nothing(tmp_path, capsys, args, said) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/t.db")
    (tmp_path / "t.db").write_bytes(b"")
    for action in ("export", "forget"):
        code, out, err = run(capsys, "person", action, "--config", config, *args,
                             *(["--yes"] if action == "forget" else []))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("onetag: ") and said in err and "Traceback" not in err


async def test_beside_a_live_writer_process(backend, tmp_path, capsys) -> None:
    """The serve's store (its writer in a process of its own) keeps ingesting while the
    command erases; the next event of Jane's sc starts a fresh session there."""
    store = await seeded(backend, writer="process")
    try:
        config = write_config(tmp_path, backend.database)
        code = await asyncio.to_thread(cli.main, ["person", "forget", "--config", config,
                                                  "--site", "shop1", "--sc", J1, "--yes"])
        assert code == 0
        await ingest(store, browser({"event": "page_view", "event_id": "j9"}, J1),
                     backend_event({"event": "identify", "event_id": "b9",
                                    "user": {"email": BOB}}))
        rows = await backend.dicts("SELECT sc, identity_id, first_seq, last_seq FROM sessions "
                                   "ORDER BY sc")
        fresh = [row for row in rows if row["sc"] == J1]
        assert len(fresh) == 1 and fresh[0]["identity_id"] is None
        assert fresh[0]["first_seq"] == fresh[0]["last_seq"]
        assert await backend.rows("SELECT event_id FROM events WHERE sc = ?", J1) == [("j9",)]
        # J1's binding was a typed email (unverified): Jane's identity was not followed.
        assert await backend.rows("SELECT count(*) FROM identities WHERE email = ?", JANE) == [
            (1,)]
    finally:
        await store.close()
    capsys.readouterr()
