"""The Open Inference Protocol (KServe v2, as Triton, KServe, MLServer and Seldon speak it) over `Segmenter` calls.

Routes (REST; wsgi.py routes them here; every error is `{"error": "<message>"}` with the status below):

    GET  /v2                                            server metadata: name, version, extensions
    GET  /v2/health/live                                200 {"live": true} while the process answers
    GET  /v2/health/ready                               200 {"ready": true}; 503 while loading or draining
    GET  /v2/models/{name}[/versions/{version}]         model metadata: inputs and outputs, datatypes, shapes
    GET  /v2/models/{name}[/versions/{version}]/ready   200 {"name", "ready": true}; 503 while loading
    POST /v2/models/{name}[/versions/{version}]/infer   inference: JSON tensors, or the binary tensor data extension
                                                        (a JSON header of Inference-Header-Content-Length bytes,
                                                        then the tensors' bytes)
    POST /v2/repository/index                           every model version and its state (Triton's repository
                                                        extension, what tritonclient's get_model_repository_index
                                                        calls)

Every model of the repository (segapp.repository) is served, by its folder's name and version numbers.
Each takes one input, "image": UINT8 pixels [H, W, 3] or a batch
[N, H, W, 3], or BYTES [N] (or []) holding encoded image files (binary: each a 4-byte little-endian length and the
bytes; JSON: base64 strings). Outputs: "mask", UINT8 [H, W] class indices (with the input's batch dimension in front,
[N, H, W]), and, when asked by name, "class_fractions", FP32 [classes] ([N, classes]). An output is binary when its
"parameters" say `binary_data: true`, or the request's say `binary_data_output: true`.

Statuses: 400 a request, tensor, shape, datatype or image that cannot be used, or a batch of BYTES images of
different sizes; 404 an unknown model or version; 413 a body over the limit, images over the pixel limit (a UINT8
tensor's from its declared shape, before its data is read; a batch's BYTES images summed from their headers before
any is decoded), an image over its decoding budget, a batch of more than MAX_BATCH images, or a JSON answer over
MAX_JSON_ANSWER_BYTES; 415 a Content-Type other than JSON or octet-stream, or an image format not taken; 503 while
the model loads.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass, field

import numpy as np
from webob.exc import (
    HTTPRequestEntityTooLarge,
    HTTPUnsupportedMediaType,
    WSGIHTTPException,
)

from segapp.errors import api_error, image_error
from segapp.imaging import CpuBudget, ImageError, image_size
from segapp.inference import Segmentation, Segmenter
from segapp.tensors import (
    HEADER_LENGTH,
    bad_request,
    base64_elements,
    bytes_elements,
    json_numbers,
    split_request,
    tensor_data,
    to_bytes,
    uint8_from_json,
)

INPUT = "image"
OUTPUTS = ("mask", "class_fractions")
# Images in one request. Each costs a network run (a few ms) however small it is; a 10 MB body of tiny PNGs
# could otherwise ask for 100,000 of them and hold a worker for minutes.
MAX_BATCH = 32
# The largest JSON answer: its mask is a number and a comma per pixel (16 megapixels for up to 10 classes, so a
# 12-megapixel photograph's mask still comes as JSON); a larger mask is answered as binary data, a byte a pixel.
MAX_JSON_ANSWER_BYTES = 32 * 1024 * 1024
_TAKEN_MEDIA_TYPES = ("", "application/json", "application/octet-stream")


def protocol_error_body(error: WSGIHTTPException) -> bytes:
    """The protocol's error body, `{"error": "<message>"}`, for a `webob.exc` exception."""
    return json.dumps({"error": error.detail or error.title}).encode()


def server_metadata() -> dict:
    """GET /v2: the server's name, version and the protocol extensions it implements."""
    try:
        version = importlib.metadata.version("segapp")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": "segapp", "version": version, "extensions": ["binary_tensor_data"]}


@dataclass
class InferenceRequest:
    """A parsed inference request: the images, and what the answer should hold."""

    request_id: str | None
    pixels: np.ndarray | None  # UINT8: N x H x W x 3
    files: list[bytes] | None  # BYTES: N encoded images
    batched: bool  # whether the input had a batch dimension, which the outputs keep
    outputs: dict[str, bool]  # output name -> binary
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class InferenceAnswer:
    """The response body, and the length of its JSON header when binary tensors follow (else None)."""

    body: bytes
    header_length: int | None
    segmentations: list[Segmentation]
    timings: dict[str, float]


class InferenceProtocol:
    """The protocol's model metadata, request parsing, inference and answers, for the segmenter a route names."""

    def __init__(self, max_pixels: int, clock=time.perf_counter):
        self.max_pixels = max_pixels
        self.clock = clock

    @staticmethod
    def metadata(segmenter: Segmenter, versions: list[str]) -> dict:
        """GET /v2/models/{name}: the input and outputs with names, datatypes and shapes (-1: any size)."""
        classes = len(segmenter.card.get("classes", ()))
        return {
            "name": segmenter.name,
            "versions": versions,
            "platform": str(segmenter.card.get("engine", "unknown")),
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, 3]}],
            "outputs": [
                {"name": "mask", "datatype": "UINT8", "shape": [-1, -1]},
                {"name": "class_fractions", "datatype": "FP32", "shape": [classes]},
            ],
        }

    def parse(self, body: bytes, media_type: str, header_length: str | None) -> InferenceRequest:
        """The request in `body` (JSON, then binary tensors when `header_length` is given); 400, 413 or 415."""
        started = self.clock()
        if media_type not in _TAKEN_MEDIA_TYPES:
            raise api_error(
                HTTPUnsupportedMediaType, "unsupported_media_type",
                f"Content-Type {media_type!r} is not accepted; send an inference request as application/json, "
                f"or with binary tensors as application/octet-stream and the {HEADER_LENGTH} header",
            )
        header, binary = split_request(body, header_length)
        if not isinstance(header, dict):
            raise bad_request("the inference request must be a JSON object")
        tensors = header.get("inputs")
        if not isinstance(tensors, list) or len(tensors) != 1 or not isinstance(tensors[0], dict):
            raise bad_request(f"'inputs' must be a list of one tensor, {INPUT!r}")
        tensor = tensors[0]
        if tensor.get("name") != INPUT:
            raise bad_request(f"unknown input {tensor.get('name')!r}; the model's one input is {INPUT!r}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad_request(f"the shape of input {INPUT!r} must be a list of whole numbers, not {shape!r}")
        data, binary = tensor_data(tensor, binary)
        if binary:
            raise bad_request(f"{len(binary)} bytes of binary data follow the input tensor; no tensor claims them")
        datatype = tensor.get("datatype")
        if datatype == "UINT8":
            pixels, files, batched = self._pixels(shape, data), None, len(shape) == 4
        elif datatype == "BYTES":
            pixels, files, batched = None, self._files(shape, data), len(shape) == 1
        else:
            raise bad_request(
                f"input {INPUT!r} has datatype {datatype!r}; send UINT8 pixels [H, W, 3] or BYTES image files"
            )
        request = InferenceRequest(
            request_id=_request_id(header.get("id")), pixels=pixels, files=files, batched=batched,
            outputs=_outputs(header.get("outputs"), header.get("parameters")),
        )
        request.timings["parse"] = self.clock() - started
        return request

    def _pixels(self, shape: list[int], data) -> np.ndarray:
        if len(shape) not in (3, 4) or shape[-1] != 3 or 0 in shape:
            raise bad_request(f"a UINT8 image has shape [H, W, 3] or [N, H, W, 3], not {shape}")
        images, height, width = (1, *shape[:2]) if len(shape) == 3 else shape[:3]
        self._check_batch(images, images * height * width, f"the UINT8 tensor {shape}")
        expected = images * height * width * 3
        if isinstance(data, bytes):
            if len(data) != expected:
                raise bad_request(
                    f"input {INPUT!r} of shape {shape} needs {expected} bytes of UINT8 data, not {len(data)}"
                )
            array = np.frombuffer(data, np.uint8)
        else:
            array = uint8_from_json(data, expected, f"input {INPUT!r} of shape {shape}")
        return array.reshape(images, height, width, 3)

    def _files(self, shape: list[int], data) -> list[bytes]:
        if len(shape) > 1:
            raise bad_request(f"BYTES images have shape [N] (or [] for one), not {shape}")
        count = shape[0] if shape else 1
        if count == 0:
            raise bad_request("the BYTES tensor holds no image")
        self._check_batch(count, 0, f"the BYTES tensor {shape}")
        return bytes_elements(data, count) if isinstance(data, bytes) else base64_elements(data, count)

    def _check_batch(self, images: int, pixels: int, what: str) -> None:
        if images > MAX_BATCH:
            raise api_error(HTTPRequestEntityTooLarge, "batch_too_large",
                            f"{what} holds {images} images; a request takes at most {MAX_BATCH}")
        if pixels > self.max_pixels:
            raise api_error(HTTPRequestEntityTooLarge, "image_too_large",
                            f"{what} holds {pixels} pixels, over the limit of {self.max_pixels}")

    def infer(self, segmenter: Segmenter, request: InferenceRequest) -> list[Segmentation]:
        """A segmentation per image; 400, 413 or 415 for an image that cannot be segmented, and for BYTES images of
        different sizes (their masks would not make one tensor). What the images add up to (pixels, and the size of
        a JSON answer) is checked from their headers before any is decoded."""
        if request.pixels is not None:
            self._check_answer(segmenter, request, request.pixels[0].shape[:2], len(request.pixels))
            results = []
            for image in request.pixels:
                started = self.clock()
                mask = segmenter.segment_pixels(image)
                results.append(Segmentation(mask=mask, timings={"infer": self.clock() - started}))
            return results
        # The images of a batch share one CPU budget: 20 progressive JPEGs each just under it would be minutes.
        budget = CpuBudget(segmenter.decode_cpu_seconds)
        sizes = []
        for index, data in enumerate(request.files):
            try:
                sizes.append(image_size(data, self.max_pixels, budget.left()))
            except ImageError as error:
                raise image_error(error, self._where(request, index)) from None
        pixels = sum(width * height for width, height in sizes)
        if pixels > self.max_pixels:
            raise api_error(HTTPRequestEntityTooLarge, "image_too_large",
                            f"the batch's images hold {pixels} pixels, over the limit of {self.max_pixels} a request")
        width, height = sizes[0]
        self._check_answer(segmenter, request, (height, width), len(sizes))
        results = []
        for index, data in enumerate(request.files):
            try:
                result = segmenter.segment(data, cpu_seconds=budget.left())
            except ImageError as error:
                raise image_error(error, self._where(request, index)) from None
            if results and result.mask.shape != results[0].mask.shape:
                first, this = results[0].mask.shape, result.mask.shape
                raise bad_request(
                    f"{self._where(request, index)}it is {this[1]}x{this[0]}, image 1 is {first[1]}x{first[0]}: "
                    "the images of a batch must have one size (their masks make one tensor); send them in separate "
                    "requests"
                )
            results.append(result)
        return results

    @staticmethod
    def _where(request: InferenceRequest, index: int) -> str:
        return f"image {index + 1} of {len(request.files)}: " if request.batched else ""

    @staticmethod
    def _check_answer(segmenter: Segmenter, request: InferenceRequest, shape: tuple[int, int], images: int) -> None:
        """413 before any inference when the answer's JSON would be over MAX_JSON_ANSWER_BYTES (the mask as JSON
        numbers, each with its comma); a binary mask is one byte a pixel, bounded by the pixel limit."""
        if request.outputs.get("mask", True):
            return
        classes = len(segmenter.card.get("classes", ())) or 1
        size = images * shape[0] * shape[1] * (len(str(classes - 1)) + 1)
        if size > MAX_JSON_ANSWER_BYTES:
            raise api_error(
                HTTPRequestEntityTooLarge, "answer_too_large",
                f"the mask of {images} x {shape[1]}x{shape[0]} pixels is {size} bytes as JSON, over the limit of "
                f"{MAX_JSON_ANSWER_BYTES}; ask for it as binary data (parameters: binary_data: true)",
            )

    def answer(self, segmenter: Segmenter, request: InferenceRequest, results: list[Segmentation]) -> InferenceAnswer:
        """The response: JSON, or a JSON header and the binary outputs after it."""
        started = self.clock()
        classes = len(segmenter.card["classes"])
        lead = [len(results)] if request.batched else []
        tensors = {
            "mask": ("UINT8", lead + list(results[0].mask.shape), np.stack([r.mask for r in results])),
            "class_fractions": ("FP32", lead + [classes],
                                np.array([r.class_fractions(classes) for r in results], np.float32)),
        }
        described, parts = [], []
        for name, binary in request.outputs.items():
            datatype, shape, array = tensors[name]
            head = {"name": name, "datatype": datatype, "shape": shape}
            if binary:
                raw = to_bytes(array)
                parts.append(raw)
                described.append(json.dumps({**head, "parameters": {"binary_data_size": len(raw)}}).encode())
            else:
                described.append(json.dumps(head).encode()[:-1] + b', "data": [' + json_numbers(array) + b"]}")
        top = {"model_name": segmenter.name, "model_version": segmenter.version}
        if request.request_id is not None:
            top["id"] = request.request_id
        header = json.dumps(top).encode()[:-1] + b', "outputs": [' + b", ".join(described) + b"]}"
        timings = dict(request.timings)
        for result in results:
            for stage, seconds in result.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        timings["encode"] = self.clock() - started
        return InferenceAnswer(header + b"".join(parts), len(header) if parts else None, results, timings)


def _outputs(asked, parameters) -> dict[str, bool]:
    """Output name -> whether it is answered in binary; "mask" alone when none is asked for."""
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise bad_request("the request's parameters must be a JSON object")
    binary_default = _flag(parameters, "binary_data_output", "the request's") or False
    if asked is None:
        return {"mask": binary_default}
    if not isinstance(asked, list) or not asked:
        raise bad_request(f"'outputs' must be a list of outputs, each named one of {list(OUTPUTS)}")
    chosen = {}
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise bad_request(f"unknown output {name!r}; the model's outputs are {list(OUTPUTS)}")
        if name in chosen:
            raise bad_request(f"output {name!r} is asked for twice")
        own = output.get("parameters")
        own = {} if own is None else own
        if not isinstance(own, dict):
            raise bad_request(f"the parameters of output {name!r} must be a JSON object")
        binary = _flag(own, "binary_data", f"output {name!r}'s")
        chosen[name] = binary_default if binary is None else binary
    return chosen


def _flag(parameters: dict, key: str, whose: str) -> bool | None:
    """A true-or-false parameter, None when absent or null; 400 for any other value (a "true" string is not true)."""
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{whose} parameter {key!r} must be true or false, not {value!r}")
    return value


def _request_id(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"the request 'id' must be a string, not {value!r}")
    return value


