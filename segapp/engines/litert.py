"""LiteRT (the TensorFlow Lite runtime, XNNPACK on the CPU) for .tflite networks, float or full-integer."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from segapp.engines import TensorSpec, dimension


class LiteRTEngine:
    """Runs a .tflite network, `threads` threads.

    A full-integer network (int8 or uint8 input and output, as `segapp-train` exports unet-int8) is fed and read
    through the quantization parameters its interpreter reports, so `predict` takes and returns float32 for
    either kind.
    """

    name = "litert"

    def __init__(self, path: str | Path, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._outputs = self._interpreter.get_output_details()
        self._batch = int(self._input["shape"][0])
        self.input = _spec(self._input)
        self.outputs = [_spec(detail, names.get(detail["index"])) for detail in self._outputs
                        for names in [_signature_names(self._interpreter)]]
        # One interpreter is not safe to invoke from two threads at once.
        self._lock = threading.Lock()

    @property
    def quantized(self) -> bool:
        """Whether the network takes integer input (a full-integer network)."""
        return self.input.quantized

    def predict(self, batch: np.ndarray, output: int = 0) -> np.ndarray:
        """Output `output` (float32) for a float32 batch shaped as the network's input but for its batch size."""
        with self._lock:
            if batch.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input["index"], batch.shape)
                self._interpreter.allocate_tensors()
                self._batch = batch.shape[0]
            self._interpreter.set_tensor(self._input["index"], quantize(batch, self._input))
            self._interpreter.invoke()
            detail = self._outputs[output]
            return dequantize(self._interpreter.get_tensor(detail["index"]), detail)


def _spec(detail: dict, name: str | None = None) -> TensorSpec:
    # shape_signature has -1 where the network leaves a dimension open; shape is what is allocated now.
    shape = detail.get("shape_signature", detail["shape"])
    dtype = np.dtype(detail["dtype"])
    quantized = np.issubdtype(dtype, np.integer) and detail["quantization"][0] != 0
    return TensorSpec(name or detail["name"], tuple(dimension(int(d)) for d in shape), dtype.name, bool(quantized))


def _signature_names(interpreter) -> dict[int, str]:
    """Output tensor index -> the name the network's serving signature gives it (a converted Keras or SavedModel
    network's tensors are named PartitionedCall:0, :1...; its signature keeps the names the author gave)."""
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return {}
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    return {detail["index"]: name for name, detail in runner.get_output_details().items()}


def quantize(values: np.ndarray, tensor: dict) -> np.ndarray:
    """Float values as the input tensor's type: unchanged for a float tensor, else round(x / scale) + zero point."""
    dtype = tensor["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(values, dtype=np.float32)
    scale, zero_point = tensor["quantization"]
    limits = np.iinfo(dtype)
    quantized = np.rint(np.asarray(values, np.float32) * np.float32(1 / scale)) + np.float32(zero_point)
    return np.clip(quantized, limits.min, limits.max).astype(dtype)


def dequantize(values: np.ndarray, tensor: dict) -> np.ndarray:
    """An output tensor as float32: (q - zero point) * scale for a quantized tensor, else a float32 copy."""
    scale, zero_point = tensor["quantization"]
    if not np.issubdtype(values.dtype, np.integer) or scale == 0:
        return values.astype(np.float32)
    return (values.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
