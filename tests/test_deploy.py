"""The deployment examples in deploy/ (docs/deploy.md), kept true without the internet.

Every ``onetag ...`` command line in them parses with the real CLI parser and names only
options that exist; every config key they name exists in server/config.py, and their config
and env files load as each process loads them; the units pass ``systemd-analyze verify``,
nginx's site ``nginx -t`` and Caddy's ``caddy validate`` where those are installed (Debian's
``systemd``, ``nginx-light`` / ``nginx`` and ``caddy`` packages); the Dockerfile is read as text (building it needs the internet). Two slow
tests run the nginx site and the Caddyfile for real, in front of ``onetag serve`` on loopback.
"""

from __future__ import annotations

import argparse

import contextlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server import config as config_module
from server.cli import build_parser, times_attached
from server.forward_options import ForwarderOptions
from server.ingest import MAX_BODY_BYTES

from test_cli import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
GUIDE = REPO / "docs" / "deploy.md"
CONFIG = DEPLOY / "onetag.toml"
NGINX_SITE = DEPLOY / "nginx" / "onetag.conf"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SERVE_ENV = DEPLOY / "systemd" / "serve.env.example"
WORKER_ENV = DEPLOY / "systemd" / "worker.env.example"
CERT_LINES = ("/etc/letsencrypt/live/data.shop.example/fullchain.pem",
              "/etc/letsencrypt/live/data.shop.example/privkey.pem")


def example_files() -> list[Path]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert files, "deploy/ is empty"
    return [*files, GUIDE]


def parser_of(command: str):
    commands = build_parser()._subparsers._group_actions[0]  # the real parser's subcommands
    return commands.choices[command]


COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)
COMMAND_RE = re.compile(r"(?:^|(?<=[\s/\"'`]))onetag\s+(" + "|".join(COMMANDS) + r")\b(.*)$")


def command_lines(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``onetag COMMAND ...`` in the file: in backticks (prose), on a line of its own or
    after other words (``ExecStart=/opt/onetag/bin/onetag serve ...``, ``docker exec onetag
    onetag deliveries``), and the Dockerfile's exec-form CMD."""
    found: list[tuple[str, list[str]]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.relative_to(REPO)}:{number}"
        if line.lstrip().startswith(("CMD [", "ENTRYPOINT [")):
            words = json.loads(line.split(None, 1)[1])
            if words[0] == "onetag":
                found.append((where, words[1:]))
            continue
        text = line.lstrip().lstrip("#").strip()
        spans = re.findall(r"`([^`]*)`", text)
        bare = re.sub(r"`[^`]*`", " ", text)
        for piece in [*spans, bare]:
            match = COMMAND_RE.search(piece.strip())
            if match is None:
                continue
            rest = re.split(r"\s(?:&&|\||;|#)\s?", match.group(2))[0].rstrip(" \\")
            if rest.count("'") % 2:  # the end of the quote it is in (sh -c '... exec onetag ...')
                rest = rest.removesuffix("'")
            found.append((where, [match.group(1), *shlex.split(rest)]))
    return found


def all_command_lines() -> list[tuple[str, list[str]]]:
    return [found for path in example_files() for found in command_lines(path)]


def test_the_examples_name_the_commands_they_run() -> None:
    named = {words[0] for _, words in all_command_lines()}
    assert {"serve", "worker", "migrate", "check"} <= named, named


@pytest.mark.parametrize("where,words", all_command_lines(),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_every_command_line_parses_with_the_real_parser(where: str, words: list[str]) -> None:
    try:
        build_parser().parse_args(times_attached(words))
    except SystemExit as exc:  # argparse's usage error
        pytest.fail(f"{where}: onetag {' '.join(words)}: does not parse ({exc})")
    # Exactly an option of that command (argparse would take an abbreviation too); of its
    # action's, for a command that has actions (`person forget`).
    parser = parser_of(words[0])
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if actions and len(words) > 1 and words[1] in actions[0].choices:
        parser = actions[0].choices[words[1]]
    options = parser._option_string_actions
    for word in words[1:]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in options, f"{where}: no option {word}"


def test_the_units_run_serve_and_worker_on_the_config_they_name() -> None:
    serve = (DEPLOY / "systemd" / "onetag.service").read_text(encoding="utf-8")
    worker = (DEPLOY / "systemd" / "onetag-worker.service").read_text(encoding="utf-8")
    for unit, command in ((serve, "serve"), (worker, "worker")):
        [start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
        assert f"/opt/onetag/bin/onetag {command} --config /etc/onetag/onetag.toml" in start
        assert "Environment=ONETAG_CONFIG=/etc/onetag/onetag.toml" in unit.splitlines()
        assert re.search(r"^User=onetag$", unit, re.M) and "StateDirectory=onetag" in unit
    assert "--host 127.0.0.1 --port 8000" in serve  # what the proxies' upstream names
    # pip installs no README or docs/ into the venv: a Documentation= file there is missing.
    assert not re.search(r"^Documentation=file:", serve + worker, re.M)
    assert "EnvironmentFile=/etc/onetag/serve.env" in serve
    assert "EnvironmentFile=/etc/onetag/worker.env" in worker
    # The process is gone within shutdown_grace_s; systemd waits longer before SIGKILL.
    grace = config_module.ServerConfig().shutdown_grace_s
    for unit in (serve, worker):
        assert int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1)) > grace


def test_the_units_pass_systemd_analyze_verify(tmp_path) -> None:
    """systemd's own reading of the units: no unknown key, no bad value (the executable is
    a stand-in: /opt/onetag is not installed here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package): the "
                    "units in deploy/systemd/ are not checked by systemd here")
    stand_in = tmp_path / "onetag"
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text(encoding="utf-8")
        assert "/opt/onetag/bin/onetag " in text, unit
        units.append(tmp_path / unit.name)
        units[-1].write_text(text.replace("/opt/onetag/bin/onetag ", f"{stand_in} "),
                             encoding="utf-8")
    done = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


# Config keys ---------------------------------------------------------------------------------


def named_keys(text: str) -> list[tuple[str, str]]:
    """``[server] key`` and ``[[sites]] key`` as the prose and comments name them."""
    return re.findall(r"(\[server\]|\[\[sites\]\])\s+`?([a-z_]+)", text)


def commented_server_tables(text: str) -> list[str]:
    """The TOML the comments show (``#   [server]`` and the ``#   key = value`` lines below)."""
    tables, current = [], None
    for line in text.splitlines():
        match = re.match(r"^#\s{2,}(.*)$", line)
        body = match.group(1).split("#")[0].rstrip() if match else None
        if body == "[server]":
            current = []
            tables.append(current)
        elif current is not None and body and re.match(r"^[a-z_]+\s*=", body):
            current.append(body)
        else:
            current = None
    return ["\n".join(lines) for lines in tables]


def test_every_config_key_the_examples_name_exists() -> None:
    seen = 0
    for path in example_files():
        text = path.read_text(encoding="utf-8")
        for table, key in named_keys(text):
            known = config_module.SERVER_KEYS if table == "[server]" else config_module.SITE_KEYS
            assert key in known, f"{path.relative_to(REPO)}: {table} {key} is no config key"
            seen += 1
        for snippet in commented_server_tables(text):
            # What the proxies' comments tell you to set is a valid [server] table.
            config_module.parse({"server": tomllib.loads(snippet), "sites": [{"id": "s"}]},
                                file=str(path))
            seen += 1
    assert seen >= 5


def test_the_config_examples_commented_keys_exist() -> None:
    server = CONFIG.read_text(encoding="utf-8").split("[[sites]]")[0]
    commented = re.findall(r"^#\s*([a-z_]+)\s*=", server, re.M)
    assert commented and set(commented) <= config_module.SERVER_KEYS, commented


def env_names(path: Path) -> list[str]:
    return re.findall(r"^([A-Z0-9_]+)=", path.read_text(encoding="utf-8"), re.M)


def check(process: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if k != "ONETAG_CONFIG" and not re.match(r"(ONETAG|SHOP1)_", k)}
    return subprocess.run([sys.executable, "-m", "server", "check", "--for", process,
                           "--config", str(CONFIG)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60,
                          env={**environ, "PYTHONPATH": str(REPO), **env})


def secret(name: str) -> str:
    return f"{name.lower()}-0123456789abcdef"


def test_each_env_file_is_what_its_process_reads(tmp_path) -> None:
    """serve.env and worker.env hold exactly the env: variables `onetag serve` (forward =
    false) and `onetag worker` read from deploy/onetag.toml: with only them set, `onetag check
    --for` that process passes; without any one of them, it fails naming it."""
    for process, path in (("serve", SERVE_ENV), ("worker", WORKER_ENV)):
        names = env_names(path)
        assert names, path
        env = {name: secret(name) for name in names}
        done = check(process, env, tmp_path)
        assert done.returncode == 0, (process, done.stderr)
        assert f"is valid for `onetag {process}`" in done.stdout
        for name in names:
            missing = check(process, {k: v for k, v in env.items() if k != name}, tmp_path)
            assert missing.returncode != 0 and name in missing.stderr, (process, name)
    # The two files together are every secret the config names (forward = true wants both).
    both = {name: secret(name) for name in env_names(SERVE_ENV) + env_names(WORKER_ENV)}
    assert check("all", both, tmp_path).returncode == 0
    assert set(env_names(SERVE_ENV)).isdisjoint(env_names(WORKER_ENV))


def test_the_forwarder_variables_the_examples_name_exist() -> None:
    known = {f"ONETAG_FORWARD_{name.upper()}" for name in ForwarderOptions.__dataclass_fields__}
    for path in example_files():
        for name in re.findall(r"ONETAG_FORWARD_[A-Z0-9_]+", path.read_text(encoding="utf-8")):
            assert name in known, f"{path.relative_to(REPO)}: {name} is no forwarder setting"


# The proxies ---------------------------------------------------------------------------------


def test_the_proxies_limits_are_onetags() -> None:
    """The body size, the header and body deadlines are the server's own; the proxies let an
    idle upstream connection go before onetag closes it (uvicorn's keep-alive, 5 s)."""
    nginx = NGINX_SITE.read_text(encoding="utf-8")
    caddy = CADDYFILE.read_text(encoding="utf-8")
    defaults = config_module.ServerConfig()
    assert MAX_BODY_BYTES == 1024 * 1024
    assert re.search(r"^\s*client_max_body_size 1m;", nginx, re.M)  # nginx's m is MiB
    assert re.search(r"^\s*max_size 1MiB$", caddy, re.M)
    assert f"client_header_timeout {defaults.header_timeout_s:g}s;" in nginx
    assert f"client_body_timeout {defaults.body_timeout_s:g}s;" in nginx
    assert f"read_header {defaults.header_timeout_s:g}s" in caddy
    assert f"read_body {defaults.body_timeout_s:g}s" in caddy
    uvicorn_keep_alive = 5
    nginx_idle = int(re.search(r"keepalive_timeout (\d+)s;\n\}", nginx).group(1))
    caddy_idle = int(re.search(r"keepalive (\d+)s", caddy).group(1))
    assert nginx_idle < uvicorn_keep_alive and caddy_idle < uvicorn_keep_alive
    # Appending the address nginx was reached from, never passing the client's own header on.
    assert "X-Forwarded-For $proxy_add_x_forwarded_for;" in nginx
    assert not re.search(r"^\s*proxy_set_header\s+X-Forwarded-For\s+\$http_", nginx, re.M)
    # The upstream is where the serve unit listens, and the event path is onetag's.
    assert "server 127.0.0.1:8000;" in nginx and "reverse_proxy 127.0.0.1:8000" in caddy
    assert f"location = {defaults.event_path} {{" in nginx
    assert f"location {defaults.script_path.split('{')[0]} {{" in nginx


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light): "
                    "deploy/nginx/onetag.conf is not checked by nginx -t here")
    return found


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for nginx's ssl server")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=data.shop.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def nginx_prefix(tmp_path: Path, site: str) -> Path:
    """An nginx.conf of its own in tmp_path, including ``site`` in its http block as
    Debian's includes sites-enabled/*."""
    cert, key = self_signed(tmp_path)
    for line in CERT_LINES:
        assert line in site, f"deploy/nginx/onetag.conf no longer names {line}"
    site = site.replace(CERT_LINES[0], str(cert)).replace(CERT_LINES[1], str(key))
    (tmp_path / "site.conf").write_text(site, encoding="utf-8")
    temp = "\n".join(f"    {kind}_temp_path {tmp_path / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers that can write tmp_path
    (tmp_path / "nginx.conf").write_text(
        f"{user}pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'} info;\n"
        f"events {{}}\nhttp {{\n    access_log {tmp_path / 'access.log'};\n{temp}\n"
        f"    include {tmp_path / 'site.conf'};\n}}\n", encoding="utf-8")
    return tmp_path / "nginx.conf"


def test_the_nginx_site_passes_nginx_t(tmp_path) -> None:
    nginx = nginx_binary()
    conf = nginx_prefix(tmp_path, NGINX_SITE.read_text(encoding="utf-8"))
    done = subprocess.run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


ACME_RE = re.compile(r"cat > (/etc/nginx/sites-enabled/onetag-acme\.conf) <<'EOF'\n(.*?)\n\s*EOF\n", re.S)


def test_the_guides_server_for_the_first_certificate_passes_nginx_t(tmp_path) -> None:
    """docs/deploy.md's port-80 server for certbot's first certificate serves the webroot
    the site's own port-80 server serves (so renewals find it there)."""
    nginx = nginx_binary()
    [(path, server)] = ACME_RE.findall(GUIDE.read_text(encoding="utf-8"))
    site = NGINX_SITE.read_text(encoding="utf-8")
    [webroot] = re.findall(r"certbot certonly --webroot -w (\S+)", GUIDE.read_text("utf-8"))
    assert f"location /.well-known/acme-challenge/ {{ root {webroot}; }}" in server
    assert re.search(r"location /\.well-known/acme-challenge/ \{\s*root " + re.escape(webroot)
                     + ";", site)
    (tmp_path / "site.conf").write_text(server, encoding="utf-8")
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'} info;\n"
        f"events {{}}\nhttp {{\n    include {tmp_path / 'site.conf'};\n}}\n", encoding="utf-8")
    done = subprocess.run([nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c",
                           str(tmp_path / "nginx.conf")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_caddyfile_passes_caddy_validate(tmp_path) -> None:
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy is not installed (Debian: apt-get install caddy): "
                    "deploy/caddy/Caddyfile is not checked by caddy validate here")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(tmp_path)}
    done = subprocess.run([caddy, "validate", "--config", str(CADDYFILE), "--adapter",
                           "caddyfile"], capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Valid configuration" in done.stdout + done.stderr
    assert "not formatted" not in done.stderr  # caddy fmt's layout


# The Dockerfile ------------------------------------------------------------------------------


def dockerfile() -> list[str]:
    """Its instructions, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def instruction(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile() if line.split()[0] == name]


def test_the_dockerfile_installs_the_checkout_plainly_and_runs_as_a_user() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    [install] = [run for run in instruction("RUN") if "pip install" in run]
    words = shlex.split(install.split("&&")[0])
    assert words[:2] == ["pip", "install"], words
    assert not {"-e", "--editable"} & set(words), "an editable install needs the source kept"
    assert re.fullmatch(r"\.(\[[a-z,]+\])?", words[-1]), words  # the checkout, maybe an extra
    extras = re.findall(r"\[([a-z,]+)\]", words[-1])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    for extra in ",".join(extras).split(",") if extras else []:
        assert extra in pyproject["project"]["optional-dependencies"], extra
    # What the build reads is copied: the package dirs pyproject names, and its readme.
    copied = {word.rstrip("/") for copy in instruction("COPY")
              for word in shlex.split(copy)[:-1]}
    sources = {"pyproject.toml", pyproject["project"]["readme"], "server",
               *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert copied == sources, copied
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    assert {line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")} \
        == sources
    # Not root; the user's home is the volume the config's SQLite file is in.
    [user] = instruction("USER")
    assert user not in ("root", "0")
    assert any("useradd" in run and user in run for run in instruction("RUN"))
    database = tomllib.loads(CONFIG.read_text(encoding="utf-8"))["server"]["database"]
    assert instruction("VOLUME") == [str(Path(config_module.sqlite_path(database)).parent)]
    assert instruction("ENV")[-1] == "ONETAG_CONFIG=/etc/onetag/onetag.toml"


def test_the_dockerfile_serves_on_its_port_and_checks_healthz() -> None:
    [cmd] = instruction("CMD")
    words = json.loads(cmd)
    args = build_parser().parse_args(words[1:])
    assert (words[0], args.command, args.host) == ("onetag", "serve", "0.0.0.0")
    assert instruction("EXPOSE") == [str(args.port)]
    [health] = instruction("HEALTHCHECK")
    check_words = json.loads(health.split("CMD", 1)[1])
    assert check_words[:2] == ["python", "-c"]
    compile(check_words[2], "HEALTHCHECK", "exec")  # valid Python
    assert f"http://127.0.0.1:{args.port}/healthz" in check_words[2]


@pytest.mark.slow
def test_the_dockerfiles_copied_files_build_the_wheel(tmp_path) -> None:
    """The build context the Dockerfile copies is enough to build onetag (no docker here:
    the same files, built as its ``pip install .`` builds them)."""
    context = tmp_path / "src"
    for copy in instruction("COPY"):
        for word in shlex.split(copy)[:-1]:
            source = REPO / word
            if source.is_dir():
                shutil.copytree(source, context / word,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                context.mkdir(exist_ok=True)
                shutil.copy(source, context / word)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "wheels"), str(context)], check=True, cwd=tmp_path,
                   timeout=300)
    [wheel] = list((tmp_path / "wheels").glob("onetag-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert "server/_templates/onetag.js.j2" in names
    assert any(name.startswith("server/_static/admin/") for name in names)
    assert any(name.startswith("server/store/migrations/") for name in names)


# The proxies for real --------------------------------------------------------------------------


@contextlib.contextmanager
def example_serve(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`onetag serve` on 127.0.0.1 with deploy/onetag.toml (its database in tmp_path) and
    serve.env's variables, as onetag.service runs it; yields its port and its log's path."""
    port = free_port()
    database = tmp_path / "onetag.db"
    config_text = CONFIG.read_text(encoding="utf-8").replace(
        "sqlite:////var/lib/onetag/onetag.db", f"sqlite:///{database}")
    assert str(database) in config_text
    config_path = tmp_path / "onetag.toml"
    config_path.write_text(config_text, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items()
               if k != "ONETAG_CONFIG" and not re.match(r"(ONETAG|SHOP1)_", k)}
    env = {**environ, "PYTHONPATH": str(REPO),
           **{name: secret(name) for name in env_names(SERVE_ENV)}}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--config",
                                   str(config_path), "--host", "127.0.0.1", "--port",
                                   str(port)], cwd=tmp_path, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server)
            yield port, log_path
        finally:
            server.terminate()
            server.wait(timeout=30)


def wait_for_proxy(client: httpx.Client, url: str, proxy: subprocess.Popen) -> httpx.Response:
    deadline = time.monotonic() + 20
    while True:
        try:
            return client.get(url)
        except httpx.TransportError:
            assert proxy.poll() is None, proxy.communicate()[1]
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.05)


EVENT = json.dumps({"site_id": "shop1", "events": [
    {"event_id": "through-the-proxy", "event": "page_view",
     "page": {"location": "https://shop.example/"}}]})
BEACON = {"content-type": "text/plain", "origin": "https://shop.example"}


def post_event_claiming_another_address(client: httpx.Client, base: str) -> None:
    """A beacon whose client claims 203.0.113.9 in its own X-Forwarded-For: acknowledged."""
    stored = client.post(f"{base}/e", content=EVENT, headers={
        **BEACON, "x-forwarded-for": "203.0.113.9", "x-request-id": "from-the-test-1"})
    assert stored.status_code == 204, stored.text
    assert stored.headers["x-request-id"] == "from-the-test-1"
    assert "sc=" in stored.headers.get("set-cookie", "")


def assert_recorded(tmp_path: Path, log_path: Path, client_address: str) -> None:
    """The event is stored once, and onetag's access log line for it (JSON) names the
    client's own address: not the proxy's, nor the one the client claimed."""
    with sqlite3.connect(tmp_path / "onetag.db") as db:
        assert db.execute("SELECT count(*) FROM events WHERE event_id = 'through-the-proxy'"
                          ).fetchone() == (1,)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()
             if line.startswith("{")]
    [access] = [line for line in lines if line.get("path") == "/e" and line.get("method") ==
                "POST" and line.get("request_id") == "from-the-test-1"]
    assert access["status"] == 204, access
    assert access["client"].rsplit(":", 1)[0] == client_address, access


@pytest.mark.slow
def test_nginx_in_front_of_serve_passes_events_and_the_clients_address(tmp_path) -> None:
    """The example site in front of a real `onetag serve` run with the example config: nginx
    on 127.0.0.2 (https, a self-signed certificate), the client connecting from 127.0.0.3,
    onetag on 127.0.0.1 trusting 127.0.0.1. A POST /e through it is acknowledged and stored,
    and the address onetag records is the client's."""
    nginx = nginx_binary()
    http_port, https_port = free_port(), free_port()
    with example_serve(tmp_path) as (serve_port, log_path):
        site = NGINX_SITE.read_text(encoding="utf-8")
        for old, new in (("server 127.0.0.1:8000;", f"server 127.0.0.1:{serve_port};"),
                         ("    listen 80;\n", f"    listen 127.0.0.2:{http_port};\n"),
                         ("    listen 443 ssl http2;\n",
                          f"    listen 127.0.0.2:{https_port} ssl http2;\n")):
            assert old in site, old
            site = site.replace(old, new)
        site = re.sub(r"^\s*listen \[::\].*\n", "", site, flags=re.M)  # no IPv6 needed here
        webroot = tmp_path / "certbot"  # certbot's webroot, with a challenge file in it
        (webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
        (webroot / ".well-known" / "acme-challenge" / "tok3n").write_text("tok3n.thumbprint")
        assert "root /var/www/certbot;" in site
        site = site.replace("root /var/www/certbot;", f"root {webroot};")
        conf = nginx_prefix(tmp_path, site)
        proxy = subprocess.Popen([nginx, "-e", str(tmp_path / "error.log"), "-p",
                                  str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            base = f"https://127.0.0.2:{https_port}"
            transport = httpx.HTTPTransport(local_address="127.0.0.3", verify=False)
            with httpx.Client(transport=transport, timeout=10,
                              headers={"host": "data.shop.example"}) as client:
                health = wait_for_proxy(client, f"{base}/healthz", proxy)
                assert health.status_code == 200, health.text
                plain = client.get(f"http://127.0.0.2:{http_port}/e")
                assert plain.status_code == 301
                assert plain.headers["location"] == "https://data.shop.example/e"
                challenge = client.get(
                    f"http://127.0.0.2:{http_port}/.well-known/acme-challenge/tok3n")
                assert (challenge.status_code, challenge.text) == (200, "tok3n.thumbprint")
                script = client.get(f"{base}/s/shop1.js", headers={"accept-encoding": "br"})
                assert script.status_code == 200 and script.headers["content-encoding"] == "br"

                post_event_claiming_another_address(client, base)
                # Without one of its own, the request id is nginx's ($request_id: 32 hex).
                again = client.post(f"{base}/e", headers=BEACON,
                                    content=EVENT.replace("through-the-proxy", "again"))
                assert again.status_code == 204, again.text
                assert re.fullmatch(r"[0-9a-f]{32}", again.headers["x-request-id"])
                # nginx's own bound, as onetag's: a body over 1 MiB never reaches it.
                too_big = client.post(f"{base}/e", content=b"x" * (MAX_BODY_BYTES + 1),
                                      headers=BEACON)
                assert too_big.status_code == 413
                assert client.get(f"{base}/e").status_code == 403  # POST only
        finally:
            proxy.terminate()
            proxy.wait(timeout=20)
    assert_recorded(tmp_path, log_path, "127.0.0.3")


@pytest.mark.slow
def test_caddy_in_front_of_serve_passes_events_and_the_clients_address(tmp_path) -> None:
    """The example Caddyfile as it is, but for the address (plain http on 127.0.0.2: no
    certificate can be had here) and Caddy's admin endpoint (off), in front of a real
    `onetag serve`: what the Caddyfile's comment says of X-Forwarded-For holds."""
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.skip("caddy is not installed (Debian: apt-get install caddy)")
    port = free_port()
    with example_serve(tmp_path) as (serve_port, log_path):
        text = CADDYFILE.read_text(encoding="utf-8")
        for old, new in (("\ndata.shop.example {\n",
                          f"\nhttp://data.shop.example:{port} {{\n\tbind 127.0.0.2\n"),
                         ("reverse_proxy 127.0.0.1:8000 {",
                          f"reverse_proxy 127.0.0.1:{serve_port} {{"),
                         ("{\n\tservers {", "{\n\tadmin off\n\tservers {")):
            assert old in text, old
            text = text.replace(old, new)
        (tmp_path / "Caddyfile").write_text(text, encoding="utf-8")
        env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
               "XDG_CONFIG_HOME": str(tmp_path)}
        proxy = subprocess.Popen([caddy, "run", "--config", str(tmp_path / "Caddyfile"),
                                  "--adapter", "caddyfile"], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.2:{port}"
            transport = httpx.HTTPTransport(local_address="127.0.0.3")
            with httpx.Client(transport=transport, timeout=10,
                              headers={"host": f"data.shop.example:{port}"}) as client:
                health = wait_for_proxy(client, f"{base}/healthz", proxy)
                assert health.status_code == 200, health.text
                post_event_claiming_another_address(client, base)
                # (No oversized body here: Caddy 2.6 passes it on by its Content-Length, and
                # onetag's early 413 races the client's upload, which may see a reset first.)
        finally:
            proxy.terminate()
            proxy.wait(timeout=20)
    assert_recorded(tmp_path, log_path, "127.0.0.3")
