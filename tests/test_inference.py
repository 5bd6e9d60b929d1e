"""The Segmenter turns image bytes into a mask at the image's size; both engines agree on the float model, and the
shipped int8 model agrees with it."""

import io
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from segapp import scenes
from segapp.evaluation import confusion, scores
from segapp.inference import (
    FLOAT_MODEL,
    SHIPPED_MODEL,
    LiteRTEngine,
    ModelCardError,
    Segmentation,
    Segmenter,
    make_engine,
    upsample_argmax,
)


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(SHIPPED_MODEL).load()


def jpeg(pixels, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, **options)
    return out.getvalue()


def test_mask_has_the_input_size_and_class_values(segmenter):
    image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 0, size=(500, 375))
    result = segmenter.segment(jpeg(image))
    assert result.mask.shape == (375, 500) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask).tolist()) <= {0, 1, 2}
    assert set(result.timings) == {"decode", "infer", "postprocess"}
    assert sum(result.class_fractions(3)) == pytest.approx(1.0)


def test_exif_rotated_input_gets_a_rotated_size_mask(segmenter):
    image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 1, size=(300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    result = segmenter.segment(jpeg(image, exif=exif.tobytes()))
    assert result.mask.shape == (300, 200)


def test_large_jpeg_mask_is_full_size(segmenter):
    image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 2, size=(1920, 1080))
    result = segmenter.segment(jpeg(image))
    assert result.mask.shape == (1080, 1920)
    assert segmenter.segment(jpeg(image), full_pixels=True).pixels.shape == (1080, 1920, 3)


def test_masks_match_the_labels_of_held_out_scenes(segmenter):
    total = np.zeros((3, 3), dtype=np.int64)
    for index in range(10):
        image, label = scenes.scene(scenes.SPLIT_SEEDS["test"], 100 + index)
        total += confusion(label, segmenter.segment(jpeg(image)).mask)
    assert scores(total)["per_class_iou"]["foreground"] >= 0.8


def test_litert_and_tensorflow_agree_on_the_float_model():
    pytest.importorskip("tensorflow", reason="the tensorflow extra is part of make test")
    litert = Segmenter(FLOAT_MODEL).load()
    tensorflow = Segmenter(FLOAT_MODEL.with_suffix(".keras")).load()
    assert tensorflow.card["engine"] == "tensorflow" and litert.card["engine"] == "litert"
    # The engines sum in different orders (XNNPACK against TensorFlow's kernels): on these 50 scenes their logits,
    # up to about 9 in size, differed by at most 2.2e-5 (measured). 1e-4 leaves room for another CPU's kernels;
    # a conversion that lost or changed a weight differs by far more. Within it, the masks can only differ
    # where two classes' logits are closer than 2e-4, a tie either answer is right for.
    atol = 1e-4
    for index in range(50):
        image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], index, size=(128, 128))
        np.testing.assert_allclose(
            litert.predict_logits(image), tensorflow.predict_logits(image), rtol=0, atol=atol,
            err_msg=f"test scene {index}",
        )


def test_int8_engine_returns_dequantized_logits():
    int8, float_engine = LiteRTEngine(SHIPPED_MODEL), LiteRTEngine(FLOAT_MODEL)
    assert int8.quantized and not float_engine.quantized
    batch = np.stack([scenes.scene(scenes.SPLIT_SEEDS["test"], i, size=(128, 128))[0] for i in range(4)])
    batch = batch.astype(np.float32) / 255
    logits = int8.predict(batch)
    assert logits.dtype == np.float32 and logits.shape == (4, 128, 128, 3)
    # On the float model's scale: logits span about -11..10 and the output's int8 step is 0.094; on ten test
    # scenes the mean difference was 0.11 (measured). Raw int8 values, or a wrong zero point, are off by tens.
    assert np.abs(logits - float_engine.predict(batch)).mean() < 0.3


def test_shipped_int8_model_agrees_with_the_float_model(segmenter):
    assert segmenter.model_path.name == "unet-int8.tflite" and segmenter.card["quantization"]["input"] == "int8"
    float_segmenter = Segmenter(FLOAT_MODEL).load()
    same = total = 0
    for index in range(10):
        image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], index)
        int8_mask, float_mask = segmenter.segment_pixels(image), float_segmenter.segment_pixels(image)
        same, total = same + np.count_nonzero(int8_mask == float_mask), total + int8_mask.size
    # Over the 500 test scenes the masks agree on 99.76% of pixels (the card's float_and_int8.agreement), on these
    # ten 99.87%; 99% leaves room for another CPU's rounding, and a broken quantization agrees far less.
    assert same / total >= 0.99


def test_importing_inference_does_not_import_tensorflow():
    code = "import sys, segapp.inference, segapp.wsgi; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_engine_is_chosen_by_file(tmp_path):
    assert isinstance(make_engine(SHIPPED_MODEL), LiteRTEngine)
    with pytest.raises(FileNotFoundError):
        make_engine(tmp_path / "missing.tflite")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model format"):
        make_engine(tmp_path / "model.onnx")


def test_upsampled_edges_follow_the_logits_not_a_staircase():
    # A diagonal boundary at 128 px, upsampled ten times. Bilinear interpolation of these linear logits is exact,
    # so class 0 starts at the first pixel whose centre is right of the line (never within 0.005 px of a pixel
    # centre on these rows, far beyond float32 rounding); upsampling the 128-px argmax would make 10-px steps.
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32) + 0.5
    distance = (xx - yy * 0.37 - 30) / 4
    logits = np.stack([distance, -distance, np.zeros_like(distance) - 5], axis=-1)
    mask = upsample_argmax(logits, 1280, 1280)
    assert np.array_equal(mask, reference_upsample_argmax(logits, 1280, 1280))
    for row in range(0, 1280, 37):
        source_y = min(max((row + 0.5) / 10, 0.5), 127.5)  # the row's centre on the 128-px grid, edges clamped
        assert int(np.argmax(mask[row] == 0)) == math.ceil((source_y * 0.37 + 30) * 10 - 0.5), row


# --- classes come from the model card -------------------------------------------------------------------------

FOUR = (["sky", "road", "car", "person"], [[0, 0, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0]])


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(out, format="PNG")
    return out.getvalue()


def test_four_class_model_gives_four_class_masks_and_fractions(segmenter_with_classes):
    segmenter = segmenter_with_classes(4, *FOUR)
    assert segmenter.card["classes"] == FOUR[0] and segmenter.card["palette"] == FOUR[1]
    result = segmenter.segment(png(400, 100))
    assert set(np.unique(result.mask).tolist()) == {0, 1, 2, 3}
    assert result.class_fractions(4) == pytest.approx([0.25] * 4, abs=0.01)


def test_two_class_fractions_have_two_entries():
    mask = np.array([[0, 1, 1, 1]], np.uint8)
    assert Segmentation(mask=mask).class_fractions(2) == [0.25, 0.75]
    with pytest.raises(ValueError, match="class 3, but the model has 2 classes"):
        Segmentation(mask=np.array([[0, 3]], np.uint8)).class_fractions(2)


@pytest.mark.parametrize(
    "outputs, classes, palette, message",
    [
        (4, ["a", "b", "c"], [[1, 1, 1]] * 3, r"names 3 classes \['a', 'b', 'c'\], but the network outputs 4"),
        (2, ["a", "b", "c"], [[1, 1, 1]] * 3, "names 3 classes .* outputs 2 per pixel"),
        (3, ["a", "b", "c"], [[1, 1, 1]] * 2, "'palette' has 2 colours for 3 classes"),
        (2, ["a", "b"], [[1, 1, 1], [1, 1]], r"palette colour \[1, 1\] is not \[red, green, blue\]"),
        (2, ["a", "b"], [[1, 1, 1], [1, 1, 256]], "is not .red, green, blue. in 0-255"),
        (2, ["a", "a"], [[1, 1, 1]] * 2, "names a class twice"),
        (2, "ab", [[1, 1, 1]] * 2, "'classes' must be a list of class names"),
    ],
)
def test_card_that_disagrees_with_the_network_is_refused_at_load(segmenter_with_classes, outputs, classes,
                                                                  palette, message):
    with pytest.raises(ModelCardError, match=message) as refused:
        segmenter_with_classes(outputs, classes, palette)
    assert f"bands{outputs}.json" in str(refused.value)


def test_model_without_a_card_must_have_the_default_three_classes(segmenter_with_classes):
    assert segmenter_with_classes(3, None).card["classes"] == ["foreground", "background", "border"]
    with pytest.raises(ModelCardError, match="it has no card.*names 3 classes.*outputs 5"):
        segmenter_with_classes(5, None)


# --- the mask is exactly the argmax of the bilinearly upsampled logits ------------------------------------------


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


@settings(max_examples=400, deadline=None)
@given(logits=logit_fields(), width=st.integers(1, 70), height=st.integers(1, 70))
def test_mask_is_exactly_the_argmax_of_the_bilinearly_upsampled_logits(logits, width, height):
    assert np.array_equal(upsample_argmax(logits, width, height), reference_upsample_argmax(logits, width, height))


def test_mask_is_exact_on_the_shipped_models_logits(segmenter):
    for index, size in enumerate(((500, 375), (1920, 1080), (97, 61), (4032, 3024))):
        image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 300 + index, size=(128, 128))
        logits = segmenter.predict_logits(image)
        assert np.array_equal(upsample_argmax(logits, *size), reference_upsample_argmax(logits, *size)), size


@settings(max_examples=50, deadline=None)
@given(plane=arrays(np.float32, (6, 5), elements=st.floats(-60, 60, width=32)), width=st.integers(5, 40),
       height=st.integers(6, 40))
def test_the_upsampling_is_pillows_bilinear_resize(plane, width, height):
    # When upscaling, the contract's interpolation is Pillow's BILINEAR resize of a float32 image; Pillow sums in
    # double precision, so the values agree to float32 rounding (masks are compared exactly above).
    pillow = np.asarray(Image.fromarray(plane, "F").resize((width, height), Image.BILINEAR))
    ours = upsampled_planes(plane[:, :, None], width, height)[0]
    np.testing.assert_allclose(ours, pillow, rtol=0, atol=1e-5 * (float(np.abs(plane).max()) + 1))
