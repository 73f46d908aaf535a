"""The commands as an operator runs them, with the mistakes an operator makes: a relative
database path run from another folder, no config at all, a bad ONETAG_FORWARD_* variable, a
path that can't be written, a number out of range. Each is one ``onetag: ...`` line (exit 2,
never a traceback), and every message names the SQLite file by its absolute path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.forwarder import ForwarderOptions

REPO = Path(__file__).resolve().parent.parent

CONFIG = '''\
[server]
database = "sqlite:///{database}"
public_url = "http://127.0.0.1:8650"
forward = false
[[sites]]
id = "shop1"
api_key = "k1k1k1k1k1k1k1k1"
[sites.sendlane]
integration_token = "tok"
api_token = "sec"
api_base = "http://127.0.0.1:8699/sendlane"
'''


def onetag(*args: str, cwd: Path, env: dict | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("ONETAG_FORWARD_") and k != "ONETAG_CONFIG"}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          env={**environ, "PYTHONPATH": str(REPO), **(env or {})})


def config_at(path: Path, database: str = "t.db") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG.format(database=database), encoding="utf-8")
    return path


def one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2, and stderr is one ``onetag: ...`` line containing each of ``expected``."""
    said = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, said, result.stdout)
    assert "Traceback" not in said and len(said.splitlines()) == 1, said
    assert said.startswith("onetag: "), said
    for text in expected:
        assert text in said, (text, said)
    return said


@pytest.fixture
def migrated(tmp_path) -> Path:
    """A config whose relative database was migrated from the config's own folder."""
    config = config_at(tmp_path / "onetag.toml")
    result = onetag("migrate", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return config


# 2. Relative paths and the demo fallback ---------------------------------------------------


def test_a_relative_sqlite_path_is_named_absolute_and_its_rule_is_said(tmp_path) -> None:
    """``sqlite:///onetag.db`` is relative to the working directory (kept: existing
    databases stay where they are); every message names the file by its absolute path, and
    a command run from another folder than the config's says where it looked and why."""
    config = config_at(tmp_path / "conf" / "onetag.toml", "onetag.db")
    run, ops = tmp_path / "run", tmp_path / "ops"
    run.mkdir()
    ops.mkdir()
    migrated = onetag("migrate", "--config", "../conf/onetag.toml", cwd=run)
    assert migrated.returncode == 0, migrated.stderr
    assert f"to {run / 'onetag.db'}:" in migrated.stdout
    # The file was new and the config is elsewhere: migrate says it is creating it, and why there.
    assert f"no database at {run / 'onetag.db'} yet" in migrated.stderr
    assert "relative" in migrated.stderr and "working directory" in migrated.stderr
    again = onetag("migrate", "--config", "../conf/onetag.toml", cwd=run)
    assert f"{run / 'onetag.db'} is current" in again.stdout and again.stderr == ""
    listed = onetag("deliveries", "--config", "../conf/onetag.toml", cwd=run)
    assert listed.returncode == 0 and f"deliveries in {run / 'onetag.db'}" in listed.stdout
    # From another folder: where it looked, and the rule.
    said = one_line_error(onetag("deliveries", "--config", "../conf/onetag.toml", cwd=ops),
                          f"no database at {ops / 'onetag.db'}", "working directory",
                          "nothing has been stored yet")
    assert str(config.parent) in said
    assert not (ops / "onetag.db").exists()
    # serve's refusal of a path it can't write names the absolute path too; its "serving"
    # banner waits until the database is known usable (it said "serving", then "not serving").
    (ops / "sub").write_text("a file, not a folder")
    config_at(ops / "bad.toml", "sub/onetag.db")
    refused = onetag("serve", "--config", "bad.toml", "--port", "8750", cwd=ops)
    assert refused.returncode == 2
    assert "serving" not in refused.stdout, refused.stdout
    assert f"cannot write the database at {ops / 'sub' / 'onetag.db'}" in refused.stderr
    assert "not serving" in refused.stderr


@pytest.mark.parametrize("command", [
    ["deliveries"], ["replay", "--dry-run"], ["catalog"], ["coupons"],
    ["export", "remarkety-orders", "--site", "demo", "--out", "o.csv"], ["migrate"]])
def test_without_a_config_the_ops_commands_say_they_use_the_demo_database(
        tmp_path, command) -> None:
    demo_db = tmp_path / "onetag-demo.db"
    assert onetag("migrate", cwd=tmp_path).returncode == 0
    result = onetag(*command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (f"no config file (--config, $ONETAG_CONFIG or ./onetag.toml): using the demo's "
            f"database {demo_db}") in result.stderr


def test_without_a_config_or_demo_database_nothing_is_made(tmp_path) -> None:
    said = one_line_error(onetag("export", "remarkety-orders", "--site", "demo", "--out",
                                 "o.csv", cwd=tmp_path), "no config file", "no demo database at")
    assert str(tmp_path / "onetag-demo.db") in said
    assert not list(tmp_path.iterdir())  # no empty CSV, no database


def test_worker_without_a_config_says_it_uses_the_demo_database(tmp_path) -> None:
    """It would run until stopped: a bad forwarder variable stops it right after the note."""
    result = onetag("worker", cwd=tmp_path, env={"ONETAG_FORWARD_CONCURRENCY": "0"}, timeout=30)
    assert result.returncode == 2
    assert f"using the demo's database {tmp_path / 'onetag-demo.db'}" in result.stderr


# 8. ONETAG_FORWARD_* -----------------------------------------------------------------------


@pytest.mark.parametrize("name, value, expected", [
    ("CONCURRENCY", "0", "a whole number, at least 1"),
    ("CONCURRENCY", "-3", "a whole number, at least 1"),
    ("CONCURRENCY", "2.5", "a whole number, at least 1"),
    ("MAX_ATTEMPTS", "abc", "a whole number, at least 1"),
    ("LEASE_S", "0", "seconds, more than 0"),
    ("IDLE_POLL_S", "nan", "seconds, more than 0"),
    ("READ_TIMEOUT_S", "inf", "seconds, more than 0"),
    ("RETRY_WINDOW_S", "1e300", "at most 31536000"),
    ("PRODUCT_SYNC_EVERY_S", "-1", "seconds, 0 or more"),
    ("RATES", "sendlane=0", "requests a second, more than 0"),
    ("RATES", "sendlane", "requests a second, more than 0"),
    ("RATES", "sendlan=4", "unknown vendor 'sendlan'"),
    ("PROXY", "https://proxy.internal:3128", "reached over http://"),
    ("PROXY", "proxy.internal:3128", "reached over http://"),
    ("PROXY", "http://proxy.internal", "host and port and nothing else"),
    ("PROXY", "http://proxy.internal:3128/path", "host and port and nothing else"),
])
def test_forwarder_variables_out_of_range_are_refused(name, value, expected) -> None:
    with pytest.raises(ValueError) as refused:
        ForwarderOptions.from_env({f"ONETAG_FORWARD_{name}": value})
    message = str(refused.value)
    assert message.startswith(f"ONETAG_FORWARD_{name}={value!r}: ") and expected in message


def test_forwarder_variables_in_range_are_taken() -> None:
    options = ForwarderOptions.from_env({"ONETAG_FORWARD_CONCURRENCY": "1",
                                         "ONETAG_FORWARD_PRODUCT_SYNC_EVERY_S": "0",
                                         "ONETAG_FORWARD_SHUTDOWN_GRACE_S": "0",
                                         "ONETAG_FORWARD_BACKOFF_BASE_S": "0.05"})
    assert (options.concurrency, options.product_sync_every_s) == (1, 0)


def test_a_proxy_is_taken_and_its_password_never_shown() -> None:
    options = ForwarderOptions.from_env({"ONETAG_FORWARD_PROXY": "http://u:s3cret@p.internal:3128"})
    assert options.proxy == "http://u:s3cret@p.internal:3128"
    assert ForwarderOptions.from_env({"ONETAG_FORWARD_PROXY": "none"}).proxy is None
    for wrong in ("http://u:s3cret@p.internal:99999", "http://u:s3cret#x@p.internal:3128",
                  "u:s3cret@p.internal:3128", "http://u:s3cret?@p.internal:3128/x"):
        with pytest.raises(ValueError) as refused:
            ForwarderOptions.from_env({"ONETAG_FORWARD_PROXY": wrong})
        assert "s3cret" not in str(refused.value), wrong
        assert "[redacted]@p.internal" in str(refused.value), wrong
    assert "s3cret" not in repr(options)


def test_a_misspelt_forwarder_variable_is_named_not_ignored() -> None:
    """ONETAG_FORWARD_CONCURENCY=4 was ignored: the worker ran with the default."""
    with pytest.raises(ValueError) as caught:
        ForwarderOptions.from_env({"ONETAG_FORWARD_CONCURENCY": "4"})
    assert str(caught.value).startswith("ONETAG_FORWARD_CONCURENCY is not a forwarder setting "
                                        "(did you mean ONETAG_FORWARD_CONCURRENCY?")


def test_a_bad_forwarder_variable_is_one_line_from_every_command_that_reads_it(
        tmp_path, migrated) -> None:
    for env, command in (({"ONETAG_FORWARD_CONCURRENCY": "0"}, ["worker"]),
                         ({"ONETAG_FORWARD_CONCURRENCY": "-3"}, ["worker"]),
                         ({"ONETAG_FORWARD_MAX_ATTEMPTS": "abc"}, ["deliveries", "--state",
                                                                  "pending"]),
                         ({"ONETAG_FORWARD_MAX_ATTEMPTS": "abc"}, ["deliveries", "--id", "1"]),
                         ({"ONETAG_FORWARD_MAX_ATTEMPTS": "abc"}, ["replay", "--id", "1"])):
        result = onetag(*command, "--config", str(migrated), cwd=tmp_path, env=env, timeout=30)
        name = next(iter(env))
        one_line_error(result, f"onetag: {name}=", "at least 1")
    # serve with forward = true reads them too, and refuses before it binds.
    config = config_at(tmp_path / "fw.toml")
    config.write_text(config.read_text().replace("forward = false", "forward = true"))
    result = onetag("serve", "--config", str(config), "--port", "8751", cwd=tmp_path,
                    env={"ONETAG_FORWARD_MAX_ATTEMPTS": "0"}, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("onetag: ONETAG_FORWARD_MAX_ATTEMPTS")


# 9. Tracebacks for input a user easily gives ----------------------------------------------


def test_init_where_it_cannot_write_is_one_line(tmp_path) -> None:
    one_line_error(onetag("init", "nodir/x.toml", cwd=tmp_path), "cannot write nodir/x.toml")
    (tmp_path / "d").mkdir()
    one_line_error(onetag("init", "--force", "d", cwd=tmp_path), "cannot write d")


def test_a_config_that_is_not_utf8_is_one_problem(tmp_path) -> None:
    (tmp_path / "latin.toml").write_bytes(b'[[sites]]\nid = "\xff"\n')
    result = onetag("check", "--config", "latin.toml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "latin.toml: is not UTF-8 text" in result.stderr


@pytest.mark.parametrize("database", ["/proc/x.db", "{tmp}/adir"])
def test_migrate_on_a_path_it_cannot_open_is_one_line(tmp_path, database) -> None:
    (tmp_path / "adir").mkdir()
    database = database.format(tmp=tmp_path)
    config = config_at(tmp_path / "onetag.toml", database.lstrip("/"))
    config.write_text(config.read_text().replace("sqlite:///", "sqlite:////"))
    one_line_error(onetag("migrate", "--config", str(config), cwd=tmp_path),
                   f"cannot migrate {database}")


@pytest.mark.parametrize("command", [
    ["deliveries"], ["catalog"], ["coupons"], ["replay", "--dry-run"],
    ["export", "remarkety-orders", "--site", "shop1", "--out", "o.csv"]])
def test_a_file_that_is_not_a_database_is_one_line(tmp_path, command) -> None:
    config = config_at(tmp_path / "onetag.toml")
    (tmp_path / "t.db").write_text("not a database " * 100)
    one_line_error(onetag(*command, "--config", str(config), cwd=tmp_path),
                   f"cannot use the database {tmp_path / 't.db'}", "not a database")
    assert not (tmp_path / "o.csv").exists()  # no half-written export left behind


def test_numbers_out_of_range_are_one_line(tmp_path, migrated) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return onetag(*args, "--config", str(migrated), cwd=tmp_path)

    one_line_error(run("export", "remarkety-orders", "--site", "shop1", "--out",
                       "/nonexistent/dir/x.csv"), "cannot write /nonexistent/dir/x.csv")
    one_line_error(run("deliveries", "--id", "99999999999999999999"), "--id")
    one_line_error(run("replay", "--id", "99999999999999999999"), "--id")
    # Not argparse's usage block: one line naming the option, the forms and the range.
    for option, value in (("--since", "99999999999w"), ("--until", "10000-01-01"),
                          ("--since", "9" * 400 + "s"), ("--until", "1969-12-31T00:00Z")):
        said = one_line_error(run("replay", option, value, "--dry-run"), option,
                              "30m, 2h, 3d or 1w ago", "ISO 8601", "1970 to 9999")
        assert "usage:" not in said
    one_line_error(run("replay", "--since", "soon", "--dry-run"), "--since", "'soon'",
                   "neither a relative time")
    one_line_error(run("serve", "--port", "99999"), "--port", "1 to 65535")
    assert not list(tmp_path.glob("*.csv"))


# 10. No "Unknown child process" ------------------------------------------------------------


def test_read_only_commands_leave_stderr_clean(tmp_path, migrated) -> None:
    """Closing the store, the writer's end of output came before asyncio's child watcher had
    reaped it; killing it then (Popen.send_signal polls) reaped it first, and the watcher
    printed ``Unknown child process pid N, will report returncode 255`` (4 runs in 10).
    Four at a time: the race is likelier on a busy machine. With the writer process asked
    for: a one-shot command's writer is a thread by default (tests/test_cli_startup.py),
    and the race is the short-lived writer process's (a worker's, a backfill's)."""
    command = [sys.executable, "-m", "server", "deliveries", "--config", str(migrated)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ONETAG_WRITER": "process"}
    for _ in range(4):
        runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for run in runs:
            _, err = run.communicate(timeout=60)
            assert run.returncode == 0 and err == "", err


# 11. Limits and names --------------------------------------------------------------------


def test_limits_and_unknown_sites_are_refused_like_their_neighbours(tmp_path, migrated) -> None:
    for limit in ("0", "-1"):
        one_line_error(onetag("deliveries", "--config", str(migrated), "--state", "dead",
                              "--limit", limit, cwd=tmp_path), "--limit must be at least 1")
        one_line_error(onetag("coupons", "--config", str(migrated), "--limit", limit,
                              cwd=tmp_path), "--limit must be at least 1")
    for command in (["replay", "--dry-run"], ["catalog"], ["coupons"]):
        one_line_error(onetag(*command, "--site", "nosuch", "--config", str(migrated),
                              cwd=tmp_path), "no site 'nosuch' in the config (sites: shop1)")


def test_an_unknown_vendor_is_refused_and_a_closed_pipe_is_quiet(tmp_path) -> None:
    """``--vendor rejoinr`` matched nothing and said "0 deliveries" (``--site`` is refused
    the same way); ``onetag ... | head`` ended in a BrokenPipeError traceback."""
    config = config_at(tmp_path / "onetag.toml")
    for command in ("deliveries", "replay"):
        run = onetag(command, "--config", str(config), "--vendor", "rejoinr", cwd=tmp_path)
        assert run.returncode == 2 and "invalid choice: 'rejoinr'" in run.stderr, run.stderr
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is written
    with os.fdopen(writer, "wb") as stdout:
        run = subprocess.run([sys.executable, "-m", "server", "check", "--config", str(config)],
                             cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "Traceback" not in run.stderr.decode(), run.stderr.decode()
