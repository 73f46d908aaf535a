"""Shared helpers for the bench scripts: free ports, servers in subprocesses, percentiles.

Stdlib only. Every server is started as a child process listening on 127.0.0.1, waited for
with a bounded timeout, and stopped with SIGINT (uvicorn's graceful shutdown, so lifespan
hooks such as closing the store run), then SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def own_cpu_seconds(pid: int) -> float | None:
    """user+system CPU of one process (all its threads), children not included: one read of
    /proc, where ``process_cpu_seconds`` walks /proc for the children too."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (onetag's writer process, for one)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry))
    return found


def children_cpu_seconds(pid: int) -> float:
    return sum(own_cpu_seconds(child) or 0.0 for child in children(pid))


def process_cpu_seconds(pid: int) -> float | None:
    """user+system CPU of one process (all its threads) and its child processes, from /proc;
    None where unavailable. A server's helper processes are its cost too."""
    own = own_cpu_seconds(pid)
    return None if own is None else own + children_cpu_seconds(pid)


def thread_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(main thread, all other threads + child processes) CPU seconds, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    main = others = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            seconds = (int(fields[11]) + int(fields[12])) / tick
            if int(task) == pid:
                main += seconds
            else:
                others += seconds
    except (OSError, IndexError, ValueError):
        return None
    return main, others + children_cpu_seconds(pid)


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    info: dict[str, object] = {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    for name in ("uvicorn", "starlette", "httpx", "aiosqlite", "h11", "httptools", "uvloop"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    return info


class ServerProcess:
    """One server in its own process; ``with ServerProcess(cmd, port) as srv: ...``."""

    def __init__(self, argv: Sequence[str], port: int, *, log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path = REPO,
                 start_timeout: float = 20.0, stop_timeout: float = 15.0):
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(  # the checkout it runs from comes first
            p for p in (str(cwd), self.env.get("PYTHONPATH", "")) if p)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n"
                                   f"{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not listen on {HOST}:{self.port} within "
                           f"{self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Graceful stop; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        else:
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python() -> str:
    return sys.executable
