"""segapp's image, built by `make image`'s script and run by Docker as a hardened deployment runs it: read-only root,
a tmpfs for the run folder, an arbitrary non-root user, every capability dropped."""

from __future__ import annotations

import io
import json
import shutil
import ssl
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from bench.stack import Endpoint, free_port
from segapp import keys
from segapp.contract import read_card
from segapp.inference import SHIPPED_MODEL, card_path
from segapp.openapi import load_description
from tests.integration.test_tls import TestCA

pytestmark = pytest.mark.integration

HARDENED = ("--read-only", "--tmpfs", "/run/segapp", "--user", "12345", "--cap-drop", "ALL")


def run_segapp(docker, image: str, *options: str, tls: ssl.SSLContext | None = None) -> tuple[str, Endpoint, float]:
    """Start the image with `options`, port 8080 published on loopback; (container, endpoint, seconds to /readyz).
    `tls`: the client context of a container given a certificate."""
    port = free_port()
    started = time.monotonic()
    container = docker.run_container(image, "--publish", f"127.0.0.1:{port}:8080", *options)
    endpoint = Endpoint(port, tls=tls)
    deadline = started + 120
    while True:
        try:
            if endpoint.request("GET", "/readyz", timeout=5).status == 200:
                return container, endpoint, time.monotonic() - started
        except OSError:
            pass
        state = docker.json("inspect", container)[0]["State"]
        if not state["Running"] or time.monotonic() > deadline:
            raise AssertionError(f"not ready: {state}\n{docker('logs', container, check=False).stderr[-3000:]}")
        time.sleep(0.05)


def worker_stats(docker, container: str) -> list[dict]:
    """uWSGI's stats socket's workers, read inside the container."""
    read = ("import json, socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/segapp/stats.sock'); "
            "data = b''.join(iter(lambda: s.recv(65536), b'')); print(json.dumps(json.loads(data)['workers']))")
    return json.loads(docker("exec", container, "/opt/segapp/venv/bin/python", "-c", read).stdout)


def jpeg_of(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(out, format="JPEG")
    return out.getvalue()


def test_hardened_container_serves_as_an_unprivileged_user(docker, image, record_property):
    container, endpoint, ready_s = run_segapp(docker, image, *HARDENED)
    answer = endpoint.request("POST", "/infer", jpeg_of(320, 200), {"Content-Type": "image/jpeg"})
    assert answer.status == 200, answer.body[:300]
    assert Image.open(io.BytesIO(answer.body)).size == (320, 200)
    card = endpoint.request("GET", "/v1/model").json()
    assert card["release"] == read_card(card_path(SHIPPED_MODEL))["release"]
    # Every documented read route answers in the image as in the checkout: segapp runs from its installed wheel here,
    # and on 723bb99 /openapi.json read a file outside the package and answered 500.
    description = load_description()
    assert endpoint.request("GET", "/openapi.json").json() == description
    for template, item in description["paths"].items():
        if "get" in item:
            path = template.format(name=card["name"], version=card["version"])
            assert endpoint.request("GET", path).status < 500, path
    # Every process of the tree (uWSGI master, workers, nginx master and workers) runs as the user given.
    users = {line.split()[1] for line in docker("top", container, "-eo", "pid,uid,args").stdout.splitlines()[1:]}
    assert users == {"12345"}
    # The image's segapp upsamples masks with its compiled module (in the wheel deploy/build-image makes).
    compiled = "from segapp import upsampling; print(upsampling.COMPILED)"
    assert docker("exec", container, "/opt/segapp/venv/bin/python", "-c", compiled).stdout.strip() == "True"
    rss = [worker["rss"] // 2**20 for worker in worker_stats(docker, container)]
    size = docker.json("image", "inspect", image)[0]["Size"] // 10**6
    record_property("image", f"{size} MB, ready in {ready_s:.2f} s, worker RSS {rss} MB")
    print(f"\nimage {size} MB; docker run to /readyz 200 in {ready_s:.2f} s; worker RSS {rss} MB")


def test_image_labels_and_its_healthcheck(docker, image):
    config = docker.json("image", "inspect", image)[0]["Config"]
    labels = config["Labels"]
    assert labels["io.segapp.model.version"] == read_card(card_path(SHIPPED_MODEL))["release"]
    for key in ("title", "version", "revision", "created", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"] not in ("", "unknown"), key
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    assert config["User"] != "" and not config["User"].startswith("0")
    # Given a certificate and API keys as docs/deploy.md says (a folder mounted read-only, named by the variables),
    # the container serves HTTPS and asks for a key; the image's own probe, run more often than its default 10 s,
    # still makes Docker call it healthy (over HTTPS: plain HTTP is redirected).
    folder = Path(tempfile.mkdtemp(prefix="segapp-image-secrets-"))
    folder.chmod(0o755)
    try:
        authority = TestCA(folder)
        authority.install(serial=2001)
        key_id, key = keys.new_key()
        (folder / "keys").write_text(keys.KeyRing([keys.Key("ops", key_id, keys.digest(key))]).text())
        (folder / "keys").chmod(0o644)
        container, endpoint, _ = run_segapp(
            docker, image, *HARDENED, "--health-interval", "1s", "--health-start-period", "0s",
            "--volume", f"{folder}:/secrets:ro", "--env", "SEGAPP_TLS_CERT=/secrets/server.pem",
            "--env", "SEGAPP_TLS_KEY=/secrets/server.key", "--env", "SEGAPP_API_KEYS_FILE=/secrets/keys",
            tls=authority.client_context())
        deadline = time.monotonic() + 60
        while (health := docker.json("inspect", container)[0]["State"]["Health"]["Status"]) != "healthy":
            assert health != "unhealthy" and time.monotonic() < deadline, health
            time.sleep(0.5)
        image_bytes = jpeg_of(320, 200)
        assert endpoint.request("POST", "/infer", image_bytes, {"Content-Type": "image/jpeg"}).status == 401
        answer = endpoint.request("POST", "/infer", image_bytes, {"Content-Type": "image/jpeg",
                                                                  "Authorization": f"Bearer {key}"})
        assert answer.status == 200 and answer.body.startswith(b"\x89PNG")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_workers_follow_the_cpu_quota_and_settings_come_from_the_environment(docker, image):
    container, _, _ = run_segapp(docker, image, *HARDENED, "--cpus", "1")
    assert len(worker_stats(docker, container)) == 1
    container, endpoint, _ = run_segapp(docker, image, *HARDENED, "--cpus", "1", "--env", "SEGAPP_PROCESSES=3",
                                        "--env", "SEGAPP_DEFAULT_FORMAT=json")
    assert len(worker_stats(docker, container)) == 3
    answer = endpoint.request("POST", "/infer", jpeg_of(64, 48), {"Content-Type": "image/jpeg"})
    assert answer.json()["width"] == 64


def test_docker_stop_lets_requests_in_flight_finish_then_everything_exits(docker, image):
    container, endpoint, _ = run_segapp(docker, image, *HARDENED, "--env", "SEGAPP_ENGINE_DELAY_MS=3000",
                                        "--env", "SEGAPP_PROCESSES=2")
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = [pool.submit(endpoint.request, "POST", "/infer", jpeg_of(64, 48), {"Content-Type": "image/jpeg"})
                   for _ in range(2)]
        deadline = time.monotonic() + 30
        while sum(worker["status"] == "busy" for worker in worker_stats(docker, container)) < 2:
            assert time.monotonic() < deadline, "the requests never reached the workers"
            time.sleep(0.05)
        docker("stop", "--time", "30", container, timeout=60)
        statuses = [answer.result(timeout=60).status for answer in answers]
    state = docker.json("inspect", container)[0]["State"]
    assert statuses == [200, 200]
    # 0: the stack stopped by itself within the 30 s; Docker's SIGKILL would have made it 137.
    assert (state["Running"], state["ExitCode"]) == (False, 0), docker("logs", container).stderr[-3000:]
