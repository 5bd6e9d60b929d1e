"""Median stage times of Segmenter.segment plus the PNG encode, for one source tree: compare two commits in one run.

    git worktree add /tmp/before 29dc184 && cp segapp/models/* /tmp/before/segapp/models/
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
    from bench.images import make_image  # the images, from this checkout

    sys.path.insert(0, str(tree))
    for name in [m for m in sys.modules if m == "segapp" or m.startswith("segapp.")]:
        del sys.modules[name]  # measure the tree's own segapp, not this checkout's
    from segapp.imaging import mask_to_png
    from segapp.inference import Segmenter

    segmenter = Segmenter(tree / "segapp" / "models" / "unet.tflite").load()
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
