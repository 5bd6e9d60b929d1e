"""segapp-client against a tiny in-process HTTP server that answers like segapp."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import urllib.error
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segapp import client

RATE_LIMITED = b'{"error": {"code": "rate_limited", "message": "retry later", "request_id": "x"}}'
UNAUTHORIZED = b'{"error": {"code": "unauthorized", "message": "this route needs a valid API key", "request_id": "x"}}'
KEY = "sgk_k3v9x2qa_" + "s" * 43


class FakeSegapp(BaseHTTPRequestHandler):
    """POST /infer: 200 with a body naming the format, except for these bodies:
    `BIG...`: 413; `BUSY <n> <status> [<retry-after>]`: `status` (with that Retry-After) for the first n tries;
    `DROP <n>`: the connection closed unanswered for the first n tries; `SLOW...`: answered (or refused) after 0.3 s.
    With `gate` set, every request waits for that barrier before it is answered; with `max_in_flight` set, a
    request beyond it is a 429 (Retry-After: 0), as nginx's limit_conn does; with `key` set, a request without
    `Authorization: Bearer <key>` is a 401, as nginx's key check answers."""

    requests: list[dict] = []
    tries: dict[bytes, int] = {}
    gate: threading.Barrier | None = None
    max_in_flight: int | None = None
    key: str | None = None
    in_flight = peak_in_flight = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = FakeSegapp
        with cls.lock:
            cls.requests.append({"path": self.path, "type": self.headers["Content-Type"],
                                 "accept": self.headers["Accept"], "authorization": self.headers["Authorization"],
                                 "body": body})
            cls.tries[body] = tries = cls.tries.get(body, 0) + 1
            refused = cls.max_in_flight is not None and cls.in_flight >= cls.max_in_flight
            if not refused:
                cls.in_flight += 1
                cls.peak_in_flight = max(cls.peak_in_flight, cls.in_flight)
        if refused:
            return self._answer(429, RATE_LIMITED, "application/json", {"Retry-After": "0"})
        try:
            status, answer, content_type, headers = self._choose(body, tries)
        finally:
            with cls.lock:  # before the answer is sent, so a client that has read it never finds its slot taken
                cls.in_flight -= 1
        if status is None:
            self.close_connection = True
            return
        self._answer(status, answer, content_type, headers)

    def _choose(self, body: bytes, tries: int):
        if FakeSegapp.gate is not None:
            try:
                FakeSegapp.gate.wait()
            except threading.BrokenBarrierError:
                return 500, b"fewer requests at once than expected", "text/plain", {}
        if FakeSegapp.max_in_flight is not None:
            time.sleep(0.05)  # long enough for the client's other requests to meet the limit
        if body.startswith(b"SLOW"):
            time.sleep(0.3)
        authorization = self.headers["Authorization"]
        if FakeSegapp.key is not None and authorization != f"Bearer {FakeSegapp.key}":
            challenge = 'Bearer realm="segapp"' + (', error="invalid_token"' if authorization else "")
            return 401, UNAUTHORIZED, "application/json", {"WWW-Authenticate": challenge}
        if body.startswith(b"BIG"):
            return 413, b'{"error": {"code": "body_too_large", "message": "over 10 MiB", "request_id": "x"}}', \
                "application/json", {}
        if body.startswith(b"BUSY"):
            count, status, *retry_after = body.split()[1:]
            if tries <= int(count):
                headers = {"Retry-After": retry_after[0].decode()} if retry_after else {}
                return int(status), RATE_LIMITED, "application/json", headers
        if body.startswith(b"DROP") and tries <= int(body.split()[1]):
            return None, b"", "", {}  # the connection is closed with no answer, as by a proxy that lost its peer
        return 200, b"answer:" + self.path.encode(), self.headers["Accept"], {}

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server_url():
    FakeSegapp.requests = []
    FakeSegapp.tries = {}
    FakeSegapp.gate = FakeSegapp.max_in_flight = FakeSegapp.key = None
    FakeSegapp.in_flight = FakeSegapp.peak_in_flight = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSegapp)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # shutdown() waits a poll
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Sleeps(list):
    """Records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def summary_of(err: str) -> dict[str, str]:
    """The summary line's figures by name: {"images": "3", "answered": "1", "failed": "2", "retries": "0", ...}."""
    line = err.splitlines()[-1]
    assert line.startswith("segapp-client: "), line
    return {name: value for value, name in re.findall(r"([\d.]+) (images/s|images|answered|failed|retries)", line)}


def test_writes_masks_beside_the_inputs(server_url, tmp_path, capsys):
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    assert client.main([str(photo), "--url", server_url]) == 0
    assert (tmp_path / "photo.mask.png").read_bytes() == b"answer:/infer?format=png"
    sent = FakeSegapp.requests[0]
    assert (sent["type"], sent["accept"], sent["body"]) == ("image/jpeg", "image/png", b"jpeg bytes")
    assert sent["authorization"] is None  # no key given, none sent
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("fmt", "suffix"), [("json", ".mask.json"), ("overlay", ".overlay.jpg")])
def test_formats_into_an_output_folder(server_url, tmp_path, fmt, suffix):
    photo = write(tmp_path, "in/cat.png", b"png bytes")
    out = tmp_path / "out"
    assert client.main([str(photo), "--url", server_url, "--format", fmt, "-o", str(out)]) == 0
    assert (out / f"cat{suffix}").read_bytes() == f"answer:/infer?format={fmt}".encode()
    assert FakeSegapp.requests[0]["type"] == "image/png"


def test_a_model_is_asked_for_by_name_and_its_cutout_saved(server_url, tmp_path):
    photo = write(tmp_path, "portrait.jpg", b"jpeg bytes")
    assert client.main([str(photo), "--url", server_url, "--model", "person", "--format", "cutout"]) == 0
    assert (tmp_path / "portrait.cutout.png").read_bytes() == b"answer:/infer?format=cutout&model=person"
    assert FakeSegapp.requests[0]["accept"] == "image/png"


def test_failures_get_one_line_each_in_input_order_and_a_nonzero_exit(server_url, tmp_path, capsys):
    slow = write(tmp_path, "slow.jpg", b"SLOW but fine")
    big = write(tmp_path, "big.jpg", b"BIG image")
    missing = tmp_path / "missing.jpg"
    status = client.main([str(slow), str(big), str(missing), "--url", server_url, "--concurrency", "3"])
    assert status == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    # big.jpg is answered long before slow.jpg, yet the lines follow the inputs
    assert lines[0] == f"segapp-client: {big}: 413 body_too_large: over 10 MiB"
    assert lines[1].startswith(f"segapp-client: {missing}: cannot read")
    summary = summary_of(err)
    assert (summary["images"], summary["answered"], summary["failed"], summary["retries"]) == ("3", "1", "2", "0")
    assert (tmp_path / "slow.mask.png").exists() and not (tmp_path / "big.mask.png").exists()


def test_a_folder_stands_for_its_images_but_not_earlier_answers(server_url, tmp_path, capsys):
    for name in ("b.png", "a.jpg", "a.mask.png", "c.overlay.jpg", "notes.txt", "sub/d.jpg"):
        write(tmp_path / "in", name, name.encode())
    assert client.main([str(tmp_path / "in"), "--url", server_url, "-o", str(tmp_path / "out")]) == 0
    assert sorted(request["body"] for request in FakeSegapp.requests) == [b"a.jpg", b"b.png"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.mask.png", "b.mask.png"]
    assert summary_of(capsys.readouterr().err)["answered"] == "2"


def test_an_empty_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        client.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "no images" in capsys.readouterr().err


def test_concurrency_is_the_number_of_requests_in_flight(server_url, tmp_path):
    images = [write(tmp_path, f"{n}.jpg", b"image %d" % n) for n in range(8)]
    FakeSegapp.gate = threading.Barrier(4, timeout=10)  # answers only when four requests wait together
    assert client.main([*map(str, images), "--url", server_url, "--concurrency", "4"]) == 0
    assert FakeSegapp.peak_in_flight == 4
    assert all((tmp_path / f"{n}.mask.png").exists() for n in range(8))


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_waited_for_then_the_image_is_answered(server_url, tmp_path, capsys, status):
    busy = write(tmp_path, "busy.jpg", f"BUSY 3 {status} 2".encode())
    calm = write(tmp_path, "calm.jpg", b"calm")
    sleeps = Sleeps()
    assert client.main([str(busy), str(calm), "--url", server_url], sleep=sleeps) == 0
    assert sleeps == [2, 2, 2]
    assert FakeSegapp.tries[busy.read_bytes()] == 4
    assert (tmp_path / "busy.mask.png").read_bytes() == b"answer:/infer?format=png"
    err = capsys.readouterr().err
    summary = summary_of(err)
    assert (summary["answered"], summary["failed"], summary["retries"]) == ("2", "0", "3")
    assert f"3 retries ({status}: 3)" in err


def test_the_summary_names_what_was_retried():
    outcomes = [client.Outcome(Path("a"), Path("a.mask.png"), None, ("429", "429", "503")),
                client.Outcome(Path("b"), None, "429 rate_limited: retry later (after 5 retries)", ("429",) * 5),
                client.Outcome(Path("c"), Path("c.mask.png"))]
    assert client.summary(outcomes, 4.0) == \
        "3 images, 2 answered, 1 failed, 8 retries (429: 7, 503: 1), 0.5 images/s in 4.0 s"


def test_gives_up_after_its_retries(server_url, tmp_path, capsys):
    busy = write(tmp_path, "busy.jpg", b"BUSY 99 429 1")
    sleeps = Sleeps()
    assert client.main([str(busy), "--url", server_url, "--retries", "3"], sleep=sleeps) == 1
    assert sleeps == [1, 1, 1]
    assert FakeSegapp.tries[b"BUSY 99 429 1"] == 4
    assert capsys.readouterr().err.splitlines() == [
        f"segapp-client: {busy}: 429 rate_limited: retry later (after 3 retries)"]
    assert not (tmp_path / "busy.mask.png").exists()


def test_a_long_retry_after_is_capped(server_url, tmp_path):
    busy = write(tmp_path, "busy.jpg", b"BUSY 1 503 3600")
    sleeps = Sleeps()
    assert client.main([str(busy), "--url", server_url, "--max-wait", "5"], sleep=sleeps) == 0
    assert sleeps == [5]


def test_gateway_errors_back_off_and_a_500_is_not_retried(server_url, tmp_path, capsys):
    gateway = write(tmp_path, "gateway.jpg", b"BUSY 2 502")
    broken = write(tmp_path, "broken.jpg", b"BUSY 1 500")
    sleeps = Sleeps()
    assert client.main([str(gateway), str(broken), "--url", server_url, "--concurrency", "1"], sleep=sleeps) == 1
    assert sleeps == [0.5, 1.0]
    assert (FakeSegapp.tries[b"BUSY 2 502"], FakeSegapp.tries[b"BUSY 1 500"]) == (3, 1)
    assert summary_of(capsys.readouterr().err)["failed"] == "1"


def test_a_lost_connection_is_asked_again(server_url, tmp_path, capsys):
    dropped = write(tmp_path, "dropped.jpg", b"DROP 2")
    sleeps = Sleeps()
    calm = write(tmp_path, "calm.jpg", b"calm")
    assert client.main([str(dropped), str(calm), "--url", server_url], sleep=sleeps) == 0
    assert sleeps == [0.5, 1.0]
    assert (tmp_path / "dropped.mask.png").read_bytes() == b"answer:/infer?format=png"
    assert "2 retries (connection: 2)" in capsys.readouterr().err


def test_a_client_asking_more_at_once_than_allowed_settles_at_the_limit(server_url, tmp_path, capsys):
    images = [write(tmp_path, f"{n}.jpg", b"image %d" % n) for n in range(30)]
    FakeSegapp.max_in_flight = 2
    # one retry each: an image refused once waits for a free slot instead of meeting the limit again
    status = client.main([*map(str, images), "--url", server_url, "--concurrency", "6", "--retries", "1"])
    err = capsys.readouterr().err
    assert status == 0, err
    summary = summary_of(err)
    assert (summary["answered"], summary["failed"]) == ("30", "0")
    assert 0 < int(summary["retries"]) < 30
    assert len(list(tmp_path.glob("*.mask.png"))) == 30


def test_retry_after_as_seconds_or_a_date():
    now = 1_700_000_000.0
    assert client.retry_after_seconds("7", now) == 7
    assert client.retry_after_seconds(formatdate(now + 12, usegmt=True), now) == 12
    assert client.retry_after_seconds(formatdate(now - 60, usegmt=True), now) == 0
    assert client.retry_after_seconds("soon", now) is None
    assert client.retry_after_seconds(None, now) is None


def test_unreachable_server_is_one_line_at_once(tmp_path, capsys):
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    sleeps = Sleeps()
    assert client.main([str(photo), "--url", "http://127.0.0.1:9"], sleep=sleeps) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"segapp-client: {photo}: cannot reach http://127.0.0.1:9")
    assert sleeps == []  # refused: nothing listens there, no wait would help


def test_two_inputs_with_one_output_name_are_refused(server_url, tmp_path, capsys):
    first = write(tmp_path, "a/photo.jpg", b"one")
    second = write(tmp_path, "b/photo.jpg", b"two")
    assert client.main([str(first), str(second), "--url", server_url, "-o", str(tmp_path / "out")]) == 1
    assert "another input also writes" in capsys.readouterr().err


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = client.Progress(4, stream, width=8)
    progress.advance(failed=False)
    progress.advance(failed=True)
    assert stream.getvalue().endswith("\r[####....] 2/4, 1 failed")
    assert not client.Progress(4, io.StringIO()).enabled  # not a terminal: no bar in logs


def test_error_reason_from_segapp_json_or_the_bare_status():
    plain = urllib.error.HTTPError("http://x", 502, "Bad Gateway", {}, io.BytesIO(b"<html>"))
    assert client._http_reason(plain) == "502 Bad Gateway"
    body = json.dumps({"error": {"code": "gateway_timeout", "message": "too slow", "request_id": "r"}}).encode()
    shaped = urllib.error.HTTPError("http://x", 504, "Gateway Timeout", {}, io.BytesIO(body))
    assert client._http_reason(shaped) == "504 gateway_timeout: too slow"


@pytest.mark.parametrize("given", ["option", "environment"])
def test_the_api_key_is_sent_with_every_request(server_url, tmp_path, capsys, given):
    FakeSegapp.key = KEY
    images = [write(tmp_path, f"{n}.jpg", b"image %d" % n) for n in range(3)]
    option, environ = (["--api-key", KEY], {}) if given == "option" else ([], {"SEGAPP_API_KEY": KEY})
    assert client.main([*map(str, images), "--url", server_url, *option], environ=environ) == 0
    assert [request["authorization"] for request in FakeSegapp.requests] == [f"Bearer {KEY}"] * 3
    assert summary_of(capsys.readouterr().err)["answered"] == "3"


def test_the_option_wins_over_the_environment(server_url, tmp_path):
    FakeSegapp.key = KEY
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    environ = {"SEGAPP_API_KEY": "sgk_old00000_" + "o" * 43}
    assert client.main([str(photo), "--url", server_url, "--api-key", KEY], environ=environ) == 0
    assert FakeSegapp.requests[0]["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(("option", "advice"), [
    ([], "the server needs an API key: pass --api-key KEY or set SEGAPP_API_KEY"),
    (["--api-key", "sgk_wrong000_" + "w" * 43],
     "the server refused the API key: pass a valid one with --api-key KEY or SEGAPP_API_KEY"),
])
def test_a_401_ends_the_run_with_one_line_that_says_how_to_give_a_key(server_url, tmp_path, capsys, option, advice):
    FakeSegapp.key = KEY
    images = [write(tmp_path, f"{n}.jpg", b"SLOW image %d" % n) for n in range(20)]
    sleeps = Sleeps()
    status = client.main([*map(str, images), "--url", server_url, "-c", "2", *option], sleep=sleeps, environ={})
    assert status == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"segapp-client: {advice} (401 unauthorized: this route needs a valid API key)"]
    assert out == "" and "Traceback" not in err
    assert all(secret not in err for secret in option[1:])  # the key given is never printed
    # The images after the refusal are not sent, each would be refused the same: the two first, and the two the
    # client had sent by the time the first refusal was read.
    assert len(FakeSegapp.requests) <= 4 and sleeps == []
    assert not list(tmp_path.glob("*.mask.png"))


@pytest.mark.parametrize("key", ["sgk_abc def", "sgk_abc\ndef", "sgk_clé"])
def test_a_key_that_cannot_be_a_header_is_a_usage_error(tmp_path, capsys, key):
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    with pytest.raises(SystemExit) as exit_:
        client.main([str(photo)], environ={"SEGAPP_API_KEY": key})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--api-key (or SEGAPP_API_KEY)" in err and key.strip() not in err


def test_an_empty_key_in_the_environment_is_none(server_url, tmp_path):
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    assert client.main([str(photo), "--url", server_url], environ={"SEGAPP_API_KEY": ""}) == 0
    assert FakeSegapp.requests[0]["authorization"] is None
