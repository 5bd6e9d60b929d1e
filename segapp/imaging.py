"""Image decoding with Pillow, within budgets; the resize to the network's input.

Everything a client sends passes through `decode_image`, which refuses hostile input with a typed
`ImageError` before Pillow spends memory or time on it.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from segapp.jpeg import inspect_jpeg

# EXIF orientations that rotate by 90 or 270 degrees, so width and height trade places.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112

# The longest side of any image: a JPEG's limit (libjpeg refuses more), so every image can be answered as an overlay
# too. It also bounds what one side costs: Pillow's resize to the network's input keeps 16 bytes of coefficients
# per pixel of the longer side (a 40,000,000 x 1 PNG, a 116 KB body, would take 640 MB), and a tall image 8 bytes
# of row pointers per row.
MAX_SIDE = 65_500

# Rows per band where a whole image is worked on in pieces: 256 rows of a 7,300-pixel-wide image are 7 MB as
# RGB, so a band's temporaries stay small next to the image itself.
BAND_ROWS = 256

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Encoders write image data in chunks of 8 KB (libpng) or more: a 10 MB PNG has some 1,300. Each chunk is a turn
# of Pillow's chunk loop, in Python (800,000 empty ones were 2.5 s of a worker).
MAX_PNG_CHUNKS = 16_384

# The formats taken, by Pillow's names (its JPEG reader also opens MPO, a JPEG with more frames): each one's decoding
# cost is known from its header (docs/api.md, "Budgets"). Pillow reads more, but not all within a bound: a 772-byte
# JPEG 2000 took 805 MB to decode and a 1,263-byte AVIF 420 MB, more than their headers tell; those and the rest
# are refused (415).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
Image.init()  # registers every plugin: Image.open(formats=...) knows only registered ones
# What one decode may hold, and the CPU time it may take, by default (Settings: SEGAPP_MAX_DECODE_BYTES and
# SEGAPP_DECODE_CPU_SECONDS): the costliest 40-megapixel photograph, a progressive JPEG answered as an overlay,
# holds an estimated 265 MiB (bench/decode_cost.py measures it), and decodes in under a second.
DEFAULT_DECODE_BYTES = 288 * 1024 * 1024
DEFAULT_DECODE_CPU_SECONDS = 2.0
# Bytes per pixel a decoder holds beyond the image in its own mode and the RGB result: Pillow's WebP decoder keeps
# libwebp's RGBA frame and an RGBA canvas, 17 bytes a pixel in all for an RGB WebP (a 1.6 KB lossless WebP of
# 16383 x 2441 peaked at 679 MB; bench/decode_cost.py: 606-646 MB at 40 megapixels, lossy or lossless).
_DECODER_BYTES_PER_PIXEL = {"WEBP": 14}
# What every decode holds besides (the codecs' and Pillow's working buffers): up to 1 byte a pixel over the rest at
# 40 megapixels, for every format (bench/decode_cost.py prints the estimate beside the measured peak).
_WORKING_BYTES_PER_PIXEL = 1
# libjpeg's work per block of every scan, measured on this project's machines (2 vCPUs, AMD EPYC): 35-39 ns on a quiet
# machine, 48-53 ns on a busy one (bench/decode_cost.py); above both, so that an estimate errs on the budget's side.
_SECONDS_PER_BLOCK_SCAN = 60e-9
# How often a decode checks its CPU budget as Pillow reads the image (_BudgetedReader): at every read of this many
# bytes or more (a decoder asks for a block at a time: 64 KB), and at every 32nd read smaller than that (a parser's
# markers and chunk headers: some 38 reads for a photo's JPEG, a few a PNG chunk).
_CHECKED_READ_BYTES = 4096
_SMALL_READS_PER_CHECK = 32

# What Pillow's decoders raise for bytes they cannot decode (truncated, corrupt, or an unsupported variant):
# OSError (with UnidentifiedImageError), SyntaxError from format plugins, ValueError from some decoders' setup
# and EOFError when a frame is missing. Its Python plugins also trip over corrupt fields with TypeError,
# IndexError or struct.error (a fuzzed TIFF: "'float' object cannot be interpreted as an integer"), so those
# count as the image's fault only when raised inside Pillow: raised in segapp's code they are bugs, and a 500.
_CODEC_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class ImageError(ValueError):
    """The bytes are not an image this service can segment. `code` names the reason for clients."""

    code = "invalid_image"


class EmptyImageError(ImageError):
    code = "empty_body"


class UndecodableImageError(ImageError):
    code = "undecodable_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class DecodeBudgetError(ImageTooLargeError):
    """Decoding the image would take, or took, more memory or CPU time than one request may spend."""

    code = "decode_budget_exceeded"


class UnsupportedImageFormatError(ImageError):
    code = "unsupported_image_format"


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image and its full size after EXIF orientation.

    With `draft_size` the image may be smaller than `width` x `height` (JPEG draft decoding); masks are always
    produced at `width` x `height`.
    """

    image: Image.Image
    width: int
    height: int

    @property
    def pixels(self) -> np.ndarray:
        """The RGB pixels as a uint8 H x W x 3 array."""
        return np.asarray(self.image)


def decode_image(
    data: bytes, max_pixels: int, draft_size: int | None = None,
    max_bytes: int = DEFAULT_DECODE_BYTES, cpu_seconds: float = DEFAULT_DECODE_CPU_SECONDS,
) -> DecodedImage:
    """Decode image bytes to RGB: EXIF orientation applied, first frame of an animation, any mode.

    Refuses, from its header and before decoding it: a format not in ACCEPTED_FORMATS; an image of more than
    `max_pixels` (a decompression bomb is small on disk) or a side longer than MAX_SIDE; a decode whose memory,
    estimated from the format, mode and size, is over `max_bytes`; a JPEG whose data cannot hold the frame its header
    declares, or whose scans would take more than `cpu_seconds`. Decoding itself stops once it has used `cpu_seconds`
    of this thread's CPU time; truncated or corrupt data is refused while decoding. With `draft_size`, a JPEG far
    larger than that is decoded at a reduced scale that still covers `draft_size` pixels on its short side, which
    costs a fraction of a full decode.
    """
    with _pillow_warnings():
        image, jpeg = _open(data, cpu_seconds, max_pixels)
        width, height = image.size
        _check_size(width, height, max_pixels)

        with _pillow_errors(max_pixels, "the image data is truncated or corrupt"):
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            if draft_size and image.format == "JPEG" and min(width, height) > 2 * draft_size:
                # Draft picks the largest 1/2, 1/4 or 1/8 scale that is still at least the requested size.
                scale = draft_size / min(width, height)
                image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            _check_memory(image, jpeg, max_bytes)
            image.seek(0)
            image.load()
            if image.size != (width, height) and image.format not in ("JPEG", "MPO"):
                # A frame or icon larger than its header said (a draft JPEG is smaller on purpose).
                _check_size(*image.size, max_pixels)
            # In place: a copy would double the memory of a 40-megapixel image.
            ImageOps.exif_transpose(image, in_place=True)
            image = _to_rgb(image)

    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return DecodedImage(image=image, width=width, height=height)


def image_size(data: bytes, max_pixels: int, cpu_seconds: float = DEFAULT_DECODE_CPU_SECONDS) -> tuple[int, int]:
    """The width and height that an image's header declares, read as `decode_image` reads it and with the same
    refusals (format, pixels, a JPEG's markers), without decoding it: what a batch's images add up to."""
    with _pillow_warnings():
        image, _ = _open(data, cpu_seconds, max_pixels)
    _check_size(*image.size, max_pixels)
    return image.size


@contextlib.contextmanager
def _pillow_warnings():
    """Pillow's own guard stays on for the whole process (Image.MAX_IMAGE_PIXELS: a warning above 89 megapixels,
    an error above 179): besides the header it checks frames and tiles that only decoding reveals (ICO, GIF,
    TIFF). Inside, its warning refuses the image as its error does. Its other warnings describe the client's bytes
    ("Image was not the expected size"), which are answered, not logged."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _open(data: bytes, cpu_seconds: float, max_pixels: int):
    """(`data` opened by Pillow, its header read, from a reader that stops it past `cpu_seconds` of this thread's
    CPU time; the JPEG's facts from its markers, checked first, or None for another format)."""
    if not data:
        raise EmptyImageError("the request body is empty; send the bytes of an image")
    jpeg = inspect_jpeg(data) if data[:2] == b"\xff\xd8" else None
    if jpeg is not None and jpeg.size is not None:
        _check_size(*jpeg.size, max_pixels)  # a frame over the limits is that, whatever else is wrong with it
    if jpeg is not None and jpeg.problem:
        raise UndecodableImageError(f"the image data is truncated or corrupt: {jpeg.problem}")
    if jpeg is not None and jpeg.block_scans * _SECONDS_PER_BLOCK_SCAN > cpu_seconds:
        raise DecodeBudgetError(
            f"the JPEG's scans pass over {jpeg.block_scans} blocks, about "
            f"{jpeg.block_scans * _SECONDS_PER_BLOCK_SCAN:.1f} s of decoding, over the budget of {cpu_seconds:g} s"
        )
    if data[:8] == PNG_SIGNATURE and (chunks := _png_chunks_over(data, MAX_PNG_CHUNKS)):
        raise UndecodableImageError(f"the PNG has more than {chunks} chunks; a photograph has a few thousand at most")
    source = _BudgetedReader(data, time.thread_time() + cpu_seconds, cpu_seconds)
    with _pillow_errors(max_pixels, "the body is not an image in a supported format"):
        try:
            return Image.open(source, formats=ACCEPTED_FORMATS), jpeg
        except UnidentifiedImageError as exc:
            raise _not_accepted(data, cpu_seconds) from exc


@contextlib.contextmanager
def _pillow_errors(max_pixels: int, undecodable: str):
    """Pillow's exceptions inside as segapp's: its bomb guard as ImageTooLargeError, a codec's error (or one raised
    in Pillow's own code) as UndecodableImageError(`undecodable`); ImageErrors and segapp's own bugs pass."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image is over the limit of {max_pixels} pixels: {exc}") from exc
    except ImageError:
        raise
    except Exception as exc:
        if not (isinstance(exc, _CODEC_ERRORS) or _raised_in_pillow(exc)):
            raise
        raise UndecodableImageError(undecodable) from exc


def _png_chunks_over(data: bytes, limit: int) -> int:
    """`limit` when the PNG in `data` has more chunks than that, else 0: the chunk headers are walked, not read."""
    position, chunks = len(PNG_SIGNATURE), 0
    while position + 8 <= len(data):
        chunks += 1
        if chunks > limit:
            return limit
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return 0


class CpuBudget:
    """A budget of this thread's CPU seconds shared by several decodes (the images of a batch)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.thread_time() + seconds

    def left(self) -> float:
        """The seconds left; DecodeBudgetError when none are."""
        left = self.deadline - time.thread_time()
        if left <= 0:
            raise DecodeBudgetError(f"the images took over their CPU time budget of {self.seconds:g} s together")
        return left


class _BudgetedReader(io.BytesIO):
    """The image's bytes as Pillow reads them, piece by piece, in its parsers and decoders: a decoder's read (a block,
    or all that is left) and every _SMALL_READS_PER_CHECK-th small read of a parser first check the thread's CPU
    time, so a decode past its budget stops soon after with DecodeBudgetError.

    Reading the thread's CPU time is a system call (no vDSO clock has it): checking on each of the 38 reads of a
    photo's JPEG header was 39 of a worker's 54 system calls a request. A small read returns at most that many bytes,
    and what a parser or decoder does with them is bounded by them (a marker, a chunk, a compressed run)."""

    def __init__(self, data: bytes, deadline: float, budget: float):
        super().__init__(data)
        self.deadline = deadline
        self.budget = budget
        self.small_reads = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and 0 <= size < _CHECKED_READ_BYTES:
            self.small_reads += 1
            checked = self.small_reads % _SMALL_READS_PER_CHECK == 0
        else:
            checked = True
        if checked and time.thread_time() > self.deadline:
            raise DecodeBudgetError(f"decoding the image took over its CPU time budget of {self.budget:g} s")
        return super().read(size)


def decode_bytes(image: Image.Image, jpeg=None) -> int:
    """An estimate of the memory that decoding `image` (opened, drafted, not loaded) to RGB holds at its peak: the
    image in its own mode, the RGB result, the decoder's own buffers (a progressive JPEG's coefficients)."""
    pixels = image.size[0] * image.size[1]
    try:
        mode = ImageMode.getmode(image.mode)
        stored = len(mode.bands) * np.dtype(mode.typestr).itemsize
    except (KeyError, TypeError):
        stored = 4
    per_pixel = (stored + (0 if image.mode == "RGB" else 3) + _DECODER_BYTES_PER_PIXEL.get(image.format, 0)
                 + _WORKING_BYTES_PER_PIXEL)
    return pixels * per_pixel + (jpeg.coefficient_bytes if jpeg is not None else 0)


def _check_memory(image: Image.Image, jpeg, max_bytes: int) -> None:
    needed = decode_bytes(image, jpeg)
    if needed > max_bytes:
        width, height = image.size
        raise DecodeBudgetError(
            f"decoding this {image.format} of {width}x{height} ({image.mode}) takes about {needed // 2**20} MiB, "
            f"over the budget of {max_bytes // 2**20} MiB; send it smaller or as JPEG or PNG"
        )


def _not_accepted(data: bytes, cpu_seconds: float) -> ImageError:
    """The error for bytes no accepted format's plugin claims: the format's name when Pillow knows it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The header only, within the same budget (every plugin tries its own, as Image.open always did).
            with Image.open(_BudgetedReader(data, time.thread_time() + cpu_seconds, cpu_seconds)) as other:
                name = other.format
    except Exception:
        return UndecodableImageError("the body is not an image in a supported format")
    return UnsupportedImageFormatError(
        f"{name} images are not accepted; send {', '.join(ACCEPTED_FORMATS)}"
    )


def _raised_in_pillow(error: BaseException) -> bool:
    """Whether `error` was raised by Pillow's own code (its innermost frame is in the PIL package)."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and trace.tb_frame.f_globals.get("__name__", "").startswith("PIL.")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise UndecodableImageError("the image has no pixels")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLargeError(f"image is {width}x{height}; a side may be at most {MAX_SIDE} pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels are composed on white, 16-bit and float data scaled to 8 bits.

    Works in Pillow's C code or in row bands, so a 40-megapixel image needs no full-size temporary beyond the
    RGB result.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        peak = 65535 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255
        return _gray_in_bands(image, lambda band: (band.astype(np.uint32) * 255 // peak).astype(np.uint8))
    if image.mode == "F":
        return _gray_in_bands(image, lambda band: np.clip(np.nan_to_num(band), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image)  # alpha-composes the image on white
        return background
    return image.convert("RGB")


def _gray_in_bands(image: Image.Image, to_uint8) -> Image.Image:
    """RGB from a one-channel image whose values `to_uint8` maps, band by band, to 0-255."""
    width, height = image.size
    gray = np.empty((height, width), np.uint8)
    for top in range(0, height, BAND_ROWS):
        bottom = min(top + BAND_ROWS, height)
        gray[top:bottom] = to_uint8(np.asarray(image.crop((0, top, width, bottom))))
    return Image.fromarray(gray, "L").convert("RGB")


def resize_pixels(pixels: np.ndarray | Image.Image, width: int, height: int) -> np.ndarray:
    """Resize an RGB image or array with area-aware bilinear filtering, as the training data was resized."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image)
