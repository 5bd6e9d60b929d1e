"""Training data: synthetic scenes, the Oxford-IIIT Pet folder as downloaded, and plain images/ + masks/ folders.

Each source yields (RGB uint8 HxWx3, trimap uint8 HxW) pairs at their own size; `pipeline` turns any of them into
the same batched tf.data stream at the network's input size; `folder_samples` gives a folder's train, val and test
splits, which never share an image. Images are decoded with `segapp.imaging.decode_image`,
the server's own decoder, so training sees pixels exactly as serving does (EXIF orientation, any mode to RGB).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segapp.imaging import ImageError, decode_image, resize_pixels
from segapp.training import scenes, unet

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_MAX_PIXELS = 100_000_000


class DatasetError(ValueError):
    """A dataset folder is missing, malformed or empty; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: where it came from, and how to load it."""

    name: str
    image_path: Path | None = None
    mask_path: Path | None = None
    mask_offset: int = 0  # subtracted from stored mask values (Oxford's trimaps are 1/2/3)

    def load(self, num_classes: int = len(scenes.CLASS_NAMES)) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 HxWx3, class mask uint8 HxW); a mask value that is not a class 0..num_classes-1 is an error."""
        pixels = decode_image(self.image_path.read_bytes(), _MAX_PIXELS).pixels
        with Image.open(self.mask_path) as mask_image:
            mask = np.asarray(mask_image.convert("L") if mask_image.mode not in ("L", "P") else mask_image)
        mask = mask.astype(np.int16) - self.mask_offset
        if mask.shape != pixels.shape[:2]:
            raise DatasetError(f"{self.mask_path}: mask is {mask.shape[::-1]}, image is {pixels.shape[1::-1]}")
        if mask.min() < 0 or mask.max() >= num_classes:
            raise DatasetError(
                f"{self.mask_path}: mask values must be classes 0-{num_classes - 1} after offset {self.mask_offset}"
            )
        return pixels, mask.astype(np.uint8)


def synthetic(split: str, count: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`count` synthetic scenes of a split ('train', 'val' or 'test'), always the same ones."""
    seed = scenes.SPLIT_SEEDS[split]
    for index in range(count):
        yield scenes.scene(seed, index)


def synthetic_at(split: str, count: int, size: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`count` synthetic scenes of a split resized to `size` square, generated on `workers` processes.

    Returns (N x size x size x 3 uint8, N x size x size uint8); resizing matches `pipeline`
    (area-aware bilinear for images, nearest for masks).
    """
    seed = scenes.SPLIT_SEEDS[split]
    jobs = [(seed, index, size) for index in range(count)]
    if workers > 1 and count > 8:
        with ProcessPoolExecutor(workers) as pool:
            pairs = list(pool.map(_scene_at, jobs, chunksize=16))
    else:
        pairs = [_scene_at(job) for job in jobs]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _scene_at(job: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, index, size = job
    image, mask = scenes.scene(seed, index)
    return resize_pair(image, mask, size)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (bilinear, area-aware) and its mask (nearest) to `size` square."""
    resized = resize_pixels(image, size, size)
    resized_mask = np.asarray(Image.fromarray(mask, "L").resize((size, size), Image.NEAREST))
    return resized, resized_mask


def oxford_pets(root: str | Path, split: str = "trainval") -> list[Sample]:
    """The Oxford-IIIT Pet folder as downloaded: images/*.jpg, annotations/trimaps/*.png, annotations/{split}.txt.

    Trimap values 1/2/3 (pet, background, border) become classes 0/1/2. Images listed in the split file whose
    image or trimap is missing are skipped; an empty result is an error.
    """
    root = Path(root)
    images, trimaps = root / "images", root / "annotations" / "trimaps"
    split_file = root / "annotations" / f"{split}.txt"
    for needed in (images, trimaps, split_file):
        if not needed.exists():
            raise DatasetError(
                f"{root} is not an Oxford-IIIT Pet folder: {needed} is missing "
                "(expected images/, annotations/trimaps/ and annotations/trainval.txt, test.txt)"
            )
    samples = []
    for line in split_file.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        stem = line.split()[0]
        image, trimap = images / f"{stem}.jpg", trimaps / f"{stem}.png"
        if image.exists() and trimap.exists():
            samples.append(Sample(stem, image, trimap, mask_offset=1))
    if not samples:
        raise DatasetError(f"{split_file} lists no image that has both images/<name>.jpg and a trimap")
    return samples


def image_mask_folders(root: str | Path) -> list[Sample]:
    """A folder with images/ and masks/ whose files share stems; mask pixel values are class indices."""
    root = Path(root)
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DatasetError(f"{root} must hold images/ and masks/ folders with matching file names")
    mask_by_stem = {p.stem: p for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    samples = [
        Sample(p.stem, p, mask_by_stem[p.stem])
        for p in sorted(images.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in mask_by_stem
    ]
    if not samples:
        raise DatasetError(f"{root}: no image in images/ has a mask of the same name in masks/")
    return samples


def held_out_bucket(name: str) -> str:
    """The split an image of an images/ + masks/ folder falls in when no split file names it: 'test' for a tenth
    of names, 'val' for another tenth, 'train' for the rest, chosen by the SHA-256 of the name alone."""
    # By name, not by position in the listing: adding or removing images never moves another image between
    # splits, so a model trained on an older copy of the folder is never scored on its own training images.
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 10
    return {0: "test", 1: "val"}.get(bucket, "train")


def split_images_masks(root: str | Path, split: str) -> list[Sample]:
    """The 'train', 'val' or 'test' samples of an images/ + masks/ folder; the three never share an image.

    `test.txt` and `val.txt` beside images/, when present, list the names (file stems, one a line, first word)
    of those splits; an image no split file names falls in a split by `held_out_bucket`, and no image listed in
    a split file is ever in another. An empty split is an error that says how to fill it.
    """
    root = Path(root)
    samples = image_mask_folders(root)
    by_name = {s.name: s for s in samples}
    listed: dict[str, str] = {}
    for held_out in ("test", "val"):
        split_file = root / f"{held_out}.txt"
        if not split_file.exists():
            continue
        for name in _split_file_names(split_file):
            if name not in by_name:
                raise DatasetError(f"{split_file} names {name!r}, which has no image with a mask of that name")
            if listed.setdefault(name, held_out) != held_out:
                raise DatasetError(f"{name!r} is listed in both test.txt and val.txt of {root}")
    chosen = [s for s in samples if (listed.get(s.name) or _unlisted_split(root, s.name)) == split]
    if not chosen:
        raise DatasetError(
            f"{root}: no image falls in the {split} split ({len(samples)} images, a tenth of names each for "
            f"test and val); list the {split} images' names in {root / (split + '.txt')}"
            if split != "train"
            else f"{root}: every image is listed in test.txt or val.txt; none is left to train on"
        )
    return chosen


def _unlisted_split(root: Path, name: str) -> str:
    """An image that no split file lists: held out by its name, except from a split that has a file."""
    bucket = held_out_bucket(name)
    return "train" if bucket != "train" and (root / f"{bucket}.txt").exists() else bucket


def _split_file_names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def folder_samples(root: str | Path, split: str) -> list[Sample]:
    """The 'train', 'val' or 'test' samples of a dataset folder, in whichever layout it has.

    Oxford-IIIT Pet: test is annotations/test.txt; train and val share trainval.txt, every tenth image validating.
    images/ + masks/: `split_images_masks`. No image is in two splits.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}: expected 'train', 'val' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    if (root / "annotations").is_dir():
        if split == "test":
            return oxford_pets(root, "test")
        # Every tenth image validates: deterministic, and spread over the whole list.
        trainval = oxford_pets(root, "trainval")
        return [s for i, s in enumerate(trainval) if (i % 10 == 0) == (split == "val")]
    return split_images_masks(root, split)


def load_samples(samples: list[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Load and resize every sample; a sample that fails to load is reported with its name."""
    images, masks = [], []
    for sample in samples:
        try:
            image, mask = sample.load()
        except (ImageError, OSError) as exc:
            raise DatasetError(f"{sample.image_path}: {exc}") from exc
        image, mask = resize_pair(image, mask, size)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def pipeline(
    images: np.ndarray,
    masks: np.ndarray,
    batch_size: int,
    training: bool,
    seed: int = 0,
    border_weight: float | None = None,
):
    """The tf.data stream for training or validation: float images normalised as the card says (`unet.MEAN`,
    `unet.STD`), flips when training, batched.

    With `border_weight`, each element also carries per-pixel loss weights derived from its (flipped) mask:
    border pixels count `border_weight` times, the others once.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, masks))
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)

    def prepare(image, mask):
        image = (tf.cast(image, tf.float32) - unet.MEAN) / unet.STD
        mask = mask[..., None]
        if training:
            flip = tf.random.uniform(()) < 0.5
            image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
            mask = tf.cond(flip, lambda: tf.image.flip_left_right(mask), lambda: mask)
        if border_weight is None:
            return image, mask
        weight = tf.where(mask == scenes.BORDER, tf.constant(border_weight, tf.float32), tf.constant(1.0))
        return image, mask, weight

    return dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
