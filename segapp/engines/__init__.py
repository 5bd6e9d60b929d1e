"""The engines that run a network, one per file format, all behind one interface:

    engine.name                  "litert", "tensorflow" or "onnxruntime"
    engine.input                 `TensorSpec` of the network's image input (None for a dimension it leaves open)
    engine.outputs               [`TensorSpec`, ...], in the network's order
    engine.predict(batch, k=0)   output k as float32 for a float32 batch laid out as the input says (NHWC or NCHW);
                                 an integer-quantized network is fed and read through its quantization parameters

`open_engine(path)` picks the engine by the file's name. Each engine's runtime is imported only when it is made:
serving a .tflite imports neither TensorFlow nor ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A version folder's network, by file name (segapp.repository), and any other file by its suffix (SEGAPP_MODEL).
FORMATS = {".tflite": "litert", ".keras": "tensorflow", ".h5": "tensorflow", ".savedmodel": "tensorflow",
           ".onnx": "onnxruntime"}
NETWORK_FILES = ("model.tflite", "model.keras", "model.onnx", "model.savedmodel")


class EngineError(ValueError):
    """A network segapp cannot run: the message says why, in one line."""


@dataclass(frozen=True)
class TensorSpec:
    """A network's tensor as its runtime reports it: name, shape (None where open), NumPy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    quantized: bool = False


def open_engine(path: str | Path, threads: int = 1):
    """The engine for a network file: LiteRT for .tflite, TensorFlow for .keras, .h5 or a SavedModel folder, ONNX
    Runtime for .onnx. Raises `EngineError` for a format it does not know, FileNotFoundError for no file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    kind = "tensorflow" if path.is_dir() else FORMATS.get(path.suffix)
    if kind == "litert":
        from segapp.engines.litert import LiteRTEngine

        return LiteRTEngine(path, threads)
    if kind == "tensorflow":
        from segapp.engines.tensorflow import TensorFlowEngine

        return TensorFlowEngine(path, threads)
    if kind == "onnxruntime":
        from segapp.engines.onnx import OnnxEngine

        return OnnxEngine(path, threads)
    raise EngineError(f"{path.name}: unknown network format "
                      "(expected .tflite, .keras, .h5, .onnx or a SavedModel folder)")


def dimension(value) -> int | None:
    """A runtime's size of one dimension as an int, or None where the network leaves it open (-1, None, a name)."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None
