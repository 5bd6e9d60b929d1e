"""Where a request's time goes outside the engine: the WSGI app in-process, stage medians and a cProfile.

    .venv/bin/python -m bench.profile_request [--size 500x375] [--requests 300]

No nginx, no uWSGI: the app is called through WebOb, as uWSGI would call it, on a JPEG of a held-out scene.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from webob import Request

from bench.run import make_image
from segapp.config import Settings
from segapp.wsgi import make_app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile_request", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="500x375")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--format", default="png", choices=("png", "json", "overlay"))
    args = parser.parse_args(argv)

    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        data = make_image(Path(scratch), width, height).read_bytes()
    app = make_app(Settings())
    engine = app.segmenter.engine
    batch = np.random.default_rng(0).random((1, 128, 128, 3)).astype(np.float32)

    def request():
        blank = Request.blank(f"/infer?format={args.format}", method="POST", body=data, content_type="image/jpeg")
        return blank.get_response(app)

    for _ in range(20):
        request()
    totals, stages = [], {}
    for _ in range(args.requests):
        started = time.perf_counter()
        answer = request()
        totals.append((time.perf_counter() - started) * 1000)
        for part in answer.headers["Server-Timing"].split(", "):
            name, duration = part.split(";dur=")
            stages.setdefault(name, []).append(float(duration))
    engine_ms = []
    for _ in range(args.requests):
        started = time.perf_counter()
        engine.predict(batch)
        engine_ms.append((time.perf_counter() - started) * 1000)

    request_ms, predict_ms = statistics.median(totals), statistics.median(engine_ms)
    print(f"{args.size} JPEG ({len(data)} bytes), {args.format} answer, medians of {args.requests} requests:")
    print(f"  request through the WSGI app  {request_ms:7.3f} ms")
    print(f"  engine.predict alone          {predict_ms:7.3f} ms")
    print(f"  outside the engine            {request_ms - predict_ms:7.3f} ms")
    for name, values in stages.items():
        print(f"  Server-Timing {name:<15} {statistics.median(values):7.3f} ms")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.requests):
        request()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(14)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
