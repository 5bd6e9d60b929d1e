"""IoU, mIoU and pixel accuracy equal the values worked out by hand; engine timing takes turns between models."""

import numpy as np
import pytest

from segapp.training.evaluation import confusion, engine_milliseconds, evaluate, format_table, scores


def test_scores_on_hand_made_masks():
    label = np.array([[0, 0, 1, 1], [0, 2, 1, 1]], dtype=np.uint8)
    prediction = np.array([[0, 1, 1, 1], [0, 2, 2, 1]], dtype=np.uint8)
    result = scores(confusion(label, prediction))
    # foreground: TP 2, FP 0, FN 1 -> 2/3; background: TP 3, FP 1, FN 1 -> 3/5; border: TP 1, FP 1, FN 0 -> 1/2
    assert result["per_class_iou"]["foreground"] == pytest.approx(2 / 3)
    assert result["per_class_iou"]["background"] == pytest.approx(3 / 5)
    assert result["per_class_iou"]["border"] == pytest.approx(1 / 2)
    assert result["miou"] == pytest.approx((2 / 3 + 3 / 5 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(6 / 8)


def test_absent_class_has_no_iou_and_is_left_out_of_the_mean():
    label = np.array([[0, 1]], dtype=np.uint8)
    result = scores(confusion(label, label))
    assert result["per_class_iou"]["border"] is None
    assert result["miou"] == 1.0


def test_evaluate_sums_confusion_over_images_of_different_sizes():
    pairs = [
        (np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8)),
        (np.zeros((1, 3, 3), np.uint8), np.ones((1, 3), np.uint8)),
    ]
    result = evaluate(lambda image: np.zeros(image.shape[:2], np.uint8), pairs)
    # 4 right foreground pixels, 3 background pixels called foreground: fg IoU 4/7, bg IoU 0.
    assert result["per_class_iou"]["foreground"] == pytest.approx(4 / 7)
    assert result["per_class_iou"]["background"] == 0.0
    assert result["images"] == 2
    assert "mIoU" in format_table(result)


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)))


def test_scores_are_named_by_the_models_classes():
    label = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    prediction = np.array([[0, 1, 2, 2]], dtype=np.uint8)
    names = ["sky", "road", "car", "person"]
    result = evaluate(lambda image: prediction, [(np.zeros((1, 4, 3), np.uint8), label)], names)
    assert result["per_class_iou"] == {"sky": 1.0, "road": 1.0, "car": 0.5, "person": 0.0}


def test_classes_beyond_the_models_are_refused_not_miscounted():
    with pytest.raises(ValueError, match="label has class 2, but there are only 2 classes"):
        confusion(np.array([[0, 2]]), np.array([[0, 1]]), num_classes=2)
    with pytest.raises(ValueError, match="prediction has class 3"):
        confusion(np.array([[0, 1]]), np.array([[0, 3]]), num_classes=3)


def test_engine_milliseconds_times_each_model_on_every_batch_in_turn():
    calls = []
    predicts = {name: (lambda batch, name=name: calls.append((name, batch))) for name in ("float", "int8")}
    batches = [np.zeros((1, 2, 2, 3), np.float32) + value for value in range(3)]
    times = engine_milliseconds(predicts, batches, rounds=2)
    assert set(times) == {"float", "int8"} and all(ms >= 0 for ms in times.values())
    # A warm-up call each, then the two take turns on each batch, so a busy spell slows both alike.
    assert [name for name, _ in calls] == ["float", "int8"] + ["float", "int8"] * 6
    assert [float(batch.flat[0]) for _, batch in calls[2::2]] == [0, 1, 2, 0, 1, 2]
