"""segapp's own CPU per request around the image pipeline, to the microsecond: what bench.layers cannot resolve beside
the 5 ms of image work a request, on a shared machine.

    .venv/bin/python -m bench.app_overhead [--requests 3000] [--rounds 5] [--log-format text|json]
                                           [--baseline REF]

The WSGI app is called as uWSGI calls it (an environ of the keys uWSGI passes, the body in wsgi.input) with POST
/infer of a 500x375 JPEG, but the default model's `segment` and the answer's encoding return what they returned for
that JPEG before the clock starts: what is left is segapp's handling of a request (WebOb, the body read and its
checks, negotiation, the model's lookup, the metrics, headers and Server-Timing, the access line). This thread's CPU
time over `--requests` requests, in microseconds a request, for:

- handling: all of it;
- no access line / no metrics: the same with the access logger off / the metrics' calls made no-ops, so that the
  difference is what each costs;
- decode: `decode_image` of the JPEG (the pipeline's first stage, whose reads check the decode's CPU budget).

Each round runs in a fresh process (spawned, the model loaded in it); with `--baseline REF` the rounds alternate
between this checkout and REF (a git worktree), and the medians of each and their ratios are printed. The access
lines go to /dev/null, as they would to a log file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.engine_alone import segapp_folder, use_tree
from bench.images import make_image
from bench.run import worktree

FIGURES = ("handling", "no access line", "no metrics", "decode")


class _Idle:
    """A metric that records nothing (the `no metrics` figure)."""

    def inc(self, *args):
        pass

    dec = inc


def _environ(data: bytes) -> dict:
    """What uWSGI hands the app for POST /infer from nginx (nginx/segapp.conf's uwsgi_params), less the body."""
    return {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/infer", "REQUEST_URI": "/infer", "QUERY_STRING": "",
        "CONTENT_TYPE": "image/jpeg", "CONTENT_LENGTH": str(len(data)), "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost", "SERVER_PORT": "8080", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
        "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*",
        "HTTP_X_REQUEST_ID": "5d41402abc4b2a76b9719d911017c592", "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def _round(tree: str | None, data: bytes, requests: int, log_format: str, results) -> None:
    """One round of every figure, in this (spawned) process, on `tree`'s segapp (None: this checkout's)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    if tree:
        use_tree(tree)
    import segapp.resources as resources
    from segapp.config import Settings
    from segapp.imaging import decode_image
    from segapp.wsgi import make_app

    app = make_app(Settings.from_env({"SEGAPP_THREADS": "1", "SEGAPP_LOG_FORMAT": log_format}))
    segmenter = app.repository.default
    result = segmenter.segment(data)
    body = resources.encode("png", result, segmenter)
    segmenter.segment = lambda data, full_pixels=False, cpu_seconds=None: result
    resources.encode = lambda answer, result, segmenter: body
    base = _environ(data)

    def request():
        environ = {**base, "wsgi.input": io.BytesIO(data)}
        answer = b"".join(app(environ, lambda status, headers, exc_info=None: None))
        assert answer == body, answer[:300]

    def cpu_us(call) -> float:
        for _ in range(requests // 10):
            call()
        started = time.thread_time()
        for _ in range(requests):
            call()
        return round((time.thread_time() - started) / requests * 1e6, 2)

    figures = {"handling": cpu_us(request)}
    access = logging.getLogger("segapp.access")
    access.disabled = True
    figures["no access line"] = cpu_us(request)
    access.disabled = False
    metrics = app.metrics
    metrics.observe_request = metrics.observe_inference = lambda *args: None
    metrics.in_flight = _Idle()
    figures["no metrics"] = cpu_us(request)
    figures["decode"] = cpu_us(lambda: decode_image(data, segmenter.max_pixels, draft_size=128))
    results.put({"segapp": segapp_folder(), "figures": figures})


def measure(tree: Path | None, data: bytes, requests: int, log_format: str) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_round, args=(str(tree) if tree else None, data, requests, log_format, results))
    process.start()
    try:
        outcome = results.get(timeout=600)
    finally:
        process.join(timeout=60)
    if process.exitcode:
        raise RuntimeError(f"the measuring process exited with {process.exitcode}")
    return outcome


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.app_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
    parser.add_argument("--baseline", help="a git revision to measure alternately with this checkout")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        data = make_image(Path(scratch), 500, 375).read_bytes()
        trees = {"new": None}
        if args.baseline:
            trees["baseline"] = stack.enter_context(worktree(args.baseline, Path(scratch) / "baseline"))
        rounds = {name: [] for name in trees}
        for index in range(args.rounds):
            for name in (list(trees) if index % 2 == 0 else list(reversed(trees))):
                outcome = measure(trees[name], data, args.requests, args.log_format)
                rounds[name].append(outcome["figures"])
                print(f"round {index + 1} {name} ({outcome['segapp']}): {outcome['figures']}", flush=True)
    medians = {name: {figure: round(statistics.median(r[figure] for r in runs), 2) for figure in FIGURES}
               for name, runs in rounds.items()}
    result = {"requests": args.requests, "rounds": args.rounds, "log_format": args.log_format,
              "baseline": args.baseline, "medians_us": medians, "rounds_us": rounds}
    print(json.dumps(result, indent=1))
    print("\n| figure, us of CPU a request | " + " | ".join(trees) + (" | new / baseline |" if args.baseline else ""))
    print("| --- |" + " ---: |" * (len(trees) + (1 if args.baseline else 0)))
    for figure in FIGURES:
        cells = [str(medians[name][figure]) for name in trees]
        if args.baseline:
            cells.append(f"{medians['new'][figure] / medians['baseline'][figure]:.3f}")
        print(f"| {figure} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
