"""Image decoding, mask encoding and overlays, with Pillow.

Everything a client sends passes through `decode_image`, which refuses hostile input with a typed
`ImageError` before Pillow spends memory or time on it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Trimap classes with the Oxford-IIIT Pet meaning, and the colours a viewer sees them in.
CLASS_NAMES = ("foreground", "background", "border")
PALETTE = ((230, 25, 75), (0, 0, 0), (255, 225, 25))

# EXIF orientations that rotate by 90 or 270 degrees, so width and height trade places.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112

# decode_image checks every image's pixel count against the service's own limit before decoding it; Pillow's
# process-wide check (a warning above 89 megapixels, an error above 179) would only fire first with a vaguer
# message, or warn for a limit set higher on purpose.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The bytes are not an image this service can segment. `code` names the reason for clients."""

    code = "invalid_image"


class EmptyImageError(ImageError):
    code = "empty_body"


class UndecodableImageError(ImageError):
    code = "undecodable_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


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


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB: EXIF orientation applied, first frame of an animation, any mode.

    Refuses an image of more than `max_pixels` from its header, before decoding it (a decompression bomb is
    small on disk). With `draft_size`, a JPEG far larger than that is decoded at a reduced scale that still
    covers `draft_size` pixels on its short side, which costs a fraction of a full decode.
    """
    if not data:
        raise EmptyImageError("the request body is empty; send the bytes of an image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is over the limit of {max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UndecodableImageError("the body is not an image in a supported format") from exc

    width, height = image.size
    if width < 1 or height < 1:
        raise UndecodableImageError("the image has no pixels")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")

    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if draft_size and image.format == "JPEG" and min(width, height) > 2 * draft_size:
            # Draft picks the largest 1/2, 1/4 or 1/8 scale that is still at least the requested size.
            scale = draft_size / min(width, height)
            image.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
        image.seek(0)
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is over the limit of {max_pixels} pixels") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        # Truncated or corrupt data surfaces as any of these, depending on the codec.
        raise UndecodableImageError("the image data is truncated or corrupt") from exc

    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return DecodedImage(image=image, width=width, height=height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels are composed on white, 16-bit data scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.uint32)
        peak = 65535 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255
        gray = (array * 255 // peak).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float32))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def palette_bytes(palette=PALETTE) -> bytes:
    """A 768-byte PNG palette with the class colours first and black after."""
    flat = bytes(channel for colour in palette for channel in colour)
    return flat + bytes(768 - len(flat))


def mask_to_png(mask: np.ndarray, palette=PALETTE, compress_level: int = 1) -> bytes:
    """Encode a uint8 HxW class mask as a palette PNG: pixel value = class index, palette colours for viewing.

    Level 1 compression: masks are runs of few values, so it is nearly as small as level 6 at a fraction
    of the time (see docs/benchmarks.md).
    """
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "P")
    image.putpalette(palette_bytes(palette))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def overlay(pixels: np.ndarray, mask: np.ndarray, palette=PALETTE, alpha: float = 0.5) -> Image.Image:
    """The image with each pixel's class colour blended on it; `mask` must match the image's size."""
    colours = np.asarray(palette, dtype=np.uint8)[mask]
    blended = pixels.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def overlay_to_jpeg(pixels: np.ndarray, mask: np.ndarray, palette=PALETTE, quality: int = 85) -> bytes:
    """`overlay` encoded as a JPEG."""
    out = io.BytesIO()
    overlay(pixels, mask, palette).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def resize_pixels(pixels: np.ndarray | Image.Image, width: int, height: int) -> np.ndarray:
    """Resize an RGB image or array with area-aware bilinear filtering, as the training data was resized."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels, "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image)
