"""Image bytes in, segmentation mask out: the `Segmenter` and the engines that run the network.

Stages, each timed: decode (bytes -> RGB), infer (resize to the input size, run the engine), postprocess
(upsample the logits to the image's size, argmax). Nothing here knows about HTTP, and importing this module does
not import TensorFlow: only `TensorFlowEngine` does, when it is made.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segapp.imaging import CLASS_NAMES, PALETTE, decode_image, resize_pixels

SHIPPED_MODEL = Path(__file__).parent / "models" / "unet.tflite"
DEFAULT_MAX_PIXELS = 40_000_000


class LiteRTEngine:
    """Runs a .tflite model with LiteRT (XNNPACK on the CPU), `threads` threads."""

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

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits N x 128 x 128 x classes for a float32 batch N x 128 x 128 x 3 in [0, 1]."""
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input["index"], np.ascontiguousarray(batch, dtype=np.float32))
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output["index"]).copy()


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
    """The model card beside a model: unet.tflite, unet.keras and unet/ all share unet.json."""
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


@dataclass(frozen=True)
class Segmentation:
    """A mask (uint8 H x W class indices, the image's size after EXIF orientation) and what it cost."""

    mask: np.ndarray
    pixels: np.ndarray | None  # the decoded RGB image at full size, when `segment` was asked for it
    timings: dict[str, float] = field(default_factory=dict)  # seconds: decode, infer, postprocess

    def class_fractions(self) -> list[float]:
        """The fraction of pixels in each class."""
        counts = np.bincount(self.mask.ravel(), minlength=len(CLASS_NAMES))
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
    ):
        self.model_path = Path(model_path)
        self.threads = threads
        self.max_pixels = max_pixels
        self.engine = engine
        self.card: dict = {}
        self.input_size = 128
        self.ready = False

    def load(self) -> Segmenter:
        """Build the engine, read the card, warm up; returns self."""
        if self.engine is None:
            self.engine = make_engine(self.model_path, self.threads)
        self.card = read_card(self.model_path)
        self.card.setdefault("engine", getattr(self.engine, "name", type(self.engine).__name__))
        self.card["engine"] = getattr(self.engine, "name", self.card["engine"])
        self.input_size = int(self.card.get("input_size", [128])[0])
        self.engine.predict(np.zeros((1, self.input_size, self.input_size, 3), np.float32))
        self.ready = True
        return self

    def segment(self, data: bytes, full_pixels: bool = False) -> Segmentation:
        """Segment the image in `data`. Raises `segapp.imaging.ImageError` for bytes that are not a usable image.

        With `full_pixels`, `Segmentation.pixels` is the image at full size (for an overlay); otherwise a large
        JPEG is decoded at a reduced scale, which is all the network needs.
        """
        started = time.perf_counter()
        draft = None if full_pixels else self.input_size
        decoded = decode_image(data, self.max_pixels, draft_size=draft)
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
        return Segmentation(mask=mask, pixels=decoded.pixels if full_pixels else None, timings=timings)

    def segment_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The class mask for RGB pixels already decoded, at their own size."""
        return upsample_argmax(self.predict_logits(pixels), pixels.shape[1], pixels.shape[0])

    def predict_logits(self, pixels: np.ndarray | Image.Image) -> np.ndarray:
        """Logits input_size x input_size x classes for an RGB image (uint8 array or Pillow image) of any size."""
        size = self.input_size
        batch = resize_pixels(pixels, size, size)[None].astype(np.float32) * np.float32(1 / 255)
        return self.engine.predict(batch)[0]


def upsample_argmax(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """Class mask at width x height: class probabilities upsampled bilinearly, then argmax.

    Upsampling the 128-px argmax instead would draw every edge as steps of width/128 pixels. The probabilities
    (softmax) of three classes travel as one 8-bit RGB image, which Pillow resizes in a single SIMD pass: 5x
    faster than three float planes for a 500x375 mask, and edges land within a pixel of the float result.
    """
    if logits.shape[1] == width and logits.shape[0] == height:
        return np.argmax(logits, axis=-1).astype(np.uint8)
    if logits.shape[-1] != 3:
        planes = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(plane, np.float32), "F").resize((width, height), Image.BILINEAR)
            )
            for plane in np.moveaxis(logits, -1, 0)
        ]
        return np.argmax(np.stack(planes, axis=-1), axis=-1).astype(np.uint8)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = (shifted * (255 / shifted.sum(axis=-1, keepdims=True)) + 0.5).astype(np.uint8)
    upsampled = Image.fromarray(probabilities, "RGB").resize((width, height), Image.BILINEAR)
    # argmax over three planes by comparison (ties go to the lower class, as np.argmax): 3x faster than
    # np.argmax(axis=-1) on an interleaved H x W x 3 array.
    first, second, third = (np.asarray(plane) for plane in upsampled.split())
    mask = (second > first).view(np.uint8).copy()
    mask[third > np.maximum(first, second)] = 2
    return mask
