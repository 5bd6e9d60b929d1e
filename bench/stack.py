"""The one harness that starts the real stack as `make serve` does (`uwsgi --ini uwsgi/local.ini`: uWSGI's master, its
workers, nginx as its attached daemon) on a free loopback port and a run folder, waits for it, talks to it, and stops
it. The benchmark, the soak, the overlay memory bench and the integration tests (tests/integration/conftest.py adds
the tests' defaults) all use it.

    with Stack.start(run_dir, {"SEGAPP_PROCESSES": "2"}) as stack:
        stack.infer(jpeg_bytes).status
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UWSGI = Path(sys.executable).with_name("uwsgi")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A loaded two-core machine loads two LiteRT workers in a few seconds; allow far more.
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


class StackError(RuntimeError):
    """The stack did not start, or did not stop with every one of its processes."""


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768-60999): polling a port of that range before its
    server listens can connect the client to itself (TCP simultaneous open), which then reads back its own request."""
    while True:
        port = random.randint(20000, 32767)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Endpoint:
    """An HTTP server on a loopback port (nginx of a stack, a container's published port); over HTTPS when `tls`, the
    client's context (the CA it trusts), is given."""

    port: int
    tls: ssl.SSLContext | None = field(default=None, kw_only=True, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60, source: str = "127.0.0.1") -> Answer:
        """One HTTP/1.1 request, on a connection of its own from loopback address `source`."""
        if self.tls:
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                                     source_address=(source, 0), context=self.tls)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout,
                                                    source_address=(source, 0))
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            connection.close()

    def raw(self, data: bytes, timeout: float = 30) -> Answer:
        """Send `data` as it is (no HTTP client would send it) over plain TCP, and read the one answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as connection:
            connection.sendall(data)
            response = http.client.HTTPResponse(connection)
            response.begin()
            return Answer(response.status, response.headers, response.read())

    def infer(self, image: bytes, query: str = "", headers: dict | None = None, timeout: float = 60,
              source: str = "127.0.0.1") -> Answer:
        return self.request("POST", "/infer" + query, image, {"Content-Type": "image/jpeg", **(headers or {})},
                            timeout=timeout, source=source)


@dataclass
class Stack(Endpoint):
    """A running stack: its port, run folder, log and master process; a context manager that stops it."""

    run_dir: Path
    process: subprocess.Popen
    log_path: Path
    env: dict = field(repr=False)
    ready_s: float | None = None

    @classmethod
    def start(cls, run_dir: Path, env: Mapping[str, str], command: list[str] | None = None, root: Path = ROOT,
              timeout: float = READY_TIMEOUT_S, tls: ssl.SSLContext | None = None) -> Stack:
        """Start `command` (default: uwsgi --ini ROOT/uwsgi/local.ini) with SEGAPP_* `env` over the process's own,
        on a free port unless SEGAPP_PORT is given; returns once /readyz answers 200 and every worker has its app.
        `root` is the tree to run: another checkout (a baseline worktree) runs its own files with this venv.
        `tls`: the client context for a stack given SEGAPP_TLS_CERT and SEGAPP_TLS_KEY (HTTPS)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        port = int(env.get("SEGAPP_PORT") or free_port())
        full_env = {**os.environ, "PATH": SBIN_PATH, "SEGAPP_RUN_DIR": str(run_dir), "SEGAPP_PORT": str(port), **env}
        log_path = run_dir / "stack.log"
        started = time.perf_counter()
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(
                command or [str(UWSGI), "--ini", str(root / "uwsgi" / "local.ini")],
                cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        stack = cls(port, run_dir, process, log_path, full_env, tls=tls)
        try:
            stack.wait_ready(timeout)
        except BaseException:
            try:
                stack.stop()
            except Exception:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            raise
        stack.ready_s = time.perf_counter() - started
        return stack

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None or alive(self.processes()):
            self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self) -> dict:
        """The uWSGI stats socket's JSON."""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(self.run_dir / "stats.sock"))
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))

    def workers(self) -> list[dict]:
        """The stats socket's entry for each worker (pid, status, requests, rss in bytes, ...)."""
        return self.stats()["workers"]

    def worker_pids(self) -> list[int]:
        return [worker["pid"] for worker in self.workers() if worker["pid"]]

    def processes(self) -> set[int]:
        """The master and every process below it: workers, nginx's master and its workers."""
        return {self.process.pid} | descendants(self.process.pid)

    def cpu_seconds(self) -> float:
        """CPU time used so far by every process of the stack's session: uWSGI master, workers, nginx.

        A live process counts its own time and that of its children it has reaped (cutime, cstime), so a worker
        recycled by max-requests or reload-on-rss still counts, in its master's figure.
        """
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the command name: state, ppid, pgrp, session (3), ..., utime (11), stime (12), cutime, cstime.
            if int(fields[3]) == self.process.pid:
                total += sum(int(value) for value in fields[11:15])
        return total / CLOCK_TICKS

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"the stack exited with {self.process.returncode} before ready:\n{self.log()[-4000:]}")
            try:
                # Every worker has loaded the app: a SIGTERM during a worker's app load is lost (uWSGI 2.0.31).
                if self.request("GET", "/readyz", timeout=5).status == 200 and all(
                    worker["apps"] for worker in self.workers()
                ):
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.02)
        raise StackError(f"/readyz did not answer 200 within {timeout} s:\n{self.log()[-4000:]}")

    def wait_apps_loaded(self, timeout: float) -> None:
        """Until every worker has loaded the app (or `timeout`): uWSGI 2.0.31 loses a SIGTERM that arrives while a
        worker is still loading, and its master then waits for ever; see docs/operations.md."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                if all(worker["apps"] for worker in self.workers()):
                    return
            except (OSError, ValueError):
                return
            time.sleep(0.2)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM to the master; every process of the stack must be gone within `timeout` s, else each is killed
        and StackError says which outlived it. Returns the seconds the stop took."""
        started = time.monotonic()
        self.wait_apps_loaded(timeout)
        pids = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
            left = wait_gone(pids, max(1.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            left = alive(pids)
        if left:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise StackError(f"processes {sorted(left)} outlived the stack by {timeout} s:\n{self.log()[-3000:]}")
        return time.monotonic() - started


def descendants(pid: int) -> set[int]:
    """Every live process whose parent chain leads to `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids of `pids` that still run (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
