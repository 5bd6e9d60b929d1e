"""The HTTP contract of segapp.wsgi, in-process with WebTest (lint on): routes, negotiation, errors, headers."""

from __future__ import annotations

import base64
import io
import json
import logging
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from webtest import TestApp, TestRequest

from segapp.access import send_json_lines_bare
from segapp.config import Settings
from segapp.metrics import Metrics
from segapp.wsgi import LazyApplication, make_app

ERROR_KEYS = {"code", "message", "request_id"}


def post(app: TestApp, body: bytes, content_type: str | None = "image/jpeg", accept: str | None = None,
         url: str = "/infer", status: int = 200, headers: dict | None = None):
    """POST `body` with exactly these headers (None: header absent)."""
    request = TestRequest.blank(url, method="POST", headers=headers or {})
    request.body = body
    if content_type is not None:
        request.environ["CONTENT_TYPE"] = content_type
    if accept is not None:
        request.headers["Accept"] = accept
    return app.do_request(request, status=status)


def assert_json_error(response, status: int, code: str) -> dict:
    """The answer is the JSON error shape with `code`, tied to the X-Request-ID header, no traceback."""
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert set(response.json) == {"error"}
    error = response.json["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


def png_of(response) -> Image.Image:
    assert response.content_type == "image/png"
    return Image.open(io.BytesIO(response.body))


# --- POST /infer: answers -----------------------------------------------------------------------------------

def test_jpeg_gets_png_mask_of_its_size_with_class_indices(real_app, jpeg_500x375):
    response = post(real_app, jpeg_500x375)
    mask = png_of(response)
    assert mask.size == (500, 375)
    assert mask.mode == "P"
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2}
    assert mask.getpalette()[:9] == [230, 25, 75, 0, 0, 0, 255, 225, 25]
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_inference_answer_has_server_timing_for_each_stage(app, jpeg_500x375):
    timing = post(app, jpeg_500x375).headers["Server-Timing"]
    stages = dict(re.findall(r"(\w+);dur=([0-9.]+)", timing))
    assert {"decode", "infer", "encode", "total"} <= set(stages)
    assert all(float(ms) >= 0 for ms in stages.values())


def test_exif_rotated_jpeg_gets_mask_with_width_and_height_swapped(app, make_image):
    rotated = make_image("JPEG", (500, 375), orientation=6)
    assert png_of(post(app, rotated)).size == (375, 500)


@pytest.mark.parametrize("fmt, mode, content_type", [
    ("PNG", "RGBA", "image/png"), ("WEBP", "RGB", "image/webp"), ("BMP", "RGB", "application/octet-stream"),
    ("GIF", "P", "image/gif"), ("TIFF", "RGB", "image/tiff"),
])
def test_each_image_format_gets_mask_of_its_size(app, fmt, mode, content_type, make_image):
    image = make_image(fmt, (97, 61), mode=mode)
    assert png_of(post(app, image, content_type=content_type)).size == (97, 61)


def test_body_without_content_type_is_read_as_octet_stream(app, make_image):
    assert png_of(post(app, make_image("PNG", (40, 30)), content_type=None)).size == (40, 30)


def test_mask_pixels_are_the_engine_classes(app, make_image):
    mask = np.asarray(png_of(post(app, make_image("PNG", (300, 60)))))
    # StripesEngine: class 0 on the left, 1 in the middle, 2 on the right.
    assert mask[30, 10] == 0 and mask[30, 150] == 1 and mask[30, 290] == 2


def test_json_answer_fields_and_mask_equal_to_png_answer(real_app, shipped_segmenter, jpeg_500x375):
    answer = post(real_app, jpeg_500x375, url="/infer?format=json")
    assert answer.content_type == "application/json"
    body = answer.json
    assert set(body) == {"width", "height", "classes", "fractions", "mask", "model"}
    assert (body["width"], body["height"]) == (500, 375)
    assert body["classes"] == ["foreground", "background", "border"]
    assert set(body["fractions"]) == set(body["classes"])
    assert sum(body["fractions"].values()) == pytest.approx(1.0, abs=1e-5)
    card = shipped_segmenter.card
    assert body["model"] == {"name": card["name"], "version": card["version"], "engine": "litert"}
    png_answer = post(real_app, jpeg_500x375)
    assert base64.b64decode(body["mask"]) == png_answer.body


def test_json_fractions_match_the_mask(app, make_image):
    body = post(app, make_image("PNG", (300, 60)), accept="application/json").json
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    for index, name in enumerate(body["classes"]):
        assert body["fractions"][name] == pytest.approx(np.mean(mask == index), abs=1e-6)


def test_overlay_is_a_jpeg_of_the_input_size(app, jpeg_500x375):
    response = post(app, jpeg_500x375, url="/infer?format=overlay")
    assert response.content_type == "image/jpeg"
    overlay = Image.open(io.BytesIO(response.body))
    assert overlay.format == "JPEG" and overlay.size == (500, 375)


def test_overlay_of_exif_rotated_jpeg_is_upright(app, make_image):
    response = post(app, make_image("JPEG", (200, 100), orientation=6), accept="image/jpeg")
    assert Image.open(io.BytesIO(response.body)).size == (100, 200)


@pytest.mark.parametrize("accept, content_type", [
    ("application/json", "application/json"),
    ("image/png;q=0.5, application/json;q=0.9", "application/json"),
    ("image/jpeg", "image/jpeg"),
    ("image/*", "image/png"),
    ("*/*", "image/png"),
    ("application/json;q=0, */*;q=0.1", "image/png"),
    ("text/html, image/jpeg;q=0.2", "image/jpeg"),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", "image/png"),
])
def test_accept_header_chooses_the_answer(app, accept, content_type, make_image):
    response = post(app, make_image("PNG", (32, 24)), accept=accept)
    assert response.content_type == content_type
    assert response.headers["Vary"] == "Accept"


@pytest.mark.parametrize("fmt, content_type", [
    ("png", "image/png"), ("json", "application/json"), ("overlay", "image/jpeg"),
])
def test_format_parameter_wins_over_accept(app, fmt, content_type, make_image):
    response = post(app, make_image("PNG", (32, 24)), url=f"/infer?format={fmt}", accept="text/html")
    assert response.content_type == content_type


def test_default_format_setting_applies_when_client_has_no_preference(app_for, fake_segmenter, make_image):
    app = app_for(fake_segmenter, Settings(default_format="json"))
    assert post(app, make_image("PNG", (32, 24))).content_type == "application/json"
    assert post(app, make_image("PNG", (32, 24)), accept="image/*").content_type == "image/png"


def test_multipart_upload_of_field_image(app, make_image):
    image = make_image("JPEG", (120, 80))
    response = app.post("/infer", upload_files=[("image", "photo.jpg", image, "image/jpeg")])
    assert png_of(response).size == (120, 80)
    as_json = app.post("/infer?format=json", {"note": "a cat"}, upload_files=[("image", "photo.jpg", image)])
    assert (as_json.json["width"], as_json.json["height"]) == (120, 80)


def test_route_follows_settings(app_for, fake_segmenter, make_image):
    app = app_for(fake_segmenter, Settings(route="/v1/segment"))
    assert png_of(post(app, make_image("PNG", (20, 10)), url="/v1/segment")).size == (20, 10)
    assert_json_error(post(app, make_image("PNG", (20, 10)), status=404), 404, "not_found")


def test_engine_delay_setting_slows_inference(app_for, unloaded_fake_segmenter, make_image):
    app = app_for(unloaded_fake_segmenter.load(), Settings(engine_delay_ms=60))
    timing = post(app, make_image("PNG", (20, 10))).headers["Server-Timing"]
    assert float(re.search(r"infer;dur=([0-9.]+)", timing).group(1)) >= 60


def test_engine_fault_setting_answers_500_and_counts_it(app_for, unloaded_fake_segmenter, make_image):
    metrics = Metrics()
    app = app_for(unloaded_fake_segmenter.load(), Settings(engine_fault=1), metrics)
    assert_json_error(post(app, make_image("PNG", (20, 10)), status=500), 500, "internal_error")
    assert b'status="500"' in metrics.exposition()[0]


# --- other routes -------------------------------------------------------------------------------------------

def test_healthz_answers_ok(app):
    response = app.get("/healthz")
    assert response.json == {"status": "ok"}
    assert response.headers["Server-Timing"].startswith("total;dur=")
    assert app.head("/healthz").body == b""


def test_readyz_is_503_until_the_model_is_loaded_then_200(app_for, unloaded_fake_segmenter, make_image):
    segmenter = unloaded_fake_segmenter
    app = app_for(segmenter)
    assert_json_error(app.get("/readyz", status=503), 503, "not_ready")
    assert_json_error(post(app, make_image("PNG", (20, 10)), status=503), 503, "not_ready")
    assert_json_error(app.get("/v1/model", status=503), 503, "not_ready")
    assert app.get("/healthz").json == {"status": "ok"}
    segmenter.load()
    ready = app.get("/readyz")
    assert ready.json["status"] == "ready"
    assert ready.json["model"]["name"] == segmenter.card["name"]


def test_readyz_is_503_draining_while_the_drain_file_exists_and_the_rest_is_served(
        app_for, fake_segmenter, make_image, tmp_path):
    drain_file = tmp_path / "draining"
    app = app_for(fake_segmenter, Settings(drain_file=drain_file))
    assert app.get("/readyz").json["status"] == "ready"
    drain_file.touch()
    draining = app.get("/readyz", status=503)
    assert_json_error(draining, 503, "draining")
    assert draining.headers["Retry-After"] == "1"
    assert post(app, make_image("PNG", (20, 10))).content_type == "image/png"
    assert app.get("/healthz").json == {"status": "ok"}
    drain_file.unlink()
    assert app.get("/readyz").json["status"] == "ready"


def test_model_card(real_app, shipped_segmenter):
    card = real_app.get("/v1/model").json
    assert card == shipped_segmenter.card
    assert {"name", "version", "classes", "palette", "input", "output", "engine"} <= set(card)
    assert card["engine"] == "litert"


def test_metrics_is_prometheus_text(app):
    response = app.get("/metrics")
    assert response.content_type == "text/plain"
    assert "# TYPE segapp_requests_total counter" in response.text


# --- rejections ---------------------------------------------------------------------------------------------

def test_empty_body_is_400(app):
    assert_json_error(post(app, b"", status=400), 400, "empty_body")


def test_random_bytes_are_400(app):
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_json_error(post(app, noise, status=400), 400, "undecodable_image")


def test_truncated_jpeg_is_400(app, jpeg_500x375):
    truncated = jpeg_500x375[: len(jpeg_500x375) // 2]
    assert_json_error(post(app, truncated, status=400), 400, "undecodable_image")


def test_png_bomb_is_413_before_decoding(app, png_bomb):
    assert len(png_bomb) < 200_000
    error = assert_json_error(post(app, png_bomb, content_type="image/png", status=413), 413, "image_too_large")
    assert "400000000 pixels" in error["message"]


def test_image_over_max_pixels_setting_is_413(app_for, unloaded_fake_segmenter, make_image):
    unloaded_fake_segmenter.max_pixels = 1000
    app = app_for(unloaded_fake_segmenter.load())
    assert_json_error(post(app, make_image("PNG", (40, 30)), status=413), 413, "image_too_large")


class UnreadableInput:
    """A wsgi.input that fails the test if the app reads it."""

    def read(self, *args):
        raise AssertionError("the app read a body it should have refused")

    readline = readlines = read

    def __iter__(self):
        return self


def test_body_over_limit_by_content_length_is_413_without_reading(app):
    request = TestRequest.blank("/infer", method="POST", content_type="image/jpeg")
    request.environ.update({"wsgi.input": UnreadableInput(), "CONTENT_LENGTH": str(10 * 1024 * 1024 + 1)})
    error = assert_json_error(app.do_request(request, status=413), 413, "body_too_large")
    assert str(10 * 1024 * 1024) in error["message"]


class EndlessInput:
    """A chunked body that never ends: counts what the app reads."""

    def __init__(self):
        self.bytes_read = 0

    def read(self, size: int = -1):
        assert size is not None and size > 0, "the app asked for the whole of an endless body"
        self.bytes_read += size
        return b"\xff" * size

    def readline(self, *args):
        return self.read(1)

    def readlines(self, *args):
        return [self.read(1)]

    def __iter__(self):
        return self


@pytest.mark.parametrize("marker", [
    {"HTTP_TRANSFER_ENCODING": "chunked"}, {"wsgi.input_terminated": True},
])
def test_chunked_body_over_limit_is_413_after_reading_only_the_limit(app_for, fake_segmenter, marker):
    limit = 100_000
    app = app_for(fake_segmenter, Settings(max_body_bytes=limit))
    body = EndlessInput()
    request = TestRequest.blank("/infer", method="POST", content_type="image/jpeg")
    request.environ.update({"wsgi.input": body, **marker})
    request.environ.pop("CONTENT_LENGTH", None)
    assert_json_error(app.do_request(request, status=413), 413, "body_too_large")
    assert limit < body.bytes_read <= limit + 1


@pytest.mark.parametrize("url, content_type", [
    ("/infer", "text/plain"),          # 415
    ("/infer?format=gif", "image/png"),  # 400 bad_format
    ("/healthz", "image/png"),         # 405
    ("/nowhere", "image/png"),         # 404
])
def test_a_refused_request_body_is_read_to_its_end(app, url, content_type):
    """uWSGI resets a connection closed with unread data, and nginx then loses the answer (a 502)."""
    body = io.BytesIO(b"x" * 300_000)
    request = TestRequest.blank(url, method="POST", content_type=content_type)
    request.environ.update({"wsgi.input": body, "CONTENT_LENGTH": "300000"})
    response = app.do_request(request, expect_errors=True)
    assert response.status_int in (400, 404, 405, 415)
    assert body.tell() == 300_000


def test_chunked_body_under_limit_is_segmented(app_for, fake_segmenter, make_image):
    app = app_for(fake_segmenter)
    request = TestRequest.blank("/infer", method="POST", content_type="image/png")
    request.environ.update({"wsgi.input": io.BytesIO(make_image("PNG", (33, 22))), "wsgi.input_terminated": True})
    request.environ.pop("CONTENT_LENGTH", None)
    assert png_of(app.do_request(request, status=200)).size == (33, 22)


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/json", "application/x-www-form-urlencoded", "text/html; charset=utf-8",
])
def test_unsupported_content_type_is_415(app, jpeg_500x375, content_type):
    assert_json_error(post(app, jpeg_500x375, content_type=content_type, status=415), 415, "unsupported_media_type")


def test_multipart_without_image_field_is_400(app):
    response = app.post("/infer", {"picture": "x"}, upload_files=[("photo", "p.jpg", b"\xff\xd8")], status=400)
    assert_json_error(response, 400, "missing_image_field")


def test_multipart_with_image_as_text_field_is_400(app):
    assert_json_error(app.post("/infer", {"image": "not a file"}, content_type="multipart/form-data",
                               status=400), 400, "missing_image_field")


def test_malformed_multipart_is_400(app):
    response = post(app, b"garbage", content_type="multipart/form-data", status=400)
    assert_json_error(response, 400, "bad_multipart")


@pytest.mark.parametrize("accept", ["text/html", "application/xml, text/*", "image/png;q=0, application/json;q=0"])
def test_unacceptable_accept_is_406(app, jpeg_500x375, accept):
    assert_json_error(post(app, jpeg_500x375, accept=accept, status=406), 406, "not_acceptable")


@pytest.mark.parametrize("query", ["format=bmp", "format=", "format=%ff"])
def test_unknown_format_is_400(app, jpeg_500x375, query):
    assert_json_error(post(app, jpeg_500x375, url=f"/infer?{query}", status=400), 400, "bad_format")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_on_infer_are_405_with_allow(app, method):
    response = app.request("/infer", method=method, status=405)
    assert response.headers["Allow"] == "POST"
    assert_json_error(response, 405, "method_not_allowed")


def test_head_on_infer_is_405_with_allow(app):
    response = app.head("/infer", status=405)
    assert response.headers["Allow"] == "POST"
    assert response.content_type == "application/json"
    assert response.body == b""


def test_post_on_healthz_is_405_with_allow(app):
    response = post(app, b"x", url="/healthz", status=405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert_json_error(response, 405, "method_not_allowed")


@pytest.mark.parametrize("path", ["/nope", "/", "/infer/", "/v1/model/extra"])
def test_unknown_path_is_404(app, path):
    assert_json_error(app.get(path, status=404), 404, "not_found")


def test_unexpected_exception_is_500_with_traceback_only_in_log(app_for, failing_segmenter, jpeg_500x375, caplog):
    app = app_for(failing_segmenter)
    with caplog.at_level(logging.ERROR, logger="segapp"):
        response = post(app, jpeg_500x375, headers={"X-Request-ID": "req-500"}, status=500)
    error = assert_json_error(response, 500, "internal_error")
    assert error["request_id"] == "req-500"
    assert "exploded" not in response.text and "RuntimeError" not in response.text
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "req-500" in record.getMessage()
    assert record.exc_info[0] is RuntimeError
    assert "engine exploded" in caplog.text and "Traceback" in caplog.text



def test_json_access_line_of_a_500_holds_no_traceback(app_for, failing_segmenter, jpeg_500x375, caplog):
    app = app_for(failing_segmenter, Settings(log_format="json"))
    with caplog.at_level(logging.INFO, logger="segapp"):
        post(app, jpeg_500x375, headers={"X-Request-ID": "req-500-json"}, status=500)
    [access] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "segapp.access"]
    assert (access["request_id"], access["status"]) == ("req-500-json", 500)
    assert "exploded" not in json.dumps(access) and "Traceback" not in json.dumps(access)
    # The traceback is on the error's own line, which stays text.
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.name != "segapp.access" and error.exc_info[0] is RuntimeError

class BrokenMetrics(Metrics):
    def observe_request(self, *args):
        raise OSError("No space left on device")


def test_failing_metrics_do_not_cost_the_client_its_answer(app_for, fake_segmenter, caplog):
    app = app_for(fake_segmenter, metrics=BrokenMetrics())
    with caplog.at_level(logging.ERROR, logger="segapp"):
        assert app.get("/healthz").json == {"status": "ok"}
    assert "No space left on device" in caplog.text


# --- request IDs and logging --------------------------------------------------------------------------------

def test_sane_request_id_is_echoed(app):
    for request_id in ("abc-123", "0f2d1c7e9b6a4d3e8f7a6b5c4d3e2f1a", "node1:42.7_x"):
        response = app.get("/healthz", headers={"X-Request-ID": request_id})
        assert response.headers["X-Request-ID"] == request_id


def test_request_id_is_echoed_in_error_body(app):
    response = app.get("/nope", headers={"X-Request-ID": "from-nginx-1"}, status=404)
    assert response.json["error"]["request_id"] == "from-nginx-1"


@pytest.mark.parametrize("absurd", ["x" * 2048, "bad\x01id", "has space", "semi;colon", "<script>"])
def test_absurd_request_id_is_replaced(app, absurd):
    request = TestRequest.blank("/nope")
    request.environ["HTTP_X_REQUEST_ID"] = absurd
    response = app.do_request(request, status=404)
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.json["error"]["request_id"] == request_id


def test_each_request_gets_its_own_request_id(app):
    assert app.get("/healthz").headers["X-Request-ID"] != app.get("/healthz").headers["X-Request-ID"]


def test_one_access_log_line_per_request(app, jpeg_500x375, caplog):
    with caplog.at_level(logging.INFO, logger="segapp.access"):
        post(app, jpeg_500x375, headers={"X-Request-ID": "log-me"})
        app.get("/nope", status=404)
    lines = [r.getMessage() for r in caplog.records if r.name == "segapp.access"]
    assert len(lines) == 2
    assert re.fullmatch(r"POST /infer 200 \d+ [0-9.]+ms request_id=log-me", lines[0])
    assert re.match(r"GET /nope 404 \d+ ", lines[1])



def test_json_access_line_is_one_object_per_request_with_model_and_timings(app_for, fake_segmenter, jpeg_500x375,
                                                                           caplog):
    app = app_for(fake_segmenter, Settings(log_format="json"))
    with caplog.at_level(logging.INFO, logger="segapp.access"):
        answer = post(app, jpeg_500x375, headers={"X-Request-ID": "json-me"})
        app.get("/nope?key=secret", status=404)
        app.post("/infer", b"not an image", headers={"Content-Type": "image/jpeg"}, status=400)
    lines = [r.getMessage() for r in caplog.records if r.name == "segapp.access"]
    assert len(lines) == 3
    assert all("\n" not in line for line in lines)
    inference, missing, bad = (json.loads(line) for line in lines)
    assert inference["layer"] == "app"
    assert (inference["request_id"], inference["method"], inference["path"], inference["status"]) == (
        "json-me", "POST", "/infer", 200)
    assert (inference["bytes_in"], inference["bytes_out"]) == (len(jpeg_500x375), len(answer.body))
    name, version = answer.headers["X-Model"].rsplit("/", 1)
    assert (inference["model"], inference["version"]) == (name, version)
    assert {"decode", "infer", "encode", "total"} <= set(inference["timings_ms"])
    assert all(ms >= 0 for ms in inference["timings_ms"].values())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", inference["time"])
    assert (missing["path"], missing["status"]) == ("/nope", 404)  # the path only: no query values
    assert "model" not in missing and "secret" not in lines[1]
    assert bad["status"] == 400 and "model" not in bad
    # Never the image's bytes, nor a traceback: the line is small whatever the body.
    assert len(lines[0]) < 600


def test_json_access_line_is_the_whole_line_without_time_level_or_name(fake_segmenter, jpeg_500x375):
    stream = io.StringIO()
    access = logging.getLogger("segapp.access")
    saved = access.handlers[:], access.propagate
    send_json_lines_bare(access, stream)
    try:
        app = TestApp(make_app(Settings(log_format="json"), segmenter=fake_segmenter, metrics=Metrics()))
        post(app, jpeg_500x375, headers={"X-Request-ID": "bare"})
    finally:
        access.handlers[:], access.propagate = saved
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("{") and json.loads(line)["request_id"] == "bare"


def test_log_format_setting_accepts_text_and_json_only():
    assert Settings.from_env({"SEGAPP_LOG_FORMAT": "json"}).log_format == "json"
    assert Settings.from_env({}).log_format == "text"
    for bad in ("xml", "JSON"):  # lower case only, as uWSGI's ini compares it
        with pytest.raises(ValueError, match="SEGAPP_LOG_FORMAT"):
            Settings.from_env({"SEGAPP_LOG_FORMAT": bad})

# --- the app as uWSGI loads it ------------------------------------------------------------------------------

def test_application_loads_nothing_until_first_request(unloaded_fake_segmenter):
    built = []

    def factory():
        built.append(1)
        return make_app(Settings(), segmenter=unloaded_fake_segmenter.load(), metrics=Metrics())

    lazy = LazyApplication(factory)
    assert built == []
    app = TestApp(lazy)
    app.get("/healthz")
    app.get("/readyz")
    assert built == [1]


def test_application_that_cannot_be_made_answers_503_and_retries(unloaded_fake_segmenter, caplog):
    attempts = []

    def factory():
        attempts.append(1)
        if len(attempts) == 1:
            raise FileNotFoundError("model file /srv/missing.tflite does not exist")
        return make_app(Settings(), segmenter=unloaded_fake_segmenter.load(), metrics=Metrics())

    app = TestApp(LazyApplication(factory))
    with caplog.at_level(logging.ERROR, logger="segapp"):
        failed = app.get("/healthz", headers={"X-Request-ID": "boot-1"}, status=503)
    error = assert_json_error(failed, 503, "not_ready")
    assert error["request_id"] == "boot-1" and "missing.tflite" not in failed.text
    assert "missing.tflite" in caplog.text and "boot-1" in caplog.text
    assert app.get("/healthz").json == {"status": "ok"}
    assert len(attempts) == 2


def test_module_application_is_lazy():
    from segapp import wsgi

    assert isinstance(wsgi.application, LazyApplication)


# --- nothing a client sends makes a 5xx ---------------------------------------------------------------------

_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
_content_types = st.one_of(st.none(), _header_text, st.sampled_from([
    "image/jpeg", "image/png", "image/*", "application/octet-stream", "multipart/form-data",
    "multipart/form-data; boundary=x", "multipart/form-data; boundary=", "text/plain", "application/json",
]))
_accepts = st.one_of(st.none(), _header_text, st.sampled_from([
    "*/*", "image/png", "application/json;q=0.5", "image/jpeg;q=0", "text/html", "*/*;q=abc", ";;,,", "image/",
]))


def _encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 120, 40)).save(out, format=fmt)
    return out.getvalue()


_tiny_png = _encoded("PNG")
_tiny_jpeg = _encoded("JPEG")
_bodies = st.one_of(
    st.binary(max_size=2048),
    st.sampled_from([_tiny_png, _tiny_jpeg]).flatmap(lambda image: st.integers(0, len(image)).map(lambda n: image[:n])),
    st.binary(max_size=64).map(lambda tail: _tiny_png[:40] + tail),
)
_queries = st.sampled_from(["", "?format=png", "?format=json", "?format=overlay", "?format=bmp", "?x=1"])


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, content_type=_content_types, accept=_accepts, query=_queries)
def test_any_request_gets_2xx_or_json_4xx(fake_segmenter, body, content_type, accept, query):
    app = TestApp(make_app(Settings(), segmenter=fake_segmenter, metrics=Metrics()))
    response = post(app, body, content_type=content_type, accept=accept, url=f"/infer{query}", status="*")
    assert 200 <= response.status_int < 500
    if response.status_int >= 400:
        error = json.loads(response.body)["error"]
        assert set(error) == ERROR_KEYS
        assert error["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize("declared", ["abc", "-5"])
def test_nonsense_content_length_is_400(app, declared):
    request = TestRequest.blank("/infer", method="POST", content_type="image/jpeg")
    request.environ.update({"wsgi.input": UnreadableInput(), "CONTENT_LENGTH": declared})
    # WebTest's lint refuses such a request before the app sees it; a real server may pass it on.
    response = request.get_response(app.app)
    assert_json_error(response, 400, "bad_request")


# --- classes, fractions and colours come from the model card ---------------------------------------------------

CARDS = {
    2: (["cat", "not cat"], [[255, 128, 0], [10, 20, 30]]),
    4: (["sky", "road", "car", "person"], [[0, 0, 255], [128, 128, 128], [255, 0, 0], [0, 255, 64]]),
}


def black_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("count", sorted(CARDS))
def test_json_answer_names_the_cards_classes_with_their_fractions(app_for, segmenter_with_classes, count):
    names, palette = CARDS[count]
    app = app_for(segmenter_with_classes(count, names, palette))
    body = post(app, black_png(400, 100), content_type="image/png", accept="application/json").json
    assert body["classes"] == names
    # The fake network puts class k on the k-th of `count` equal vertical bands.
    assert list(body["fractions"]) == names
    assert list(body["fractions"].values()) == pytest.approx([1 / count] * count, abs=0.01)
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"])))
    assert set(np.unique(np.asarray(mask)).tolist()) == set(range(count))
    assert mask.getpalette()[: 3 * count] == [c for colour in palette for c in colour]
    assert app.get("/v1/model").json["classes"] == names


@pytest.mark.parametrize("count", sorted(CARDS))
def test_png_and_overlay_answers_use_the_cards_palette(app_for, segmenter_with_classes, count):
    names, palette = CARDS[count]
    app = app_for(segmenter_with_classes(count, names, palette))
    mask = png_of(post(app, black_png(400, 100), content_type="image/png"))
    assert mask.getpalette()[: 3 * count] == [c for colour in palette for c in colour]
    overlay = post(app, black_png(400, 100), content_type="image/png", url="/infer?format=overlay")
    pixels = np.asarray(Image.open(io.BytesIO(overlay.body)).convert("RGB"), dtype=np.int16)
    for index, colour in enumerate(palette):
        # Half the class colour over a black image, read in the middle of its band; JPEG moves it a little.
        centre = pixels[50, int((index + 0.5) * 400 / count)]
        assert np.abs(centre - np.asarray(colour) // 2).max() <= 12, (index, centre.tolist())


# --- what one request may cost: sizes an overlay cannot have, truncated JPEGs, multipart forms --------------


def _encoded_image(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt, size", [("PNG", (70_000, 2)), ("TIFF", (8, 327_704))])
@pytest.mark.parametrize("answer", ["png", "json", "overlay"])
def test_image_with_a_side_over_the_jpeg_limit_is_413_saying_why(app, fmt, size, answer):
    body = _encoded_image(Image.new("L", size), fmt)
    error = assert_json_error(post(app, body, url=f"/infer?format={answer}", status=413), 413, "image_too_large")
    assert f"{size[0]}x{size[1]}; a side may be at most 65500 pixels" in error["message"]
    assert png_of(post(app, _encoded_image(Image.new("L", (65_500, 2)), fmt))).size == (65_500, 2)


def test_jpeg_cut_short_with_a_new_end_marker_is_400(app, jpeg_500x375):
    body = jpeg_500x375[:2_000] + b"\xff\xd9"
    error = assert_json_error(post(app, body, url="/infer?format=overlay", status=400), 400, "undecodable_image")
    assert "truncated" in error["message"]


def _multipart(*fields: tuple[str, str | None, bytes]) -> tuple[bytes, str]:
    boundary = "segappTestBoundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        + (f'; filename="{filename}"'.encode() if filename else b"") + b"\r\n\r\n" + content + b"\r\n"
        for name, filename, content in fields
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_with_two_image_fields_is_400_not_the_last_one(app, make_image):
    body, content_type = _multipart(("image", "a.png", make_image("PNG", (20, 10))),
                                    ("image", "b.png", make_image("PNG", (40, 30))))
    assert_json_error(post(app, body, content_type=content_type, status=400), 400, "duplicate_image_field")


def test_multipart_with_absurd_field_count_is_400(app, make_image):
    body, content_type = _multipart(*[("f", None, b"")] * 140_000, ("image", "a.png", make_image("PNG", (20, 10))))
    error = assert_json_error(post(app, body, content_type=content_type, status=400), 400, "too_many_form_parts")
    assert "140001 parts" in error["message"]


def test_multipart_image_field_among_a_few_others_is_segmented(app, make_image):
    body, content_type = _multipart(("note", None, b"a cat"), ("image", "a.png", make_image("PNG", (20, 10))),
                                    ("after", None, b"x"))
    assert png_of(post(app, body, content_type=content_type)).size == (20, 10)


@pytest.mark.parametrize("query, content_type, accept, status", [
    ("?format=gif", "image/png", None, 400),
    ("", "text/plain", None, 415),
    ("", "image/png", "text/html", 406),
])
def test_request_refused_before_its_body_is_used_still_has_its_body_read(app, jpeg_500x375, query, content_type,
                                                                          accept, status):
    """uWSGI resets a connection closed with body bytes unread, and nginx then may lose the answer (a 502)."""
    body = io.BytesIO(jpeg_500x375)  # tell() says how far the app read it
    request = TestRequest.blank(f"/infer{query}", method="POST", content_type=content_type)
    request.environ.update({"wsgi.input": body, "CONTENT_LENGTH": str(len(jpeg_500x375))})
    if accept:
        request.headers["Accept"] = accept
    assert request.get_response(app.app).status_int == status
    assert body.tell() == len(jpeg_500x375)


@pytest.mark.parametrize("path", ["/\xff", "/healthz\xff", "/metrics\xff", "/v2/\xff", "/\xc0\xaf", "/infer\xff"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_path_that_is_not_utf8_is_a_json_400(app, path, method):
    """WSGI hands the path over as latin-1 text; bytes that are not UTF-8 once decoded are the client's fault."""
    request = TestRequest.blank("/", method=method)
    request.environ["PATH_INFO"] = path  # what a server puts there for %ff
    response = app.do_request(request, status=400)
    if method != "HEAD":
        assert response.json["error"]["code"] == "bad_path"


@pytest.mark.parametrize("uri", ["/v2/models//infer", "/v2/models/segapp-unet/versions//infer", "//healthz"])
def test_path_with_an_empty_segment_is_404_though_the_server_merged_it(app, uri):
    """nginx merges "//" in PATH_INFO before the app sees it; REQUEST_URI keeps the client's path."""
    merged = "/" + "/".join(part for part in uri.split("/") if part)
    request = TestRequest.blank(merged, method="POST" if uri.endswith("infer") else "GET")
    request.environ["REQUEST_URI"] = uri
    response = app.do_request(request, status=404)
    assert "error" in response.json
