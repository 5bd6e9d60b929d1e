"""What TLS and API keys cost a request: the same stack four ways, plain HTTP, HTTPS (HTTP/1.1 with keep-alive),
with API keys, and both, measured in turn in one run.

    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.security [--seconds 8] [--rounds 3] [--size 500x375]

Each round runs wrk against every stack in turn, at one client (c=1: latency) and at eight (c=8: throughput), with a
500x375 photo-like JPEG; the table holds each figure's median over the rounds and its ratio to plain HTTP. At c=8
the CPU time of nginx's processes and of the workers (/proc) is divided by the requests answered: each layer's cost,
steadier than requests/s on a shared machine. A new connection's cost is measured apart: `--connections` times, a
new TCP (and TLS) connection, GET /healthz on it, closed; the median in ms. The stacks run at once (2 workers each,
as `make serve`), idle but for the one measured; the per-address limits and the key's own are lifted, so that
nothing is refused. The certificate is made here by `openssl` (ECDSA P-256, self-signed: wrk does not verify it);
the key check is nginx's auth_request to the app.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.images import make_image
from bench.layers import process_cpu, roles
from bench.load import wrk
from bench.stack import Stack
from segapp import keys as api_keys

VARIANTS = ("http", "https", "http + key", "https + key")


def certificate(folder: Path) -> dict[str, str]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return {"SEGAPP_TLS_CERT": str(cert), "SEGAPP_TLS_KEY": str(key)}


def key_file(folder: Path) -> tuple[dict[str, str], str]:
    """A keys file of one key, whose limits do not bind the benchmark; (its environment, the header's value)."""
    key_id, key = api_keys.new_key()
    ring = api_keys.KeyRing([api_keys.Key("bench", key_id, api_keys.digest(key))],
                            api_keys.Limits("100000r/s", 1000), default_set=True)
    path = folder / "keys"
    path.write_text(ring.text())
    return {"SEGAPP_API_KEYS_FILE": str(path)}, f"Bearer {key}"


def connection_ms(port: int, tls: bool, count: int) -> float:
    """The median time of a new connection (TCP, then TLS when `tls`) and one GET /healthz on it, in ms."""
    context = ssl._create_unverified_context() if tls else None
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            connection = context.wrap_socket(raw, server_hostname="localhost") if context else raw
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while connection.recv(65536):
                pass
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="500x375", help="the JPEG's WIDTHxHEIGHT")
    parser.add_argument("--connections", type=int, default=300, help="new connections timed per stack and round")
    options = parser.parse_args(argv)
    width, height = (int(side) for side in options.size.split("x"))
    base = {"SEGAPP_PROCESSES": "2", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "100000r/s",
            "SEGAPP_NGINX_BURST": "100000", "SEGAPP_MAX_REQUESTS": "1000000"}
    runs: dict[str, dict[str, list[float]]] = {variant: {} for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="segapp-security-") as folder, contextlib.ExitStack() as stacks:
        folder = Path(folder)
        image = make_image(folder, width, height)
        tls = certificate(folder)
        keyed, authorization = key_file(folder)
        started = {}
        for index, variant in enumerate(VARIANTS):
            env = {**base, **(tls if "https" in variant else {}), **(keyed if "key" in variant else {})}
            context = ssl._create_unverified_context() if "https" in variant else None
            started[variant] = stacks.enter_context(Stack.start(folder / f"run{index}", env, tls=context))
        for _ in range(options.rounds):
            for variant, stack in started.items():
                header = authorization if "key" in variant else None
                figures = runs[variant]
                wrk(stack.url + "/infer", image, 8, 2, authorization=header)  # warm: both workers, the sessions
                for concurrency in (1, 8):
                    # The CPU each layer spends a request: steadier on a shared machine than requests/s.
                    grouped = roles(stack)
                    before = {role: sum(map(process_cpu, pids)) for role, pids in grouped.items()}
                    result = wrk(stack.url + "/infer", image, concurrency, options.seconds, authorization=header)
                    assert result["non_2xx"] == 0, (variant, result["statuses"], result["socket_errors"])
                    figures.setdefault(f"c={concurrency} req/s", []).append(result["requests_per_s"])
                    figures.setdefault(f"c={concurrency} p50 ms", []).append(result["p50_ms"])
                    if concurrency == 8:
                        answered = sum(result["statuses"].values())
                        for role in ("nginx", "workers"):
                            spent = sum(map(process_cpu, grouped[role])) - before[role]
                            figures.setdefault(f"{role} CPU ms", []).append(spent * 1000 / answered)
                figures.setdefault("new connection ms", []).append(
                    connection_ms(stack.port, "https" in variant, options.connections))
    medians = {variant: {name: round(statistics.median(values), 3) for name, values in figures.items()}
               for variant, figures in runs.items()}
    plain = medians["http"]
    ratios = {variant: {name: round(value / plain[name], 3) for name, value in figures.items()}
              for variant, figures in medians.items()}
    print(json.dumps({"image": options.size, "rounds": options.rounds, "seconds": options.seconds,
                      "nproc": os.cpu_count(), "medians": medians, "ratio_to_http": ratios, "runs": runs}, indent=1))
    columns = ("c=1 req/s", "c=1 p50 ms", "c=8 req/s", "c=8 p50 ms", "nginx CPU ms", "workers CPU ms",
               "new connection ms")
    print("\n| stack | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for variant, figures in medians.items():
        cells = [f"{figures[name]:.2f} ({ratios[variant][name]:.2f})" if variant != "http" else f"{figures[name]:.2f}"
                 for name in columns]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
