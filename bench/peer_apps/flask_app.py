"""POST /infer as a Flask app: the body's image in, its PNG mask out (bench/peer_apps/__init__.py).

    build/peers-venv/bin/gunicorn --workers 2 'bench.peer_apps.flask_app:create_app()'

gunicorn's sync workers call the factory after the fork, one engine per worker; one request at a time each.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from bench.peer_apps import load_segmenter, png_mask
from segapp.imaging import ImageError


def create_app() -> Flask:
    """The Flask app, its model loaded."""
    app = Flask(__name__)
    segmenter = load_segmenter()

    @app.post("/infer")
    def infer():
        try:
            return Response(png_mask(segmenter, request.get_data()), mimetype="image/png")
        except ImageError as error:
            return jsonify(error={"code": error.code, "message": str(error)}), 400

    @app.get("/readyz")
    def ready():
        return jsonify(ready=segmenter.ready)

    return app
