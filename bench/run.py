"""The load benchmark: the real stack against the engine alone, measured in one run.

    make bench                       # the full run: 7 concurrencies x 2 images, 10 s each (about 6 minutes)
    .venv/bin/python -m bench.run --concurrency 1,2 --seconds 1 --images 500x375   # a smoke run

Writes bench/results/<name>.json and <name>.png (throughput and p99 against concurrency, engine-alone line drawn)
and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.engine_alone import engine_alone
from bench.load import open_loop, wrk
from bench.stack import ROOT, Stack
from segapp import scenes
from segapp.inference import SHIPPED_MODEL


def make_image(folder: Path, width: int, height: int) -> Path:
    """A photograph-like JPEG of a held-out synthetic scene, at the size asked."""
    pixels, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], width * 7 + height, size=(width, height))
    path = folder / f"scene-{width}x{height}.jpg"
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    path.write_bytes(out.getvalue())
    return path


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processes = args.processes or os.cpu_count()
    result = {
        "machine": machine(),
        "model": str(Path(args.model).relative_to(ROOT)) if Path(args.model).is_relative_to(ROOT) else args.model,
        "layout": {"processes": processes, "threads": args.threads, "listen": args.listen},
        "seconds_per_point": args.seconds,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with tempfile.TemporaryDirectory(prefix="segapp-bench-") as scratch:
        scratch = Path(scratch)
        images = [make_image(scratch, *map(int, size.split("x"))) for size in args.images.split(",")]
        print(f"engine alone: {processes} process(es) x {args.threads} thread(s), {args.engine_seconds} s", flush=True)
        limit = engine_alone(args.model, processes, args.threads, args.engine_seconds)
        result["engine_alone"] = limit
        print(f"  {limit['images_per_s']} images/s", flush=True)

        # All load comes from one address: lift nginx's per-client rate and in-flight limits, or it would answer
        # 429s and the benchmark would measure the limits instead of the stack.
        extra = {"SEGAPP_MODEL": str(args.model), "SEGAPP_NGINX_RATE": "100000r/s", "SEGAPP_NGINX_BURST": "100000",
                 "SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT": "65535"}
        if args.listen:
            extra["SEGAPP_LISTEN"] = str(args.listen)
        extra.update({"SEGAPP_PROCESSES": str(processes), "SEGAPP_THREADS": str(args.threads)})
        with Stack.start(scratch / "run", extra) as stack:
            result["ready_s"] = round(stack.ready_s, 3)
            print(f"stack ready in {stack.ready_s:.2f} s at {stack.url}", flush=True)
            result["images"] = {}
            for image in images:
                rows = []
                for concurrency in map(int, args.concurrency.split(",")):
                    cpu_before = stack.cpu_seconds()
                    row = wrk(stack.url + "/infer", image, concurrency, args.seconds)
                    cpu = stack.cpu_seconds() - cpu_before
                    row["efficiency"] = round(row["requests_per_s"] / limit["images_per_s"], 3)
                    row["stack_cpu_ms_per_request"] = round(1000 * cpu / max(row["answers"], 1), 3)
                    rows.append(row)
                    print(
                        f"  {image.name} c={concurrency}: {row['requests_per_s']} req/s, p99 {row['p99_ms']} ms",
                        flush=True,
                    )
                result["images"][image.name] = {"bytes": image.stat().st_size, "rows": rows}

            small = images[0]
            best = max(row["requests_per_s"] for row in result["images"][small.name]["rows"])
            if args.open_loop_seconds and best > 0:
                rate = 0.8 * best
                print(f"open loop at {rate:.1f} req/s for {args.open_loop_seconds} s", flush=True)
                result["open_loop"] = open_loop("127.0.0.1", stack.port, "/infer", small, rate, args.open_loop_seconds)
            if args.overload:
                print(f"overload: c={args.overload} for {args.seconds} s", flush=True)
                result["overload"] = wrk(stack.url + "/infer", small, args.overload, args.seconds, timeout_s=2.0)
            result["worker_rss_mb"] = [round(w["rss"] / 2**20, 1) for w in stack.workers()]

    engine_cpu_ms = limit["ms_per_image_per_process"] * args.threads  # CPU ms of one image in the engine
    for image in result["images"].values():
        for row in image["rows"]:
            row["cpu_ms_outside_engine"] = round(row["stack_cpu_ms_per_request"] - engine_cpu_ms, 3)
    stem = args.name or time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{stem}.png")
    print(markdown(result))
    print(f"wrote {out / stem}.json and .png")
    return result


def markdown(result: dict) -> str:
    """The benchmark's tables in Markdown."""
    limit = result["engine_alone"]["images_per_s"]
    lines = [
        f"engine alone: {limit} images/s ({result['layout']['processes']} x {result['layout']['threads']}); "
        f"ready in {result['ready_s']} s; worker RSS {result['worker_rss_mb']} MB",
        "",
    ]
    for name, image in result["images"].items():
        lines += [
            f"{name} ({image['bytes']} bytes)",
            "",
            "| concurrency | requests/s | p50 ms | p90 ms | p99 ms | non-2xx | efficiency "
            "| CPU ms/req outside engine |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in image["rows"]:
            lines.append(
                f"| {r['concurrency']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} "
                f"| {r['non_2xx']} | {r['efficiency']} | {r['cpu_ms_outside_engine']} |"
            )
        lines.append("")
    if "open_loop" in result:
        o = result["open_loop"]
        lines.append(
            f"open loop at {o['rate_per_s']} req/s: p50 {o['p50_ms']} ms, p90 {o['p90_ms']} ms, p99 {o['p99_ms']} ms, "
            f"max {o['max_ms']} ms, statuses {o['statuses']}"
        )
    if "overload" in result:
        o = result["overload"]
        lines.append(
            f"overload c={o['concurrency']}: statuses {o['statuses']}, socket errors {o['socket_errors']}, "
            f"p99 {o['p99_ms']} ms, max {o['max_ms']} ms"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per image, the engine-alone limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, image in result["images"].items():
        c = [r["concurrency"] for r in image["rows"]]
        throughput.plot(c, [r["requests_per_s"] for r in image["rows"]], marker="o", label=name)
        latency.plot(c, [r["p99_ms"] for r in image["rows"]], marker="o", label=name)
    throughput.axhline(result["engine_alone"]["images_per_s"], color="grey", linestyle="--", label="engine alone")
    for axis, title, unit in ((throughput, "throughput", "requests/s"), (latency, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency (wrk connections)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"segapp through nginx + uWSGI, {result['machine']['cores']} cores: {result['machine']['cpu']}", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    parser.add_argument("--images", default="500x375,1920x1080", help="comma-separated WIDTHxHEIGHT")
    parser.add_argument("--seconds", type=float, default=10, help="per concurrency level")
    parser.add_argument("--engine-seconds", type=float, default=10)
    parser.add_argument("--open-loop-seconds", type=float, default=10, help="0 to skip the fixed-rate pass")
    parser.add_argument("--overload", type=int, default=256, help="concurrency of the overload pass (0 to skip)")
    parser.add_argument("--processes", type=int, default=0, help="uWSGI workers (default: cores)")
    parser.add_argument("--threads", type=int, default=1, help="engine threads per worker")
    parser.add_argument("--listen", type=int, default=0, help="uWSGI listen queue (default: the ini's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="", help="file stem of the results (default: a timestamp)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
