"""Two ``onetag serve`` nodes and two ``onetag worker`` processes on one PostgreSQL database,
traffic split across the nodes, one node and one worker killed with SIGKILL mid-run.

What must hold: every acknowledged event is stored once; every delivery is sent; a vendor
sees a request twice only for a row that was in flight in the killed worker (its lease was
taken over: the row has a second attempt), and both copies are the same body, so the same
natural key. Real processes, the fake vendor server over loopback, a database of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import httpx
from fakes.harness import (API_KEY, REPO, SITE, FORWARD_ENV, free_port, purchase, server_process,
                           settings_data, until, write_config)
from fakes.vendor_server import FakeVendors

ORDERS = 160
KILL_AT = 60  # acknowledged orders before node 0 and worker 0 are killed
LEASE_S = 5  # the survivor takes the killed worker's rows over after this


def start_worker(config_path, env, log):
    return subprocess.Popen(
        [sys.executable, "-m", "server", "worker", "--config", str(config_path),
         "--log-level", "warning"], cwd=config_path.parent, env=env,
        stdout=open(log, "ab"), stderr=subprocess.STDOUT)


async def test_two_nodes_two_workers_survive_a_kill_9_of_one_each(tmp_path, pg_database) -> None:
    url = pg_database
    with FakeVendors(delay=0.05) as fake:
        data = settings_data(tmp_path, fake, forward=False)
        data["server"]["database"] = url
        config_path = write_config(tmp_path / "onetag.toml", data)
        env = {**os.environ, "PYTHONPATH": str(REPO), **FORWARD_ENV,
               "ONETAG_FORWARD_LEASE_S": str(LEASE_S)}
        ports = [free_port(), free_port()]
        with server_process(config_path, ports[0], env, log=tmp_path / "node0.log") as node0, \
                server_process(config_path, ports[1], env, log=tmp_path / "node1.log"):
            workers = [start_worker(config_path, env, tmp_path / f"worker{n}.log")
                       for n in range(2)]
            try:
                acknowledged = await send_traffic(fake, ports, node0, workers[0])
                await check(url, fake, acknowledged, tmp_path)
            finally:
                for worker in workers:
                    if worker.poll() is None:
                        worker.send_signal(signal.SIGINT)
                for worker in workers:
                    try:
                        worker.wait(30)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.wait(5)


async def send_traffic(fake: FakeVendors, ports: list[int], node0: subprocess.Popen,
                       worker0: subprocess.Popen) -> set[str]:
    """Orders from 8 concurrent senders, spread over the live nodes; a sender whose request
    failed (the node died under it) sends the same event to the other node, as a load
    balancer's retry or the shop's own does. Returns the acknowledged event ids.

    Sendlane holds every request until the kill: both workers' Sendlane lanes fill (8 in
    flight each), so the killed worker certainly dies with rows in flight, which the other
    must take over when their lease ends (and send again: the vendor saw them once)."""
    fake.hang("sendlane", times=None)
    acknowledged: set[str] = set()
    alive = [True, True]
    queue = list(range(ORDERS))

    async def sender(client: httpx.AsyncClient, lane: int) -> None:
        turn = lane
        while queue:
            n = queue.pop(0)
            # The buyer's checkout sc: eSputnik requires one (cookies.sc).
            event = purchase(str(5000 + n), f"buyer{n % 97}@example.com", sc=f"BUYER-{n % 97:04d}")
            for _ in range(20):
                candidates = [i for i in (0, 1) if alive[i]]
                port = ports[candidates[turn % len(candidates)]]
                turn += 1
                try:
                    answer = await client.post(
                        f"http://127.0.0.1:{port}/api/v1/sites/{SITE}/events", json=[event],
                        headers={"Authorization": f"Bearer {API_KEY}"})
                except httpx.TransportError:
                    continue
                if answer.status_code == 202:
                    acknowledged.add(event["event_id"])
                    break
                await asyncio.sleep(0.1)  # 503: the store is busy; try again
            else:
                raise AssertionError(f"order {n} was never acknowledged")
            if len(acknowledged) >= KILL_AT and alive[0]:
                alive[0] = False
                await until(lambda: len(fake.requests("sendlane", answer="hung")) >= 16,
                            what="both workers' Sendlane lanes full", describe=fake.summary)
                node0.send_signal(signal.SIGKILL)
                worker0.send_signal(signal.SIGKILL)
                fake.release()

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(sender(client, lane) for lane in range(8)))
    assert node0.wait(10) == -signal.SIGKILL and worker0.wait(10) == -signal.SIGKILL
    return acknowledged


async def check(url: str, fake: FakeVendors, acknowledged: set[str], tmp_path) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        async def unsettled() -> int:
            return await conn.fetchval("SELECT count(*) FROM deliveries WHERE state = 'pending'")

        deadline = asyncio.get_running_loop().time() + 120
        while await unsettled():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"{await unsettled()} deliveries still pending after 120 s; worker 1 says: "
                    f"{(tmp_path / 'worker1.log').read_text()[-2000:]}")
            await asyncio.sleep(0.2)
        events = Counter(row["event_id"] for row in await conn.fetch("SELECT event_id FROM events"))
        rows = await conn.fetch(
            "SELECT id, vendor, visitor, state, attempts, request FROM deliveries ORDER BY id")
    finally:
        await conn.close()
    # Every acknowledged event stored, and stored once (a retry on the other node was a
    # duplicate by its event id); an unacknowledged one may be stored, once at most.
    assert acknowledged <= set(events)
    assert [key for key, count in events.items() if count > 1] == []
    assert len(acknowledged) == ORDERS
    # Every delivery planned was sent and recorded delivered.
    assert rows and Counter(row["state"] for row in rows) == {"delivered": len(rows)}
    delivered = Counter((r.vendor, json.dumps(r.json, sort_keys=True))
                        for r in fake.delivered())
    sent = Counter((r.vendor, json.dumps(r.json, sort_keys=True)) for r in fake.requests())
    taken_over = set()
    vendor_of = {row["id"]: row["vendor"] for row in rows}
    for row in rows:
        key = (row["vendor"], json.dumps(json.loads(row["request"])["json"], sort_keys=True))
        assert delivered[key] >= 1, f"delivery {row['id']} was never answered by {row['vendor']}"
        if sent[key] > 1:
            # Sent twice: only a row the killed worker held (a second claim after its lease).
            assert row["attempts"] >= 2, (row["id"], row["vendor"], sent[key])
            taken_over.add(row["id"])
        assert sent[key] <= row["attempts"]  # never more requests than claims
    assert len(sent) == len(rows)  # nothing the database does not know of
    # A visitor's rows reached each vendor in order, across workers: a row's last request
    # came before the next row's first (the next is claimed only after the outcome).
    first: dict[tuple, float] = {}
    last: dict[tuple, float] = {}
    for r in fake.requests():
        key = (r.vendor, json.dumps(r.json, sort_keys=True))
        first[key] = min(first.get(key, r.received), r.received)
        last[key] = max(last.get(key, r.received), r.received)
    by_visitor: dict[tuple, list] = {}
    for row in rows:
        key = (row["vendor"], json.dumps(json.loads(row["request"])["json"], sort_keys=True))
        by_visitor.setdefault((row["vendor"], row["visitor"]), []).append(key)
    for keys in by_visitor.values():  # rows in id order
        for earlier, later in zip(keys, keys[1:]):
            assert last[earlier] <= first[later], (earlier, later)
    # The killed worker's 8 held Sendlane rows were taken over and sent again.
    assert len([i for i in taken_over if vendor_of[i] == "sendlane"]) >= 8
