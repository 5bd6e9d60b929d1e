"""The real stack as `make serve` starts it (uwsgi --ini uwsgi/local.ini), on a free port and a temporary run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """uWSGI (workers + nginx as its attached daemon) in its own process session; a context manager."""

    def __init__(
        self, run_dir: Path, processes: int, threads: int, extra_env: dict | None = None, port: int | None = None
    ):
        self.run_dir = Path(run_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "SEGAPP_RUN_DIR": str(self.run_dir),
            "SEGAPP_PORT": str(self.port),
            "SEGAPP_PROCESSES": str(processes),
            "SEGAPP_THREADS": str(threads),
            **(extra_env or {}),
        }
        self.process: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> Stack:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        uwsgi = Path(sys.executable).with_name("uwsgi")
        started = time.perf_counter()
        with open(self.run_dir / "stack.log", "wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [str(uwsgi), "--ini", str(ROOT / "uwsgi" / "local.ini")],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + 120
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the stack exited with {self.process.returncode}; see {self.run_dir / 'stack.log'}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        self.ready_s = time.perf_counter() - started
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        self.__exit__(None, None, None)
        raise TimeoutError("the stack did not become ready in 120 s")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def workers(self) -> list[dict]:
        """The stats socket's entry for each worker (pid, requests, rss in bytes, ...)."""
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(self.run_dir / "stats.sock"))
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))["workers"]

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
