"""segapp.cpus: workers sized from the cgroup's CPU quota, not the host's cores."""

from __future__ import annotations

import os

import pytest

from segapp.cpus import available_cpus, cgroup_quota

HOST = len(os.sched_getaffinity(0))


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) == min(HOST, 2)


def test_cgroup_v2_without_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    assert available_cpus(tmp_path) == HOST


@pytest.mark.parametrize("quota, expected", [("50000", 1), ("-1", None)])
def test_cgroup_v1_quota(tmp_path, quota, expected):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == (1 if expected else HOST)


def test_no_cgroup_files_means_the_affinity(tmp_path):
    assert available_cpus(tmp_path) == HOST
