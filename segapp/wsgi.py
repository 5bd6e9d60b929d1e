"""What servers load: `application` (uWSGI: `module = segapp.wsgi:application`), and `make_app`, which builds the app
from settings: the model repository loaded, metrics, logging.

In a uWSGI worker (lazy-apps: imported after the fork) the models are loaded and warmed at import, so a bad setting or
model stops the server at start-up, in one line, and no request pays for the load. Anywhere else (tests, waitress,
gunicorn) importing is cheap and the app is made on the first request.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from webob.exc import HTTPServiceUnavailable

from segapp.access import send_json_lines_bare
from segapp.app import SegmentationApp
from segapp.config import Settings, SettingsError
from segapp.errors import api_error, render_error, request_id_for
from segapp.inference import Segmenter
from segapp.keys import KeyFile, KeyFileError
from segapp.metrics import Metrics
from segapp.repository import ModelLoadError, ModelRepository

log = logging.getLogger(__name__)
# uWSGI's exit status for an app that cannot load: its master stops instead of respawning the worker (need-app).
_FAILED_APP_STATUS = 22


class DelayedEngine:
    """An engine that sleeps before each prediction: SEGAPP_ENGINE_DELAY_MS, for tests of upstream timeouts."""

    def __init__(self, engine, delay_ms: int):
        self.engine = engine
        self.delay = delay_ms / 1000
        self.name = getattr(engine, "name", type(engine).__name__)

    def __getattr__(self, name):
        return getattr(self.engine, name)  # input, outputs

    def predict(self, batch, output: int = 0):
        time.sleep(self.delay)
        return self.engine.predict(batch, output)


class FailingEngine(DelayedEngine):
    """An engine whose every prediction raises: SEGAPP_ENGINE_FAULT, for tests of the error alerts."""

    def __init__(self, engine):
        super().__init__(engine, 0)

    def predict(self, batch, output: int = 0):
        raise RuntimeError("SEGAPP_ENGINE_FAULT: this engine fails every prediction (test only)")


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Log segapp's lines to stderr at `level`, for servers that configure no logging of their own. `log_format`
    json: the access lines (segapp.access) are bare JSON objects; every other line, tracebacks too, stays text."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("segapp").setLevel(level)
    if log_format == "json":
        send_json_lines_bare(logging.getLogger("segapp.access"))


def make_app(settings: Settings | None = None, segmenter: Segmenter | None = None,
             metrics: Metrics | None = None, repository: ModelRepository | None = None,
             strict: bool = True, served_default: str | None = None) -> SegmentationApp:
    """The WSGI app for `settings` (default: from SEGAPP_* variables).

    Without `repository` (or one `segmenter`, served as a repository of one), loads and warms the models the settings
    name: SEGAPP_MODEL, else SEGAPP_MODEL_REPOSITORY (this takes the time; do it in each worker after the fork).
    `strict`: a model version that fails to load raises `ModelLoadError` instead of being refused; `served_default`,
    the default model a running server serves, is kept when nothing else names one. Without `metrics`,
    metrics are multiprocess when PROMETHEUS_MULTIPROC_DIR is set.
    """
    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:
        configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("segapp").setLevel(settings.log_level)
    if repository is None:
        repository = (ModelRepository.of(segmenter) if segmenter is not None
                      else load_models(settings, strict, served_default))
    for served in repository.segmenters():
        if settings.engine_delay_ms and served.engine is not None:
            served.engine = DelayedEngine(served.engine, settings.engine_delay_ms)
        if settings.engine_fault and served.engine is not None:
            served.engine = FailingEngine(served.engine)
    metrics = metrics or Metrics.from_env()
    for served in repository.segmenters():
        if served.ready:
            metrics.set_model(served.card)
    # A keys file that cannot be read stops the start (KeyFileError), like a model that cannot load.
    keys = KeyFile(settings.api_keys_file) if settings.api_keys_file else None
    return SegmentationApp(settings, repository, metrics, keys=keys)


def load_models(settings: Settings, strict: bool = True, served_default: str | None = None) -> ModelRepository:
    """The repository the settings name, every served version loaded: SEGAPP_MODEL's one file, or the folder.
    `served_default`: the default model a running server serves (segapp.repository.ModelRepository.load)."""
    options = {"threads": settings.threads, "max_pixels": settings.max_pixels,
               "max_decode_bytes": settings.max_decode_bytes, "decode_cpu_seconds": settings.decode_cpu_seconds}
    if settings.model is not None:
        try:
            return ModelRepository.of(Segmenter(settings.model, **options).load())
        except Exception as error:  # the runtimes raise their own kinds for a broken file
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ModelLoadError(f"SEGAPP_MODEL={settings.model}: {reason}") from None
    return ModelRepository.load(settings.model_repository, settings.default_model, strict, served_default, **options)


class LazyApplication:
    """A WSGI callable that makes `make_app()` on its first request, so importing this module is cheap.

    If making the app fails (a bad setting, a missing model), the request gets a JSON 503 `not_ready`, the
    traceback goes to the log, and the next request tries again.
    """

    def __init__(self, factory=make_app):
        self._factory = factory
        self._app = None
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if self._app is None:
            with self._lock:
                if self._app is None:
                    try:
                        self._app = self._factory()
                    except Exception:
                        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID"))
                        log.exception("could not make the app request_id=%s", request_id)
                        error = api_error(HTTPServiceUnavailable, "not_ready",
                                          "the service could not load its model; see the server log", retry_after=1)
                        response = render_error(error, request_id)
                        response.headers["X-Request-ID"] = request_id
                        return response(environ, start_response)
        return self._app(environ, start_response)


def _inside_uwsgi() -> bool:
    try:
        import uwsgi
    except ImportError:
        return False
    # uWSGI's embedded module has worker_id(); a folder named uwsgi/ on sys.path imports as an empty namespace.
    return hasattr(uwsgi, "worker_id")


def _uwsgi_worker_application() -> SegmentationApp:
    import uwsgi

    try:
        settings = Settings.from_env()
        # The first workers of a master are strict: a model that cannot load stops the server. Once one has loaded,
        # a worker that starts (chain reload, respawn) refuses a broken new version and serves the one before it.
        loaded = settings.loaded_file
        served_default = loaded.read_text().strip() or None if loaded and loaded.exists() else None
        app = make_app(settings, strict=not (loaded and loaded.exists()), served_default=served_default)
    except (ModelLoadError, SettingsError, KeyFileError) as error:
        # One line, no traceback: this is the operator's mistake, not the program's.
        log.critical("cannot start: %s", error)
        sys.exit(_FAILED_APP_STATUS)
    if loaded:  # names the default model it serves, which a reload keeps when nothing else names one
        loaded.write_text(app.repository.default_model + "\n")
    pid = os.getpid()
    # A worker that stops (reload, max-requests) leaves the summed in-flight and model-info gauges at once, and its
    # counters move into the metrics folder's archive. A killed worker never runs this: the next worker to start, or
    # the next scrape, finds it dead (Metrics made the worker enter the folder) and does the same.
    uwsgi.atexit = lambda: app.metrics.forget_process(pid)
    return app


application = _uwsgi_worker_application() if _inside_uwsgi() else LazyApplication()
