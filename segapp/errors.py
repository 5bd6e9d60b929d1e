"""HTTP errors as JSON: every rejection is a `webob.exc` exception, rendered as
`{"error": {"code", "message", "request_id"}}` at the app's boundary.

Handlers raise `api_error(HTTPBadRequest, "bad_format", "...")`; the app catches `HTTPException` once and
returns `render_error(exc, request_id)`, which keeps the exception's status and headers (such as `Allow`).
"""

from __future__ import annotations

import json
import re
import uuid

from webob import exc as webob_exc

from segapp.imaging import ImageError, ImageTooLargeError, UnsupportedImageFormatError

# A request ID from a client or from nginx's $request_id is echoed only when it is this plain.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Codes for statuses raised without one of their own (404 from routing, 500 from the boundary...).
_DEFAULT_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "not_ready",
}


def api_error(status: type[webob_exc.WSGIHTTPException], code: str, message: str, **headers):
    """A `webob.exc` exception of class `status` that renders with `code` and `message`.

    `headers` are response attributes, e.g. `allow=("POST",)`.
    """
    error = status(detail=message, **headers)
    error.api_code = code
    return error


def render_error(error: webob_exc.WSGIHTTPException, request_id: str) -> webob_exc.WSGIHTTPException:
    """`error` with its JSON body set; status and headers unchanged. Returns the same object."""
    code = getattr(error, "api_code", None) or _DEFAULT_CODES.get(error.status_code, "error")
    message = error.detail or error.title
    error.content_type = "application/json"
    error.charset = None
    error.body = json.dumps({"error": {"code": code, "message": message, "request_id": request_id}}).encode()
    return error


def request_id_for(header_value: str | None) -> str:
    """The request's ID: the client's (or nginx's) X-Request-ID when it is sane, else a new one."""
    if header_value and _SANE_REQUEST_ID.fullmatch(header_value):
        return header_value
    return uuid.uuid4().hex


def image_error(error: ImageError, prefix: str = "") -> webob_exc.WSGIHTTPException:
    """The rejection of bytes that are no image segapp can segment: 413 for an image over a limit or a budget, 415 for
    a format it does not take, 400 for the rest; the message is `prefix` and the error's."""
    if isinstance(error, ImageTooLargeError):
        status = webob_exc.HTTPRequestEntityTooLarge
    elif isinstance(error, UnsupportedImageFormatError):
        status = webob_exc.HTTPUnsupportedMediaType
    else:
        status = webob_exc.HTTPBadRequest
    return api_error(status, error.code, prefix + str(error))
