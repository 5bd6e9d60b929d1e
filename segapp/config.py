"""Settings: one frozen dataclass, built once from SEGAPP_* environment variables.

No other module reads os.environ for its own settings; they are handed a `Settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from PIL import Image

from segapp.imaging import DEFAULT_DECODE_BYTES, DEFAULT_DECODE_CPU_SECONDS
from segapp.inference import SHIPPED_REPOSITORY

FORMATS = ("png", "json", "overlay", "cutout")
# The service's own paths (the try-it page at /, the Open Inference Protocol under /v2): SEGAPP_ROUTE cannot be one.
RESERVED_ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/models", "/openapi.json", "/v2")
# segapp.imaging keeps Pillow's process-wide guard, which refuses larger images whatever segapp's own limit says.
PILLOW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


class SettingsError(ValueError):
    """An environment variable holds a value segapp cannot use; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """segapp's settings. Each field's environment variable is SEGAPP_ + its name in upper case."""

    model: Path | None = None
    """SEGAPP_MODEL: serve this one network file (.tflite for LiteRT, .keras or a SavedModel folder for TensorFlow,
    .onnx for ONNX Runtime), its card the .json beside it: a repository of one model. Unset: SEGAPP_MODEL_REPOSITORY."""
    model_repository: Path = SHIPPED_REPOSITORY
    """SEGAPP_MODEL_REPOSITORY: the folder of models to serve, DIR/NAME/model.json and DIR/NAME/N/model.*
    (docs/models.md). Default: the shipped repository, segapp/models (the demonstration model, and `person` where
    `make models` fetched it)."""
    default_model: str | None = None
    """SEGAPP_DEFAULT_MODEL: the model that answers requests that name none. Default: the repository's
    repository.json "default_model", or its only model."""
    loaded_file: Path | None = None
    """SEGAPP_LOADED_FILE: made by the first worker that has loaded its models. While it exists, a worker that starts
    (a chain reload, a respawn) refuses a model version that fails to load and keeps serving the one before it;
    without it, such a version stops the server. uwsgi/segapp.ini names RUN/loaded and removes it at the master's
    start."""
    threads: int = 1
    """SEGAPP_THREADS: engine threads per worker. Workers x threads should equal the cores."""
    route: str = "/infer"
    """SEGAPP_ROUTE: the path that takes POSTed images (the seed project's APP_ROOT)."""
    max_body_bytes: int = 10 * 1024 * 1024
    """SEGAPP_MAX_BODY_BYTES: larger request bodies get 413 before they are read. Keep nginx's
    client_max_body_size equal."""
    max_pixels: int = 40_000_000
    """SEGAPP_MAX_PIXELS: larger images get 413 from their header, before they are decoded. At most Pillow's own
    guard against decompression bombs (Image.MAX_IMAGE_PIXELS, 89,478,485), which stays on."""
    max_decode_bytes: int = DEFAULT_DECODE_BYTES
    """SEGAPP_MAX_DECODE_BYTES: the memory one image's decoding may hold, estimated from its header (format, mode,
    size, a progressive JPEG's coefficients) before it is decoded; a larger one gets 413 `decode_budget_exceeded`.
    288 MiB takes a 40-megapixel RGB JPEG (a progressive one too, 265 MiB as an overlay) or PNG, an RGBA PNG of up to
    37 megapixels and a WebP of up to 16.7."""
    decode_cpu_seconds: float = DEFAULT_DECODE_CPU_SECONDS
    """SEGAPP_DECODE_CPU_SECONDS: the CPU time one image's decoding may take: refused before decoding when a JPEG's
    scans are estimated to take longer, stopped when it runs over (413 `decode_budget_exceeded`). The slowest
    40-megapixel photographs within the memory budget decode in under 1 s here (docs/benchmarks.md)."""
    default_format: str = "png"
    """SEGAPP_DEFAULT_FORMAT: the answer when the client states no preference: png, json or overlay."""
    log_level: str = "INFO"
    """SEGAPP_LOG_LEVEL: level of the segapp loggers."""
    log_format: str = "text"
    """SEGAPP_LOG_FORMAT: the access lines, text (for people: `make serve`) or json (one JSON object per request per
    layer, for an operator's tools: the container image). json also makes nginx log JSON (nginx/render.py) and turns
    uWSGI's own request line off (uwsgi/segapp.ini). Other lines, tracebacks included, stay text. Lower case only:
    uWSGI's ini compares the value as written."""
    engine_delay_ms: int = 0
    """SEGAPP_ENGINE_DELAY_MS: test only; sleep this long in every inference to exercise timeouts. Keep 0."""
    engine_fault: int = 0
    """SEGAPP_ENGINE_FAULT: test only; 1 makes every inference raise (a 500 counted in /metrics) to exercise the
    error alerts (deploy/prometheus). Keep 0."""
    api_keys_file: Path | None = None
    """SEGAPP_API_KEYS_FILE: when set, the inference, model and metrics routes take only requests with
    `Authorization: Bearer <key>` of a key in this file (segapp/keys.py, `segapp-keys`), checked by nginx before it
    reads a body (nginx/render.py); the probes and the page do not. Read again whenever it changes."""
    drain_file: Path | None = None
    """SEGAPP_DRAIN_FILE: while this file exists the instance is draining: /readyz answers 503 `draining`, so that a
    load balancer stops sending to it, and every other route is served as usual. uwsgi/segapp.ini names
    RUN/draining; uwsgi/serve creates it on SIGTERM for SEGAPP_DRAIN_SECONDS before it stops uWSGI."""

    def __post_init__(self):
        problems = {
            "threads": self.threads < 1,
            "route": not self.route.startswith("/") or self.route in RESERVED_ROUTES
            or self.route.startswith(("/v2/", "/v1/models/")),
            "max_body_bytes": self.max_body_bytes < 1,
            "max_pixels": not 1 <= self.max_pixels <= PILLOW_MAX_PIXELS,
            "max_decode_bytes": self.max_decode_bytes < 1,
            "decode_cpu_seconds": not 0 < self.decode_cpu_seconds <= 3600,
            "default_format": self.default_format not in FORMATS,
            "log_level": self.log_level not in LOG_LEVELS,
            "log_format": self.log_format not in LOG_FORMATS,
            "engine_delay_ms": self.engine_delay_ms < 0,
            "engine_fault": self.engine_fault not in (0, 1),
        }
        for name, bad in problems.items():
            if bad:
                raise SettingsError(f"{env_name(name)}={getattr(self, name)!r} is not valid: {_HINTS[name]}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from the SEGAPP_* variables of `environ` (default: os.environ); unset ones keep defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw.strip())
        return cls(**values)


_HINTS = {
    "threads": "a whole number of at least 1",
    "route": "a path beginning with / that is not one of the service's own routes",
    "max_body_bytes": "a whole number of bytes of at least 1",
    "max_pixels": f"a whole number from 1 to {PILLOW_MAX_PIXELS} (Pillow refuses larger images)",
    "max_decode_bytes": "a whole number of bytes of at least 1",
    "decode_cpu_seconds": "a number of seconds above 0, at most 3600",
    "default_format": "one of " + ", ".join(FORMATS),
    "model": "a network file",
    "log_level": "one of " + ", ".join(LOG_LEVELS),
    "log_format": "one of " + ", ".join(LOG_FORMATS),
    "engine_delay_ms": "a whole number of milliseconds, 0 or more",
    "engine_fault": "0 or 1",
}


def env_name(field_name: str) -> str:
    return "SEGAPP_" + field_name.upper()


def _parse(name: str, kind: str, raw: str):
    if kind == "int":
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise SettingsError(f"{env_name(name)}={raw!r} is not valid: {_HINTS[name]}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{env_name(name)}={raw!r} is not valid: {_HINTS[name]}") from None
    if kind in ("Path", "Path | None"):
        return Path(raw)
    if name == "default_model":
        return raw
    return raw.upper() if name == "log_level" else raw
