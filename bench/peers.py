"""segapp's stack beside the thinnest peers, on the same work (issue 18): what the serving layers cost and buy.

    make bench-peers                                   # 3 rounds of 10 s per point, then slow clients: about 6 minutes
    make bench-peers PEERS_ARGS="--rounds 5"
    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.peers --seconds 2 --rounds 1 --pipeline-seconds 2 \
        --slow-seconds 4 --slow-timeout 3                                  # a smoke run: 45 s

Three servers of the same work per request, POST /infer of a 500x375 JPEG answered with its PNG mask by segapp's own
`Segmenter.segment` and `mask_to_png` on the shipped default model, 2 workers x 1 engine thread each, the model
loaded in each worker after the fork, all on loopback with no proxy but segapp's own:

- segapp: nginx -> uWSGI -> segapp (bench.stack.Stack, the per-address limits lifted: all load comes from one address)
- flask: Flask under gunicorn, 2 sync workers (bench/peer_apps/flask_app.py)
- fastapi: FastAPI under uvicorn, 2 workers (bench/peer_apps/fastapi_app.py)

The peers run from build/peers-venv (`make bench-peers` makes it) and import this checkout's segapp, as the stack's
workers do. All three are started first and must answer the same PNG, byte for byte, as segapp's pipeline in this
process. Then `--rounds` rounds: the in-process pipeline (bench.profile_request.in_process, for the serving
efficiency), and wrk at c=1 and c=8 for `--seconds` on each server, the servers taking turns (reversed every other
round); medians over the rounds. Then, one server after another, 64 slow clients trickling uploads while one normal
client posts (bench/slow_clients.py). Prints the JSON and the tables, and writes the JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.images import make_image
from bench.load import wrk
from bench.profile_request import in_process
from bench.run import machine, revision, workers_model
from bench.slow_clients import slow_clients_beside_one
from bench.stack import READY_TIMEOUT_S, ROOT, Endpoint, Stack, StackError, alive, descendants, free_port, wait_gone

SERVERS = ("segapp", "flask", "fastapi")
LABELS = {
    "segapp": "segapp (nginx -> uWSGI -> segapp)",
    "flask": "Flask under gunicorn, 2 sync workers, no proxy",
    "fastapi": "FastAPI under uvicorn, 2 workers, no proxy",
}
CONCURRENCIES = (1, 8)
WORKERS = 2
# The peers' packages whose versions the result records.
PEER_PACKAGES = ("flask", "werkzeug", "gunicorn", "fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools")
# segapp's stack with its per-address limits lifted, as bench/run.py and bench/layers.py run it, and no recycling.
STACK_ENV = {"SEGAPP_PROCESSES": str(WORKERS), "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "100000r/s",
             "SEGAPP_NGINX_BURST": "100000", "SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT": "65535",
             "SEGAPP_MAX_REQUESTS": "1000000", "PYTHONPATH": str(ROOT)}


def peer_command(name: str, venv: Path, port: int) -> list[str]:
    """The command line of peer `name`: its server's defaults but for the workers and the address."""
    if name == "flask":
        return [str(venv / "bin" / "gunicorn"), "--workers", str(WORKERS), "--worker-class", "sync",
                "--bind", f"127.0.0.1:{port}", "bench.peer_apps.flask_app:create_app()"]
    return [str(venv / "bin" / "uvicorn"), "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", str(port),
            "--factory", "bench.peer_apps.fastapi_app:create_app"]


def mapped_models(pids) -> dict[int, str]:
    """For each of `pids` that has mapped a .tflite file (LiteRT maps the model it loads): that file."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if line.endswith(".tflite"):
                    found[pid] = line.split(maxsplit=5)[-1]
    return found


@dataclass
class PeerServer(Endpoint):
    """A peer's server on a loopback port, started in its own session; a context manager that stops it."""

    name: str = ""
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @classmethod
    def start(cls, name: str, venv: Path, run_dir: Path, timeout: float = READY_TIMEOUT_S) -> PeerServer:
        """Start peer `name` from `venv`, importing this checkout's segapp and bench; returns once every worker has
        loaded the model and GET /readyz answers."""
        port = free_port()
        log_path = run_dir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SEGAPP_THREADS": "1"}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(peer_command(name, venv, port), cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(port, name=name, process=process, log_path=log_path)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_models(self) -> dict[int, str]:
        return mapped_models(descendants(self.process.pid))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(OSError):
                if len(self.worker_models()) == WORKERS and self.request("GET", "/readyz", timeout=5).status == 200:
                    return
            time.sleep(0.1)
        raise StackError(f"{self.name} was not ready within {timeout} s:\n{self.log()[-4000:]}")

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server (both stop gracefully on it), then SIGKILL to its whole session past `timeout`."""
        pids = {self.process.pid} | descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        for pid in wait_gone(pids, 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def peer_versions(venv: Path) -> dict[str, str]:
    script = ("import importlib.metadata as m, json, sys; "
              "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script, *PEER_PACKAGES], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


def expected_mask(data: bytes) -> bytes:
    """The PNG that segapp's pipeline makes of `data` in this process: what every server must answer."""
    from bench.peer_apps import load_segmenter, png_mask
    from segapp.config import Settings

    return png_mask(load_segmenter(Settings(threads=1)), data)


def check_answer(name: str, endpoint: Endpoint, data: bytes, expected: bytes) -> None:
    answer = endpoint.infer(data)
    if answer.status != 200 or answer.headers.get("Content-Type") != "image/png" or answer.body != expected:
        raise RuntimeError(f"{name} did not answer segapp's PNG mask: {answer.status} "
                           f"{answer.headers.get('Content-Type')}, {len(answer.body)} bytes")


def median_row(rows: list[dict]) -> dict:
    """The median over rounds of requests/s and p50/p99, each round's requests/s, and the non-2xx of all."""
    return {
        "requests_per_s": round(statistics.median(row["requests_per_s"] for row in rows), 2),
        "p50_ms": round(statistics.median(row["p50_ms"] for row in rows), 3),
        "p99_ms": round(statistics.median(row["p99_ms"] for row in rows), 3),
        "rounds_requests_per_s": [row["requests_per_s"] for row in rows],
        "non_2xx": sum(row["non_2xx"] for row in rows),
    }


def summarize(result: dict) -> None:
    """Add the medians over rounds, and each server's serving efficiency (c=8 / the in-process pipeline)."""
    pipeline = statistics.median(result["in_process_requests_per_s"])
    result["in_process_median_requests_per_s"] = round(pipeline, 2)
    for server in result["servers"].values():
        server["median"] = {str(c): median_row(server["rounds"][str(c)]) for c in CONCURRENCIES}
        server["serving_efficiency"] = round(server["median"]["8"]["requests_per_s"] / pipeline, 3)


def span(values: list[float]) -> str:
    return f" ({min(values):g}-{max(values):g})" if len(values) > 1 else ""


def markdown(result: dict) -> str:
    """The tables: throughput and latency (medians over the rounds, their range), then under slow clients."""
    servers = result["servers"]
    lines = [
        f"{result['image']['name']} ({result['image']['bytes']} bytes), {result['rounds']} round(s) of "
        f"{result['seconds']} s per point; in-process pipeline {result['in_process_median_requests_per_s']} "
        f"requests/s{span(result['in_process_requests_per_s'])}",
        "",
        "| server | c=1 req/s | c=1 p50 | c=8 req/s | c=8 p50 | c=8 / in-process | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, server in servers.items():
        one, eight = server["median"]["1"], server["median"]["8"]
        lines.append(
            f"| {LABELS[name]} | {one['requests_per_s']}{span(one['rounds_requests_per_s'])} | {one['p50_ms']} ms "
            f"| {eight['requests_per_s']}{span(eight['rounds_requests_per_s'])} | {eight['p50_ms']} ms "
            f"| {server['serving_efficiency']} | {one['non_2xx'] + eight['non_2xx']} |")
    slow = [(name, server["slow_clients"]) for name, server in servers.items() if "slow_clients" in server]
    if slow:
        first = slow[0][1]
        lines += [
            "",
            f"{first['slow_clients']} slow clients ({first['trickle']}) beside one normal client posting for "
            f"{first['seconds']} s, its timeout {first['timeout_s']} s:",
            "",
            "| server | normal client: 200 / sent | timed out | other failures | p50 | p99 "
            "| p99, failures at their time | slow connections held | ended by the server |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, figures in slow:
            p50, p99, p99_all = (f"{figures[key]} ms" if figures[key] is not None else "-"
                                 for key in ("p50_ms", "p99_ms", "p99_all_ms"))
            lines.append(
                f"| {LABELS[name]} | {figures['answered_200']} / {figures['sent']} | {figures['timed_out']} "
                f"| {figures['failed'] - figures['timed_out']} | {p50} | {p99} | {p99_all} "
                f"| {figures['slow_held_at_start']} | {figures['slow_ended_by_server']} |")
    return "\n".join(lines)


def run(args) -> dict:
    venv = Path(args.peers_venv).resolve()
    if not (venv / "bin" / "gunicorn").exists() or not (venv / "bin" / "uvicorn").exists():
        raise SystemExit(f"{venv} has no gunicorn or uvicorn: `make bench-peers` makes it")
    result = {"machine": machine(), "tree": revision(ROOT), "peers": peer_versions(venv), "rounds": args.rounds,
              "seconds": args.seconds, "workers": WORKERS, "threads": 1, "in_process_requests_per_s": [],
              "servers": {name: {"label": LABELS[name], "rounds": {str(c): [] for c in CONCURRENCIES}}
                          for name in SERVERS},
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with tempfile.TemporaryDirectory(prefix="segapp-peers-") as scratch, contextlib.ExitStack() as running:
        scratch = Path(scratch)
        image = make_image(scratch, *map(int, args.size.split("x")))
        data = image.read_bytes()
        result["image"] = {"name": image.name, "bytes": len(data)}
        expected = expected_mask(data)
        stack = running.enter_context(Stack.start(scratch / "stack", STACK_ENV))
        servers: dict[str, Endpoint] = {"segapp": stack}
        result["servers"]["segapp"]["workers_model"] = workers_model(stack, ROOT, False)
        for name in SERVERS[1:]:
            peer = servers[name] = running.enter_context(PeerServer.start(name, venv, scratch))
            models = sorted(set(peer.worker_models().values()))
            if any(not Path(path).is_relative_to(ROOT) for path in models):
                raise RuntimeError(f"{name}'s workers loaded {models}: not this checkout's segapp")
            result["servers"][name]["workers_model"] = models
        for name, server in servers.items():
            check_answer(name, server, data, expected)
            wrk(server.url + "/infer", image, 8, 2)  # warm-up: every worker, the server's buffers
            print(f"{name}: ready at {server.url}, answers segapp's PNG ({len(expected)} bytes)", flush=True)

        for round_index in range(args.rounds):
            pipeline = in_process(data, "", WORKERS, 1, args.pipeline_seconds)
            result["in_process_requests_per_s"].append(pipeline["requests_per_s"])
            print(f"round {round_index + 1}: in-process pipeline {pipeline['requests_per_s']} requests/s", flush=True)
            order = SERVERS if round_index % 2 == 0 else SERVERS[::-1]
            for concurrency in CONCURRENCIES:
                for name in order:
                    row = wrk(servers[name].url + "/infer", image, concurrency, args.seconds)
                    result["servers"][name]["rounds"][str(concurrency)].append(row)
                    print(f"  {name} c={concurrency}: {row['requests_per_s']} req/s, p50 {row['p50_ms']} ms, "
                          f"non-2xx {row['non_2xx']}", flush=True)

        if args.slow_clients and args.slow_seconds > 0:
            for name, server in servers.items():
                print(f"{name}: {args.slow_clients} slow clients beside one normal client, {args.slow_seconds} s",
                      flush=True)
                figures = slow_clients_beside_one("127.0.0.1", server.port, "/infer", data, args.slow_clients,
                                                  args.slow_seconds, args.slow_timeout)
                result["servers"][name]["slow_clients"] = figures
                print(f"  normal client: {figures['answered_200']}/{figures['sent']} answered, "
                      f"{figures['timed_out']} timed out, p99 {figures['p99_ms']} ms", flush=True)
        left = {name: sorted(alive({s.process.pid} | descendants(s.process.pid))) for name, s in servers.items()}
    summarize(result)
    for name, pids in left.items():
        if still := alive(set(pids)):
            raise StackError(f"{name}'s processes {sorted(still)} outlived it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"peers-{args.name or time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--peers-venv", default=str(ROOT / "build" / "peers-venv"),
                        help="the venv with flask, gunicorn, fastapi, uvicorn and segapp (make bench-peers)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every point, the servers taking turns")
    parser.add_argument("--seconds", type=float, default=10, help="wrk's time per server, concurrency and round")
    parser.add_argument("--pipeline-seconds", type=float, default=10, help="the in-process pipeline, per round")
    parser.add_argument("--size", default="500x375", help="the JPEG's WIDTHxHEIGHT")
    parser.add_argument("--slow-clients", type=int, default=64, help="0 to skip the slow clients")
    parser.add_argument("--slow-seconds", type=float, default=20, help="the normal client's time beside them")
    parser.add_argument("--slow-timeout", type=float, default=10, help="the normal client's timeout per request")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="", help="the JSON's name: peers-NAME.json (default: a timestamp)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
