"""The Open Inference Protocol through the real stack (nginx -> uWSGI -> segapp), spoken by clients nobody here
wrote: Triton's `tritonclient.http.InferenceServerClient` and KServe's `kserve.InferenceRESTClient`.

Every mask they get back equals, pixel for pixel, the PNG mask that POST /infer answers for the same image.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from PIL import Image
from tritonclient.utils import InferenceServerException

from segapp.training import scenes

pytestmark = pytest.mark.integration

MODEL = "segapp-unet"


@pytest.fixture(scope="module")
def scene_pixels() -> np.ndarray:
    """A held-out synthetic scene, 500 x 375: the shipped model finds all three classes in it."""
    pixels, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 1, size=(500, 375))
    return pixels


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture(scope="module")
def scene_jpeg(scene_pixels) -> bytes:
    return encode(scene_pixels, "JPEG")


def infer_route_mask(stack, image: bytes) -> np.ndarray:
    """The mask POST /infer answers for `image`, from its PNG."""
    answer = stack.infer(image, headers={"Content-Type": "application/octet-stream"})
    assert answer.status == 200, answer.body[:300]
    return np.asarray(Image.open(io.BytesIO(answer.body)))


@pytest.fixture(scope="module")
def expected(stack, scene_pixels, scene_jpeg) -> dict[str, np.ndarray]:
    """/infer's masks: for the scene's pixels (sent as a PNG, which decodes to exactly them) and for its JPEG."""
    masks = {
        "pixels": infer_route_mask(stack, encode(scene_pixels, "PNG")),
        "jpeg": infer_route_mask(stack, scene_jpeg),
    }
    for mask in masks.values():
        assert mask.shape == (375, 500)
        assert set(np.unique(mask).tolist()) == {0, 1, 2}
    return masks


@pytest.fixture
def triton_client(stack):
    with triton.InferenceServerClient(f"127.0.0.1:{stack.port}") as client:
        yield client


# --- Triton's client ------------------------------------------------------------------------------------------

def test_triton_client_health_and_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert triton_client.is_model_ready(MODEL, "1")
    assert not triton_client.is_model_ready("resnet50")
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    metadata = triton_client.get_model_metadata(MODEL)
    assert metadata == triton_client.get_model_metadata(MODEL, "1")
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [("mask", "UINT8"), ("class_fractions", "FP32")]


def test_triton_client_repository_index_lists_every_model_and_each_answers(triton_client, scene_pixels):
    index = {entry["name"]: entry for entry in triton_client.get_model_repository_index()}
    # The shipped repository: the demonstration model and the person model `make models` fetched.
    assert {name: (entry["version"], entry["state"]) for name, entry in index.items()} == {
        MODEL: ("1", "READY"), "person": ("1", "READY")}
    image = triton.InferInput("image", list(scene_pixels.shape), "UINT8")
    image.set_data_from_numpy(scene_pixels)
    for name, classes in ((MODEL, 3), ("person", 2)):
        result = triton_client.infer(name, [image], outputs=[triton.InferRequestedOutput("class_fractions")])
        assert result.get_response()["model_name"] == name
        assert result.as_numpy("class_fractions").shape == (classes,)
    assert triton_client.get_model_metadata("person", "1")["outputs"][1]["shape"] == [2]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_client_uint8_image(triton_client, scene_pixels, expected, binary):
    image = triton.InferInput("image", list(scene_pixels.shape), "UINT8")
    image.set_data_from_numpy(scene_pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput("mask", binary_data=binary),
               triton.InferRequestedOutput("class_fractions", binary_data=binary)]
    result = triton_client.infer(MODEL, [image], outputs=outputs, request_id="triton-1")
    assert result.get_response()["id"] == "triton-1"
    mask = result.as_numpy("mask")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected["pixels"])
    fractions = result.as_numpy("class_fractions")
    np.testing.assert_allclose(fractions, np.bincount(mask.ravel(), minlength=3) / mask.size, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_client_bytes_image(triton_client, scene_jpeg, expected, binary):
    # JSON holds text, so a file travels in it as base64; binary data holds the file itself.
    element = scene_jpeg if binary else base64.b64encode(scene_jpeg).decode()
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([element], dtype=np.object_), binary_data=binary)
    result = triton_client.infer(MODEL, [image], outputs=[triton.InferRequestedOutput("mask", binary_data=binary)])
    mask = result.as_numpy("mask")
    assert mask.shape == (1, 375, 500)
    np.testing.assert_array_equal(mask[0], expected["jpeg"])


def test_triton_client_batch_of_two_images(triton_client, scene_pixels, expected):
    batch = np.stack([scene_pixels, scene_pixels[:, ::-1]])
    image = triton.InferInput("image", list(batch.shape), "UINT8")
    image.set_data_from_numpy(batch)
    masks = triton_client.infer(MODEL, [image]).as_numpy("mask")  # no outputs named: all binary, the mask alone
    assert masks.shape == (2, 375, 500)
    np.testing.assert_array_equal(masks[0], expected["pixels"])
    assert not np.array_equal(masks[1], masks[0])


def test_triton_client_sees_the_protocols_errors(triton_client, scene_pixels):
    image = triton.InferInput("image", list(scene_pixels.shape), "UINT8")
    image.set_data_from_numpy(scene_pixels)
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.infer("resnet50", [image])
    assert unknown.value.status() == "404"
    assert "unknown model 'resnet50'" in unknown.value.message()
    # A shape of 9000 x 9000 declared over 3 bytes of data: refused from the shape, before the data is read.
    image = triton.InferInput("image", [1, 1, 3], "UINT8")
    image.set_data_from_numpy(np.zeros((1, 1, 3), np.uint8))
    image.set_shape([9000, 9000, 3])
    with pytest.raises(InferenceServerException) as too_large:
        triton_client.infer(MODEL, [image])
    assert too_large.value.status() == "413"
    assert "81000000 pixels" in too_large.value.message()


# --- KServe's client ------------------------------------------------------------------------------------------

def kserve_call(stack, call):
    """Run `call(client, base_url)` (a coroutine function) with a fresh InferenceRESTClient speaking v2."""

    async def run():
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60)) as client:
            return await call(client, stack.url)

    return asyncio.run(run())


def test_kserve_client_health(stack):
    async def health(client, url):
        return (await client.is_server_live(url), await client.is_server_ready(url),
                await client.is_model_ready(url, MODEL), await client.is_model_ready(url, "resnet50"))

    assert kserve_call(stack, health) == (True, True, True, False)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_client_uint8_image(stack, scene_pixels, expected, binary):
    image = InferInput("image", list(scene_pixels.shape), "UINT8")
    image.set_data_from_numpy(scene_pixels, binary_data=binary)
    request = InferRequest(MODEL, [image], request_id="kserve-1",
                           request_outputs=[RequestedOutput("mask", {"binary_data": binary})])

    async def infer(client, url):
        return await client.infer(url, request, model_name=MODEL)

    response = kserve_call(stack, infer)
    assert (response.id, response.model_name) == ("kserve-1", MODEL)
    [mask] = response.outputs
    np.testing.assert_array_equal(mask.as_numpy(), expected["pixels"])


def test_kserve_client_bytes_image(stack, scene_jpeg, expected):
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([scene_jpeg], dtype=np.object_), binary_data=True)
    request = InferRequest(MODEL, [image], parameters={"binary_data_output": True})

    async def infer(client, url):
        return await client.infer(url, request, model_name=MODEL)

    [mask] = kserve_call(stack, infer).outputs
    assert mask.shape == [1, 375, 500]
    np.testing.assert_array_equal(mask.as_numpy()[0], expected["jpeg"])


# --- nginx's limits -------------------------------------------------------------------------------------------

def test_nginx_limits_inference_but_not_health_or_metadata_and_answers_in_the_protocols_shape(
        stack_factory, scene_pixels):
    """/v2/models/{name}/infer shares /infer's rate and body limits; the v2 probes and metadata, like /readyz, are
    not rate limited; nginx's own refusals are {"error": "..."}, which Triton's client reads as a message."""
    limited = stack_factory(SEGAPP_NGINX_RATE="1r/m", SEGAPP_NGINX_BURST="1", SEGAPP_MAX_BODY_BYTES="100000")
    small = np.ascontiguousarray(scene_pixels[:64, :64])
    statuses, probes = [], []
    with triton.InferenceServerClient(f"127.0.0.1:{limited.port}") as client:
        for _ in range(4):
            image = triton.InferInput("image", list(small.shape), "UINT8")
            image.set_data_from_numpy(small)
            try:
                client.infer(MODEL, [image])
                statuses.append("200")
            except InferenceServerException as error:
                statuses.append(error.status())
                assert "too many requests" in str(error)
            probes += [client.is_server_live(), client.is_server_ready(), client.is_model_ready(MODEL),
                       bool(client.get_server_metadata()), bool(client.get_model_metadata(MODEL))]
        assert statuses == ["200", "200", "429", "429"]  # the rate's one request and the burst's one, then refused
        assert all(probes)
        image = triton.InferInput("image", list(scene_pixels.shape), "UINT8")
        image.set_data_from_numpy(scene_pixels)  # 562,500 bytes, over the 100,000 allowed
        with pytest.raises(InferenceServerException) as too_large:
            client.infer(MODEL, [image])
        assert too_large.value.status() == "413"
        assert too_large.value.message() == "the request body is larger than the server accepts"
