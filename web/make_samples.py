"""Write the try-it page's sample images, web/samples/scene-N.jpg: held-out synthetic scenes the shipped model
never trained on (the test split of segapp.training.scenes, the split `make eval` scores).

The first SAMPLES test scenes whose short side is at least MIN_SIDE pixels, at their own size, as JPEGs of the
quality a camera would write; not chosen by how well the model does on them. Run from the repository root:
    .venv/bin/python web/make_samples.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from segapp.training import scenes

OUT = Path(__file__).resolve().parent / "samples"
SAMPLES = 4
MIN_SIDE = 200
QUALITY = 85


def sample_indices(count: int = SAMPLES, min_side: int = MIN_SIDE) -> list[int]:
    """The indices of the first `count` test scenes whose short side is at least `min_side`."""
    chosen, index = [], 0
    while len(chosen) < count:
        image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], index)
        if min(image.shape[:2]) >= min_side:
            chosen.append(index)
        index += 1
    return chosen


def scene_jpeg(index: int, quality: int = QUALITY) -> bytes:
    """Test scene `index` as JPEG bytes."""
    image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], index)
    out = io.BytesIO()
    Image.fromarray(image, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("scene-*.jpg"):
        old.unlink()
    for index in sample_indices():
        path = OUT / f"scene-{index}.jpg"
        path.write_bytes(scene_jpeg(index))
        print(f"{path}: {path.stat().st_size} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
