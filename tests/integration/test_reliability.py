"""The stack under events: a worker killed mid-stream, a model swapped by chain reload, SIGTERM mid-request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.stack import READY_TIMEOUT_S, ROOT, STOP_TIMEOUT_S, free_port, wait_gone
from segapp.inference import SHIPPED_MODEL, card_path
from tests.integration.conftest import start_stack

pytestmark = pytest.mark.integration


class RequestStream:
    """Clients POSTing an image in a loop on threads of their own; counts answers by status (or exception name).

    `models`: query string -> the X-Model that must answer it ("*": any); each client takes them in turn. An answer
    counts as failed unless it is a 200 from that model. `headers` go with every request, from address `source`.
    """

    def __init__(self, stack, image: bytes, clients: int = 2, models: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None, source: str = "127.0.0.1"):
        self.stack, self.image = stack, image
        self.headers, self.source = headers, source
        self.models = list((models or {"": "*"}).items())
        self.sent = 0  # counted before each request goes out
        self.outcomes: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(clients)]

    def __enter__(self) -> RequestStream:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, turn: int) -> None:
        while not self._stop.is_set():
            query, model = self.models[turn % len(self.models)]
            turn += 1
            with self._lock:
                self.sent += 1
            try:
                answer = self.stack.infer(self.image, query, self.headers, timeout=60, source=self.source)
                outcome = str(answer.status)
                if outcome == "200" and model not in ("*", answer.headers.get("X-Model")):
                    outcome = f"200 from {answer.headers.get('X-Model')}, not {model}"
                detail = answer.body[:200].decode(errors="replace")
            except OSError as error:
                outcome = detail = type(error).__name__
            with self._lock:
                self.outcomes.append(outcome)
                if outcome != "200":
                    self.failures.append(f"{query}: {outcome}: {detail}")

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, more: int, timeout: float = 120) -> None:
        """Until `more` further answers have arrived."""
        target = self.count() + more
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"the stream stalled at {self.count()} answers"
            time.sleep(0.05)


def test_killed_worker_is_replaced_and_the_stream_goes_on(stack_factory, jpeg, record_property):
    # Each image takes 300 ms in the engine, so the worker is killed in the middle of one.
    stack = stack_factory(SEGAPP_ENGINE_DELAY_MS="300")
    with RequestStream(stack, jpeg) as stream:
        stream.wait_for(6)
        deadline = time.monotonic() + 30
        while not (busy := [w["pid"] for w in stack.stats()["workers"] if w["status"] == "busy"]):
            assert time.monotonic() < deadline, "no worker was ever busy"
            time.sleep(0.02)
        victim = busy[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = stream.count()
        stream.wait_for(12)
    deadline = time.monotonic() + 60
    while len(set(stack.worker_pids()) - {victim}) < 2:
        assert time.monotonic() < deadline, "the master did not replace the killed worker"
        time.sleep(0.2)
    record_property("failed_requests", len(stream.failures))
    print(f"\nworker kill: {len(stream.failures)} failed of {len(stream.outcomes)} requests: {stream.failures}")
    assert stream.outcomes[killed_at:].count("200") >= 10, "the stream went on after the kill"
    # The request the worker held when it died is sent to the other worker by nginx: no client sees the kill.
    assert "upstream prematurely closed connection" in stack.log(), "the kill cut a request short"
    assert stream.failures == []


def test_chain_reload_swaps_the_model_without_a_failed_request(stack_factory, jpeg):
    models = _readable_dir()
    _model_version(models / "v1", "1.0.0")
    _model_version(models / "v2", "2.0.0-test")
    current = models / "current"
    current.symlink_to(models / "v1", target_is_directory=True)
    stack = stack_factory(SEGAPP_MODEL=str(current / SHIPPED_MODEL.name))
    assert stack.request("GET", "/v1/model").json()["release"] == "1.0.0"
    old_pids = set(stack.worker_pids())
    with RequestStream(stack, jpeg) as stream:
        stream.wait_for(10)
        # The swap an operator makes: repoint the symlink atomically, then touch the reload file.
        (models / "next").symlink_to(models / "v2", target_is_directory=True)
        os.replace(models / "next", current)
        touch_in_a_later_second(stack.run_dir / "reload")
        deadline = time.monotonic() + 120
        while set(stack.worker_pids()) & old_pids or not all(w["apps"] for w in stack.stats()["workers"]):
            assert time.monotonic() < deadline, (
                f"workers not all replaced: {stack.stats()['workers']}\n{stack.log()[-3000:]}"
            )
            time.sleep(0.2)
        assert "chain reload" in stack.log()
        stream.wait_for(10)
    versions = {stack.request("GET", "/v1/model").json()["release"] for _ in range(10)}
    shutil.rmtree(models, ignore_errors=True)
    print(f"\nmodel swap: {len(stream.failures)} failed of {len(stream.outcomes)} requests")
    assert stream.failures == []
    assert versions == {"2.0.0-test"}


def test_sigterm_lets_the_request_in_flight_finish_then_everything_stops(stack_factory, jpeg):
    stack = stack_factory(SEGAPP_ENGINE_DELAY_MS="3000")
    pids = stack.processes()
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(stack.infer, jpeg)
        deadline = time.monotonic() + 30
        while not any(worker["status"] == "busy" for worker in stack.stats()["workers"]):
            assert time.monotonic() < deadline, "the request never reached a worker"
            time.sleep(0.05)
        seconds = stack.stop(timeout=60)  # asserts that every process is gone
        answer = in_flight.result(timeout=60)
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "image/png"
    assert not any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in pids)
    print(f"\nSIGTERM: all {len(pids)} processes gone in {seconds:.1f} s")


def test_sigterm_to_serve_drains_readiness_first_then_stops(jpeg):
    """`make serve`'s script with SEGAPP_DRAIN_SECONDS: on SIGTERM /readyz says 503 at once, so a balancer stops
    sending, while requests are still served; then the graceful stop."""
    venv = Path(sys.executable).parent.parent
    stack = start_stack(command=[str(ROOT / "uwsgi" / "serve")], VENV=str(venv), SEGAPP_DRAIN_SECONDS="4")
    try:
        stack.wait_apps_loaded(READY_TIMEOUT_S)
        pids = stack.processes()
        signalled = time.monotonic()
        stack.process.send_signal(signal.SIGTERM)
        while (readiness := stack.request("GET", "/readyz")).status == 200:
            assert time.monotonic() - signalled < 2, "/readyz still 200 two seconds into the drain"
            time.sleep(0.05)
        assert readiness.status == 503 and readiness.json()["error"]["code"] == "draining", readiness.body
        assert readiness.headers["Retry-After"] == "1"
        during = [stack.infer(jpeg).status for _ in range(5)] + [stack.request("GET", "/healthz").status]
        assert stack.process.wait(timeout=STOP_TIMEOUT_S) == 0, stack.log()[-2000:]
        stopped_after = time.monotonic() - signalled
        assert not wait_gone(pids, 10), "a process of the stack outlived serve"
    finally:
        if stack.process.poll() is None:
            stack.stop()
        shutil.rmtree(stack.run_dir, ignore_errors=True)
    assert during == [200] * 6
    assert stopped_after >= 4, "uWSGI was stopped before the drain was over"
    print(f"\ndrain: /readyz 503, 6 of 6 requests served; stopped {stopped_after:.1f} s after SIGTERM")


def _port_in_time_wait() -> int:
    """A free loopback port with a connection in TIME_WAIT on it, as a stack stopped a moment ago leaves its port:
    the side that closes first (here the server's, as nginx closes keep-alive connections) waits there a minute."""
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as listener:
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
        client.close()
    return port


def test_serve_starts_on_a_port_whose_last_connections_wait_in_time_wait():
    """`make serve` again right after Ctrl-C: the old connections in TIME_WAIT do not stop nginx binding, so serve's
    own check must not call the port taken (on 723bb99 it did, for about a minute)."""
    port = _port_in_time_wait()
    with pytest.raises(OSError), socket.socket() as plain:  # the state the check used to trip on is really there
        plain.bind(("127.0.0.1", port))
    venv = Path(sys.executable).parent.parent
    stack = start_stack(command=[str(ROOT / "uwsgi" / "serve")], VENV=str(venv), SEGAPP_PORT=str(port))
    try:
        assert stack.request("GET", "/healthz").status == 200
    finally:
        stack.stop()
        shutil.rmtree(stack.run_dir, ignore_errors=True)


def test_serve_refuses_a_port_another_server_listens_on():
    venv = Path(sys.executable).parent.parent
    run_dir = tempfile.mkdtemp(prefix="segapp-serve-")
    with socket.create_server(("127.0.0.1", free_port())) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "VENV": str(venv), "SEGAPP_PORT": str(port), "SEGAPP_RUN_DIR": run_dir}
        serve = subprocess.run([str(ROOT / "uwsgi" / "serve")], capture_output=True, text=True, env=env, timeout=60)
    shutil.rmtree(run_dir, ignore_errors=True)
    assert serve.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in serve.stderr


def touch_in_a_later_second(path: Path) -> None:
    """Touch `path` so that its mtime's whole second is later than before: uWSGI compares touch files' mtimes in
    whole seconds, so a touch within the second of the last one (uWSGI's own, at start) goes unseen."""
    while int(time.time()) <= int(path.stat().st_mtime):
        time.sleep(0.05)
    path.touch()


def _readable_dir() -> Path:
    """A new folder that the user uWSGI's workers run as can read (mkdtemp's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="segapp-models-"))
    path.chmod(0o755)
    return path


def _model_version(folder: Path, version: str) -> None:
    folder.mkdir(mode=0o755)
    shutil.copyfile(SHIPPED_MODEL, folder / SHIPPED_MODEL.name)
    card = json.loads(card_path(SHIPPED_MODEL).read_text())
    card["release"] = version
    (folder / card_path(SHIPPED_MODEL).name).write_text(json.dumps(card))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
