"""The app's access line: one per request, as text for people or as one JSON object for an operator's tools
(SEGAPP_LOG_FORMAT). It holds what only the app knows (the model and version that answered, the stage timings) and
never a body, a header's value or a traceback.

    text: POST /infer 200 3166 27.0ms request_id=...    (written by segapp.app itself)
    json: {"time": "...", "layer": "app", "request_id": "...", "method": "POST", "path": "/infer", "status": 200, ...}
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone

# Server-Timing's entries as the app writes them: "decode;dur=1.20, infer;dur=20.31, total;dur=27.02".
_TIMING = re.compile(r"([A-Za-z0-9_-]+);dur=([0-9.]+)")


def access_fields(method: str, path: str, status: int, bytes_in: int, bytes_out: int, request_id: str,
                  headers, client: str | None, key: str | None = None) -> dict:
    """The fields of one access line. `headers`: the answer's, read for X-Model ("name/version") and Server-Timing
    (milliseconds per stage, "total" the whole request in the app). `key`: the API key's name nginx accepted."""
    fields = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "layer": "app",
        "request_id": request_id,
        "client": client,
        "method": method,
        "path": path,
        "status": status,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }
    if key:
        fields["key"] = key
    model = headers.get("X-Model")
    if model:
        name, _, version = model.rpartition("/")
        fields["model"], fields["version"] = name, version
    fields["timings_ms"] = {stage: float(ms) for stage, ms in _TIMING.findall(headers.get("Server-Timing", ""))}
    # The worker that answered (uWSGI's own request line, which named it, is off in json mode).
    fields["pid"] = os.getpid()
    return fields


def json_line(fields: dict) -> str:
    """One JSON object on one line (ASCII: a path's odd characters escaped)."""
    return json.dumps(fields, separators=(",", ":"))


def send_json_lines_bare(logger: logging.Logger, stream=None) -> None:
    """Write `logger`'s lines as they are, one per line on stderr (or `stream`), without the time, level and name
    that the other lines get: a JSON access line must be the whole line for a log shipper to parse it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
