"""What decoding costs, per format, against the budgets of segapp.imaging: CPU seconds, peak memory and the estimate.

    .venv/bin/python -m bench.decode_cost [--size 7300x5440]

Each case runs in a fresh subprocess (its peak memory its own): one image, noisy so that it compresses as a photograph
does (its body may be over the 10 MiB limit: this measures the decoder, not the service), decoded by
`segapp.imaging.decode_image` with the budgets lifted, as a mask request (JPEG drafts) and as an overlay (whole).
Printed per case: the thread's CPU seconds, the peak resident memory the decode added, and `decode_bytes`' estimate.
Then libjpeg's time per block-scan, from a 6000 x 6000 grey progressive JPEG whose last scan is repeated, which
`_SECONDS_PER_BLOCK_SCAN` rounds up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [  # (format, mode, save options, draft: a mask request's reduced JPEG decode)
    ("JPEG", "RGB", {"quality": 95}, True),
    ("JPEG", "RGB", {"quality": 95}, False),
    ("JPEG", "RGB", {"quality": 95, "progressive": True}, True),
    ("JPEG", "RGB", {"quality": 95, "progressive": True}, False),
    ("JPEG", "RGB", {"quality": 95, "subsampling": 0, "progressive": True}, False),
    ("PNG", "RGB", {"compress_level": 9}, False),
    ("PNG", "RGBA", {}, False),
    ("PNG", "L", {}, False),
    ("TIFF", "RGB", {"compression": "tiff_lzw"}, False),
    ("TIFF", "RGB", {"compression": "tiff_adobe_deflate"}, False),
    ("GIF", "P", {}, False),
    ("BMP", "RGB", {}, False),
    ("WEBP", "RGB", {"quality": 90}, False),
    ("WEBP", "RGB", {"lossless": True}, False),
]

_CHILD = r"""
import io, json, sys, time
import numpy as np
from PIL import Image
from segapp.imaging import decode_bytes, decode_image
from segapp.jpeg import inspect_jpeg
fmt, mode, options, draft, width, height = json.loads(sys.argv[1])
ys, xs = np.mgrid[0:height, 0:width]
pixels = np.stack([xs * 255 // width, ys * 255 // height, (xs // 50 + ys // 50) % 2 * 255], -1)
pixels = np.clip(pixels + np.random.default_rng(0).integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
image = Image.fromarray(pixels, "RGB").convert(mode)
del pixels, xs, ys
out = io.BytesIO()
image.save(out, format=fmt, **options)
data = out.getvalue()
del image, out
opened = Image.open(io.BytesIO(data))
if draft and fmt == "JPEG":
    opened.draft("RGB", (128, 128 * height // width))
estimate = decode_bytes(opened, inspect_jpeg(data) if fmt == "JPEG" else None)
def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
started = time.thread_time()
decode_image(data, 90_000_000, draft_size=128 if draft else None, max_bytes=2**40, cpu_seconds=3600)
seconds = time.thread_time() - started
print(json.dumps({"format": fmt, "mode": mode, "options": options, "as": "mask" if draft else "overlay",
                  "body_mb": round(len(data) / 1e6, 1), "cpu_s": round(seconds, 3),
                  "peak_added_mb": round((status("VmHWM") - before) / 2**20), "estimate_mb": round(estimate / 2**20)}))
"""

_SCANS = r"""
import io, json, time
from PIL import Image
from segapp.jpeg import inspect_jpeg
out = io.BytesIO()
Image.new("L", (6000, 6000), 128).save(out, "JPEG", progressive=True, quality=90)
data = out.getvalue()
last = data.rindex(b"\xff\xda")
rows = []
for repeats in (1, 50, 100):
    body = data[:last] + data[last:-2] * repeats + b"\xff\xd9"
    image = Image.open(io.BytesIO(body))
    image.draft("RGB", (128, 128))
    started = time.thread_time()
    image.load()
    seconds = time.thread_time() - started
    scans = inspect_jpeg(body).block_scans
    rows.append({"repeats": repeats, "block_scans": scans, "cpu_s": round(seconds, 3),
                 "ns_per_block_scan": round(seconds / scans * 1e9, 1)})
print(json.dumps({"libjpeg_block_scans": rows}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7300x5440", help="WIDTHxHEIGHT of each image")
    options = parser.parse_args(argv)
    width, height = (int(side) for side in options.size.split("x"))
    print(f"{width}x{height}, nproc={os.cpu_count()}", flush=True)
    for fmt, mode, save, draft in CASES:
        argument = json.dumps([fmt, mode, save, draft, width, height])
        subprocess.run([sys.executable, "-c", _CHILD, argument], check=True)
    subprocess.run([sys.executable, "-c", _SCANS], check=True)


if __name__ == "__main__":
    main()
