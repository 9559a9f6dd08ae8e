"""services.gateway.queue: priority levels, FIFO within a level, aging, bounds, positions. A fake clock."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.queue import JobQueue, Priority, QueueFull

LOW, NORMAL, HIGH = Priority.LOW, Priority.NORMAL, Priority.HIGH


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(queue: JobQueue) -> list[str]:
    order = []
    while (job := queue.pop()) is not None:
        order.append(job)
    return order


def make(max_size: int = 100, aging: float = 60.0) -> tuple[JobQueue, Clock]:
    clock = Clock()
    return JobQueue(max_size=max_size, aging_seconds=aging, clock=clock), clock


def test_an_empty_queue_pops_nothing() -> None:
    queue, _ = make()
    assert queue.pop() is None and len(queue) == 0 and queue.order() == []


def test_fifo_within_a_level() -> None:
    queue, clock = make()
    for name in "abcde":
        queue.push(name, NORMAL)
        clock.advance(1)
    assert drain(queue) == list("abcde")


def test_higher_levels_first_then_fifo() -> None:
    queue, clock = make()
    for name, level in [("low1", LOW), ("n1", NORMAL), ("high1", HIGH), ("n2", NORMAL), ("low2", LOW),
                        ("high2", HIGH)]:
        queue.push(name, level)
        clock.advance(0.5)
    assert drain(queue) == ["high1", "high2", "n1", "n2", "low1", "low2"]


def test_same_instant_keeps_push_order() -> None:
    queue, _ = make()
    for name in ["x", "y", "z"]:
        queue.push(name, LOW)
    assert drain(queue) == ["x", "y", "z"]


def test_push_returns_the_position_and_position_follows_the_order() -> None:
    queue, clock = make()
    assert queue.push("n1", NORMAL) == 1
    assert queue.push("low", LOW) == 2
    assert queue.push("high", HIGH) == 1
    assert [queue.position(j) for j in ("high", "n1", "low")] == [1, 2, 3]
    assert queue.position("nope") == 0
    assert queue.positions() == {"high": 1, "n1": 2, "low": 3}


def test_remove_takes_a_job_out_and_moves_the_others_up() -> None:
    queue, _ = make()
    for name in "abc":
        queue.push(name, NORMAL)
    assert queue.remove("b") is True
    assert queue.remove("b") is False
    assert "b" not in queue and len(queue) == 2
    assert queue.position("c") == 2
    assert drain(queue) == ["a", "c"]


def test_aging_raises_a_waiting_job_one_level_per_period() -> None:
    queue, clock = make(aging=60)
    queue.push("old-low", LOW)
    assert queue.effective_priority("old-low") == LOW
    clock.advance(59.9)
    assert queue.effective_priority("old-low") == LOW
    clock.advance(0.2)
    assert queue.effective_priority("old-low") == NORMAL
    clock.advance(60)
    assert queue.effective_priority("old-low") == HIGH
    clock.advance(600)
    assert queue.effective_priority("old-low") == HIGH       # never above high


def test_an_aged_low_job_overtakes_newer_normal_jobs() -> None:
    queue, clock = make(aging=60)
    queue.push("low", LOW)
    clock.advance(30)
    queue.push("normal-early", NORMAL)     # waited longer than aging? no: normal from the start
    clock.advance(31)                      # low has waited 61 s: it is normal now, and older
    queue.push("normal-late", NORMAL)
    assert queue.order() == ["low", "normal-early", "normal-late"]
    assert queue.pop() == "low"


def test_low_cannot_starve_under_a_stream_of_high_jobs() -> None:
    queue, clock = make(aging=60)
    queue.push("low", LOW)
    popped = []
    for i in range(1000):                  # a new high job every 10 s; one job runs every 10 s
        queue.push(f"high{i}", HIGH)
        clock.advance(10)
        popped.append(queue.pop())
        if "low" in popped:
            break
    assert "low" in popped
    assert len(popped) <= 14               # 120 s to reach high, then it is the oldest high


def test_aging_off_keeps_strict_priority() -> None:
    queue, clock = make(aging=0)
    queue.push("low", LOW)
    clock.advance(10_000)
    queue.push("normal", NORMAL)
    assert drain(queue) == ["normal", "low"]


def test_waited_seconds_back_dates_a_requeued_job() -> None:
    queue, _ = make(aging=60)
    queue.push("fresh-normal", NORMAL)
    queue.push("requeued-low", LOW, waited_seconds=61)    # it had waited before a restart
    assert queue.effective_priority("requeued-low") == NORMAL
    assert queue.order() == ["requeued-low", "fresh-normal"]


def test_a_full_queue_refuses_with_a_retry_after() -> None:
    queue, _ = make(max_size=2)
    queue.push("a")
    queue.push("b")
    with pytest.raises(QueueFull) as info:
        queue.push("c")
    error = info.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after_seconds >= 1
    assert "queue is full" in error.message and f"{error.retry_after_seconds} s" in error.message
    assert "c" not in queue and len(queue) == 2


def test_force_pushes_past_the_bound() -> None:
    queue, _ = make(max_size=1)
    queue.push("a")
    queue.push("b", force=True)
    assert len(queue) == 2


def test_a_job_cannot_be_queued_twice() -> None:
    queue, _ = make()
    queue.push("a")
    with pytest.raises(ValueError, match="already queued"):
        queue.push("a")


def test_retry_after_follows_how_fast_jobs_leave() -> None:
    queue, clock = make(max_size=100)
    for i in range(10):
        queue.push(f"j{i}")
    for _ in range(5):
        clock.advance(20)          # one job leaves every 20 s while jobs wait
        queue.pop()
    assert queue.retry_after_seconds() == 20
    clock.advance(12)              # 12 s of the next 20 have passed
    assert queue.retry_after_seconds() == 8
    clock.advance(100)             # overdue: still a few seconds, never 0
    assert queue.retry_after_seconds() == 5


def test_retry_after_ignores_idle_gaps() -> None:
    queue, clock = make()
    queue.push("a")
    queue.pop()                    # the queue is empty now: the next gap is idle time
    clock.advance(3600)
    queue.push("b")
    queue.push("c")
    queue.pop()
    clock.advance(4)
    queue.pop()
    assert queue.retry_after_seconds() <= 4


def test_retry_after_without_history_is_the_default() -> None:
    clock = Clock()
    queue = JobQueue(max_size=1, clock=clock, default_retry_after=12)
    assert queue.retry_after_seconds() == 12


def test_depths_by_priority() -> None:
    queue, _ = make()
    queue.push("a", LOW)
    queue.push("b", HIGH)
    queue.push("c", HIGH)
    assert queue.depths() == {"low": 1, "normal": 0, "high": 2}


def test_priority_parse() -> None:
    assert Priority.parse(" High ") == HIGH
    with pytest.raises(ValueError, match="low, normal, high"):
        Priority.parse("urgent")


def test_max_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        JobQueue(max_size=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Priority)), st.floats(0, 100)), min_size=1, max_size=30),
       st.floats(0, 500))
def test_pop_order_is_effective_level_then_age(jobs: list[tuple[Priority, float]], wait: float) -> None:
    """Whatever was pushed when, pops come highest effective level first, oldest first within one."""
    queue, clock = make(aging=60)
    pushed = {}
    for index, (level, gap) in enumerate(jobs):
        clock.advance(gap)
        queue.push(f"j{index}", level)
        pushed[f"j{index}"] = (level, clock.now, index)
    clock.advance(wait)
    order = queue.order()

    def key(job: str) -> tuple[int, float, int]:
        level, at, index = pushed[job]
        return (-min(2, int(level) + int((clock.now - at) // 60)), at, index)

    assert order == sorted(pushed, key=key)
    assert drain(queue) == order          # the clock stands still: pops follow the same order
