"""services.gateway.queue: priority levels, FIFO within a level, aging, retry-after; and the same order
in SQL as in Python (every job store claims in ``QueuePolicy.order_sql``'s order). A fake clock."""

from __future__ import annotations

import itertools
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.domain import Priority
from services.gateway.queue import DepartureRate, QueuePolicy, Waiting

LOW, NORMAL, HIGH = Priority.LOW, Priority.NORMAL, Priority.HIGH


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Line:
    """Jobs waiting under a policy, as a store holds them: push adds a row, pop takes the policy's first."""

    def __init__(self, aging: float = 60.0) -> None:
        self.clock = Clock()
        self.policy = QueuePolicy(aging)
        self.waiting: list[Waiting] = []
        self._seq = itertools.count(1)

    def now_ms(self) -> int:
        return int(self.clock.now * 1000)

    def push(self, name: str, level: Priority = NORMAL, waited_seconds: float = 0.0) -> None:
        self.waiting.append(Waiting(name, level, self.now_ms() - int(waited_seconds * 1000), next(self._seq)))

    def order(self) -> list[str]:
        return [job.job_id for job in self.policy.order(self.waiting, self.now_ms())]

    def pop(self) -> str | None:
        order = self.order()
        if not order:
            return None
        self.waiting = [job for job in self.waiting if job.job_id != order[0]]
        return order[0]

    def drain(self) -> list[str]:
        return list(iter(self.pop, None))

    def effective(self, name: str) -> int:
        job = next(job for job in self.waiting if job.job_id == name)
        return self.policy.effective(job.priority, self.now_ms() - job.created_ms)


def test_an_empty_queue_pops_nothing() -> None:
    line = Line()
    assert line.pop() is None and line.order() == []


def test_fifo_within_a_level() -> None:
    line = Line()
    for name in "abcde":
        line.push(name, NORMAL)
        line.clock.advance(1)
    assert line.drain() == list("abcde")


def test_higher_levels_first_then_fifo() -> None:
    line = Line()
    for name, level in [("low1", LOW), ("n1", NORMAL), ("high1", HIGH), ("n2", NORMAL), ("low2", LOW),
                        ("high2", HIGH)]:
        line.push(name, level)
        line.clock.advance(0.5)
    assert line.drain() == ["high1", "high2", "n1", "n2", "low1", "low2"]


def test_same_instant_keeps_insertion_order() -> None:
    line = Line()
    for name in ["x", "y", "z"]:
        line.push(name, LOW)
    assert line.drain() == ["x", "y", "z"]


def test_aging_raises_a_waiting_job_one_level_per_period() -> None:
    line = Line(aging=60)
    line.push("old-low", LOW)
    assert line.effective("old-low") == LOW
    line.clock.advance(59.9)
    assert line.effective("old-low") == LOW
    line.clock.advance(0.2)
    assert line.effective("old-low") == NORMAL
    line.clock.advance(60)
    assert line.effective("old-low") == HIGH
    line.clock.advance(600)
    assert line.effective("old-low") == HIGH       # never above high


def test_an_aged_low_job_overtakes_newer_normal_jobs() -> None:
    line = Line(aging=60)
    line.push("low", LOW)
    line.clock.advance(30)
    line.push("normal-early", NORMAL)
    line.clock.advance(31)                 # low has waited 61 s: it is normal now, and older
    line.push("normal-late", NORMAL)
    assert line.order() == ["low", "normal-early", "normal-late"]


def test_low_cannot_starve_under_a_stream_of_high_jobs() -> None:
    line = Line(aging=60)
    line.push("low", LOW)
    popped = []
    for i in range(1000):                  # a new high job every 10 s; one job runs every 10 s
        line.push(f"high{i}", HIGH)
        line.clock.advance(10)
        popped.append(line.pop())
        if "low" in popped:
            break
    assert "low" in popped
    assert len(popped) <= 14               # 120 s to reach high, then it is the oldest high


def test_aging_off_keeps_strict_priority() -> None:
    line = Line(aging=0)
    line.push("low", LOW)
    line.clock.advance(10_000)
    line.push("normal", NORMAL)
    assert line.drain() == ["normal", "low"]


def test_a_job_keeps_its_age_when_it_waits_again() -> None:
    """A job's wait counts from its acceptance (a job handed back by a gateway that stopped keeps its place)."""
    line = Line(aging=60)
    line.push("fresh-normal", NORMAL)
    line.push("requeued-low", LOW, waited_seconds=61)
    assert line.effective("requeued-low") == NORMAL
    assert line.order() == ["requeued-low", "fresh-normal"]


def test_negative_aging_is_refused() -> None:
    with pytest.raises(ValueError, match="aging_seconds"):
        QueuePolicy(-1)


def test_retry_after_follows_how_fast_jobs_leave() -> None:
    clock = Clock()
    rate = DepartureRate(clock)
    rate.departed(still_waiting=True)
    for _ in range(5):
        clock.advance(20)          # one job leaves every 20 s while jobs wait
        rate.departed(still_waiting=True)
    assert rate.retry_after_seconds() == 20
    clock.advance(12)              # 12 s of the next 20 have passed
    assert rate.retry_after_seconds() == 8
    clock.advance(100)             # overdue: still a few seconds, never 0
    assert rate.retry_after_seconds() == 5


def test_retry_after_ignores_idle_gaps() -> None:
    clock = Clock()
    rate = DepartureRate(clock)
    rate.departed(still_waiting=False)  # the queue is empty now: the next gap is idle time
    clock.advance(3600)
    rate.departed(still_waiting=True)
    clock.advance(4)
    rate.departed(still_waiting=True)
    assert rate.retry_after_seconds() <= 4


def test_retry_after_without_history_is_the_default() -> None:
    assert DepartureRate(Clock(), default_seconds=12).retry_after_seconds() == 12


def test_priority_parse() -> None:
    assert Priority.parse(" High ") == HIGH
    with pytest.raises(ValueError, match="low, normal, high"):
        Priority.parse("urgent")


jobs_strategy = st.lists(st.tuples(st.sampled_from(list(Priority)), st.floats(0, 100)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(jobs_strategy, st.floats(0, 500))
def test_order_is_effective_level_then_age(jobs: list[tuple[Priority, float]], wait: float) -> None:
    """Whatever was pushed when, the order is highest effective level first, oldest first within one."""
    line = Line(aging=60)
    pushed = {}
    for index, (level, gap) in enumerate(jobs):
        line.clock.advance(gap)
        line.push(f"j{index}", level)
        pushed[f"j{index}"] = (level, line.now_ms(), index)
    line.clock.advance(wait)
    order = line.order()
    now = line.now_ms()

    def key(job: str) -> tuple[int, int, int]:
        level, at, index = pushed[job]
        return (-min(2, int(level) + (now - at) // 60_000), at, index)

    assert order == sorted(pushed, key=key)
    assert line.drain() == order          # the clock stands still: pops follow the same order


@settings(max_examples=150, deadline=None)
@given(jobs_strategy, st.floats(0, 500), st.sampled_from([0.0, 0.5, 60.0]))
def test_the_sql_order_is_the_python_order(jobs: list[tuple[Priority, float]], wait: float, aging: float) -> None:
    """``order_sql`` (what the stores claim by) sorts rows exactly as ``order`` sorts them."""
    line = Line(aging=aging)
    for index, (level, gap) in enumerate(jobs):
        line.clock.advance(gap)
        line.push(f"j{index}", level)
    line.clock.advance(wait)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE jobs (job_id TEXT, priority TEXT, created_ms INTEGER, seq INTEGER)")
    db.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?)",
                   [(job.job_id, job.priority.label, job.created_ms, job.seq) for job in line.waiting])
    rows = db.execute(f"SELECT job_id FROM jobs {line.policy.order_sql(':now')}", {"now": line.now_ms()}).fetchall()
    assert [row[0] for row in rows] == line.order()
