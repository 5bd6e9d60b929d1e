"""Any segmentation network, described by its card, served through nginx: one repository of networks with known
weights (tests/networks.py) in every format and engine, layouts, sizes, resizes, normalisations and output kinds,
each answering the exact mask of an image of flat colour regions."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import start_stack
from tests.networks import (
    IMAGENET,
    SYMMETRIC,
    UNIT,
    Network,
    colour_blocks,
    compared_pixels,
    edge_margin,
    expected_mask,
    write_model,
)

pytestmark = pytest.mark.integration

WIDTH, HEIGHT = 160, 120
# name -> (network, resize, what else the card says); every engine and format, NHWC and NCHW, square and not,
# stretch and letterbox, each normalisation, each output kind, a quantized one, an output chosen among two.
VARIANTS = {
    "tflite-logits": (Network("tflite", "NHWC", 64, 64, **UNIT, output="logits"), "stretch", {}),
    "tflite-int8": (Network("tflite-int8", "NHWC", 64, 64, **SYMMETRIC, output="logits"), "stretch", {}),
    "tflite-labels-letterbox": (Network("tflite", "NHWC", 48, 80, **UNIT, output="labels"), "letterbox", {}),
    "tflite-two-outputs-by-name": (Network("tflite", "NHWC", 64, 64, **IMAGENET, output="probabilities",
                                           two_outputs=True), "stretch", {"tensor": "segmentation"}),
    "keras-probabilities-letterbox": (Network("keras", "NHWC", 48, 80, **IMAGENET, output="probabilities"),
                                      "letterbox", {}),
    "keras-nchw-sigmoid": (Network("keras", "NCHW", 64, 64, **UNIT, output="sigmoid"), "letterbox", {}),
    "savedmodel-nchw-sigmoid": (Network("savedmodel", "NCHW", 64, 64, **SYMMETRIC, output="sigmoid"), "stretch", {}),
    "savedmodel-labels": (Network("savedmodel", "NHWC", 48, 80, **UNIT, output="labels"), "stretch", {}),
    "onnx-nchw-imagenet": (Network("onnx", "NCHW", 48, 80, **IMAGENET, output="logits"), "letterbox", {}),
    "onnx-labels": (Network("onnx", "NHWC", 64, 64, **UNIT, output="labels"), "stretch", {}),
    "onnx-two-outputs": (Network("onnx", "NCHW", 64, 64, **SYMMETRIC, output="probabilities", two_outputs=True),
                         "stretch", {}),
    # Fed BGR, the network's "red" channel sees the image's blue: the card names its classes in that order.
    "tflite-bgr": (Network("tflite", "NHWC", 64, 64, **UNIT, output="logits"), "stretch",
                   {"channels": "BGR", "classes": ["blue", "green", "red", "dark"]}),
}
NO_CARD = "onnx-no-card"  # served with what the network tells: [0, 1] input, logits, classes class_0...


@pytest.fixture(scope="module")
def networks_stack(tmp_path_factory):
    repository = Path(tempfile.mkdtemp(prefix="segapp-networks-"))
    cache = tmp_path_factory.mktemp("networks")
    for name, (network, resize, extra) in VARIANTS.items():
        card = network.card(resize=resize)
        card["input"]["channels"] = extra.get("channels", "RGB")
        card["classes"] = extra.get("classes", card["classes"])
        if "tensor" in extra:
            card["output"]["tensor"] = extra["tensor"]
        write_model(repository, name, 1, network, card, cache=cache)
    write_model(repository, NO_CARD, 1, Network("onnx", "NHWC", 64, 64, **UNIT, output="logits"), None, cache=cache)
    (repository / "repository.json").write_text('{"default_model": "tflite-logits"}')
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        stack = start_stack(SEGAPP_MODEL_REPOSITORY=str(repository))
        yield stack
        stack.stop()
        shutil.rmtree(stack.run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(repository, ignore_errors=True)


def blocks_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(colour_blocks(WIDTH, HEIGHT)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("name", [*VARIANTS, NO_CARD])
def test_each_network_answers_the_exact_mask_of_the_colour_regions(networks_stack, name):
    network, resize, extra = VARIANTS.get(name, (Network("onnx", "NHWC", 64, 64, **UNIT), "stretch", {}))
    answer = networks_stack.infer(blocks_png(), f"?model={name}", {"Content-Type": "image/png"})
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["X-Model"] == f"{name}/1"
    mask = np.asarray(Image.open(io.BytesIO(answer.body)))
    expected = expected_mask(WIDTH, HEIGHT, network.output)
    if extra.get("channels") == "BGR":
        expected = np.choose(expected, [2, 1, 0, 3]).astype(np.uint8)  # the card's classes: blue, green, red, dark
    keep = compared_pixels(WIDTH, HEIGHT, edge_margin((WIDTH, HEIGHT), (network.width, network.height)))
    assert mask.shape == (HEIGHT, WIDTH)
    wrong = np.count_nonzero(mask[keep] != expected[keep])
    assert wrong == 0, f"{name} ({resize}): {wrong} of {np.count_nonzero(keep)} pixels in the wrong class"


def test_the_cards_say_what_was_read_from_each_network(networks_stack):
    models = {model["name"]: model for model in networks_stack.request("GET", "/v1/models").json()["models"]}
    assert all(model["state"] == "ready" for model in models.values()), models
    engines = {name: models[name]["card"]["engine"] for name in VARIANTS}
    assert set(engines.values()) == {"litert", "tensorflow", "onnxruntime"}
    onnx = models["onnx-nchw-imagenet"]["card"]
    assert onnx["input"] | {"mean": None, "std": None} == {"size": [80, 48], "layout": "NCHW", "resize": "letterbox",
                                                          "channels": "RGB", "mean": None, "std": None}
    inferred = models[NO_CARD]["card"]
    assert inferred["card"] == "inferred" and inferred["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    assert models["tflite-two-outputs-by-name"]["card"]["output"]["tensor"] == 1
