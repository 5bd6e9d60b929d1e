"""The bytes of an answer to POST {route}: a palette PNG of the mask, JSON with it in base64, a JPEG overlay, or an
RGBA cutout, each drawn with the answering model's classes, colours and foreground classes."""

from __future__ import annotations

import base64
import json

from webob import Response

from segapp.inference import Segmentation, Segmenter
from segapp.masks import cutout_png, mask_to_png, overlay_to_jpeg

# The largest cutout: its PNG keeps the photograph's own detail, 2-3 bytes a pixel, so 16 megapixels is an answer of
# up to about 50 MB; a larger image is refused from its header (413 answer_too_large), before it is decoded.
MAX_CUTOUT_PIXELS = 16_000_000


def encode(answer: str, result: Segmentation, segmenter: Segmenter) -> bytes:
    """`answer` (png, json, overlay or cutout) for `result`, segmented by `segmenter`."""
    card, contract = segmenter.card, segmenter.contract
    if answer == "overlay":
        return overlay_to_jpeg(result.image, result.mask, card["palette"])
    if answer == "cutout":
        return cutout_png(result.image, result.mask, contract.foreground)
    png = mask_to_png(result.mask, card["palette"])
    if answer == "png":
        return png
    classes = list(card["classes"])
    height, width = result.mask.shape
    fractions = zip(classes, result.class_fractions(len(classes)), strict=True)
    return json_bytes({
        "width": width,
        "height": height,
        "classes": classes,
        "fractions": {name: round(share, 6) for name, share in fractions},
        "mask": base64.b64encode(png).decode("ascii"),
        "model": model_summary(card),
    })


def model_summary(card: dict) -> dict:
    """The model that answered, as answers name it: name, version, engine."""
    return {key: card.get(key, "unknown") for key in ("name", "version", "engine")}


def json_bytes(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def json_response(value) -> Response:
    """`value` as a compact JSON answer."""
    return Response(body=json_bytes(value), content_type="application/json", charset=None)
