"""nginx's own errors are JSON in the app's shape: 429 (rate limit), 502 (uWSGI down), 503 (overload), 504 (timeout).
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


def test_burst_over_rate_limit_gets_json_429_and_probes_are_not_limited(stack_factory, jpeg):
    stack = stack_factory(SEGAPP_NGINX_RATE="1r/m", SEGAPP_NGINX_BURST="2")
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: stack.infer(jpeg), range(8)))
    statuses = sorted(answer.status for answer in answers)
    assert statuses.count(200) == 3, statuses  # one at the rate, two of burst; the rate refills once a minute
    assert statuses.count(429) == 5, statuses
    assert_nginx_error(next(a for a in answers if a.status == 429), 429, "rate_limited")
    assert {stack.request("GET", "/readyz").status for _ in range(10)} == {200}


def test_more_requests_in_flight_than_allowed_are_shed_with_json_503(stack_factory, jpeg):
    # Two requests may be in flight; each takes at least 0.5 s in the engine. Eight sent at once: the ones over
    # the bound are answered 503 by nginx at once, the others are served; none is lost or left hanging.
    stack = stack_factory(SEGAPP_NGINX_MAX_INFLIGHT="2", SEGAPP_ENGINE_DELAY_MS="500")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: stack.infer(jpeg), range(8)))
    statuses = sorted(answer.status for answer in answers)
    assert set(statuses) == {200, 503}, statuses
    assert 2 <= statuses.count(200) <= 6, statuses
    assert_nginx_error(next(a for a in answers if a.status == 503), 503, "unavailable")
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
