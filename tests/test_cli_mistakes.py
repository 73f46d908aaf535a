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


# 10. No "Unknown child process" ------------------------------------------------------------


def test_read_only_commands_leave_stderr_clean(tmp_path, migrated) -> None:
    """Closing the store, the writer's end of output came before asyncio's child watcher had
    reaped it; killing it then (Popen.send_signal polls) reaped it first, and the watcher
    printed ``Unknown child process pid N, will report returncode 255`` (4 runs in 10).
    Four at a time: the race is likelier on a busy machine."""
    command = [sys.executable, "-m", "server", "deliveries", "--config", str(migrated)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(4):
        runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for run in runs:
            _, err = run.communicate(timeout=60)
            assert run.returncode == 0 and err == "", err
