"""A Docker engine for the container tests: the one that runs, or a private dockerd started for the session.

Everything the tests make is theirs to remove: containers and networks carry the label `io.segapp.test`, images are
tagged `segapp-test:*` (and segapp-base:bookworm when the build made it here). A dockerd started here keeps its
data in a temporary folder, and stops with the session, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

LABEL = "io.segapp.test"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class DockerEngine:
    """`docker` commands against one engine; `start()` finds or starts it, `close()` removes what the tests made."""

    def __init__(self):
        self.env = {**os.environ, "PATH": SBIN_PATH}
        self.daemon: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.images_before: set[str] = set()
        self.swarm_joined_here = False

    def __call__(self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None,
                 ) -> subprocess.CompletedProcess:
        """`docker ARGS...`; raises with its output when it fails and `check`."""
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def json(self, *args: str):
        return json.loads(self(*args).stdout)

    def start(self) -> DockerEngine:
        if shutil.which("docker", path=SBIN_PATH) is None or shutil.which("dockerd", path=SBIN_PATH) is None:
            raise AssertionError("Docker is not installed: run `make docker`")
        if self("info", check=False, timeout=30).returncode != 0:
            self._start_daemon()
        self.images_before = set(self("image", "ls", "--quiet", "--no-trunc").stdout.split())
        return self

    def _start_daemon(self) -> None:
        """A dockerd of the session's own: overlay2, its data and sockets in a temporary folder."""
        self.folder = Path(tempfile.mkdtemp(prefix="segapp-docker-"))
        host = f"unix://{self.folder}/docker.sock"
        with open(self.folder / "dockerd.log", "wb") as log:
            self.daemon = subprocess.Popen(
                ["dockerd", "--data-root", str(self.folder / "data"), "--exec-root", str(self.folder / "exec"),
                 "--host", host, "--pidfile", str(self.folder / "dockerd.pid"), "--storage-driver", "overlay2"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.env["DOCKER_HOST"] = host
        deadline = time.monotonic() + 60
        while self("info", check=False, timeout=30).returncode != 0:
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{(self.folder / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def run_container(self, image: str, *args: str, name: str | None = None) -> str:
        """`docker run -d` with the tests' label; returns the container's ID."""
        options = ["--label", LABEL] + (["--name", name] if name else [])
        return self("run", "--detach", *options, *args, image).stdout.strip()

    def close(self) -> None:
        """Remove the tests' containers, services, networks and images; leave the swarm and stop a daemon of ours."""
        with contextlib.suppress(Exception):
            if self.swarm_joined_here:
                self("swarm", "leave", "--force", check=False, timeout=120)
            containers = self("ps", "--all", "--quiet", "--filter", f"label={LABEL}").stdout.split()
            if containers:
                self("rm", "--force", "--volumes", *containers, check=False, timeout=120)
            networks = self("network", "ls", "--quiet", "--filter", f"label={LABEL}").stdout.split()
            if networks:
                self("network", "rm", *networks, check=False)
            made = set(self("image", "ls", "--quiet", "--no-trunc").stdout.split()) - self.images_before
            if made:
                self("image", "rm", "--force", *made, check=False, timeout=120)
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(timeout=30)
            # containerd's shims of the daemon's containers were stopped with them; nothing of ours runs now
            subprocess.run(["umount", "--recursive", "--lazy", str(self.folder / "data")], capture_output=True)
            shutil.rmtree(self.folder, ignore_errors=True)
