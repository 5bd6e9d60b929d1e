"""Metrics soak: does the Prometheus folder stay flat while workers recycle and are killed? (issue 9, item 5)

    .venv/bin/python -m bench.soak --minutes 10

Starts the stack as bench/stack.py does (2 workers), recycles workers every --max-requests requests
(SEGAPP_MAX_REQUESTS), keeps --clients clients POSTing a small JPEG, and SIGKILLs a busy worker every --kill-every
seconds. At the start (after a warm-up) and at the end (load stopped, workers up again), with the stack idle, it
records the metrics folder's file count and size and the median time of --scrapes GET /metrics; every 30 s under load
it records the same. It checks that the summed /infer counters never went down and, at the end, equal the answers.
Writes bench/results/soak.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.stack import ROOT, Stack


def post(port: int, body: bytes, path: str = "/infer", method: str = "POST") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "image/jpeg"} if body else {})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def infer_counts(text: str) -> tuple[float, float]:
    """(summed segapp_requests_total for /infer, summed segapp_requests_in_flight) of a /metrics body."""
    answers = in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "segapp_requests_total" and sample.labels.get("route") == "/infer":
                answers += sample.value
            elif sample.name == "segapp_requests_in_flight":
                in_flight += sample.value
    return answers, in_flight


def folder_state(stack: Stack, scrapes: int) -> dict:
    """The metrics folder's files and bytes, and the median and max time of `scrapes` GET /metrics."""
    times, body = [], b""
    for _ in range(scrapes):
        started = time.perf_counter()
        status, body = post(stack.port, b"", "/metrics", "GET")
        times.append(time.perf_counter() - started)
        assert status == 200, status
    folder = stack.run_dir / "metrics"
    entries = [entry.stat() for entry in os.scandir(folder)]
    answers, in_flight = infer_counts(body.decode())
    return {
        "files": len(entries),
        "bytes": sum(entry.st_size for entry in entries),
        "bytes_on_disk": sum(entry.st_blocks * 512 for entry in entries),
        "scrape_ms_median": round(statistics.median(times) * 1000, 2),
        "scrape_ms_max": round(max(times) * 1000, 2),
        "metrics_bytes": len(body),
        "infer_counted": answers,
        "in_flight": in_flight,
    }


class Clients:
    """Threads POSTing `image` until stopped; counts sent, answered (200) and failed."""

    def __init__(self, port: int, image: bytes, clients: int):
        self.port, self.image = port, image
        self.sent = self.answered = 0
        self.failed: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                self.sent += 1
            try:
                outcome = str(post(self.port, self.image)[0])
            except OSError as error:
                outcome = type(error).__name__
            with self.lock:
                if outcome == "200":
                    self.answered += 1
                else:
                    self.failed[outcome] = self.failed.get(outcome, 0) + 1

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def kill_a_busy_worker(stack: Stack) -> int | None:
    for _ in range(500):
        busy = [worker["pid"] for worker in stack.workers() if worker["status"] == "busy" and worker["pid"]]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return busy[0]
        time.sleep(0.01)
    return None


def wait_workers_up(stack: Stack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = stack.workers()
        if all(worker["pid"] and worker["apps"] and worker["status"] == "idle" for worker in workers):
            return
        time.sleep(0.2)


def small_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (160, 120), (120, 80, 40)).save(out, format="JPEG")
    return out.getvalue()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=300, help="SEGAPP_MAX_REQUESTS: recycle after this many")
    parser.add_argument("--kill-every", type=float, default=30, help="seconds between SIGKILLs of a busy worker")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scrapes", type=int, default=7, help="scrapes per measurement (their median is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)

    image = small_jpeg()
    env = {"SEGAPP_MAX_REQUESTS": str(args.max_requests), "SEGAPP_NGINX_RATE": "100000r/s",
           "SEGAPP_NGINX_BURST": "100000"}
    env.update({"SEGAPP_PROCESSES": "2", "SEGAPP_THREADS": "1"})
    with tempfile.TemporaryDirectory(prefix="segapp-soak-") as run_dir, Stack.start(Path(run_dir), env) as stack:
        for _ in range(200):  # warm-up: every worker has written its files
            post(stack.port, image)
        start = folder_state(stack, args.scrapes)
        first_pids = {worker["pid"] for worker in stack.workers()}
        samples, killed, backwards = [], [], 0
        last_counted = start["infer_counted"]
        began = time.monotonic()
        next_kill, next_sample = began + args.kill_every, began + 30
        with Clients(stack.port, image, args.clients) as clients:
            while (now := time.monotonic()) < began + args.minutes * 60:
                if now >= next_kill:
                    killed.append(kill_a_busy_worker(stack))
                    next_kill += args.kill_every
                if now >= next_sample:
                    state = folder_state(stack, 3)
                    backwards += state["infer_counted"] < last_counted
                    last_counted = state["infer_counted"]
                    samples.append({"minute": round((now - began) / 60, 2), **state})
                    print(f"  {samples[-1]}", flush=True)
                    next_sample += 30
                time.sleep(0.05)
        wait_workers_up(stack)
        end = folder_state(stack, args.scrapes)
        backwards += end["infer_counted"] < last_counted
        respawns = sum(worker["respawn_count"] - 1 for worker in stack.workers())
        last_pids = {worker["pid"] for worker in stack.workers()}
        end["names"] = sorted(os.listdir(stack.run_dir / "metrics"))
        end["workers"] = [{key: worker[key] for key in ("pid", "status", "requests")} for worker in stack.workers()]
    result = {
        "command": f"python -m bench.soak --minutes {args.minutes:g} --max-requests {args.max_requests} "
                   f"--kill-every {args.kill_every:g} --clients {args.clients}",
        "cores": os.cpu_count(),
        "start": start, "end": end, "under_load": samples,
        "requests": {"sent": clients.sent + 200, "answered": clients.answered + 200, "failed": clients.failed},
        "workers_killed": len([pid for pid in killed if pid]), "worker_respawns": respawns,
        "first_workers_gone": not first_pids & last_pids,
        "counter_went_backwards": backwards,
        "counted_equals_answered": end["infer_counted"] == clients.answered + 200,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "under_load"}, indent=2))
    print("\n| | files | bytes (on disk) | /metrics median ms (max) | in flight |\n| --- | --- | --- | --- | --- |")
    for name in ("start", "end"):
        state = result[name]
        print(f"| {name} | {state['files']} | {state['bytes']} ({state['bytes_on_disk']}) | "
              f"{state['scrape_ms_median']} ({state['scrape_ms_max']}) | {state['in_flight']:g} |")
    return result


if __name__ == "__main__":
    main()
