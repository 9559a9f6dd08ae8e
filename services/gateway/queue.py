"""Who runs next: the queue's policy, decided here once for every job store. Pure logic: no SQL
engine, no gRPC, no threads.

Why its own module: who runs next is the policy users feel most, so it lives in one small place that
unit tests drive with a fake clock, and each store (SQLite, PostgreSQL) claims jobs in the order this
module writes (``QueuePolicy.order_sql``) instead of inventing its own. The rules:

- three levels, high > normal > low, first come first served within a level;
- aging: a waiting job's effective level rises by one for every ``aging_seconds`` it has waited
  (up to high), so a stream of normal or high jobs cannot starve a low one forever; among jobs of the
  same effective level the one that has waited longest goes first (then the one stored first);
- bounded: a full queue refuses a job with ``domain.QueueFull``, which carries a retry-after estimate
  taken from how fast jobs have recently left the queue (``DepartureRate``).

A job's wait counts from when it was accepted (``created_ms``): a job re-queued after its gateway went
away keeps its age and its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from services.gateway.domain import Priority

TOP = int(Priority.HIGH)


@dataclass(frozen=True)
class Waiting:
    """A queued job as the policy sees it."""

    job_id: str
    priority: Priority
    created_ms: int
    seq: int


class QueuePolicy:
    """The order of the queue at a moment; the same rule in Python (``order``) and in SQL (``order_sql``)."""

    def __init__(self, aging_seconds: float = 60.0) -> None:
        if not aging_seconds >= 0:
            raise ValueError(f"aging_seconds is {aging_seconds}; it must be >= 0 (0 = no aging)")
        # Whole milliseconds, so the SQL below is integer arithmetic in every engine.
        self.aging_ms = int(round(aging_seconds * 1000))

    def effective(self, priority: Priority, waited_ms: int) -> int:
        """The level after aging (0 low .. 2 high)."""
        if self.aging_ms <= 0:
            return int(priority)
        aged = int(max(0, waited_ms) // self.aging_ms)
        return min(TOP, int(priority) + aged)

    def key(self, job: Waiting, now_ms: int) -> tuple[int, int, int]:
        """Smaller runs first."""
        return (-self.effective(job.priority, now_ms - job.created_ms), job.created_ms, job.seq)

    def order(self, waiting: Iterable[Waiting], now_ms: int) -> list[Waiting]:
        """Every waiting job, in the order they would run if nothing changed from now on."""
        return sorted(waiting, key=lambda job: self.key(job, now_ms))

    def order_sql(self, now: str) -> str:
        """An ORDER BY clause over a ``jobs`` table with ``priority`` ('low'/'normal'/'high'), ``created_ms``
        and ``seq`` columns, in the same order as ``order``. ``now`` is the engine's placeholder for the
        current unix time in milliseconds (``:now`` for SQLite, ``%(now)s`` for psycopg); it may appear
        twice. Only portable SQL: CASE and integer arithmetic (both engines truncate integer division,
        and a wait is never negative past the CASE below)."""
        base = "(CASE priority WHEN 'high' THEN 2 WHEN 'normal' THEN 1 ELSE 0 END)"
        if self.aging_ms <= 0:
            rank = base
        else:
            waited = f"(CASE WHEN {now} > created_ms THEN {now} - created_ms ELSE 0 END)"
            aged = f"({base} + {waited} / {self.aging_ms})"
            rank = f"(CASE WHEN {aged} > {TOP} THEN {TOP} ELSE {aged} END)"
        return f"ORDER BY {rank} DESC, created_ms ASC, seq ASC"


class DepartureRate:
    """About how long until a queue place frees: the mean time between recent departures.

    Only gaps during which jobs were waiting measure throughput; a gap that began with an empty queue
    includes idle time and would inflate the estimate."""

    def __init__(self, clock: Callable[[], float], default_seconds: float = 30.0) -> None:
        self._clock = clock
        self._default = default_seconds
        self._mean: float | None = None
        self._last: float | None = None

    def departed(self, still_waiting: bool) -> None:
        now = self._clock()
        if self._last is not None:
            interval = now - self._last
            self._mean = interval if self._mean is None else 0.7 * self._mean + 0.3 * interval
        self._last = now if still_waiting else None

    def retry_after_seconds(self) -> int:
        interval = self._mean if self._mean is not None else self._default
        if self._last is not None and self._mean is not None:
            # Part of the gap since the last departure has passed already.
            interval = max(interval - (self._clock() - self._last), interval / 4)
        return max(1, math.ceil(interval))
