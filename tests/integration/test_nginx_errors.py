"""nginx's own errors are JSON in the app's shape: 429 (rate limit), 502 (uWSGI down), 503 (overload), 504 (timeout),
and every error nginx answers before the app is asked: malformed HTTP, methods, sizes, encodings.
(413 is in test_stack.py, on the shared stack.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration


def assert_nginx_error(answer, status: int, code: str) -> None:
    assert answer.status == status, answer.body[:300]
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == answer.headers["X-Request-ID"]
    assert ("Retry-After" in answer.headers) == (status in (429, 503))
    if status in (429, 503):
        assert answer.headers.get_all("Retry-After") == ["1"]


def test_burst_over_rate_limit_gets_json_429_and_probes_are_not_limited(stack_factory, jpeg):
    stack = stack_factory(SEGAPP_NGINX_RATE="1r/m", SEGAPP_NGINX_BURST="2")
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: stack.infer(jpeg), range(8)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses.count(200) == 3, statuses  # one at the rate, two of burst; the rate refills once a minute
    assert statuses.count(429) == 5, statuses
    for answer in answers:
        if answer.status == 429:
            assert_nginx_error(answer, 429, "rate_limited")
    assert {stack.request("GET", "/readyz").status for _ in range(10)} == {200}


def test_more_requests_in_flight_than_allowed_are_shed_with_json_503(stack_factory, jpeg):
    # Two requests may be at the workers; each takes at least 2 s in the engine. Eight sent at once, all within those
    # 2 s: exactly two are served, the six over the bound are answered 503 by nginx at once; none is lost or hangs.
    stack = stack_factory(SEGAPP_NGINX_MAX_INFLIGHT="2", SEGAPP_ENGINE_DELAY_MS="2000")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: stack.infer(jpeg), range(8)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [200] * 2 + [503] * 6, statuses
    for answer in answers:
        if answer.status == 503:
            assert_nginx_error(answer, 503, "unavailable")
    assert stack.request("GET", "/readyz").status == 200  # probes are not counted against the bound


def test_request_outliving_read_timeout_gets_json_504(stack_factory, jpeg):
    # The engine sleeps 4 s per image; nginx waits 1 s for the worker (harakiri stays at 30 s).
    stack = stack_factory(SEGAPP_ENGINE_DELAY_MS="4000", SEGAPP_NGINX_READ_TIMEOUT="1s")
    answer = stack.infer(jpeg)
    assert_nginx_error(answer, 504, "gateway_timeout")
    assert stack.request("GET", "/healthz").status == 200  # the stack goes on


def test_uwsgi_stopped_gets_json_502(nginx_alone):
    """nginx as uwsgi/local.ini starts it, with uWSGI stopped: nothing listens on the socket."""
    assert_nginx_error(nginx_alone.request("POST", "/infer", b"x", {"Content-Type": "image/jpeg"}), 502,
                       "backend_unavailable")
    assert_nginx_error(nginx_alone.request("GET", "/readyz"), 502, "backend_unavailable")


# Requests no well-behaved client sends, each answered by nginx before uWSGI sees it: (raw bytes, status, code).
MALFORMED_HTTP = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "HTTP/1.1 without Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "header without a colon": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBroken header\r\n\r\n", 400, "bad_request"),
    "Content-Length not a number": (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_request"),
    "Content-Length and Transfer-Encoding": (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400, "bad_request"),
    "bad chunk size": (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n", 400, "bad_request"),
    "Transfer-Encoding gzip": (
        b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
    "TRACE": (b"TRACE /infer HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    "request line over 8 KiB": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "header line over 8 KiB": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 400, "headers_too_large"),
    "headers over 32 KiB": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 7000) for i in range(6))
        + b"\r\n", 400, "headers_too_large"),
    "HTTP/2.0 request line": (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
}


@pytest.mark.parametrize("name", MALFORMED_HTTP)
def test_malformed_http_gets_json_from_nginx(stack, name):
    data, status, code = MALFORMED_HTTP[name]
    assert_nginx_error(stack.raw(data), status, code)


def test_nginx_error_pages_are_not_served_to_clients(stack):
    assert_nginx_error(stack.request("GET", "/.segapp/error/502"), 404, "not_found")


def test_many_or_large_headers_within_nginx_limits_reach_the_app(stack, jpeg):
    """uWSGI takes 64 variables and a 4 KiB block by default: nginx passes only the headers the app reads."""
    many = {f"X-Header-{i}": "v" for i in range(300)}
    large = {f"X-Large-{i}": "c" * 7000 for i in range(4)}  # 28 KiB, under nginx's 32 KiB
    long_query = "?format=png&pad=" + "q" * 7000
    for headers, query in ((many, ""), (large, ""), ({}, long_query)):
        answer = stack.infer(jpeg, query, headers={"Accept": "image/png", **headers})
        assert answer.status == 200, answer.body[:300]
        assert answer.headers["Content-Type"] == "image/png"
    answer = stack.infer(jpeg, headers={"Accept": "application/json", **many})
    assert answer.json()["width"] == 640  # Accept still reaches the app
