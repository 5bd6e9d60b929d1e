"""Debian's prometheus against real stacks, with the shipped rules: it scrapes a stack whose every inference fails
(SEGAPP_ENGINE_FAULT=1: 500s, counted in /metrics) and a healthy one, both under load; the error-ratio alert goes
firing on Prometheus' own API for the failing stack only.

The shipped rules look over minutes (rate over 5m, `for: 5m`); the test runs them from a copy in which every
duration in minutes is the same number of seconds (deploy/prometheus/rules/alerts.yml's expressions unchanged), with a
scrape and an evaluation every second."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bench.stack import ROOT, free_port

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
RULES = ROOT / "deploy" / "prometheus" / "rules"
ALERT = "SegappErrorRatioOverBudget"


def minutes_as_seconds(rules: str) -> str:
    """`rules` with every duration in minutes (`[5m]`, `for: 5m`) turned into as many seconds."""
    rules = re.sub(r"\[(\d+)m\]", r"[\1s]", rules)
    return re.sub(r"(for: )(\d+)m\b", r"\1\2s", rules)


class Prometheus:
    """Debian's prometheus on a free loopback port, with its own data folder; `stop()` ends it."""

    def __init__(self, targets: list[str]):
        if PROMETHEUS is None:
            pytest.fail("prometheus is not installed: run `make prometheus`")
        self.folder = Path(tempfile.mkdtemp(prefix="segapp-prometheus-"))
        for name in ("recording.yml", "alerts.yml"):
            (self.folder / name).write_text(minutes_as_seconds((RULES / name).read_text()))
        shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        local = next(job for job in shipped["scrape_configs"] if job["job_name"] == "segapp")
        local["static_configs"] = [{"targets": targets}]
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": ["recording.yml", "alerts.yml"], "scrape_configs": [local]}
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = open(self.folder / "prometheus.log", "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("prometheus did not start:\n" + self.logged())
            time.sleep(0.2)

    def api(self, path: str):
        """The `data` of an answer of Prometheus' HTTP API."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as answer:
            return json.load(answer)["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def logged(self) -> str:
        return (self.folder / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Load:
    """Inference requests one after another to a stack, from a thread, until `stop()`; counts them by outcome."""

    def __init__(self, stack, image: bytes):
        self.counts = Counter()
        self.statuses = Counter()
        self.running = True
        self.thread = threading.Thread(target=self.run, args=(stack, image), daemon=True)
        self.thread.start()

    def run(self, stack, image: bytes) -> None:
        while self.running:
            self.counts["sent"] += 1
            try:
                self.statuses[stack.infer(image, timeout=10).status] += 1
                self.counts["answered"] += 1
            except OSError:
                self.counts["failed"] += 1
            time.sleep(0.02)

    def stop(self) -> Counter:
        self.running = False
        self.thread.join(timeout=30)
        return self.counts


def test_error_ratio_alert_fires_for_the_failing_stack_only(stack_factory, jpeg):
    failing = stack_factory(SEGAPP_PROCESSES="1", SEGAPP_ENGINE_FAULT="1")
    healthy = stack_factory(SEGAPP_PROCESSES="1")
    prometheus = Prometheus([f"127.0.0.1:{failing.port}", f"127.0.0.1:{healthy.port}"])
    bad, good = Load(failing, jpeg), Load(healthy, jpeg)
    try:
        states, good_alerts, deadline = [], [], time.monotonic() + 40
        while time.monotonic() < deadline:
            alerts = [alert for alert in prometheus.api("/api/v1/alerts")["alerts"]
                      if alert["labels"]["alertname"] == ALERT]
            states += [alert["state"] for alert in alerts if alert["labels"]["instance"] == f"127.0.0.1:{failing.port}"]
            good_alerts += [alert for alert in alerts if alert["labels"]["instance"] == f"127.0.0.1:{healthy.port}"]
            if "firing" in states:
                break
            time.sleep(0.5)
        targets = prometheus.api("/api/v1/targets")["activeTargets"]
        # Prometheus saw the healthy stack's load: its silence is a ratio of 0, not a lack of data.
        served = {sample["metric"]["instance"]: float(sample["value"][1]) for sample in
                  prometheus.api("/api/v1/query?query=instance:segapp_requests_served:rate5m")["result"]}
    finally:
        bad_counts, good_counts = bad.stop(), good.stop()
        prometheus_log = prometheus.logged()
        prometheus.stop()
    print(f"\nfailing stack: {dict(bad_counts)} {dict(bad.statuses)}; healthy stack: {dict(good_counts)} "
          f"{dict(good.statuses)}; alert states seen: {Counter(states)}")
    assert {target["health"] for target in targets} == {"up"}, targets
    assert bad_counts["failed"] == good_counts["failed"] == 0
    assert set(bad.statuses) == {500} and set(good.statuses) == {200}
    assert good_counts["answered"] > 50
    assert "firing" in states, prometheus_log
    assert "pending" in states  # for: held it back first
    assert good_alerts == []
    assert served[f"127.0.0.1:{healthy.port}"] > 1
    assert prometheus.process.poll() is not None
