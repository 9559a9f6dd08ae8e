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
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
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


def read_stat(folder: Path) -> tuple[int, float, float] | None:
    """(parent pid, its own CPU seconds: user + system, its reaped children's: cutime + cstime) of the process
    whose /proc folder this is, or None if it is gone or its stat unreadable."""
    try:
        stat = (folder / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) ": comm may hold spaces and ')'
        return (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS_PER_S,
                (int(fields[13]) + int(fields[14])) / TICKS_PER_S)
    except (OSError, ValueError, IndexError):
        return None


def stage_of(folder: Path) -> str:
    """The STAGE of a ``t2v serve STAGE`` command line, else "" (also when it cannot be read)."""
    try:
        words = [w.decode(errors="replace") for w in (folder / "cmdline").read_bytes().split(b"\0")]
    except OSError:
        return ""
    at = next((i for i, w in enumerate(words[1:-1], 1) if w == "serve" and Path(words[i - 1]).name == "t2v"), None)
    return words[at + 1] if at is not None else ""


def tree_cpu(root: int, proc: Path = PROC) -> dict[str, float]:
    """CPU seconds so far of ``root`` and every live process under it, summed by role: a service's own
    (``denoiser``: its process), what it started (``denoiser children``: the processes under it, and those
    it or they have reaped), and the rest (``other``: ``t2v up`` itself and what it reaped)."""
    processes = {int(f.name): found for f in proc.glob("[0-9]*") if (found := read_stat(f)) is not None}
    stages: dict[int, str] = {}
    totals: dict[str, float] = {}
    for pid, (_, own, reaped) in processes.items():
        chain, at = [], pid
        while at in processes and at != root and len(chain) < 64:    # up to the root, or not under it
            chain.append(at)
            at = processes[at][0]
        if at != root:
            continue
        for p in chain:                       # the command lines of the tree only: another's may be slow to read
            if p not in stages:
                stages[p] = stage_of(proc / str(p))
        owner = next((p for p in reversed(chain) if stages[p]), None)    # the service nearest the root
        if owner is None:
            totals["other"] = totals.get("other", 0.0) + own + reaped
            continue
        children = f"{stages[owner]} children"
        mine = stages[owner] if pid == owner else children      # a forked child keeps its parent's command line
        totals[mine] = totals.get(mine, 0.0) + own
        totals[children] = totals.get(children, 0.0) + reaped
    return totals


def cpu_by_role(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each role spent between two ``tree_cpu`` readings. A process that exits in between still
    counts, as its parent's reaped children's time, once the parent has waited for it; one whose parent died
    first leaves the tree (to init) and takes its time along, so a role's figure can then come out low."""
    return {role: round(after[role] - before.get(role, 0.0), 2) for role in sorted(after)}


@contextmanager
def watch(stat: Path = PROC_STAT, root: int | None = None, proc: Path = PROC
          ) -> Iterator[dict[str, float | int | None]]:
    """A dict of the block's figures: one core's time before it, and, filled in when the block ends (also
    when it raises, so a phase cut short keeps them), its busy and steal shares and its seconds; with
    ``root`` (the mesh's pid), ``cpu_s``: the CPU seconds each role of ``tree_cpu`` spent in the block."""
    figures: dict = {"core_ms_before": core_ms(), "cpus": os.cpu_count()}
    tree_before = tree_cpu(root, proc) if root is not None else {}     # its own time left out of the block's
    before, started = read_cpu(stat), time.monotonic()
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
