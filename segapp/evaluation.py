"""Segmentation quality: per-class IoU, mean IoU and pixel accuracy from a confusion matrix."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from segapp.imaging import CLASS_NAMES


def confusion(label: np.ndarray, prediction: np.ndarray, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted class) of two masks of the same shape."""
    if label.shape != prediction.shape:
        raise ValueError(f"label {label.shape} and prediction {prediction.shape} differ in shape")
    index = label.astype(np.int64).ravel() * num_classes + prediction.astype(np.int64).ravel()
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict:
    """Per-class IoU, their mean over classes present, and pixel accuracy, from a confusion matrix.

    IoU of a class = true positives / (true positives + false positives + false negatives). A class absent
    from both labels and predictions has no IoU (None) and does not count in the mean.
    """
    matrix = matrix.astype(np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positive
    iou = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union, strict=True)]
    present = [v for v in iou if v is not None]
    return {
        "per_class_iou": dict(zip(CLASS_NAMES, iou, strict=True)),
        "miou": float(np.mean(present)) if present else 0.0,
        "pixel_accuracy": float(true_positive.sum() / max(matrix.sum(), 1)),
    }


def evaluate(segment_pixels, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Scores of `segment_pixels(image) -> mask` over (image, label) pairs, at each label's own resolution."""
    total = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    count = 0
    for image, label in pairs:
        total += confusion(label, segment_pixels(image))
        count += 1
    return {**scores(total), "images": count}


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
