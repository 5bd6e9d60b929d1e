"""The U-Net: a MobileNetV2 encoder and a transposed-convolution decoder, as in the TensorFlow segmentation tutorial.

Input 128x128x3 in [0, 1]; output 128x128 x 3 class logits (0 foreground, 1 background, 2 border).
"""

from __future__ import annotations

INPUT_SIZE = 128
NUM_CLASSES = 3

# MobileNetV2 activations used as skips, at 64, 32, 16 and 8 px for a 128-px input, and the 4-px bottleneck.
SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu")
BOTTLENECK_LAYER = "block_16_project"

# Widths measured with LiteRT, one thread (issue 2): (alpha, decoder filters) -> params, .tflite size, ms/image.
WIDTHS = {
    "full": (1.0, (512, 256, 128, 64)),  # 6.5 M, 24.6 MB, 37 ms
    "half": (0.5, (256, 128, 64, 32)),  # 1.67 M, 6.3 MB, 9.8 ms
    "slim": (0.35, (128, 64, 32, 16)),  # 0.63 M, 2.4 MB, 3.7 ms
}


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
