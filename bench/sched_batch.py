"""What nginx's SCHED_BATCH (uwsgi/local.ini) does on a loaded machine: one stack, nginx's policy switched between
rounds, so that the machine's own noise falls on both alike.

    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.sched_batch [--rounds 16] [--seconds 10] [--concurrency 8]

One stack as bench.layers runs it (2 workers x 1 engine thread, the per-address limits lifted); before each round
`chrt -p` sets nginx's master and worker to SCHED_OTHER (the default) or SCHED_BATCH (what local.ini starts it
with), in the order other, batch, batch, other, ... (each pair's first is the other's second, so a drift of the
machine falls on both alike); then wrk at `--concurrency` for `--seconds`. Per round: requests/s, CPU ms a request by
process (/proc), wrk's CPU, and the context switches a request of nginx and the workers (/proc/PID/status). Prints
each round, then the medians per policy and the median of the pairs' ratios (batch / other).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.images import make_image
from bench.layers import children_cpu, process_cpu, roles
from bench.load import wrk
from bench.peers import STACK_ENV
from bench.stack import Stack


def context_switches(pids: list[int]) -> int:
    """Voluntary and involuntary context switches of `pids` so far."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def one_round(stack: Stack, image: Path, grouped: dict, policy: str, seconds: float, concurrency: int) -> dict:
    for pid in grouped["nginx"]:
        subprocess.run(["chrt", "--batch" if policy == "batch" else "--other", "-p", "0", str(pid)], check=True)
    watched = grouped["nginx"] + grouped["workers"]
    cpu_before = {role: sum(process_cpu(pid) for pid in pids) for role, pids in grouped.items()}
    load_before, switches_before = children_cpu(), context_switches(watched)
    result = wrk(stack.url + "/infer", image, concurrency, seconds)
    cpu_after = {role: sum(process_cpu(pid) for pid in pids) for role, pids in grouped.items()}
    load_cpu, switches = children_cpu() - load_before, context_switches(watched) - switches_before
    answered = sum(count for status, count in result["statuses"].items() if 200 <= status < 300)
    return {
        "policy": policy, "requests_per_s": result["requests_per_s"], "p50_ms": result["p50_ms"],
        "non_2xx": result["non_2xx"],
        "nginx_cpu_ms": round((cpu_after["nginx"] - cpu_before["nginx"]) * 1000 / answered, 3),
        "workers_cpu_ms": round((cpu_after["workers"] - cpu_before["workers"]) * 1000 / answered, 3),
        "wrk_cpu_ms": round(load_cpu * 1000 / answered, 3),
        "context_switches": round(switches / answered, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.sched_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="an even number: pairs of other and batch")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="segapp-sched-") as scratch:
        image = make_image(Path(scratch), 500, 375)
        with Stack.start(Path(scratch) / "run", STACK_ENV) as stack:
            wrk(stack.url + "/infer", image, args.concurrency, 3)
            grouped = roles(stack)
            for index in range(args.rounds):
                policy = ("other", "batch")[(index + index // 2) % 2]  # other, batch, batch, other, other, ...
                rounds.append(one_round(stack, image, grouped, policy, args.seconds, args.concurrency))
                print(json.dumps(rounds[-1]), flush=True)
            assert sorted(stack.worker_pids()) == grouped["workers"], "a worker was replaced during the run"
    figures = ("requests_per_s", "p50_ms", "nginx_cpu_ms", "workers_cpu_ms", "wrk_cpu_ms", "context_switches")
    medians = {policy: {figure: round(statistics.median(r[figure] for r in rounds if r["policy"] == policy), 3)
                        for figure in figures} for policy in ("other", "batch")}
    pairs = [(rounds[i], rounds[i + 1]) for i in range(0, len(rounds) - 1, 2)]
    ratios = {figure: round(statistics.median(
        (b if b["policy"] == "batch" else a)[figure] / (a if a["policy"] == "other" else b)[figure]
        for a, b in pairs), 3) for figure in figures}
    print(json.dumps({"rounds": args.rounds, "seconds": args.seconds, "concurrency": args.concurrency,
                      "medians": medians, "median_ratio_of_pairs_batch_over_other": ratios,
                      "non_2xx": sum(r["non_2xx"] for r in rounds)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
