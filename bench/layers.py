"""Where a request's CPU goes, layer by layer: nginx, uWSGI's master, the workers, and within the workers the image
pipeline (decode, network, upsample, PNG) and the serving around it (uWSGI's C side, segapp's request handling).

    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.layers [--seconds 20] [--concurrency 8] [--size 500x375]
                                                          [--log-format text|json] [--baseline REF --rounds 3]

One stack as `make serve` starts it (2 workers x 1 engine thread, the per-address limits lifted, as one load
address); wrk posts one photo-like JPEG for `--seconds` at `--concurrency`. The CPU time (utime + stime in
/proc/PID/stat) of every process of the stack is read before and after, grouped by role, and divided by the
requests answered; wrk's own CPU (it shares the two cores) comes from this process's reaped children. The pipeline's
CPU per request is measured in-process on the same JPEG (this thread's CPU time around `Segmenter.segment` and
`mask_to_png`, the engine on this thread); and inside the workers, in the same run, their own /metrics (request
duration and stage times of /infer) split the workers' CPU into the stages, the app around them, and the rest.

`--baseline REF`: the same measurement of this checkout and of REF (a git worktree, bench.run's), alternating for
`--rounds`; the medians of each and their ratios (this checkout / REF): a change's cost or gain per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from bench.images import make_image
from bench.load import wrk
from bench.run import worktree
from bench.stack import CLOCK_TICKS, ROOT, Stack


def process_cpu(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def roles(stack: Stack) -> dict[str, list[int]]:
    """The stack's processes by role: nginx (master and workers), the uWSGI master, the workers."""
    workers = set(stack.worker_pids())
    grouped = {"nginx": [], "uwsgi_master": [stack.process.pid], "workers": sorted(workers)}
    for pid in stack.processes() - workers - {stack.process.pid}:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if command.startswith(b"nginx"):
            grouped["nginx"].append(pid)
    return grouped


def app_seconds(stack: Stack) -> dict[str, float]:
    """From the workers' own /metrics: /infer's request count and summed duration, and each stage's summed time."""
    from prometheus_client.parser import text_string_to_metric_families

    figures = {"count": 0.0, "request": 0.0, "stages": 0.0}
    for family in text_string_to_metric_families(stack.request("GET", "/metrics").body.decode()):
        for sample in family.samples:
            if sample.name == "segapp_request_duration_seconds_count" and sample.labels.get("route") == "/infer":
                figures["count"] += sample.value
            elif sample.name == "segapp_request_duration_seconds_sum" and sample.labels.get("route") == "/infer":
                figures["request"] += sample.value
            elif sample.name == "segapp_stage_duration_seconds_sum":
                figures["stages"] += sample.value
    return figures


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline_cpu_ms(image: Path, requests: int) -> float:
    """Median CPU ms of this thread for the work of one request in-process: segment the JPEG, encode the PNG."""
    from segapp.inference import Segmenter
    from segapp.masks import mask_to_png

    segmenter = Segmenter(threads=1).load()
    palette, data, samples = segmenter.card["palette"], image.read_bytes(), []
    for attempt in range(requests + 5):
        started = time.thread_time()
        mask_to_png(segmenter.segment(data).mask, palette)
        if attempt >= 5:  # warm-up first
            samples.append(time.thread_time() - started)
    return statistics.median(samples) * 1000


def measure(image: Path, seconds: float, concurrency: int, log_format: str = "text", root: Path = ROOT) -> dict:
    env = {"SEGAPP_PROCESSES": "2", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "100000r/s",
           "SEGAPP_NGINX_BURST": "100000", "SEGAPP_MAX_REQUESTS": "1000000", "SEGAPP_LOG_FORMAT": log_format}
    with tempfile.TemporaryDirectory(prefix="segapp-layers-") as run_dir, \
            Stack.start(Path(run_dir), env, root=root) as stack:
        wrk(stack.url + "/infer", image, concurrency, 3)  # warm-up: both workers, nginx's buffers
        grouped = roles(stack)
        app_before = app_seconds(stack)
        before = {role: sum(process_cpu(pid) for pid in pids) for role, pids in grouped.items()}
        load_before = children_cpu()
        result = wrk(stack.url + "/infer", image, concurrency, seconds)
        load_cpu = children_cpu() - load_before
        after = {role: sum(process_cpu(pid) for pid in pids) for role, pids in grouped.items()}
        app_after = app_seconds(stack)
        assert sorted(stack.worker_pids()) == grouped["workers"], "a worker was replaced during the run"
    answered = sum(count for status, count in result["statuses"].items() if 200 <= status < 300)
    per_request = {role: (after[role] - before[role]) * 1000 / answered for role in grouped}
    per_request["wrk"] = load_cpu * 1000 / answered
    # Inside the workers, from their own clocks (wall time, one request at a time per worker): the stages, the app's
    # handling around them, and what the app does not see (uWSGI's C side, writing the answer, the access line).
    app = {key: app_after[key] - app_before[key] for key in app_after}
    stages = app["stages"] * 1000 / app["count"]
    handled = app["request"] * 1000 / app["count"]
    per_request["workers: stages (decode, infer, postprocess, encode), the app's clock"] = stages
    per_request["workers: the app around the stages, the app's clock"] = handled - stages
    per_request["workers: outside the app (CPU - the app's time)"] = per_request["workers"] - handled
    return {"requests_per_s": result["requests_per_s"], "answered": answered, "non_2xx": result["non_2xx"],
            "p50_ms": result["p50_ms"], "cpu_ms_per_request": {k: round(v, 3) for k, v in per_request.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="500x375", help="the JPEG's WIDTHxHEIGHT")
    parser.add_argument("--pipeline-requests", type=int, default=300)
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="SEGAPP_LOG_FORMAT: text, three request lines (nginx, uWSGI, the app); json, two")
    parser.add_argument("--baseline", metavar="REF", help="measure REF too, alternating, and give the ratios")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: rounds of each")
    options = parser.parse_args(argv)
    width, height = (int(side) for side in options.size.split("x"))
    if options.baseline:
        return compare(options, width, height)
    with tempfile.TemporaryDirectory(prefix="segapp-layers-image-") as folder:
        image = make_image(Path(folder), width, height)
        stack = measure(image, options.seconds, options.concurrency, options.log_format)
        pipeline = pipeline_cpu_ms(image, options.pipeline_requests)
    layers = stack["cpu_ms_per_request"]
    layers["workers: pipeline (in-process)"] = round(pipeline, 3)
    layers["workers: the rest (uWSGI, segapp's handling)"] = round(layers["workers"] - pipeline, 3)
    print(json.dumps({"image": options.size, "concurrency": options.concurrency, "seconds": options.seconds,
                      "log_format": options.log_format, "nproc": os.cpu_count(), **stack}, indent=1))


def compare(options, width: int, height: int) -> None:
    """This checkout against `options.baseline`, alternating rounds: medians per figure, and new / baseline."""
    runs = {"new": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="segapp-layers-image-") as folder, \
            worktree(options.baseline, Path(folder) / "baseline") as baseline:
        image = make_image(Path(folder), width, height)
        trees = [("new", ROOT), ("baseline", baseline)]
        for index in range(options.rounds):
            for name, tree in trees if index % 2 == 0 else trees[::-1]:
                runs[name].append(measure(image, options.seconds, options.concurrency, options.log_format, tree))
    medians = {}
    for name, results in runs.items():
        figures = {"requests_per_s": [result["requests_per_s"] for result in results],
                   "p50_ms": [result["p50_ms"] for result in results]}
        for result in results:
            for layer, ms in result["cpu_ms_per_request"].items():
                figures.setdefault(layer, []).append(ms)
        medians[name] = {figure: round(statistics.median(values), 3) for figure, values in figures.items()}
    ratios = {figure: round(medians["new"][figure] / medians["baseline"][figure], 3)
              for figure in medians["new"] if medians["baseline"].get(figure)}
    print(json.dumps({"image": options.size, "concurrency": options.concurrency, "seconds": options.seconds,
                      "rounds": options.rounds, "baseline": options.baseline, "nproc": os.cpu_count(),
                      "medians": medians, "new_over_baseline": ratios, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
