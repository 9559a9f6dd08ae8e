"""How many x264 threads a video gets: the decoder's cores shared out among the calls in it.

Why: x264's own choice (with zerolatency's sliced threads, one a core, capped by the frame's height at
about one a 64 rows: 4 for 256x256) is the fastest for a video alone, but at a burst's end the 16 videos
a shared VAE pass decodes all encode at once, and 16 x 4 threads crowd a 16-core host. On lent H200 hosts
(16 cores, docs/benchmarks.md run I) 16 videos of 16 frames at 256x256 took 0.18-0.20 s at once with
x264's choice and 0.10-0.12 s with 1 thread each; alone, 0.03 s with x264's choice and 0.06-0.08 s with 1.
So each video gets the cores divided by the calls in the decoder, at least 1, and x264 clips that to what
the frame allows: a call alone gets what x264 would have picked. Counts between 1 and 16 calls (2 to 15
threads a video) follow the same rule but were not measured.

x264 cannot change the count mid-stream, so a video takes it when its first frames arrive, not when its
call comes in: by then the calls of a burst have all come (they wait on one shared VAE pass), and the
first of them does not keep 4 threads for having been first.

The cores are those this process may run on and no more than its cgroup's CPU quota (a Kubernetes CPU
limit, which x264's own choice ignores): on a 64-core node with an 8-core limit, 64 would make the crowd
the limit then throttles.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _cgroup_cpu_max(root: Path, proc_cgroup: Path) -> Path:
    """This process's cgroup v2 ``cpu.max``: its own cgroup's where /proc says which (no cgroup namespace:
    systemd's CPUQuota, docker --cgroupns=host), else the root one (a container's own namespace)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/") / "cpu.max"
    except OSError:
        pass
    return root / "cpu.max"


def available_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The CPU cores this process may use: its affinity, capped by its cgroup v2 quota rounded up (a 1.5-core
    limit counts 2). cgroup v1 quotas are not read."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:              # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = _cgroup_cpu_max(root, proc_cgroup).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError, ZeroDivisionError):   # no cgroup v2 quota here, or one not understood
        pass
    return cores


def threads_for(calls: int, cores: int) -> int:
    """x264 threads for a video while ``calls`` calls (its own included) are in the decoder."""
    return max(1, cores // max(1, calls))


class EncodeThreads:
    """Counts the calls in the decoder and tells a video starting to encode its x264 thread count.

    ``fixed`` > 0 is an operator's ``--x264-threads``: every video gets that many, whatever the load.
    """

    def __init__(self, fixed: int = 0, cores: int | None = None) -> None:
        self.fixed = fixed
        self.cores = cores if cores is not None else available_cores()
        self._lock = threading.Lock()
        self._calls = 0

    @contextmanager
    def counting_call(self) -> Iterator[None]:
        """Counts a call from its start, its wait for the VAE included: the calls waiting on one shared
        VAE pass are the ones that will encode at once."""
        with self._lock:
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1

    def threads_for_video(self) -> int:
        """Asked when a video's first frames arrive (x264 opens then), so it sees the calls that came with it."""
        return self.fixed or threads_for(self._calls, self.cores)
