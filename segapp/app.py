"""The WSGI application: HTTP in, calls to the repository's segmenters, HTTP out. WebOb requests and responses, no
framework.

    POST {route}      image bytes (or multipart field "image") -> PNG mask, JSON, JPEG overlay or RGBA cutout;
                      ?model=NAME&version=N pick the model (default: the repository's default, its served version)
    GET  /healthz     liveness        GET /readyz   readiness (503 until the models are loaded and warm)
    GET  /v1/models[/NAME[/versions/N]]  the repository: models, versions, states, cards
    GET  /v1/model    the default model's card  GET /metrics  Prometheus text format
    GET  /openapi.json  the OpenAPI 3.1 description of these routes (segapp/openapi.yaml)
    GET  /.segapp/key   with SEGAPP_API_KEYS_FILE: nginx's check of a request's API key (auth_request), 204 naming
                      the key or 401; never reached by clients (nginx's location is internal)
    /v2/...           the Open Inference Protocol (KServe v2): segapp.inference_protocol lists its routes

`SegmentationApp(settings, repository, metrics)` is the app; segapp.wsgi builds it (`make_app`) and holds what uWSGI
loads.
"""

from __future__ import annotations

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
    HTTPServiceUnavailable,
    HTTPUnauthorized,
)

from segapp.access import access_fields, json_line
from segapp.answers import json_response, model_summary
from segapp.config import Settings
from segapp.errors import api_error, render_error, request_id_for
from segapp.inference_protocol import protocol_error_body
from segapp.keys import KeyFile
from segapp.metrics import Metrics
from segapp.openapi import description_json
from segapp.repository import ModelRepository
from segapp.resources import ModelResource, ProtocolResource, require_ready
from segapp.uploads import discard_body

log = logging.getLogger(__name__)
access_log = logging.getLogger("segapp.access")

# Metric labels take the method only from this set, so a client cannot grow the label's values.
_METHOD_LABELS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
_READ_METHODS = ("GET", "HEAD")
# A model's routes in the Open Inference Protocol: /v2/models/{name}, optionally /versions/{version}, then more.
_V2_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_V1_MODEL = r"/v1/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
# nginx asks the app here whether a request's key is valid (nginx/segapp.conf, auth_request), before it reads a body.
KEY_CHECK_PATH = "/.segapp/key"


class SegmentationApp:
    """The WSGI callable. `__call__` builds a `webob.Request`, `dispatch` finds the `on_<endpoint>` handler.

    Every answer, error or not, carries X-Request-ID and Server-Timing; every rejection is a `webob.exc`
    exception rendered as JSON at one place; nothing raises out of `__call__`.
    """

    def __init__(self, settings: Settings, repository: ModelRepository, metrics: Metrics, clock=time.perf_counter,
                 keys: KeyFile | None = None):
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.clock = clock
        self.keys = keys
        resources = (self, ModelResource(settings, repository, metrics, clock),
                     ProtocolResource(settings, repository, metrics, self.on_readyz, clock))
        # endpoint -> its resource's on_<endpoint> handler
        self.handlers = {name[3:]: getattr(resource, name) for resource in resources for name in dir(resource)
                         if name.startswith("on_")}
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
        if self.keys is not None and environ.get("PATH_INFO") == KEY_CHECK_PATH:
            return self.check_key(environ)(environ, start_response)
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

    def check_key(self, environ) -> Response:
        """nginx's question, for a request it has not read the body of: is its Authorization a key of the keys
        file? 204 with X-Segapp-Key (the key's name) or 401 with WWW-Authenticate (RFC 6750), which nginx passes on.
        Neither is counted as a request nor logged as one: the request it checks is."""
        authorization = environ.get("HTTP_AUTHORIZATION")
        key = self.keys.current().check(authorization)
        self.metrics.key_checks.labels("accepted" if key else "refused" if authorization else "missing").inc()
        if key:
            response = Response(status=204)
            response.headers["X-Segapp-Key"] = key.name
            return response
        challenge = 'Bearer realm="segapp"' + (', error="invalid_token"' if authorization else "")
        error = api_error(HTTPUnauthorized, "unauthorized", "this route needs an API key: Authorization: Bearer <key>"
                          if not authorization else "the API key is not valid: unknown, revoked or mistyped")
        response = render_error(error, request_id_for(environ.get("HTTP_X_REQUEST_ID")))
        response.headers["WWW-Authenticate"] = challenge
        return response

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
        return self.handlers[endpoint](request, **parameters)

    def on_healthz(self, request: Request) -> Response:
        """Liveness: 200 whenever the process can answer."""
        return json_response({"status": "ok"})

    def on_readyz(self, request: Request) -> Response:
        """Readiness: 200 once the model is loaded and warm; 503 before, while the instance drains, and while its run
        folder is full."""
        require_ready(self.repository)
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
        return json_response({"status": "ready", "model": model_summary(self.repository.default.card)})

    def on_metrics(self, request: Request) -> Response:
        """Prometheus text format, summed over worker processes in multiprocess mode."""
        body, content_type = self.metrics.exposition()
        response = Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    def on_openapi(self, request: Request) -> Response:
        """The OpenAPI 3.1 description of this API (segapp/openapi.yaml) as JSON, naming this app's inference path."""
        return Response(body=description_json(self.settings.route), content_type="application/json", charset=None)

    def _account(self, request: Request, path: str | None, response: Response, request_id: str,
                 elapsed: float) -> None:
        route = "other" if path is None else self.route(path)[1]
        method = request.method if request.method in _METHOD_LABELS else "other"
        self.metrics.observe_request(route, method, response.status_code, elapsed)
        # nginx names the key it accepted (X-Segapp-Key); a name not in the file is counted as "other".
        key = request.environ.get("HTTP_X_SEGAPP_KEY")
        if key and self.keys is not None:
            known = key in self.keys.current().names
            self.metrics.key_requests.labels(key if known else "other", str(response.status_code)).inc()
        if path is None:  # not UTF-8: logged with its bytes escaped
            path = request.environ.get("PATH_INFO", "").encode("latin-1", "replace").decode("utf-8", "backslashreplace")
        if self.settings.log_format == "json":
            fields = access_fields(
                method, path, response.status_code, request.content_length or 0, response.content_length or 0,
                request_id, response.headers, request.environ.get("REMOTE_ADDR"), key,
            )
            access_log.info("%s", json_line(fields))
        else:  # the default: no fields gathered, no Server-Timing read back, on every request
            access_log.info("%s %s %d %d %.1fms request_id=%s", method, path, response.status_code,
                            response.content_length or 0, elapsed * 1000, request_id)


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
