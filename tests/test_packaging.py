"""What a user gets from a wheel: a plain (non-editable) install serves the demo.

``templates/`` and ``static/`` sit outside ``server/``; this proves pyproject packages them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import httpx

from test_cli import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_serves_the_demo(tmp_path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(REPO)], check=True, cwd=tmp_path, timeout=300)
    [wheel] = list(wheels.glob("onetag-*.whl"))
    env_dir = tmp_path / "venv"
    # A venv of its own, as a user's: the wheel brings its runtime dependencies from the
    # package index (nothing borrowed from this interpreter's site-packages).
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    str(wheel)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-I", "-c", "import server; print(server.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert str(env_dir) in where.stdout, where.stdout  # not the source tree

    port = free_port()
    process = subprocess.Popen([str(env_dir / "bin" / "onetag"), "serve", "--port", str(port)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process)
        assert "onetag" in httpx.get(f"{base}/demo/").text
        assert httpx.get(f"{base}/static/demo/demo.js").status_code == 200
        # The console's templates and assets come from the wheel too (off: no admin_token).
        assert "console is off" in httpx.get(f"{base}/admin/").text
        assert httpx.get(f"{base}/static/admin/admin.css").status_code == 200
        script = httpx.get(f"{base}/s/demo.js")
        assert script.status_code == 200 and "_rejoiner" in script.text
        # The store's writer process starts from the installed package too.
        stored = httpx.post(f"{base}/e", headers={"content-type": "text/plain", "origin": base},
                            content='{"site_id": "demo", "events": [{"event_id": "wheel-1", '
                                    '"event": "page_view"}]}')
        assert stored.status_code == 204, stored.text
    finally:
        process.terminate()
        process.communicate(timeout=20)


def readme_setup_commands() -> list[str]:
    """The indented command lines of README "Set up" (the section before "Quick start")."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1].split("## Quick start", 1)[0]
    return [line.strip() for line in setup.splitlines() if line.startswith("    ")]


def test_the_readme_has_two_setup_commands_each_in_a_venv() -> None:
    """A new user's two commands: install and serve, install and test. Debian 12's system
    Python refuses ``pip install`` outside a venv (externally-managed-environment), so each
    makes and activates one first; the test command runs what .ci/run runs."""
    venv_prefix = "python3 -m venv .venv && . .venv/bin/activate && "
    assert readme_setup_commands() == [
        venv_prefix + "pip install . && onetag serve",
        venv_prefix + "pip install -e '.[test]' && python -m pytest -n auto"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_setup_commands()[1].replace("pip install", "pip install -q") in ci


def test_the_readme_venv_prefix_runs_in_a_posix_shell(tmp_path) -> None:
    """The prefix as /bin/sh (dash on Debian) runs it: ``.`` sources the activation, so
    ``python`` and ``pip`` after it are the venv's."""
    prefix = readme_setup_commands()[0].split(" && pip install", 1)[0]
    done = subprocess.run(["/bin/sh", "-c", f"{prefix} && python -c 'import sys; "
                           f"print(sys.prefix)' && pip --version"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(tmp_path / ".venv"), done.stdout
    assert str(tmp_path / ".venv") in done.stdout.splitlines()[1]
