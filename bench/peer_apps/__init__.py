"""The peers of bench/peers.py: the work of segapp's POST /infer (segapp's own `Segmenter.segment` and `mask_to_png`,
the shipped default model, a PNG mask) served by Flask under gunicorn and by FastAPI under uvicorn, with nothing of
segapp's serving around it: `flask_app` and `fastapi_app`, each a `create_app()` factory that its server calls in
each worker after the fork (gunicorn without --preload, uvicorn --factory), so each worker loads its own engine as
segapp's uWSGI workers do (lazy-apps).

They run from build/peers-venv (`make bench-peers`), which has Flask, gunicorn, FastAPI and uvicorn; this module
imports none of them.
"""

from __future__ import annotations

from segapp.config import Settings
from segapp.inference import SHIPPED_MODEL, Segmenter
from segapp.masks import mask_to_png


def load_segmenter(settings: Settings | None = None) -> Segmenter:
    """The shipped default model (the repository's default, segapp-unet), loaded and warmed as segapp's workers load
    it: SEGAPP_THREADS engine threads and the decode budgets of `settings` (default: from SEGAPP_* variables)."""
    settings = settings or Settings.from_env()
    return Segmenter(SHIPPED_MODEL, threads=settings.threads, max_pixels=settings.max_pixels,
                     max_decode_bytes=settings.max_decode_bytes,
                     decode_cpu_seconds=settings.decode_cpu_seconds).load()


def png_mask(segmenter: Segmenter, data: bytes) -> bytes:
    """The palette PNG mask of the image in `data`: the body segapp's POST /infer answers. Raises
    `segapp.imaging.ImageError` for bytes that are not a usable image."""
    return mask_to_png(segmenter.segment(data).mask, segmenter.card["palette"])
