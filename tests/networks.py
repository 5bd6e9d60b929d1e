"""Segmentation networks with known weights, built (never trained) in every format segapp serves, so that a test knows
the right mask of an image without a trained model.

The network is a 1x1 convolution over the normalised image x = (pixel - mean) / std (the card's mean and std, on
0-255 pixel values): four classes, "red", "green" and "blue" are the normalised channels themselves and "dark" is a
constant `dark_constant(mean, std)`, so that a pixel is dark exactly where every normalised channel is below it.
`colour_blocks` draws an image of flat colour regions whose mask (`expected_mask`) comes out only when the network is
fed with its own mean and std: fed with another normalisation ([0, 1] to an ImageNet network, or the reverse) whole
regions change class.

    network = Network("onnx", layout="NCHW", height=48, width=80, **IMAGENET, output="probabilities")
    path = build_network(network, cache)                         # cache/<network.key>/model.onnx, built once
    write_model(repository, "colours", 1, network, network.card(), cache=cache)

Build times on 2 cores, median (first of its kind in a process): .onnx 1 ms (10), .keras 30 ms (90), SavedModel
40 ms, .tflite 340 ms (660), int8 .tflite 340 ms; the TensorFlow formats import TensorFlow first, 3.5 s once a process.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ("red", "green", "blue", "dark")
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (64, 64, 64))
# A sigmoid network answers "red or not": its two classes, below and above the threshold.
SIGMOID_CLASSES = ("other", "red")

# The card's mean and std of the three normalisations users meet (the TFLite metadata convention, 0-255 scale).
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (255.0, 255.0, 255.0)}  # [0, 1]
SYMMETRIC = {"mean": (127.5, 127.5, 127.5), "std": (127.5, 127.5, 127.5)}  # [-1, 1]
IMAGENET = {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)}
NORMALISATIONS = {"unit": UNIT, "symmetric": SYMMETRIC, "imagenet": IMAGENET}

# Pixel level below which a channel counts as dark, chosen with the region colours below by searching for the widest
# margins: every region's class wins by at least 15.5 pixel levels when the network is fed its own normalisation,
# and each wrong one of the three above moves some region off its class by at least 17 levels.
DARK_LEVEL = 44
# Slope of the sigmoid network, per unit of the normalised red channel: a region 15 levels off the threshold answers
# 0.39 or 0.61 under [0, 1] (clear of int8's 1/256 steps), 0.1 or 0.9 under ImageNet.
SIGMOID_GAIN = 8.0

# The regions of `colour_blocks`: saturated and dim colours (their class) and black and near-black (dark).
COLOURS = {
    "red": ((255, 0, 0), 0), "green": ((0, 255, 0), 1), "blue": ((0, 0, 255), 2),
    "dim red": ((68, 0, 0), 0), "dim green": ((0, 68, 0), 1), "dim blue": ((0, 0, 68), 2),
    "black": ((0, 0, 0), 3), "near black": ((16, 16, 16), 3),
}
# A 4 x 4 grid, each colour twice, no two neighbours alike, no symmetry (a flip or a transpose changes the mask).
GRID = (
    ("red", "green", "blue", "black"),
    ("dim green", "dim blue", "near black", "dim red"),
    ("blue", "black", "red", "green"),
    ("near black", "dim red", "dim green", "dim blue"),
)

FORMATS = {"tflite": "model.tflite", "tflite-int8": "model.tflite", "keras": "model.keras",
           "savedmodel": "model.savedmodel", "onnx": "model.onnx"}
OUTPUTS = ("logits", "probabilities", "sigmoid", "labels")


def dark_constant(mean, std) -> float:
    """The "dark" class's constant logit for a network fed (pixel - mean) / std: the normalised value of pixel level
    DARK_LEVEL (44), averaged over the three channels. A pixel is dark where every normalised channel is below it.

        [0, 1]    mean 0, std 255          c =  0.172549 (44 / 255): dark below 44 on every channel
        [-1, 1]   mean 127.5, std 127.5    c = -0.654902: dark below 44 on every channel
        ImageNet  123.675/116.28/103.53,   c = -1.222460: dark below 52.3 red, 46.5 green, 33.4 blue
                  58.395/57.12/57.375
    """
    mean, std = np.broadcast_to(np.asarray(mean, float), 3), np.broadcast_to(np.asarray(std, float), 3)
    return float(np.mean((DARK_LEVEL - mean) / std))


@dataclass(frozen=True)
class Network:
    """One variant of the colour network.

    format: "tflite" (float32), "tflite-int8" (full integer: int8 input and output), "keras", "savedmodel", "onnx".
    layout: "NHWC" or "NCHW", of the input and of every output (TensorFlow formats transpose at the front and back).
    output: "logits" (4 channels), "probabilities" (their softmax), "sigmoid" (1 channel: red or not, a probability),
    "labels" (class indices, [N, H, W]: int64 from ONNX's ArgMax, int32 from TensorFlow and LiteRT, even int8).
    two_outputs: an auxiliary output "aux" first (the same kind, classes rotated by one: aux's class is
    (k + 1) % 4, or the sigmoid inverted), the segmentation "segmentation" second; the card selects it as tensor 1.
    Those names are the ONNX outputs', the SavedModel signature's, Keras's model.output_names (its tensors are named
    keras_tensor_<n>) and the .tflite signature's outputs (its tensors are named PartitionedCall:0 and :1).
    The batch dimension is open (None, -1 or "N").
    """

    format: str = "tflite"
    layout: str = "NHWC"
    height: int = 64
    width: int = 64
    mean: tuple[float, float, float] = UNIT["mean"]
    std: tuple[float, float, float] = UNIT["std"]
    output: str = "logits"
    two_outputs: bool = False

    def __post_init__(self):
        for field_name in ("mean", "std"):  # one number or three, as a card says it; stored as three floats
            value = np.broadcast_to(np.asarray(getattr(self, field_name), float), 3)
            object.__setattr__(self, field_name, tuple(float(v) for v in value))
        if self.format not in FORMATS or self.layout not in ("NHWC", "NCHW") or self.output not in OUTPUTS:
            raise ValueError(f"not a network this module builds: {self}")

    @property
    def normalisation(self) -> str:
        """"unit", "symmetric", "imagenet", or mean and std spelt out."""
        for name, values in NORMALISATIONS.items():
            if (self.mean, self.std) == (values["mean"], values["std"]):
                return name
        return "m" + "_".join(f"{v:g}" for v in self.mean) + "-s" + "_".join(f"{v:g}" for v in self.std)

    @property
    def key(self) -> str:
        """A folder name unique to the variant, e.g. onnx-nchw-48x80-imagenet-probabilities (height x width)."""
        two = "-two" if self.two_outputs else ""
        return f"{self.format}-{self.layout.lower()}-{self.height}x{self.width}-{self.normalisation}-{self.output}{two}"

    @property
    def file_name(self) -> str:
        return FORMATS[self.format]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The input's shape for a batch of one."""
        return (1, 3, self.height, self.width) if self.layout == "NCHW" else (1, self.height, self.width, 3)

    @property
    def classes(self) -> tuple[str, ...]:
        return SIGMOID_CLASSES if self.output == "sigmoid" else CLASSES

    def card(self, resize: str = "stretch", **extra) -> dict:
        """The card that describes this network truly: classes, palette, mean/std, output kind and tensor."""
        palette = ((0, 0, 0), PALETTE[0]) if self.output == "sigmoid" else PALETTE
        output = {"kind": self.output, **({"threshold": 0.5} if self.output == "sigmoid" else {}),
                  **({"tensor": 1} if self.two_outputs else {})}
        return {"description": f"test network {self.key}: colour classes from a 1x1 convolution with known weights",
                "classes": list(self.classes), "palette": [list(c) for c in palette],
                "input": {"resize": resize, "channels": "RGB", "mean": list(self.mean), "std": list(self.std)},
                "output": output, **extra}


def heads(network: Network) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each output's 1x1 convolution before its activation, in output order: name -> (weights 3 x k, bias k)."""
    c = dark_constant(network.mean, network.std)
    if network.output == "sigmoid":
        weights, bias = np.array([[SIGMOID_GAIN], [0], [0]], np.float32), np.array([-SIGMOID_GAIN * c], np.float32)
        aux = (-weights, -bias)
    else:
        weights, bias = np.eye(3, 4, dtype=np.float32), np.array([0, 0, 0, c], np.float32)
        aux = (np.roll(weights, 1, axis=1), np.roll(bias, 1))
    return {"aux": aux, "segmentation": (weights, bias)} if network.two_outputs else {"segmentation": (weights, bias)}


def reference_output(network: Network, pixels: np.ndarray, mean=None, std=None, name: str = "segmentation"):
    """What the network answers for uint8 RGB `pixels` (H x W x 3) normalised with `mean`/`std` (default the
    network's own), in NumPy: H x W x k floats, or H x W labels. The layout is always channels last here."""
    mean = network.mean if mean is None else mean
    std = network.std if std is None else std
    x = (pixels.astype(np.float64) - np.asarray(mean, float)) / np.asarray(std, float)
    weights, bias = heads(network)[name]
    y = x @ weights.astype(np.float64) + bias
    if network.output == "probabilities":
        y = np.exp(y - y.max(axis=-1, keepdims=True))
        return y / y.sum(axis=-1, keepdims=True)
    if network.output == "sigmoid":
        return 1 / (1 + np.exp(-y))
    return y.argmax(axis=-1) if network.output == "labels" else y


def class_map(output: np.ndarray, kind: str, threshold: float = 0.5) -> np.ndarray:
    """The classes (uint8 H x W) of one channels-last answer (H x W x k, or H x W labels) of the given kind."""
    output = np.asarray(output)
    if kind == "labels":
        return output.reshape(output.shape[:2]).astype(np.uint8)
    if kind == "sigmoid":
        return (output[..., 0] > threshold).astype(np.uint8)
    return output.argmax(axis=-1).astype(np.uint8)


def colour_blocks(width: int = 160, height: int = 120) -> np.ndarray:
    """The test image, uint8 height x width x 3: GRID's 4 x 4 flat colour regions, cell edges at i * size // 4."""
    rows, columns = _edges(height), _edges(width)
    pixels = np.zeros((height, width, 3), np.uint8)
    for i, row in enumerate(GRID):
        for j, colour in enumerate(row):
            pixels[rows[i]:rows[i + 1], columns[j]:columns[j + 1]] = COLOURS[colour][0]
    return pixels


def expected_mask(width: int = 160, height: int = 120, kind: str = "logits") -> np.ndarray:
    """The right mask (uint8 class indices, height x width) of `colour_blocks(width, height)` for a network fed its
    own normalisation, whatever that is: CLASSES' indices, or for a sigmoid network 1 (red) on red and dim red."""
    rows, columns = _edges(height), _edges(width)
    mask = np.zeros((height, width), np.uint8)
    for i, row in enumerate(GRID):
        for j, colour in enumerate(row):
            label = COLOURS[colour][1]
            mask[rows[i]:rows[i + 1], columns[j]:columns[j + 1]] = int(label == 0) if kind == "sigmoid" else label
    return mask


def edge_margin(image_size: tuple[int, int], input_size: tuple[int, int]) -> int:
    """Image pixels on each side of a region edge (and of the image's border) where a mask made through a resize may
    differ from `expected_mask`; sizes are (width, height).

    One network pixel covers s = the larger of image/input per axis image pixels (letterbox scales by exactly that).
    Pillow's bilinear downscale blends s pixels each side of an edge into the network's pixels, upsampling the answer
    back interpolates across one more network pixel, and letterbox's padding is blended into the border the same way:
    ceil(2 s) + 1. 160x120 into 64x64 or 80x48: 6; 500x375 into 64x64: 17. A JPEG blurs edges further (its 8x8
    blocks, 16x16 for chroma): send PNG.
    """
    scale = max(image_size[0] / input_size[0], image_size[1] / input_size[1])
    return math.ceil(2 * scale) + 1


def compared_pixels(width: int, height: int, margin: int) -> np.ndarray:
    """Where a test compares a mask with `expected_mask` (bool, height x width): `margin` pixels and more from every
    region edge and from the image's border."""
    keep = np.ones((height, width), bool)
    for axis, size in ((0, height), (1, width)):
        near = np.zeros(size, bool)
        for edge in _edges(size):
            near[max(edge - margin, 0):edge + margin] = True
        keep &= ~near[:, None] if axis == 0 else ~near[None, :]
    return keep


def _edges(size: int) -> list[int]:
    return [i * size // 4 for i in range(5)]


def build_network(network: Network, cache: Path) -> Path:
    """The network's file (a folder for a SavedModel) under cache/<network.key>/, built there unless it is there
    already: a session's tests share each build. Built in a scratch folder and renamed, so never half written."""
    path = Path(cache) / network.key / network.file_name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from tests.network_formats import write_network  # it reads this module's design

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / network.file_name
        write_network(network, built)
        built.rename(path)
    return path


def write_model(repository: Path, name: str, version: int, network: Network, card: dict | None = None,
                cache: Path | None = None) -> Path:
    """Put `network` in a model repository as repository/<name>/<version>/model.<ext>, with `card` as
    repository/<name>/model.json (None: no card, a network served with what can be read from it; `network.card()`
    is the true one). Built through `cache` when given. Returns the network's path."""
    folder = Path(repository) / name
    target = folder / str(version) / network.file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    built = build_network(network, cache if cache is not None else target.parent / ".build")
    if built.is_dir():
        shutil.copytree(built, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(built, target)
    if cache is None:
        shutil.rmtree(target.parent / ".build")
    if card is not None:
        (folder / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return target
