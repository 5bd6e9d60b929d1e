"""deploy/prometheus passes Prometheus' own checks: the scrape config and both rules files are valid (promtool check),
and every alert fires in one unit test of deploy/prometheus/tests and stays silent in another (promtool test rules)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        pytest.fail("promtool is not installed: run `make prometheus`")
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


def test_config_is_valid_and_names_both_rules_files():
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 rule files found" in checked.stdout


def test_rules_are_valid():
    checked = promtool("check", "rules", "rules/recording.yml", "rules/alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rules_unit_tests_pass():
    tests = sorted(str(path.relative_to(PROMETHEUS_DIR)) for path in (PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    checked = promtool("test", "rules", *tests)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent():
    alerts = {rule["alert"] for group in yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    fires, silent = set(), set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else silent).add(check["alertname"])
    assert len(alerts) == 7
    assert fires == alerts
    assert silent == alerts


def test_swarm_job_finds_replicas_by_dns():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    swarm = next(job for job in config["scrape_configs"] if job["job_name"] == "segapp-swarm")
    (discovery,) = swarm["dns_sd_configs"]
    assert (discovery["names"], discovery["type"], discovery["port"]) == (["tasks.segapp"], "A", 8080)
    assert all(re.fullmatch("segapp.*", job["job_name"]) for job in config["scrape_configs"])
