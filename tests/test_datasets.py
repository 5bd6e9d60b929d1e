"""Training data: synthetic scenes are deterministic and labelled; folder readers read real layouts or say why not."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from segapp.training import datasets, scenes


def test_scene_is_the_same_for_the_same_seed_and_index():
    first_image, first_mask = scenes.scene(1, 7)
    again_image, again_mask = scenes.scene(1, 7)
    assert np.array_equal(first_image, again_image) and np.array_equal(first_mask, again_mask)
    other_image, _ = scenes.scene(1, 8)
    assert first_image.shape != other_image.shape or not np.array_equal(first_image, other_image)


def test_splits_never_share_a_scene():
    # Every scene of the first 60 of each split, compared with every scene of the others: a seeding that let
    # streams overlap (seed + index, or two splits on one seed) would repeat a scene across splits.
    seen = {}
    for split, seed in scenes.SPLIT_SEEDS.items():
        for index in range(60):
            image, mask = scenes.scene(seed, index, size=(24, 24))
            key = hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()
            assert seen.setdefault(key, (split, index)) == (split, index), f"{split} {index} repeats {seen[key]}"


def test_scenes_have_all_three_classes_and_photo_like_sizes():
    for index in range(12):
        image, mask = scenes.scene(scenes.SPLIT_SEEDS["train"], index)
        assert image.dtype == np.uint8 and image.shape[:2] == mask.shape
        assert 96 <= min(mask.shape) <= 640 and max(mask.shape) <= 640
        assert set(np.unique(mask).tolist()) == {0, 1, 2}, f"scene {index}"


def test_border_band_separates_foreground_from_background():
    _, mask = scenes.scene(1, 3)
    fg = mask == scenes.FOREGROUND
    bg = mask == scenes.BACKGROUND
    # No foreground pixel touches a background pixel horizontally: a border pixel always lies between.
    assert not np.any(fg[:, :-1] & bg[:, 1:]) and not np.any(bg[:, :-1] & fg[:, 1:])


def make_oxford(root, names, missing_trimap=()):
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    for name in names:
        Image.new("RGB", (40, 30), (100, 50, 25)).save(root / "images" / f"{name}.jpg")
        if name not in missing_trimap:
            trimap = np.full((30, 40), 2, dtype=np.uint8)
            trimap[10:20, 10:30] = 1
            trimap[9, 10:30] = 3
            Image.fromarray(trimap, "L").save(root / "annotations" / "trimaps" / f"{name}.png")
    lines = [f"{name} 1 1 1" for name in names]
    (root / "annotations" / "trainval.txt").write_text("\n".join(lines[:-1]) + "\n")
    (root / "annotations" / "test.txt").write_text(lines[-1] + "\n")


def test_oxford_reader_maps_trimap_values_and_skips_missing_masks(tmp_path):
    make_oxford(tmp_path, ["Abyssinian_1", "beagle_2", "pug_3", "Birman_4"], missing_trimap=("beagle_2",))
    samples = datasets.oxford_pets(tmp_path, "trainval")
    assert [s.name for s in samples] == ["Abyssinian_1", "pug_3"]
    image, mask = samples[0].load()
    assert image.shape == (30, 40, 3)
    assert set(np.unique(mask).tolist()) == {0, 1, 2}
    assert mask[15, 15] == 0 and mask[0, 0] == 1 and mask[9, 15] == 2
    assert [s.name for s in datasets.oxford_pets(tmp_path, "test")] == ["Birman_4"]


def test_folder_samples_recognises_oxford_layout_and_its_splits(tmp_path):
    make_oxford(tmp_path, ["a_1", "b_2", "c_3"])
    # trainval.txt holds a_1 and b_2, every tenth of it (the first) validating; test.txt holds c_3.
    assert [s.name for s in datasets.folder_samples(tmp_path, "train")] == ["b_2"]
    assert [s.name for s in datasets.folder_samples(tmp_path, "val")] == ["a_1"]
    assert [s.name for s in datasets.folder_samples(tmp_path, "test")] == ["c_3"]


def test_images_and_masks_reader_pairs_by_stem(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("one", "two", "lonely"):
        Image.new("RGB", (20, 10)).save(tmp_path / "images" / f"{name}.png")
    for name in ("one", "two"):
        Image.fromarray(np.full((10, 20), 2, np.uint8), "L").save(tmp_path / "masks" / f"{name}.png")
    samples = datasets.image_mask_folders(tmp_path)
    assert [s.name for s in samples] == ["one", "two"]
    images, masks = datasets.load_samples(samples, 16)
    assert images.shape == (2, 16, 16, 3) and masks.shape == (2, 16, 16) and masks.max() == 2


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "is not a folder"),
        ("empty", "must hold images/ and masks/"),
        ("oxford_without_split", "trainval.txt is missing"),
    ],
)
def test_bad_folders_get_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "oxford_without_split":
        (root / "images").mkdir(parents=True)
        (root / "annotations" / "trimaps").mkdir(parents=True)
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.folder_samples(root, "train")


def test_mask_with_values_beyond_the_classes_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "x.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8), "L").save(tmp_path / "masks" / "x.png")
    with pytest.raises(datasets.DatasetError, match="classes 0-2"):
        datasets.load_samples(datasets.image_mask_folders(tmp_path), 8)


def test_pipeline_batches_scaled_images_and_masks():
    images, masks = datasets.synthetic_at("val", 5, 128, workers=1)
    batches = list(datasets.pipeline(images, masks, batch_size=2, training=True))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    image, mask = batches[0]
    assert image.shape == (2, 128, 128, 3) and mask.shape == (2, 128, 128, 1)
    assert float(image.numpy().min()) >= 0.0 and float(image.numpy().max()) <= 1.0


def test_training_pipeline_weights_border_pixels_from_the_flipped_mask():
    images, masks = datasets.synthetic_at("train", 4, 128, workers=1)
    image, mask, weight = next(iter(datasets.pipeline(images, masks, batch_size=4, training=True, border_weight=2.5)))
    mask, weight = mask.numpy(), weight.numpy()
    assert weight.shape == mask.shape
    assert set(np.unique(weight[mask == scenes.BORDER])) == {2.5}
    assert set(np.unique(weight[mask != scenes.BORDER])) == {1.0}


def make_images_masks(root, names):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 6), (len(name) * 9 % 256, 40, 90)).save(root / "images" / f"{name}.png")
        Image.fromarray(np.full((6, 8), 1, np.uint8), "L").save(root / "masks" / f"{name}.png")


def split_names(root) -> dict[str, list[str]]:
    return {split: [s.name for s in datasets.folder_samples(root, split)] for split in ("train", "val", "test")}


def test_images_and_masks_folder_holds_out_test_images_never_trained_on(tmp_path):
    names = [f"photo_{i:03d}" for i in range(60)]
    make_images_masks(tmp_path, names)
    splits = split_names(tmp_path)
    train, val, test = (set(splits[s]) for s in ("train", "val", "test"))
    assert test and val and train
    assert not test & train and not test & val and not val & train
    assert train | val | test == set(names)
    assert len(train) > len(test) and len(train) > len(val)


def test_images_and_masks_split_keeps_each_image_in_its_split_as_the_folder_grows(tmp_path):
    make_images_masks(tmp_path, [f"photo_{i:03d}" for i in range(40)])
    before = split_names(tmp_path)
    assert split_names(tmp_path) == before
    make_images_masks(tmp_path, [f"later_{i:03d}" for i in range(40)])
    after = split_names(tmp_path)
    for split in ("train", "val", "test"):
        assert set(before[split]) <= set(after[split]), split


def test_images_and_masks_split_files_name_the_held_out_images(tmp_path):
    names = [f"photo_{i:03d}" for i in range(30)]
    make_images_masks(tmp_path, names)
    (tmp_path / "test.txt").write_text("# held out by hand\nphoto_003\nphoto_017 extra words\n\n")
    (tmp_path / "val.txt").write_text("photo_004\n")
    splits = split_names(tmp_path)
    assert splits["test"] == ["photo_003", "photo_017"]
    assert splits["val"] == ["photo_004"]
    assert sorted(splits["train"]) == sorted(set(names) - {"photo_003", "photo_017", "photo_004"})


@pytest.mark.parametrize(
    "test_list, val_list, message",
    [
        ("photo_001\nnot_there\n", None, "names 'not_there', which has no image"),
        ("photo_001\n", "photo_001\n", "listed in both test.txt and val.txt"),
    ],
)
def test_bad_split_files_get_clear_errors(tmp_path, test_list, val_list, message):
    make_images_masks(tmp_path, [f"photo_{i:03d}" for i in range(5)])
    (tmp_path / "test.txt").write_text(test_list)
    if val_list:
        (tmp_path / "val.txt").write_text(val_list)
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.folder_samples(tmp_path, "train")


def test_a_folder_too_small_for_a_held_out_split_says_how_to_fill_it(tmp_path):
    names = [f"photo_{i:03d}" for i in range(40)]
    make_images_masks(tmp_path, [n for n in names if datasets.held_out_bucket(n) == "train"][:3])
    with pytest.raises(datasets.DatasetError, match="no image falls in the test split.*test.txt"):
        datasets.folder_samples(tmp_path, "test")
