"""Tensors of the Open Inference Protocol as they travel over HTTP: a request's JSON header and the binary data
after it (the binary tensor data extension), UINT8 and BYTES data in JSON or binary form, and numbers as JSON.

Everything here refuses what it cannot read with a 400 (`webob.exc.HTTPBadRequest`) whose message says why.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

import numpy as np
from webob.exc import HTTPBadRequest

from segapp.errors import api_error

HEADER_LENGTH = "Inference-Header-Content-Length"

# Each byte value as right-aligned decimal text of 1, 2 and 3 characters (JSON allows the spaces), for json_numbers.
_DIGITS = {
    width: np.char.rjust(np.arange(256).astype(f"S{width}"), width).view(np.uint8).reshape(256, width)
    for width in (1, 2, 3)
}


def bad_request(message: str):
    """A 400 with `message`."""
    return api_error(HTTPBadRequest, "bad_request", message)


def split_request(body: bytes, header_length: str | None):
    """(the request's JSON header, the binary data after it); `header_length` is the header's
    Inference-Header-Content-Length, None when the whole body is JSON."""
    length = len(body)
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise bad_request(f"{HEADER_LENGTH} is {header_length!r}; it must be the length of the JSON header, "
                              f"1 to {len(body)} bytes for this body")
    if not body:
        raise bad_request("the body is empty; send an inference request")
    try:
        return json.loads(body[:length]), body[length:]
    except (UnicodeDecodeError, ValueError) as error:
        raise bad_request(f"the inference request is not JSON: {error}") from None


def tensor_data(tensor: dict, binary: bytes):
    """(the input tensor's data: its bytes in the binary section, or its JSON "data"; the binary data after it)."""
    name = tensor.get("name")
    parameters = tensor.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise bad_request(f"the parameters of input {name!r} must be a JSON object")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise bad_request(f"input {name!r} has no 'data' and no binary_data_size parameter")
        return tensor["data"], binary
    if type(size) is not int or not 0 <= size <= len(binary):
        raise bad_request(f"input {name!r} claims binary_data_size {size!r}; {len(binary)} bytes follow the JSON")
    return binary[:size], binary[size:]


def uint8_from_json(data, expected: int, what: str) -> np.ndarray:
    """UINT8 JSON data (flat, or nested as the shape) as a flat array of `expected` values; 400 otherwise."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):  # ragged lists, numbers beyond int64
        array = None
    if array is None or array.dtype.kind not in "iu" or array.size != expected:
        raise bad_request(f"{what} needs 'data': {expected} whole numbers 0-255, flat or nested as the shape")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise bad_request(f"{what} holds {array.min() if array.min() < 0 else array.max()}, outside UINT8's 0-255")
    return array.astype(np.uint8).ravel()


def bytes_elements(data: bytes) -> list[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise bad_request("the BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise bad_request(f"a BYTES element claims {size} bytes; {len(data) - offset} are left")
        elements.append(data[offset : offset + size])
        offset += size
    return elements


def base64_elements(data) -> list[bytes]:
    """The elements of a BYTES tensor in JSON, flat or nested once: base64 strings, since a file is not text."""
    flat = data if isinstance(data, list) else [data]
    if flat and all(isinstance(item, list) for item in flat):
        flat = [item for row in flat for item in row]
    try:
        if not all(isinstance(item, str) for item in flat):
            raise ValueError
        return [base64.b64decode(item, validate=True) for item in flat]
    except (ValueError, binascii.Error):
        raise bad_request("BYTES data in JSON must be base64 strings of image files (or send binary data)") from None


def json_numbers(array: np.ndarray) -> bytes:
    """`array`'s values, row-major, as JSON numbers separated by commas (the inside of a JSON list).

    A mask of many megapixels would be millions of Python ints through json.dumps; a UINT8 array is written here
    in one NumPy pass instead, each value padded with spaces to the width of the largest.
    """
    flat = array.ravel()
    if array.dtype != np.uint8:
        return json.dumps(flat.tolist())[1:-1].encode()
    if not flat.size:
        return b""
    width = len(str(int(flat.max())))
    text = np.full((flat.size, width + 1), ord(","), np.uint8)
    text[:, :width] = _DIGITS[width][flat]
    return text.tobytes()[:-1]


def to_bytes(array: np.ndarray) -> bytes:
    """A numeric array's binary tensor data: row-major, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
