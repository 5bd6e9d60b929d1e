"""The person model (MediaPipe's selfie segmentation, fetched by `make models`) on real photographs that
scikit-image ships, through nginx: the mask, the class fractions, and the cutout that removes the background."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

pytestmark = pytest.mark.integration

# Boxes of NASA's portrait of Eileen Collins (skimage.data.astronaut(), 512x512): (left, top, right, bottom).
PERSON = {"face": (190, 80, 260, 150), "suit": (60, 330, 130, 450), "suit patch": (140, 350, 200, 410)}
NOT_PERSON = {"flag": (0, 0, 40, 200), "wall above her": (300, 10, 370, 110), "wall left of her head": (90, 0, 140, 60)}


def png_of(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def share(mask: np.ndarray, box: tuple[int, int, int, int], value) -> float:
    left, top, right, bottom = box
    return float(np.mean(mask[top:bottom, left:right] == value))


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return png_of(data.astronaut())


def test_the_shipped_repository_serves_the_person_model_beside_the_demonstration_model(stack):
    models = {model["name"]: model for model in stack.request("GET", "/v1/models").json()["models"]}
    # `make test` runs `make models`, which fetches the person model from the npm registry.
    assert models["person"]["state"] == "ready", models["person"]
    card = models["person"]["card"]
    assert card["classes"] == ["background", "person"] and card["output"]["kind"] == "sigmoid"
    assert card["input"]["size"] == [256, 256] and card["engine"] == "litert"
    assert models["segapp-unet"]["state"] == "ready"


def test_on_the_astronaut_her_face_and_suit_are_person_and_the_flag_and_wall_are_not(stack, astronaut):
    answer = stack.infer(astronaut, "?model=person", {"Content-Type": "image/png"})
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["X-Model"] == "person/1"
    mask = np.asarray(Image.open(io.BytesIO(answer.body)))
    assert mask.shape == (512, 512)
    for name, box in PERSON.items():
        assert share(mask, box, 1) >= 0.95, name
    for name, box in NOT_PERSON.items():
        assert share(mask, box, 0) >= 0.95, name


def test_the_person_fractions_of_three_photographs(stack, record_property):
    """The fractions the card states (known_behaviour): the selfie model also calls large salient objects person."""
    fractions = {}
    for name in ("astronaut", "coffee", "chelsea"):
        answer = stack.infer(png_of(getattr(data, name)()), "?model=person&format=json", {"Content-Type": "image/png"})
        assert answer.status == 200, answer.body[:300]
        fractions[name] = answer.json()["fractions"]["person"]
    record_property("person_fractions", fractions)
    print(f"\nperson fractions: {fractions}")
    # The astronaut is half the frame; the cup of coffee about a fifth of its photograph; the cat most of its own.
    assert 0.4 <= fractions["astronaut"] <= 0.7
    assert 0.1 <= fractions["coffee"] <= 0.3
    assert fractions["chelsea"] >= 0.8


def test_the_cutout_keeps_the_person_and_makes_the_background_transparent(stack, astronaut):
    answer = stack.infer(astronaut, "?model=person&format=cutout", {"Content-Type": "image/png"})
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "image/png" and answer.headers["X-Model"] == "person/1"
    cutout = Image.open(io.BytesIO(answer.body))
    assert (cutout.mode, cutout.size) == ("RGBA", (512, 512))
    pixels = np.asarray(cutout)
    for name, box in PERSON.items():
        assert share(pixels[..., 3], box, 255) >= 0.95, name
    for name, box in NOT_PERSON.items():
        assert share(pixels[..., 3], box, 0) >= 0.95, name
    # The colours are the photograph's own, opaque or not.
    assert np.array_equal(pixels[..., :3], data.astronaut())
