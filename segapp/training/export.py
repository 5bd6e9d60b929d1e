"""Export of a trained Keras U-Net: unet.keras without optimizer state, float .tflite for LiteRT, and the full-integer
int8 .tflite calibrated on training images. TensorFlow is imported inside each function."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from segapp.training import unet

KERAS_FILE = "unet.keras"
FLOAT_FILE = "unet.tflite"


def export(model, out: Path) -> None:
    """Write unet.keras without optimizer state and unet.tflite for LiteRT (float32, batch dimension dynamic)."""
    import keras

    with tempfile.TemporaryDirectory() as scratch:
        # Keras saves the optimizer's slots with a compiled model (5 MB of 8 for the slim width); a model
        # loaded with compile=False has none.
        model.save(Path(scratch) / "trained.keras")
        keras.saving.load_model(Path(scratch) / "trained.keras", compile=False).save(out / KERAS_FILE)
    export_tflite(out / KERAS_FILE, out / FLOAT_FILE)


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


def export_int8(keras_path: Path, tflite_path: Path, representative: np.ndarray) -> None:
    """Convert a .keras model to a full-integer .tflite (int8 weights, activations, input and output) for
    XNNPACK's int8 kernels, calibrated on `representative` images (N x size x size x 3 uint8), normalised as
    the network is trained (`unet.normalise`)."""
    import keras
    import tensorflow as tf

    def samples():
        for image in representative:
            yield [unet.normalise(image[None])]

    model = keras.saving.load_model(str(keras_path), compile=False)
    with tempfile.TemporaryDirectory() as scratch:
        model.export(scratch, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Integer input and output: LiteRTEngine quantizes the normalised pixels and dequantizes the logits with the
        # parameters the interpreter reports, so no float op is left in the graph.
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        tflite_path.write_bytes(converter.convert())
