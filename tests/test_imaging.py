"""decode_image refuses hostile bytes with typed errors and turns every kind of image into RGB; masks encode."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from segapp.imaging import (
    PALETTE,
    EmptyImageError,
    ImageTooLargeError,
    UndecodableImageError,
    decode_image,
    mask_to_png,
    overlay_to_jpeg,
)

LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def gradient(width=60, height=40) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 128)], axis=-1).astype(np.uint8)


def png_bomb(width=20000, height=20000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height zeros: a few kilobytes on disk, 400 megapixels decoded."""
    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_empty_body_is_a_typed_error():
    with pytest.raises(EmptyImageError) as caught:
        decode_image(b"", LIMIT)
    assert caught.value.code == "empty_body"


def test_random_bytes_are_undecodable():
    with pytest.raises(UndecodableImageError):
        decode_image(np.random.default_rng(0).bytes(5000), LIMIT)


def test_truncated_jpeg_is_undecodable():
    data = encode(Image.fromarray(gradient(400, 300)), "JPEG")
    with pytest.raises(UndecodableImageError):
        decode_image(data[: len(data) // 2], LIMIT)


def test_png_bomb_is_refused_from_its_header_before_decoding():
    bomb = png_bomb()
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError) as caught:
        decode_image(bomb, LIMIT)
    assert "20000x20000" in str(caught.value)
    assert caught.value.code == "image_too_large"


def test_one_pixel_image_decodes():
    decoded = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), LIMIT)
    assert decoded.pixels.shape == (1, 1, 3)
    assert decoded.pixels[0, 0].tolist() == [10, 20, 30]


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG", quality=95)
    decoded = decode_image(data, LIMIT)
    assert decoded.pixels.shape == (24, 32, 3)
    red, green, blue = decoded.pixels[12, 16].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    array = np.full((10, 20), 65535 // 2, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(array), "PNG"), LIMIT)
    assert decoded.pixels.shape == (10, 20, 3)
    assert 120 <= int(decoded.pixels[0, 0, 0]) <= 135


def test_grayscale_becomes_three_equal_channels():
    decoded = decode_image(encode(Image.new("L", (8, 6), 77), "PNG"), LIMIT)
    assert decoded.pixels.shape == (6, 8, 3)
    assert decoded.pixels[0, 0].tolist() == [77, 77, 77]


def test_rgba_is_composed_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"), LIMIT)
    assert decoded.pixels[0, 0].tolist() == [255, 255, 255]


def test_palette_image_becomes_rgb():
    image = Image.new("P", (5, 5), 1)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    decoded = decode_image(encode(image, "PNG"), LIMIT)
    assert decoded.pixels[2, 2].tolist() == [0, 200, 0]


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    decoded = decode_image(data, LIMIT)
    red, _, blue = decoded.pixels[8, 8].tolist()
    assert red > 200 and blue < 50


def test_exif_orientation_6_swaps_width_and_height():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(gradient(60, 40)), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, LIMIT)
    assert (decoded.width, decoded.height) == (40, 60)
    assert decoded.pixels.shape == (60, 40, 3)


def test_draft_decoding_shrinks_large_jpeg_but_keeps_full_size():
    data = encode(Image.fromarray(gradient(1600, 1200)), "JPEG")
    decoded = decode_image(data, LIMIT, draft_size=256)
    assert (decoded.width, decoded.height) == (1600, 1200)
    assert 256 <= decoded.pixels.shape[0] < 1200


def test_webp_bmp_tiff_decode():
    pixels = gradient(30, 20)
    for fmt in ("WEBP", "BMP", "TIFF"):
        decoded = decode_image(encode(Image.fromarray(pixels), fmt), LIMIT)
        assert decoded.pixels.shape == (20, 30, 3), fmt


def test_mask_png_keeps_class_indices_and_palette():
    mask = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.open(io.BytesIO(mask_to_png(mask)))
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), mask)
    assert image.getpalette()[:9] == [c for colour in PALETTE for c in colour]


def test_overlay_is_a_jpeg_of_the_image_size():
    pixels = gradient(50, 30)
    mask = np.zeros((30, 50), dtype=np.uint8)
    image = Image.open(io.BytesIO(overlay_to_jpeg(pixels, mask)))
    assert image.format == "JPEG" and image.size == (50, 30)
