"""The answers drawn from a mask: the palette PNG of class indices, the overlay of class colours on the image, and
the cutout (the image with the background transparent).

Both work in Pillow's C code, zlib or row bands, so a 40-megapixel mask or image needs no full-size float temporary.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from segapp.imaging import BAND_ROWS, PNG_SIGNATURE


def palette_bytes(palette) -> bytes:
    """A 768-byte PNG palette with `palette`'s class colours (a model card's, one per class) first and black after."""
    flat = bytes(channel for colour in palette for channel in colour)
    return flat + bytes(768 - len(flat))


def mask_to_png(mask: np.ndarray, palette, compress_level: int = 1) -> bytes:
    """Encode a uint8 HxW class mask as a palette PNG: pixel value = class index, the model's `palette` (one
    [red, green, blue] per class, as its card gives them) for viewing.

    Every value must be below len(palette). The PNG has as many bits per pixel as the palette needs (2 for up to
    four classes) and unfiltered rows deflated with zlib's run-length strategy: masks are long runs of few values,
    so this is smaller than Pillow's PNG encoder at level 1 and several times faster, as Pillow tries five
    filters on every row (see docs/benchmarks.md).
    """
    height, width = mask.shape
    colours = len(palette)
    bits = next(bits for bits in (1, 2, 4, 8) if colours <= 1 << bits)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    packed = mask if bits == 8 else Image.fromarray(mask, "P").tobytes("raw", f"P;{bits}")
    rows = np.empty((height, (width * bits + 7) // 8 + 1), dtype=np.uint8)
    rows[:, 0] = 0  # each row's filter: none
    rows[:, 1:] = np.frombuffer(packed, dtype=np.uint8).reshape(height, -1)
    compressor = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    header = struct.pack(">IIBBBBB", width, height, bits, 3, 0, 0, 0)  # colour type 3: palette
    return b"".join((
        PNG_SIGNATURE,
        _png_chunk(b"IHDR", header),
        _png_chunk(b"PLTE", palette_bytes(palette)[: 3 * colours]),
        _png_chunk(b"IDAT", compressor.compress(rows) + compressor.flush()),
        _png_chunk(b"IEND", b""),
    ))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def overlay(image: Image.Image, mask: np.ndarray, palette, alpha: float = 0.5) -> Image.Image:
    """`image` (RGB) with each pixel's class colour blended on it, in place; returns `image`.

    `mask` must match the image's size. Blends in row bands with Pillow's C code: a float copy of a 40-megapixel
    image would be 480 MB per array (1.7 GB peak before this).
    """
    width, height = image.size
    if mask.shape != (height, width):
        raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
    colours = palette_bytes(palette)
    for top in range(0, height, BAND_ROWS):
        box = (0, top, width, min(top + BAND_ROWS, height))
        band = Image.fromarray(np.ascontiguousarray(mask[top : box[3]], dtype=np.uint8), "P")
        band.putpalette(colours)
        image.paste(Image.blend(image.crop(box), band.convert("RGB"), alpha), box)
    return image


def overlay_to_jpeg(image: Image.Image | np.ndarray, mask: np.ndarray, palette, quality: int = 85) -> bytes:
    """`overlay` encoded as a JPEG. An image given as an RGB array is copied first; a Pillow image is blended
    in place."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    out = io.BytesIO()
    overlay(image, mask, palette).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def cutout_png(image: Image.Image, mask: np.ndarray, foreground: tuple[int, ...]) -> bytes:
    """The image as an RGBA PNG, opaque where the mask holds one of the `foreground` classes, transparent elsewhere
    (background removal). The transparent pixels keep their colour: zero them and the PNG is smaller, but an editor
    could no longer feather the edge."""
    alpha = np.zeros(mask.shape, np.uint8)
    for start in range(0, mask.shape[0], BAND_ROWS):
        band = mask[start : start + BAND_ROWS]
        alpha[start : start + BAND_ROWS] = np.isin(band, foreground) * np.uint8(255)
    rgba = (image if isinstance(image, Image.Image) else Image.fromarray(image, "RGB")).convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out = io.BytesIO()
    rgba.save(out, "PNG", compress_level=1)
    return out.getvalue()
