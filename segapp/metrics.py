"""Prometheus metrics of the service, with prometheus_client.

Under uWSGI each worker is its own process, so one scrape of /metrics must sum over all of them:
prometheus_client's multiprocess mode does that when PROMETHEUS_MULTIPROC_DIR names a writable folder that
exists before the workers start (and is emptied when the master starts). The variable is prometheus_client's
own and it reads it when it is imported, so it must be in the environment of the process from the start
(uWSGI's `env =` option), not set later. Without it, each app keeps its metrics in a registry of its own.
The folder stays as small as the processes alive: see segapp.metrics_folder. Its files' space is reserved before they
are mapped, so a full folder costs a process its metrics files, never its life: see segapp.metrics_files.

Metrics (route = route template or "other", never the raw path, so the label has a handful of values):

    segapp_requests_total{route, method, status}     counter
    segapp_request_duration_seconds{route}           histogram, request in to response built
    segapp_stage_duration_seconds{stage, model, version}  histogram, stage = decode | infer | postprocess | encode
    segapp_image_pixels{model, version}              histogram, pixels of each image segmented
    segapp_requests_in_flight                        gauge, summed over live workers
    segapp_model_info{name, version, engine}         gauge, 1 per loaded model version

model and version are those of the repository's served versions (segapp.repository), a handful of values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from segapp.metrics_files import INITIAL_SIZE, reserved_value_class
from segapp.metrics_folder import MetricsFolder

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Below this much free space the folder counts as full (/readyz): a new worker's four files (64 KiB each) and a merge's
# new archives (a copy of the counter and histogram archives, 64 KiB each until hundreds of label sets) fit in it twice.
MIN_FREE_BYTES = 16 * INITIAL_SIZE

# Stages take from a fraction of a millisecond (encoding a small mask) to seconds (decoding a 40 MP image).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PIXEL_BUCKETS = (1e4, 6.6e4, 2.6e5, 1e6, 2e6, 4e6, 8e6, 1.6e7, 4e7)


class Metrics:
    """The service's metrics and their exposition.

    With `multiprocess_dir`, values live in that folder's files (written by every process that uses
    prometheus_client in multiprocess mode) and `exposition()` sums them; otherwise they live in a registry
    owned by this object, so several apps in one process (tests) never share or clash. In multiprocess mode the
    process enters the folder (`MetricsFolder.enter`) before it makes its metrics, so its files are merged away
    once it ends, however it ends.
    """

    def __init__(self, multiprocess_dir: str | os.PathLike | None = None, min_free_bytes: int = MIN_FREE_BYTES):
        self.multiprocess_dir = os.fspath(multiprocess_dir) if multiprocess_dir else None
        self.min_free_bytes = min_free_bytes
        self.folder = MetricsFolder(self.multiprocess_dir) if self.multiprocess_dir else None
        if self.folder:
            self.folder.enter()
        # In multiprocess mode metrics belong to no registry: their values are in files, read at scrape time.
        self.registry = None if self.multiprocess_dir else CollectorRegistry()
        self._children = {}
        registry = self.registry
        # Where prometheus_client maps files for values (PROMETHEUS_MULTIPROC_DIR was set when it was imported: every
        # uWSGI worker), they are mapped by segapp.metrics_files instead, which reserves their space first. Values of
        # labelled metrics are made at their first use, so the class stays set for the process.
        if self.folder and getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = reserved_value_class(self.multiprocess_dir)
        self.requests = Counter(
            "segapp_requests", "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"), registry=registry,
        )
        self.request_seconds = Histogram(
            "segapp_request_duration_seconds", "Time from request in to response built, by route template.",
            ("route",), buckets=REQUEST_BUCKETS, registry=registry,
        )
        self.stage_seconds = Histogram(
            "segapp_stage_duration_seconds", "Time spent in each inference stage, by model and version.",
            ("stage", "model", "version"), buckets=STAGE_BUCKETS, registry=registry,
        )
        self.image_pixels = Histogram(
            "segapp_image_pixels", "Pixels (width x height) of each image segmented, by model and version.",
            ("model", "version"), buckets=PIXEL_BUCKETS, registry=registry,
        )
        # By key name, never the key: the names come from the keys file, so the label's values are bounded by it.
        self.key_requests = Counter(
            "segapp_key_requests", "Requests answered by the app with an API key, by the key's name and status.",
            ("key", "status"), registry=registry,
        )
        self.key_checks = Counter(
            "segapp_key_checks", "API key checks made for nginx, by result: accepted, missing (no Bearer key) or "
            "refused (not a key here).", ("result",), registry=registry,
        )
        self.in_flight = Gauge(
            "segapp_requests_in_flight", "Requests being handled now.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "segapp_model_info", "Each model version being served (value 1).",
            ("name", "version", "engine"), registry=registry, multiprocess_mode="livemax",
        )

    def folder_full(self) -> bool:
        """In multiprocess mode, whether the metrics folder's file system has under `min_free_bytes` left."""
        if not self.folder:
            return False
        stats = os.statvfs(self.multiprocess_dir)
        return stats.f_bavail * stats.f_frsize < self.min_free_bytes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Metrics:
        """Multiprocess metrics when PROMETHEUS_MULTIPROC_DIR is set in `environ` (default: the process's)."""
        environ = os.environ if environ is None else environ
        return cls(environ.get(MULTIPROCESS_ENV) or None)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration."""
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.request_seconds, route).observe(seconds)

    def observe_inference(self, timings: Mapping[str, float], pixels: int | None, model: str, version: str) -> None:
        """Record the stage durations (seconds by stage name) and the size of one image segmented (None: no image,
        a batch's encoding) by `model` `version`."""
        for stage, seconds in timings.items():
            self._child(self.stage_seconds, stage, model, version).observe(seconds)
        if pixels is not None:
            self._child(self.image_pixels, model, version).observe(pixels)

    def _child(self, metric, *labels: str):
        """`metric.labels(*labels)`, kept: prometheus_client checks and converts the labels, under a lock, on each
        call (7 calls a request were 10 us of a worker's CPU; bench/app_overhead.py). The labels' values are
        bounded (the module's docstring), so are the children kept."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_model(self, card: Mapping) -> None:
        """Publish the model's name, version and engine."""
        self.model_info.labels(
            str(card.get("name", "unknown")), str(card.get("version", "unknown")), str(card.get("engine", "unknown")),
        ).set(1)

    def forget_process(self, pid: int) -> None:
        """In multiprocess mode, for process `pid` that has ended or is exiting: drop its live gauges from the sums
        and merge its counters and histograms into the folder's archive (their counts stay in the sums)."""
        if self.folder:
            self.folder.retire([pid])

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of all metrics (summed over processes in multiprocess mode), and its
        Content-Type."""
        if not self.folder:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        # Files are read while generate_latest runs: no merge may move counts between files meanwhile.
        with self.folder.reading():
            return generate_latest(registry), CONTENT_TYPE_LATEST
