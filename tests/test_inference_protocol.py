"""The Open Inference Protocol (KServe v2) routes in-process with WebTest (lint on): every route, JSON and binary
tensors, UINT8 pixels and BYTES files, batches, limits and errors in the protocol's `{"error": "..."}` shape."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from webtest import TestApp, TestRequest

from segapp.config import Settings
from segapp.inference_protocol import MAX_BATCH, OUTPUTS
from segapp.training import scenes

MODEL = "/v2/models/segapp-unet"
INFER = MODEL + "/infer"


def protocol_error(response, status: int) -> str:
    """The answer is the protocol's error, `{"error": "<message>"}`, with the request's ID in its header."""
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert set(response.json) == {"error"}
    message = response.json["error"]
    assert isinstance(message, str) and message
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert "Traceback" not in message
    return message


def send(app: TestApp, request: dict, binary: list[bytes] = (), status: int = 200, url: str = INFER,
         content_type: str | None = None, headers: dict | None = None):
    """POST an inference request: JSON alone, or its JSON header then `binary` with Inference-Header-Content-Length."""
    header = json.dumps(request).encode()
    extra = dict(headers or {})
    if binary:
        extra["Inference-Header-Content-Length"] = str(len(header))
    blank = TestRequest.blank(url, method="POST", headers=extra)
    blank.body = header + b"".join(binary)
    blank.environ["CONTENT_TYPE"] = content_type or ("application/octet-stream" if binary else "application/json")
    return app.do_request(blank, status=status)


def outputs_of(response) -> dict[str, np.ndarray]:
    """The answer's output tensors by name, read from JSON data or from the binary data after the header."""
    length = response.headers.get("Inference-Header-Content-Length")
    header = json.loads(response.body[: int(length)] if length else response.body)
    binary = response.body[int(length) :] if length else b""
    dtypes = {"UINT8": np.uint8, "FP32": np.float32}
    tensors, offset = {}, 0
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            array = np.array(output["data"], dtypes[output["datatype"]])
        else:
            array = np.frombuffer(binary[offset : offset + size], dtypes[output["datatype"]])
            offset += size
        tensors[output["name"]] = array.reshape(output["shape"])
    assert offset == len(binary)
    return tensors


def uint8_input(pixels: np.ndarray, binary: bool = False) -> tuple[dict, list[bytes]]:
    tensor = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape)}
    if binary:
        return {**tensor, "parameters": {"binary_data_size": pixels.nbytes}}, [pixels.tobytes()]
    return {**tensor, "data": pixels.ravel().tolist()}, []


def bytes_input(files: list[bytes], binary: bool = True, shape: list[int] | None = None) -> tuple[dict, list[bytes]]:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(files)] if shape is None else shape}
    if not binary:
        return {**tensor, "data": [base64.b64encode(f).decode() for f in files]}, []
    data = b"".join(len(f).to_bytes(4, "little") + f for f in files)
    return {**tensor, "parameters": {"binary_data_size": len(data)}}, [data]


def pixels_of(image: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))


@pytest.fixture(scope="module")
def scene_jpeg() -> bytes:
    """A held-out synthetic scene, 500 x 375, as a JPEG: the shipped model finds all three classes in it."""
    pixels, _ = scenes.scene(scenes.SPLIT_SEEDS["test"], 0, size=(500, 375))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


# --- health, metadata -----------------------------------------------------------------------------------------

def test_server_metadata_names_the_binary_extension(app):
    metadata = app.get("/v2").json
    assert metadata["name"] == "segapp"
    assert metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_live_and_ready_before_and_after_the_model_loads(app_for, unloaded_fake_segmenter):
    app = app_for(unloaded_fake_segmenter)
    assert app.get("/v2/health/live").json == {"live": True}
    assert "loading" in protocol_error(app.get("/v2/health/ready", status=503), 503)
    assert app.get("/v2/health/ready", status=503).headers["Retry-After"] == "1"
    protocol_error(app.get(MODEL + "/ready", status=503), 503)
    protocol_error(app.get(MODEL, status=503), 503)
    unloaded_fake_segmenter.load()
    assert app.get("/v2/health/ready").json == {"ready": True}
    assert app.get(MODEL + "/ready").json == {"name": "segapp-unet", "ready": True}
    assert app.head("/v2/health/live").body == b""


def test_ready_is_503_while_draining(app_for, fake_segmenter, tmp_path):
    drain_file = tmp_path / "draining"
    app = app_for(fake_segmenter, Settings(drain_file=drain_file))
    drain_file.touch()
    assert "stopping" in protocol_error(app.get("/v2/health/ready", status=503), 503)
    assert app.get(MODEL + "/ready").json["ready"] is True


@pytest.mark.parametrize("path", [MODEL, MODEL + "/versions/1"])
def test_model_metadata_names_the_input_and_outputs(real_app, path):
    metadata = real_app.get(path).json
    assert metadata["name"] == "segapp-unet"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "litert"
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert metadata["outputs"] == [
        {"name": "mask", "datatype": "UINT8", "shape": [-1, -1]},
        {"name": "class_fractions", "datatype": "FP32", "shape": [3]},
    ]


@pytest.mark.parametrize("path, says", [
    ("/v2/models/resnet50", "unknown model 'resnet50'"),
    ("/v2/models/resnet50/ready", "unknown model"),
    ("/v2/models/segapp-unet/versions/9/ready", "unknown version '9'"),
    ("/v2/models/segapp-unet/versions/9", "unknown version '9'"),
    ("/v2/repository/models", "no resource"),
    ("/v2/models/segapp-unet/config", "no resource"),
])
def test_unknown_model_version_or_path_is_404_in_the_protocol_shape(app, path, says):
    assert says in protocol_error(app.get(path, status=404), 404)


def test_unknown_model_on_infer_is_404(app, make_image):
    request, binary = bytes_input([make_image("PNG", (8, 6))])
    assert "unknown model" in protocol_error(send(app, {"inputs": [request]}, binary, 404, "/v2/models/x/infer"), 404)


def test_wrong_method_is_405_with_allow_in_the_protocol_shape(app):
    response = app.post("/v2/health/live", b"", status=405)
    protocol_error(response, 405)
    assert response.headers["Allow"] == "GET, HEAD"
    response = app.get(INFER, status=405)
    protocol_error(response, 405)
    assert response.headers["Allow"] == "POST"


def test_v1_errors_keep_their_own_shape(app):
    assert set(app.get("/v1/nothing", status=404).json["error"]) == {"code", "message", "request_id"}


# --- inference ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_uint8_image_gets_the_mask_of_its_pixels(real_app, shipped_segmenter, scene_jpeg, binary):
    pixels = pixels_of(scene_jpeg)
    tensor, data = uint8_input(pixels, binary)
    response = send(real_app, {"id": "req-7", "inputs": [tensor], "parameters": {"binary_data_output": binary}}, data)
    header_length = response.headers.get("Inference-Header-Content-Length")
    assert (header_length is not None) == binary
    assert response.content_type == ("application/octet-stream" if binary else "application/json")
    header = json.loads(response.body[: int(header_length)] if binary else response.body)
    assert (header["model_name"], header["model_version"], header["id"]) == ("segapp-unet", "1", "req-7")
    mask = outputs_of(response)["mask"]
    assert mask.shape == (375, 500)
    np.testing.assert_array_equal(mask, shipped_segmenter.segment_pixels(pixels))
    assert set(np.unique(mask).tolist()) == {0, 1, 2}


def test_bytes_image_gets_the_same_mask_as_the_infer_route(real_app, scene_jpeg):
    png = real_app.post("/infer", scene_jpeg, headers={"Content-Type": "image/jpeg"}).body
    expected = np.asarray(Image.open(io.BytesIO(png)))
    assert set(np.unique(expected).tolist()) == {0, 1, 2}
    for binary in (True, False):
        tensor, data = bytes_input([scene_jpeg], binary)
        mask = outputs_of(send(real_app, {"inputs": [tensor]}, data))["mask"]
        assert mask.shape == (1, 375, 500)
        np.testing.assert_array_equal(mask[0], expected)


def test_a_single_bytes_image_of_shape_empty_gets_a_two_dimensional_mask(app, make_image):
    tensor, data = bytes_input([make_image("PNG", (30, 20))], shape=[])
    assert outputs_of(send(app, {"inputs": [tensor]}, data))["mask"].shape == (20, 30)


def test_nested_uint8_json_data_is_read_as_its_shape(app):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    flat = outputs_of(send(app, {"inputs": [uint8_input(pixels)[0]]}))["mask"]
    nested = {"name": "image", "datatype": "UINT8", "shape": [4, 6, 3], "data": pixels.tolist()}
    np.testing.assert_array_equal(outputs_of(send(app, {"inputs": [nested]}))["mask"], flat)


def test_uint8_batch_gets_one_mask_per_image(real_app, shipped_segmenter, make_image):
    first, second = pixels_of(make_image("PNG", (40, 30))), pixels_of(make_image("JPEG", (40, 30)))
    tensor, data = uint8_input(np.stack([first, second]), binary=True)
    masks = outputs_of(send(real_app, {"inputs": [tensor]}, data))["mask"]
    assert masks.shape == (2, 30, 40)
    np.testing.assert_array_equal(masks[0], shipped_segmenter.segment_pixels(first))
    np.testing.assert_array_equal(masks[1], shipped_segmenter.segment_pixels(second))


def test_bytes_batch_of_one_size_gets_one_mask_per_image(real_app, shipped_segmenter, make_image):
    files = [make_image("PNG", (50, 40)), make_image("JPEG", (50, 40)), make_image("WEBP", (50, 40))]
    tensor, data = bytes_input(files)
    request = {"inputs": [tensor], "outputs": [{"name": "mask"}, {"name": "class_fractions"}]}
    outputs = outputs_of(send(real_app, request, data))
    assert outputs["mask"].shape == (3, 40, 50)
    assert outputs["class_fractions"].shape == (3, 3)
    for index, image in enumerate(files):
        expected = shipped_segmenter.segment(image)
        np.testing.assert_array_equal(outputs["mask"][index], expected.mask)
        np.testing.assert_allclose(outputs["class_fractions"][index], expected.class_fractions(3), atol=1e-6)


def test_bytes_batch_of_different_sizes_is_400_naming_both(app, make_image):
    tensor, data = bytes_input([make_image("PNG", (50, 40)), make_image("PNG", (40, 50))])
    message = protocol_error(send(app, {"inputs": [tensor]}, data, 400), 400)
    assert "image 2 of 2" in message and "40x50" in message and "50x40" in message and "one size" in message


def test_class_fractions_are_answered_when_asked_and_each_output_chooses_binary(app):
    pixels = np.zeros((10, 30, 3), np.uint8)  # the stripes engine: thirds of classes 0, 1, 2
    tensor, data = uint8_input(pixels)
    request = {
        "inputs": [tensor],
        "outputs": [{"name": "class_fractions", "parameters": {"binary_data": True}}, {"name": "mask"}],
        "parameters": {"binary_data_output": False},
    }
    response = send(app, request, data)
    header = json.loads(response.body[: int(response.headers["Inference-Header-Content-Length"])])
    assert [o["name"] for o in header["outputs"]] == ["class_fractions", "mask"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert "data" in header["outputs"][1]
    outputs = outputs_of(response)
    assert outputs["class_fractions"].dtype == np.float32
    np.testing.assert_allclose(outputs["class_fractions"], [1 / 3, 1 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_array_equal(np.bincount(outputs["mask"].ravel()), [100, 100, 100])


def test_only_the_mask_is_answered_when_no_output_is_named(app):
    assert list(outputs_of(send(app, {"inputs": [uint8_input(np.zeros((2, 3, 3), np.uint8))[0]]}))) == ["mask"]


def test_json_mask_of_many_classes_reads_back_exactly(segmenter_with_classes, app_for):
    classes = [f"c{i}" for i in range(12)]
    segmenter = segmenter_with_classes(12, classes, [[i, i, i] for i in range(12)])
    app = app_for(segmenter)
    request = {"inputs": [uint8_input(np.zeros((5, 24, 3), np.uint8))[0]]}
    mask = outputs_of(send(app, request, url="/v2/models/bands-12/infer"))["mask"]
    np.testing.assert_array_equal(mask[0], np.repeat(np.arange(12), 2))


def test_answer_has_request_id_server_timing_and_metrics(app, make_image):
    tensor, data = bytes_input([make_image("PNG", (20, 10))])
    response = send(app, {"inputs": [tensor]}, data, headers={"X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    stages = dict(re.findall(r"(\w+);dur=([0-9.]+)", response.headers["Server-Timing"]))
    assert {"parse", "decode", "infer", "encode", "total"} <= set(stages)
    metrics = app.get("/metrics").text
    assert 'segapp_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"} 1.0' in metrics
    assert 'segapp_stage_duration_seconds_count{model="segapp-unet",stage="decode",version="1"} 1.0' in metrics
    assert 'segapp_image_pixels_count{model="segapp-unet",version="1"} 1.0' in metrics
    app.get("/v2/models/anything", status=404)
    assert 'route="/v2/models/{name}",status="404"' in app.get("/metrics").text


# --- rejections -----------------------------------------------------------------------------------------------

def pixels_tensor(**changes) -> dict:
    return {"name": "image", "datatype": "UINT8", "shape": [2, 2, 3], "data": [0] * 12, **changes}


@pytest.mark.parametrize("request_body, says", [
    ({"inputs": []}, "list of one tensor"),
    ({"inputs": [pixels_tensor(), pixels_tensor()]}, "list of one tensor"),
    ({"inputs": [pixels_tensor(name="input_1")]}, "unknown input 'input_1'"),
    ({"inputs": [pixels_tensor(datatype="FP32")]}, "datatype 'FP32'"),
    ({"inputs": [pixels_tensor(shape=[2, 6])]}, "[H, W, 3] or [N, H, W, 3]"),
    ({"inputs": [pixels_tensor(shape=[2, 1, 6, 1])]}, "[H, W, 3] or [N, H, W, 3]"),
    ({"inputs": [pixels_tensor(shape=[2, -2, 3])]}, "list of whole numbers"),
    ({"inputs": [pixels_tensor(shape=[0, 2, 3])]}, "[H, W, 3]"),
    ({"inputs": [pixels_tensor(data=[0] * 11)]}, "12 whole numbers"),
    ({"inputs": [pixels_tensor(data=[0] * 11 + [256])]}, "256, outside"),
    ({"inputs": [pixels_tensor(data=[0] * 11 + [-1])]}, "-1, outside"),
    ({"inputs": [pixels_tensor(data=[0.5] * 12)]}, "whole numbers"),
    ({"inputs": [pixels_tensor(data=["0"] * 12)]}, "whole numbers"),
    ({"inputs": [pixels_tensor(data=[[0, 0, 0], [0]])]}, "whole numbers"),
    ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3]}]}, "no 'data'"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}, "base64"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]},
     "holds 1 elements; its shape says 2"),
    ({"inputs": [pixels_tensor(parameters={"binary_data_size": 12})]}, "both 'data' and a binary_data_size"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]}, "holds no image"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["AAAA"]}]}, "shape [N]"),
    ({"inputs": [pixels_tensor()], "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ({"inputs": [pixels_tensor()], "outputs": [{"name": "mask"}, {"name": "mask"}]}, "twice"),
    ({"inputs": [pixels_tensor()], "outputs": [{"name": "mask", "parameters": {"binary_data": "true"}}]},
     "'binary_data' must be true or false"),
    ({"inputs": [pixels_tensor()], "outputs": [{"name": "mask", "parameters": [True]}]}, "must be a JSON object"),
    ({"inputs": [pixels_tensor()], "parameters": {"binary_data_output": 1}}, "'binary_data_output' must be true"),
    ({"inputs": [pixels_tensor()], "outputs": [{"name": "mask", "parameters": []}]}, "must be a JSON object"),
    ({"inputs": [pixels_tensor()], "parameters": False}, "parameters must be a JSON object"),
    ({"inputs": [pixels_tensor(parameters=[])]}, "must be a JSON object"),
    ({"inputs": [pixels_tensor()], "id": 7}, "'id' must be a string"),
    ([1, 2], "JSON object"),
])
def test_bad_request_or_tensor_is_400(app, request_body, says):
    assert says in protocol_error(send(app, request_body, status=400), 400)


def raw_send(app: TestApp, body: bytes, status: int, headers: dict | None = None,
             content_type: str = "application/json"):
    blank = TestRequest.blank(INFER, method="POST", headers=headers or {})
    blank.body = body
    blank.environ["CONTENT_TYPE"] = content_type
    return app.do_request(blank, status=status)


VALID = json.dumps({"inputs": [pixels_tensor()]}).encode()


@pytest.mark.parametrize("body, says", [
    (b'{"inputs": [' + b"[" * 990 + b"]" * 990 + b"]}", "nests 992 deep; at most 32"),
    (b'{"inputs": [{"name": "image", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}", "at most 32 levels"),
    (b'{"id": ' + b"[" * 100_000 + b"}", "at most 32 levels"),
    (b"[" * 100_000, "at most 32 levels"),
    (b'{"parameters": {' + b",".join(b'"k%d": 1' % i for i in range(700)) + b"}}", "has 701 keys; at most 256"),
    (VALID[:-1] + b', "inputs": []}', "names 'inputs' twice"),
    (b"\xef\xbb\xbf" + VALID, "BOM"),
    (VALID.decode().encode("utf-16"), "not UTF-8"),
    (VALID.decode().encode("utf-32"), "not UTF-8"),
    (b'{"inputs": "\xff"}', "not UTF-8"),
])
def test_json_that_costs_or_misleads_is_400_before_it_is_parsed(app, body, says):
    assert says in protocol_error(raw_send(app, body, 400), 400)


def test_json_structure_is_counted_outside_strings(app):
    """Brackets, colons and escaped quotes inside strings are text, not structure: such a request is served."""
    request = {"id": '[[[[{{{{:::"\\' * 40, "inputs": [pixels_tensor()]}
    response = send(app, request)
    assert response.json["id"] == request["id"]


@pytest.mark.parametrize("length", [" 111 ", "+111", "0_111", "1e2", "\u0661\u0661", "-1", "0x10"])
def test_header_length_other_than_decimal_digits_is_400(app, length):
    header = json.dumps({"inputs": [pixels_tensor(parameters={"binary_data_size": 12})]}).encode()
    body = header + bytes(12)
    response = raw_send(app, body, 400, {"Inference-Header-Content-Length": length}, "application/octet-stream")
    assert "decimal digits" in protocol_error(response, 400)


def test_bytes_elements_beyond_the_shape_are_refused_without_reading_them_all(app):
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 * 2_600_000}}
    response = send(app, {"inputs": [tensor]}, [bytes(4 * 2_600_000)], 400)
    assert "more than the 1 elements of its shape" in protocol_error(response, 400)


def test_images_of_a_batch_share_one_decoding_budget(app_for):
    """Each progressive JPEG of 2000 x 2000 with 100 refinement scans is within a budget of 0.5 s alone (estimated
    0.38 s); four of them in one request are not."""
    from segapp.inference import Segmenter
    from tests.conftest import StripesEngine
    from tests.hostile import repeated_scan_jpeg

    segmenter = Segmenter(engine=StripesEngine(), decode_cpu_seconds=0.5).load()
    app = app_for(segmenter)
    one = repeated_scan_jpeg(100, side=2000)
    tensor, binary = bytes_input([one])
    assert outputs_of(send(app, {"inputs": [tensor]}, binary))["mask"].shape == (1, 2000, 2000)
    tensor, binary = bytes_input([one] * 4)
    message = protocol_error(send(app, {"inputs": [tensor]}, binary, 413), 413)
    assert "budget" in message and re.match(r"image [234] of 4: ", message), message


def test_json_mask_over_the_answer_limit_is_413_and_binary_is_served(app, monkeypatch):
    from segapp import inference_protocol

    monkeypatch.setattr(inference_protocol, "MAX_JSON_ANSWER_BYTES", 2 * 4 * 4 - 1)
    request = {"inputs": [pixels_tensor(shape=[4, 4, 3], data=[0] * 48)]}
    assert "ask for it as binary data" in protocol_error(send(app, request, status=413), 413)
    request["outputs"] = [{"name": "mask", "parameters": {"binary_data": True}}]
    assert outputs_of(send(app, request))["mask"].shape == (4, 4)
    request["outputs"] = [{"name": "class_fractions"}]
    assert outputs_of(send(app, request))["class_fractions"].shape == (3,)


@pytest.mark.parametrize("fmt", ["JPEG2000", "PPM"])
def test_bytes_image_of_a_format_not_taken_is_415(app, fmt):
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format=fmt)
    tensor, binary = bytes_input([out.getvalue()])
    assert f"{fmt} images are not accepted" in protocol_error(send(app, {"inputs": [tensor]}, binary, 415), 415)


def test_binary_data_that_disagrees_with_the_shape_is_400(app):
    tensor = {"name": "image", "datatype": "UINT8", "shape": [4, 4, 3], "parameters": {"binary_data_size": 47}}
    assert "needs 48 bytes" in protocol_error(send(app, {"inputs": [tensor]}, [bytes(47)], 400), 400)
    tensor["parameters"]["binary_data_size"] = 49
    assert "claims binary_data_size 49" in protocol_error(send(app, {"inputs": [tensor]}, [bytes(48)], 400), 400)
    tensor["parameters"]["binary_data_size"] = 48
    assert "no tensor claims" in protocol_error(send(app, {"inputs": [tensor]}, [bytes(49)], 400), 400)


def test_bytes_element_longer_than_its_data_is_400(app):
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}
    data = (1000).to_bytes(4, "little") + b"\x89PNG"
    assert "claims 1000 bytes" in protocol_error(send(app, {"inputs": [tensor]}, [data], 400), 400)


@pytest.mark.parametrize("image, status, says", [
    (b"", 400, "empty"),
    (b"\x00" * 100, 400, "not an image"),
])
def test_bytes_that_are_no_image_are_400(app, image, status, says):
    tensor, data = bytes_input([b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, image])
    message = protocol_error(send(app, {"inputs": [tensor]}, data, status), status)
    assert message.startswith("image 1 of 2")
    tensor, data = bytes_input([image], shape=[])
    assert says in protocol_error(send(app, {"inputs": [tensor]}, data, status), status)


@pytest.mark.parametrize("header_length", ["abc", "0", "-5", "100000"])
def test_bad_inference_header_content_length_is_400(app, header_length):
    blank = TestRequest.blank(INFER, method="POST", headers={"Inference-Header-Content-Length": header_length})
    blank.body = json.dumps({"inputs": [pixels_tensor()]}).encode()
    blank.environ["CONTENT_TYPE"] = "application/octet-stream"
    assert "Inference-Header-Content-Length" in protocol_error(app.do_request(blank, status=400), 400)


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe{}"])
def test_body_that_is_not_json_is_400(app, body):
    blank = TestRequest.blank(INFER, method="POST", content_type="application/json")
    blank.body = body
    protocol_error(app.do_request(blank, status=400), 400)


@pytest.mark.parametrize("content_type", ["image/jpeg", "text/plain", "multipart/form-data; boundary=x"])
def test_other_content_types_are_415(app, content_type):
    response = send(app, {"inputs": [pixels_tensor()]}, content_type=content_type, status=415)
    assert "application/json" in protocol_error(response, 415)


def test_uint8_shape_over_the_pixel_limit_is_413_from_its_declared_shape(app_for, fake_segmenter):
    app = app_for(fake_segmenter, Settings(max_pixels=10_000))
    tensor = {"name": "image", "datatype": "UINT8", "shape": [101, 100, 3], "parameters": {"binary_data_size": 3}}
    message = protocol_error(send(app, {"inputs": [tensor]}, [bytes(3)], 413), 413)
    assert "10100 pixels" in message and "10000" in message
    batch = {"name": "image", "datatype": "UINT8", "shape": [2, 100, 60, 3], "data": [0]}
    assert "12000 pixels" in protocol_error(send(app, {"inputs": [batch]}, status=413), 413)
    assert outputs_of(send(app, {"inputs": [uint8_input(np.zeros((100, 100, 3), np.uint8), True)[0]]},
                           [bytes(30_000)]))["mask"].shape == (100, 100)


def test_bytes_image_over_the_pixel_limit_is_413(app, png_bomb):
    tensor, data = bytes_input([png_bomb])
    assert "400000000 pixels" in protocol_error(send(app, {"inputs": [tensor]}, data, 413), 413)


def test_bytes_batch_over_the_pixel_limit_together_is_413(app_for, fake_segmenter, make_image):
    app = app_for(fake_segmenter, Settings(max_pixels=5_000))
    tensor, data = bytes_input([make_image("PNG", (60, 50))] * 2)
    # The sum of the two headers' sizes, before either image is decoded.
    assert "images hold 6000 pixels, over the limit of 5000" in protocol_error(
        send(app, {"inputs": [tensor]}, data, 413), 413)


def test_batch_over_max_batch_is_413(app, make_image):
    tensor, data = bytes_input([make_image("PNG", (2, 2))] * (MAX_BATCH + 1))
    assert f"at most {MAX_BATCH}" in protocol_error(send(app, {"inputs": [tensor]}, data, 413), 413)
    tensor, data = bytes_input([make_image("PNG", (2, 2))] * MAX_BATCH)
    assert outputs_of(send(app, {"inputs": [tensor]}, data))["mask"].shape == (MAX_BATCH, 2, 2)


def test_body_over_the_limit_is_413_without_reading(app):
    blank = TestRequest.blank(INFER, method="POST", content_type="application/json")

    class Unreadable:
        def read(self, *args):
            raise AssertionError("the app read a body it should have refused")

        readline = readlines = read

        def __iter__(self):
            return self

    blank.environ.update({"wsgi.input": Unreadable(), "CONTENT_LENGTH": str(10 * 1024 * 1024 + 1)})
    assert "over the limit" in protocol_error(app.do_request(blank, status=413), 413)


def test_unexpected_failure_is_500_in_the_protocol_shape(app_for, failing_segmenter, make_image, caplog):
    tensor, data = bytes_input([make_image("PNG", (8, 6))])
    message = protocol_error(send(app_for(failing_segmenter), {"inputs": [tensor]}, data, 500), 500)
    assert "secret" not in message
    assert "engine exploded" in caplog.text


# --- anything a client may send -------------------------------------------------------------------------------

# Two levels of lists and objects spelt out: hypothesis' own check on st.recursive's `extend` warned (and warnings are
# errors) in one full run, though the lambda uses its argument.
JSON_LEAVES = st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON_SHALLOW = JSON_LEAVES | st.lists(JSON_LEAVES, max_size=4) | st.dictionaries(st.text(max_size=8), JSON_LEAVES,
                                                                                  max_size=4)
JSON_VALUES = JSON_SHALLOW | st.lists(JSON_SHALLOW, max_size=4) | st.dictionaries(st.text(max_size=8), JSON_SHALLOW,
                                                                                    max_size=4)
TENSOR_FIELDS = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["image", "x"]) | JSON_VALUES,
    "datatype": st.sampled_from(["UINT8", "BYTES", "FP32"]) | JSON_VALUES,
    "shape": st.lists(st.integers(-1, 5), max_size=5) | JSON_VALUES,
    "data": st.lists(st.integers(-1, 256), max_size=80) | JSON_VALUES,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 40) | JSON_VALUES}),
})
REQUESTS = st.fixed_dictionaries({}, optional={
    "id": JSON_VALUES,
    "inputs": st.lists(TENSOR_FIELDS, max_size=2) | JSON_VALUES,
    "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(list(OUTPUTS)) | JSON_VALUES}), max_size=3)
    | JSON_VALUES,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": JSON_VALUES}),
})


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request_body=REQUESTS, binary=st.binary(max_size=40), header_length=st.none() | st.integers(-1, 400))
def test_any_request_is_answered_or_refused_in_the_protocol_shape_never_500(app, request_body, binary, header_length):
    header = json.dumps(request_body).encode()
    blank = TestRequest.blank(INFER, method="POST")
    if header_length is not None:
        blank.headers["Inference-Header-Content-Length"] = str(header_length)
    blank.body = header + binary
    blank.environ["CONTENT_TYPE"] = "application/octet-stream"
    response = app.do_request(blank, expect_errors=True)
    assert response.status_int in (200, 400, 413), response.body[:300]
    if response.status_int != 200:
        protocol_error(response, response.status_int)
