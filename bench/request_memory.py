"""Peak worker memory of the largest request of each route and format through the real stack, and of the hostile
files of issue 15: what docs/operations.md promises a worker may reach.

    .venv/bin/python -m bench.request_memory [--repeat 2]

One stack as `make serve` starts it (`uwsgi --ini uwsgi/local.ini`, nginx in front) with one worker, so the one
worker serves every request. Before each request the worker's peak resident memory is reset (writing 5 to
/proc/PID/clear_refs, which needs root or the worker's own user) and read after it (VmHWM): the peak of that
request alone, which `reload-on-rss`, sampling between requests, never sees.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.overlay_memory import large_png, memory_mb
from bench.stack import Stack

V2_INFER = "/v2/models/segapp-unet/infer"


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def v2_bytes(files: list[bytes], binary: bool) -> tuple[dict, bytes]:
    data = b"".join(struct.pack("<I", len(f)) + f for f in files)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(files)],
                           "parameters": {"binary_data_size": len(data)}}],
               "outputs": [{"name": "mask", "parameters": {"binary_data": binary}}, {"name": "class_fractions"}]}
    header = json.dumps(request).encode()
    return ({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
            header + data)


def cases() -> list[tuple[str, str, dict, bytes]]:
    """(name, path, headers, body): the largest answer of each route and format the budgets let through, and the
    hostile files of issue 15."""
    png_40mp = large_png((7300, 5440))
    jpeg_40mp = encoded(Image.open(io.BytesIO(png_40mp)), "JPEG", quality=90)
    progressive_40mp = encoded(Image.open(io.BytesIO(png_40mp)), "JPEG", quality=90, progressive=True)
    # Near the memory budget (docs/api.md, "Budgets"): the costliest of each format the budget lets through.
    webp_near_budget = encoded(Image.new("RGB", (4700, 3550), (40, 90, 160)), "WEBP", lossless=True)
    rgba_png_near_budget = encoded(Image.new("RGBA", (6900, 5400), (40, 90, 160, 128)), "PNG")
    full_chroma_progressive = encoded(Image.open(io.BytesIO(large_png((6300, 4750)))), "JPEG", quality=90,
                                      progressive=True, subsampling=0)
    png_16mp = large_png((4600, 3600))
    image = {"Content-Type": "image/png"}
    rows = []
    for answer in ("png", "json", "overlay"):
        rows.append((f"/infer?format={answer} PNG 7300x5440", f"/infer?format={answer}", image, png_40mp))
    rows += [
        ("/infer?format=overlay JPEG 7300x5440", "/infer?format=overlay", image, jpeg_40mp),
        ("/infer?format=overlay progressive JPEG 7300x5440", "/infer?format=overlay", image, progressive_40mp),
        ("/infer?format=json progressive JPEG 7300x5440", "/infer?format=json", image, progressive_40mp),
        ("/infer?format=overlay lossless WebP 4700x3550", "/infer?format=overlay", image, webp_near_budget),
        ("/infer?format=overlay RGBA PNG 6900x5400", "/infer?format=overlay", image, rgba_png_near_budget),
        ("/infer?format=overlay progressive 4:4:4 JPEG 6300x4750", "/infer?format=overlay", image,
         full_chroma_progressive),
        ("/v2 binary mask PNG 7300x5440", V2_INFER, *v2_bytes([png_40mp], True)),
        ("/v2 JSON mask PNG 4600x3600", V2_INFER, *v2_bytes([png_16mp], False)),
        ("/v2 JSON mask PNG 7300x5440 (refused)", V2_INFER, *v2_bytes([png_40mp], False)),
        ("hostile: lossless WebP 16383x2441, 1.6 KB", "/infer", image,
         encoded(Image.new("RGB", (16383, 2441)), "WEBP", lossless=True)),
        ("hostile: JPEG 2000 6324x6324", "/infer", image,
         encoded(Image.new("L", (6324, 6324)), "JPEG2000", quality_mode="rates", quality_layers=[400])),
        ("hostile: AVIF 6324x6324", "/infer", image, encoded(Image.new("RGB", (6324, 6324)), "AVIF", quality=0)),
    ]
    return rows


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="requests per case")
    options = parser.parse_args(argv)
    rows = cases()
    env = {"SEGAPP_PROCESSES": "1", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "10000r/s",
           "SEGAPP_NGINX_BURST": "10000"}
    print(f"one worker, nproc={os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="segapp-memory-") as run_dir, Stack.start(Path(run_dir), env) as stack:
        stack.infer(encoded(Image.new("RGB", (64, 48)), "PNG"))  # warm-up
        pid = stack.worker_pids()[0]
        print(json.dumps({"worker_rss_mb_after_warmup": round(memory_mb(pid, "VmRSS"))}))
        for name, path, headers, body in rows:
            for _ in range(options.repeat):
                reset_peak(pid)
                started = time.perf_counter()
                answer = stack.request("POST", path, body, headers, timeout=120)
                seconds = time.perf_counter() - started
                print(json.dumps({"case": name, "body_bytes": len(body), "status": answer.status,
                                  "answer_bytes": len(answer.body), "seconds": round(seconds, 2),
                                  "worker_peak_mb": round(memory_mb(pid)),
                                  "worker_rss_mb": round(memory_mb(pid, "VmRSS"))}), flush=True)
        print(json.dumps({"worker_pid_unchanged": stack.worker_pids() == [pid]}))


if __name__ == "__main__":
    main()
