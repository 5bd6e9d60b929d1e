"""SEGAPP_LOG_FORMAT=json through the real stack: one JSON line from nginx and one from the app per request, the same
request ID in both, and none from uWSGI."""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.integration


def test_json_logs_one_nginx_and_one_app_line_per_request(stack_factory, jpeg):
    stack = stack_factory(SEGAPP_LOG_FORMAT="json")
    inference_id, missing_id = f"log-infer-{uuid.uuid4().hex}", f"log-404-{uuid.uuid4().hex}"
    answer = stack.infer(jpeg, query="?format=png", headers={"X-Request-ID": inference_id})
    assert answer.status == 200
    assert stack.request("GET", "/nowhere", headers={"X-Request-ID": missing_id}).status == 404

    nginx_lines = _lines_with(lambda: (stack.run_dir / "nginx" / "access.log").read_text(), (inference_id, missing_id))
    app_lines = _lines_with(stack.log, (inference_id, missing_id))
    for request_id in (inference_id, missing_id):
        assert len(nginx_lines[request_id]) == 1, nginx_lines
        # In uWSGI's log: the app's JSON line and nothing else, no uWSGI request line ("worker=", "rss=").
        assert len(app_lines[request_id]) == 1, app_lines
    nginx = {request_id: json.loads(lines[0]) for request_id, lines in nginx_lines.items()}
    app = {request_id: json.loads(lines[0]) for request_id, lines in app_lines.items()}

    assert {line["layer"] for line in nginx.values()} == {"nginx"}
    assert {line["layer"] for line in app.values()} == {"app"}
    inference = nginx[inference_id]
    assert (inference["method"], inference["uri"], inference["status"]) == ("POST", "/infer?format=png", 200)
    assert inference["client"] == "127.0.0.1"
    assert inference["bytes_in"] > len(jpeg) and inference["bytes_out"] > len(answer.body)
    assert inference["request_time"] >= 0 and inference["upstream_time"] != "-"
    assert (nginx[missing_id]["uri"], nginx[missing_id]["status"]) == ("/nowhere", 404)

    model, version = answer.headers["X-Model"].rsplit("/", 1)
    assert (app[inference_id]["model"], app[inference_id]["version"]) == (model, version)
    assert (app[inference_id]["status"], app[inference_id]["bytes_in"]) == (200, len(jpeg))
    assert app[inference_id]["bytes_out"] == len(answer.body)
    assert {"decode", "infer", "encode", "total"} <= set(app[inference_id]["timings_ms"])
    assert (app[missing_id]["path"], app[missing_id]["status"]) == ("/nowhere", 404)
    assert "model" not in app[missing_id]
    # uWSGI's own lines stay (text), its request lines are off.
    log = stack.log()
    assert "spawned uWSGI worker" in log
    assert "worker=" not in log and " rss=" not in log


def _lines_with(read, request_ids: tuple[str, ...]) -> dict[str, list[str]]:
    """The lines of `read()` that carry each request ID, once every ID is there (a line is written just after its
    answer) or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        lines = read().splitlines()
        found = {request_id: [line for line in lines if request_id in line] for request_id in request_ids}
        if all(found.values()) or time.monotonic() > deadline:
            time.sleep(0.2)  # a second line for the same request, if any, would be written by now
            lines = read().splitlines()
            return {request_id: [line for line in lines if request_id in line] for request_id in request_ids}
        time.sleep(0.1)
