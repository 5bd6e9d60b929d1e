"""ONNX Runtime (CPU) for .onnx networks, as PyTorch and most other frameworks export them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segapp.engines import EngineError, TensorSpec, dimension

# ONNX Runtime names tensor types as "tensor(float)"; the NumPy dtype of each.
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64"}


class OnnxEngine:
    """Runs a .onnx network with ONNX Runtime's CPU provider, `threads` intra-op threads (the `onnx` extra)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1):
        try:
            import onnxruntime
        except ImportError:
            raise EngineError("ONNX Runtime is not installed: pip install 'segapp[onnx]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Its own thread pool spins between runs by default, taking a core from the other workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = _spec(self._session.get_inputs()[0])
        self.outputs = [_spec(node) for node in self._session.get_outputs()]
        if self.input.dtype not in ("float32", "float16", "float64"):
            raise EngineError(f"{Path(path).name}: its input is {self.input.dtype}; segapp feeds float networks")
        self._input_dtype = np.dtype(self.input.dtype)

    def predict(self, batch: np.ndarray, output: int = 0) -> np.ndarray:
        """Output `output` as float32 for a float32 batch."""
        feed = {self.input.name: np.ascontiguousarray(batch, dtype=self._input_dtype)}
        (result,) = self._session.run([self.outputs[output].name], feed)
        return np.asarray(result, dtype=np.float32)


def _spec(node) -> TensorSpec:
    dtype = _DTYPES.get(node.type, node.type)
    return TensorSpec(node.name, tuple(dimension(d) for d in node.shape), dtype)
