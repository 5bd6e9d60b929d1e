"""The system calls a request costs each layer, counted by strace: exact where CPU times on a shared machine are not.

    PATH=$PATH:/usr/sbin .venv/bin/python -m bench.syscalls [--requests 200] [--size 500x375] [--log-format text]

One stack as `make serve` starts it (2 workers, the per-address limits lifted); `strace -c -f` attaches to nginx's
worker and to both uWSGI workers, the client posts the JPEG `--requests` times on one keep-alive connection, then
strace detaches and its counts are divided by the requests: calls a request by layer and by system call (the
access line's write, the socket's reads and writes of the body and the answer, the polls between them). strace
slows the processes it watches: the counts are the figure here, not the time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.images import make_image
from bench.layers import roles
from bench.stack import Stack

# strace -c's table: "% time seconds usecs/call calls [errors] syscall"
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def counts(report: str) -> dict[str, int]:
    """strace -c's summary as {system call: calls}."""
    found = {}
    for line in report.splitlines():
        if (match := _ROW.match(line)) and match.group(2) != "total":
            found[match.group(2)] = int(match.group(1))
    return found


def watch(pids: list[int], output: Path) -> subprocess.Popen:
    command = ["strace", "-c", "-f", "-o", str(output)]
    for pid in pids:
        command += ["-p", str(pid)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached
    return process


def measure(image: Path, requests: int, log_format: str) -> dict:
    env = {"SEGAPP_PROCESSES": "2", "SEGAPP_THREADS": "1", "SEGAPP_NGINX_RATE": "100000r/s",
           "SEGAPP_NGINX_BURST": "100000", "SEGAPP_MAX_REQUESTS": "1000000", "SEGAPP_LOG_FORMAT": log_format}
    body = image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="segapp-syscalls-") as run_dir, Stack.start(Path(run_dir), env) as stack:
        grouped = roles(stack)
        nginx_master = int((stack.run_dir / "nginx" / "nginx.pid").read_text())
        layers = {"nginx": [pid for pid in grouped["nginx"] if pid != nginx_master], "workers": grouped["workers"]}
        connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
        post = {"Content-Type": "image/jpeg"}
        for _ in range(10):  # warm: both workers, the connection
            connection.request("POST", "/infer", body, post)
            connection.getresponse().read()
        tracers = {layer: watch(pids, Path(run_dir) / f"{layer}.strace") for layer, pids in layers.items()}
        for _ in range(requests):
            connection.request("POST", "/infer", body, post)
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
        time.sleep(1.5)  # nginx's buffered access lines are written within a second
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        connection.close()
        found = {layer: counts((Path(run_dir) / f"{layer}.strace").read_text()) for layer in layers}
    return {layer: {"all": round(sum(calls.values()) / requests, 2),
                    **{name: round(n / requests, 2) for name, n in sorted(calls.items(), key=lambda kv: -kv[1])}}
            for layer, calls in found.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--size", default="500x375", help="the JPEG's WIDTHxHEIGHT")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    options = parser.parse_args(argv)
    width, height = (int(side) for side in options.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="segapp-syscalls-image-") as folder:
        image = make_image(Path(folder), width, height)
        result = measure(image, options.requests, options.log_format)
    print(json.dumps({"image": options.size,
                      "requests": options.requests, "log_format": options.log_format,
                      "calls_per_request": result}, indent=1))


if __name__ == "__main__":
    main()
