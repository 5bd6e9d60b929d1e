"""The mask is exactly the argmax of the bilinearly upsampled logits, by the compiled module and by NumPy alike."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from segapp import upsampling
from segapp.engines import TensorSpec
from segapp.inference import SHIPPED_MODEL, Segmenter
from segapp.training import scenes
from segapp.upsampling import upsample_argmax

# Every contract test runs on both paths: segapp/_upsampling.c and the NumPy fallback.
PATHS = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])


def test_the_compiled_module_was_built():
    # setup.py builds it where a C compiler is (make test's machines and the image's builder): without it,
    # the service silently upsamples at a third of the speed.
    assert upsampling.COMPILED


@PATHS
def test_upsampled_edges_follow_the_logits_not_a_staircase(compiled):
    # A diagonal boundary at 128 px, upsampled ten times. Bilinear interpolation of these linear logits is exact,
    # so class 0 starts at the first pixel whose centre is right of the line (never within 0.005 px of a pixel
    # centre on these rows, far beyond float32 rounding); upsampling the 128-px argmax would make 10-px steps.
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32) + 0.5
    distance = (xx - yy * 0.37 - 30) / 4
    logits = np.stack([distance, -distance, np.zeros_like(distance) - 5], axis=-1)
    mask = upsample_argmax(logits, 1280, 1280, compiled=compiled)
    assert np.array_equal(mask, reference_upsample_argmax(logits, 1280, 1280))
    for row in range(0, 1280, 37):
        source_y = min(max((row + 0.5) / 10, 0.5), 127.5)  # the row's centre on the 128-px grid, edges clamped
        assert int(np.argmax(mask[row] == 0)) == math.ceil((source_y * 0.37 + 30) * 10 - 0.5), row


def upsampled_planes(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """The contract's interpolation in plain NumPy, every pixel computed: each class plane (classes x height x
    width) upsampled bilinearly with half-pixel centres and clamped edges in float32, horizontally then
    vertically."""

    def taps(out, source):
        position = np.clip((np.arange(out) + 0.5) * (source / out) - 0.5, 0, source - 1).astype(np.float32)
        first = np.floor(position).astype(np.intp)
        weight = (position - first).astype(np.float32)
        return first, np.minimum(first + 1, source - 1), np.float32(1) - weight, weight

    top, bottom, keep_y, weight_y = taps(height, logits.shape[0])
    left, right, keep_x, weight_x = taps(width, logits.shape[1])
    planes = []
    for k in range(logits.shape[-1]):
        plane = logits[:, :, k].astype(np.float32)
        across = plane[:, left] * keep_x + plane[:, right] * weight_x
        planes.append(across[top] * keep_y[:, None] + across[bottom] * weight_y[:, None])
    return np.stack(planes)


def reference_upsample_argmax(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """The contract: the argmax of `upsampled_planes`, ties to the lower class."""
    return np.argmax(upsampled_planes(logits, width, height), axis=0).astype(np.uint8)


@st.composite
def logit_fields(draw):
    """Logits for 1-4 classes on a small grid: random values, ties and near ties a few float32 steps apart (at
    several magnitudes, so the step is small or large next to the largest logit), mixed."""
    height, width, classes = draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.integers(1, 4))
    shape = (height, width, classes)
    free = draw(arrays(np.float32, shape, elements=st.floats(-60, 60, width=32)))
    base = np.float32(draw(st.sampled_from([0.0, 1e-3, 0.7, 1.0, 3.0, 40.0, -40.0, 3e4])))
    pixel_base = draw(arrays(np.float32, (height, width, 1), elements=st.sampled_from([0.0, 1.0, -1.0])))
    steps = draw(arrays(np.int8, shape, elements=st.integers(-3, 3)))
    spacing = np.spacing(np.maximum(np.abs(base), np.float32(1e-30)))
    near = (base + pixel_base * base + steps.astype(np.float32) * spacing).astype(np.float32)
    mix = draw(arrays(np.bool_, shape))
    return np.where(mix, free, near).astype(np.float32)


@PATHS
@settings(max_examples=400, deadline=None)
@given(logits=logit_fields(), width=st.integers(1, 70), height=st.integers(1, 70))
def test_mask_is_exactly_the_argmax_of_the_bilinearly_upsampled_logits(compiled, logits, width, height):
    mask = upsample_argmax(logits, width, height, compiled=compiled)
    assert np.array_equal(mask, reference_upsample_argmax(logits, width, height))


@PATHS
def test_mask_is_exact_on_the_shipped_models_logits(compiled):
    segmenter = Segmenter(SHIPPED_MODEL).load()
    for index, size in enumerate(((500, 375), (1920, 1080), (97, 61), (4032, 3024))):
        image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 300 + index, size=(128, 128))
        logits = segmenter.predict_logits(image)
        mask = upsample_argmax(logits, *size, compiled=compiled)
        assert np.array_equal(mask, reference_upsample_argmax(logits, *size)), size


@PATHS
def test_mask_is_exact_along_a_side_longer_than_the_numpy_paths_blocks(compiled):
    # 70,000 pixels: the NumPy path works in blocks of 65,536 a side, the C path computes its taps as it goes;
    # each of the 128 source columns spans 547 output pixels, the taps' float32 positions far from whole.
    logits = np.random.default_rng(7).normal(size=(3, 128, 3)).astype(np.float32)
    for width, height in ((70_000, 3), (70_000, 1)):
        mask = upsample_argmax(logits, width, height, compiled=compiled)
        assert np.array_equal(mask, reference_upsample_argmax(logits, width, height)), (width, height)
    tall = np.ascontiguousarray(logits.transpose(1, 0, 2))
    mask = upsample_argmax(tall, 3, 70_000, compiled=compiled)
    assert np.array_equal(mask, reference_upsample_argmax(tall, 3, 70_000))


@settings(max_examples=50, deadline=None)
@given(plane=arrays(np.float32, (6, 5), elements=st.floats(-60, 60, width=32)), width=st.integers(5, 40),
       height=st.integers(6, 40))
def test_the_upsampling_is_pillows_bilinear_resize(plane, width, height):
    # When upscaling, the contract's interpolation is Pillow's BILINEAR resize of a float32 image; Pillow sums in
    # double precision, so the values agree to float32 rounding (masks are compared exactly above).
    pillow = np.asarray(Image.fromarray(plane, "F").resize((width, height), Image.BILINEAR))
    ours = upsampled_planes(plane[:, :, None], width, height)[0]
    np.testing.assert_allclose(ours, pillow, rtol=0, atol=1e-5 * (float(np.abs(plane).max()) + 1))


@settings(max_examples=300, deadline=None)
@given(
    logits=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4)),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
    width=st.integers(1, 30), height=st.integers(1, 30),
)
def test_both_paths_agree_on_any_logits_nan_and_infinities_included(logits, width, height):
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and inf - inf: NaN, as in C
        numpy = upsample_argmax(logits, width, height, compiled=False)
    assert np.array_equal(upsample_argmax(logits, width, height, compiled=True), numpy)


def test_the_compiled_module_refuses_arrays_it_cannot_read_rather_than_read_past_them():
    upsample = upsampling._upsampling.upsample_argmax
    mask, logits = np.zeros((5, 5), np.uint8), np.zeros((4, 4, 3), np.float32)
    upsample(mask, logits, False, 0.0)
    read_only = mask.copy()
    read_only.flags.writeable = False
    for wrong_mask in (np.zeros(25, np.uint8), np.zeros((5, 5), np.int32), mask.T, read_only):
        with pytest.raises((ValueError, BufferError)):
            upsample(wrong_mask, logits, False, 0.0)
    for wrong_logits in (np.zeros((4, 4, 3), np.float64), np.zeros((4, 12), np.float32),
                         np.zeros((4, 4, 0), np.float32), np.zeros((4, 8, 3), np.float32)[:, ::2],
                         np.zeros((4, 4, 3), np.int32), np.zeros((2, 2, 257), np.float32)):
        with pytest.raises((ValueError, BufferError)):
            upsample(mask, wrong_logits, False, 0.0)


def test_without_the_compiled_module_numpy_upsamples_to_the_same_mask(tmp_path):
    # As where setup.py could not build it: the import finds no module, and the service still runs.
    code = """if True:
        import sys
        sys.modules["segapp._upsampling"] = None
        import numpy as np
        from segapp import upsampling
        logits = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
        np.save(sys.argv[1], upsampling.upsample_argmax(logits, 90, 70))
        print(upsampling.COMPILED)
        try:
            upsampling.upsample_argmax(logits, 90, 70, compiled=True)
        except RuntimeError as error:
            print(error)
    """
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mask.npy")], capture_output=True, text=True,
                         check=True)
    compiled, refusal = run.stdout.splitlines()
    assert compiled == "False" and "not built" in refusal
    logits = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    assert np.array_equal(np.load(tmp_path / "mask.npy"), upsample_argmax(logits, 90, 70, compiled=True))


class FieldEngine:
    """A network that answers a fixed smooth random field, whatever the image: `channels` per pixel on a
    `height` x `width` grid, NHWC or NCHW, or class labels."""

    name = "field"

    def __init__(self, height: int, width: int, channels: int, layout: str = "NHWC", labels: int = 0):
        rng = np.random.default_rng(height * 100 + width + channels)
        coarse = rng.normal(0, 1, (height // 8 + 2, width // 8 + 2, channels)).astype(np.float32)
        field = np.stack([np.asarray(Image.fromarray(coarse[..., k]).resize((width, height), Image.BILINEAR))
                          for k in range(channels)], axis=-1)
        if channels == 1:
            field = 1 / (1 + np.exp(-3 * field))  # a sigmoid's probabilities
        if labels:
            field = (np.abs(field[..., :1]) * labels * 2).astype(np.int32) % labels
        self.answer = field if layout == "NHWC" else field.transpose(2, 0, 1)
        shape = (None, height, width, 3) if layout == "NHWC" else (None, 3, height, width)
        out = self.answer.shape[:-1] if labels else self.answer.shape
        self.input, self.outputs = TensorSpec("image", shape, "float32"), [TensorSpec("out", (None, *out), "float32")]

    def predict(self, batch, output=0):
        answer = self.answer[..., 0] if self.answer.dtype == np.int32 else self.answer
        return np.repeat(answer[None], batch.shape[0], axis=0).astype(np.float32)


@pytest.mark.parametrize("engine, card, size", [
    (FieldEngine(48, 80, 4), {"input": {"resize": "letterbox"}}, (333, 500)),
    (FieldEngine(48, 80, 4, layout="NCHW"), {"input": {"resize": "letterbox"}}, (500, 101)),
    (FieldEngine(64, 40, 1), {"output": {"kind": "sigmoid", "threshold": 0.3}}, (257, 199)),
    (FieldEngine(64, 40, 1), {"input": {"resize": "letterbox"}, "output": {"kind": "sigmoid"}}, (640, 480)),
    (FieldEngine(32, 32, 1, labels=5), {"classes": list("abcde"), "output": {"kind": "labels"}}, (301, 97)),
], ids=["letterbox", "letterbox-nchw", "sigmoid", "sigmoid-letterbox", "labels"])
def test_mask_is_exact_for_every_kind_of_network(tmp_path, engine, card, size):
    """The contract holds for any network: the argmax of the bilinearly upsampled scores, from the answer's part that
    covers the image (letterbox), a sigmoid's probability against its threshold, labels as one score per class."""
    (tmp_path / "model.json").write_text(json.dumps(card))
    segmenter = Segmenter(tmp_path / "1" / "model.tflite", engine=engine, card_file=tmp_path / "model.json").load()
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    mask = segmenter.segment_pixels(pixels)
    contract, answer = segmenter.contract, engine.answer  # H x W x 1 labels, or scores in the network's layout
    answer = answer.transpose(1, 2, 0) if contract.layout == "NCHW" else answer
    _, placement = segmenter.prepare(pixels)
    if contract.resize == "letterbox":  # the network's input and answer have one size here
        answer = answer[placement.top : placement.top + placement.height,
                        placement.left : placement.left + placement.width]
        assert placement.width == contract.width or placement.height == contract.height
    if contract.kind == "sigmoid":
        expected = (upsampled_planes(answer, width, height)[0] > np.float32(contract.threshold)).astype(np.uint8)
    elif contract.kind == "labels":
        one_hot = (answer == np.arange(len(contract.classes))).astype(np.float32)
        expected = reference_upsample_argmax(one_hot, width, height)
    else:
        expected = reference_upsample_argmax(answer.astype(np.float32), width, height)
    assert mask.shape == (height, width)
    assert np.array_equal(mask, expected)
    assert len(np.unique(mask)) > 1
