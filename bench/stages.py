"""Median stage times of Segmenter.segment plus the PNG encode, for one source tree and its default model.

    git worktree add --detach /tmp/before 17d6509
    .venv/bin/python -m bench.stages /tmp/before; .venv/bin/python -m bench.stages .
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    tree = Path((argv or sys.argv[1:] or ["."])[0]).resolve()
    from bench.engine_alone import use_tree
    from bench.images import make_image  # the images, from this checkout

    use_tree(tree)  # measure the tree's own segapp, not this checkout's
    from segapp.config import Settings
    from segapp.imaging import mask_to_png
    from segapp.inference import Segmenter

    segmenter = Segmenter(Settings().model).load()  # the tree's default model
    for size in ((500, 375), (1920, 1080), (4032, 3024)):
        with tempfile.TemporaryDirectory() as scratch:
            data = make_image(Path(scratch), *size).read_bytes()
        rows = []
        for _ in range(150):
            result = segmenter.segment(data)
            started = time.perf_counter()
            mask_to_png(result.mask)
            rows.append({**result.timings, "encode": time.perf_counter() - started})
        medians = {key: round(statistics.median(row[key] for row in rows) * 1000, 2) for key in rows[0]}
        outside = round(medians["decode"] + medians["postprocess"] + medians["encode"], 2)
        print(f"{tree} {size[0]}x{size[1]}: {medians} ms; outside infer {outside} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
