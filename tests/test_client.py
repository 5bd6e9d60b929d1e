"""segapp-client against a tiny in-process HTTP server that answers like segapp."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from segapp import client


class FakeSegapp(BaseHTTPRequestHandler):
    """POST /infer: 200 with a body naming the format, or 413 for a body starting with BIG, 429 once for RETRY."""

    requests: list[dict] = []
    retried: set[bytes] = set()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        FakeSegapp.requests.append({"path": self.path, "type": self.headers["Content-Type"],
                                    "accept": self.headers["Accept"], "body": body})
        if body.startswith(b"BIG"):
            self._answer(413, b'{"error": {"code": "body_too_large", "message": "over 10 MiB", "request_id": "x"}}',
                         "application/json")
        elif body.startswith(b"RETRY") and body not in FakeSegapp.retried:
            FakeSegapp.retried.add(body)
            self._answer(429, b"<html>slow down</html>", "text/html", {"Retry-After": "0"})
        else:
            self._answer(200, b"answer:" + self.path.encode(), self.headers["Accept"])

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
    FakeSegapp.retried = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSegapp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_writes_masks_beside_the_inputs(server_url, tmp_path, capsys):
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    assert client.main([str(photo), "--url", server_url]) == 0
    assert (tmp_path / "photo.mask.png").read_bytes() == b"answer:/infer?format=png"
    sent = FakeSegapp.requests[0]
    assert (sent["type"], sent["accept"], sent["body"]) == ("image/jpeg", "image/png", b"jpeg bytes")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("fmt", "suffix"), [("json", ".mask.json"), ("overlay", ".overlay.jpg")])
def test_formats_into_an_output_folder(server_url, tmp_path, fmt, suffix):
    photo = write(tmp_path, "in/cat.png", b"png bytes")
    out = tmp_path / "out"
    assert client.main([str(photo), "--url", server_url, "--format", fmt, "-o", str(out)]) == 0
    assert (out / f"cat{suffix}").read_bytes() == f"answer:/infer?format={fmt}".encode()
    assert FakeSegapp.requests[0]["type"] == "image/png"


def test_failures_get_one_line_each_and_a_nonzero_exit(server_url, tmp_path, capsys):
    good = write(tmp_path, "good.jpg", b"fine")
    big = write(tmp_path, "big.jpg", b"BIG image")
    missing = tmp_path / "missing.jpg"
    status = client.main([str(good), str(big), str(missing), "--url", server_url])
    assert status == 1
    err = capsys.readouterr().err.splitlines()
    assert f"segapp-client: {big}: 413 body_too_large: over 10 MiB" in err
    assert any(line.startswith(f"segapp-client: {missing}: cannot read") for line in err)
    assert err[-1] == "segapp-client: 1 of 3 images segmented"
    assert (tmp_path / "good.mask.png").exists() and not (tmp_path / "big.mask.png").exists()


def test_rate_limited_requests_are_retried(server_url, tmp_path):
    photo = write(tmp_path, "busy.jpg", b"RETRY me")
    assert client.main([str(photo), "--url", server_url]) == 0
    assert len(FakeSegapp.requests) == 2


def test_unreachable_server_is_one_line(tmp_path, capsys):
    photo = write(tmp_path, "photo.jpg", b"jpeg bytes")
    assert client.main([str(photo), "--url", "http://127.0.0.1:9", "--retries", "0"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"segapp-client: {photo}: cannot reach http://127.0.0.1:9")


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
