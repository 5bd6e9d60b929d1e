"""The benchmark's images: photograph-like JPEGs of held-out synthetic scenes, made at run time."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image

from segapp.training import scenes

# Scenes are drawn in NumPy, slowly (1920x1080: 2 s, 2016x1512: 7 s on the bench machine), so a larger image is
# drawn at most this big and upscaled by a whole factor (4032x3024: drawn at 1344x1008), soft like a phone's photo.
MAX_DRAWN_PIXELS = 1920 * 1080


def make_image(folder: Path, width: int, height: int) -> Path:
    """A photograph-like JPEG of a held-out synthetic scene, at the size asked; the same bytes at every run."""
    factor = math.ceil(math.sqrt(width * height / MAX_DRAWN_PIXELS))
    drawn = (math.ceil(width / factor), math.ceil(height / factor))
    pixels, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], width * 7 + height, size=drawn)
    image = Image.fromarray(pixels)
    if drawn != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    path = folder / f"scene-{width}x{height}.jpg"
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    path.write_bytes(out.getvalue())
    return path
