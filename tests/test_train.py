"""segapp-train writes float and int8 models and their cards, which serving reads back; segapp-eval prints its
figures; bad data is refused."""

import json

import numpy as np
import pytest
from PIL import Image

from segapp.contract import card_json
from segapp.training import datasets, quality, scenes, train, unet

pytest.importorskip("tensorflow", reason="the tensorflow extra is part of make test")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    # Four tiny scenes in batches of two: two training steps, then export and a two-image evaluation.
    code = train.main(
        [
            "--data",
            "synthetic",
            "--train-count",
            "4",
            "--val-count",
            "2",
            "--test-count",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--verbose",
            "0",
            "--model-version",
            "0.0.1-test",
            "--int8-scenes",
            "4",
        ]
    )
    assert code == 0
    return out


def test_training_writes_keras_tflite_and_card(trained):
    assert (trained / "unet.keras").stat().st_size > 1_000_000
    assert (trained / "unet.tflite").stat().st_size > 1_000_000
    card = json.loads((trained / "unet.json").read_text())
    assert card["name"] == "segapp-unet" and card["release"] == "0.0.1-test" and "version" not in card
    assert card["classes"] == ["foreground", "background", "border"]
    assert card["palette"] == [[230, 25, 75], [0, 0, 0], [255, 225, 25]]
    assert card["foreground"] == ["foreground", "border"]
    # The input size is read from the network, never written twice.
    assert card["input"] == {"resize": "stretch", "channels": "RGB", "mean": 0, "std": 255}
    assert card["output"] == {"kind": "logits"} and "input_size" not in card
    assert card["training"]["train_images"] == 4 and card["training"]["epochs"] == 1
    assert set(card["quality"]["per_class_iou"]) == {"foreground", "background", "border"}
    assert card["quality"]["images"] == 2
    assert card["files"]["unet.tflite"] == (trained / "unet.tflite").stat().st_size


def test_exported_tflite_matches_keras(trained):
    from segapp.engines.litert import LiteRTEngine
    from segapp.engines.tensorflow import TensorFlowEngine

    batch = np.random.default_rng(0).random((2, 128, 128, 3)).astype(np.float32)
    litert = LiteRTEngine(trained / "unet.tflite").predict(batch)
    tensorflow = TensorFlowEngine(trained / "unet.keras").predict(batch)
    assert np.isfinite(litert).all()
    assert np.allclose(litert, tensorflow, atol=1e-3)


def test_training_writes_an_int8_model_with_its_own_card(trained):
    from segapp.engines.litert import LiteRTEngine

    # Version 1 of the model segapp-unet, the output folder being its repository.
    int8 = trained / "segapp-unet" / "1" / "model.tflite"
    assert not (trained / "unet-int8.tflite").exists()
    # int8 weights: about a quarter of the float file.
    assert int8.stat().st_size < (trained / "unet.tflite").stat().st_size / 2
    float_card = json.loads((trained / "unet.json").read_text())
    int8_card = json.loads((trained / "segapp-unet" / "model.json").read_text())
    assert int8_card["release"] == "0.0.1-test" and int8_card["classes"] == float_card["classes"]
    assert int8_card["input"] == float_card["input"] and int8_card["name"] == "segapp-unet"
    assert int8_card["quantization"]["representative_images"] == 4
    assert int8_card["files"]["segapp-unet/1/model.tflite"] == int8.stat().st_size
    for card in (float_card, int8_card):
        both = card["float_and_int8"]
        assert set(both["models"]) == {"unet.tflite", "segapp-unet/1/model.tflite"}
        assert all(quality["engine_ms_per_image"] > 0 for quality in both["models"].values())
        assert 0.0 <= both["agreement"]["pixels"] <= 1.0 and both["agreement"]["images"] == 2
    assert int8_card["quality"] == int8_card["float_and_int8"]["models"]["segapp-unet/1/model.tflite"]
    assert float_card["quality"] == float_card["float_and_int8"]["models"]["unet.tflite"]

    engine = LiteRTEngine(int8)
    assert engine.quantized and not LiteRTEngine(trained / "unet.tflite").quantized
    batch = np.random.default_rng(0).random((2, 128, 128, 3)).astype(np.float32)
    logits = engine.predict(batch)
    assert logits.dtype == np.float32 and logits.shape == (2, 128, 128, 3)
    float_logits = LiteRTEngine(trained / "unet.tflite").predict(batch)
    # Dequantized, the int8 logits are on the float model's scale, not raw int8 values.
    spread = float(float_logits.max() - float_logits.min())
    assert np.abs(logits - float_logits).mean() < 0.1 * spread


def test_int8_only_quantizes_a_trained_model_without_training(trained, tmp_path):
    for name in ("unet.keras", "unet.tflite", "unet.json"):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    code = train.main(
        ["--int8-only", "--out", str(tmp_path), "--int8-scenes", "2", "--test-count", "1", "--verbose", "0"]
    )
    assert code == 0
    card = json.loads((tmp_path / "segapp-unet" / "model.json").read_text())
    assert card["training"] == json.loads((trained / "unet.json").read_text())["training"]
    assert (tmp_path / "segapp-unet" / "1" / "model.tflite").stat().st_size > 100_000
    assert card["quantization"]["representative_images"] == 2 and card["quality"]["images"] == 1
    assert (tmp_path / "unet.keras").read_bytes() == (trained / "unet.keras").read_bytes()


def test_int8_only_without_a_trained_model_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--int8-only", "--out", str(tmp_path), "--int8-scenes", "2", "--verbose", "0"]) == 2
    assert "no trained unet.keras" in capsys.readouterr().err


def test_cards_load_through_the_contract_with_the_networks_they_were_written_for(trained):
    from segapp.contract import make_contract, read_card
    from segapp.engines import open_engine

    written_for = {
        "unet.json": ("unet.tflite", "unet.keras"),
        "segapp-unet/model.json": ("segapp-unet/1/model.tflite",),
    }
    for card_file, networks in written_for.items():
        for network in networks:
            contract = make_contract(read_card(trained / card_file), open_engine(trained / network), card_file)
            assert contract.classes == scenes.CLASS_NAMES and contract.palette == scenes.PALETTE
            assert (contract.width, contract.height, contract.layout) == (unet.INPUT_SIZE, unet.INPUT_SIZE, "NHWC")
            assert contract.mean == (unet.MEAN,) * 3 and contract.std == (unet.STD,) * 3
            assert contract.resize == "stretch" and contract.kind == "logits" and not contract.inferred
            assert [contract.classes[index] for index in contract.foreground] == ["foreground", "border"]


def test_the_output_folder_serves_as_a_repository_of_the_int8_model_and_the_float_model_alone(trained):
    from segapp.inference import Segmenter
    from segapp.repository import ModelRepository

    repository = ModelRepository.load(trained)
    assert repository.default_model == "segapp-unet"
    segmenter = repository.get("segapp-unet", None)
    assert segmenter.version == "1" and segmenter.engine.quantized
    assert segmenter.card["release"] == "0.0.1-test" and segmenter.card["card"] == "file"
    flat = Segmenter(trained / "unet.tflite").load()
    assert flat.name == "segapp-unet" and flat.card["input"]["size"] == [unet.INPUT_SIZE, unet.INPUT_SIZE]
    image, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 0, size=(90, 60))
    assert segmenter.segment_pixels(image).shape == flat.segment_pixels(image).shape == (60, 90)


def test_models_are_told_apart_by_their_path_from_the_folder_they_share(tmp_path):
    names = quality.model_names(tmp_path / "unet.tflite", tmp_path / "segapp-unet" / "1" / "model.tflite")
    assert names == ["unet.tflite", "segapp-unet/1/model.tflite"]
    assert quality.model_names(tmp_path / "a" / "model.tflite", tmp_path / "b" / "model.tflite") == [
        "a/model.tflite",
        "b/model.tflite",
    ]
    with pytest.raises(ValueError, match="the same model twice"):
        quality.model_names(tmp_path / "unet.tflite", tmp_path / "." / "unet.tflite")


def test_eval_prints_a_table_and_json(trained, capsys):
    assert train.eval_main(["--model", str(trained / "unet.tflite"), "--count", "2"]) == 0
    table = capsys.readouterr().out
    assert "foreground" in table and "mIoU" in table
    assert train.eval_main(["--model", str(trained / "unet.tflite"), "--count", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and 0.0 <= result["miou"] <= 1.0


def test_eval_against_a_second_model_prints_both_and_their_agreement(trained, capsys):
    int8 = trained / "segapp-unet" / "1" / "model.tflite"
    arguments = ["--model", str(int8), "--against", str(trained / "unet.tflite")]
    assert train.eval_main([*arguments, "--count", "2"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("unet.tflite (") and "\nsegapp-unet/1/model.tflite (" in table
    assert "masks agree on" in table
    assert train.eval_main([*arguments, "--count", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["models"]) == {"unet.tflite", "segapp-unet/1/model.tflite"}
    assert result["agreement"]["images"] == 2


def test_missing_dataset_folder_is_a_clear_error(tmp_path, capsys):
    code = train.main(["--data", str(tmp_path / "nope"), "--epochs", "1", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_eval_of_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert train.eval_main(["--model", str(tmp_path / "nope.tflite"), "--count", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def make_folder(root, count: int, mask_values: int = 3):
    """An images/ + masks/ folder of `count` flat images, each its own colour, masks cycling 0..mask_values-1."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        Image.new("RGB", (16, 12), (index * 4, 255 - index * 4, 77)).save(root / "images" / f"img_{index:03d}.png")
        mask = (np.arange(16 * 12).reshape(12, 16) % mask_values).astype(np.uint8)
        Image.fromarray(mask, "L").save(root / "masks" / f"img_{index:03d}.png")
    return root


def colours(images: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(c) for c in image[0, 0]) for image in images}


def test_folder_test_images_are_never_trained_or_validated_on(tmp_path):
    data = str(make_folder(tmp_path / "data", 50))
    trained_on = colours(train.load_split(data, "train", 0, 32)[0])
    validated_on = colours(train.load_split(data, "val", 0, 32)[0])
    tested_on = colours(np.stack([image for image, _ in quality.test_pairs(data, 0, unet.NUM_CLASSES)]))
    assert tested_on and trained_on and validated_on
    assert not tested_on & trained_on and not tested_on & validated_on and not trained_on & validated_on
    assert len(trained_on | validated_on | tested_on) == 50


@pytest.fixture
def tiny_model(tmp_path):
    """`tiny_model(classes) -> path`: a one-layer .keras network with len(classes) outputs and its card."""
    import keras

    def build(classes: list[str]):
        inputs = keras.Input((128, 128, 3))
        model = keras.Model(inputs, keras.layers.Conv2D(len(classes), 1)(inputs))
        path = tmp_path / f"tiny{len(classes)}.keras"
        model.save(path)
        card = card_json(classes, [[9, 9, 9]] * len(classes), name="tiny", release="0")
        path.with_suffix(".json").write_text(json.dumps(card))
        return path

    return build


def test_eval_scores_the_cards_classes_on_the_held_out_test_images(tmp_path, tiny_model, capsys):
    names = ["sky", "road", "car", "person"]
    data = make_folder(tmp_path / "data", 40, mask_values=4)
    held_out = datasets.folder_samples(data, "test")
    model = tiny_model(names)
    assert train.eval_main(["--model", str(model), "--data", str(data), "--count", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["per_class_iou"]) == names
    assert result["images"] == len(held_out) < 40


def test_eval_of_labels_beyond_the_cards_classes_is_a_clear_error(tiny_model, capsys):
    model = tiny_model(["cat", "not cat"])
    assert train.eval_main(["--model", str(model), "--data", "synthetic", "--count", "1"]) == 2
    assert "label has class 2, but there are only 2 classes" in capsys.readouterr().err
