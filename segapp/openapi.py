"""The API's OpenAPI 3.1 description: segapp/openapi.yaml, the one source, served by the app as JSON.

It is read as a resource of the installed package (setup.cfg's package_data), not from a path beside this module, so
an installed segapp (the container image, a wheel, even a zipped one) serves the description it was installed with.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DESCRIPTION = resources.files("segapp") / "openapi.yaml"
# The inference path as the description names it; SEGAPP_ROUTE may serve it elsewhere.
DESCRIBED_ROUTE = "/infer"


def load_description(resource: Traversable = DESCRIPTION) -> dict:
    """The description in `resource` (the package's openapi.yaml) as a dict."""
    return yaml.safe_load(resource.read_text(encoding="utf-8"))


@functools.cache
def description_json(route: str = DESCRIBED_ROUTE, resource: Traversable = DESCRIPTION) -> bytes:
    """The description as JSON, its inference path renamed to `route`; read once per process."""
    description = load_description(resource)
    description["paths"] = {
        (route if template == DESCRIBED_ROUTE else template): item for template, item in description["paths"].items()
    }
    return json.dumps(description, separators=(",", ":")).encode()
