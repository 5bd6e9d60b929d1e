"""nginx's limits as shipped: no client can lock the others out, and an ordinary one is never throttled.

One stack with the default rate, per-client and overload limits (the other integration tests lift the rate limit),
with 127.0.0.3 as a trusted proxy. Clients on other loopback addresses stand for other machines.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import shutil
import socket
import statistics
import threading
import time

import pytest

from tests.integration.conftest import start_stack
from tests.integration.test_nginx_errors import assert_nginx_error

pytestmark = pytest.mark.integration

PROXY = "127.0.0.3"
PER_CLIENT = 16  # limit_conn segapp_per_client in nginx/segapp.conf


@pytest.fixture(scope="module")
def shipped_limits():
    running = start_stack(SEGAPP_NGINX_RATE="", SEGAPP_NGINX_BURST="", SEGAPP_NGINX_TRUSTED_PROXIES=PROXY)
    yield running
    running.stop()
    shutil.rmtree(running.run_dir, ignore_errors=True)


class SlowUploads:
    """`count` POSTs from `source` that declare a body and send it at one byte a second, as long as they are held."""

    def __init__(self, port: int, count: int, source: str = "127.0.0.1", headers: str = ""):
        self.sockets: list[socket.socket] = []
        self._stop = threading.Event()
        request = (f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n"
                   f"{headers}\r\n").encode()
        for _ in range(count):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            connection.sendall(request)
            self.sockets.append(connection)
        self._trickle = threading.Thread(target=self._send_bytes, daemon=True)
        self._trickle.start()

    def _send_bytes(self) -> None:
        while not self._stop.wait(1.0):
            for connection in self.sockets:
                with contextlib.suppress(OSError):
                    connection.send(b"\xff")

    def answered(self, wait: float = 2.0) -> list[int]:
        """The statuses of the uploads nginx has already answered (without waiting for their bodies)."""
        time.sleep(wait)  # answers sent at once are all in by now
        readable, _, _ = select.select(self.sockets, [], [], 0)
        statuses = []
        for connection in readable:
            response = http.client.HTTPResponse(connection)
            response.begin()
            assert response.getheader("Retry-After") == "1"
            statuses.append(response.status)
        return statuses

    def close(self) -> None:
        self._stop.set()
        self._trickle.join(timeout=5)
        for connection in self.sockets:
            connection.close()


def test_slow_uploads_from_one_address_do_not_lock_out_another(shipped_limits, jpeg, record_property):
    slow = SlowUploads(shipped_limits.port, 80)
    try:
        refused = slow.answered()
        # The address holds its 16 slots; its 64 other uploads are told at once to come back later.
        assert sorted(refused) == [429] * (80 - PER_CLIENT), refused
        # Another address: every request counted as answered (200) or failed (any other status, or an exception).
        sent, answered, failed, seconds = 0, 0, [], []
        for _ in range(200):
            sent += 1
            started = time.perf_counter()
            try:
                status = shipped_limits.infer(jpeg, source="127.0.0.2").status
            except (OSError, http.client.HTTPException) as error:
                status = repr(error)
            seconds.append(time.perf_counter() - started)
            if status == 200:
                answered += 1
            else:
                failed.append(status)
    finally:
        slow.close()
    p50, p99 = statistics.median(seconds) * 1000, statistics.quantiles(seconds, n=100)[98] * 1000
    record_property("other_client", f"{sent} sent, {answered} answered 200, {len(failed)} failed, "
                                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"\n80 slow uploads from 127.0.0.1: {len(refused)} refused with 429, {80 - len(refused)} held; "
          f"127.0.0.2: {sent} sent, {answered} answered 200, {len(failed)} failed, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    # The slow uploads hold only their own address's slots and never reach the workers: nothing of the other
    # address's may fail. sent = answered + failed: a request is one or the other.
    assert sent == answered + len(failed) == 200
    assert failed == [], failed


def test_a_client_posting_one_image_after_another_is_never_throttled(shipped_limits, jpeg, record_property):
    # The fastest sequential client: a tiny image on one keep-alive connection, as a script in a loop would.
    tiny = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde\x00\x00"
            b"\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82")
    connection = http.client.HTTPConnection("127.0.0.1", shipped_limits.port, timeout=30,
                                            source_address=("127.0.0.4", 0))
    statuses = []
    started = time.perf_counter()
    try:
        for _ in range(600):
            connection.request("POST", "/infer", tiny, {"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    rate = len(statuses) / (time.perf_counter() - started)
    record_property("sequential_client", f"{len(statuses)} sent at {rate:.0f}/s, {statuses.count(200)} answered 200")
    print(f"\nsequential client: {len(statuses)} sent at {rate:.0f}/s, {statuses.count(200)} answered 200")
    assert statuses == [200] * 600, sorted(set(statuses))


def test_a_trusted_proxy_forwards_the_client_address_to_limits_and_metrics(shipped_limits, jpeg):
    public, private = "203.0.113.9", "10.2.3.4"

    def via_proxy(path: str, client: str):
        return shipped_limits.request("GET", path, headers={"X-Forwarded-For": client}, source=PROXY)

    # /metrics stays closed to the public behind the proxy, open to the private network.
    assert_nginx_error(via_proxy("/metrics", public), 403, "forbidden")
    assert via_proxy("/metrics", private).status == 200
    # A header from a peer that is not a trusted proxy is not believed.
    assert shipped_limits.request("GET", "/metrics", headers={"X-Forwarded-For": public}).status == 200

    # Limits count the forwarded address: one client behind the proxy fills its own slots, not the proxy's.
    slow = SlowUploads(shipped_limits.port, PER_CLIENT + 4, source=PROXY, headers=f"X-Forwarded-For: {public}\r\n")
    try:
        assert sorted(slow.answered()) == [429] * 4
        answer = shipped_limits.infer(jpeg, headers={"X-Forwarded-For": private}, source=PROXY)
        assert answer.status == 200, answer.body[:200]
    finally:
        slow.close()


def test_a_client_that_stops_sending_is_closed_without_an_answer(shipped_limits):
    """client_header_timeout and client_body_timeout (10 s): nginx logs 408 but sends nothing, not even a status line,
    so there is no 408 page to serve (docs/api.md says so)."""
    halves = {
        "headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        "body": (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
                 + b"x" * 500),
        "v2 body": (b"POST /v2/models/segapp-unet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"inputs\": ["),
        "chunked body": (b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n100\r\nabc"),
    }
    started = time.monotonic()
    open_ = {}
    for name, half in halves.items():
        connection = socket.create_connection(("127.0.0.1", shipped_limits.port), timeout=30,
                                              source_address=("127.0.0.5", 0))
        connection.sendall(half)
        open_[connection] = name
    received, closed_after = {}, {}
    try:
        while open_ and time.monotonic() - started < 40:
            readable, _, _ = select.select(list(open_), [], [], 1)
            for connection in readable:
                chunk = connection.recv(65536)
                received[open_[connection]] = received.get(open_[connection], b"") + chunk
                if not chunk:
                    closed_after[open_.pop(connection)] = time.monotonic() - started
                    connection.close()
    finally:
        for connection in open_:
            connection.close()
    print(f"\nhalf-sent requests closed after {', '.join(f'{k} {v:.1f} s' for k, v in closed_after.items())}")
    assert set(closed_after) == set(halves), f"still open after 40 s: {sorted(open_.values())}"
    assert received == dict.fromkeys(halves, b"")
    assert all(9 <= seconds <= 20 for seconds in closed_after.values()), closed_after
    assert shipped_limits.request("GET", "/healthz", source="127.0.0.5").status == 200
