"""The real stack under test, started by the one harness (bench/stack.py: `uwsgi --ini uwsgi/local.ini`, uWSGI
master, workers, nginx as its attached daemon, exactly as `make serve` runs it) on a free loopback port with a
temporary run folder. This file adds only what tests need on top: their defaults, the user the workers drop to
when the tests run as root, and fixtures.

`start_stack(**env)` starts one, waits for /readyz through nginx and returns a `Stack`; `Stack.stop()` sends SIGTERM
and asserts that every process it started (master, workers, nginx master and workers) is gone. Variants (a low rate
limit, a short read timeout, a slowed engine, another model) are environment variables that uwsgi/local.ini and
nginx/render.py understand.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.stack import ROOT, SBIN_PATH, UWSGI, Endpoint, Stack, alive, descendants, free_port, wait_gone
from tests.integration.docker_engine import DockerEngine

NGINX = shutil.which("nginx", path=SBIN_PATH)


def run_user() -> tuple[str | None, str]:
    """The user uWSGI drops to, and why: www-data when the tests run as root, nobody when they do not."""
    if os.geteuid() != 0:
        return None, "the tests run as a normal user: uWSGI has no privileges to drop"
    return "www-data", "started as root; workers drop to www-data"


def drop_env() -> dict[str, str]:
    """Environment for a stack started as root that drops to `run_user()`.

    uWSGI drops privileges before it starts Python, so the worker user must read the standard library. Where the
    interpreter lives under a home only root may enter (pyenv in /root on the development and CI machines), point
    PYTHONHOME at a world-readable copy of the same interpreter's standard library; a real server installs Python
    where every user can read it (docs/operations.md), and needs nothing of the kind.
    """
    user, _ = run_user()
    if user is None:
        return {}
    env = {"SEGAPP_UID": user, "SEGAPP_GID": user}
    readable = subprocess.run(["runuser", "-u", user, "--", "test", "-r", os.__file__], capture_output=True)
    if readable.returncode != 0:
        env["PYTHONHOME"] = str(_readable_python_home())
    return env


@functools.cache
def _readable_python_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="segapp-pythonhome-"))
    home.chmod(0o755)
    stdlib = Path(os.__file__).parent
    skip = shutil.ignore_patterns("test", "site-packages", "idlelib", "tkinter", "turtledemo", "__pycache__")
    shutil.copytree(stdlib, home / "lib" / stdlib.name, ignore=skip, symlinks=True)
    for folder in home.rglob("*"):
        folder.chmod(0o755 if folder.is_dir() else 0o644)
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


def make_run_dir() -> Path:
    """A fresh run folder that the user uWSGI drops to can enter (mkdtemp's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="segapp-it-"))
    path.chmod(0o755)
    return path


def start_stack(run_dir: Path | None = None, command: list[str] | None = None, tls: ssl.SSLContext | None = None,
                **env: str) -> Stack:
    """Start uwsgi --ini uwsgi/local.ini (or `command`, e.g. uwsgi/serve) with the tests' defaults and SEGAPP_*
    `env` on a free port; returns once /readyz answers 200 (over HTTPS with the client context `tls`)."""
    if NGINX is None:
        pytest.fail("nginx is not installed: run `make nginx`")
    defaults = {
        "SEGAPP_PROCESSES": "2",
        # The shared default stack serves hundreds of requests from one address; the rate-limit test sets its own.
        "SEGAPP_NGINX_RATE": "10000r/s",
        "SEGAPP_NGINX_BURST": "10000",
        # No worker recycles in the middle of a test (the fuzz sends 10,000 requests): uWSGI 2.0.31 loses a SIGTERM
        # that arrives while a recycled worker loads the app, and the stop would wait for ever. The metrics test
        # sets its own.
        "SEGAPP_MAX_REQUESTS": "1000000",
    }
    return Stack.start(run_dir or make_run_dir(), {**defaults, **drop_env(), **env}, command=command, tls=tls)


@pytest.fixture(scope="session")
def jpeg() -> bytes:
    """A 640 x 480 JPEG photo-like image."""
    rng = np.random.default_rng(4)
    ys, xs = np.mgrid[0:480, 0:640]
    pixels = np.stack([xs * 255 // 639, ys * 255 // 479, (xs + ys) % 256], axis=-1)
    pixels = pixels + rng.integers(-20, 20, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


@pytest.fixture(scope="session")
def user_env() -> dict[str, str]:
    """The environment that makes a stack started as root drop to `run_user()`: see `drop_env`."""
    return drop_env()


@pytest.fixture(scope="session")
def run_as() -> tuple[str | None, str]:
    """(the user uWSGI drops to or None, why): see `run_user`."""
    return run_user()


@pytest.fixture(scope="module")
def stack():
    """The stack with default settings, shared by a test module; stopped (every process gone) after it."""
    running = start_stack()
    yield running
    running.stop()
    shutil.rmtree(running.run_dir, ignore_errors=True)


@pytest.fixture
def stack_factory():
    """Start stacks with settings of their own; each is stopped, with every process gone, after the test."""
    started: list[Stack] = []

    def start(**env: str) -> Stack:
        started.append(start_stack(**env))
        return started[-1]

    yield start
    for running in started:
        if running.process.poll() is None or alive(running.processes()):
            running.stop()
        shutil.rmtree(running.run_dir, ignore_errors=True)


def render_nginx(run_dir: Path, port: int, **env: str) -> Path:
    """nginx/render.py's configuration for `run_dir` and `port`, as uwsgi/local.ini writes it; returns RUN/nginx."""
    subprocess.run([sys.executable, str(ROOT / "nginx" / "render.py"), "--run-dir", str(run_dir), "--port", str(port)],
                   check=True, env={**os.environ, "PATH": SBIN_PATH, **env}, capture_output=True, text=True)
    return run_dir / "nginx"


@pytest.fixture
def nginx_alone():
    """nginx as uwsgi/local.ini starts it, but with no uWSGI behind it: an Endpoint, stopped after the test."""
    if NGINX is None:
        pytest.fail("nginx is not installed: run `make nginx`")
    run_dir = make_run_dir()
    endpoint = Endpoint(free_port())
    prefix = render_nginx(run_dir, endpoint.port)
    process = subprocess.Popen([NGINX, "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "stderr"],
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", endpoint.port), timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nginx did not listen on {endpoint.port}: {process.poll()=}") from None
            time.sleep(0.1)
    yield endpoint
    process.send_signal(signal.SIGQUIT)
    process.wait(timeout=30)
    assert not wait_gone(descendants(process.pid) | {process.pid}, 10)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    if NGINX is None:
        pytest.fail("nginx is not installed: run `make nginx`")
    return NGINX


@pytest.fixture(scope="session")
def uwsgi_binary() -> str:
    return str(UWSGI)


@pytest.fixture(name="render_nginx")
def render_nginx_fixture():
    """`render_nginx(run_dir, port, **env)`: nginx/render.py's output folder."""
    return render_nginx


@pytest.fixture
def run_dir():
    """A fresh run folder that the user uWSGI drops to can enter; removed afterwards."""
    path = make_run_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def docker():
    """The Docker engine (a private dockerd when none runs); every container, network and image of the tests is
    removed after the session, and a dockerd started here is stopped."""
    engine = DockerEngine().start()
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def image(docker) -> str:
    """segapp's image, built by `make image`'s script for this session: its tag."""
    tag = f"segapp-test:{os.getpid()}"
    name, version = tag.split(":")
    env = {**docker.env, "IMAGE": name, "TAG": version, "VENV": str(Path(sys.executable).parent.parent)}
    built = subprocess.run([str(ROOT / "deploy" / "build-image")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=1200)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    print("\n" + built.stdout.strip().splitlines()[-1])
    return tag
