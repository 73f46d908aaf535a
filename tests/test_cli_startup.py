"""The one-shot operator commands (deliveries, replay, catalog, coupons) start light: SQLite's
writer in their own connection thread, not a second Python process, and no HTTP stack
imported only to read ``ONETAG_FORWARD_*``. A writer process and httpx (with what it pulls
in) were about half of every such command's time (server/cli.py, ``_with_store``;
server/forward_options.py). A worker and ``backfill --send`` keep their writer process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server import cli
from server.store import sqlite_writer

from fakes.harness import REPO, settings_data, write_config


class Vendors:
    """Only the URLs the settings need: nothing is sent here."""

    def url(self, vendor: str, query: str = "") -> str:
        return f"http://127.0.0.1:9/{vendor}{query}"


@pytest.fixture
def shop(tmp_path):
    config = write_config(tmp_path / "onetag.toml",
                          settings_data(tmp_path, Vendors(), forward=False))
    assert cli.main(["migrate", "--config", str(config)]) == 0
    return config


ONE_SHOT = [["deliveries"], ["deliveries", "--json"], ["deliveries", "--state", "pending"],
            ["deliveries", "--id", "1"], ["replay", "--dry-run"], ["replay", "--since", "1h"],
            ["replay", "--id", "1"], ["catalog"], ["coupons"]]


def test_one_shot_commands_start_no_writer_process(shop, monkeypatch, capsys) -> None:
    started = []
    start = sqlite_writer.ProcessWriter.start

    async def recorded(self, *args, **kwargs):
        started.append(command)
        return await start(self, *args, **kwargs)

    monkeypatch.setattr(sqlite_writer.ProcessWriter, "start", recorded)
    monkeypatch.delenv("ONETAG_WRITER", raising=False)  # the default, as users run them
    for command in ONE_SHOT:
        code = cli.main([*command, "--config", str(shop)])
        out, err = capsys.readouterr()
        # --id 1 on an empty database: "no delivery #1", exit 1; the others succeed.
        assert code == (1 if "--id" in command else 0), (command, out, err)
    assert started == [], "these started a writer process"
    # $ONETAG_WRITER still chooses (tests/test_cli_mistakes.py closes such writers).
    monkeypatch.setenv("ONETAG_WRITER", "process")
    command = ["deliveries"]
    assert cli.main(["deliveries", "--config", str(shop)]) == 0
    assert started == [["deliveries"]]


def test_replay_and_a_listing_with_reasons_import_no_http_stack(shop) -> None:
    probe = ("import sys, json\nfrom server.cli import main\n"
             "codes = [main(['replay', '--dry-run', '--config', sys.argv[1]]),\n"
             "         main(['deliveries', '--state', 'failing', '--config', sys.argv[1]])]\n"
             "print(json.dumps([codes, sorted(m for m in sys.modules\n"
             "                  if m.split('.')[0] in ('httpx', 'httpcore'))]))\n")
    env = {k: v for k, v in os.environ.items() if k != "ONETAG_WRITER"}
    run = subprocess.run([sys.executable, "-c", probe, str(shop)], capture_output=True,
                         text=True, timeout=60, cwd=shop.parent,
                         env={**env, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    codes, http = json.loads(run.stdout.splitlines()[-1])
    assert codes == [0, 0] and http == []
