"""Segmentation quality: per-class IoU, mean IoU and pixel accuracy from a confusion matrix; engine time."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np

from segapp.training.scenes import CLASS_NAMES


def confusion(label: np.ndarray, prediction: np.ndarray, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted class) of two masks of the same shape."""
    if label.shape != prediction.shape:
        raise ValueError(f"label {label.shape} and prediction {prediction.shape} differ in shape")
    for what, mask in (("label", label), ("prediction", prediction)):
        if mask.size and int(mask.max()) >= num_classes:
            raise ValueError(f"{what} has class {int(mask.max())}, but there are only {num_classes} classes")
    index = label.astype(np.int64).ravel() * num_classes + prediction.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray, classes: Sequence[str] = CLASS_NAMES) -> dict:
    """Per-class IoU by class name, their mean over classes present, and pixel accuracy, from a confusion matrix.

    IoU of a class = true positives / (true positives + false positives + false negatives). A class absent
    from both labels and predictions has no IoU (None) and does not count in the mean.
    """
    matrix = matrix.astype(np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positive
    iou = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union, strict=True)]
    present = [v for v in iou if v is not None]
    return {
        "per_class_iou": dict(zip(classes, iou, strict=True)),
        "miou": float(np.mean(present)) if present else 0.0,
        "pixel_accuracy": float(true_positive.sum() / max(matrix.sum(), 1)),
    }


def evaluate(
    segment_pixels, pairs: Iterable[tuple[np.ndarray, np.ndarray]], classes: Sequence[str] = CLASS_NAMES
) -> dict:
    """Scores of `segment_pixels(image) -> mask` over (image, label) pairs, at each label's own resolution,
    for a model whose card names `classes`. A label or prediction outside those classes is a ValueError."""
    total = np.zeros((len(classes), len(classes)), dtype=np.int64)
    count = 0
    for image, label in pairs:
        total += confusion(label, segment_pixels(image), len(classes))
        count += 1
    return {**scores(total, classes), "images": count}


def format_table(result: dict) -> str:
    """A plain-text table of per-class IoU, mIoU and pixel accuracy."""
    lines = [f"{'class':<12} {'IoU':>7}"]
    for name, value in result["per_class_iou"].items():
        lines.append(f"{name:<12} {'-' if value is None else f'{value:.4f}':>7}")
    lines.append(f"{'mIoU':<12} {result['miou']:>7.4f}")
    lines.append(f"{'pixel acc.':<12} {result['pixel_accuracy']:>7.4f}")
    if "images" in result:
        lines.append(f"{'images':<12} {result['images']:>7}")
    return "\n".join(lines)


def engine_milliseconds(predicts: dict, batches: Sequence[np.ndarray], rounds: int = 3) -> dict:
    """Median milliseconds of one `predict(batch)` call for each named predict function.

    The functions take turns on each batch, so a busy spell on a shared machine slows all of them alike.
    """
    times: dict = {name: [] for name in predicts}
    for predict in predicts.values():
        predict(batches[0])  # the first call allocates
    for _ in range(rounds):
        for batch in batches:
            for name, predict in predicts.items():
                started = time.perf_counter()
                predict(batch)
                times[name].append(time.perf_counter() - started)
    return {name: round(float(np.median(values)) * 1000, 3) for name, values in times.items()}
