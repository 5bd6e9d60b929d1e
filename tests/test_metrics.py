"""segapp.metrics: what /metrics shows after requests, in one process and summed over worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp

from segapp.config import Settings
from segapp.metrics import MULTIPROCESS_ENV, Metrics

REPO = Path(__file__).resolve().parent.parent


def sample(text: str, sample_name: str, /, **labels) -> float | None:
    """The value of the sample `sample_name` with exactly `labels` in Prometheus text, or None."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample_name and found.labels == labels:
                return found.value
    return None


def post_image(app: TestApp, image: bytes, status: int = 200):
    return app.post("/infer", image, headers={"Content-Type": "image/png"}, status=status)


def test_metrics_show_requests_by_route_and_status(app, make_image):
    image = make_image("PNG", (40, 25))
    for _ in range(3):
        post_image(app, image)
    post_image(app, b"not an image", status=400)
    app.get("/healthz")
    app.get("/nope", status=404)
    app.get("/also/nope", status=404)
    text = app.get("/metrics").text
    assert sample(text, "segapp_requests_total", route="/infer", method="POST", status="200") == 3
    assert sample(text, "segapp_requests_total", route="/infer", method="POST", status="400") == 1
    assert sample(text, "segapp_requests_total", route="/healthz", method="GET", status="200") == 1
    assert sample(text, "segapp_requests_total", route="other", method="GET", status="404") == 2
    assert sample(text, "segapp_request_duration_seconds_count", route="/infer") == 4


def test_metrics_show_stage_times_image_sizes_and_model(app, make_image):
    for size in ((40, 25), (400, 300)):
        post_image(app, make_image("PNG", size))
    text = app.get("/metrics").text
    for stage in ("decode", "infer", "postprocess", "encode"):
        assert sample(text, "segapp_stage_duration_seconds_count", stage=stage) == 2
    assert sample(text, "segapp_image_pixels_count") == 2
    assert sample(text, "segapp_image_pixels_sum") == 40 * 25 + 400 * 300
    assert sample(text, "segapp_image_pixels_bucket", le="1e+06") == 2
    assert sample(text, "segapp_model_info", name="segapp-unet", version="1.0.0", engine="stripes") == 1
    # The scrape itself is the one request in flight.
    assert sample(text, "segapp_requests_in_flight") == 1


def test_raw_paths_and_odd_methods_never_become_labels(app):
    for path in ("/a", "/b/c", "/infer/../etc/passwd", "/x?y=z"):
        app.get(path, status=404)
    app.request("/healthz", method="TRACE", status=405)
    text = app.get("/metrics").text
    assert "passwd" not in text and '"/a"' not in text and "TRACE" not in text
    assert sample(text, "segapp_requests_total", route="other", method="GET", status="404") == 4
    assert sample(text, "segapp_requests_total", route="/healthz", method="other", status="405") == 1


def test_two_apps_in_one_process_keep_their_own_counts(app_for, fake_segmenter):
    first, second = app_for(fake_segmenter), app_for(fake_segmenter)
    first.get("/healthz")
    first.get("/healthz")
    second.get("/healthz")
    assert sample(first.get("/metrics").text, "segapp_requests_total", route="/healthz", method="GET",
                  status="200") == 2
    assert sample(second.get("/metrics").text, "segapp_requests_total", route="/healthz", method="GET",
                  status="200") == 1


WORKER = """
import sys
import numpy as np
from webob import Request
from segapp.config import Settings
from segapp.inference import Segmenter
from segapp.wsgi import make_app

class ZeroEngine:
    name = "zeros"
    def predict(self, batch):
        return np.zeros(batch.shape[:3] + (3,), np.float32)

app = make_app(Settings(), segmenter=Segmenter(engine=ZeroEngine()).load())  # metrics from the environment
for _ in range(int(sys.argv[1])):
    assert Request.blank("/healthz").get_response(app).status_int == 200
assert Request.blank("/nope").get_response(app).status_int == 404
"""


def test_multiprocess_mode_sums_over_worker_processes(tmp_path, app_for, fake_segmenter):
    environ = {**os.environ, MULTIPROCESS_ENV: str(tmp_path), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(count)], env=environ, cwd=REPO, stderr=subprocess.PIPE)
        for count in (3, 5)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr.decode()
    assert len(list(tmp_path.glob("*.db"))) >= 2  # each worker wrote its own files

    scraper = app_for(fake_segmenter, Settings(), Metrics(tmp_path))
    text = scraper.get("/metrics").text
    assert sample(text, "segapp_requests_total", route="/healthz", method="GET", status="200") == 8
    assert sample(text, "segapp_requests_total", route="other", method="GET", status="404") == 2
    assert sample(text, "segapp_request_duration_seconds_count", route="/healthz") == 8
    assert sample(text, "segapp_requests_in_flight") == 0
    assert sample(text, "segapp_model_info", name="segapp-unet", version="1.0.0", engine="zeros") == 1


def test_exited_worker_leaves_the_in_flight_sum(tmp_path, app_for, fake_segmenter):
    environ = {**os.environ, MULTIPROCESS_ENV: str(tmp_path), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    stuck = WORKER + "app.metrics.in_flight.inc()\nprint(__import__('os').getpid())\n"
    done = subprocess.run([sys.executable, "-c", stuck, "1"], env=environ, cwd=REPO, capture_output=True, check=True)
    scrape = Metrics(tmp_path)
    assert sample(scrape.exposition()[0].decode(), "segapp_requests_in_flight") == 1
    scrape.forget_process(int(done.stdout))
    # With no live worker the gauge has no samples at all.
    assert (sample(scrape.exposition()[0].decode(), "segapp_requests_in_flight") or 0) == 0
    # Counters of the exited worker still count.
    assert sample(scrape.exposition()[0].decode(), "segapp_requests_total", route="/healthz", method="GET",
                  status="200") == 1


@pytest.mark.parametrize("environ, multiprocess", [({}, False), ({MULTIPROCESS_ENV: ""}, False),
                                                   ({MULTIPROCESS_ENV: "/run/segapp-metrics"}, True)])
def test_from_env_chooses_multiprocess_mode_by_variable(environ, multiprocess):
    metrics = Metrics.from_env(environ)
    assert (metrics.multiprocess_dir is not None) is multiprocess
    assert (metrics.registry is None) is multiprocess
