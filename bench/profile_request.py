"""Where a request's time goes outside the engine: the WSGI app in-process, stage medians and a cProfile; and
`in_process`, the in-process pipeline that bench.run sets beside the engine alone and the stack.

    .venv/bin/python -m bench.profile_request [--size 500x375] [--requests 300]

No nginx, no uWSGI: the app is called through WebOb, as uWSGI would call it, on a JPEG of a held-out scene: the same
work as a request through the stack (decode, network, upsample, PNG), without HTTP.
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

from bench.engine_alone import flat_out
from bench.images import make_image
from segapp.config import Settings
from segapp.wsgi import make_app


def app_request(app, data: bytes, fmt: str = "png"):
    """One POST /infer of `data` through the WSGI `app`, in-process; the response."""
    blank = Request.blank(f"/infer?format={fmt}", method="POST", body=data, content_type="image/jpeg")
    return blank.get_response(app)


def _pipeline(data: bytes, model: str, threads: int):
    # Imported here: flat_out's worker has switched segapp to the tree being measured by now.
    from segapp.config import Settings
    from segapp.wsgi import make_app

    environ = {"SEGAPP_THREADS": str(threads), **({"SEGAPP_MODEL": model} if model else {})}
    settings = Settings.from_env(environ)
    app = make_app(settings)
    answer = app_request(app, data)
    if answer.status_code != 200:
        raise RuntimeError(f"the in-process app answered {answer.status}: {answer.body[:300]!r}")
    return (lambda: app_request(app, data)), {"model": str(settings.model), "answer_bytes": len(answer.body)}


def in_process(data: bytes, model: str, processes: int, threads: int, seconds: float, tree=None) -> dict:
    """Requests per second of `processes` in-process apps (`threads` engine threads each) answering PNG masks of the
    JPEG `data` flat out, the stack's layout without uWSGI, nginx or HTTP; `model` empty: the tree's default."""
    figures = flat_out(_pipeline, (data, model, threads), processes, seconds, tree)
    return {
        "requests_per_s": figures["per_s"],
        "ms_per_request_per_process": figures["ms_per_call_per_process"],
        "model": figures["model"],
        "segapp": figures["segapp"],
    }


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
    segmenter = app.repository.default
    engine = segmenter.engine
    batch, _ = segmenter.prepare(np.zeros((height, width, 3), np.uint8))  # the network's own input

    def request():
        return app_request(app, data, args.format)

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
