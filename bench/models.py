"""Several models in one stack (issue 16): worker memory and ready time with repositories of 1, 2 and 3 models,
/infer of the default model with 1 and with 3 loaded, and the person model on a photograph, in one run.

    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.models [--seconds 10] [--rounds 5] [--concurrency 8] [--ref REF]

Three model repositories, made in a temporary folder from the shipped one (segapp/models; `make models` fetches
`person`): segapp-unet (the int8 demonstration model, the default of all three); + person (MediaPipe's selfie
segmentation, 256x256); + segapp-unet-float (segapp/models/unet.tflite and its card, renamed). Each stack is started as
`make serve` starts it (2 workers x 1 engine thread, the per-address limits lifted: all load comes from one address)
with SEGAPP_MODEL_REPOSITORY set, one stack at a time. For each: its ready time (Stack.ready_s: start to /readyz 200
with every worker's app loaded); a warm-up (wrk: each other model for `--warmup-seconds`, then the default model for
the rest of 3 x `--warmup-seconds`, the same in every stack); memory: each worker's RSS from uWSGI's stats socket and
its private memory (pages no other process maps: what a model loaded after the fork adds to a container once per
worker), the master's and nginx's VmRSS; wrk at `--concurrency` for `--seconds` on /infer of the default model (a
500x375 photo-like JPEG, bench/images.py) and, where it is served, on /infer?model=person (a 500x375 photograph:
scikit-image's astronaut, its top 512x384 scaled); memory again.

`--rounds` rounds of a fresh 1-model and 3-model stack, taking turns (the first of a round goes second in the next, so
a drift in the machine's load hits both alike); the first round starts the 2-model stack too. The ratio 3 models /
1 model is the median of the rounds'. With --ref, the stacks run git revision REF from a temporary worktree (as
bench/run.py's --baseline does), so that others' edits of a shared checkout cannot change the code mid-run.
Writes bench/results/<name>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.images import make_image
from bench.layers import roles
from bench.load import wrk
from bench.overlay_memory import memory_mb
from bench.run import machine, revision, worktree
from bench.stack import ROOT, Stack

SHIPPED = ROOT / "segapp" / "models"
DEFAULT_MODEL = "segapp-unet"
FLOAT_MODEL = "segapp-unet-float"
REPOSITORIES = {1: (DEFAULT_MODEL,), 2: (DEFAULT_MODEL, "person"), 3: (DEFAULT_MODEL, "person", FLOAT_MODEL)}
# All load comes from one address: lift nginx's per-client limits, or the run measures them (as bench/run.py does).
STACK_ENV = {"SEGAPP_PROCESSES": "2", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "100000r/s",
             "SEGAPP_NGINX_BURST": "100000", "SEGAPP_NGINX_MAX_INFLIGHT_PER_CLIENT": "65535",
             "SEGAPP_MAX_REQUESTS": "1000000"}


def make_repository(folder: Path, names: tuple[str, ...]) -> Path:
    """A model repository at `folder` holding `names`, copied from the shipped one; segapp-unet the default."""
    folder.mkdir(parents=True)
    for name in names:
        if name == FLOAT_MODEL:  # the float demonstration network, served under a name of its own
            (folder / name / "1").mkdir(parents=True)
            shutil.copyfile(SHIPPED / "unet.tflite", folder / name / "1" / "model.tflite")
            card = json.loads((SHIPPED / "unet.json").read_text())
            (folder / name / "model.json").write_text(json.dumps({**card, "name": name}, indent=2) + "\n")
            continue
        if not (SHIPPED / name).is_dir():
            raise SystemExit(f"{SHIPPED / name} is missing: run `make models`")
        shutil.copytree(SHIPPED / name, folder / name)
    (folder / "repository.json").write_text(json.dumps({"default_model": DEFAULT_MODEL}) + "\n")
    return folder


def photograph(folder: Path, width: int, height: int) -> Path:
    """A real photograph as a JPEG of `width` x `height`: NASA's astronaut portrait that scikit-image ships, its top
    rows cut to the aspect ratio (her face and suit stay in) and scaled."""
    from PIL import Image
    from skimage import data

    pixels = data.astronaut()
    rows = round(pixels.shape[1] * height / width)
    image = Image.fromarray(pixels[:rows]).resize((width, height), Image.Resampling.LANCZOS)
    path = folder / f"astronaut-{width}x{height}.jpg"
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    path.write_bytes(out.getvalue())
    return path


def private_mb(pid: int) -> float:
    """The memory of one process that no other process maps (Private_Clean + Private_Dirty), in MiB. Unlike PSS it
    does not move with what other processes of a shared machine map (the same venv's libraries)."""
    rows = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rows if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def memory(stack: Stack) -> dict:
    """Each worker's RSS (uWSGI's stats socket, and /proc's VmRSS) and private memory, the master's and nginx's RSS,
    in MiB."""
    grouped = roles(stack)
    workers = sorted(stack.workers(), key=lambda worker: worker["id"])
    figures = {
        "worker_pids": [worker["pid"] for worker in workers],
        "worker_rss_mb": [round(worker["rss"] / 2**20, 1) for worker in workers],
        "worker_vmrss_mb": [round(memory_mb(worker["pid"], "VmRSS"), 1) for worker in workers],
        "master_rss_mb": round(memory_mb(stack.process.pid, "VmRSS"), 1),
        "nginx_rss_mb": round(sum(memory_mb(pid, "VmRSS") for pid in grouped["nginx"]), 1),
        "worker_private_mb": [round(private_mb(worker["pid"]), 1) for worker in workers],
    }
    figures["stack_rss_mb"] = round(sum(figures["worker_rss_mb"]) + figures["master_rss_mb"]
                                    + figures["nginx_rss_mb"], 1)
    return figures


def mapped_models(stack: Stack, tree: Path) -> list[str]:
    """The network files the workers have mapped (LiteRT maps the model it loads), as DIR-relative paths; checks
    that the workers run `tree`'s segapp (its compiled upsampler, where built, is mapped from there)."""
    mapped, segapp = set(), set()
    for pid in stack.worker_pids():
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = Path(line.split(maxsplit=5)[-1])
            if path.suffix == ".tflite":
                mapped.add("/".join(path.parts[-3:]))
            elif path.name.startswith("_upsampling") and path.suffix == ".so":
                segapp.add(path.parent)
    if segapp - {tree / "segapp"}:
        raise RuntimeError(f"the workers run the segapp of {sorted(map(str, segapp))}, not {tree / 'segapp'}")
    return sorted(mapped)


def check_answers(stack: Stack, names: tuple[str, ...], image: Path) -> None:
    """One /infer of each model: 200, answered by the model asked (X-Model)."""
    for name in names:
        answer = stack.infer(image.read_bytes(), f"?model={name}")
        if answer.status != 200 or answer.headers["X-Model"] != f"{name}/1":
            raise RuntimeError(f"model {name}: {answer.status} from {answer.headers['X-Model']}: {answer.body[:300]}")


def load(stack: Stack, image: Path, model: str, concurrency: int, seconds: float) -> dict:
    row = wrk(f"{stack.url}/infer?model={model}", image, concurrency, seconds)
    if row["non_2xx"]:
        raise RuntimeError(f"{row['non_2xx']} failed answers of {row['answers']} for {model}: {row['statuses']}")
    return {key: row[key] for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "answers", "non_2xx")}


def start(scratch: Path, count: int, index: int, scene: Path, photo: Path, args) -> Stack:
    """The stack of the repository of `count` models, answering each model as asked and warmed up."""
    names = REPOSITORIES[count]
    repository = scratch / f"repository-{count}"
    if not repository.exists():
        make_repository(repository, names)
    # PYTHONPATH: the workers import the tree's own segapp, not the one the venv installs (as bench/run.py does).
    env = {**STACK_ENV, "SEGAPP_MODEL_REPOSITORY": str(repository), "PYTHONPATH": str(args.tree)}
    stack = Stack.start(scratch / f"run-{count}-{index}", env, root=args.tree)
    try:
        check_answers(stack, names, scene)
        # Both workers, every model, nginx's buffers; every stack warmed for as long, its default model last: a
        # stack's default model got faster over its first 24 s of load (runs of 4 s: +2% to +21% in three tries).
        for name in names[1:]:
            wrk(f"{stack.url}/infer?model={name}", photo if name == "person" else scene, args.concurrency,
                args.warmup_seconds)
        rest = len(REPOSITORIES[max(REPOSITORIES)]) - len(names) + 1
        wrk(f"{stack.url}/infer", scene, args.concurrency, args.warmup_seconds * rest)
    except BaseException:
        stack.stop()
        raise
    return stack


def measure(stack: Stack, count: int, scene: Path, photo: Path, args) -> dict:
    """One stack's figures: ready time, memory after the warm-up, the default model's load (and the person
    model's where it is served), memory after the load."""
    figures = {"models": count, "ready_s": round(stack.ready_s, 3), "mapped": mapped_models(stack, args.tree),
               "after_warmup": memory(stack)}
    figures["default"] = load(stack, scene, DEFAULT_MODEL, args.concurrency, args.seconds)
    if "person" in REPOSITORIES[count]:
        figures["person"] = load(stack, photo, "person", args.concurrency, args.seconds)
    figures["after_load"] = memory(stack)
    if figures["after_load"]["worker_pids"] != figures["after_warmup"]["worker_pids"]:
        raise RuntimeError(f"a worker of the {count}-model stack was replaced during the run")
    person = f", person {figures['person']['requests_per_s']} req/s" if "person" in figures else ""
    print(f"  {count} model(s): ready in {stack.ready_s:.2f} s, worker RSS {figures['after_warmup']['worker_rss_mb']}"
          f" MiB (private {figures['after_warmup']['worker_private_mb']}); {DEFAULT_MODEL} "
          f"{figures['default']['requests_per_s']} req/s, p50 {figures['default']['p50_ms']} ms{person}", flush=True)
    return figures


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "layout": {"processes": 2, "threads": 1}, "concurrency": args.concurrency, "seconds": args.seconds,
              "warmup_seconds": args.warmup_seconds, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="segapp-models-") as scratch, contextlib.ExitStack() as cleanup:
        scratch = Path(scratch)
        args.tree = cleanup.enter_context(worktree(args.ref, scratch / "tree")) if args.ref else ROOT
        result["ref"], result["tree"] = args.ref or None, revision(args.tree)
        scene, photo = make_image(scratch, 500, 375), photograph(scratch, 500, 375)
        for index in range(args.rounds):
            # One stack up at a time, a fresh one for each run: with two stacks up at once taking turns, the one
            # started later was the faster in 11 of 13 pairs on the busy bench machine, two 1-model stacks as well.
            order = (1, 2, 3) if index == 0 else (1, 3) if index % 2 == 0 else (3, 1)
            print(f"round {index + 1}: {', '.join(map(str, order))} model(s)", flush=True)
            runs = {}
            for count in order:
                with start(scratch, count, index, scene, photo, args) as stack:
                    runs[str(count)] = measure(stack, count, scene, photo, args)
            result["rounds"].append(runs)
    result["summary"] = summary(result["rounds"])
    stem = args.name or time.strftime("models-%Y%m%d-%H%M%S")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {out / stem}.json")
    return result


def summary(rounds: list[dict]) -> dict:
    """Medians over the rounds, by number of models; the ratios 3 models / 1 model, the median of the rounds'."""

    def median(values) -> float:
        return round(statistics.median(values), 2)

    figures = {}
    for count in map(str, REPOSITORIES):
        runs = [runs[count] for runs in rounds if count in runs]
        figures[count] = {
            "runs": len(runs),
            "ready_s": median(r["ready_s"] for r in runs),
            "ready_s_range": [min(r["ready_s"] for r in runs), max(r["ready_s"] for r in runs)],
            **{f"{key}_{when}": median(r[when][key] for r in runs)
               for key in ("master_rss_mb", "nginx_rss_mb") for when in ("after_warmup",)},
            **{f"{key}_{when}": median(mb for r in runs for mb in r[when][key])
               for key in ("worker_rss_mb", "worker_private_mb") for when in ("after_warmup", "after_load")},
            "default_requests_per_s": median(r["default"]["requests_per_s"] for r in runs),
            "default_p50_ms": median(r["default"]["p50_ms"] for r in runs),
        }
        if "person" in runs[0]:
            figures[count]["person_requests_per_s"] = median(r["person"]["requests_per_s"] for r in runs)
            figures[count]["person_p50_ms"] = median(r["person"]["p50_ms"] for r in runs)
    ratios = [(r["3"]["default"]["requests_per_s"] / r["1"]["default"]["requests_per_s"],
               r["3"]["default"]["p50_ms"] / r["1"]["default"]["p50_ms"]) for r in rounds]
    figures["rps_ratio_3_over_1"] = round(statistics.median(rps for rps, _ in ratios), 3)
    figures["rps_ratios"] = [round(rps, 3) for rps, _ in ratios]
    figures["p50_ratio_3_over_1"] = round(statistics.median(p50 for _, p50 in ratios), 3)
    return figures


def markdown(result: dict) -> str:
    """The run's tables in Markdown."""
    s = result["summary"]
    lines = ["| models | stacks started | ready s, median (range) | worker RSS after warm-up, MiB | after the load "
             "| worker private, MiB | master + nginx RSS, MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for count, names in REPOSITORIES.items():
        f = s[str(count)]
        lines.append(f"| {count}: {', '.join(names)} | {f['runs']} | {f['ready_s']} ({f['ready_s_range'][0]}-"
                     f"{f['ready_s_range'][1]}) | {f['worker_rss_mb_after_warmup']} | {f['worker_rss_mb_after_load']} "
                     f"| {f['worker_private_mb_after_warmup']} "
                     f"| {f['master_rss_mb_after_warmup']} + {f['nginx_rss_mb_after_warmup']} |")
    lines += ["", f"/infer, wrk c={result['concurrency']}, {result['seconds']:g} s a run, 500x375 JPEGs:", "",
              f"| round | {DEFAULT_MODEL}, 1 model loaded: req/s, p50 ms | 3 models loaded: req/s, p50 ms | 3 / 1 "
              "| person (3 models loaded): req/s, p50 ms |", "| ---: | ---: | ---: | ---: | ---: |"]
    for index, runs in enumerate(result["rounds"]):
        one, three = runs["1"], runs["3"]
        lines.append(f"| {index + 1} | {one['default']['requests_per_s']}, {one['default']['p50_ms']} "
                     f"| {three['default']['requests_per_s']}, {three['default']['p50_ms']} "
                     f"| {s['rps_ratios'][index]} | {three['person']['requests_per_s']}, {three['person']['p50_ms']} |")
    lines += ["", f"medians: {DEFAULT_MODEL} {s['1']['default_requests_per_s']} req/s (p50 {s['1']['default_p50_ms']} "
              f"ms) with 1 model, {s['3']['default_requests_per_s']} ({s['3']['default_p50_ms']} ms) with 3; "
              f"3 / 1, median of the rounds' ratios: requests/s {s['rps_ratio_3_over_1']}x, p50 "
              f"{s['p50_ratio_3_over_1']}x; person {s['3']['person_requests_per_s']} req/s (p50 "
              f"{s['3']['person_p50_ms']} ms)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.models", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="each wrk run of the load")
    parser.add_argument("--rounds", type=int, default=5, help="of a 1-model and a 3-model stack, taking turns")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-seconds", type=float, default=3, help="a stack's warm-up: 3 x this")
    parser.add_argument("--ref", default="", metavar="REF",
                        help="serve git revision REF from a temporary worktree (default: this checkout as it is, which "
                             "others may change during the run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="", help="file stem of the results (default: models-<timestamp>)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
