"""The resources behind the routes, one per family, each a set of `on_<endpoint>` handlers (segapp.app routes to
them): `ModelResource`, segapp's own API (POST {route}, /v1/model, /v1/models...), and `ProtocolResource`, the Open
Inference Protocol (/v2/...). Both answer from the model repository; neither knows about routing or the access log.
"""

from __future__ import annotations

import json
import time

from webob import Request, Response
from webob.exc import HTTPBadRequest, HTTPNotFound, HTTPRequestEntityTooLarge, HTTPServiceUnavailable

from segapp.answers import MAX_CUTOUT_PIXELS, encode, json_response
from segapp.config import Settings
from segapp.errors import api_error, image_error
from segapp.imaging import ImageError, image_size
from segapp.inference import Segmenter
from segapp.inference_protocol import HEADER_LENGTH, InferenceProtocol, server_metadata
from segapp.metrics import Metrics
from segapp.negotiation import MEDIA_TYPES, choose_format
from segapp.repository import ModelRepository, UnknownModel
from segapp.uploads import check_media_type, read_body, read_image


class Resource:
    """What every resource answers from: the settings, the repository, the metrics, the clock."""

    def __init__(self, settings: Settings, repository: ModelRepository, metrics: Metrics, clock=time.perf_counter):
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.clock = clock

    def _require_ready(self) -> None:
        require_ready(self.repository)

    def _served(self, name: str | None, version: str | None) -> Segmenter:
        """The segmenter of model `name` (default: the default model), `version` (default: its highest served);
        404 naming what is served."""
        try:
            return self.repository.get(name, version)
        except UnknownModel as error:
            raise api_error(HTTPNotFound, error.code, str(error)) from None


def require_ready(repository: ModelRepository) -> None:
    """503 `not_ready` until the default model is loaded and warm."""
    if not repository.default.ready:
        raise api_error(HTTPServiceUnavailable, "not_ready", "the model is loading; try again shortly", retry_after=1)


class ModelResource(Resource):
    """segapp's own API: segment an image with a model of the repository, and describe the repository."""

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
        return self._served(request.GET.get("model"), request.GET.get("version"))

    def _check_cutout(self, data: bytes, segmenter: Segmenter) -> None:
        """413 from the image's header, before it is decoded, when its cutout would be over MAX_CUTOUT_PIXELS."""
        width, height = image_size(data, self.settings.max_pixels, segmenter.decode_cpu_seconds)
        if width * height > MAX_CUTOUT_PIXELS:
            raise api_error(
                HTTPRequestEntityTooLarge, "answer_too_large",
                f"a cutout of {width}x{height} pixels would be over the limit of {MAX_CUTOUT_PIXELS} pixels (a PNG "
                "of the photograph's own detail); ask for the mask (format=png) and apply it yourself",
            )

    def on_model(self, request: Request) -> Response:
        """The default model's card: name, version, classes, palette, input, output, engine, measured quality."""
        self._require_ready()
        return json_response(self.repository.default.card)

    def on_models(self, request: Request) -> Response:
        """The repository: the default model, and every model with its state, versions and card."""
        return json_response(self.repository.describe())

    def on_model_entry(self, request: Request, name: str, version: str | None) -> Response:
        """One model of the repository (its state, versions and card), or one version of it (its state and reason,
        and the card it is served with); 404 naming what there is."""
        model = self.repository.models.get(name)
        if model is None:
            raise api_error(HTTPNotFound, "unknown_model",
                            f"unknown model {name!r}; served: {self.repository.names()}")
        if version is None:
            return json_response(model.describe())
        versions = model.versions
        for entry in versions:
            if entry.version == version:
                card = entry.segmenter.card if entry.segmenter else None
                return json_response({"name": name, **entry.describe(), "card": card})
        raise api_error(HTTPNotFound, "unknown_version", f"unknown version {version!r} of model {name!r}; versions: "
                        f"{', '.join(v.version for v in versions) or 'none'}")


class ProtocolResource(Resource):
    """The Open Inference Protocol's routes over the repository (segapp.inference_protocol parses and encodes).
    `check_ready(request)` raises the service's readiness 503s (draining, run folder full)."""

    def __init__(self, settings: Settings, repository: ModelRepository, metrics: Metrics, check_ready,
                 clock=time.perf_counter):
        super().__init__(settings, repository, metrics, clock)
        self.check_ready = check_ready
        self.protocol = InferenceProtocol(settings.max_pixels, clock)

    def on_v2_server(self, request: Request) -> Response:
        """Open Inference Protocol server metadata: name, version, extensions."""
        return json_response(server_metadata())

    def on_v2_live(self, request: Request) -> Response:
        """Open Inference Protocol liveness: 200 whenever the process can answer."""
        return json_response({"live": True})

    def on_v2_ready(self, request: Request) -> Response:
        """Open Inference Protocol readiness: as /readyz, 503 while the model loads or the instance drains."""
        self.check_ready(request)  # /readyz's 503s
        return json_response({"ready": True})

    def on_v2_model(self, request: Request, name: str, version: str | None) -> Response:
        """Open Inference Protocol model metadata: the input and outputs, their datatypes and shapes."""
        self._require_ready()
        segmenter = self._served(name, version)
        served = [entry.version for entry in self.repository.models[name].served]
        return json_response(self.protocol.metadata(segmenter, [version] if version else served))

    def on_v2_model_ready(self, request: Request, name: str, version: str | None) -> Response:
        """Open Inference Protocol model readiness: 200 once the model is loaded, 503 before."""
        self._require_ready()
        self._served(name, version)
        return json_response({"name": name, "ready": True})

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
        return json_response(self.repository.index(ready_only=asked.get("ready", False)))

    def on_v2_infer(self, request: Request, name: str, version: str | None) -> Response:
        """Open Inference Protocol inference: JSON or binary tensors in, the mask (and class fractions) out."""
        # The body first, within the limit: answering with it unread would reset the socket under nginx.
        body = read_body(request.environ, self.settings.max_body_bytes)
        self._require_ready()
        segmenter = self._served(name, version)
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
