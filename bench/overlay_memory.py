"""Peak memory and time of one 40-megapixel overlay request through the real stack, for this tree and a baseline.

    .venv/bin/python -m bench.overlay_memory [--baseline /tmp/base] [--repeat 3]

Each tree's stack is started as `make serve` starts it (`uwsgi --ini uwsgi/local.ini`, nginx in front) with one
worker, so the one worker serves every request. The worker's peak resident memory (VmHWM in /proc/<pid>/status, its
pid from the uWSGI stats socket) is read after a warm-up request and after each overlay of a 7300 x 5440 PNG (a
disc on a flat background, 146 KB): what `reload-on-rss`, which samples RSS between requests, never sees. Make the
baseline tree with `git worktree add /tmp/base <commit>`.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from bench.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
SIZE = (7300, 5440)  # 39.7 megapixels, under the default SEGAPP_MAX_PIXELS of 40 million


def large_png() -> bytes:
    image = Image.new("RGB", SIZE, (40, 90, 160))
    ImageDraw.Draw(image).ellipse((1500, 1000, 5800, 4600), fill=(200, 170, 120))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=9)
    return out.getvalue()


def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def post(port: int, body: bytes, query: str) -> tuple[int, int, float]:
    """(status, answer bytes, seconds) of one POST /infer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request("POST", "/infer" + query, body=body, headers={"Content-Type": "image/png"})
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    return response.status, len(answer), time.perf_counter() - started


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def measure(tree: Path, body: bytes, repeat: int) -> dict:
    """Start `tree`'s stack with one worker, warm it up, send the overlay `repeat` times; the figures."""
    env = {"SEGAPP_PROCESSES": "1", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "10000r/s",
           "SEGAPP_NGINX_BURST": "10000"}
    with tempfile.TemporaryDirectory(prefix="segapp-overlay-") as run_dir, \
            Stack.start(Path(run_dir), env, root=tree) as stack:
        post(stack.port, small_png(), "")  # warm-up
        pid = stack.worker_pids()[0]
        figures = {"tree": str(tree), "worker_peak_mb_after_warmup": round(peak_rss_mb(pid))}
        runs = []
        for _ in range(repeat):
            status, size, seconds = post(stack.port, body, "?format=overlay")
            runs.append({"status": status, "jpeg_bytes": size, "seconds": round(seconds, 2),
                         "worker_peak_mb": round(peak_rss_mb(pid))})
        figures["overlays"] = runs
        figures["worker_pid_unchanged"] = stack.worker_pids()[0] == pid
        return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout (git worktree) to measure first")
    parser.add_argument("--repeat", type=int, default=3, help="overlay requests per tree")
    options = parser.parse_args(argv)
    body = large_png()
    print(f"overlay of a {SIZE[0]}x{SIZE[1]} PNG ({len(body)} bytes), one worker, nproc={os.cpu_count()}")
    for tree in ([options.baseline] if options.baseline else []) + [ROOT]:
        print(json.dumps(measure(tree.resolve(), body, options.repeat)))


if __name__ == "__main__":
    main()
