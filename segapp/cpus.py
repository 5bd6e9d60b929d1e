"""How many CPUs this process may use: its affinity, capped by its cgroup's CPU quota.

uWSGI's `%k` and os.cpu_count() count the host's cores; a container limited to 2 CPUs on a 64-core host would start
64 workers, each with its own model, all throttled. uwsgi/serve runs `python -m segapp.cpus` to size the workers when
SEGAPP_PROCESSES is not set.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The CPUs the cgroup's quota allows (quota / period), or None when it sets none (v2 `cpu.max`, v1 `cfs_*`)."""
    v2 = root / "cpu.max"
    if v2.exists():
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if v1_quota.exists() and v1_period.exists():
        quota = int(v1_quota.read_text())
        return None if quota <= 0 else quota / int(v1_period.read_text())
    return None


def available_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may run on, at most its cgroup's quota rounded up, at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


if __name__ == "__main__":
    print(available_cpus())
