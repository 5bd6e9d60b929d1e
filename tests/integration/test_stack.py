"""Through nginx to uWSGI's workers and back: answers, headers, nginx's 413, metrics, stats, socket and users."""

from __future__ import annotations

import base64
import grp
import io
import json
import os
import pwd
import re
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segapp.inference import SHIPPED_MODEL, card_path

pytestmark = pytest.mark.integration

SHIPPED_RELEASE = json.loads(card_path(SHIPPED_MODEL).read_text())["release"]


def test_jpeg_gets_png_mask_of_same_size(stack, jpeg):
    answer = stack.infer(jpeg)
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "image/png"
    mask = Image.open(io.BytesIO(answer.body))
    assert mask.size == (640, 480)
    assert mask.mode == "P"
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}


def test_json_answer(stack, jpeg):
    answer = stack.infer(jpeg, "?format=json")
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert (body["width"], body["height"]) == (640, 480)
    assert Image.open(io.BytesIO(base64.b64decode(body["mask"]))).size == (640, 480)
    assert body["model"] == {"name": "segapp-unet", "version": "1", "engine": "litert"}
    assert answer.headers["X-Model"] == "segapp-unet/1"


def test_overlay_answer(stack, jpeg):
    answer = stack.infer(jpeg, "?format=overlay")
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(answer.body)).size == (640, 480)


def test_model_card_through_nginx(stack):
    answer = stack.request("GET", "/v1/model")
    assert answer.status == 200
    assert (answer.json()["version"], answer.json()["release"]) == ("1", SHIPPED_RELEASE)


def test_client_request_id_reaches_the_app_and_comes_back(stack, jpeg):
    request_id = f"it-{uuid.uuid4().hex}"
    answer = stack.infer(jpeg, headers={"X-Request-ID": request_id})
    assert answer.status == 200
    assert answer.headers.get_all("X-Request-ID") == [request_id]  # once: nginx's copy, the app's is hidden
    assert _log_lines_with(stack, request_id, r"POST /infer 200 .*worker=\d+")


def test_nginx_request_id_when_the_client_sends_none(stack, jpeg):
    answer = stack.infer(jpeg)
    request_id = answer.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)  # nginx's $request_id
    assert _log_lines_with(stack, request_id, r"POST /infer 200")


def test_unsafe_client_request_id_is_replaced(stack):
    answer = stack.request("GET", "/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-ID"])


def test_server_timing_and_security_headers_pass_through(stack, jpeg):
    answer = stack.infer(jpeg)
    timing = answer.headers["Server-Timing"]
    for stage in ("decode", "infer", "encode", "total"):
        assert re.search(rf"\b{stage};dur=\d", timing), timing
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Server"] == "nginx"  # no version: server_tokens off


def test_body_over_client_max_body_size_is_nginx_json_413(stack):
    request_id = f"it-big-{uuid.uuid4().hex}"
    body = b"\xff" * (10 * 1024 * 1024 + 1)
    answer = stack.request("POST", "/infer", body, {"Content-Type": "image/jpeg", "X-Request-ID": request_id})
    assert answer.status == 413
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    error = answer.json()["error"]
    assert error == {"code": "body_too_large", "message": error["message"], "request_id": request_id}
    time.sleep(0.5)
    assert request_id not in stack.log().replace("client intended to send too large body", "")  # uWSGI never saw it


def test_app_errors_pass_through_untouched(stack):
    answer = stack.request("POST", "/infer", b"not an image", {"Content-Type": "image/jpeg"})
    assert answer.status == 400
    assert answer.json()["error"]["request_id"] == answer.headers["X-Request-ID"]
    assert stack.request("GET", "/nowhere").json()["error"]["code"] == "not_found"


def test_metrics_through_nginx_sum_all_workers(stack, jpeg):
    served_before = _requests_by_worker(stack)
    before = _infer_count(stack)
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(lambda _: stack.infer(jpeg).status, range(24)))
    assert statuses == [200] * 24
    assert _infer_count(stack) - before == 24
    deadline = time.monotonic() + 5  # a worker counts a request just after its answer has left
    while True:
        served = {pid: count - served_before.get(pid, 0) for pid, count in _requests_by_worker(stack).items()}
        if sum(served.values()) >= 26 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Both workers took some of these 24 images and the two scrapes of /metrics, and /metrics counted them all.
    assert sorted(served) == sorted(served_before) and all(count > 0 for count in served.values()), served
    # (a request of the test before may be counted after the first reading: at least, not exactly)
    assert sum(served.values()) >= 24 + 2, served


def test_stats_socket_has_one_entry_per_worker(stack):
    stats = stack.stats()
    assert len(stats["workers"]) == 2
    pids = [worker["pid"] for worker in stats["workers"]]
    assert len(set(pids)) == 2 and all(pid > 0 for pid in pids)
    assert {"requests", "rss", "status", "avg_rt"} <= set(stats["workers"][0])


def test_socket_mode_660(stack):
    mode = os.stat(stack.run_dir / "app.sock").st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_workers_do_not_run_as_root(stack, run_as):
    user, why = run_as
    if os.geteuid() != 0 or user is None:
        pytest.skip(why)
    uids = {_real_uid(pid) for pid in stack.worker_pids()}
    assert 0 not in uids
    assert uids == {_uid_of(user)}
    socket_stat = os.stat(stack.run_dir / "app.sock")
    assert (socket_stat.st_uid, socket_stat.st_gid) == (_uid_of(user), _gid_of(user))


def test_nginx_runs_under_sched_batch_and_the_workers_do_not(stack):
    """nginx yields to a busy worker instead of preempting it (uwsgi/local.ini); the workers keep the default policy,
    so a worker woken by nginx still gets a CPU at once."""
    workers = set(stack.worker_pids())
    nginx = [pid for pid in stack.processes() - workers - {stack.process.pid}
             if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx")]
    assert len(nginx) >= 2  # its master and its worker
    assert {os.sched_getscheduler(pid) for pid in nginx} == {os.SCHED_BATCH}
    assert {os.sched_getscheduler(pid) for pid in workers} == {os.SCHED_OTHER}

def _log_lines_with(stack, request_id: str, pattern: str) -> list[str]:
    """uWSGI's request log lines that carry `request_id` and match `pattern` (written just after the answer)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in stack.log().splitlines()
                 if f"request_id={request_id}" in line and re.search(pattern, line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def _requests_by_worker(stack) -> dict[int, int]:
    return {worker["pid"]: worker["requests"] for worker in stack.stats()["workers"]}


def _infer_count(stack) -> float:
    text = stack.request("GET", "/metrics").body.decode()
    pattern = r'^segapp_requests_total\{(?=[^}]*route="/infer")(?=[^}]*status="200")[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.M))


def _real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def _gid_of(user: str) -> int:
    return grp.getgrnam(user).gr_gid
