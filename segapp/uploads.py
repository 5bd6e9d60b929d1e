"""The image a POST carries: the raw body, or the `image` file of a multipart form, read within the size limit.

The limit is enforced before anything is read when the client states a Content-Length, and while reading
otherwise (a chunked body), so an oversized body is never held in memory whole. A multipart body is split on its
boundary here, not by WebOb's `request.POST`, which parses every field it holds: 140,000 empty fields in 9 MB
cost 4.8 s of a worker. Here the parts are counted first (one `bytes.count`) and a form of more than
`MAX_FORM_PARTS` is refused unread; only part headers are parsed, and the `image` file is sliced out.
"""

from __future__ import annotations

from email.message import Message

from webob import Request
from webob.exc import HTTPBadRequest, HTTPRequestEntityTooLarge, HTTPUnsupportedMediaType

from segapp.errors import api_error

FORM_FIELD = "image"
_RAW_TYPES = ("application/octet-stream",)
_CHUNK_BYTES = 64 * 1024
# An HTML form sends one part per field; a few dozen is generous for a form whose one field that matters is a file.
MAX_FORM_PARTS = 32
# A part's headers (Content-Disposition, Content-Type) are a few hundred bytes.
_MAX_PART_HEADER_BYTES = 8 * 1024


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
    return form_image(request.headers.get("Content-Type", ""), body)


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


def discard_body(environ: dict, max_bytes: int) -> None:
    """Read and drop what is left of a request body of a declared Content-Length of at most `max_bytes`.

    Behind nginx every body has a Content-Length. A larger body was refused unread on purpose, and a chunked one
    is left to the WSGI server, which ends it itself.
    """
    try:
        left = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    if left > max_bytes:
        return
    stream = environ["wsgi.input"]
    while left > 0:
        part = stream.read(min(left, _CHUNK_BYTES))
        if not part:
            return
        left -= len(part)


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


def form_image(content_type: str, body: bytes) -> bytes:
    """The content of the file field `image` of a multipart/form-data `body` (RFC 7578); 400 when the form is
    malformed, has more than `MAX_FORM_PARTS` parts, has no such file field, or has two fields of that name."""
    boundary = _header_param(content_type, "content-type", "boundary")
    if not boundary or len(boundary) > 70:
        raise _bad_multipart("the Content-Type has no boundary of 1 to 70 characters")
    delimiter = b"\r\n--" + boundary.encode("latin-1", "replace")
    body = b"\r\n" + body  # the first delimiter may open the body, with no line break before it
    parts = body.count(delimiter) - 1  # the last delimiter closes the form
    if parts > MAX_FORM_PARTS:
        raise api_error(
            HTTPBadRequest, "too_many_form_parts",
            f"the multipart form has {parts} parts; at most {MAX_FORM_PARTS} are read, and one file field "
            f"{FORM_FIELD!r} is all this service needs",
        )
    chunks = body.split(delimiter)
    closed = [index for index, chunk in enumerate(chunks) if index and chunk.startswith(b"--")]
    if not closed:
        raise _bad_multipart("the body has no closing boundary")
    fields = []  # (disposition, content) of each part named FORM_FIELD
    for chunk in chunks[1 : closed[0]]:
        headers, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator or len(headers) > _MAX_PART_HEADER_BYTES:
            raise _bad_multipart("a part has no blank line after its headers")
        disposition = _part_header(headers, b"content-disposition")
        if _header_param(disposition, "content-disposition", "name") == FORM_FIELD:
            fields.append((disposition, content))
    if len(fields) > 1:
        raise api_error(HTTPBadRequest, "duplicate_image_field",
                        f"the multipart form has {len(fields)} fields {FORM_FIELD!r}; send one image")
    if not fields or _header_param(fields[0][0], "content-disposition", "filename") is None:
        raise api_error(
            HTTPBadRequest, "missing_image_field",
            f"the multipart form has no file field {FORM_FIELD!r} (curl -F {FORM_FIELD}=@photo.jpg)",
        )
    return fields[0][1]


def _part_header(headers: bytes, name: bytes) -> str:
    """The value of header `name` (lower case) in a part's header block, or ""."""
    for line in headers.split(b"\r\n"):
        field, colon, value = line.partition(b":")
        if colon and field.strip().lower() == name:
            return value.strip().decode("utf-8", "replace")
    return ""


def _header_param(value: str, header: str, param: str) -> str | None:
    """Parameter `param` of a header value such as `form-data; name="image"` (quotes and RFC 2231 undone)."""
    message = Message()
    message[header] = value
    found = message.get_param(param, header=header)
    if isinstance(found, tuple):  # RFC 2231: (charset, language, value)
        found = found[2]
    return found if isinstance(found, str) else None


def _bad_multipart(reason: str):
    return api_error(HTTPBadRequest, "bad_multipart", f"the multipart body cannot be parsed: {reason}")
