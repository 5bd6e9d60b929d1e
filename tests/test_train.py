"""segapp-train writes the three artefacts and a valid card; segapp-eval prints its figures; bad data is refused."""

import json

import numpy as np
import pytest

from segapp import train

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
        ]
    )
    assert code == 0
    return out


def test_training_writes_keras_tflite_and_card(trained):
    assert (trained / "unet.keras").stat().st_size > 1_000_000
    assert (trained / "unet.tflite").stat().st_size > 1_000_000
    card = json.loads((trained / "unet.json").read_text())
    assert card["version"] == "0.0.1-test"
    assert card["classes"] == ["foreground", "background", "border"]
    assert card["input_size"] == [128, 128]
    assert card["training"]["train_images"] == 4 and card["training"]["epochs"] == 1
    assert set(card["quality"]["per_class_iou"]) == {"foreground", "background", "border"}
    assert card["quality"]["images"] == 2
    assert card["files"]["unet.tflite"] == (trained / "unet.tflite").stat().st_size


def test_exported_tflite_matches_keras(trained):
    from segapp.inference import LiteRTEngine, TensorFlowEngine

    batch = np.random.default_rng(0).random((2, 128, 128, 3)).astype(np.float32)
    litert = LiteRTEngine(trained / "unet.tflite").predict(batch)
    tensorflow = TensorFlowEngine(trained / "unet.keras").predict(batch)
    assert np.isfinite(litert).all()
    assert np.allclose(litert, tensorflow, atol=1e-3)


def test_eval_prints_a_table_and_json(trained, capsys):
    assert train.eval_main(["--model", str(trained / "unet.tflite"), "--count", "2"]) == 0
    table = capsys.readouterr().out
    assert "foreground" in table and "mIoU" in table
    assert train.eval_main(["--model", str(trained / "unet.tflite"), "--count", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and 0.0 <= result["miou"] <= 1.0


def test_missing_dataset_folder_is_a_clear_error(tmp_path, capsys):
    code = train.main(["--data", str(tmp_path / "nope"), "--epochs", "1", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_eval_of_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert train.eval_main(["--model", str(tmp_path / "nope.tflite"), "--count", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
