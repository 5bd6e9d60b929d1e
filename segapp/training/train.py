"""Training, and the console scripts segapp-train and segapp-eval (export: segapp.training.export; quality:
segapp.training.quality).

    segapp-train --data synthetic --epochs 30 --out segapp/models
    segapp-train --data ~/datasets/oxford-iiit-pet --epochs 40 --width half --out models/pets
    segapp-eval --model segapp/models/segapp-unet/1/model.tflite --against segapp/models/unet.tflite --data synthetic

    segapp-train --int8-only --out segapp/models

segapp-train writes DIR/unet.keras (no optimizer state), DIR/unet.tflite (LiteRT) and DIR/unet.json (the card,
with the quality measured in inference mode on the held-out test split, through the same Segmenter the server uses):
the float model, served with SEGAPP_MODEL=DIR/unet.tflite. The same network quantized to int8 after training is
version 1 of the model segapp-unet in DIR as a model repository (SEGAPP_MODEL_REPOSITORY=DIR):
DIR/segapp-unet/1/model.tflite, with its card DIR/segapp-unet/model.json. Both cards are written with
`segapp.contract.card_json`, the contract serving reads (classes, palette, normalisation, output kind), and record
both models' quality, engine time and how often their masks agree. `--int8-only` quantizes an already trained
DIR/unet.keras without training.
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

from segapp.contract import card_json, read_card
from segapp.inference import card_path
from segapp.training import datasets, evaluation, scenes, unet
from segapp.training.export import FLOAT_FILE, KERAS_FILE, export, export_int8
from segapp.training.quality import compare, measure

MODEL_NAME = "segapp-unet"
# Paths in the output folder, as the cards' "files" and "float_and_int8" name them: the float model flat (served
# with SEGAPP_MODEL=FILE), the int8 one as version 1 of MODEL_NAME in the folder as a repository (its card is
# MODEL_NAME/model.json).
INT8_FILE = f"{MODEL_NAME}/1/model.tflite"
# The classes a cutout keeps: the object, and the border band that straddles its edge.
FOREGROUND_CLASSES = [scenes.CLASS_NAMES[scenes.FOREGROUND], scenes.CLASS_NAMES[scenes.BORDER]]


def load_split(data: str, split: str, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of a split at `size`: synthetic scenes, or a dataset folder's split (see
    `datasets.folder_samples`: train, val and test never share an image)."""
    if data == "synthetic":
        return datasets.synthetic_at(split, count, size)
    samples = datasets.folder_samples(data, split)
    return datasets.load_samples(samples[:count] if count else samples, size)


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
    description = "U-Net (MobileNetV2 encoder) for trimap segmentation; " + (
        "a demonstration model trained on synthetic scenes" if args.data == "synthetic" else f"trained on {args.data}"
    )
    card = {
        # The contract serving reads; the input size is the network's own, read from it.
        **card_json(
            scenes.CLASS_NAMES,
            scenes.PALETTE,
            mean=unet.MEAN,
            std=unet.STD,
            resize="stretch",  # datasets.resize_pair stretches every image to the square input
            channels="RGB",
            kind="logits",
            name=MODEL_NAME,
            release=args.model_version,
            description=description,
        ),
        "foreground": FOREGROUND_CLASSES,
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
            f"best_val_miou_{size}px": round(best_val, 4),
        },
        "files": {name: (out / name).stat().st_size for name in (KERAS_FILE, FLOAT_FILE)},
        "width_trade_off": unet.width_trade_off(),
    }
    _write_card(out / FLOAT_FILE, card)
    if args.int8_scenes:
        add_int8(out, args)
        card = read_card(card_path(out / FLOAT_FILE))
    elif args.test_count:
        print(f"evaluating on {args.test_count} held-out test images at their own resolution", flush=True)
        card["quality"] = measure(out / FLOAT_FILE, args.data, args.test_count)
        _write_card(out / FLOAT_FILE, card)
        print(evaluation.format_table(card["quality"]))
    written = f"{KERAS_FILE}, {FLOAT_FILE}, {card_path(FLOAT_FILE)}" + (
        f", {INT8_FILE}, {card_path(INT8_FILE).as_posix()}" if args.int8_scenes else ""
    )
    print(f"wrote {written} to {out} after {seconds:.0f} s of training", flush=True)
    return card


def add_int8(out: Path, args) -> dict:
    """Quantize DIR/unet.keras to DIR/segapp-unet/1/model.tflite with `args.int8_scenes` training images as the
    representative set, write its card DIR/segapp-unet/model.json, and record both models' quality, engine time
    and agreement on `args.test_count` test images in both cards; returns the int8 card."""
    float_card = read_card(card_path(out / FLOAT_FILE))
    if float_card is None or not (out / KERAS_FILE).exists():
        raise FileNotFoundError(
            f"{out} holds no trained {KERAS_FILE} with its card {card_path(FLOAT_FILE)}: "
            f"train first (segapp-train --out {out})"
        )
    print(f"quantizing to int8 with {args.int8_scenes} training images as the representative set", flush=True)
    calibration, _ = load_split(args.data, "train", args.int8_scenes, unet.INPUT_SIZE)
    (out / INT8_FILE).parent.mkdir(parents=True, exist_ok=True)
    export_int8(out / KERAS_FILE, out / INT8_FILE, calibration)
    int8_card = {
        # The float model's card less what was measured of the float model; the int8 model's is measured below.
        **{key: value for key, value in float_card.items() if key not in ("quality", "float_and_int8")},
        "description": float_card.get("description", "") + "; quantized to int8 after training",
        "quantization": {
            "method": "full-integer post-training quantization (TFLiteConverter), int8 weights and activations",
            "input": "int8",
            "output": "int8",
            "representative_data": f"{args.data} train split",
            "representative_images": int(len(calibration)),
            "from": FLOAT_FILE,
        },
        "files": {**float_card.get("files", {}), INT8_FILE: (out / INT8_FILE).stat().st_size},
    }
    float_card["files"] = int8_card["files"]
    if args.test_count:
        print(f"evaluating both models on {args.test_count} held-out test images at their own resolution", flush=True)
        comparison = compare(out / FLOAT_FILE, out / INT8_FILE, args.data, args.test_count)
        float_name, int8_name = comparison["models"]  # FLOAT_FILE and INT8_FILE, from the folder they share
        for card, name in ((float_card, float_name), (int8_card, int8_name)):
            card["quality"] = comparison["models"][name]
            card["float_and_int8"] = comparison
        for name, quality in comparison["models"].items():
            print(f"{name}:\n{evaluation.format_table(quality)}")
        print(json.dumps({k: v for k, v in comparison.items() if k != "models"}, indent=2))
    _write_card(out / FLOAT_FILE, float_card)
    _write_card(out / INT8_FILE, int8_card)
    return int8_card


def _write_card(model_path: Path, card: dict) -> None:
    card_path(model_path).write_text(json.dumps(card, indent=2) + "\n")


def _parser_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', an Oxford-IIIT Pet folder, or a folder with images/ and masks/ (held out: the names in "
        "its test.txt and val.txt, else a tenth each by a hash of the name)",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="segapp-train",
        description="Train the U-Net and write unet.keras, unet.tflite and unet.json (float), and "
        "segapp-unet/1/model.tflite and segapp-unet/model.json (int8).",
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
    parser.add_argument("--model-version", default="1.0.0", help='the cards\' "release" (default: 1.0.0)')
    parser.add_argument(
        "--int8-scenes",
        type=int,
        default=300,
        help="training images to calibrate the int8 model with (0: no int8 model)",
    )
    parser.add_argument(
        "--int8-only",
        action="store_true",
        help="no training: quantize OUT/unet.keras to OUT/segapp-unet/1/model.tflite and measure both models into "
        "both cards",
    )
    parser.add_argument(
        "--verbose", type=int, default=1, help="Keras fit verbosity: 1 progress bar, 2 a line per epoch"
    )
    args = parser.parse_args(argv)
    if args.int8_only and args.int8_scenes < 1:
        parser.error("--int8-only needs --int8-scenes of at least 1")
    try:
        if args.int8_only:
            add_int8(Path(args.out), args)
        else:
            train(args)
    except (datasets.DatasetError, FileNotFoundError) as exc:
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
    parser.add_argument(
        "--against",
        help="a second model (the float one for an int8 --model, segapp/models/unet.tflite for "
        "segapp/models/segapp-unet/1/model.tflite): both models' quality and engine time, and how "
        "often their masks agree",
    )
    args = parser.parse_args(argv)
    try:
        if args.against:
            result = compare(Path(args.against), Path(args.model), args.data, args.count)
        else:
            result = measure(Path(args.model), args.data, args.count)
    except (datasets.DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"segapp-eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.against:
        for name, quality in result["models"].items():
            print(f"{name} ({quality['engine_ms_per_image']:.2f} ms per image, engine alone, 1 thread)")
            print(evaluation.format_table(quality))
        agreement = result["agreement"]
        print(f"masks agree on {agreement['pixels']:.4%} of pixels (lowest image {agreement['lowest_image']:.4%})")
    else:
        print(evaluation.format_table(result))
    return 0
