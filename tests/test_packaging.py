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
