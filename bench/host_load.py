"""What the host's CPUs were doing while a benchmark phase ran: how busy they were, how much of their time the
hypervisor took (steal), and how fast one core was just before.

Why: on this workplace's lent KVM hosts the CPU-bound parts of a run move a lot between calls with nothing in
the run to say why. In run J (docs/benchmarks.md) the eager peer, which is bound by its kernel launches, took
3.59 s a video before the mesh and 6.32 s after it on the same machine, and the decoder's CPU-side time went
from 0.048 to 0.135 s a video between two starts: a slower host, or our own processes crowding it? The
counters in /proc/stat tell the two apart (steal is time the host gave elsewhere; busy is what this machine
ran), and a fixed single-core task timed before each phase shows the speed a CPU-bound peer would see.
Given the mesh's process (``t2v up``), a block also gets the CPU seconds of each of its services and of
what those services started (Inductor's compile workers are the denoiser's children), from /proc/PID/stat:
which process a busy share belongs to.

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

PROC = Path("/proc")
PROC_STAT = PROC / "stat"
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


def read_process(folder: Path) -> tuple[int, float, str] | None:
    """(parent pid, CPU seconds: user + system, its role) of the process whose /proc folder this is, or None
    if it is gone or unreadable. The role is the stage of a ``t2v serve STAGE`` command line, else ""."""
    try:
        stat = (folder / "stat").read_text()
        argv = (folder / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) ": comm may hold spaces and ')'
    ticks = os.sysconf("SC_CLK_TCK")
    words = [w.decode(errors="replace") for w in argv]
    role = words[words.index("serve") + 1] if "serve" in words[:-1] else ""
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, role


def tree_cpu(root: int, proc: Path = PROC) -> dict[int, tuple[str, float]]:
    """Each live process at or under ``root``: its role and CPU seconds so far. Roles: a service's own
    (``denoiser``), what it started (``denoiser children``), and the rest (``other``: ``t2v up`` itself)."""
    processes: dict[int, tuple[int, float, str]] = {}
    for folder in proc.glob("[0-9]*"):
        found = read_process(folder)
        if found is not None:
            processes[int(folder.name)] = found
    tree: dict[int, tuple[str, float]] = {}
    for pid, (_, seconds, role) in processes.items():
        chain, at = [], pid
        while at in processes and at != root and len(chain) < 64:    # up to the root, or not under it
            chain.append(at)
            at = processes[at][0]
        if at != root:
            continue
        service = next((processes[p][2] for p in chain if processes[p][2]), "")
        tree[pid] = ("other" if not service else service if role == service else f"{service} children", seconds)
    return tree


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role spent between two ``tree_cpu`` readings: the processes alive at the second, each
    from its first reading (0 if it started in between). One that exited in between is not counted (its
    time is its parent's only once reaped, and then as the parent's children's time, which stat leaves out)."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return {role: round(seconds, 2) for role, seconds in sorted(spent.items())}


@contextmanager
def watch(stat: Path = PROC_STAT, root: int | None = None, proc: Path = PROC
          ) -> Iterator[dict[str, float | int | None]]:
    """A dict of the block's figures: one core's time before it, and, filled in when the block ends (also
    when it raises, so a phase cut short keeps them), its busy and steal shares and its seconds; with
    ``root`` (the mesh's pid), ``cpu_s``: the CPU seconds each role of ``tree_cpu`` spent in the block."""
    figures: dict = {"core_ms_before": core_ms(), "cpus": os.cpu_count()}
    before, started = read_cpu(stat), time.monotonic()
    tree_before = tree_cpu(root, proc) if root is not None else {}
    try:
        yield figures
    finally:
        figures.update(shares(before, read_cpu(stat)), seconds=round(time.monotonic() - started, 1))
        if root is not None:
            figures["cpu_s"] = cpu_by_role(tree_before, tree_cpu(root, proc))


def describe(figures: dict[str, float | int | None]) -> str:
    """One line for a report: 'busy 42.0%, steal 0.3%, one core 21.5 ms (sha256 of 8 MiB, before)', then the
    CPU seconds by role where the block had them ('; CPU seconds: decoder 0.41, denoiser 2.10, ...')."""
    def pct(key: str) -> str:
        value = figures.get(key)
        return "n/a" if value is None else f"{value:.1%}"

    by_role = ", ".join(f"{role} {seconds:.2f}" for role, seconds in figures.get("cpu_s", {}).items())
    return (f"busy {pct('busy_share')}, steal {pct('steal_share')}, one core {figures.get('core_ms_before')} ms "
            "(sha256 of 8 MiB, before)" + (f"; CPU seconds: {by_role}" if by_role else ""))
