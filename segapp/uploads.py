"""The image a POST carries: the raw body, or the `image` file of a multipart form, read within the size limit.

The limit is enforced before anything is read when the client states a Content-Length, and while reading
otherwise (a chunked body), so an oversized body is never held in memory whole.
"""

from __future__ import annotations

from webob import Request
from webob.exc import HTTPBadRequest, HTTPRequestEntityTooLarge, HTTPUnsupportedMediaType

from segapp.errors import api_error

FORM_FIELD = "image"
_RAW_TYPES = ("application/octet-stream",)
_CHUNK_BYTES = 64 * 1024


def check_media_type(request: Request) -> str:
    """The request's media type if segapp takes it, else 415.

    Taken: image/*, application/octet-stream, multipart/form-data, and no Content-Type at all (read as
    octet-stream: the bytes themselves say what image they are).
    """
    media_type = request.content_type.lower()  # WebOb drops the parameters; "" when absent
    if not media_type or media_type in _RAW_TYPES or media_type.startswith("image/"):
        return media_type
    if media_type == "multipart/form-data":
        return media_type
    raise api_error(
        HTTPUnsupportedMediaType, "unsupported_media_type",
        f"Content-Type {media_type!r} is not accepted; send the image bytes as image/* or "
        f"application/octet-stream, or as the file field {FORM_FIELD!r} of multipart/form-data",
    )


def read_image(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a POST whose media type passed `check_media_type`; 413 over `max_bytes`."""
    body = read_body(request.environ, max_bytes)
    if request.content_type.lower() != "multipart/form-data":
        return body
    return _form_image(request, body)


def read_body(environ: dict, max_bytes: int) -> bytes:
    """The request body, at most `max_bytes` of it: 413 from Content-Length before reading, or as soon as a
    chunked body passes the limit."""
    stream = environ["wsgi.input"]
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared:
        try:
            length = int(declared)
        except ValueError:
            length = -1
        if length < 0:
            raise api_error(HTTPBadRequest, "bad_request", f"Content-Length {declared!r} is not a number of bytes")
        if length > max_bytes:
            raise _too_large(max_bytes, f"{length} bytes")
        return _read_exactly(stream, length)
    # Without Content-Length a WSGI app may read only when the server says the stream ends by itself.
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not (environ.get("wsgi.input_terminated") or chunked):
        return b""
    parts, total = [], 0
    while True:
        part = stream.read(min(_CHUNK_BYTES, max_bytes + 1 - total))
        if not part:
            return b"".join(parts)
        total += len(part)
        if total > max_bytes:
            raise _too_large(max_bytes, "longer")
        parts.append(part)


def _read_exactly(stream, length: int) -> bytes:
    parts, left = [], length
    while left > 0:
        part = stream.read(min(left, 1024 * 1024))
        if not part:
            break  # the client sent less than it declared; the image decoder will say it is truncated
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _too_large(max_bytes: int, size: str):
    return api_error(
        HTTPRequestEntityTooLarge, "body_too_large",
        f"the request body is {size}, over the limit of {max_bytes} bytes",
    )


def _form_image(request: Request, body: bytes) -> bytes:
    request.body = body  # parse what was read within the limit, not the stream again
    try:
        field = request.POST.get(FORM_FIELD)
    except (ValueError, UnicodeDecodeError) as error:
        raise api_error(HTTPBadRequest, "bad_multipart", f"the multipart body cannot be parsed: {error}") from None
    upload = getattr(field, "file", None)
    if upload is None:
        raise api_error(
            HTTPBadRequest, "missing_image_field",
            f"the multipart form has no file field {FORM_FIELD!r} (curl -F {FORM_FIELD}=@photo.jpg)",
        )
    return upload.read()
