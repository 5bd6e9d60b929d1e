"""Training, evaluation and export: the console scripts segapp-train and segapp-eval.

    segapp-train --data synthetic --epochs 30 --out segapp/models
    segapp-train --data ~/datasets/oxford-iiit-pet --epochs 40 --width half --out models/pets
    segapp-eval --model segapp/models/unet.tflite --data synthetic

segapp-train writes DIR/unet.keras (no optimizer state), DIR/unet.tflite (LiteRT) and DIR/unet.json (the card,
with the quality measured in inference mode on the held-out test split, through the same Segmenter the server uses).
Train, val and test never share an image (`datasets.folder_samples`); segapp-eval scores the same test split, by
the classes the model's card names.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segapp import datasets, evaluation, unet
from segapp.imaging import CLASS_NAMES, PALETTE
from segapp.inference import Segmenter

MODEL_NAME = "segapp-unet"


def load_split(data: str, split: str, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of a split at `size`: synthetic scenes, or a dataset folder's split (see
    `datasets.folder_samples`: train, val and test never share an image)."""
    if data == "synthetic":
        return datasets.synthetic_at(split, count, size)
    samples = datasets.folder_samples(data, split)
    return datasets.load_samples(samples[:count] if count else samples, size)


def test_pairs(data: str, count: int, num_classes: int = unet.NUM_CLASSES):
    """(image, label) pairs of the held-out test split at their own resolution; labels are checked to be
    classes 0..num_classes-1."""
    if data == "synthetic":
        return datasets.synthetic("test", count)
    samples = datasets.folder_samples(data, "test")
    return (sample.load(num_classes) for sample in (samples[:count] if count else samples))


def train(args) -> dict:
    """Train, keep the weights of the best validation mIoU, export the three artefacts, evaluate; returns the card."""
    import keras

    keras.utils.set_random_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = unet.INPUT_SIZE

    print(f"loading data: {args.data}", flush=True)
    train_images, train_masks = load_split(args.data, "train", args.train_count, size)
    val_images, val_masks = load_split(args.data, "val", args.val_count, size)
    print(f"train {len(train_images)} images, val {len(val_images)} images", flush=True)

    alpha, filters = unet.WIDTHS[args.width]
    model = unet.build_unet(alpha, filters, bn_momentum=args.bn_momentum)
    steps = max(1, -(-len(train_images) // args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate * 0.1,
        decay_steps=steps * args.epochs,
        warmup_target=args.learning_rate,
        warmup_steps=min(steps, 200),
        alpha=0.02,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.MeanIoU(unet.NUM_CLASSES, sparse_y_true=True, sparse_y_pred=False, name="miou")],
        jit_compile=False,  # XLA made each step 4-6x slower on this 2-core CPU (measured)
    )
    train_stream = datasets.pipeline(
        train_images, train_masks, args.batch_size, training=True, seed=args.seed, border_weight=args.border_weight
    )
    val_stream = datasets.pipeline(val_images, val_masks, args.batch_size, training=False)

    with tempfile.TemporaryDirectory() as scratch:
        best = Path(scratch) / "best.weights.h5"
        callbacks = [
            keras.callbacks.ModelCheckpoint(
                str(best), monitor="val_miou", mode="max", save_best_only=True, save_weights_only=True
            ),
            keras.callbacks.EarlyStopping(monitor="val_miou", mode="max", patience=args.patience),
        ]
        started = time.perf_counter()
        history = model.fit(
            train_stream,
            validation_data=val_stream,
            epochs=args.epochs,
            callbacks=callbacks,
            verbose=args.verbose,
        )
        seconds = time.perf_counter() - started
        model.load_weights(str(best))

    epochs_run = len(history.history["loss"])
    best_val = float(max(history.history["val_miou"]))
    export(model, out)
    card = {
        "name": MODEL_NAME,
        "version": args.model_version,
        "description": "U-Net (MobileNetV2 encoder) for trimap segmentation; "
        + (
            "a demonstration model trained on synthetic scenes"
            if args.data == "synthetic"
            else f"trained on {args.data}"
        ),
        "classes": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "input_size": [size, size],
        "normalisation": "RGB / 255, in [0, 1]; resized with area-aware bilinear filtering",
        "architecture": {
            "encoder": "MobileNetV2",
            "alpha": alpha,
            "decoder_filters": list(filters),
            "width": args.width,
            "bn_momentum": args.bn_momentum,
        },
        "parameters": int(model.count_params()),
        "training": {
            "data": args.data,
            "train_images": int(len(train_images)),
            "val_images": int(len(val_images)),
            "epochs": epochs_run,
            "epochs_max": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "border_loss_weight": args.border_weight,
            "seed": args.seed,
            "seconds": round(seconds, 1),
            "best_val_miou_128px": round(best_val, 4),
        },
        "files": {name: (out / name).stat().st_size for name in ("unet.keras", "unet.tflite")},
        "width_trade_off": unet.width_trade_off(),
    }
    (out / "unet.json").write_text(json.dumps(card, indent=2) + "\n")
    if args.test_count:
        print(f"evaluating on {args.test_count} held-out test images at their own resolution", flush=True)
        card["quality"] = measure(out / "unet.tflite", args.data, args.test_count)
        (out / "unet.json").write_text(json.dumps(card, indent=2) + "\n")
        print(evaluation.format_table(card["quality"]))
    print(f"wrote {out}/unet.keras, unet.tflite, unet.json in {seconds:.0f} s of training", flush=True)
    return card


def export(model, out: Path) -> None:
    """Write unet.keras without optimizer state and unet.tflite for LiteRT (float32, batch dimension dynamic)."""
    import keras

    with tempfile.TemporaryDirectory() as scratch:
        # Keras saves the optimizer's slots with a compiled model (5 MB of 8 for the slim width); a model
        # loaded with compile=False has none.
        model.save(Path(scratch) / "trained.keras")
        keras.saving.load_model(Path(scratch) / "trained.keras", compile=False).save(out / "unet.keras")
    export_tflite(out / "unet.keras", out / "unet.tflite")


def export_tflite(keras_path: Path, tflite_path: Path) -> None:
    """Convert a .keras model to .tflite through a SavedModel.

    Converting a tf.function of the Keras model directly gave a file without its weights that answered NaN;
    the SavedModel route keeps them (LiteRT and TensorFlow logits agree within 1e-6).
    """
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(str(keras_path), compile=False)
    with tempfile.TemporaryDirectory() as scratch:
        model.export(scratch, format="tf_saved_model", verbose=False)
        tflite_path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(scratch).convert())


def measure(model_path: Path, data: str, count: int) -> dict:
    """Quality of a model in inference mode, through the serving Segmenter, at the labels' own resolution."""
    segmenter = Segmenter(model_path).load()
    classes = segmenter.card["classes"]
    result = evaluation.evaluate(segmenter.segment_pixels, test_pairs(data, count, len(classes)), classes)
    return {**result, "data": f"{data} test split", "engine": segmenter.card["engine"]}


def _parser_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', an Oxford-IIIT Pet folder, or a folder with images/ and masks/ (held out: the names in "
        "its test.txt and val.txt, else a tenth each by a hash of the name)",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="segapp-train", description="Train the U-Net and write unet.keras, unet.tflite, unet.json."
    )
    _parser_common(parser)
    parser.add_argument("--out", default="segapp/models", help="output folder (default: segapp/models)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", choices=sorted(unet.WIDTHS), default="slim", help="network width (see unet.WIDTHS)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--bn-momentum", type=float, default=0.9)
    parser.add_argument("--border-weight", type=float, default=1.5, help="loss weight of border pixels")
    parser.add_argument(
        "--train-count", type=int, default=3000, help="synthetic: scenes; folder: at most this many (0: all)"
    )
    parser.add_argument("--val-count", type=int, default=300)
    parser.add_argument("--test-count", type=int, default=500, help="test images for the card's quality (0: skip)")
    parser.add_argument("--patience", type=int, default=6, help="epochs without a better val mIoU before stopping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-version", default="1.0.0")
    parser.add_argument(
        "--verbose", type=int, default=1, help="Keras fit verbosity: 1 progress bar, 2 a line per epoch"
    )
    args = parser.parse_args(argv)
    try:
        train(args)
    except datasets.DatasetError as exc:
        print(f"segapp-train: {exc}", file=sys.stderr)
        return 2
    return 0


def eval_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="segapp-eval", description="Per-class IoU, mIoU and pixel accuracy of a model."
    )
    _parser_common(parser)
    parser.add_argument("--model", required=True, help="a .tflite, .keras or SavedModel path")
    parser.add_argument("--count", type=int, default=500, help="test images (0: the whole folder split)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        result = measure(Path(args.model), args.data, args.count)
    except (datasets.DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"segapp-eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else evaluation.format_table(result))
    return 0
