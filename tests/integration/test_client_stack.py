"""segapp-client, the installed console script, against the real stack with nginx's limits as shipped."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CLIENT = Path(sys.executable).with_name("segapp-client")
IMAGES = 200
# Twice nginx's 16 requests in flight per address (limit_conn segapp_per_client, left as shipped): the first wave
# alone meets 429s, so the client must honour Retry-After and settle under the limit to lose nothing.
CONCURRENCY = 48


def small_images(folder: Path) -> dict[str, tuple[int, int]]:
    """IMAGES small JPEGs and PNGs of many sizes in `folder`; returns {stem: (width, height)}."""
    rng = np.random.default_rng(10)
    sizes = {}
    for n in range(IMAGES):
        width, height = 24 + (n * 7) % 90, 16 + (n * 13) % 70
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        stem, fmt = f"scene{n:03d}", ("JPEG", "PNG")[n % 2]
        Image.fromarray(pixels).save(folder / f"{stem}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
        sizes[stem] = (width, height)
    return sizes


def nginx_statuses(stack, expected: int) -> Counter:
    """How many POST /infer nginx answered with each status, from its access log once it holds `expected` lines
    (nginx logs a request after its answer is sent, so the last line may come a moment after the client is done)."""
    deadline = time.monotonic() + 10
    while True:
        log = (stack.run_dir / "nginx" / "access.log").read_text()
        statuses = Counter(int(status) for status in re.findall(r'"POST /infer\?format=png HTTP/1.1" (\d+)', log))
        if statuses.total() >= expected or time.monotonic() > deadline:
            return statuses
        time.sleep(0.1)


def test_a_folder_at_twice_the_allowed_concurrency_loses_no_image(stack_factory, tmp_path):
    stack = stack_factory(SEGAPP_NGINX_RATE="", SEGAPP_NGINX_BURST="")  # the shipped limits: 300 r/s, 16 at once
    folder, out = tmp_path / "scenes", tmp_path / "masks"
    folder.mkdir()
    sizes = small_images(folder)

    run = subprocess.run([str(CLIENT), str(folder), "--url", stack.url, "-o", str(out),
                          "--concurrency", str(CONCURRENCY)], capture_output=True, text=True, timeout=300)

    assert run.returncode == 0, run.stderr
    (summary,) = run.stderr.splitlines()  # no image failed, so the summary is the only line
    assert re.fullmatch(r"segapp-client: 200 images, 200 answered, 0 failed, \d+ retries \(429: \d+\), "
                        r"[\d.]+ images/s in [\d.]+ s", summary), summary
    met_429 = int(re.search(r"\(429: (\d+)\)", summary)[1])
    assert met_429 > 0
    masks = sorted(out.iterdir())
    assert [mask.name for mask in masks] == [f"{stem}.mask.png" for stem in sorted(sizes)]
    for mask in masks:
        with Image.open(io.BytesIO(mask.read_bytes())) as image:
            assert image.size == sizes[mask.name.removesuffix(".mask.png")], mask.name
    # nginx saw exactly what the client says: one 200 per image, and every 429 it sent was retried
    assert nginx_statuses(stack, IMAGES + met_429) == {200: IMAGES, 429: met_429}
