"""API keys without a server: the keys file (segapp/keys.py), `segapp-keys`, the app's answer to nginx's key check
(WebTest), and the nginx lines nginx/render.py writes from the file. Through nginx: integration/test_api_keys.py."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
from webtest import TestApp

from segapp.config import Settings
from segapp.keys import DEFAULT_INFLIGHT, DEFAULT_RATE, KeyFile, KeyFileError, KeyRing, Limits, main
from segapp.metrics import Metrics
from segapp.wsgi import make_app

spec = importlib.util.spec_from_file_location("render", Path(__file__).parents[1] / "nginx" / "render.py")
render = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render)


def add(path, name: str, *limits: str, capsys) -> str:
    assert main(["--file", str(path), "add", name, *limits]) == 0
    return capsys.readouterr().out.strip()


def test_segapp_keys_adds_rotates_lists_and_removes(tmp_path, capsys):
    path = tmp_path / "run" / "keys"  # its folder made by the first add
    alice = add(path, "alice", capsys=capsys)
    bob = add(path, "bob", "--rate", "20r/s", "--inflight", "4", capsys=capsys)
    text = path.read_text()
    assert alice not in text and bob not in text and "sha256:" in text
    ring = KeyRing.read(path)
    assert ring.check(f"Bearer {alice}").name == "alice"
    assert ring.check(f"bearer  {bob}").name == "bob"  # the scheme is case-insensitive (RFC 9110)
    assert ring.limits(ring.by_id[bob.split("_")[1]]) == Limits("20r/s", 4)
    assert ring.limits(ring.by_id[alice.split("_")[1]]) == Limits(DEFAULT_RATE, DEFAULT_INFLIGHT)
    assert main(["--file", str(path), "rotate", "bob"]) == 0
    new_bob = capsys.readouterr().out.strip()
    ring = KeyRing.read(path)
    assert ring.check(f"Bearer {bob}") is None and ring.check(f"Bearer {new_bob}").name == "bob"
    assert ring.limits(ring.check(f"Bearer {new_bob}")) == Limits("20r/s", 4)  # kept by the rotation
    assert main(["--file", str(path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "rate=20r/s inflight=4" in listing and new_bob not in listing
    assert main(["--file", str(path), "remove", "alice"]) == 0
    assert KeyRing.read(path).check(f"Bearer {alice}") is None
    # Mistakes: one line each, the file untouched.
    before = path.read_text()
    assert main(["--file", str(path), "add", "bob"]) == 1
    assert main(["--file", str(path), "remove", "nobody"]) == 1
    assert main(["--file", str(path), "add", "carol", "--rate", "fast"]) == 1
    assert "already has a key named 'bob'" in capsys.readouterr().err
    assert path.read_text() == before


@pytest.mark.parametrize("line, problem", [
    ("alice", "expected `NAME KEY_ID sha256:DIGEST"),
    ("al ice abcdefgh sha256:" + "0" * 64, "key ID 'ice'"),
    ("alice abcdefgh " + "sgk_abcdefgh_" + "x" * 43, "never the key"),
    ("alice abcdefgh sha256:" + "0" * 64 + " rate=fast", "'rate=fast'"),
    ("alice abcdefgh sha256:" + "0" * 64 + " inflight=0", "'inflight=0'"),
    ("al/ice abcdefgh sha256:" + "0" * 64, "the name 'al/ice'"),
])
def test_a_line_the_server_cannot_take_is_named(line, problem):
    with pytest.raises(KeyFileError, match="line 2") as error:
        KeyRing.parse("# keys\n" + line, "keys")
    assert problem in str(error.value)


def test_names_and_ids_are_unique_and_the_default_line_applies():
    digest = "sha256:" + "0" * 64
    with pytest.raises(KeyFileError, match="used twice"):
        KeyRing.parse(f"a abcdefgh {digest}\na bbcdefgh {digest}")
    with pytest.raises(KeyFileError, match="used twice"):
        KeyRing.parse(f"a abcdefgh {digest}\nb abcdefgh {digest}")
    ring = KeyRing.parse(f"default rate=60r/m inflight=2\na abcdefgh {digest} inflight=5")
    assert ring.limits(ring.keys[0]) == Limits("60r/m", 5)
    assert ring.limits(ring.keys[0]).describe() == "60 requests a minute, 5 at once"


def test_the_app_reads_a_changed_file_and_keeps_its_keys_when_it_breaks(tmp_path, capsys, caplog):
    path = tmp_path / "keys"
    alice = add(path, "alice", capsys=capsys)
    keys = KeyFile(path)
    assert keys.current().check(f"Bearer {alice}")
    bob = add(path, "bob", capsys=capsys)
    assert keys.current().check(f"Bearer {bob}")
    path.write_text(path.read_text() + "broken line\n")
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    with caplog.at_level(logging.ERROR, "segapp.keys"):
        assert keys.current().check(f"Bearer {bob}")
    assert "API keys not changed, the file is not valid" in caplog.text
    with pytest.raises(KeyFileError, match="cannot read it"):
        KeyFile(tmp_path / "missing")


def test_the_app_answers_nginx_key_check(tmp_path, capsys, fake_segmenter, jpeg_500x375):
    path = tmp_path / "keys"
    alice = add(path, "alice", capsys=capsys)
    metrics = Metrics()
    app = TestApp(make_app(Settings(api_keys_file=path), segmenter=fake_segmenter, metrics=metrics))
    accepted = app.get("/.segapp/key", headers={"Authorization": f"Bearer {alice}"}, status=204)
    assert accepted.headers["X-Segapp-Key"] == "alice"
    missing = app.get("/.segapp/key", status=401)
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="segapp"'
    assert missing.json["error"]["code"] == "unauthorized"
    wrong = app.get("/.segapp/key", headers={"Authorization": f"Bearer {alice[:-1]}x"}, status=401)
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="segapp", error="invalid_token"'
    # nginx names the key it let through; a name the file does not hold is counted as "other".
    app.post("/infer", jpeg_500x375, headers={"Content-Type": "image/jpeg", "X-Segapp-Key": "alice"})
    app.post("/infer", jpeg_500x375, headers={"Content-Type": "image/jpeg", "X-Segapp-Key": "mallory"})
    exposition = app.get("/metrics").text
    assert 'segapp_key_requests_total{key="alice",status="200"} 1.0' in exposition
    assert 'segapp_key_requests_total{key="other",status="200"} 1.0' in exposition
    assert 'segapp_key_checks_total{result="accepted"} 1.0' in exposition
    assert 'segapp_key_checks_total{result="missing"} 1.0' in exposition
    assert 'segapp_key_checks_total{result="refused"} 1.0' in exposition
    # The checks are not requests: not in the request counter.
    assert "/.segapp/key" not in exposition
    # Without a keys file there is no such route.
    plain = TestApp(make_app(Settings(), segmenter=fake_segmenter, metrics=Metrics()))
    plain.get("/.segapp/key", status=404)


def test_nginx_lines_from_the_file(tmp_path, capsys):
    path = tmp_path / "keys"
    add(path, "alice", capsys=capsys)
    add(path, "bob", "--rate", "2r/s", "--inflight", "1", capsys=capsys)
    lines = render.key_substitutions({"SEGAPP_API_KEYS_FILE": str(path)})
    ring = KeyRing.read(path)
    assert lines["    # key names: none"].split() == [
        word for key in ring.keys for word in (key.key_id, key.name + ";")]
    zones = lines["# key zones: none"]
    assert "rate=2r/s;" in zones and f"rate={DEFAULT_RATE};" in zones
    limits = lines["        # key limits: none"]
    assert "limit_conn segapp_key_inflight_0 1;" in limits and "burst=2 nodelay;" in limits
    assert limits.endswith("auth_request /.segapp/key;")
    assert "the key bob allows 2 requests a second, 1 at once" in lines["    # key limit texts: none"]
    assert render.key_substitutions({}) == {}
    path.write_text("broken\n")
    with pytest.raises(render.RenderError, match="SEGAPP_API_KEYS_FILE: .*line 1"):
        render.key_substitutions({"SEGAPP_API_KEYS_FILE": str(path)})
