"""A model's contract: how to feed its network and how to read what it answers.

Part of it is the model's card (`model.json`, written by `segapp-train` with `card_json`, or by hand): classes,
palette, the resize, channel order and mean/std of the input, the kind of output. The rest is read from the network
through its engine: input size and layout (NHWC or NCHW), output channels, quantization; never asked twice. `Contract`
joins the two when a model loads; a card that contradicts its network is refused then with one line naming the card
and the mismatch (`ContractError`). docs/models.md describes every field with a worked example.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RESIZES = ("stretch", "letterbox")
CHANNEL_ORDERS = ("RGB", "BGR")
OUTPUT_KINDS = ("logits", "probabilities", "sigmoid", "labels")
# A palette PNG mask holds at most 256 classes.
MAX_CLASSES = 256
_INPUT_KEYS = {"resize", "channels", "mean", "std", "size"}
_OUTPUT_KEYS = {"kind", "threshold", "tensor"}


class ContractError(ValueError):
    """A card or network segapp cannot serve: one line naming the card (or network) and what is wrong."""


def card_json(classes, palette=None, *, mean=0.0, std=255.0, resize="stretch", channels="RGB", kind="logits",
              **extra) -> dict:
    """A card as `segapp-train` writes it (and anyone may): the contract's fields, then `extra` (name, description,
    architecture, training, quality...)."""
    card = {"classes": list(classes)}
    if palette is not None:
        card["palette"] = [list(colour) for colour in palette]
    card["input"] = {"resize": resize, "channels": channels, "mean": mean, "std": std}
    card["output"] = {"kind": kind}
    return {**extra, **card}


def read_card(path: Path) -> dict | None:
    """The JSON object in the card file `path`, or None when there is none. Raises `ContractError`."""
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ContractError(f"{path}: not a readable JSON card ({error})") from None
    if not isinstance(card, dict):
        raise ContractError(f"{path}: a card is a JSON object, not {type(card).__name__}")
    return card


@dataclass(frozen=True)
class Contract:
    """Everything serving needs to know to feed a network and read its answer."""

    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    foreground: tuple[int, ...]  # class indices a cutout keeps
    width: int  # the network's input size
    height: int
    layout: str  # "NHWC" or "NCHW", of the input and the output
    resize: str = "stretch"
    channels: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    kind: str = "logits"
    threshold: float = 0.5
    output: int = 0  # which of the engine's outputs
    inferred: bool = False  # no card: everything from the network
    card: dict = field(default_factory=dict)  # the card as written (its other keys are shown in /v1/models)

    def describe(self) -> dict:
        """The card with every default filled in, as /v1/models shows it."""
        described = {key: value for key, value in self.card.items() if key not in ("input_size",)}
        described.update({
            "classes": list(self.classes),
            "palette": [list(colour) for colour in self.palette],
            "foreground": [self.classes[index] for index in self.foreground],
            "input": {"size": [self.width, self.height], "layout": self.layout, "resize": self.resize,
                      "channels": self.channels, "mean": list(self.mean), "std": list(self.std)},
            "output": {"kind": self.kind, "tensor": self.output,
                       **({"threshold": self.threshold} if self.kind == "sigmoid" else {})},
            "card": "inferred" if self.inferred else "file",
        })
        return described


def make_contract(card: dict | None, engine, where: str) -> Contract:
    """The contract of the network run by `engine`, described by `card` (None: inferred from the network alone).

    Runs the network once on a zero batch, to learn the size of its answer. `where` names the card (or the
    network, when there is none) in errors.
    """
    inferred = card is None
    card = {} if card is None else card
    feed, read = _section(card, "input", _INPUT_KEYS, where), _section(card, "output", _OUTPUT_KEYS, where)
    layout, height, width = _input_geometry(engine, feed, card.get("input_size"), where)
    output = _output_index(engine, read.get("tensor", 0), where)
    shape = (1, 3, height, width) if layout == "NCHW" else (1, height, width, 3)
    answer = np.asarray(engine.predict(np.zeros(shape, np.float32), output))
    kind = _choice(read, "kind", OUTPUT_KINDS, _default_kind(answer, layout), where)
    channels = _output_channels(answer, layout, kind, where)
    classes = _classes(card, kind, channels, where)
    return Contract(
        classes=classes,
        palette=_palette(card, len(classes), where),
        foreground=_foreground(card, classes, kind, where),
        width=width, height=height, layout=layout,
        resize=_choice(feed, "resize", RESIZES, "stretch", where),
        channels=_choice(feed, "channels", CHANNEL_ORDERS, "RGB", where),
        mean=_per_channel(feed, "mean", 0.0, where), std=_per_channel(feed, "std", 255.0, where, positive=True),
        kind=kind, threshold=_threshold(read, where), output=output, inferred=inferred, card=card,
    )


def _check_keys(section: dict, known: set[str], where: str, prefix: str) -> None:
    # The contract's own sections are strict (a misspelt "mean" would feed the network wrongly); other keys of a
    # card are the author's (architecture, training, license) and are shown as they are.
    unknown = sorted(key for key in section if key not in known)
    if unknown:
        raise ContractError(f"{where}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")


def _section(card: dict, name: str, known: set[str], where: str) -> dict:
    section = card.get(name, {})
    if not isinstance(section, dict):
        raise ContractError(f"{where}: '{name}' must be an object")
    _check_keys(section, known, where, prefix=f"{name}.")
    return section


def _choice(section: dict, key: str, choices: tuple[str, ...], default: str, where: str) -> str:
    value = section.get(key, default)
    if value not in choices:
        raise ContractError(f"{where}: {key} {value!r} is not one of {', '.join(choices)}")
    return value


def _input_geometry(engine, feed: dict, legacy_size, where: str) -> tuple[str, int, int]:
    """(layout, height, width) of the network's input, the card's size filling only dimensions the network opens."""
    shape = engine.input.shape
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise ContractError(f"{where}: the network's input {list(shape)} is not an image batch "
                            "(NHWC or NCHW, 3 channels)")
    layout = "NHWC" if shape[3] == 3 else "NCHW"
    height, width = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    size = feed.get("size", legacy_size)
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 0 < v <= 8192 for v in size)):
            raise ContractError(f"{where}: input size {size!r} is not [width, height] in whole pixels")
        for axis, network, card in (("width", width, size[0]), ("height", height, size[1])):
            if network is not None and network != card:
                raise ContractError(f"{where}: the card's input {axis} is {card}, but the network takes {network}")
        width, height = width or size[0], height or size[1]
    if width is None or height is None:
        raise ContractError(f"{where}: the network's input size is not fixed; the card must give input.size")
    return layout, height, width


def _output_index(engine, tensor, where: str) -> int:
    names = [spec.name for spec in engine.outputs]
    if isinstance(tensor, str):
        if tensor not in names:
            raise ContractError(f"{where}: output.tensor {tensor!r} is not an output of the network "
                                f"({', '.join(names)})")
        return names.index(tensor)
    if not isinstance(tensor, int) or isinstance(tensor, bool) or not 0 <= tensor < len(names):
        raise ContractError(f"{where}: output.tensor {tensor!r} is not a name or an index below {len(names)}")
    return tensor


def _default_kind(answer: np.ndarray, layout: str) -> str:
    if answer.ndim == 3:
        return "labels"
    return "sigmoid" if _channel_axis_size(answer, layout) == 1 else "logits"


def _channel_axis_size(answer: np.ndarray, layout: str) -> int:
    return int(answer.shape[1] if layout == "NCHW" else answer.shape[-1])


def _output_channels(answer: np.ndarray, layout: str, kind: str, where: str) -> int:
    if answer.ndim not in (3, 4):
        raise ContractError(f"{where}: the network answers {list(answer.shape)}, not a map (N, H, W[, C])")
    channels = 1 if answer.ndim == 3 else _channel_axis_size(answer, layout)
    if kind in ("sigmoid", "labels") and channels != 1:
        raise ContractError(f"{where}: output kind {kind} needs one channel, but the network answers {channels}")
    if kind in ("logits", "probabilities") and channels < 2:
        raise ContractError(f"{where}: output kind {kind} needs a channel per class, but the network answers one "
                            "(a one-channel network is kind sigmoid or labels)")
    return channels


def _classes(card: dict, kind: str, channels: int, where: str) -> tuple[str, ...]:
    classes = card.get("classes")
    count = {"sigmoid": 2, "labels": None}.get(kind, channels)
    if classes is None:
        if count is None:
            raise ContractError(f"{where}: a network that answers labels needs a card with its 'classes'")
        return tuple(f"class_{index}" for index in range(count))
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) and name for name in classes):
        raise ContractError(f"{where}: 'classes' must be a list of class names")
    if len(set(classes)) != len(classes):
        raise ContractError(f"{where}: 'classes' names a class twice: {classes}")
    if count is not None and len(classes) != count:
        what = "a sigmoid output has 2 (below and above the threshold)" if kind == "sigmoid" else \
            f"the network outputs {channels} per pixel"
        raise ContractError(f"{where}: the card names {len(classes)} classes {classes}, but {what}")
    if len(classes) > MAX_CLASSES:
        raise ContractError(f"{where}: {len(classes)} classes do not fit a palette PNG mask (at most {MAX_CLASSES})")
    return tuple(classes)


def _palette(card: dict, count: int, where: str) -> tuple[tuple[int, int, int], ...]:
    palette = card.get("palette")
    if palette is None:
        return made_palette(count)
    if not isinstance(palette, list) or len(palette) != count:
        given = len(palette) if isinstance(palette, list) else "no"
        raise ContractError(f"{where}: 'palette' has {given} colours for {count} classes")
    for colour in palette:
        if not (isinstance(colour, list) and len(colour) == 3
                and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)):
            raise ContractError(f"{where}: palette colour {colour!r} is not [red, green, blue] in 0-255")
    return tuple(tuple(colour) for colour in palette)


def made_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """`count` colours for classes with none: black first (class 0 is usually the background), then hues far apart."""
    colours = [(0, 0, 0)]
    for index in range(1, count):
        hue = (index * 0.618033988749895) % 1.0  # the golden ratio spreads any number of hues evenly
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 1.0 if index % 2 else 0.75)
        colours.append((round(red * 255), round(green * 255), round(blue * 255)))
    return tuple(colours[:count])


def _foreground(card: dict, classes: tuple[str, ...], kind: str, where: str) -> tuple[int, ...]:
    named = card.get("foreground")
    if named is None:
        if kind == "sigmoid":
            return (1,)
        kept = tuple(index for index, name in enumerate(classes) if name != "background")
        return kept if len(kept) < len(classes) else tuple(range(1, len(classes)))
    if isinstance(named, str):
        named = [named]
    if not isinstance(named, list) or not all(name in classes for name in named):
        raise ContractError(f"{where}: 'foreground' {named!r} must name classes of the card ({', '.join(classes)})")
    return tuple(sorted(classes.index(name) for name in set(named)))


def _per_channel(section: dict, key: str, default: float, where: str, positive: bool = False) -> tuple[float, ...]:
    value = section.get(key, default)
    values = [value] * 3 if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not (isinstance(values, list) and len(values) == 3 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise ContractError(f"{where}: input.{key} {value!r} is not a number or three (one per channel)")
    if positive and not all(v > 0 for v in values):
        raise ContractError(f"{where}: input.{key} {value!r} must be above 0")
    return tuple(float(v) for v in values)


def _threshold(read: dict, where: str) -> float:
    value = read.get("threshold", 0.5)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ContractError(f"{where}: output.threshold {value!r} is not a number")
    return float(value)
