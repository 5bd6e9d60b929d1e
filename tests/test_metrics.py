"""segapp.metrics: what /metrics shows after requests, in one process and summed over worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from webtest import TestApp

from segapp.config import Settings
from segapp.metrics import MULTIPROCESS_ENV, Metrics
from segapp.metrics_folder import MetricsFolder

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
        assert sample(text, "segapp_stage_duration_seconds_count", stage=stage, model="segapp-unet", version="1") == 2
    assert sample(text, "segapp_image_pixels_count", model="segapp-unet", version="1") == 2
    assert sample(text, "segapp_image_pixels_sum", model="segapp-unet", version="1") == 40 * 25 + 400 * 300
    assert sample(text, "segapp_image_pixels_bucket", model="segapp-unet", version="1", le="1e+06") == 2
    assert sample(text, "segapp_model_info", name="segapp-unet", version="1", engine="stripes") == 1
    # The scrape does not count itself: nothing else is in flight.
    assert sample(text, "segapp_requests_in_flight") == 0


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
from segapp.engines import TensorSpec
from segapp.inference import Segmenter
from segapp.wsgi import make_app

class ZeroEngine:
    name = "zeros"
    input = TensorSpec("image", (None, 128, 128, 3), "float32")
    outputs = [TensorSpec("logits", (None, 128, 128, 3), "float32")]
    def predict(self, batch, output=0):
        return np.zeros(batch.shape[:3] + (3,), np.float32)

app = make_app(Settings(), segmenter=Segmenter(engine=ZeroEngine()).load())  # metrics from the environment
for _ in range(int(sys.argv[1])):
    assert Request.blank("/healthz").get_response(app).status_int == 200
assert Request.blank("/nope").get_response(app).status_int == 404
print("ready", flush=True)
sys.stdin.readline()  # alive until the test closes stdin
"""

# A process that answers `argv[1]` requests and then has one in flight, as a worker killed while busy.
BUSY = """
import sys
from segapp.metrics import Metrics
metrics = Metrics.from_env()
for _ in range(int(sys.argv[1])):
    metrics.observe_request("/infer", "POST", 200, 0.02)
metrics.in_flight.inc()
print("ready", flush=True)
sys.stdin.readline()
"""


def start(script: str, folder: Path, *args) -> subprocess.Popen:
    """A Python process running `script` with PROMETHEUS_MULTIPROC_DIR=`folder`; returns once it printed "ready"."""
    environ = {**os.environ, MULTIPROCESS_ENV: str(folder), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    process = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=environ, cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise AssertionError(process.communicate()[1])
    return process


def end(process: subprocess.Popen, kill: bool = False) -> None:
    if kill:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def scrape(folder: Path) -> str:
    return Metrics(folder).exposition()[0].decode()


def infer_total(text: str) -> float:
    return sample(text, "segapp_requests_total", route="/infer", method="POST", status="200") or 0


def in_flight(text: str) -> float:
    # With no live process the gauge has no sample at all.
    return sample(text, "segapp_requests_in_flight") or 0


def files_of(folder: Path, pid: int) -> list[str]:
    return [path.name for path in folder.iterdir() if path.name.split(".")[0].rsplit("_", 1)[-1] == str(pid)]


def test_multiprocess_mode_sums_over_worker_processes(tmp_path, app_for, fake_segmenter):
    workers = [start(WORKER, tmp_path, count) for count in (3, 5)]
    scraper = app_for(fake_segmenter, Settings(), Metrics(tmp_path))
    text = scraper.get("/metrics").text
    assert sample(text, "segapp_requests_total", route="/healthz", method="GET", status="200") == 8
    assert sample(text, "segapp_requests_total", route="other", method="GET", status="404") == 2
    assert sample(text, "segapp_request_duration_seconds_count", route="/healthz") == 8
    assert sample(text, "segapp_requests_in_flight") == 0
    assert sample(text, "segapp_model_info", name="segapp-unet", version="1", engine="zeros") == 1
    for worker in workers:
        assert files_of(tmp_path, worker.pid)  # each worker wrote its own files
        end(worker)

    # Ended workers' counts stay in the sums, from the archive; their own files and live gauges are gone.
    text = scraper.get("/metrics").text
    assert sample(text, "segapp_requests_total", route="/healthz", method="GET", status="200") == 8
    assert sample(text, "segapp_request_duration_seconds_count", route="/healthz") == 8
    assert sample(text, "segapp_request_duration_seconds_bucket", route="/healthz", le="+Inf") == 8
    assert sample(text, "segapp_model_info", name="segapp-unet", version="1", engine="zeros") is None
    assert all(not files_of(tmp_path, worker.pid) for worker in workers)
    assert {"counter_archive.db", "histogram_archive.db"} <= set(os.listdir(tmp_path))


def test_killed_processes_leave_the_in_flight_sum_and_their_counts_stay(tmp_path):
    processes = [start(BUSY, tmp_path, count) for count in (3, 5, 7)]
    text = scrape(tmp_path)
    assert (infer_total(text), in_flight(text)) == (15, 3)
    files_before = len(os.listdir(tmp_path))

    end(processes[1], kill=True)
    text = scrape(tmp_path)
    assert (infer_total(text), in_flight(text)) == (15, 2)
    assert sample(text, "segapp_request_duration_seconds_count", route="/infer") == 15
    assert not files_of(tmp_path, processes[1].pid)
    assert len(os.listdir(tmp_path)) < files_before

    end(processes[0], kill=True)
    end(processes[2])  # exits without saying so, as after `kill -9` of uWSGI's master
    text = scrape(tmp_path)
    assert (infer_total(text), in_flight(text)) == (15, 0)
    assert sample(text, "segapp_request_duration_seconds_bucket", route="/infer", le="0.025") == 15
    assert sorted(name for name in os.listdir(tmp_path) if name.endswith(".db")) == [
        "counter_archive.db", "histogram_archive.db"]


def test_folder_stays_bounded_while_processes_come_and_go(tmp_path):
    sizes = []
    for count in range(1, 9):
        end(start(BUSY, tmp_path, count), kill=count % 2 == 0)
        sizes.append(len(os.listdir(tmp_path)))
    text = scrape(tmp_path)
    assert (infer_total(text), in_flight(text)) == (sum(range(1, 9)), 0)
    # Each process found its predecessor dead and merged it: archives, lock file, and at most one process's files.
    assert max(sizes) <= 2 + 1 + 4
    # After the scrape: the archives, the lock, and the scraping process's own alive lock.
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["counter_archive.db", "histogram_archive.db", "merge.lock", f"alive_{os.getpid()}.lock"])


def test_a_reused_pid_starts_from_nothing(tmp_path):
    # Files under this process's pid, as an earlier process with the same pid would have left them (killed busy).
    (tmp_path / "earlier").mkdir()
    end(start(BUSY, tmp_path / "earlier", 4), kill=True)
    for path in (tmp_path / "earlier").glob("*_*.db"):
        prefix = path.name.rsplit("_", 1)[0]
        path.rename(tmp_path / f"{prefix}_{os.getpid()}.db")
    assert in_flight(scrape_files_only(tmp_path)) == 1

    MetricsFolder(tmp_path).enter()
    text = scrape(tmp_path)
    assert (infer_total(text), in_flight(text)) == (4, 0)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(f"_{os.getpid()}.db")]


def scrape_files_only(folder: Path) -> str:
    """The sums of the folder's files as plain prometheus_client reads them: no merge, no lock."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return generate_latest(registry).decode()


class KilledAfterReplacing(MetricsFolder):
    """Dies (raises) once its merged archives have replaced the old ones, before it deletes what they absorbed."""

    def _finish_journal(self):
        if os.path.exists(self._journal_path) and self.path and not getattr(self, "died", False):
            self.died = True
            raise SystemExit("killed")
        super()._finish_journal()


def test_a_merge_killed_half_way_counts_nothing_twice(tmp_path):
    end(start(BUSY, tmp_path, 6))
    end(start(BUSY, tmp_path, 5))  # its enter() merges the first into the archive
    with pytest.raises(SystemExit):
        KilledAfterReplacing(tmp_path).sweep()
    # The archive holds 11 and the second process's files still exist: read naively, 16.
    assert infer_total(scrape_files_only(tmp_path)) == 16
    assert infer_total(scrape(tmp_path)) == 11
    assert "merge.journal" not in os.listdir(tmp_path)


def test_exited_worker_leaves_the_in_flight_sum(tmp_path, app_for, fake_segmenter):
    environ = {**os.environ, MULTIPROCESS_ENV: str(tmp_path), "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    stuck = WORKER.replace("print(", "app.metrics.in_flight.inc()\nprint(__import__('os').getpid())\nprint(")
    done = subprocess.run([sys.executable, "-c", stuck, "1"], env=environ, cwd=REPO, capture_output=True, check=True,
                          input="\n", text=True)
    pid = int(done.stdout.split()[0])
    # The worker exited without forgetting itself: plain prometheus_client still counts it in flight.
    assert in_flight(scrape_files_only(tmp_path)) == 1
    Metrics(tmp_path).forget_process(pid)
    assert in_flight(scrape_files_only(tmp_path)) == 0
    # Counters of the exited worker still count.
    assert sample(scrape(tmp_path), "segapp_requests_total", route="/healthz", method="GET", status="200") == 1


@pytest.mark.parametrize("variable, multiprocess", [(None, False), ("", False), ("folder", True)])
def test_from_env_chooses_multiprocess_mode_by_variable(tmp_path, variable, multiprocess):
    environ = {} if variable is None else {MULTIPROCESS_ENV: str(tmp_path) if variable else ""}
    metrics = Metrics.from_env(environ)
    assert (metrics.multiprocess_dir is not None) is multiprocess
    assert (metrics.registry is None) is multiprocess


def test_readyz_says_when_the_metrics_folder_is_full(tmp_path, app_for, fake_segmenter):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    roomy = app_for(fake_segmenter, Settings(), Metrics(tmp_path, min_free_bytes=free // 2))
    assert roomy.get("/readyz").json["status"] == "ready"
    full = app_for(fake_segmenter, Settings(), Metrics(tmp_path, min_free_bytes=free * 2))
    answer = full.get("/readyz", status=503)
    assert answer.json["error"]["code"] == "run_folder_full"
    assert answer.headers["Retry-After"] == "1"
    full.get("/v2/health/ready", status=503)
    full.get("/healthz", status=200)  # it still serves
