"""Stage medians of the image pipeline around the network, in-process, for this tree and a baseline in one run.

    git worktree add --detach /tmp/base11 17d6509
    .venv/bin/python -m bench.pipeline --baseline /tmp/base11 [--images 500x375,1920x1080,4032x3024]

Each tree's own segapp runs in a subprocess of its own (`--tree DIR --image FILE`), on the same JPEG bytes
(bench/images.py of this checkout) and with its own shipped float model, segapp/models/unet.tflite. The trees take
turns, several rounds per image, so both see the same load on a shared machine. Stages, from Segmenter.segment and
the PNG answer: decode (bytes to RGB, JPEG draft decoding), resize (to the network's input: the infer stage less
the engine), network (engine.predict), upsample (upsample + argmax: the postprocess stage), encode (mask_to_png
with the card's palette); outside = all but the network. The masks of the two trees are compared pixel for pixel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("decode", "resize", "network", "upsample", "encode", "outside")
# Requests per round and image size, so a round takes a few seconds on the baseline.
REQUESTS = {500 * 375: 150, 1920 * 1080: 60, 4032 * 3024: 12}


def measure(tree: Path, image: Path, requests: int, mask_out: Path) -> dict[str, list[float]]:
    """Stage times in ms of `requests` segmentations of `image` with `tree`'s segapp (imported by the caller)."""
    import numpy as np

    from segapp.inference import Segmenter

    try:
        from segapp.masks import mask_to_png
    except ImportError:  # a baseline tree from before segapp.masks (issue 15)
        from segapp.imaging import mask_to_png

    segmenter = Segmenter(tree / "segapp" / "models" / "unet.tflite").load()  # the float model, flat in every tree
    engine, spent = segmenter.engine, []

    class TimedEngine:
        name = getattr(engine, "name", "engine")

        def __getattr__(self, name):
            return getattr(engine, name)  # input, outputs

        def predict(self, batch, *output):
            started = time.perf_counter()
            logits = engine.predict(batch, *output)
            spent.append(time.perf_counter() - started)
            return logits

    segmenter.engine = TimedEngine()
    palette = segmenter.card["palette"]
    data = image.read_bytes()
    samples = {stage: [] for stage in STAGES}
    for attempt in range(requests + 3):
        result = segmenter.segment(data)
        started = time.perf_counter()
        mask_to_png(result.mask, palette)
        times = {
            "decode": result.timings["decode"],
            "resize": result.timings["infer"] - spent[-1],
            "network": spent[-1],
            "upsample": result.timings["postprocess"],
            "encode": time.perf_counter() - started,
        }
        times["outside"] = times["decode"] + times["resize"] + times["upsample"] + times["encode"]
        if attempt >= 3:  # the first requests warm caches
            for stage, seconds in times.items():
                samples[stage].append(seconds * 1000)
    np.save(mask_out, result.mask)
    return samples


def child(args) -> int:
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    for name in [m for m in sys.modules if m == "segapp" or m.startswith("segapp.")]:
        del sys.modules[name]
    import segapp

    assert Path(segapp.__file__).resolve().is_relative_to(tree), segapp.__file__
    samples = measure(tree, Path(args.image), args.requests, Path(args.mask))
    print(json.dumps(samples))
    return 0


def run_child(tree: Path, image: Path, requests: int, mask: Path) -> dict[str, list[float]]:
    command = [sys.executable, "-m", "bench.pipeline", "--tree", str(tree), "--image", str(image),
               "--requests", str(requests), "--mask", str(mask)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another source tree (a worktree of the baseline commit)")
    parser.add_argument("--images", default="500x375,1920x1080,4032x3024")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tree:
        return child(args)

    import numpy as np

    from bench.images import make_image
    from bench.run import build_compiled, machine

    trees = {"new": ROOT}
    if args.baseline:
        trees = {"baseline": Path(args.baseline).resolve(), **trees}
        build_compiled(trees["baseline"])
    print(json.dumps(machine()))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for size in args.images.split(","):
            width, height = map(int, size.split("x"))
            image = make_image(scratch, width, height)
            requests = REQUESTS.get(width * height, max(10, 30_000_000 // (width * height)))
            samples = {name: {stage: [] for stage in STAGES} for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    for stage, values in run_child(tree, image, requests, scratch / f"{name}.npy").items():
                        samples[name][stage].extend(values)
            print(f"\n{size} JPEG ({image.stat().st_size} bytes), medians of {args.rounds} x {requests} requests, ms")
            print("| stage | " + " | ".join(trees) + (" | new / baseline |" if args.baseline else " |"))
            print("| --- | " + " | ".join("---" for _ in trees) + (" | --- |" if args.baseline else " |"))
            for stage in STAGES:
                medians = {name: statistics.median(samples[name][stage]) for name in trees}
                ratio = f" | {medians['new'] / medians['baseline']:.2f} |" if args.baseline else " |"
                print(f"| {stage} | " + " | ".join(f"{value:.2f}" for value in medians.values()) + ratio)
            if args.baseline:
                before, after = np.load(scratch / "baseline.npy"), np.load(scratch / "new.npy")
                print(f"masks: {int((before != after).sum())} of {after.size} pixels differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
