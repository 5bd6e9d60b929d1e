"""Small files that cost a decoder far more than their size: what the budgets in segapp.imaging refuse.

Shared by the unit tests (tests/test_imaging.py) and the tests through nginx (tests/integration/test_budgets.py).
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def repeated_scan_jpeg(repeats: int, side: int = 6000) -> bytes:
    """A grey progressive JPEG of side x side whose last refinement scan is repeated: each copy is some 56 bytes
    and a pass of the decoder over every block (30 ms at 6000 x 6000)."""
    data = encoded(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


def comment_flood_jpeg(comments: int) -> bytes:
    """A small JPEG with `comments` empty COM segments before its frame: each one a turn of a parser's loop."""
    data = encoded(Image.new("RGB", (64, 48), (90, 120, 30)), "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * comments + data[2:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def chunk_flood_png(chunks: int) -> bytes:
    """A small PNG with `chunks` empty ancillary chunks before its data: each one a turn of Pillow's chunk loop."""
    data = encoded(Image.new("RGB", (64, 48), (90, 120, 30)), "PNG")
    at = data.index(b"IDAT") - 4
    return data[:at] + png_chunk(b"abCd", b"") * chunks + data[at:]


def tiny_lossless_webp(width: int = 16383, height: int = 2441) -> bytes:
    """A flat lossless WebP: some 1.6 KB for 40 megapixels, which Pillow's decoder holds at 17 bytes a pixel."""
    return encoded(Image.new("RGB", (width, height), (20, 40, 60)), "WEBP", lossless=True)


def tiny_jpeg2000(side: int = 6324) -> bytes:
    """A flat JPEG 2000 of side x side in a few hundred bytes (805 MB to decode at 6324)."""
    return encoded(Image.new("L", (side, side), 0), "JPEG2000", quality_mode="rates", quality_layers=[400])
