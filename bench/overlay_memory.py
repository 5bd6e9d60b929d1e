"""Peak memory and time of one 40-megapixel overlay request through the real stack, for this tree and a baseline.

    .venv/bin/python -m bench.overlay_memory [--baseline /tmp/base] [--repeat 3] [--size 7300x5440] [--format overlay]

Each tree's stack is started as `make serve` starts it (`uwsgi --ini uwsgi/local.ini`, nginx in front) with one
worker, so the one worker serves every request. The worker's peak resident memory (VmHWM in /proc/<pid>/status, its
pid from the uWSGI stats socket) is read after a warm-up request and after each overlay of a 7300 x 5440 PNG (a
disc on a flat background, 146 KB): what `reload-on-rss`, which samples RSS between requests, never sees; and its
resident memory after each, what the worker keeps. `--size` and `--format` measure other shapes and answers (a
40000000x1 PNG is a 116 KB body). Make the baseline tree with `git worktree add /tmp/base <commit>`.
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

from bench.run import build_compiled
from bench.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
SIZE = (7300, 5440)  # 39.7 megapixels, under the default SEGAPP_MAX_PIXELS of 40 million


def large_png(size: tuple[int, int] = SIZE) -> bytes:
    width, height = size
    image = Image.new("RGB", size, (40, 90, 160))
    box = (1500 * width // SIZE[0], 1000 * height // SIZE[1], 5800 * width // SIZE[0], 4600 * height // SIZE[1])
    ImageDraw.Draw(image).ellipse(box, fill=(200, 170, 120))
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


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of /proc/PID/status in MB: VmHWM, the peak resident set, or VmRSS, the current one."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def measure(tree: Path, body: bytes, repeat: int, answer: str = "overlay") -> dict:
    """Start `tree`'s stack with one worker, warm it up, send the image `repeat` times; the figures."""
    env = {"SEGAPP_PROCESSES": "1", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "10000r/s",
           "SEGAPP_NGINX_BURST": "10000"}
    with tempfile.TemporaryDirectory(prefix="segapp-overlay-") as run_dir, \
            Stack.start(Path(run_dir), env, root=tree) as stack:
        post(stack.port, small_png(), "")  # warm-up
        pid = stack.worker_pids()[0]
        figures = {"tree": str(tree), "worker_peak_mb_after_warmup": round(memory_mb(pid))}
        runs = []
        for _ in range(repeat):
            status, size, seconds = post(stack.port, body, f"?format={answer}")
            runs.append({"status": status, "answer_bytes": size, "seconds": round(seconds, 2),
                         "worker_peak_mb": round(memory_mb(pid)), "worker_rss_mb": round(memory_mb(pid, "VmRSS"))})
        figures["requests"] = runs
        figures["worker_pid_unchanged"] = stack.worker_pids()[0] == pid
        return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout (git worktree) to measure first")
    parser.add_argument("--repeat", type=int, default=3, help="requests per tree")
    parser.add_argument("--size", default=f"{SIZE[0]}x{SIZE[1]}", help="the PNG's WIDTHxHEIGHT")
    parser.add_argument("--format", default="overlay", choices=("overlay", "png", "json"), help="the answer asked for")
    options = parser.parse_args(argv)
    size = tuple(int(side) for side in options.size.split("x"))
    body = large_png(size)
    print(f"{options.format} of a {size[0]}x{size[1]} PNG ({len(body)} bytes), one worker, nproc={os.cpu_count()}")
    if options.baseline:
        build_compiled(options.baseline)
    for tree in ([options.baseline] if options.baseline else []) + [ROOT]:
        print(json.dumps(measure(tree.resolve(), body, options.repeat, options.format)))


if __name__ == "__main__":
    main()
