"""The test networks of tests/networks.py, each run directly in its own runtime (LiteRT, Keras, TensorFlow, ONNX
Runtime), not through segapp: the colour image's mask comes out right with the network's own normalisation and
wrong with another one."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

from tests.networks import (
    CLASSES,
    COLOURS,
    FORMATS,
    IMAGENET,
    NORMALISATIONS,
    OUTPUTS,
    SYMMETRIC,
    UNIT,
    Network,
    build_network,
    class_map,
    colour_blocks,
    compared_pixels,
    dark_constant,
    edge_margin,
    expected_mask,
    reference_output,
    write_model,
)

SIZES = ((64, 64), (48, 80))  # (height, width): square and not


def variants() -> list[Network]:
    """Every format with every output kind and a two-output network; layouts, sizes and normalisations rotate so
    that each format meets both layouts, both sizes and the three normalisations."""
    networks = []
    for i, name in enumerate(FORMATS):
        for j, output in enumerate((*OUTPUTS, None)):
            k = i + j
            height, width = SIZES[(k // 2) % 2]
            networks.append(Network(
                name, layout="NCHW" if k % 2 else "NHWC", height=height, width=width,
                **NORMALISATIONS[list(NORMALISATIONS)[k % 3]],
                output=output or OUTPUTS[i % 4], two_outputs=output is None,
            ))
    return networks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("networks")


def run(network: Network, path, batch: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """The network's output names and outputs (float32, or the labels' integers) for a float32 batch."""
    if network.format.startswith("tflite"):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        given = interpreter.get_input_details()[0]
        if given["dtype"] == np.int8:
            scale, zero = given["quantization"]
            batch = np.clip(np.rint(batch / scale) + zero, -128, 127).astype(np.int8)
        interpreter.set_tensor(given["index"], batch)
        interpreter.invoke()
        answers = []
        for detail in interpreter.get_output_details():
            value = interpreter.get_tensor(detail["index"])
            scale, zero = detail["quantization"]
            answers.append((value.astype(np.float32) - zero) * scale if value.dtype == np.int8 else value)
        return list(interpreter.get_signature_list()["serving_default"]["outputs"]), answers
    if network.format == "keras":
        import keras

        model = keras.saving.load_model(str(path), compile=False)
        answers = model(batch)
        return list(model.output_names), [np.asarray(a) for a in (answers if isinstance(answers, list) else [answers])]
    if network.format == "savedmodel":
        import tensorflow as tf

        answers = tf.saved_model.load(str(path)).signatures["serving_default"](image=tf.constant(batch))
        return sorted(answers), [np.asarray(answers[name]) for name in sorted(answers)]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in session.get_outputs()], session.run(None, {"image": batch})


def feed(network: Network, pixels: np.ndarray, normalisation: dict) -> np.ndarray:
    x = ((pixels - np.asarray(normalisation["mean"])) / np.asarray(normalisation["std"])).astype(np.float32)[None]
    return x.transpose(0, 3, 1, 2) if network.layout == "NCHW" else x


def channels_last(network: Network, answer: np.ndarray) -> np.ndarray:
    """One image's answer, H x W x k (or H x W labels)."""
    return answer[0].transpose(1, 2, 0) if network.layout == "NCHW" and answer.ndim == 4 else answer[0]


def differing_cells(mask: np.ndarray, expected: np.ndarray) -> int:
    height, width = mask.shape
    return sum(
        bool((mask[i * height // 4:(i + 1) * height // 4, j * width // 4:(j + 1) * width // 4]
              != expected[i * height // 4:(i + 1) * height // 4, j * width // 4:(j + 1) * width // 4]).any())
        for i, j in itertools.product(range(4), range(4))
    )


@pytest.mark.parametrize("network", variants(), ids=lambda network: network.key)
def test_each_network_answers_the_colour_mask_only_with_its_own_normalisation(network, cache):
    path = build_network(network, cache)
    pixels = colour_blocks(network.width, network.height)
    expected = expected_mask(network.width, network.height, network.output)

    names, answers = run(network, path, feed(network, pixels, {"mean": network.mean, "std": network.std}))
    assert names == (["aux", "segmentation"] if network.two_outputs else ["segmentation"])
    answer = answers[-1]
    channels = {"sigmoid": 1, "labels": None}.get(network.output, 4)
    if channels is None:
        assert answer.shape == (1, network.height, network.width)
        assert answer.dtype == (np.int64 if network.format == "onnx" else np.int32)
    else:
        spatial = (network.height, network.width)
        assert answer.shape == ((1, channels, *spatial) if network.layout == "NCHW" else (1, *spatial, channels))
        assert answer.dtype == np.float32
        tolerance = 0.05 if network.format == "tflite-int8" else 1e-5  # int8: some steps of its output scale
        np.testing.assert_allclose(channels_last(network, answer), reference_output(network, pixels), atol=tolerance)
    np.testing.assert_array_equal(class_map(channels_last(network, answer), network.output), expected)
    if network.two_outputs:  # the first output is a plausible segmentation, and a wrong one
        aux = class_map(channels_last(network, answers[0]), network.output)
        np.testing.assert_array_equal(aux, 1 - expected if network.output == "sigmoid" else (expected + 1) % 4)

    for name, wrong in NORMALISATIONS.items():
        if name != network.normalisation:
            _, answers = run(network, path, feed(network, pixels, wrong))
            mask = class_map(channels_last(network, answers[-1]), network.output)
            assert differing_cells(mask, expected) >= 2, f"fed {name}, the mask is still the right one"


@pytest.mark.parametrize("normalisation", NORMALISATIONS)
def test_every_region_wins_by_a_margin_and_every_wrong_normalisation_moves_one(normalisation):
    network = Network(**NORMALISATIONS[normalisation])
    for colour, (rgb, label) in COLOURS.items():
        # The least change of one channel, in pixel levels, that makes another class win.
        logits = reference_output(network, np.array([[rgb]], np.uint8))[0, 0]
        runner_up = np.delete(logits, label).max()
        assert (logits[label] - runner_up) * np.mean(network.std) > 15, colour
    for name, wrong in NORMALISATIONS.items():
        if name != normalisation:
            pixels = np.array([[rgb for rgb, _ in COLOURS.values()]], np.uint8)
            logits = reference_output(network, pixels, **wrong)[0]
            labels = [label for _, label in COLOURS.values()]
            moved = [logits[i].max() - logits[i, label] for i, label in enumerate(labels)]
            assert max(moved) * np.mean(wrong["std"]) > 15, f"fed {name}"


def test_dark_constants_are_the_documented_ones():
    assert dark_constant(**UNIT) == pytest.approx(0.172549, abs=1e-6)
    assert dark_constant(**SYMMETRIC) == pytest.approx(-0.654902, abs=1e-6)
    assert dark_constant(**IMAGENET) == pytest.approx(-1.222460, abs=1e-6)


def test_the_test_image_has_every_class_twice_and_no_symmetry():
    mask = expected_mask(160, 120)
    assert colour_blocks(160, 120).shape == (120, 160, 3)
    assert [round(float(np.mean(mask == k)), 4) for k in range(len(CLASSES))] == [0.25, 0.25, 0.25, 0.25]
    for flipped in (mask[::-1], mask[:, ::-1], mask[::-1, ::-1]):
        assert (flipped != mask).any()
    assert expected_mask(160, 120, "sigmoid").mean() == pytest.approx(0.25)


def _through_resize(network: Network, pixels: np.ndarray, resize: str, pad: int) -> np.ndarray:
    """The mask a server would make: the image resized to the input (Pillow bilinear; letterbox pads with `pad`),
    the reference network, its answer upsampled bilinearly back to the image's pixels (half-pixel centres)."""
    height, width = pixels.shape[:2]
    image = Image.fromarray(pixels)
    if resize == "stretch":
        inner = (network.width, network.height)
        offset = (0, 0)
        fed = np.asarray(image.resize(inner, Image.BILINEAR))
    else:
        scale = min(network.width / width, network.height / height)
        inner = (round(width * scale), round(height * scale))
        offset = ((network.width - inner[0]) // 2, (network.height - inner[1]) // 2)
        canvas = Image.new("RGB", (network.width, network.height), (pad, pad, pad))
        canvas.paste(image.resize(inner, Image.BILINEAR), offset)
        fed = np.asarray(canvas)
    answer = reference_output(network, fed)[offset[1]:offset[1] + inner[1], offset[0]:offset[0] + inner[0]]
    channels = [np.asarray(Image.fromarray(answer[..., k].astype(np.float32), "F").resize((width, height),
                                                                                           Image.BILINEAR))
                for k in range(answer.shape[-1])]
    return class_map(np.stack(channels, axis=-1), network.output)


@pytest.mark.parametrize("image_size", [(160, 120), (500, 375), (120, 160)])
def test_the_edge_margin_covers_what_a_resize_blurs(image_size):
    width, height = image_size
    pixels = colour_blocks(width, height)
    for (input_height, input_width), normalisation, output, resize, pad in itertools.product(
            SIZES, NORMALISATIONS, ("logits", "sigmoid"), ("stretch", "letterbox"), (0, 128)):
        network = Network(height=input_height, width=input_width, output=output, **NORMALISATIONS[normalisation])
        margin = edge_margin(image_size, (input_width, input_height))
        kept = compared_pixels(width, height, margin)
        mask = _through_resize(network, pixels, resize, pad)
        assert np.array_equal(mask[kept], expected_mask(width, height, output)[kept]), (network.key, resize, pad)
    assert edge_margin((160, 120), (64, 64)) == 6 and edge_margin((500, 375), (64, 64)) == 17


def test_write_model_lays_out_a_repository(tmp_path, cache):
    network = Network("onnx", layout="NCHW", **IMAGENET, output="probabilities")
    path = write_model(tmp_path, "colours", 2, network, network.card(resize="letterbox"), cache=cache)
    assert path == tmp_path / "colours" / "2" / "model.onnx" and path.is_file()
    card = json.loads((tmp_path / "colours" / "model.json").read_text())
    assert card["classes"] == list(CLASSES) and card["input"]["mean"] == list(IMAGENET["mean"])
    assert card["input"]["resize"] == "letterbox" and card["output"] == {"kind": "probabilities"}

    bare = write_model(tmp_path, "bare", 1, Network("savedmodel", output="sigmoid", two_outputs=True))
    assert (bare / "saved_model.pb").is_file() and not (tmp_path / "bare" / "model.json").exists()
    assert sorted(p.name for p in (tmp_path / "bare" / "1").iterdir()) == ["model.savedmodel"]
    assert Network(output="sigmoid", two_outputs=True).card()["output"] == {"kind": "sigmoid", "threshold": 0.5,
                                                                            "tensor": 1}
