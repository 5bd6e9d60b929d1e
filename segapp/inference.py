"""Image bytes in, segmentation mask out: the `Segmenter` and the engines that run the network.

Stages, each timed: decode (bytes -> RGB), infer (resize to the input size, run the engine), postprocess
(upsample the logits to the image's size, argmax). Nothing here knows about HTTP, and importing this module does
not import TensorFlow: only `TensorFlowEngine` does, when it is made.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segapp import upsampling
from segapp.imaging import (
    CLASS_NAMES,
    DEFAULT_DECODE_BYTES,
    DEFAULT_DECODE_CPU_SECONDS,
    PALETTE,
    decode_image,
    resize_pixels,
)
from segapp.upsampling import upsample_argmax

log = logging.getLogger(__name__)

# The default model: the int8 network, chosen by measurement (docs/benchmarks.md, "int8 network": same mIoU and
# foreground IoU within 0.001 on the test split, the engine in well under half the float model's time).
SHIPPED_MODEL = Path(__file__).parent / "models" / "unet-int8.tflite"
# The float network it was quantized from, still selectable with SEGAPP_MODEL; unet.keras lies beside it.
FLOAT_MODEL = SHIPPED_MODEL.with_name("unet.tflite")
DEFAULT_MAX_PIXELS = 40_000_000
# Mask pixels counted at a time by Segmentation.class_fractions: 8 MB of int64 counting.
_COUNT_SLICE = 1 << 20


class LiteRTEngine:
    """Runs a .tflite model with LiteRT (XNNPACK on the CPU), `threads` threads.

    A full-integer model (int8 or uint8 input and output, as `segapp-train` exports unet-int8.tflite) is fed
    and read through the quantization parameters its interpreter reports, so `predict` takes and returns float32
    for either kind of model.
    """

    name = "litert"

    def __init__(self, path: str | Path, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = int(self._input["shape"][0])
        # One interpreter is not safe to invoke from two threads at once.
        self._lock = threading.Lock()

    @property
    def quantized(self) -> bool:
        """Whether the model takes integer input (a full-integer model)."""
        return np.issubdtype(self._input["dtype"], np.integer)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits N x 128 x 128 x classes (float32) for a float32 batch N x 128 x 128 x 3 in [0, 1]."""
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input["index"], _quantize(batch, self._input))
            self._interpreter.invoke()
            return _dequantize(self._interpreter.get_tensor(self._output["index"]), self._output)


def _quantize(values: np.ndarray, tensor: dict) -> np.ndarray:
    """Float values as the input tensor's type: unchanged for a float tensor, else round(x / scale) + zero point."""
    dtype = tensor["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(values, dtype=np.float32)
    scale, zero_point = tensor["quantization"]
    limits = np.iinfo(dtype)
    quantized = np.rint(np.asarray(values, np.float32) * np.float32(1 / scale)) + np.float32(zero_point)
    return np.clip(quantized, limits.min, limits.max).astype(dtype)


def _dequantize(values: np.ndarray, tensor: dict) -> np.ndarray:
    """An output tensor as float32: (q - zero point) * scale for an integer tensor, else a copy."""
    if not np.issubdtype(values.dtype, np.integer):
        return values.copy()
    scale, zero_point = tensor["quantization"]
    return (values.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


class TensorFlowEngine:
    """Runs a .keras file or a SavedModel folder with TensorFlow, `threads` intra-op threads."""

    name = "tensorflow"

    def __init__(self, path: str | Path, threads: int = 1):
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TensorFlow's context already started in this process; its pools stay as they are.
        path = Path(path)
        if path.is_dir():
            loaded = tf.saved_model.load(str(path))
            signature = loaded.signatures["serving_default"]
            self._call = lambda x: next(iter(signature(tf.constant(x)).values()))
        else:
            import keras

            model = keras.saving.load_model(str(path), compile=False)
            self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits N x 128 x 128 x classes for a float32 batch N x 128 x 128 x 3 in [0, 1]."""
        return np.asarray(self._call(np.ascontiguousarray(batch, dtype=np.float32)))


def make_engine(path: str | Path, threads: int = 1):
    """The engine for a model file: LiteRT for .tflite, TensorFlow for .keras, .h5 or a SavedModel folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix == ".tflite":
        return LiteRTEngine(path, threads)
    if path.is_dir() or path.suffix in (".keras", ".h5"):
        return TensorFlowEngine(path, threads)
    raise ValueError(f"{path}: unknown model format (expected .tflite, .keras, .h5 or a SavedModel folder)")


def card_path(model_path: str | Path) -> Path:
    """The model card beside a model: unet.tflite, unet.keras and unet/ all share unet.json; unet-int8.tflite has
    unet-int8.json."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict:
    """The model's JSON card, or a minimal one naming the file when the model has none."""
    path = card_path(model_path)
    if path.exists():
        return json.loads(path.read_text())
    return {
        "name": Path(model_path).stem,
        "version": "unknown",
        "classes": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "input_size": [128, 128],
    }


class ModelCardError(ValueError):
    """A model card that does not describe its network: the message names the card and what disagrees."""


def check_card_classes(card: dict, outputs: int, path: Path) -> None:
    """Refuse a card whose classes or palette do not match the network's `outputs` logits per pixel.

    Every answer takes its labels and colours from the card, so a card that disagrees with the network would
    name pixels wrongly (or fail on each request); it is refused once, when the model loads.
    """
    classes, palette = card.get("classes"), card.get("palette")
    where = f"model card {path}" if path.exists() else f"the model beside {path} (it has no card)"
    if not isinstance(classes, list) or not all(isinstance(name, str) and name for name in classes):
        raise ModelCardError(f"{where}: 'classes' must be a list of class names")
    if len(set(classes)) != len(classes):
        raise ModelCardError(f"{where}: 'classes' names a class twice: {classes}")
    if len(classes) != outputs:
        raise ModelCardError(
            f"{where}: the card names {len(classes)} classes {classes}, but the network outputs {outputs} per pixel"
        )
    if outputs > 256:
        raise ModelCardError(f"{where}: {outputs} classes do not fit a palette PNG mask (at most 256)")
    if not isinstance(palette, list) or len(palette) != len(classes):
        count = len(palette) if isinstance(palette, list) else "no"
        raise ModelCardError(f"{where}: 'palette' has {count} colours for {len(classes)} classes")
    for colour in palette:
        if not (
            isinstance(colour, list | tuple)
            and len(colour) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        ):
            raise ModelCardError(f"{where}: palette colour {colour!r} is not [red, green, blue] in 0-255")


@dataclass(frozen=True)
class Segmentation:
    """A mask (uint8 H x W class indices, the image's size after EXIF orientation) and what it cost."""

    mask: np.ndarray
    image: Image.Image | None = None  # the decoded RGB image at full size, when `segment` was asked for it
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode, infer, postprocess

    @property
    def pixels(self) -> np.ndarray | None:
        """`image` as a uint8 H x W x 3 array (a copy), or None."""
        return None if self.image is None else np.asarray(self.image)

    def class_fractions(self, num_classes: int) -> list[float]:
        """The fraction of pixels in each of the model's `num_classes` classes (the length of its card's list)."""
        # In slices: bincount counts through an int64 copy of what it is given, 320 MB for a 40-megapixel mask.
        flat, counts = self.mask.ravel(), np.zeros(num_classes, np.int64)
        for start in range(0, flat.size, _COUNT_SLICE):
            found = np.bincount(flat[start : start + _COUNT_SLICE], minlength=num_classes)
            if len(found) > num_classes:
                raise ValueError(f"the mask has class {len(found) - 1}, but the model has {num_classes} classes")
            counts += found
        if len(counts) > num_classes:
            raise ValueError(f"the mask has class {len(counts) - 1}, but the model has {num_classes} classes")
        return (counts / max(self.mask.size, 1)).tolist()


class Segmenter:
    """Turns image bytes into a class mask with one model.

    Made cheaply; `load()` builds the engine, reads the card and runs a warm-up prediction, after which `ready`
    is true. Pass `engine` to use one already built (tests pass fakes).
    """

    def __init__(
        self,
        model_path: str | Path = SHIPPED_MODEL,
        threads: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        engine=None,
        max_decode_bytes: int = DEFAULT_DECODE_BYTES,
        decode_cpu_seconds: float = DEFAULT_DECODE_CPU_SECONDS,
    ):
        self.model_path = Path(model_path)
        self.threads = threads
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self.decode_cpu_seconds = decode_cpu_seconds
        self.engine = engine
        self.card: dict = {}
        self.input_size = 128
        self.ready = False

    def load(self) -> Segmenter:
        """Build the engine, read the card, warm up; returns self."""
        if self.engine is None:
            self.engine = make_engine(self.model_path, self.threads)
        card = read_card(self.model_path)
        card["engine"] = getattr(self.engine, "name", type(self.engine).__name__)
        self.input_size = int(card.get("input_size", [128])[0])
        logits = self.engine.predict(np.zeros((1, self.input_size, self.input_size, 3), np.float32))
        check_card_classes(card, int(logits.shape[-1]), card_path(self.model_path))
        if not upsampling.COMPILED:
            log.warning("segapp._upsampling was not built (no C compiler at install): masks are upsampled with "
                        "NumPy, the same masks at about half the speed")
        self.card = card
        self.ready = True
        return self

    def segment(self, data: bytes, full_pixels: bool = False, cpu_seconds: float | None = None) -> Segmentation:
        """Segment the image in `data`. Raises `segapp.imaging.ImageError` for bytes that are not a usable image.

        With `full_pixels`, `Segmentation.image` is the image at full size, for an overlay; otherwise a large JPEG
        is decoded at a reduced scale, which is all the network needs. `cpu_seconds` is the decode's CPU budget
        (default: the segmenter's `decode_cpu_seconds`; a batch passes what its images have left).
        """
        started = time.perf_counter()
        draft = None if full_pixels else self.input_size
        decoded = decode_image(data, self.max_pixels, draft_size=draft, max_bytes=self.max_decode_bytes,
                               cpu_seconds=self.decode_cpu_seconds if cpu_seconds is None else cpu_seconds)
        decoded_at = time.perf_counter()
        logits = self.predict_logits(decoded.image)
        inferred_at = time.perf_counter()
        mask = upsample_argmax(logits, decoded.width, decoded.height)
        done = time.perf_counter()
        timings = {
            "decode": decoded_at - started,
            "infer": inferred_at - decoded_at,
            "postprocess": done - inferred_at,
        }
        return Segmentation(mask=mask, image=decoded.image if full_pixels else None, timings=timings)

    def segment_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The class mask for RGB pixels already decoded, at their own size."""
        return upsample_argmax(self.predict_logits(pixels), pixels.shape[1], pixels.shape[0])

    def predict_logits(self, pixels: np.ndarray | Image.Image) -> np.ndarray:
        """Logits input_size x input_size x classes for an RGB image (uint8 array or Pillow image) of any size."""
        size = self.input_size
        batch = resize_pixels(pixels, size, size)[None].astype(np.float32) * np.float32(1 / 255)
        return self.engine.predict(batch)[0]
