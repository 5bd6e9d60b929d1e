"""Shared fixtures: images made in memory, the shipped model loaded once, a fast fake-engine segmenter, apps."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from webtest import TestApp

from segapp.config import Settings
from segapp.engines import TensorSpec
from segapp.inference import Segmenter
from segapp.metrics import Metrics
from segapp.wsgi import make_app

EXIF_ORIENTATION = 0x0112


def make_image(fmt: str = "JPEG", size: tuple[int, int] = (500, 375), orientation: int | None = None,
               mode: str = "RGB") -> bytes:
    """An image of `size` (width, height) with a smooth gradient and noise, encoded as `fmt`; with
    `orientation`, an EXIF orientation tag (6 = rotate 90 degrees clockwise when shown)."""
    width, height = size
    rng = np.random.default_rng(width * 7919 + height)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=-1)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    out = io.BytesIO()
    extra = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        extra["exif"] = exif.tobytes()
    image.save(out, format=fmt, **extra)
    return out.getvalue()


def make_png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height zero pixels: about 50 MB decoded as bits, 1.6 GB as the RGB
    a decoder would make, and under 100 KB on the wire. Written row by row so it never exists uncompressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    compressor = zlib.compressobj(9)
    idat = [compressor.compress(row * 500) for _ in range(height // 500)]
    idat.append(compressor.compress(row * (height % 500)))
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


class FakeEngine:
    """The engine interface (segapp.engines) of a stand-in network: NHWC 128x128x3 float input, `classes` logits a
    pixel out."""

    classes = 3

    @property
    def input(self) -> TensorSpec:
        return TensorSpec("image", (None, 128, 128, 3), "float32")

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("logits", (None, 128, 128, self.classes), "float32")]


class StripesEngine(FakeEngine):
    """A stand-in network: class 0 on the left third of the 128x128 input, 1 in the middle, 2 on the right,
    whatever the image. Instant, so tests about HTTP do not wait on a model."""

    name = "stripes"

    def predict(self, batch: np.ndarray, output: int = 0) -> np.ndarray:
        logits = np.zeros((batch.shape[0], 128, 128, 3), np.float32)
        for index, (start, stop) in enumerate(((0, 43), (43, 86), (86, 128))):
            logits[:, :, start:stop, index] = 10.0
        return logits


class FailingSegmenter(Segmenter):
    """Ready, but every segmentation fails as a bug would."""

    def segment(self, data: bytes, full_pixels: bool = False, cpu_seconds: float | None = None):
        raise RuntimeError("engine exploded: secret internal detail")


@pytest.fixture(scope="session", name="make_image")
def make_image_fixture():
    """`make_image(fmt, size, orientation=None, mode="RGB") -> bytes`."""
    return make_image


@pytest.fixture
def unloaded_fake_segmenter() -> Segmenter:
    """A fresh fake-engine segmenter, not loaded yet (`ready` is false until `.load()`)."""
    return Segmenter(engine=StripesEngine())


@pytest.fixture
def failing_segmenter() -> Segmenter:
    """A ready segmenter whose every segmentation raises RuntimeError."""
    return FailingSegmenter(engine=StripesEngine()).load()


@pytest.fixture(scope="session")
def shipped_segmenter() -> Segmenter:
    """The shipped model with its real engine, loaded once."""
    return Segmenter().load()


@pytest.fixture(scope="session")
def fake_segmenter() -> Segmenter:
    """Real decoding and the shipped card, with `StripesEngine` in place of the network."""
    return Segmenter(engine=StripesEngine()).load()


@pytest.fixture(scope="session")
def jpeg_500x375() -> bytes:
    return make_image("JPEG", (500, 375))


@pytest.fixture(scope="session")
def png_bomb() -> bytes:
    return make_png_bomb()


@pytest.fixture
def app_for():
    """Make a WebTest app (lint on) around `segmenter` with `settings` and metrics of its own."""

    def build(segmenter: Segmenter, settings: Settings | None = None, metrics: Metrics | None = None) -> TestApp:
        return TestApp(make_app(settings or Settings(), segmenter=segmenter, metrics=metrics or Metrics()))

    return build


@pytest.fixture
def app(app_for, fake_segmenter) -> TestApp:
    """The app with the fake-engine segmenter and default settings."""
    return app_for(fake_segmenter)


@pytest.fixture
def real_app(app_for, shipped_segmenter) -> TestApp:
    """The app with the shipped model."""
    return app_for(shipped_segmenter)


class BandsEngine(FakeEngine):
    """A stand-in network with `classes` outputs: class k on the k-th of `classes` vertical bands of the input."""

    name = "bands"

    def __init__(self, classes: int):
        self.classes = classes

    def predict(self, batch: np.ndarray, output: int = 0) -> np.ndarray:
        logits = np.zeros((batch.shape[0], 128, 128, self.classes), np.float32)
        edges = np.linspace(0, 128, self.classes + 1).round().astype(int)
        for index in range(self.classes):
            logits[:, :, edges[index] : edges[index + 1], index] = 10.0
        return logits


@pytest.fixture
def segmenter_with_classes(tmp_path):
    """`segmenter_with_classes(outputs, classes, palette) -> Segmenter`: a `BandsEngine` with `outputs` classes
    and a card beside its model path naming `classes` and `palette` (no card when `classes` is None); loaded,
    which may refuse the card."""

    def build(outputs: int, classes: list[str] | None, palette: list[list[int]] | None = None) -> Segmenter:
        model = tmp_path / f"bands{outputs}.tflite"
        if classes is not None:
            card = {"name": f"bands-{outputs}", "version": "0.1", "classes": classes, "palette": palette,
                    "input_size": [128, 128]}
            model.with_suffix(".json").write_text(json.dumps(card))
        return Segmenter(model, engine=BandsEngine(outputs)).load()

    return build
