"""Writing a colour network of tests/networks.py in each format: an ONNX graph made node by node, a Keras model, a
TensorFlow SavedModel and its LiteRT conversions, float and full-integer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from tests.networks import Network, colour_blocks, heads


def write_network(network: Network, path: Path) -> None:
    """Write `network` to `path` (model.onnx, model.keras, model.tflite or the folder model.savedmodel)."""
    if network.format == "onnx":
        _write_onnx(network, path)
    elif network.format == "keras":
        _write_keras(network, path)
    else:
        _write_tensorflow(network, path)


def _write_onnx(network: Network, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    first = network.layout == "NCHW"
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *network.input_shape[1:]])
    nodes, weights_in, outputs = [], [], []
    for name, (weights, bias) in heads(network).items():
        count = weights.shape[1]
        weights_in += [numpy_helper.from_array(weights.T.reshape(count, 3, 1, 1) if first else weights, f"{name}_w"),
                       numpy_helper.from_array(bias, f"{name}_b")]
        if first:  # ONNX's natural layout: a Conv
            nodes.append(helper.make_node("Conv", ["image", f"{name}_w", f"{name}_b"], [f"{name}_pre"]))
        else:  # channels last: the channel axis is the last, a MatMul
            nodes += [helper.make_node("MatMul", ["image", f"{name}_w"], [f"{name}_mm"]),
                      helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_pre"])]
        axis = 1 if first else 3
        activation = {"logits": ("Identity", {}), "probabilities": ("Softmax", {"axis": axis}),
                      "sigmoid": ("Sigmoid", {}), "labels": ("ArgMax", {"axis": axis, "keepdims": 0})}
        op, attributes = activation[network.output]
        nodes.append(helper.make_node(op, [f"{name}_pre"], [name], **attributes))
        spatial = [network.height, network.width]
        if network.output == "labels":
            outputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["N", *spatial]))
        else:
            shape = ["N", count, *spatial] if first else ["N", *spatial, count]
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(nodes, "colour_classes", [image], outputs, weights_in)
    # IR 8 with opset 17: what ONNX Runtime 1.17, the oldest the onnx extra allows, reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="segapp tests/networks.py")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _write_keras(network: Network, path: Path) -> None:
    import keras

    first = network.layout == "NCHW"
    image = keras.Input(network.input_shape[1:], name="image")
    x = keras.layers.Permute((2, 3, 1))(image) if first else image
    outputs = []
    for name, (weights, bias) in heads(network).items():
        convolution = keras.layers.Conv2D(weights.shape[1], 1, name=f"{name}_convolution",
                                          activation="sigmoid" if network.output == "sigmoid" else None)
        y = convolution(x)
        convolution.set_weights([weights.reshape(1, 1, *weights.shape), bias])
        if network.output == "probabilities":
            y = keras.layers.Softmax(axis=-1)(y)
        if network.output == "labels":
            y = keras.ops.argmax(y, axis=-1)  # int32; Keras saves the op in the .keras file, no Lambda
        elif first:
            y = keras.layers.Permute((3, 1, 2))(y)
        # The layer's name is the output's name (model.output_names); the tensor's own name is keras_tensor_<n>.
        outputs.append(keras.layers.Identity(name=name)(y))
    keras.Model(image, outputs if len(outputs) > 1 else outputs[0], name="colour_classes").save(path)


def _write_tensorflow(network: Network, path: Path) -> None:
    """A SavedModel from plain TensorFlow ops (signature serving_default: image -> aux?, segmentation), and for the
    .tflite formats its conversion. LiteRT orders outputs by their signature names: aux before segmentation."""
    import tensorflow as tf

    first = network.layout == "NCHW"

    def serve(image):
        x = tf.transpose(image, [0, 2, 3, 1]) if first else image
        answers = {}
        for name, (weights, bias) in heads(network).items():
            y = tf.nn.conv2d(x, tf.constant(weights.reshape(1, 1, *weights.shape)), 1, "VALID") + bias
            if network.output == "probabilities":
                y = tf.nn.softmax(y, axis=-1)
            elif network.output == "sigmoid":
                y = tf.sigmoid(y)
            elif network.output == "labels":
                y = tf.argmax(y, axis=-1, output_type=tf.int32)
            answers[name] = tf.transpose(y, [0, 3, 1, 2]) if first and network.output != "labels" else y
        return answers

    module = tf.Module()
    module.serve = tf.function(serve, input_signature=[tf.TensorSpec([None, *network.input_shape[1:]], tf.float32,
                                                                     name="image")])
    if network.format == "savedmodel":
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
        return
    with tempfile.TemporaryDirectory() as scratch:
        tf.saved_model.save(module, scratch, signatures={"serving_default": module.serve})
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch)
        if network.format == "tflite-int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: _representative(network)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8  # float outputs only: labels stay int32
        path.write_bytes(converter.convert())


def _representative(network: Network):
    """Calibration inputs: the test image and random pixels, normalised as the network is fed, so the int8 input
    covers every normalised pixel value from 0 to 255."""
    rng = np.random.default_rng(16)
    images = [colour_blocks(network.width, network.height)]
    images += [rng.integers(0, 256, (network.height, network.width, 3)) for _ in range(8)]
    for pixels in images:
        x = ((pixels - np.asarray(network.mean)) / np.asarray(network.std)).astype(np.float32)[None]
        yield [x.transpose(0, 3, 1, 2) if network.layout == "NCHW" else x]
