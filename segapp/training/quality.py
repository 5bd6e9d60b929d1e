"""The quality of trained models, through the serving Segmenter: one model on the test split (`measure`), and a
float model against its int8 quantization (`compare`): both models' scores and engine time, and how often their masks
agree."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segapp.inference import Segmenter
from segapp.training import datasets, evaluation

# Timed engine calls per model: the first test scenes at the input size, each run `rounds` times.
TIMED_SCENES = 50


def test_pairs(data: str, count: int, num_classes: int):
    """(image, label) pairs of the held-out test split at their own resolution; labels are checked to be
    classes 0..num_classes-1."""
    if data == "synthetic":
        return datasets.synthetic("test", count)
    samples = datasets.folder_samples(data, "test")
    return (sample.load(num_classes) for sample in (samples[:count] if count else samples))


def measure(model_path: Path, data: str, count: int) -> dict:
    """Quality of a model in inference mode, through the serving Segmenter, at the labels' own resolution."""
    segmenter = Segmenter(model_path).load()
    classes = segmenter.card["classes"]
    result = evaluation.evaluate(segmenter.segment_pixels, test_pairs(data, count, len(classes)), classes)
    return {**result, "data": f"{data} test split", "engine": segmenter.card["engine"]}


def compare(float_path: Path, int8_path: Path, data: str, count: int) -> dict:
    """Both models' quality and engine time (1 thread, median ms of one image) on the test split, and the
    fraction of pixels where their masks agree; keyed by `model_names` (both may be model.tflite)."""
    float_name, int8_name = model_names(float_path, int8_path)
    models = {float_name: Segmenter(float_path).load(), int8_name: Segmenter(int8_path).load()}
    classes = models[float_name].card["classes"]
    totals = {name: np.zeros((len(classes), len(classes)), np.int64) for name in models}
    same = pixels = images = 0
    lowest = 1.0
    scenes_at_input = []
    for image, label in test_pairs(data, count, len(classes)):
        masks = {name: segmenter.segment_pixels(image) for name, segmenter in models.items()}
        for name, mask in masks.items():
            totals[name] += evaluation.confusion(label, mask, len(classes))
        agreeing = int(np.count_nonzero(masks[float_name] == masks[int8_name]))
        same, pixels, images = same + agreeing, pixels + label.size, images + 1
        lowest = min(lowest, agreeing / label.size)
        if len(scenes_at_input) < TIMED_SCENES:
            # Fed as serving feeds it: the input size, resize and normalisation of the float model's contract.
            scenes_at_input.append(models[float_name].prepare(image)[0])
    times = evaluation.engine_milliseconds({name: s.engine.predict for name, s in models.items()}, scenes_at_input)
    quality = {
        name: {
            **evaluation.scores(totals[name], classes),
            "images": images,
            "data": f"{data} test split",
            "engine": models[name].card["engine"],
            "engine_ms_per_image": times[name],
        }
        for name in models
    }
    return {
        "models": quality,
        "agreement": {"pixels": same / max(pixels, 1), "lowest_image": lowest, "images": images},
        "int8_engine_time_ratio": round(times[int8_name] / times[float_name], 3),
        "timing": f"engine alone, 1 thread, median of {len(scenes_at_input) * 3} calls (test scenes at input size)",
    }


def model_names(*paths: Path) -> list[str]:
    """Names that tell models apart: each path from the folder they share (unet.tflite and
    segapp-unet/1/model.tflite for segapp-train's two). The same model twice is a ValueError."""
    resolved = [Path(path).resolve() for path in paths]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"{' and '.join(str(path) for path in paths)}: the same model twice")
    shared = Path(os.path.commonpath(resolved))
    return [path.relative_to(shared).as_posix() for path in resolved]
