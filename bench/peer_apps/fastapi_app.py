"""POST /infer as a FastAPI app: the body's image in, its PNG mask out (bench/peer_apps/__init__.py).

    build/peers-venv/bin/uvicorn --workers 2 --factory bench.peer_apps.fastapi_app:create_app

uvicorn's workers call the factory after they start, one engine per worker. The handler is `async def` and runs the
pipeline on the event loop: one image at a time per worker, as segapp's workers run them (the engine is not
thread-safe, and a `def` handler would run in FastAPI's thread pool, several at once on one engine), while the loop
still reads other requests' bodies between two images.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from bench.peer_apps import load_segmenter, png_mask
from segapp.imaging import ImageError


def create_app() -> FastAPI:
    """The FastAPI app, its model loaded."""
    app = FastAPI()
    segmenter = load_segmenter()

    @app.post("/infer")
    async def infer(request: Request) -> Response:
        try:
            return Response(png_mask(segmenter, await request.body()), media_type="image/png")
        except ImageError as error:
            return JSONResponse({"error": {"code": error.code, "message": str(error)}}, status_code=400)

    @app.get("/readyz")
    async def ready() -> dict:
        return {"ready": segmenter.ready}

    return app
