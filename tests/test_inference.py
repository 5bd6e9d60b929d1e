"""The Segmenter turns image bytes into a mask at the image's size; both engines agree on the shipped model."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segapp import scenes
from segapp.evaluation import confusion, scores
from segapp.inference import SHIPPED_MODEL, LiteRTEngine, Segmenter, make_engine, upsample_argmax


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
    assert sum(result.class_fractions()) == pytest.approx(1.0)


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


def test_litert_and_tensorflow_agree_on_the_shipped_model():
    pytest.importorskip("tensorflow", reason="the tensorflow extra is part of make test")
    litert = Segmenter(SHIPPED_MODEL).load()
    tensorflow = Segmenter(SHIPPED_MODEL.with_suffix(".keras")).load()
    assert tensorflow.card["engine"] == "tensorflow" and litert.card["engine"] == "litert"
    agree = total = 0
    for index in range(50):
        image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], index, size=(128, 128))
        a, b = litert.segment_pixels(image), tensorflow.segment_pixels(image)
        agree += int((a == b).sum())
        total += a.size
    assert agree / total >= 0.995


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
    # A diagonal boundary at 128 px, upsampled ten times: the mask's edge stays within 2 px of the true line,
    # where upsampling the 128-px argmax would make 10-px steps.
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32) + 0.5
    distance = (xx - yy * 0.37 - 30) / 4
    logits = np.stack([distance, -distance, np.zeros_like(distance) - 5], axis=-1)
    mask = upsample_argmax(logits, 1280, 1280)
    for row in range(0, 1280, 37):
        edge = int(np.argmax(mask[row] == 0))
        true_edge = ((row + 0.5) / 10 * 0.37 + 30) * 10
        assert abs(edge - true_edge) <= 2, row
