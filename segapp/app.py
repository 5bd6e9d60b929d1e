"""The WSGI application: HTTP in, calls to the repository's segmenters, HTTP out. WebOb requests and responses, no
framework.

    POST {route}      image bytes (or multipart field "image") -> PNG mask, JSON, JPEG overlay or RGBA cutout;
                      ?model=NAME&version=N pick the model (default: the repository's default, its served version)
    GET  /healthz     liveness        GET /readyz   readiness (503 until the models are loaded and warm)
    GET  /v1/models[/NAME[/versions/N]]  the repository: models, versions, states, cards
    GET  /v1/model    the default model's card  GET /metrics  Prometheus text format
    GET  /openapi.json  the OpenAPI 3.1 description of these routes (segapp/openapi.yaml)
    /v2/...           the Open Inference Protocol (KServe v2): segapp.inference_protocol lists its routes

`SegmentationApp(settings, repository, metrics)` is the app; segapp.wsgi builds it (`make_app`) and holds what uWSGI
loads.
"""

from __future__ import annotations

import json
import logging
import re
import time

from webob import Request, Response
from webob.exc import (
    HTTPBadRequest,
    HTTPException,
    HTTPInternalServerError,
    HTTPMethodNotAllowed,
    HTTPNotFound,
    HTTPRequestEntityTooLarge,
    HTTPServiceUnavailable,
)

from segapp.answers import MAX_CUTOUT_PIXELS, encode, json_bytes, model_summary
from segapp.config import Settings
from segapp.errors import api_error, image_error, render_error, request_id_for
from segapp.imaging import ImageError, image_size
from segapp.inference import Segmenter
from segapp.inference_protocol import HEADER_LENGTH, InferenceProtocol, protocol_error_body, server_metadata
from segapp.metrics import Metrics
from segapp.negotiation import MEDIA_TYPES, choose_format
from segapp.openapi import description_json
from segapp.repository import ModelRepository, UnknownModel
from segapp.uploads import check_media_type, discard_body, read_body, read_image

log = logging.getLogger(__name__)
access_log = logging.getLogger("segapp.access")

# Metric labels take the method only from this set, so a client cannot grow the label's values.
_METHOD_LABELS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
_READ_METHODS = ("GET", "HEAD")
# A model's routes in the Open Inference Protocol: /v2/models/{name}, optionally /versions/{version}, then more.
_V2_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_V1_MODEL = r"/v1/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


class SegmentationApp:
    """The WSGI callable. `__call__` builds a `webob.Request`, `dispatch` finds the `on_<endpoint>` handler.

    Every answer, error or not, carries X-Request-ID and Server-Timing; every rejection is a `webob.exc`
    exception rendered as JSON at one place; nothing raises out of `__call__`.
    """

    def __init__(self, settings: Settings, repository: ModelRepository, metrics: Metrics, clock=time.perf_counter):
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.clock = clock
        self.protocol = InferenceProtocol(repository, settings.max_pixels, clock)
        # path -> (endpoint, methods allowed)
        self.routes = {
            settings.route: ("infer", ("POST",)),
            "/healthz": ("healthz", _READ_METHODS),
            "/readyz": ("readyz", _READ_METHODS),
            "/v1/model": ("model", _READ_METHODS),
            "/v1/models": ("models", _READ_METHODS),
            "/metrics": ("metrics", _READ_METHODS),
            "/openapi.json": ("openapi", _READ_METHODS),
            "/v2": ("v2_server", _READ_METHODS),
            "/v2/health/live": ("v2_live", _READ_METHODS),
            "/v2/health/ready": ("v2_ready", _READ_METHODS),
            "/v2/repository/index": ("v2_index", ("POST",)),
        }
        # Paths with parameters, tried in order after the exact ones: (pattern, route template for the metrics'
        # label, endpoint, methods allowed); the pattern's named groups are the handler's keyword arguments.
        self.patterns = [
            (re.compile(_V1_MODEL), "/v1/models/{name}", "model_entry", _READ_METHODS),
            (re.compile(_V2_MODEL), "/v2/models/{name}", "v2_model", _READ_METHODS),
            (re.compile(_V2_MODEL + "/ready"), "/v2/models/{name}/ready", "v2_model_ready", _READ_METHODS),
            (re.compile(_V2_MODEL + "/infer"), "/v2/models/{name}/infer", "v2_infer", ("POST",)),
        ]

    def __call__(self, environ, start_response):
        started = self.clock()
        request = Request(environ)
        request_id = request_id_for(environ.get("HTTP_X_REQUEST_ID"))
        path = request_path(environ)
        # A scrape does not count itself: an idle server reads 0 requests in flight.
        counted = path != "/metrics"
        if counted:
            self.metrics.in_flight.inc()
        try:
            response = self.dispatch(request, path)
        except HTTPException as error:
            response = self.render_error(path, error, request_id)
        except Exception:
            log.exception("unexpected error answering %s %r request_id=%s", request.method, path, request_id)
            error = HTTPInternalServerError(detail="unexpected error; see the server log")
            response = self.render_error(path, error, request_id)
        finally:
            if counted:
                self.metrics.in_flight.dec()
        # A worker that answers with the body unread closes a socket holding data, which resets it; nginx can then
        # lose the answer and send 502 (1 in 10,000 fuzzed requests). Whatever the route, read what is left, bounded.
        discard_body(environ, self.settings.max_body_bytes)
        elapsed = self.clock() - started
        response.headers["X-Request-ID"] = request_id
        timing = f"total;dur={elapsed * 1000:.2f}"
        stages = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{stages}, {timing}" if stages else timing
        try:
            self._account(request, path, response, request_id, elapsed)
        except Exception:  # metrics or a log handler failing must not cost the client its answer
            log.exception("could not record request_id=%s", request_id)
        return response(environ, start_response)

    def route(self, path: str) -> tuple[str | None, str, tuple[str, ...], dict[str, str]]:
        """(endpoint, route template, methods allowed, path parameters) for `path`; endpoint None when none."""
        if path in self.routes:
            endpoint, allowed = self.routes[path]
            return endpoint, path, allowed, {}
        for pattern, template, endpoint, allowed in self.patterns:
            if match := pattern.fullmatch(path):
                return endpoint, template, allowed, match.groupdict()
        return None, "other", (), {}

    def render_error(self, path: str | None, error: HTTPException, request_id: str) -> Response:
        """`error` as JSON: the Open Inference Protocol's `{"error": "..."}` under /v2, segapp's shape elsewhere."""
        response = render_error(error, request_id)
        if path is not None and (path == "/v2" or path.startswith("/v2/")):
            response.body = protocol_error_body(error)
        return response

    def dispatch(self, request: Request, path: str | None) -> Response:
        """The handler's response for `request` at `path` (None: not UTF-8); raises `webob.exc` exceptions for
        rejections."""
        if path is None:
            raise api_error(HTTPBadRequest, "bad_path", "the request path is not UTF-8 once its %XX escapes are undone")
        endpoint, _, allowed, parameters = self.route(path)
        if endpoint is None or "//" in path:
            # An empty segment names nothing (nginx merges slashes before it matches a location, so the app sees
            # the client's own path in REQUEST_URI).
            raise api_error(HTTPNotFound, "not_found", f"there is no resource at {path!r}")
        if request.method not in allowed:
            raise api_error(
                HTTPMethodNotAllowed, "method_not_allowed",
                f"{request.method} is not allowed on {path}; use {', '.join(allowed)}", allow=allowed,
            )
        return getattr(self, f"on_{endpoint}")(request, **parameters)

    def on_infer(self, request: Request) -> Response:
        """Segment the POSTed image with the model asked for; answer a PNG mask, JSON, a JPEG overlay or a cutout."""
        self._require_ready()
        check_media_type(request)
        answer = choose_format(request, self.settings.default_format)
        segmenter = self._model_asked(request)
        data = read_image(request, self.settings.max_body_bytes)
        try:
            if answer == "cutout":
                self._check_cutout(data, segmenter)
            result = segmenter.segment(data, full_pixels=answer in ("overlay", "cutout"))
        except ImageError as error:
            raise image_error(error) from None
        encode_started = self.clock()
        body = encode(answer, result, segmenter)
        timings = {**result.timings, "encode": self.clock() - encode_started}
        self.metrics.observe_inference(timings, int(result.mask.size), segmenter.name, segmenter.version)
        response = Response(body=body, content_type=MEDIA_TYPES[answer], charset=None)
        response.vary = ("Accept",)
        response.headers["X-Model"] = f"{segmenter.name}/{segmenter.version}"
        response.headers["Server-Timing"] = ", ".join(f"{name};dur={sec * 1000:.2f}" for name, sec in timings.items())
        return response

    def _model_asked(self, request: Request) -> Segmenter:
        """The segmenter of ?model= and ?version= (default: the default model, its highest served version); the
        query string was read as UTF-8 by `choose_format` before."""
        name, version = request.GET.get("model"), request.GET.get("version")
        try:
            return self.repository.get(name, version)
        except UnknownModel as error:
            raise api_error(HTTPNotFound, error.code, str(error)) from None

    def _check_cutout(self, data: bytes, segmenter: Segmenter) -> None:
        """413 from the image's header, before it is decoded, when its cutout would be over MAX_CUTOUT_PIXELS."""
        width, height = image_size(data, self.settings.max_pixels, segmenter.decode_cpu_seconds)
        if width * height > MAX_CUTOUT_PIXELS:
            raise api_error(
                HTTPRequestEntityTooLarge, "answer_too_large",
                f"a cutout of {width}x{height} pixels would be over the limit of {MAX_CUTOUT_PIXELS} pixels (a PNG "
                "of the photograph's own detail); ask for the mask (format=png) and apply it yourself",
            )

    def on_healthz(self, request: Request) -> Response:
        """Liveness: 200 whenever the process can answer."""
        return _json_response({"status": "ok"})

    def on_readyz(self, request: Request) -> Response:
        """Readiness: 200 once the model is loaded and warm; 503 before, while the instance drains, and while its run
        folder is full."""
        self._require_ready()
        drain_file = self.settings.drain_file
        if drain_file is not None and drain_file.exists():
            raise api_error(
                HTTPServiceUnavailable, "draining",
                "this instance is stopping; it still answers requests, but send new ones elsewhere", retry_after=1,
            )
        # Its workers still serve, but without metrics files: out of the balancer, and replaced with a fresh folder.
        if self.metrics.folder_full():
            raise api_error(
                HTTPServiceUnavailable, "run_folder_full",
                "the run folder's file system is full: this instance answers requests, but its workers' metrics are "
                "off; free or enlarge it (docs/operations.md, \"The run folder\")", retry_after=1,
            )
        return _json_response({"status": "ready", "model": model_summary(self.repository.default.card)})

    def on_model(self, request: Request) -> Response:
        """The default model's card: name, version, classes, palette, input, output, engine, measured quality."""
        self._require_ready()
        return _json_response(self.repository.default.card)

    def on_models(self, request: Request) -> Response:
        """The repository: the default model, and every model with its state, versions and card."""
        return _json_response(self.repository.describe())

    def on_model_entry(self, request: Request, name: str, version: str | None) -> Response:
        """One model of the repository (its state, versions and card), or one version of it (its state and reason,
        and the card it is served with); 404 naming what there is."""
        model = self.repository.models.get(name)
        if model is None:
            raise api_error(HTTPNotFound, "unknown_model",
                            f"unknown model {name!r}; served: {self.repository.names()}")
        if version is None:
            return _json_response(model.describe())
        versions = model.versions
        for entry in versions:
            if entry.version == version:
                card = entry.segmenter.card if entry.segmenter else None
                return _json_response({"name": name, **entry.describe(), "card": card})
        raise api_error(HTTPNotFound, "unknown_version", f"unknown version {version!r} of model {name!r}; versions: "
                        f"{', '.join(v.version for v in versions) or 'none'}")

    def on_metrics(self, request: Request) -> Response:
        """Prometheus text format, summed over worker processes in multiprocess mode."""
        body, content_type = self.metrics.exposition()
        response = Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    def on_openapi(self, request: Request) -> Response:
        """The OpenAPI 3.1 description of this API (segapp/openapi.yaml) as JSON, naming this app's inference path."""
        return Response(body=description_json(self.settings.route), content_type="application/json", charset=None)

    def on_v2_server(self, request: Request) -> Response:
        """Open Inference Protocol server metadata: name, version, extensions."""
        return _json_response(server_metadata())

    def on_v2_live(self, request: Request) -> Response:
        """Open Inference Protocol liveness: 200 whenever the process can answer."""
        return _json_response({"live": True})

    def on_v2_ready(self, request: Request) -> Response:
        """Open Inference Protocol readiness: as /readyz, 503 while the model loads or the instance drains."""
        self.on_readyz(request)  # raises its 503s
        return _json_response({"ready": True})

    def on_v2_model(self, request: Request, name: str, version: str | None) -> Response:
        """Open Inference Protocol model metadata: the input and outputs, their datatypes and shapes."""
        self._require_ready()
        segmenter = self.protocol.model(name, version)
        served = [entry.version for entry in self.repository.models[name].served]
        return _json_response(self.protocol.metadata(segmenter, [version] if version else served))

    def on_v2_model_ready(self, request: Request, name: str, version: str | None) -> Response:
        """Open Inference Protocol model readiness: 200 once the model is loaded, 503 before."""
        self._require_ready()
        self.protocol.model(name, version)
        return _json_response({"name": name, "ready": True})

    def on_v2_index(self, request: Request) -> Response:
        """The repository index (Triton's extension): every model version and its state; with {"ready": true}, those
        served only."""
        body = read_body(request.environ, self.settings.max_body_bytes)
        try:
            asked = json.loads(body) if body.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            asked = None
        if not isinstance(asked, dict) or not isinstance(asked.get("ready", False), bool):
            raise api_error(HTTPBadRequest, "bad_request", 'the index request is a JSON object, {"ready": true|false}')
        return _json_response(self.repository.index(ready_only=asked.get("ready", False)))

    def on_v2_infer(self, request: Request, name: str, version: str | None) -> Response:
        """Open Inference Protocol inference: JSON or binary tensors in, the mask (and class fractions) out."""
        # The body first, within the limit: answering with it unread would reset the socket under nginx.
        body = read_body(request.environ, self.settings.max_body_bytes)
        self._require_ready()
        segmenter = self.protocol.model(name, version)
        header_length = request.environ.get("HTTP_" + HEADER_LENGTH.upper().replace("-", "_"))
        parsed = self.protocol.parse(body, request.content_type.lower(), header_length)
        answer = self.protocol.answer(segmenter, parsed, self.protocol.infer(segmenter, parsed))
        for result in answer.segmentations:
            self.metrics.observe_inference(result.timings, int(result.mask.size), segmenter.name, segmenter.version)
        self.metrics.observe_inference({"encode": answer.timings["encode"]}, None, segmenter.name, segmenter.version)
        binary = answer.header_length is not None
        response = Response(body=answer.body, charset=None,
                            content_type="application/octet-stream" if binary else "application/json")
        if binary:
            response.headers[HEADER_LENGTH] = str(answer.header_length)
        response.headers["X-Model"] = f"{segmenter.name}/{segmenter.version}"
        response.headers["Server-Timing"] = ", ".join(
            f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in answer.timings.items()
        )
        return response

    def _require_ready(self) -> None:
        if not self.repository.default.ready:
            raise api_error(
                HTTPServiceUnavailable, "not_ready", "the model is loading; try again shortly", retry_after=1
            )

    def _account(self, request: Request, path: str | None, response: Response, request_id: str,
                 elapsed: float) -> None:
        route = "other" if path is None else self.route(path)[1]
        method = request.method if request.method in _METHOD_LABELS else "other"
        self.metrics.observe_request(route, method, response.status_code, elapsed)
        if path is None:  # not UTF-8: logged with its bytes escaped
            path = request.environ.get("PATH_INFO", "").encode("latin-1", "replace").decode("utf-8", "backslashreplace")
        access_log.info(
            "%s %s %d %d %.1fms request_id=%s",
            method, path, response.status_code, response.content_length or 0, elapsed * 1000, request_id,
        )


def request_path(environ: dict) -> str | None:
    """The request's path as text, or None when its bytes are not UTF-8 (WSGI hands them over as latin-1).

    Where the server passes the client's own URI (REQUEST_URI: uWSGI behind nginx, which merges "//" into "/"
    before the app sees PATH_INFO), an empty segment in it is kept, so that it is answered as the unknown path it is.
    """
    try:
        path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None
    raw = environ.get("REQUEST_URI", "").partition("?")[0]
    if "//" in raw and "//" not in path:
        return raw
    return path


def _json_response(value) -> Response:
    return Response(body=json_bytes(value), content_type="application/json", charset=None)
