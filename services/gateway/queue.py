"""The gateway's bounded priority queue of job ids. Pure logic: no gRPC, no SQLite, no threads.

Why its own module: who runs next is the policy users feel most, so it lives in one small class that
unit tests drive with a fake clock. The rules:

- three levels, high > normal > low, first come first served within a level;
- aging: a waiting job's effective level rises by one for every ``aging_seconds`` it has waited
  (up to high), so a stream of normal or high jobs cannot starve a low one forever; among jobs of the
  same effective level the one that has waited longest goes first;
- bounded: a full queue refuses a job with ``QueueFull``, which carries a retry-after estimate taken
  from how fast jobs have recently left the queue.

Not thread-safe on purpose: its one owner (``jobs.JobService``) holds a lock around every call.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from services.common.errors import ResourceExhausted


class Priority(enum.IntEnum):
    """Levels, higher value = runs first. ``name.lower()`` is what the store and logs write."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, text: str) -> "Priority":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"priority {text!r} is not one of low, normal, high") from None


class QueueFull(ResourceExhausted):
    """The queue holds ``max_size`` jobs; the caller should retry after ``retry_after_seconds``."""

    def __init__(self, length: int, retry_after_seconds: int) -> None:
        super().__init__(f"the queue is full ({length} jobs waiting); retry in about "
                         f"{retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


@dataclass(order=True, frozen=True)
class _Entry:
    enqueued_at: float
    seq: int
    job_id: str = field(compare=False)
    priority: Priority = field(compare=False)


class JobQueue:
    """Job ids waiting for a slot. ``push`` / ``pop`` / ``remove`` / ``position``; see the module doc."""

    def __init__(self, max_size: int = 256, aging_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, default_retry_after: float = 30.0) -> None:
        if max_size < 1:
            raise ValueError(f"max_size is {max_size}; the queue must hold at least one job")
        self.max_size = max_size
        self.aging_seconds = aging_seconds
        self._clock = clock
        self._levels: dict[Priority, list[_Entry]] = {p: [] for p in Priority}   # each sorted by (time, seq)
        self._entries: dict[str, _Entry] = {}
        self._seq = itertools.count()
        # Mean seconds between two jobs leaving the queue (exponential moving average), for retry-after.
        self._default_retry_after = default_retry_after
        self._mean_pop_interval: float | None = None
        self._last_pop: float | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    # --- changing it --------------------------------------------------------------------------
    def push(self, job_id: str, priority: Priority = Priority.NORMAL, waited_seconds: float = 0.0,
             force: bool = False) -> int:
        """Add a job; return its position (1 = next). Raise QueueFull when full, unless ``force``.

        ``waited_seconds`` back-dates the entry (a job re-queued after a restart keeps its age and its
        place among jobs of its level); ``force`` is for such re-queued jobs, which were accepted already.
        """
        if job_id in self._entries:
            raise ValueError(f"job {job_id} is already queued")
        if len(self._entries) >= self.max_size and not force:
            raise QueueFull(len(self._entries), self.retry_after_seconds())
        entry = _Entry(self._clock() - max(0.0, waited_seconds), next(self._seq), job_id, Priority(priority))
        bisect.insort(self._levels[entry.priority], entry)
        self._entries[job_id] = entry
        return self.position(job_id)

    def pop(self) -> str | None:
        """Take the job that runs next, or None when the queue is empty."""
        now = self._clock()
        best = self._next_entry(now, {p: 0 for p in Priority})
        if best is None:
            return None
        self._levels[best.priority].pop(0)
        del self._entries[best.job_id]
        self._note_pop(now)
        return best.job_id

    def remove(self, job_id: str) -> bool:
        """Take a job out (cancelled, deadline passed); False if it was not queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        self._levels[entry.priority].remove(entry)
        return True

    # --- reading it ---------------------------------------------------------------------------
    def effective_priority(self, job_id: str) -> int:
        """The job's level after aging (0 low .. 2 high)."""
        entry = self._entries[job_id]
        return self._effective(entry, self._clock())

    def position(self, job_id: str) -> int:
        """1 = runs next; 0 = not in the queue. As of now: aging may move it up later."""
        if job_id not in self._entries:
            return 0
        for index, current in enumerate(self.order(), start=1):
            if current == job_id:
                return index
        return 0  # unreachable: every entry appears in order()

    def order(self) -> list[str]:
        """Every queued job id, in the order they would run if nothing changed from now on."""
        return list(self._iter_order(self._clock()))

    def positions(self) -> dict[str, int]:
        """Every queued job id with its position (one pass; for telling every waiter at once)."""
        return {job_id: index for index, job_id in enumerate(self.order(), start=1)}

    def depths(self) -> dict[str, int]:
        """Queued jobs by priority name ("low", "normal", "high")."""
        return {p.name.lower(): len(entries) for p, entries in self._levels.items()}

    def retry_after_seconds(self) -> int:
        """About how long until a place frees: the mean time between recent departures (>= 1 s)."""
        interval = self._mean_pop_interval if self._mean_pop_interval is not None else self._default_retry_after
        if self._last_pop is not None and self._mean_pop_interval is not None:
            # Part of the gap since the last departure has passed already.
            interval = max(interval - (self._clock() - self._last_pop), interval / 4)
        return max(1, math.ceil(interval))

    # --- internals ----------------------------------------------------------------------------
    def _effective(self, entry: _Entry, now: float) -> int:
        if self.aging_seconds <= 0:
            return int(entry.priority)
        aged = int(max(0.0, now - entry.enqueued_at) // self.aging_seconds)
        return min(int(Priority.HIGH), int(entry.priority) + aged)

    def _next_entry(self, now: float, cursor: dict[Priority, int]) -> _Entry | None:
        """The best head among the levels (each level's head is its oldest, so its most aged)."""
        best: _Entry | None = None
        best_key: tuple[int, float, int] | None = None
        for level, entries in self._levels.items():
            index = cursor[level]
            if index >= len(entries):
                continue
            entry = entries[index]
            key = (-self._effective(entry, now), entry.enqueued_at, entry.seq)
            if best_key is None or key < best_key:
                best, best_key = entry, key
        return best

    def _iter_order(self, now: float) -> Iterator[str]:
        cursor = {p: 0 for p in Priority}
        while True:
            entry = self._next_entry(now, cursor)
            if entry is None:
                return
            cursor[entry.priority] += 1
            yield entry.job_id

    def _note_pop(self, now: float) -> None:
        # Only gaps during which jobs were waiting measure throughput; a gap that began with an
        # empty queue includes idle time and would inflate the estimate.
        if self._last_pop is not None:
            interval = now - self._last_pop
            self._mean_pop_interval = (interval if self._mean_pop_interval is None
                                       else 0.7 * self._mean_pop_interval + 0.3 * interval)
        self._last_pop = now if self._entries else None
