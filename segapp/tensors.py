"""Tensors of the Open Inference Protocol as they travel over HTTP: a request's JSON header and the binary data
after it (the binary tensor data extension), UINT8 and BYTES data in JSON or binary form, and numbers as JSON.

Everything here refuses what it cannot read with a 400 (`webob.exc.HTTPBadRequest`) whose message says why.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct

import numpy as np
from webob.exc import HTTPBadRequest

from segapp.errors import api_error

HEADER_LENGTH = "Inference-Header-Content-Length"
# A request is a few objects (the request, its input, their parameters, the outputs asked for): 256 keys and 32
# levels are far beyond any, and bound what parsing a hostile one costs. UINT8 data nested as its shape is 5 deep.
MAX_JSON_KEYS = 256
MAX_JSON_DEPTH = 32
_DECIMAL = re.compile(r"[0-9]{1,12}")
# A JSON string: its quotes, any characters but quote and backslash, and escapes (possessive: linear time).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)

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
    Inference-Header-Content-Length, None when the whole body is JSON.

    Strict, and bounded before the parse: the length is decimal digits only; the JSON is UTF-8 without a byte order
    mark, nested at most MAX_JSON_DEPTH deep, with at most MAX_JSON_KEYS keys in all, none twice in one object.
    """
    length = len(body)
    if header_length is not None:
        length = int(header_length) if _DECIMAL.fullmatch(header_length) else -1
        if not 0 < length <= len(body):
            raise bad_request(f"{HEADER_LENGTH} is {header_length!r}; it must be the length of the JSON header in "
                              f"decimal digits, 1 to {len(body)} for this body")
    if not body:
        raise bad_request("the body is empty; send an inference request")
    try:
        text = body[:length].decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(f"the inference request is not UTF-8 JSON: {error}") from None
    check_json_structure(body[:length])
    try:
        return json.loads(text, object_pairs_hook=_unique_keys), body[length:]
    except ValueError as error:
        raise bad_request(f"the inference request is not JSON: {error}") from None


def check_json_structure(raw: bytes) -> None:
    """400 unless the JSON text `raw` nests at most MAX_JSON_DEPTH deep and has at most MAX_JSON_KEYS keys.

    Counted without parsing (strings blanked by one regex, brackets counted by NumPy): what a parse costs grows with
    both (a 2 KB body nested 1000 deep is a RecursionError in the parser; 700,000 keys take 0.65 s and 205 MB).
    """
    text = np.frombuffer(raw, np.uint8)
    if b"\\" in raw:  # escaped quotes: strings found by the regex
        bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    else:  # no escapes: every quote opens or closes a string, so what lies after an odd count is inside one
        bare = text[(np.cumsum(text == ord('"'), dtype=np.int32) & 1) == 0]
    keys = int(np.count_nonzero(bare == ord(":")))
    if keys > MAX_JSON_KEYS:
        raise bad_request(f"the inference request has {keys} keys; at most {MAX_JSON_KEYS} are read")
    opens = (bare == ord("[")) | (bare == ord("{"))
    brackets = np.flatnonzero(opens | (bare == ord("]")) | (bare == ord("}")))
    depth = int(np.cumsum(np.where(opens[brackets], 1, -1), dtype=np.int32).max(initial=0))
    if depth > MAX_JSON_DEPTH:
        raise bad_request(f"the inference request nests {depth} deep; at most {MAX_JSON_DEPTH} levels are read")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's dict; 400 when it names a key twice (the last would silently win)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise bad_request(f"the inference request names {twice!r} twice in one object")
    return value


def tensor_data(tensor: dict, binary: bytes):
    """(the input tensor's data: its bytes in the binary section, or its JSON "data"; the binary data after it)."""
    name = tensor.get("name")
    parameters = tensor.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise bad_request(f"the parameters of input {name!r} must be a JSON object")
    size = parameters.get("binary_data_size")
    if size is not None and "data" in tensor:
        raise bad_request(f"input {name!r} has both 'data' and a binary_data_size parameter; send one of them")
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


def bytes_elements(data: bytes, count: int) -> list[bytes]:
    """The `count` elements of a binary BYTES tensor: each a 4-byte little-endian length, then that many bytes;
    400 as soon as the data holds more or fewer (the rest is not read)."""
    elements, offset = [], 0
    while offset < len(data):
        if len(elements) == count:
            raise bad_request(f"the BYTES data holds more than the {count} elements of its shape")
        if offset + 4 > len(data):
            raise bad_request("the BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise bad_request(f"a BYTES element claims {size} bytes; {len(data) - offset} are left")
        elements.append(data[offset : offset + size])
        offset += size
    if len(elements) != count:
        raise bad_request(f"the BYTES data holds {len(elements)} elements; its shape says {count}")
    return elements


def base64_elements(data, count: int) -> list[bytes]:
    """The `count` elements of a BYTES tensor in JSON, flat or nested once: base64 strings, since a file is not
    text; 400 for another count, before any is decoded."""
    flat = data if isinstance(data, list) else [data]
    if flat and all(isinstance(item, list) for item in flat):
        flat = [item for row in flat for item in row]
    if len(flat) != count:
        raise bad_request(f"the BYTES data holds {len(flat)} elements; its shape says {count}")
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
