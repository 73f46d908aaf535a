"""A TCP proxy that delays every chunk it passes on: a database on another machine, for the
PostgreSQL benches on this one.

    python bench/latency_proxy.py --listen 5433 --to 127.0.0.1:5432 --delay-ms 0.25 &
    python bench/pg_writer.py --dsn postgresql://postgres@127.0.0.1:5433/postgres

Each chunk read from either side is written to the other ``--delay-ms`` later (in order),
so a round trip costs twice that on top of loopback's: 0.25 ms is a database a switch away
(a round trip of about 0.5 ms, as between two machines of one data centre). The proxy
runs in its own process and uses some CPU of its own for each chunk, alike for every
revision measured through it; read its figures as a comparison of revisions, not as
absolute throughput. (Linux's netem would do this in the kernel; this machine's kernel
lacks it.)
"""

from __future__ import annotations

import argparse
import queue
import socket
import threading
import time


def pump(source: socket.socket, target: socket.socket, delay_s: float) -> None:
    """Copy ``source`` to ``target``, each chunk ``delay_s`` after it arrived: a reader and
    a sender thread, so that chunks in flight overlap as they would on a wire. (Threads and
    ``time.sleep``: asyncio's timers wait in whole milliseconds, epoll's unit.)"""
    chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def send() -> None:
        while True:
            due, chunk = chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not chunk:
                target.shutdown(socket.SHUT_WR)
                return
            target.sendall(chunk)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while chunk := source.recv(1 << 16):
            chunks.put((time.monotonic() + delay_s, chunk))
    except OSError:
        pass
    chunks.put((time.monotonic() + delay_s, b""))


def serve(listen: int, host: str, port: int, delay_s: float) -> None:
    server = socket.create_server(("127.0.0.1", listen))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection((host, port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, target, delay_s), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, default=5433, help="port (%(default)s)")
    parser.add_argument("--to", default="127.0.0.1:5432", help="host:port (%(default)s)")
    parser.add_argument("--delay-ms", type=float, default=0.25, help="one way (%(default)s)")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    serve(args.listen, host, int(port), args.delay_ms / 1000)


if __name__ == "__main__":
    main()
