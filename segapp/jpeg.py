"""What a JPEG's markers promise: whether its scans can hold the frame its header declares, and what decoding it costs.

libjpeg, and so Pillow, decodes a JPEG whose entropy-coded data stops early but is followed by an end marker
without an error: it warns (Pillow drops the warning) and fills the missing blocks with zeros. A client can so
send 27 KB that declare 6000 x 6000 pixels and buy seconds of decoding. Nor does libjpeg bound the number of scans:
each scan of a progressive file costs a pass over every block of its components, however few bytes it has (56 bytes
of an empty refinement scan are 30 ms of a 6000 x 6000 grey image), so 259 KB of repeated scans cost a minute.
`inspect_jpeg` reads the markers only (no decoding) and reports both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SOI, _EOI, _SOS, _DHT = 0xD8, 0xD9, 0xDA, 0xC4
_SEQUENTIAL_HUFFMAN = {0xC0, 0xC1}
_PROGRESSIVE_HUFFMAN = 0xC2
# Frame headers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE_FRAMES = {0xC2, 0xC6, 0xCA, 0xCE}
# Markers without a length field: TEM and the restart markers.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# The end of entropy-coded data: 0xFF followed by anything but a stuffed zero, a restart marker or a fill byte.
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_COEFFICIENTS = 64
# A photograph has a few dozen marker segments (APPn, tables, a frame, up to a few dozen scans); each costs Pillow's
# marker loop, in Python, a few microseconds: 2.6 million empty comments were 4.5 s of a worker.
MAX_SEGMENTS = 1024
# A progressive decoder keeps every block's 64 coefficients as 16-bit numbers for the whole image.
_COEFFICIENT_BYTES_PER_BLOCK = 2 * _COEFFICIENTS


@dataclass(frozen=True)
class JpegFacts:
    """What a JPEG's markers say: `problem` (why it cannot be whole, or None), `progressive`, the bytes of the
    coefficient buffer a progressive decode keeps, and `block_scans`, the blocks its scans pass over in all (the
    decoder's work: 1 per block of a sequential file, several per block of a progressive one)."""

    problem: str | None = None
    progressive: bool = False
    coefficient_bytes: int = 0
    block_scans: int = 0
    size: tuple[int, int] | None = None  # (width, height) of the frame header, when one was read


def inspect_jpeg(data: bytes) -> JpegFacts:
    """The facts of the JPEG in `data`, from its markers alone.

    A problem is reported when the markers are more than MAX_SEGMENTS, or when the scans cannot hold the frame:
    every component's 64 coefficients must be sent to their last bit by some scan (a progressive file cut after a
    scan still decodes, blurred), and each Huffman-coded scan must have at least as many bits as its blocks need,
    each block at least its shortest codes (a cut file given a new end marker). Files this module does not
    understand (arithmetic coding, lossless) are left to the decoder.
    """
    frame, components, shortest, done = None, {}, {}, {}
    block_scans, segments, size = 0, 0, None
    position = 2
    while True:
        position = data.find(b"\xff", position)
        while 0 <= position < len(data) - 1 and data[position + 1] == 0xFF:
            position += 1  # fill bytes before a marker
        if position < 0 or position + 1 >= len(data):
            return JpegFacts("the data ends before the JPEG's end marker", size=size)
        marker = data[position + 1]
        position += 2
        if marker == _EOI:
            break
        if marker in _STANDALONE or marker == _SOI:
            continue
        segments += 1
        if segments > MAX_SEGMENTS:
            return JpegFacts(f"the JPEG has more than {MAX_SEGMENTS} marker segments; a photograph has a few dozen")
        if position + 2 > len(data):
            return JpegFacts("the data ends inside a JPEG marker")
        length = int.from_bytes(data[position : position + 2], "big")
        segment = data[position + 2 : position + length]
        if length < 2 or len(segment) != length - 2:
            return JpegFacts("the data ends inside a JPEG marker segment")
        position += length
        if marker in _FRAMES:
            frame, components = marker, _frame_components(segment)
            if len(segment) >= 5:
                size = (int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"))
            if components is None:
                return JpegFacts()  # a frame header libjpeg will refuse on its own
            done = {component: set() for component in components}
        elif marker == _DHT:
            shortest.update(_shortest_codes(segment))
        elif marker == _SOS and frame is not None:
            end = _END_OF_SCAN.search(data, position)
            scan_end = end.start() if end else len(data)
            problem, blocks = _scan_problem(frame, components, shortest, done, segment, (scan_end - position) * 8)
            if problem:
                return JpegFacts(problem, size=size)
            block_scans += blocks
            position = scan_end
    if frame is None:
        return JpegFacts()
    if frame in _SEQUENTIAL_HUFFMAN or frame == _PROGRESSIVE_HUFFMAN:
        for component, sent in done.items():
            if len(sent) < _COEFFICIENTS:
                return JpegFacts(f"the JPEG's scans stop before component {component} is complete", size=size)
    progressive = frame in _PROGRESSIVE_FRAMES
    coefficients = sum(c["blocks"] for c in components.values()) * _COEFFICIENT_BYTES_PER_BLOCK if progressive else 0
    return JpegFacts(None, progressive, coefficients, block_scans, size)


def _frame_components(segment: bytes) -> dict[int, dict] | None:
    """Component id -> its block columns and rows, from a frame header; None when it is malformed."""
    if len(segment) < 6:
        return None
    height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
    entries = [segment[6 + 3 * i : 9 + 3 * i] for i in range(count)]
    if not width or not height or not count or any(len(entry) != 3 for entry in entries):
        return None
    sampling = {entry[0]: (entry[1] >> 4, entry[1] & 15) for entry in entries}
    h_max = max(h for h, _ in sampling.values())
    v_max = max(v for _, v in sampling.values())
    if not h_max or not v_max or any(not h or not v for h, v in sampling.values()):
        return None
    mcu_columns, mcu_rows = math.ceil(width / (8 * h_max)), math.ceil(height / (8 * v_max))
    return {
        component: {
            "mcu_blocks": h * v * mcu_columns * mcu_rows,  # in an interleaved scan
            "blocks": math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8),
        }
        for component, (h, v) in sampling.items()
    }


def _shortest_codes(segment: bytes) -> dict[tuple[int, int], int]:
    """(class, id) -> the length in bits of the shortest code of each Huffman table in a DHT segment."""
    tables, offset = {}, 0
    while offset + 17 <= len(segment):
        counts = segment[offset + 1 : offset + 17]
        lengths = [bits for bits, count in enumerate(counts, start=1) if count]
        tables[(segment[offset] >> 4, segment[offset] & 15)] = lengths[0] if lengths else 1
        offset += 17 + sum(counts)
    return tables


def _scan_problem(frame, components, shortest, done, header: bytes, bits: int) -> tuple[str | None, int]:
    """(why one scan cannot hold its blocks in `bits` or None, the blocks it passes over); records the coefficients
    it completes in `done`."""
    count = header[0] if header else 0
    if len(header) < 1 + 2 * count + 3:
        return None, 0  # a malformed scan header libjpeg will refuse on its own
    selectors = [(header[1 + 2 * i], header[2 + 2 * i]) for i in range(count)]
    first, last, approximation = header[1 + 2 * count], header[2 + 2 * count], header[3 + 2 * count]
    successive_high, successive_low = approximation >> 4, approximation & 15
    needed = scanned = 0
    for component, tables in selectors:
        if component not in components:
            return None, 0
        blocks = components[component]["mcu_blocks" if count > 1 else "blocks"]
        scanned += blocks
        dc_bits = shortest.get((0, tables >> 4), 1)
        ac_bits = shortest.get((1, tables & 15), 1)
        if frame in _SEQUENTIAL_HUFFMAN:
            needed += blocks * (dc_bits + ac_bits)  # a DC code and at least one AC code (or end of block)
            done[component].update(range(_COEFFICIENTS))
        elif frame == _PROGRESSIVE_HUFFMAN:
            if first == 0:
                needed += blocks * (dc_bits if successive_high == 0 else 1)
            # AC scans may skip runs of empty blocks with one code: no bound from them.
            if successive_low == 0:
                done[component].update(range(first, min(last, _COEFFICIENTS - 1) + 1))
    if bits < needed:
        return f"the JPEG's scan data is {bits // 8} bytes, too short for the {needed // 8} its blocks need at least", 0
    return None, scanned
