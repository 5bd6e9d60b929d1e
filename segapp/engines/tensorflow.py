"""TensorFlow for .keras (and .h5) files and SavedModel folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segapp.engines import TensorSpec, dimension


class TensorFlowEngine:
    """Runs a .keras file or a SavedModel folder with TensorFlow, `threads` intra-op threads."""

    name = "tensorflow"

    def __init__(self, path: str | Path, threads: int = 1):
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TensorFlow's context already started in this process; its pools stay as they are.
        path = Path(path)
        if path.is_dir():
            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
            (argument,) = signature.structured_input_signature[1].values()
            names = sorted(signature.structured_outputs)
            self.input = TensorSpec(argument.name, _shape(argument.shape), argument.dtype.name)
            self.outputs = [_spec(name, signature.structured_outputs[name]) for name in names]
            self._call = lambda x: [result[name] for result in [signature(tf.constant(x))] for name in names]
        else:
            import keras

            model = keras.saving.load_model(str(path), compile=False)
            tensor = model.inputs[0]
            self.input = TensorSpec(tensor.name, _shape(tensor.shape), np.dtype(tensor.dtype).name)
            # Keras names the output tensors keras_tensor_<n>; output_names holds the names the author gave.
            names = list(getattr(model, "output_names", None) or [out.name for out in model.outputs])
            self.outputs = [_spec(name, out) for name, out in zip(names, model.outputs, strict=True)]
            call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
            self._call = lambda x: _as_list(call(x))

    def predict(self, batch: np.ndarray, output: int = 0) -> np.ndarray:
        """Output `output` as float32 for a float32 batch."""
        return np.asarray(self._call(np.ascontiguousarray(batch, dtype=np.float32))[output], dtype=np.float32)


def _shape(shape) -> tuple[int | None, ...]:
    return tuple(dimension(d) for d in list(shape))


def _spec(name: str, tensor) -> TensorSpec:
    return TensorSpec(str(name), _shape(tensor.shape), np.dtype(getattr(tensor.dtype, "name", tensor.dtype)).name)


def _as_list(result) -> list:
    if isinstance(result, dict):
        return [result[name] for name in sorted(result)]
    return list(result) if isinstance(result, list | tuple) else [result]
