"""decode_image refuses hostile bytes with typed errors and turns every kind of image into RGB; masks encode."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from segapp import imaging
from segapp.imaging import (
    MAX_SIDE,
    DecodeBudgetError,
    EmptyImageError,
    ImageTooLargeError,
    UndecodableImageError,
    UnsupportedImageFormatError,
    decode_image,
    image_size,
)
from tests import hostile

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
    assert "400000000 pixels" in str(caught.value)
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


# --- truncated data, sizes an overlay cannot have, Pillow's guard, segapp's own bugs ------------------------


def noisy(width=400, height=300) -> Image.Image:
    rng = np.random.default_rng(width + height)
    return Image.fromarray(np.clip(gradient(width, height) + rng.integers(-30, 30, (height, width, 3)), 0, 255)
                           .astype(np.uint8))


def test_jpeg_cut_short_with_a_new_end_marker_is_refused_before_decoding():
    """libjpeg fills the blocks a cut scan lacks with grey and says nothing: 27 KB could buy a 36 MP decode."""
    data = encode(noisy(6000, 6000), "JPEG", quality=80)
    with pytest.raises(UndecodableImageError, match="too short"):
        decode_image(data[:27_000] + b"\xff\xd9", LIMIT)


def test_progressive_jpeg_cut_after_a_scan_is_refused():
    data = encode(noisy(), "JPEG", progressive=True)
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    with pytest.raises(UndecodableImageError, match="component"):
        decode_image(data[:second_scan] + b"\xff\xd9", LIMIT)


def test_jpeg_header_claiming_a_larger_frame_than_its_scan_is_refused():
    data = bytearray(encode(noisy(), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = (6000).to_bytes(2, "big") * 2  # height, width
    with pytest.raises(UndecodableImageError, match="too short"):
        decode_image(bytes(data), LIMIT)


@pytest.mark.parametrize("mode, options", [
    ("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"optimize": True}), ("RGB", {"subsampling": 0}),
    ("RGB", {"quality": 5}), ("RGB", {"quality": 100, "progressive": True}), ("L", {}), ("L", {"progressive": True}),
    ("CMYK", {}),
])
def test_whole_jpegs_of_every_kind_decode(mode, options):
    decoded = decode_image(encode(noisy().convert(mode), "JPEG", **options), LIMIT)
    assert (decoded.width, decoded.height) == (400, 300)


def test_flat_jpeg_of_many_pixels_and_few_bytes_decodes():
    data = encode(Image.new("L", (4000, 3000), 0), "JPEG", quality=1)
    assert len(data) < 200_000
    assert decode_image(data, LIMIT, draft_size=128).width == 4000


@pytest.mark.parametrize("fmt, mode", [
    ("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"),
])
@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9])
def test_truncated_file_of_each_format_is_refused(fmt, mode, kept):
    data = encode(noisy(200, 150).convert(mode), fmt)
    with pytest.raises(UndecodableImageError):
        decode_image(data[: int(len(data) * kept)], LIMIT)


@pytest.mark.parametrize("fmt, mode", [
    ("TGA", "RGB"), ("PCX", "RGB"), ("ICO", "RGBA"), ("JPEG2000", "RGB"), ("PPM", "RGB"), ("SGI", "RGB"),
    ("QOI", "RGBA"), ("DDS", "RGB"), ("AVIF", "RGB"),
])
def test_formats_not_taken_are_refused_by_name(fmt, mode):
    data = encode(noisy(200, 150).convert(mode), fmt)
    with pytest.raises(UnsupportedImageFormatError, match=f"{fmt} images are not accepted") as caught:
        decode_image(data, LIMIT)
    assert caught.value.code == "unsupported_image_format"
    with pytest.raises((UnsupportedImageFormatError, UndecodableImageError)):  # a header cut short names nothing
        decode_image(data[: len(data) // 2], LIMIT)


@pytest.mark.parametrize("size", [(70_000, 2), (2, 70_000), (40_000_000, 1)])
def test_side_over_the_jpeg_limit_is_refused_from_the_header(size):
    data = png_bomb(*size)  # a few kilobytes: refused from its header
    with pytest.raises(ImageTooLargeError, match=f"{size[0]}x{size[1]}; a side may be at most 65500") as caught:
        decode_image(data, LIMIT)
    assert caught.value.code == "image_too_large"
    assert decode_image(encode(Image.new("L", (MAX_SIDE, 2)), "PNG"), LIMIT).width == MAX_SIDE


def test_gif_frame_larger_than_its_screen_is_refused():
    """A GIF's screen says 16 x 16; its frame is 200 x 200 (Pillow grows the image to hold it)."""
    gif = bytearray(encode(Image.new("P", (200, 200), 1), "GIF"))
    gif[6:10] = struct.pack("<HH", 16, 16)
    with pytest.raises(ImageTooLargeError):
        decode_image(bytes(gif), 10_000)


def test_pillow_keeps_its_decompression_bomb_guard():
    """segapp checks its own limit in decode_image; every other Pillow use in the process keeps Pillow's."""
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_bomb()))


class BuggyImageFile(ImageFile.ImageFile):
    """A format whose decoder has a bug (a TypeError), as segapp's own code might."""

    format = "BUGGY"

    def _open(self):
        if self.fp.read(5) != b"BUGGY":
            raise SyntaxError("not BUGGY")
        self._mode, self._size = "RGB", (4, 4)
        self.tile = []

    def load(self):
        raise TypeError("a bug, not a corrupt image")


@pytest.fixture
def buggy_format(monkeypatch):
    Image.register_open(BuggyImageFile.format, BuggyImageFile, lambda prefix: prefix[:5] == b"BUGGY")
    monkeypatch.setattr(imaging, "ACCEPTED_FORMATS", (*imaging.ACCEPTED_FORMATS, BuggyImageFile.format))
    yield
    Image.OPEN.pop(BuggyImageFile.format)
    Image.ID.remove(BuggyImageFile.format)


def test_a_bug_is_not_reported_as_a_corrupt_image(buggy_format):
    with pytest.raises(TypeError, match="a bug"):
        decode_image(b"BUGGY and more", LIMIT)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "LA", "PA", "RGBA", "1", "CMYK"])
def test_every_mode_becomes_rgb_of_its_size(mode):
    image = Image.new(mode, (300, 700), 0)
    decoded = decode_image(encode(image, "TIFF"), LIMIT)
    assert decoded.image.mode == "RGB" and decoded.image.size == (300, 700)


def test_float_and_32_bit_images_scale_to_eight_bits():
    for image, expected in ((Image.fromarray(np.full((5, 4), 300.0, np.float32)), 255),
                            (Image.fromarray(np.full((5, 4), 1000, np.int32)), 1000 * 255 // 65535),
                            (Image.fromarray(np.full((5, 4), 200, np.int32)), 200)):
        assert decode_image(encode(image, "TIFF"), LIMIT).pixels[0, 0].tolist() == [expected] * 3


# --- budgets: what a decode may cost, decided from the header and enforced while it runs ------------------------


def cpu_seconds_of(call) -> tuple[float, BaseException | None]:
    started = time.thread_time()
    try:
        call()
    except Exception as error:  # the error is part of what the caller asserts
        return time.thread_time() - started, error
    return time.thread_time() - started, None


@pytest.mark.parametrize("repeats", [100, 300, 1000])
def test_progressive_jpeg_of_repeated_scans_is_refused_from_its_markers(repeats):
    """100 copies of a refinement scan were 2.9 s of decoding, 1000 were over harakiri's 30 s: refused unread."""
    seconds, error = cpu_seconds_of(lambda: decode_image(hostile.repeated_scan_jpeg(repeats), LIMIT, draft_size=128))
    assert isinstance(error, DecodeBudgetError) and error.code == "decode_budget_exceeded", error
    assert "blocks" in str(error) and seconds < 0.5


def test_progressive_jpeg_within_the_budget_decodes():
    decoded = decode_image(hostile.repeated_scan_jpeg(1), LIMIT, draft_size=128)
    assert (decoded.width, decoded.height) == (6000, 6000)


def test_jpeg_of_millions_of_comments_is_refused_at_once():
    seconds, error = cpu_seconds_of(lambda: decode_image(hostile.comment_flood_jpeg(2_600_000), LIMIT))
    assert isinstance(error, UndecodableImageError) and "marker segments" in str(error), error
    assert seconds < 0.5  # 4.5 s in Pillow's marker loop before


def test_png_of_a_million_chunks_is_refused_at_once():
    """800,000 empty PNG chunks were 2.5 s of Pillow's chunk loop."""
    seconds, error = cpu_seconds_of(lambda: decode_image(hostile.chunk_flood_png(800_000), LIMIT))
    assert isinstance(error, UndecodableImageError) and "more than 16384 chunks" in str(error), error
    assert seconds < 0.5


def test_decode_past_its_cpu_budget_is_stopped():
    """16,000 empty chunks pass the chunk limit and cost Pillow some 40 ms: a budget of 10 ms stops them."""
    seconds, error = cpu_seconds_of(lambda: decode_image(hostile.chunk_flood_png(16_000), LIMIT, cpu_seconds=0.01))
    assert isinstance(error, DecodeBudgetError) and "CPU time budget of 0.01 s" in str(error), error
    assert decode_image(hostile.chunk_flood_png(16_000), LIMIT).width == 64


def test_webp_whose_decoding_needs_more_memory_than_the_budget_is_refused_from_its_header():
    data = hostile.tiny_lossless_webp()  # 1.6 KB
    with pytest.raises(DecodeBudgetError, match=r"WEBP of 16383x2441 .* over the budget of 288 MiB"):
        decode_image(data, LIMIT)
    assert decode_image(hostile.tiny_lossless_webp(3000, 2000), LIMIT).width == 3000


@pytest.mark.parametrize("fmt, mode, size", [("PNG", "RGB", (7300, 5440)), ("JPEG", "RGB", (7300, 5440))])
def test_forty_megapixel_photographs_are_within_the_default_budgets(fmt, mode, size):
    data = hostile.encoded(Image.new(mode, size, (40, 90, 160)), fmt)
    assert decode_image(data, LIMIT).image.size == size


def test_image_size_reads_the_header_with_the_same_refusals():
    assert image_size(encode(Image.new("RGB", (30, 20)), "PNG"), LIMIT) == (30, 20)
    with pytest.raises(ImageTooLargeError):
        image_size(png_bomb(), LIMIT)
    with pytest.raises(UnsupportedImageFormatError):
        image_size(encode(Image.new("RGB", (30, 20)), "PPM"), LIMIT)
