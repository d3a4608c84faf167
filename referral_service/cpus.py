"""How many CPUs this process may use: the cores it may run on (its affinity mask), capped by
its cgroup's CPU quota (a container's ``--cpus``, a Kubernetes CPU limit, systemd's
``CPUQuota=``), rounded down, at least one.

``os.cpu_count()`` counts the host's cores: in a container limited to 2 CPUs on a 64-core host
it says 64, and 64 workers would share 2 CPUs' worth of time slices (throttled every period).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _quota_v2(directory: Path) -> float | None:
    """``cpu.max``: ``"<quota> <period>"`` or ``"max <period>"``."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _own_cgroups(proc_self_cgroup: Path) -> list[tuple[str, str]]:
    """(controllers, path) of each line of ``/proc/self/cgroup``."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            found.append((parts[1], parts[2]))
    return found


def _ancestors(root: Path, path: str) -> list[Path]:
    """The cgroup directory of ``path`` under ``root`` and each parent up to ``root`` (a parent's
    quota limits its children). Inside a cgroup namespace (a container) the path may not exist
    under the mount: then the mount's root is the process's cgroup."""
    directories = []
    current = root / path.lstrip("/")
    if current.is_dir() and current != root:
        while current != root and root in current.parents:
            directories.append(current)
            current = current.parent
    directories.append(root)
    return directories


def cgroup_cpu_limit(
    root: Path = CGROUP_ROOT, proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU quota of this process's cgroup (and its parents), in CPUs; None when unlimited
    or unknown."""
    limits: list[float] = []
    for controllers, path in _own_cgroups(proc_self_cgroup):
        if controllers == "":  # cgroup v2 (unified)
            for directory in _ancestors(root, path):
                quota = _quota_v2(directory)
                if quota is not None:
                    limits.append(quota)
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for directory in _ancestors(mount, path):
                        quota = _quota_v1(directory)
                        if quota is not None:
                            limits.append(quota)
                    break
    return min(limits) if limits else None


def available_cpus(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The cores this process may run on, capped by the cgroup quota rounded down; at least 1."""
    cores = _affinity()
    limit = cgroup_cpu_limit(root, proc_self_cgroup)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)
