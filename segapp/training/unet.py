"""The U-Net: a MobileNetV2 encoder and a transposed-convolution decoder, as in the TensorFlow segmentation tutorial.

Input INPUT_SIZE x INPUT_SIZE RGB pixels normalised by MEAN and STD (to [0, 1]); output a logit per class of the
demonstration data (scenes.CLASS_NAMES) at the input size.
"""

from __future__ import annotations

import numpy as np

from segapp.training import scenes

INPUT_SIZE = 128
NUM_CLASSES = len(scenes.CLASS_NAMES)
# The input's normalisation, (pixel - MEAN) / STD on 0-255 values: [0, 1]. The one place training, the int8
# calibration and the card's input.mean and input.std (segapp.contract, which serving reads) take it from.
MEAN, STD = 0, 255

# MobileNetV2 activations used as skips, at 64, 32, 16 and 8 px for a 128-px input, and the 4-px bottleneck.
SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu")
BOTTLENECK_LAYER = "block_16_project"

# Network widths: (encoder alpha, decoder filters).
WIDTHS = {
    "full": (1.0, (512, 256, 128, 64)),
    "half": (0.5, (256, 128, 64, 32)),
    "slim": (0.35, (128, 64, 32, 16)),
}
# Their cost, measured with LiteRT, one thread on one core of the 2-core project machine (issue 2):
# (parameters, .tflite megabytes, milliseconds per image).
MEASURED_COST = {"full": (6.5e6, 24.6, 37), "half": (1.67e6, 6.3, 9.8), "slim": (0.63e6, 2.4, 3.7)}


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels (any shape ending in 3) as the network takes them: float32 (pixel - MEAN) / STD."""
    return (pixels.astype(np.float32) - np.float32(MEAN)) * np.float32(1 / STD)


def width_trade_off() -> list[dict]:
    """The widths and their measured cost, for the model card."""
    return [
        {
            "width": name,
            "alpha": alpha,
            "decoder_filters": list(filters),
            "parameters": int(MEASURED_COST[name][0]),
            "tflite_mb": MEASURED_COST[name][1],
            "ms_per_image": MEASURED_COST[name][2],
        }
        for name, (alpha, filters) in WIDTHS.items()
    ]


def build_unet(alpha: float = 0.35, decoder_filters=(128, 64, 32, 16), bn_momentum: float = 0.9, name: str = "unet"):
    """Build the (untrained) U-Net.

    Keras builds MobileNetV2's BatchNormalization with momentum 0.999: trained from scratch for a few hundred
    steps its moving statistics barely leave their initial values and the model predicts one class in
    inference mode. `bn_momentum` replaces it on every BatchNormalization layer.
    """
    import keras

    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    encoder = keras.applications.MobileNetV2(
        input_shape=(INPUT_SIZE, INPUT_SIZE, 3), include_top=False, weights=None, alpha=alpha
    )
    down = keras.Model(
        encoder.input,
        [encoder.get_layer(n).output for n in SKIP_LAYERS] + [encoder.get_layer(BOTTLENECK_LAYER).output],
        name="encoder",
    )
    *skips, x = down(inputs)
    for filters, skip in zip(decoder_filters, reversed(skips), strict=True):
        x = keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Concatenate()([x, skip])
    logits = keras.layers.Conv2DTranspose(NUM_CLASSES, 3, strides=2, padding="same", name="logits")(x)
    model = keras.Model(inputs, logits, name=name)
    for layer in down.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    return model
