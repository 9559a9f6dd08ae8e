"""What the host's CPUs were doing while a benchmark phase ran: how busy they were, how much of their time the
hypervisor took (steal), and how fast one core was just before.

Why: on this workplace's lent KVM hosts the CPU-bound parts of a run move a lot between calls with nothing in
the run to say why. In run J (docs/benchmarks.md) the eager peer, which is bound by its kernel launches, took
3.59 s a video before the mesh and 6.32 s after it on the same machine, and the decoder's CPU-side time went
from 0.048 to 0.135 s a video between two starts: a slower host, or our own processes crowding it? The
counters in /proc/stat tell the two apart (steal is time the host gave elsewhere; busy is what this machine
ran), and a fixed single-core task timed before each phase shows the speed a CPU-bound peer would see.

Linux only; elsewhere (or where /proc/stat cannot be read) the figures are None and nothing fails.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PROC_STAT = Path("/proc/stat")
# /proc/stat's "cpu" line, in order (proc(5)); guest time is already counted in user and nice
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
BUSY = ("user", "nice", "system", "irq", "softirq")
CORE_TASK = b"\x5a" * (8 << 20)          # sha256 of 8 MiB: ~5 ms on one core of this workplace's dev machine


def read_cpu(stat: Path = PROC_STAT) -> dict[str, int] | None:
    """All CPUs' time counters (clock ticks since boot) from ``stat``'s first line, or None if unreadable."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:1 + len(FIELDS)]]
    return dict(zip(FIELDS, values + [0] * (len(FIELDS) - len(values))))


def shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float | None]:
    """Of all CPUs' time between two ``read_cpu`` readings: the share this machine ran something (busy) and
    the share the hypervisor kept (steal). None where a reading is missing or no time passed."""
    if not before or not after:
        return {"busy_share": None, "steal_share": None}
    delta = {k: after[k] - before[k] for k in FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return {"busy_share": None, "steal_share": None}
    return {"busy_share": round(sum(delta[k] for k in BUSY) / total, 4),
            "steal_share": round(delta["steal"] / total, 4)}


def core_ms(repeats: int = 5) -> float:
    """Median milliseconds one core takes for a fixed task (sha256 of 8 MiB) now."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        hashlib.sha256(CORE_TASK).digest()
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 2)


@contextmanager
def watch(stat: Path = PROC_STAT) -> Iterator[dict[str, float | int | None]]:
    """A dict of the block's figures: one core's time before it, and, filled in when the block ends (also
    when it raises, so a phase cut short keeps them), its busy and steal shares and its seconds."""
    figures: dict[str, float | int | None] = {"core_ms_before": core_ms(), "cpus": os.cpu_count()}
    before, started = read_cpu(stat), time.monotonic()
    try:
        yield figures
    finally:
        figures.update(shares(before, read_cpu(stat)), seconds=round(time.monotonic() - started, 1))


def describe(figures: dict[str, float | int | None]) -> str:
    """One line for a report: 'busy 42%, steal 0.3%, one core 21.5 ms'."""
    def pct(key: str) -> str:
        value = figures.get(key)
        return "n/a" if value is None else f"{value:.1%}"

    return (f"busy {pct('busy_share')}, steal {pct('steal_share')}, one core {figures.get('core_ms_before')} ms "
            "(sha256 of 8 MiB, before)")
