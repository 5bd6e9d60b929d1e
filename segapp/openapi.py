"""The API's OpenAPI 3.1 description: segapp/openapi.yaml, the one source, served by the app as JSON.

It lives in the package (setup.cfg's package_data), so an installed segapp (the container image) serves it too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml

DESCRIPTION = Path(__file__).resolve().parent / "openapi.yaml"
# The inference path as the description names it; SEGAPP_ROUTE may serve it elsewhere.
DESCRIBED_ROUTE = "/infer"


def load_description(path: Path = DESCRIPTION) -> dict:
    """The description in `path` (the package's openapi.yaml) as a dict."""
    with open(path, encoding="utf-8") as file:
        return yaml.safe_load(file)


@functools.cache
def description_json(route: str = DESCRIBED_ROUTE, path: Path = DESCRIPTION) -> bytes:
    """The description as JSON, its inference path renamed to `route`; read once per process."""
    description = load_description(path)
    description["paths"] = {
        (route if template == DESCRIBED_ROUTE else template): item for template, item in description["paths"].items()
    }
    return json.dumps(description, separators=(",", ":")).encode()
