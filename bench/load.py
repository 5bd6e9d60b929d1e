"""Load generators against a running stack: wrk (closed loop) and a fixed-rate open loop.

wrk keeps `concurrency` requests in flight and waits for each answer before sending the next, so a slow server
slows the load and its tail latency looks better than users see it (coordinated omission). The open loop sends on
a fixed schedule whatever the server does, and measures each latency from the moment the request was due.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

LUA = Path(__file__).with_name("post_image.lua")


def wrk(url: str, image: Path, concurrency: int, seconds: float, timeout_s: float = 10.0,
        authorization: str | None = None) -> dict:
    """One wrk run: requests/s, latency percentiles in ms, answers by status, socket errors. `authorization`: the
    Authorization header of every request (an API key)."""
    command = [
        "wrk",
        f"-c{concurrency}",
        f"-t{min(concurrency, 2)}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        "-s",
        str(LUA),
        url,
    ]
    env = {**os.environ, "SEGAPP_BENCH_IMAGE": str(image), "SEGAPP_BENCH_AUTHORIZATION": authorization or ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    out = done.stdout
    line = next(line for line in out.splitlines() if line.startswith("WRK_JSON "))
    raw = json.loads(line.removeprefix("WRK_JSON "))
    statuses = {int(k): v for k, v in raw["statuses"].items()}
    answered = sum(statuses.values())
    socket_errors = raw["errors"]["connect"] + raw["errors"]["read"] + raw["errors"]["write"] + raw["errors"]["timeout"]
    return {
        "concurrency": concurrency,
        "requests_per_s": round(statuses.get(200, 0) / (raw["duration_us"] / 1e6), 2),
        "p50_ms": raw["latency_us"]["p50"] / 1000,
        "p90_ms": raw["latency_us"]["p90"] / 1000,
        "p99_ms": raw["latency_us"]["p99"] / 1000,
        "max_ms": raw["latency_us"]["max"] / 1000,
        "answers": answered,
        "statuses": statuses,
        "non_2xx": answered - sum(v for k, v in statuses.items() if 200 <= k < 300) + socket_errors,
        "socket_errors": raw["errors"],
    }


async def _post(host: str, port: int, path: str, body: bytes, due: float, timeout_s: float) -> tuple[int, float]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.write(head + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout_s)
        await asyncio.wait_for(reader.read(), timeout_s)  # Connection: close: the body ends at EOF
        writer.close()
        status = int(status_line.split()[1])
    except (OSError, asyncio.TimeoutError, IndexError, ValueError):
        status = 0
    return status, time.perf_counter() - due


async def _open_loop(host, port, path, body, rate, seconds, timeout_s):
    started = time.perf_counter()
    tasks = []
    for i in range(int(rate * seconds)):
        due = started + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(_post(host, port, path, body, due, timeout_s)))
    return await asyncio.gather(*tasks)


def open_loop(
    host: str, port: int, path: str, image: Path, rate: float, seconds: float, timeout_s: float = 10.0
) -> dict:
    """Requests sent at `rate` per second for `seconds`; latency from each request's due time."""
    results = asyncio.run(_open_loop(host, port, path, image.read_bytes(), rate, seconds, timeout_s))
    latencies = np.array([latency for status, latency in results if status == 200]) * 1000
    statuses: dict[int, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    percentile = (lambda q: round(float(np.percentile(latencies, q)), 2)) if len(latencies) else (lambda q: None)
    return {
        "rate_per_s": round(rate, 2),
        "sent": len(results),
        "statuses": statuses,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": round(float(latencies.max()), 2) if len(latencies) else None,
    }
