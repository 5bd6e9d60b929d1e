"""Which answer a client gets from POST /infer: `?format=` first, then the Accept header with its q-values."""

from __future__ import annotations

from webob import Request
from webob.exc import HTTPBadRequest, HTTPNotAcceptable

from segapp.errors import api_error

MEDIA_TYPES = {"png": "image/png", "json": "application/json", "overlay": "image/jpeg", "cutout": "image/png"}
# Answers an Accept header can choose; the cutout is a PNG too, so it is asked for by ?format=cutout (or made the
# default with SEGAPP_DEFAULT_FORMAT).
NEGOTIATED = ("png", "json", "overlay")


def choose_format(request: Request, default: str) -> str:
    """png, json, overlay or cutout for this request; 400 for an unknown ?format=, 406 when Accept allows none.

    With equal preference (no Accept, `*/*`, `image/*` for png and overlay) the default format wins, then
    png, json, overlay in that order.
    """
    try:
        asked = request.GET.get("format")
    except UnicodeDecodeError:
        raise api_error(HTTPBadRequest, "bad_format", "the query string is not valid UTF-8") from None
    if asked is not None:
        if asked not in MEDIA_TYPES:
            raise api_error(
                HTTPBadRequest, "bad_format", f"format {asked!r} is not one of {', '.join(MEDIA_TYPES)}"
            )
        return asked
    accept = request.environ.get("HTTP_ACCEPT")
    if accept is None or accept == "*/*":  # most clients (curl, requests, browsers' fetch): no parse needed
        return default
    by_type = {}
    for name in [default, *NEGOTIATED]:
        by_type.setdefault(MEDIA_TYPES[name], name)
    offers = request.accept.acceptable_offers(list(by_type))
    if not offers:
        raise api_error(
            HTTPNotAcceptable, "not_acceptable",
            f"Accept allows none of the answers offered: {', '.join(by_type)}",
        )
    return by_type[offers[0][0]]
