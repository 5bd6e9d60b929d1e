"""The load benchmark: the real stack beside the in-process pipeline and the engine alone, measured in one run;
with --baseline REF, the same benchmark on git revision REF in the same run, each figure beside new/baseline.

    make bench                                # 7 concurrencies x 3 images (up to 12 MP), 10 s each: about 6 minutes
    make bench BENCH_ARGS="--baseline main"   # and the same on main, interleaved, ratios new/baseline: about 12 min
    .venv/bin/python -m bench.run --concurrency 1,2 --seconds 1 --images 500x375   # a smoke run

Writes bench/results/<name>.json and <name>.png (throughput and p99 against concurrency, engine-alone line drawn)
and prints the tables as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.engine_alone import engine_alone
from bench.images import make_image
from bench.load import open_loop, wrk
from bench.profile_request import in_process
from bench.stack import ROOT, Stack

# Figures that name a point rather than measure it: copied into the ratios, not divided.
NOT_MEASURED = {"concurrency", "processes", "threads", "rate_per_s", "best_concurrency"}
# wrk's timeout in the sweep: 64 connections of 12 MP photos queue for about 16 s on 2 cores, which the table should
# show as latency, not as wrk's timeouts; beyond nginx's uwsgi_read_timeout (60 s) nginx answers 504 itself.
SWEEP_TIMEOUT_S = 60


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


def git(*args: str, tree: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True, text=True).stdout.strip()


def revision(tree: Path) -> dict:
    """The commit checked out in `tree`, and whether tracked files differ from it."""
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", tree=tree))
    return {"root": str(tree), "commit": git("rev-parse", "HEAD", tree=tree), "dirty": dirty}


def build_compiled(tree: Path) -> None:
    """Build `tree`'s compiled modules in place (setup.py's extensions), as the editable install builds this
    checkout's: a baseline tree without them would be measured on its NumPy fallback."""
    if (tree / "setup.py").exists():
        subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=tree, check=True,
                       capture_output=True)


@contextlib.contextmanager
def worktree(ref: str, path: Path):
    """`ref` checked out at `path` as a detached git worktree of this checkout, its compiled modules built; removed
    afterwards."""
    git("worktree", "add", "--detach", "--quiet", str(path), ref)
    try:
        build_compiled(path)
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def stack_env(args, tree: Path, processes: int) -> dict:
    # All load comes from one address: lift nginx's per-client rate and in-flight limits, or it would answer
    # 429s and the benchmark would measure the limits instead of the stack.
    extra = {"SEGAPP_NGINX_RATE": "100000r/s", "SEGAPP_NGINX_BURST": "100000",
             "SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT": "65535",
             "SEGAPP_PROCESSES": str(processes), "SEGAPP_THREADS": str(args.threads),
             # The workers must run the tree's own segapp, not the one the venv installs in editable mode (this
             # checkout's, through a finder that comes after sys.path). uWSGI already puts its working directory
             # (Stack.start's cwd: the tree) first on sys.path; PYTHONPATH makes that explicit. Checked per stack
             # by workers_model().
             "PYTHONPATH": str(tree)}
    if args.model:
        extra["SEGAPP_MODEL"] = str(args.model)
    if args.listen:
        extra["SEGAPP_LISTEN"] = str(args.listen)
    return extra


def workers_model(stack: Stack, tree: Path, model_given: bool) -> list[str]:
    """The .tflite files the stack's workers have mapped (LiteRT maps the model it loads). With no --model, that is
    the default beside the segapp the workers imported: one outside `tree` means they imported another segapp."""
    mapped = set()
    for pid in stack.worker_pids():
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if line.endswith(".tflite"):
                mapped.add(line.split(maxsplit=5)[-1])
    strays = [path for path in mapped if not Path(path).is_relative_to(tree)]
    if strays and not model_given:
        raise RuntimeError(f"the workers of the stack from {tree} loaded {strays}: they imported another segapp")
    return sorted(mapped)


def measure(stack: Stack, image: Path, concurrency: int, seconds: float) -> dict:
    cpu_before = stack.cpu_seconds()
    row = wrk(stack.url + "/infer", image, concurrency, seconds, timeout_s=SWEEP_TIMEOUT_S)
    cpu = stack.cpu_seconds() - cpu_before
    row["stack_cpu_ms_per_request"] = round(1000 * cpu / max(row["answers"], 1), 3)
    return row


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processes = args.processes or os.cpu_count()
    args.model = str(Path(args.model).resolve()) if args.model else ""  # each stack runs in its own tree
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    result = {
        "machine": machine(),
        "model": args.model or "each tree's default",
        "layout": {"processes": processes, "threads": args.threads, "listen": args.listen},
        "seconds_per_point": args.seconds,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tree": revision(ROOT),
    }
    with tempfile.TemporaryDirectory(prefix="segapp-bench-") as scratch, contextlib.ExitStack() as cleanup:
        scratch = Path(scratch)
        images = [make_image(scratch, *map(int, size.split("x"))) for size in args.images.split(",")]
        # The new tree's figures are the result's own keys; the baseline's the same keys under "baseline".
        roots, figures = {"new": ROOT}, {"new": result}
        if args.baseline:
            roots["baseline"] = cleanup.enter_context(worktree(args.baseline, scratch / "baseline"))
            figures["baseline"] = result["baseline"] = {"ref": args.baseline, "tree": revision(roots["baseline"])}
            print(f"baseline {args.baseline} ({figures['baseline']['tree']['commit'][:10]}) at {roots['baseline']}")
        for name, root in roots.items():
            print(f"{name}: engine alone, {processes} process(es) x {args.threads} thread(s), {args.engine_seconds} s",
                  flush=True)
            limit = figures[name]["engine_alone"] = engine_alone(args.model, processes, args.threads,
                                                                 args.engine_seconds, tree=root)
            print(f"  {limit['images_per_s']} images/s ({limit['model']})", flush=True)
        for name in roots:
            figures[name]["in_process"], figures[name]["images"] = {}, {}
        for index, image in enumerate(images):
            for name, root in list(roots.items())[:: 1 if index % 2 == 0 else -1]:
                pipeline = in_process(image.read_bytes(), args.model, processes, args.threads, args.engine_seconds,
                                      tree=root)
                figures[name]["in_process"][image.name] = pipeline
                print(f"{name}: in-process pipeline {image.name}: {pipeline['requests_per_s']} requests/s", flush=True)

        stacks = {}
        for name, root in roots.items():
            stack = stacks[name] = cleanup.enter_context(
                Stack.start(scratch / f"run-{name}", stack_env(args, root, processes), root=root))
            figures[name]["ready_s"] = round(stack.ready_s, 3)
            figures[name]["workers_model"] = workers_model(stack, root, bool(args.model))
            print(f"{name}: stack ready in {stack.ready_s:.2f} s at {stack.url}, workers map "
                  f"{figures[name]['workers_model']}", flush=True)
        for image in images:
            for name in roots:
                figures[name]["images"][image.name] = {"bytes": image.stat().st_size, "rows": []}
            for index, concurrency in enumerate(concurrencies):
                # The trees take turns going first, level by level, so a drift in the machine's load hits both alike.
                for name in list(roots)[:: 1 if index % 2 == 0 else -1]:
                    row = measure(stacks[name], image, concurrency, args.seconds)
                    figures[name]["images"][image.name]["rows"].append(row)
                    print(f"  {name} {image.name} c={concurrency}: {row['requests_per_s']} req/s, "
                          f"p99 {row['p99_ms']} ms", flush=True)

        small = images[0]
        for name, stack in stacks.items():
            best = max(row["requests_per_s"] for row in figures[name]["images"][small.name]["rows"])
            if args.open_loop_seconds and best > 0:
                rate = 0.8 * best
                print(f"{name}: open loop at {rate:.1f} req/s for {args.open_loop_seconds} s", flush=True)
                figures[name]["open_loop"] = open_loop("127.0.0.1", stack.port, "/infer", small, rate,
                                                       args.open_loop_seconds)
        for name, stack in stacks.items():
            if args.overload:
                print(f"{name}: overload: c={args.overload} for {args.seconds} s", flush=True)
                figures[name]["overload"] = wrk(stack.url + "/infer", small, args.overload, args.seconds,
                                                timeout_s=2.0)
            figures[name]["worker_rss_mb"] = [round(w["rss"] / 2**20, 1) for w in stack.workers()]

    for tree in figures.values():
        derive(tree, args.threads)
    if args.baseline:
        result["ratios"] = ratios(
            {key: value for key, value in result.items() if key != "baseline"}, result["baseline"])
    stem = args.name or time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{stem}.png")
    print(markdown(result))
    print(f"wrote {out / stem}.json and .png")
    return result


def derive(tree: dict, threads: int) -> None:
    """Add the figures computed from the measured ones: per row, the efficiency against the engine alone and against
    the in-process pipeline, and the CPU outside the engine; per image, the side-by-side summary."""
    limit = tree["engine_alone"]
    engine_cpu_ms = limit["ms_per_image_per_process"] * threads  # CPU ms of one image in the engine
    tree["summary"] = {}
    for name, image in tree["images"].items():
        pipeline = tree["in_process"][name]["requests_per_s"]
        for row in image["rows"]:
            row["efficiency"] = round(row["requests_per_s"] / limit["images_per_s"], 3)
            row["serving_efficiency"] = round(row["requests_per_s"] / pipeline, 3)
            row["cpu_ms_outside_engine"] = round(row["stack_cpu_ms_per_request"] - engine_cpu_ms, 3)
        best = max(image["rows"], key=lambda row: row["requests_per_s"])
        tree["summary"][name] = {
            "engine_alone_images_per_s": limit["images_per_s"],
            "in_process_requests_per_s": pipeline,
            "stack_best_requests_per_s": best["requests_per_s"],
            "best_concurrency": best["concurrency"],
            "serving_efficiency": best["serving_efficiency"],
            "efficiency": best["efficiency"],
        }


def ratios(new, base):
    """new / baseline for every measured figure present in both (dicts by key, lists item by item)."""
    if isinstance(new, dict) and isinstance(base, dict):
        pairs = {key: new[key] if key in NOT_MEASURED else ratios(new[key], base[key]) for key in new if key in base}
        return {key: value for key, value in pairs.items() if value is not None}
    if isinstance(new, list) and isinstance(base, list) and len(new) == len(base):
        return [ratios(a, b) for a, b in zip(new, base, strict=True)]
    if isinstance(new, (int, float)) and isinstance(base, (int, float)) and not isinstance(new, bool):
        return round(new / base, 3) if base > 0 and new >= 0 else None  # a negative figure is noise
    return None


def markdown(result: dict) -> str:
    """The benchmark's tables in Markdown; with a baseline, each cell is "new / baseline (ratio)"."""
    base, ratio = result.get("baseline"), result.get("ratios")

    def cell(*path):
        value = lookup(result, path)
        if base is None:
            return f"{value}"
        share = lookup(ratio, path)
        shown = f" ({share}x)" if isinstance(share, (int, float)) and path[-1] not in NOT_MEASURED else ""
        return f"{value} / {lookup(base, path)}{shown}"

    lines = []
    if base:
        dirty = " + uncommitted changes" if result["tree"]["dirty"] else ""
        lines += [f"new: {result['tree']['commit'][:10]}{dirty}; baseline: {base['ref']} "
                  f"({base['tree']['commit'][:10]}); cells: new / baseline (new/baseline)", ""]
    lines += [
        f"engine alone: {cell('engine_alone', 'images_per_s')} images/s ({result['layout']['processes']} x "
        f"{result['layout']['threads']}); ready in {cell('ready_s')} s; worker RSS {cell('worker_rss_mb')} MB",
        "",
        "| image | engine alone, images/s | in-process pipeline, requests/s | stack, best requests/s "
        "| stack / in-process (serving efficiency) | stack / engine alone |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in result["images"]:
        summary = ("summary", name)
        lines.append(
            f"| {name} | {cell(*summary, 'engine_alone_images_per_s')} | {cell(*summary, 'in_process_requests_per_s')} "
            f"| {cell(*summary, 'stack_best_requests_per_s')} (c={result['summary'][name]['best_concurrency']}) "
            f"| {cell(*summary, 'serving_efficiency')} | {cell(*summary, 'efficiency')} |"
        )
    lines.append("")
    columns = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "non_2xx", "efficiency", "serving_efficiency",
               "cpu_ms_outside_engine")
    for name, image in result["images"].items():
        lines += [
            f"{name} ({image['bytes']} bytes)",
            "",
            "| concurrency | requests/s | p50 ms | p90 ms | p99 ms | non-2xx | stack / engine alone "
            "| stack / in-process | CPU ms/req outside engine |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for index, row in enumerate(image["rows"]):
            cells = " | ".join(cell("images", name, "rows", index, column) for column in columns)
            lines.append(f"| {row['concurrency']} | {cells} |")
        lines.append("")
    if "open_loop" in result:
        o = ("open_loop",)
        lines.append(
            f"open loop at {cell(*o, 'rate_per_s')} req/s: p50 {cell(*o, 'p50_ms')} ms, p90 {cell(*o, 'p90_ms')} ms, "
            f"p99 {cell(*o, 'p99_ms')} ms, max {cell(*o, 'max_ms')} ms, statuses {cell(*o, 'statuses')}"
        )
    if "overload" in result:
        o = ("overload",)
        lines.append(
            f"overload c={result['overload']['concurrency']}: statuses {cell(*o, 'statuses')}, socket errors "
            f"{cell(*o, 'socket_errors')}, p99 {cell(*o, 'p99_ms')} ms, max {cell(*o, 'max_ms')} ms"
        )
    return "\n".join(lines)


def lookup(figures, path):
    for key in path:
        try:
            figures = figures[key]
        except (KeyError, IndexError, TypeError):
            return "-"
    return figures


def plot(result: dict, path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per image and tree, the engine-alone limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    trees = [(result, "", "-")] + ([(result["baseline"], " (baseline)", ":")] if "baseline" in result else [])
    for tree, suffix, style in trees:
        for index, (name, image) in enumerate(tree["images"].items()):
            line = {"marker": "o", "linestyle": style, "color": f"C{index}", "label": name + suffix}
            rows = image["rows"]
            c = [r["concurrency"] for r in rows]
            throughput.plot(c, [r["requests_per_s"] for r in rows], **line)
            latency.plot(c, [r["p99_ms"] for r in rows], **line)
    for tree, suffix, style in trees:
        throughput.axhline(tree["engine_alone"]["images_per_s"], color="grey", linestyle=style, label="engine alone"
                           + suffix)
    for axis, title, unit in ((throughput, "throughput", "requests/s"), (latency, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")  # 12 MP photos are served a hundred times slower than 500x375 ones
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
    parser.add_argument("--model", default="", help="the model file for every tree (default: each tree's own)")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    parser.add_argument("--images", default="500x375,1920x1080,4032x3024", help="comma-separated WIDTHxHEIGHT")
    parser.add_argument("--baseline", default="", metavar="REF",
                        help="also run the benchmark on git revision REF (a temporary worktree), interleaved")
    parser.add_argument("--seconds", type=float, default=10, help="per concurrency level")
    parser.add_argument("--engine-seconds", type=float, default=10,
                        help="the engine-alone pass and each image's in-process pipeline pass")
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
