"""The answers drawn from a mask: the palette PNG reads back as the mask, the overlay blends the class colours."""

import io

import numpy as np
import pytest
from PIL import Image

from segapp.masks import mask_to_png, overlay, overlay_to_jpeg

# A three-class model's palette, as its card gives it.
PALETTE = ((230, 25, 75), (0, 0, 0), (255, 225, 25))


def gradient(width=60, height=40) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 128)], axis=-1).astype(np.uint8)


def test_mask_png_keeps_class_indices_and_palette():
    mask = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.open(io.BytesIO(mask_to_png(mask, PALETTE)))
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), mask)
    assert image.getpalette()[:9] == [c for colour in PALETTE for c in colour]


@pytest.mark.parametrize("classes, depth", [(2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)])
def test_mask_png_has_the_bit_depth_its_classes_need_and_reads_back_exactly(classes, depth):
    palette = [(index, 255 - index, index * 7 % 256) for index in range(classes)]
    mask = np.random.default_rng(classes).integers(0, classes, (37, 101)).astype(np.uint8)
    mask[:, 40:90] = classes - 1  # runs, as in a real mask
    data = mask_to_png(mask, palette)
    assert data[24] == depth  # IHDR's bit depth
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P" and image.size == (101, 37)
    assert np.array_equal(np.asarray(image), mask)
    assert image.getpalette() == [c for colour in palette for c in colour]


def test_overlay_is_a_jpeg_of_the_image_size():
    pixels = gradient(50, 30)
    mask = np.zeros((30, 50), dtype=np.uint8)
    image = Image.open(io.BytesIO(overlay_to_jpeg(pixels, mask, PALETTE)))
    assert image.format == "JPEG" and image.size == (50, 30)


def test_overlay_blends_half_way_in_bands_of_a_tall_image():
    pixels = np.full((1000, 3, 3), 100, np.uint8)
    mask = np.zeros((1000, 3), np.uint8)
    mask[600:] = 2
    blended = np.asarray(overlay(Image.fromarray(pixels), mask, PALETTE))
    assert blended[0, 0].tolist() == [(100 + c) // 2 for c in PALETTE[0]]
    assert blended[999, 2].tolist() == [(100 + c) // 2 for c in PALETTE[2]]


def test_overlay_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match="mask"):
        overlay(Image.new("RGB", (4, 4)), np.zeros((3, 4), np.uint8), PALETTE)
