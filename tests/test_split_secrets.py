"""Secrets split by process, as docs/postgresql.md ("What each process needs") describes: the nodes that face
the internet hold the sites' keys but not the vendors' secrets (with ``forward = false``
they never send), and the workers hold the vendors' secrets but not the sites' keys.

Real processes on one SQLite file (the rule is the config's, the same on PostgreSQL): a node
started with only the site's variables takes a backend order; a worker started with only
the vendor's variable sends it, with the vendor's credentials on the wire.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from fakes.harness import (API_KEY, FORWARD_ENV, REPO, SECRETS, SITE, free_port, purchase,
                           server_process, settings_data, until, write_config)
from fakes.vendor_server import FakeVendors
from server import config

SITE_ENV = {"SPLIT_SITE_API_KEY": API_KEY, "SPLIT_ADMIN_TOKEN": "admin-token-for-the-console",
            "SPLIT_RJ_SITE": "RJSITE1"}
VENDOR_ENV = {"SPLIT_REJOINER_API_KEY": SECRETS["rejoiner"], "SPLIT_RJ_SITE": "RJSITE1"}


def split_config(tmp_path, fake, forward: bool = False):
    data = settings_data(tmp_path, fake, only=("rejoiner",), forward=forward)
    data["server"]["admin_token"] = "env:SPLIT_ADMIN_TOKEN"
    data["sites"][0]["api_key"] = "env:SPLIT_SITE_API_KEY"
    data["sites"][0]["rejoiner"]["api_key"] = "env:SPLIT_REJOINER_API_KEY"
    data["sites"][0]["rejoiner"]["site_id"] = "env:SPLIT_RJ_SITE"
    return write_config(tmp_path / "onetag.toml", data)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLIT_")}
    return {**env, "PYTHONPATH": str(REPO), **FORWARD_ENV, **extra}


def test_each_process_requires_only_the_secrets_it_reads(tmp_path) -> None:
    with FakeVendors() as fake:
        path = split_config(tmp_path, fake)
    node = config.load(path, env=SITE_ENV, require_secrets=config.NODE_SECRETS)
    assert node.sites[SITE].api_key == API_KEY and "rejoiner" in node.sites[SITE].vendors
    assert node.unset == ("sites[shop1].rejoiner.api_key",)
    worker = config.load(path, env=VENDOR_ENV, require_secrets=config.SENDER_SECRETS)
    assert worker.sites[SITE].vendors["rejoiner"]["api_key"] == SECRETS["rejoiner"]
    assert worker.sites[SITE].order_source == node.sites[SITE].order_source == "backend"
    # A vendor's public settings are read by both (the script, the product sync).
    for needs in (config.NODE_SECRETS, config.SENDER_SECRETS):
        without_site_id = {k: v for k, v in {**SITE_ENV, **VENDOR_ENV}.items()
                           if k != "SPLIT_RJ_SITE"}
        with pytest.raises(config.ConfigError) as caught:
            config.load(path, env=without_site_id, require_secrets=needs)
        assert [p.where for p in caught.value.problems] == [
            f"{path}: sites[shop1].rejoiner.site_id"]
    # Each still refuses what it reads and lacks; `check` wants everything.
    for env, needs in ((VENDOR_ENV, config.NODE_SECRETS), (SITE_ENV, config.SENDER_SECRETS),
                       (SITE_ENV, True)):
        try:
            config.load(path, env=env, require_secrets=needs)
        except config.ConfigError as exc:
            assert all("is not set" in p.message for p in exc.problems)
        else:
            raise AssertionError(f"loaded with {sorted(env)} for {needs}")


async def test_a_node_without_vendor_secrets_and_a_worker_without_site_keys(tmp_path) -> None:
    with FakeVendors() as fake:
        path = split_config(tmp_path, fake)
        port = free_port()
        with server_process(path, port, clean_env(SITE_ENV), log=tmp_path / "node.log"):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                answer = await client.post(f"/api/v1/sites/{SITE}/events", json=purchase("S-1"),
                                           headers={"Authorization": f"Bearer {API_KEY}"})
                assert answer.status_code == 202, answer.text
        worker = subprocess.Popen(
            [sys.executable, "-m", "server", "worker", "--config", str(path), "--log-level",
             "warning"], cwd=tmp_path, env=clean_env(VENDOR_ENV),
            stdout=open(tmp_path / "worker.log", "ab"), stderr=subprocess.STDOUT)
        try:
            await until(lambda: fake.delivered("rejoiner"), timeout=30,
                        what="the worker sends the order",
                        describe=lambda: (tmp_path / "worker.log").read_text()[-2000:])
        finally:
            worker.send_signal(signal.SIGINT)
            worker.wait(30)
        sent = fake.delivered("rejoiner")
        assert [r.path for r in sent] == ["/rejoiner/RJSITE1/customer/convert/"]
        assert sent[0].headers["authorization"] == f"Rejoiner {SECRETS['rejoiner']}"
        # Forwarding on, the node sends too: then it needs the vendor's secret.
        split_config(tmp_path, fake, forward=True)
        refused = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--config", str(path), "--port",
             str(free_port())], cwd=tmp_path, env=clean_env(SITE_ENV), capture_output=True,
            text=True, timeout=60)
        assert refused.returncode == 2
        assert "rejoiner.api_key: environment variable SPLIT_REJOINER_API_KEY is not set" \
            in refused.stderr


def test_check_for_a_process_checks_only_what_that_process_needs(tmp_path) -> None:
    """``onetag check --for worker`` on a worker's machine, ``--for serve`` on a node's: each
    passes with that process's variables and names what it lacks; ``--for all`` (the
    default) still wants every variable. The rules are serve's and worker's own."""
    def check(env: dict[str, str], *process: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server", "check", "--config",
                               str(path), *process], cwd=tmp_path, env=clean_env(env),
                              capture_output=True, text=True, timeout=60)

    with FakeVendors() as fake:
        path = split_config(tmp_path, fake)
        assert check(VENDOR_ENV, "--for", "worker").returncode == 0
        done = check(SITE_ENV, "--for", "serve")
        assert done.returncode == 0, done.stderr
        assert "valid for `onetag serve`" in done.stdout
        for env, process, lacking in ((SITE_ENV, "worker", "SPLIT_REJOINER_API_KEY"),
                                      (VENDOR_ENV, "serve", "SPLIT_SITE_API_KEY"),
                                      (SITE_ENV, "all", "SPLIT_REJOINER_API_KEY")):
            done = check(env, "--for", process)
            assert done.returncode == 2 and f"{lacking} is not set" in done.stderr, (process,
                                                                                   done.stderr)
        done = check(SITE_ENV)  # the default: all
        assert done.returncode == 2 and "SPLIT_REJOINER_API_KEY is not set" in done.stderr
        # serve needs the console's admin_token; a worker never reads it.
        no_admin = {k: v for k, v in {**SITE_ENV, **VENDOR_ENV}.items()
                    if k != "SPLIT_ADMIN_TOKEN"}
        done = check(no_admin, "--for", "serve")
        assert done.returncode == 2 and "SPLIT_ADMIN_TOKEN is not set" in done.stderr
        assert check(no_admin, "--for", "worker").returncode == 0
        # With forward = true a node sends, so serve needs the vendors' secrets too.
        split_config(tmp_path, fake, forward=True)
        done = check(SITE_ENV, "--for", "serve")
        assert done.returncode == 2 and "SPLIT_REJOINER_API_KEY is not set" in done.stderr
