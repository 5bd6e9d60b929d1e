"""Image bytes in, segmentation mask out: the `Segmenter`, one model's pipeline.

Stages, each timed: decode (bytes -> RGB), infer (fit the image to the network's input as its contract says, run the
engine), postprocess (the network's answer as per-class scores, upsampled to the image's size, argmax). Nothing here
knows about HTTP; the engines (segapp.engines) import their runtime only when made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from segapp import upsampling
from segapp.contract import Contract, make_contract, read_card
from segapp.engines import open_engine
from segapp.imaging import DEFAULT_DECODE_BYTES, DEFAULT_DECODE_CPU_SECONDS, decode_image, resize_pixels
from segapp.upsampling import upsample_argmax

log = logging.getLogger(__name__)

MODELS = Path(__file__).parent / "models"
# The shipped repository (segapp.repository): the int8 demonstration model, and MediaPipe's person model where
# `make models` could fetch it.
SHIPPED_REPOSITORY = MODELS
# The default model: the int8 network, chosen by measurement (docs/benchmarks.md, "int8 network": same mIoU and
# foreground IoU within 0.001 on the test split, the engine in well under half the float model's time).
SHIPPED_MODEL = MODELS / "segapp-unet" / "1" / "model.tflite"
# The float network it was quantized from, selectable with SEGAPP_MODEL; unet.keras and its card unet.json beside it.
FLOAT_MODEL = MODELS / "unet.tflite"
DEFAULT_MAX_PIXELS = 40_000_000
# Mask pixels counted at a time by Segmentation.class_fractions: 8 MB of int64 counting.
_COUNT_SLICE = 1 << 20


def card_path(model_path: str | Path) -> Path:
    """The card of a network given as a file (SEGAPP_MODEL): the .json beside it (unet.tflite, unet.keras and unet/
    share unet.json). In a repository a version's network is DIR/NAME/N/model.*, and its card DIR/NAME/model.json."""
    path = Path(model_path)
    if path.name.startswith("model.") and path.parent.name.isdigit():
        return path.parent.parent / "model.json"
    return path.with_suffix(".json")


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
        return (counts / max(self.mask.size, 1)).tolist()


@dataclass(frozen=True)
class Placement:
    """Where the image lies in the network's input: all of it when stretched, a centred box when letterboxed."""

    left: int
    top: int
    width: int
    height: int


class Segmenter:
    """Turns image bytes into a class mask with one model (a network and its contract).

    Made cheaply; `load()` builds the engine, reads the card, joins them into the contract (which runs the network
    once) and is then `ready`. Pass `engine` to use one already built (tests pass fakes), `card_file` for a card
    elsewhere than beside the network, `name` and `version` as a repository names them.
    """

    def __init__(
        self,
        model_path: str | Path = SHIPPED_MODEL,
        threads: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        engine=None,
        max_decode_bytes: int = DEFAULT_DECODE_BYTES,
        decode_cpu_seconds: float = DEFAULT_DECODE_CPU_SECONDS,
        card_file: str | Path | None = None,
        name: str | None = None,
        version: str = "1",
    ):
        self.model_path = Path(model_path)
        self.card_file = Path(card_file) if card_file is not None else card_path(model_path)
        self.threads = threads
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self.decode_cpu_seconds = decode_cpu_seconds
        self.engine = engine
        # A repository's version is DIR/NAME/N/model.*: named by its folder; a file alone by its card, else its stem.
        self.name = name or (self.model_path.parent.parent.name if self.card_file.name == "model.json" else None)
        self.version = str(version)
        self.contract: Contract | None = None
        self.card: dict = {}
        self.ready = False

    def load(self) -> Segmenter:
        """Build the engine, read the card, check one against the other; returns self. Raises
        `segapp.contract.ContractError` (or the engine's error) with one line naming what is wrong."""
        if self.engine is None:
            self.engine = open_engine(self.model_path, self.threads)
        card = read_card(self.card_file)
        where = str(self.card_file) if card is not None else f"{self.model_path} (no card)"
        if card is None:
            log.warning("%s has no card %s: serving it with what the network tells (classes class_0...)",
                        self.model_path, self.card_file)
        self.contract = make_contract(card, self.engine, where)
        self.name = self.name or str(self.contract.card.get("name") or self.model_path.stem)
        self.card = {**self.contract.describe(), "name": self.name, "version": self.version,
                     "engine": getattr(self.engine, "name", type(self.engine).__name__)}
        if not upsampling.COMPILED:
            log.warning("segapp._upsampling was not built (no C compiler at install): masks are upsampled with "
                        "NumPy, the same masks at about half the speed")
        self.ready = True
        return self

    def segment(self, data: bytes, full_pixels: bool = False, cpu_seconds: float | None = None) -> Segmentation:
        """Segment the image in `data`. Raises `segapp.imaging.ImageError` for bytes that are not a usable image.

        With `full_pixels`, `Segmentation.image` is the image at full size, for an overlay or a cutout; otherwise a
        large JPEG is decoded at a reduced scale, which is all the network needs. `cpu_seconds` is the decode's CPU
        budget (default: the segmenter's `decode_cpu_seconds`; a batch passes what its images have left).
        """
        started = time.perf_counter()
        draft = None if full_pixels else max(self.contract.width, self.contract.height)
        decoded = decode_image(data, self.max_pixels, draft_size=draft, max_bytes=self.max_decode_bytes,
                               cpu_seconds=self.decode_cpu_seconds if cpu_seconds is None else cpu_seconds)
        decoded_at = time.perf_counter()
        batch, placement = self.prepare(decoded.image)
        answer = self.engine.predict(batch, self.contract.output)[0]
        inferred_at = time.perf_counter()
        mask = upsample_argmax(self.scores(answer, placement), decoded.width, decoded.height)
        done = time.perf_counter()
        timings = {
            "decode": decoded_at - started,
            "infer": inferred_at - decoded_at,
            "postprocess": done - inferred_at,
        }
        return Segmentation(mask=mask, image=decoded.image if full_pixels else None, timings=timings)

    def segment_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """The class mask for RGB pixels already decoded, at their own size."""
        batch, placement = self.prepare(pixels)
        answer = self.engine.predict(batch, self.contract.output)[0]
        return upsample_argmax(self.scores(answer, placement), pixels.shape[1], pixels.shape[0])

    def prepare(self, pixels: np.ndarray | Image.Image) -> tuple[np.ndarray, Placement]:
        """A batch of one for the network (its size, layout, channel order and normalisation) from an RGB image
        (uint8 array or Pillow image) of any size, and where the image lies in it."""
        contract = self.contract
        width, height = contract.width, contract.height
        if contract.resize == "letterbox":
            source_width, source_height = (pixels.size if isinstance(pixels, Image.Image)
                                           else (pixels.shape[1], pixels.shape[0]))
            scale = min(width / source_width, height / source_height)
            inner_width = min(width, max(1, round(source_width * scale)))
            inner_height = min(height, max(1, round(source_height * scale)))
            placement = Placement((width - inner_width) // 2, (height - inner_height) // 2, inner_width, inner_height)
            # The padding is the mean colour, which the normalisation makes 0 (mean is in the network's channel
            # order: reversed here for a BGR network, whose channels are reversed below).
            fitted = np.empty((height, width, 3), np.uint8)
            mean = contract.mean[::-1] if contract.channels == "BGR" else contract.mean
            fitted[:] = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
            fitted[placement.top : placement.top + inner_height, placement.left : placement.left + inner_width] = \
                resize_pixels(pixels, inner_width, inner_height)
        else:
            placement = Placement(0, 0, width, height)
            fitted = resize_pixels(pixels, width, height)
        if contract.channels == "BGR":
            fitted = fitted[..., ::-1]
        batch = (fitted.astype(np.float32) - np.float32(contract.mean)) * np.float32(1 / np.asarray(contract.std))
        if contract.layout == "NCHW":
            batch = batch.transpose(2, 0, 1)
        return np.ascontiguousarray(batch[None]), placement

    def predict_logits(self, pixels: np.ndarray | Image.Image) -> np.ndarray:
        """Per-class scores H x W x classes at the network's output size, for an RGB image of any size."""
        batch, placement = self.prepare(pixels)
        return self.scores(self.engine.predict(batch, self.contract.output)[0], placement)

    def scores(self, answer: np.ndarray, placement: Placement) -> np.ndarray:
        """The network's answer for one image as H x W x classes float32 scores whose argmax is the class, cropped
        to the image when it was letterboxed: what `upsample_argmax` takes."""
        contract = self.contract
        if answer.ndim == 2:
            answer = answer[..., None]
        elif contract.layout == "NCHW":
            answer = answer.transpose(1, 2, 0)
        rows, columns = answer.shape[:2]
        if contract.resize == "letterbox":
            fy, fx = rows / contract.height, columns / contract.width
            top, left = round(placement.top * fy), round(placement.left * fx)
            bottom = max(top + 1, round((placement.top + placement.height) * fy))
            right = max(left + 1, round((placement.left + placement.width) * fx))
            answer = answer[top:bottom, left:right]
        if contract.kind == "sigmoid":
            # Two classes: at or below the threshold, above it; bilinear upsampling then compares the same way.
            return np.concatenate([np.full_like(answer, contract.threshold, np.float32), answer], axis=-1)
        if contract.kind == "labels":
            labels = np.rint(answer[..., 0]).astype(np.int64)
            if labels.size and not 0 <= labels.min() <= labels.max() < len(contract.classes):
                raise ValueError(f"the network answered class {labels.max()}, but its card names "
                                 f"{len(contract.classes)} classes")
            return (labels[..., None] == np.arange(len(contract.classes))).astype(np.float32)
        return np.ascontiguousarray(answer, dtype=np.float32)
