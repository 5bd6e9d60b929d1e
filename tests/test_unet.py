"""The network: shapes, dtype, widths, and the shipped model's card telling its true size."""

import json

import numpy as np
import pytest

from segapp.inference import FLOAT_MODEL, SHIPPED_MODEL, card_path
from segapp.training import scenes, unet

keras = pytest.importorskip("keras", reason="the tensorflow extra is part of make test")


def test_output_is_three_class_logits_at_input_size():
    model = unet.build_unet(*unet.WIDTHS["slim"])
    logits = model(np.zeros((2, 128, 128, 3), np.float32), training=False)
    assert tuple(logits.shape) == (2, 128, 128, 3)
    assert logits.dtype == "float32"


def test_batchnorm_momentum_is_replaced_everywhere():
    model = unet.build_unet(*unet.WIDTHS["slim"], bn_momentum=0.9)
    momenta = {
        layer.momentum
        for sub in [model, model.get_layer("encoder")]
        for layer in sub.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.9}


def test_widths_are_ordered_by_parameter_count():
    counts = {name: unet.build_unet(*unet.WIDTHS[name]).count_params() for name in ("slim", "half")}
    assert counts["slim"] < counts["half"]
    assert 500_000 < counts["slim"] < 800_000


def test_shipped_model_parameter_count_matches_its_card():
    card = json.loads(FLOAT_MODEL.with_suffix(".json").read_text())
    model = keras.saving.load_model(str(FLOAT_MODEL.with_suffix(".keras")), compile=False)
    assert model.count_params() == card["parameters"]
    assert tuple(model.input_shape[1:]) == (128, 128, 3)
    assert model.output_shape[-1] == len(card["classes"]) == len(card["palette"])


def test_normalise_gives_the_network_pixels_in_zero_to_one():
    normalised = unet.normalise(np.array([0, 51, 255], np.uint8))
    assert normalised.dtype == np.float32 and normalised.tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_shipped_cards_state_the_normalisation_and_classes_training_uses():
    for card_file in (card_path(FLOAT_MODEL), card_path(SHIPPED_MODEL)):
        card = json.loads(card_file.read_text())
        assert (card["input"]["mean"], card["input"]["std"]) == (unet.MEAN, unet.STD)
        assert card["classes"] == list(scenes.CLASS_NAMES) and len(card["classes"]) == unet.NUM_CLASSES
        assert card["palette"] == [list(colour) for colour in scenes.PALETTE]
