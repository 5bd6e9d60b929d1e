"""Where the stack's CPU goes that the in-process pipeline does not spend: `perf record -a` over both, by process and
library, in CPU ms a request.

    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.perf_layers [--seconds 10] [--concurrency 8] [--size 500x375]
                                                               [--baseline REF]

Needs perf (Debian's linux-perf) and root, or kernel.perf_event_paranoid <= 0. Two loads, one after the other, each
sampled machine-wide for `--seconds` by the cpu-clock software event (no hardware counters needed, so it works in a
VM) once it runs steadily:

- in-process: 2 processes calling the WSGI app flat out on the JPEG (bench.profile_request.in_process, the serving
  efficiency's denominator);
- stack: wrk at `--concurrency` against nginx -> uWSGI -> segapp (2 workers x 1 engine thread, the per-address limits
  lifted), as bench.layers runs it.

Each sample is charged to its process (the app, uWSGI's workers, nginx, wrk, the rest) and library (the engine,
the interpreter, the image codecs, NumPy, the upsampler, libc, the kernel, uWSGI's and nginx's own code); a share of
the samples times the machine's CPUs over the requests a second is CPU ms a request. The same library costing the
same in both is the pipeline; what the stack adds is in its own rows. `--baseline REF`: REF's stack (a git worktree)
is measured too, right after this checkout's, and shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

from bench.images import make_image
from bench.load import wrk
from bench.peers import STACK_ENV
from bench.profile_request import in_process
from bench.run import worktree
from bench.stack import ROOT, Stack

# Library groups, by a part of the shared object's name (the first that matches).
LIBRARIES = (
    ("engine (LiteRT)", ("litert", "tensorflow", "xnnpack")),
    ("Python interpreter", ("libpython",)),
    ("image codecs (libjpeg, Pillow, zlib)", ("libjpeg", "_imaging", "libz", "zlib", "libpng")),
    ("NumPy", ("_multiarray",)),
    ("upsampler (segapp._upsampling)", ("_upsampling",)),
    ("libc", ("libc.so", "libm.so", "ld-linux")),
    ("kernel", ("[kernel",)),
    ("uWSGI's own code", ("uwsgi",)),
    ("nginx's own code and its libraries", ("nginx", "libpcre", "libcrypto", "libssl")),
    ("wrk and LuaJIT", ("wrk", "luajit", "[JIT]")),
)
PROCESSES = {"python": "in-process app", "uwsgi": "uWSGI workers", "nginx": "nginx", "wrk": "wrk"}
WARM_UP_S = 6


def library_group(dso: str) -> str:
    for name, parts in LIBRARIES:
        if any(part in dso for part in parts):
            return name
    return "other"


def record(seconds: float, output: Path) -> dict[tuple[str, str], float]:
    """Sample every CPU for `seconds`: {(process group, library group): share of all samples, idle included}."""
    subprocess.run(["perf", "record", "-a", "-F", "499", "-o", str(output), "--", "sleep", str(seconds)],
                   check=True, capture_output=True)
    report = subprocess.run(["perf", "report", "-i", str(output), "--stdio", "--sort", "comm,dso",
                             "--field-separator", ";"], check=True, capture_output=True, text=True).stdout
    shares = defaultdict(float)
    for line in report.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        share, comm, dso = (part.strip() for part in line.split(";", 2))
        if comm == "swapper":  # idle
            continue
        shares[(PROCESSES.get(comm, "other processes"), library_group(dso))] += float(share.rstrip("%")) / 100
    return dict(shares)


def while_running(load, seconds: float, output: Path) -> tuple[dict, dict]:
    """Run `load()` in a thread, record once it is warm; (load's result, the samples' shares)."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=load()))
    thread.start()
    time.sleep(WARM_UP_S)
    shares = record(seconds, output)
    thread.join()
    return outcome["result"], shares


def per_request(shares: dict, requests_per_s: float) -> dict[str, dict[str, float]]:
    """CPU ms a request by process and library: a share of the machine's samples x its CPUs / the requests a second."""
    table = defaultdict(dict)
    for (process, library), share in shares.items():
        table[process][library] = round(share * os.cpu_count() * 1000 / requests_per_s, 3)
    return {process: dict(sorted(row.items(), key=lambda item: -item[1])) for process, row in table.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.perf_layers", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="500x375")
    parser.add_argument("--baseline", metavar="REF", help="measure REF's stack too, after this checkout's")
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.split("x"))
    load_seconds = WARM_UP_S + args.seconds + 4
    stacks = {}
    with tempfile.TemporaryDirectory(prefix="segapp-perf-") as scratch, ExitStack() as trees:
        image = make_image(Path(scratch), width, height)
        data = image.read_bytes()
        # The spawned processes load their engines within the warm-up, then run flat out for the rest.
        alone, alone_shares = while_running(lambda: in_process(data, "", 2, 1, load_seconds - 3), args.seconds,
                                            Path(scratch) / "in-process.data")
        roots = {"stack": ROOT}
        if args.baseline:
            roots[f"stack at {args.baseline}"] = trees.enter_context(worktree(args.baseline, Path(scratch) / "base"))
        for name, root in roots.items():
            # The workers import the tree's own segapp (bench.run.stack_env says why).
            with Stack.start(Path(scratch) / f"run-{len(stacks)}", {**STACK_ENV, "PYTHONPATH": str(root)},
                             root=root) as stack:
                wrk(stack.url + "/infer", image, args.concurrency, 3)
                served, shares = while_running(
                    lambda stack=stack: wrk(stack.url + "/infer", image, args.concurrency, load_seconds),
                    args.seconds, Path(scratch) / f"stack-{len(stacks)}.data")
            stacks[name] = {"requests_per_s": served["requests_per_s"], "non_2xx": served["non_2xx"],
                            "ms": per_request(shares, served["requests_per_s"])}
    result = {
        "image": args.size, "concurrency": args.concurrency, "seconds": args.seconds, "nproc": os.cpu_count(),
        "in_process_requests_per_s": alone["requests_per_s"],
        "in_process_ms": per_request(alone_shares, alone["requests_per_s"]), "stacks": stacks,
    }
    print(json.dumps(result, indent=1))
    libraries = [name for name, _ in LIBRARIES] + ["other"]
    columns = [("in-process app", result["in_process_ms"].get("in-process app", {}))]
    for name, measured in stacks.items():
        columns += [(f"{name}: {process}", measured["ms"].get(process, {}))
                    for process in ("uWSGI workers", "nginx", "wrk", "other processes")]
    print(f"\nCPU ms a request, {args.size} JPEG: in-process {alone['requests_per_s']} requests/s; at "
          f"c={args.concurrency}: " + ", ".join(f"{name} {measured['requests_per_s']} requests/s"
                                                 for name, measured in stacks.items()) + "\n")
    print("| library | " + " | ".join(name for name, _ in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for library in libraries:
        cells = [row.get(library) for _, row in columns]
        if any(cells):
            print(f"| {library} | " + " | ".join(f"{cell:.3f}" if cell else "" for cell in cells) + " |")
    print("| all | " + " | ".join(f"{sum(row.values()):.3f}" for _, row in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
