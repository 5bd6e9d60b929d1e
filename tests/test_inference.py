"""The Segmenter turns image bytes into a mask at the image's size; both engines agree on the float model, and the
shipped int8 model agrees with it."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segapp.contract import ContractError
from segapp.engines import EngineError, TensorSpec, open_engine
from segapp.engines.litert import LiteRTEngine
from segapp.inference import FLOAT_MODEL, SHIPPED_MODEL, Segmentation, Segmenter
from segapp.training import scenes
from segapp.training.evaluation import confusion, scores


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
    assert segmenter.model_path == SHIPPED_MODEL and segmenter.card["quantization"]["input"] == "int8"
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
    assert isinstance(open_engine(SHIPPED_MODEL), LiteRTEngine)
    with pytest.raises(FileNotFoundError):
        open_engine(tmp_path / "missing.tflite")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(EngineError, match="unknown network format"):
        open_engine(tmp_path / "model.pt")


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
    with pytest.raises(ContractError, match=message) as refused:
        segmenter_with_classes(outputs, classes, palette)
    assert f"bands{outputs}.json" in str(refused.value)


def test_model_without_a_card_is_served_with_classes_named_by_index(segmenter_with_classes, caplog):
    segmenter = segmenter_with_classes(5, None)
    assert segmenter.card["classes"] == [f"class_{index}" for index in range(5)]
    assert segmenter.card["card"] == "inferred" and len(set(map(tuple, segmenter.card["palette"]))) == 5
    assert "has no card" in caplog.text


class EchoEngine:
    """A network that answers its own input: 3 'classes', one per channel of the normalised image."""

    name = "echo"
    input = TensorSpec("image", (None, 32, 32, 3), "float32")
    outputs = [TensorSpec("out", (None, 32, 32, 3), "float32")]

    def predict(self, batch, output=0):
        return batch


@pytest.mark.parametrize("channels", ["RGB", "BGR"])
def test_letterbox_padding_is_zero_once_normalised_in_either_channel_order(tmp_path, channels):
    card = {"input": {"resize": "letterbox", "channels": channels, "mean": [10, 120, 250], "std": 2}}
    (tmp_path / "model.json").write_text(json.dumps(card))
    segmenter = Segmenter(tmp_path / "1" / "model.tflite", engine=EchoEngine(),
                          card_file=tmp_path / "model.json").load()
    pixels = np.full((10, 40, 3), (200, 100, 50), np.uint8)  # wide: padded above and below
    batch, placement = segmenter.prepare(pixels)
    assert (placement.top, placement.height, placement.width) == (12, 8, 32)
    assert np.all(batch[0, :12] == 0) and np.all(batch[0, 20:] == 0)
    inside = (np.array((200, 100, 50))[:: -1 if channels == "BGR" else 1] - np.array([10, 120, 250])) / 2
    np.testing.assert_allclose(batch[0, 14, 16], inside)
