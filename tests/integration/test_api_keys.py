"""API keys through the real stack (SEGAPP_API_KEYS_FILE, segapp-keys, nginx's key check and per-key limits): which
routes need a key, 401 for no key, a wrong one and a revoked one, a key over its own limits, 1,000 guesses from one
address, a 40 MB upload without a key answered before its body, keys added, rotated and removed under load, metrics
and log lines by key name, and tritonclient with the header. One stack; each test keeps to its own keys and client
address (127.0.0.x), so that their limits do not meet."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from segapp.keys import KeyRing
from tests.integration.conftest import start_stack
from tests.integration.test_reliability import RequestStream

pytestmark = pytest.mark.integration

MODEL = "segapp-unet"
# Each test's own client address: the per-address limits (and the guesses' zone) are kept apart.
GUESSER, SLOW, LOADED, OTHER = "127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"
# The routes that need a key, one of each kind, and what answers them without one.
KEYED = [("POST", "/infer"), ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("GET", "/v1/model"),
         ("GET", "/metrics"), ("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
         ("POST", f"/v2/models/{MODEL}/infer")]
OPEN = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/app.js"]


class Keys:
    """The keys file, written by segapp-keys as an operator would (the keys themselves only in memory)."""

    def __init__(self, folder: Path):
        self.path = folder / "keys"
        self.keys: dict[str, str] = {}

    def run(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "segapp.keys", "--file", str(self.path), *args],
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def add(self, name: str, *limits: str) -> str:
        self.keys[name] = self.run("add", name, *limits)
        return self.keys[name]

    def rotate(self, name: str) -> str:
        self.keys[name] = self.run("rotate", name)
        return self.keys[name]

    def remove(self, name: str) -> None:
        self.run("remove", name)

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture(scope="module")
def keys():
    # The workers' user (www-data when the tests run as root) reads the file: a folder anyone may enter.
    folder = Path(tempfile.mkdtemp(prefix="segapp-keys-"))
    folder.chmod(0o755)
    keys = Keys(folder)
    keys.add("alice")
    keys.add("bob", "--rate", "2r/s", "--inflight", "1")
    keys.add("carol")
    keys.add("dave")
    yield keys
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(keys):
    stack = start_stack(SEGAPP_API_KEYS_FILE=str(keys.path), SEGAPP_LOG_FORMAT="json")
    yield stack
    stack.stop()


def wait_until(check, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.1)


def test_the_file_holds_digests_never_a_key(keys):
    text = keys.path.read_text()
    ring = KeyRing.parse(text)
    assert sorted(key.name for key in ring.keys) == ["alice", "bob", "carol", "dave"]
    for key in keys.keys.values():
        assert key not in text and key.split("_", 2)[2] not in text  # the secret may hold "_" itself
        assert ring.check(f"Bearer {key}") is not None


def test_keyed_routes_need_a_key_and_probes_and_the_page_do_not(stack, keys, jpeg):
    tensor = json.dumps({"inputs": [{"name": "image", "shape": [2, 2, 3], "datatype": "UINT8", "data": [0] * 12}]})
    for method, path in KEYED:
        body, kind = (None, "image/jpeg") if method == "GET" else (tensor.encode(), "application/json") \
            if path.startswith("/v2") else (jpeg, "image/jpeg")
        answer = stack.request(method, path, body, {"Content-Type": kind}, source=OTHER)
        assert answer.status == 401, (path, answer.status, answer.body[:200])
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="segapp"', path
        error = answer.json()["error"]
        # The Open Inference Protocol's shape under /v2, segapp's elsewhere.
        if path.startswith("/v2"):
            assert "API key" in error, path
        else:
            assert error["code"] == "unauthorized" and error["request_id"] == answer.headers["X-Request-ID"], path
        answer = stack.request(method, path, body, {"Content-Type": kind, **keys.header("alice")}, source=OTHER)
        assert answer.status == 200, (path, answer.status, answer.body[:200])
    for path in OPEN:
        assert stack.request("GET", path, source=OTHER).status == 200, path


def test_a_wrong_or_revoked_key_is_refused(stack, keys, jpeg):
    alice = keys.keys["alice"]
    # Another secret for alice's key ID, a mistyped key, another scheme, a key in the wrong header.
    for authorization in (alice[:-4] + "AAAA", alice[:-1], f"Basic {alice}", f"Bearer {alice} extra"):
        answer = stack.infer(jpeg, headers={"Authorization": authorization if " " in authorization
                                            else f"Bearer {authorization}"}, source=OTHER)
        assert answer.status == 401, authorization
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="segapp", error="invalid_token"'
        assert answer.json()["error"]["code"] == "unauthorized"
    assert stack.infer(jpeg, headers={"X-API-Key": alice}, source=OTHER).status == 401
    assert stack.infer(jpeg, headers=keys.header("carol"), source=OTHER).status == 200
    keys.remove("carol")
    # Counted from the next request: the app reads the file again when it changes.
    assert stack.infer(jpeg, headers=keys.header("carol"), source=OTHER).status == 401
    assert stack.infer(jpeg, headers=keys.header("alice"), source=OTHER).status == 200


def test_a_key_over_its_own_limits_gets_429_naming_them(stack, keys, jpeg):
    # bob may send 2 a second (3 at once with the burst) and have 1 in flight.
    statuses, last = [], None
    for _ in range(8):
        last = stack.infer(jpeg, headers=keys.header("bob"), source=SLOW)
        statuses.append(last.status)
    assert statuses[:3] == [200, 200, 200] and 429 in statuses, statuses
    refused = next(answer for answer in [last] if answer.status == 429)
    message = refused.json()["error"]["message"]
    assert "the key bob allows 2 requests a second, 1 at once" in message, message
    assert refused.headers["Retry-After"] == "1"
    # The same address with another key is not limited by bob's.
    assert stack.infer(jpeg, headers=keys.header("alice"), source=SLOW).status == 200
    time.sleep(1.5)
    # In flight: a request of bob's whose body is still coming holds his one place.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30, source_address=(SLOW, 0)) as held:
        held.sendall(f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
                     f"Authorization: Bearer {keys.keys['bob']}\r\n\r\n".encode() + jpeg[:100])
        time.sleep(0.5)
        second = stack.infer(jpeg, headers=keys.header("bob"), source=OTHER)
        assert second.status == 429 and "bob allows" in second.json()["error"]["message"]
        held.sendall(jpeg[100:])
        assert held.recv(12) == b"HTTP/1.1 200"


def test_a_thousand_guesses_from_one_address_are_refused_by_nginx(stack, keys, jpeg):
    checks_before = key_checks(stack, keys)
    statuses = {}
    started = time.monotonic()
    guesses = 1000
    for index in range(guesses):
        guess = f"sgk_{os.urandom(4).hex()}_{os.urandom(32).hex()[:43]}" if index % 2 else os.urandom(16).hex()
        answer = stack.request("GET", "/v1/models", headers={"Authorization": f"Bearer {guess}"}, source=GUESSER)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
    seconds = time.monotonic() - started
    refused = statuses.get(429, 0)
    unauthorized = statuses.get(401, 0)
    print(f"\n{guesses} guesses in {seconds:.1f} s: {unauthorized} answered 401, {refused} answered 429")
    assert unauthorized + refused == guesses, statuses
    # A burst of 10, then 2 a second: the rest are refused by nginx, without a check by the app.
    assert unauthorized <= 10 + 2 * seconds + 2, statuses
    checks = key_checks(stack, keys)
    assert checks["refused"] - checks_before["refused"] == unauthorized
    # Meanwhile, and after, a client with a key from another address is served.
    assert stack.infer(jpeg, headers=keys.header("alice"), source=OTHER).status == 200
    last = stack.request("GET", "/v1/models", headers={"Authorization": "Bearer x"}, source=GUESSER)
    assert last.status == 429
    assert "without a valid API key" in last.json()["error"]["message"]


def key_checks(stack, keys) -> dict[str, float]:
    text = stack.request("GET", "/metrics", headers=keys.header("alice")).body.decode()
    return {result: float(value) for result, value in
            re.findall(r'^segapp_key_checks_total\{result="(\w+)"\} ([0-9.e+]+)$', text, re.M)}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_40_mb_upload_without_a_key_is_answered_before_its_body(stack, framing):
    size = 40 * 1024 * 1024
    # 9 MB with a Content-Length (under the body limit: the key decides), 40 MB chunked (no length to refuse).
    length = f"Content-Length: {9 * 1024 * 1024}" if framing == "content-length" else "Transfer-Encoding: chunked"
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10, source_address=(OTHER, 0)) as client:
        client.sendall(f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n{length}\r\n\r\n".encode())
        if framing == "chunked":  # the first 1 MiB chunk's header and a little of it, of a 40 MB body
            client.sendall(f"{size:x}\r\n".encode() + b"\xff" * 1000)
        started = time.monotonic()
        answer = client.recv(65536)
        waited = time.monotonic() - started
    # No body was sent (but 1,000 bytes): nginx answered from the headers, at once.
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert waited < 5
    assert not any((stack.run_dir / "nginx" / "tmp" / "client_body").iterdir())
    # A Content-Length over the body limit is refused first, by its length, before the key is asked for.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10, source_address=(OTHER, 0)) as client:
        client.sendall(f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        assert client.recv(65536).startswith(b"HTTP/1.1 413")


def test_keys_added_rotated_and_removed_under_load_lose_no_request_of_a_key_that_stays(stack, keys, jpeg):
    old_dave = keys.keys["dave"]
    nginx_pid = int((stack.run_dir / "nginx" / "nginx.pid").read_text())
    with RequestStream(stack, jpeg, clients=4, headers=keys.header("alice"), source=LOADED) as stream:
        stream.wait_for(20)
        new_dave = keys.rotate("dave")
        # uWSGI sees a change by the file's modification time in whole seconds: one change a second at most here.
        time.sleep(1.1)
        keys.add("erin", "--rate", "5r/s")
        stream.wait_for(10)
        # The old key is refused and the new one served at once (the app); erin's own rate once nginx has reloaded.
        assert stack.infer(jpeg, headers={"Authorization": f"Bearer {old_dave}"}, source=OTHER).status == 401
        assert stack.infer(jpeg, headers={"Authorization": f"Bearer {new_dave}"}, source=OTHER).status == 200
        wait_until(lambda: "erin" in (stack.run_dir / "nginx" / "segapp.conf").read_text(), "nginx's limits for erin")
        keys.remove("erin")
        time.sleep(1.1)
        keys.rotate("dave")
        stream.wait_for(20)
    answered = stream.outcomes.count("200")
    failed = len(stream.failures)
    print(f"\nrotation under load: sent {stream.sent}, answered {answered}, failed {failed}")
    assert stream.sent == answered + failed
    assert failed == 0, stream.failures[:5]
    # nginx was reloaded, not restarted, for each change; its limits were written again from the file.
    assert int((stack.run_dir / "nginx" / "nginx.pid").read_text()) == nginx_pid
    assert stack.log().count("[uwsgi-touch-exec]") >= 2


def test_metrics_and_log_lines_name_the_key_never_hold_it(stack, keys, jpeg):
    assert stack.infer(jpeg, headers=keys.header("alice"), source=OTHER).status == 200
    metrics = stack.request("GET", "/metrics", headers=keys.header("alice")).body.decode()
    counted = dict(re.findall(r'^segapp_key_requests_total\{key="(\w+)",status="200"\} ([0-9.e+]+)$', metrics, re.M))
    assert float(counted["alice"]) >= 1
    # Only names of the file (and "other"): the label's values are bounded by it.
    assert set(counted) <= {"alice", "bob", "carol", "dave", "erin", "other"}
    def lines() -> list[dict]:
        log = stack.log() + (stack.run_dir / "nginx" / "access.log").read_text()
        return [json.loads(line) for line in log.splitlines() if line.startswith("{")]

    # nginx writes its lines within a second (buffer=, flush=).
    wait_until(lambda: any(line["layer"] == "nginx" and line["key"] == "alice" and line["status"] == 200
                           for line in lines()), "nginx's access line naming alice", timeout=5)
    log = stack.log() + (stack.run_dir / "nginx" / "access.log").read_text()
    assert any(line["layer"] == "app" and line.get("key") == "alice" for line in lines())
    for key in (*keys.keys.values(), "sgk_"):
        assert key not in log and key not in metrics


def test_tritonclient_sends_the_key_as_a_header(stack, keys):
    client = triton.InferenceServerClient(f"127.0.0.1:{stack.port}")
    header = keys.header("alice")
    assert client.is_server_live() and client.is_server_ready()  # probes: no key
    with pytest.raises(InferenceServerException, match="API key"):
        client.get_model_metadata(MODEL)
    assert client.get_model_metadata(MODEL, headers=header)["name"] == MODEL
    image = np.zeros((96, 128, 3), np.uint8)
    image[:, 64:] = 200
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer(MODEL, [tensor])
    result = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("mask")], headers=header)
    assert result.as_numpy("mask").shape == (96, 128)
