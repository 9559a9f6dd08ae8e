"""Runs jobs: ``slots`` worker threads, each pulling the next piece of work from a ``WorkSource`` and
running it, one at a time.

Why pull, through a protocol defined here: the queue's order and the cap on running jobs live in the
job store (shared by every gateway of a PostgreSQL store), so the dispatcher cannot be handed jobs by
whoever accepted them; a free worker asks for one. The dispatcher is mechanism only (threads, holding,
draining) and imports nothing of the job system: ``jobs.JobService`` implements ``WorkSource``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Protocol

from services.common.logs import kv

log = logging.getLogger("gateway.dispatcher")


class Work(Protocol):
    """A claimed job, ready to run on the worker that claimed it."""

    job_id: str

    def run(self) -> None: ...


class WorkSource(Protocol):
    """Where workers get jobs."""

    def claim(self) -> Work | None:
        """The next job for this gateway, or None (nothing waits, or the cap on running jobs is reached)."""


class Dispatcher:
    """``slots`` workers pulling from ``source``. The job system calls ``wake`` when new work may be there (a
    job queued here or on another gateway, a slot freed anywhere) and ``offer`` right after accepting a job,
    so a job that finds a free slot is claimed before its submitter answers (it never shows as queued).
    ``poll_seconds`` bounds an idle worker's sleep: a lease that runs out on another gateway sends no notice."""

    def __init__(self, source: WorkSource, slots: int, poll_seconds: float = 1.0,
                 on_busy: Callable[[int], None] | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots is {slots}; at least one job must be able to run")
        self.source = source
        self.slots = slots
        self.poll_seconds = poll_seconds
        self._on_busy = on_busy or (lambda count: None)
        self._cond = threading.Condition()
        self._ready: collections.deque[Work] = collections.deque()
        self._busy = 0                    # slots holding a job (claimed, handed over or running)
        self._generation = 0              # bumped by wake()
        self._held = False                # take no more work (start-up wait, draining)
        self._stopping = False            # workers exit
        self._threads: list[threading.Thread] = []
        self._quiet_until = 0.0           # claim failures are logged again after this

    @property
    def busy(self) -> int:
        return self._busy

    def start(self) -> None:
        for index in range(self.slots):
            thread = threading.Thread(target=self._work, name=f"jobs-slot-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def offer(self) -> None:
        """Claim a job now, in the caller's thread, if a slot is free; a worker runs it."""
        with self._cond:
            if self._held or self._stopping or self._busy >= self.slots:
                return
            self._reserve()
        work = self._claim()
        with self._cond:
            if work is None:
                self._unreserve()
            else:
                self._ready.append(work)
            self._cond.notify_all()

    def hold(self) -> None:
        """Take no more jobs (until ``resume``)."""
        with self._cond:
            self._held = True

    def resume(self) -> None:
        with self._cond:
            self._held = False
            self._generation += 1
            self._cond.notify_all()

    def drain(self, grace: float) -> None:
        """Take no more jobs; wait up to ``grace`` seconds for the running ones to end."""
        deadline = time.monotonic() + grace
        with self._cond:
            self._held = True
            while self._busy and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    def join(self, timeout: float) -> None:
        """Let the workers exit (after their current job) and wait for them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- internals (``_reserve`` / ``_unreserve`` with the condition held) ----------------------------
    def _reserve(self) -> None:
        self._busy += 1
        self._on_busy(self._busy)

    def _unreserve(self) -> None:
        self._busy = max(0, self._busy - 1)
        self._on_busy(self._busy)

    def _claim(self) -> Work | None:
        try:
            return self.source.claim()
        except Exception as error:  # noqa: BLE001 - the store is down: try again after a pause
            now = time.monotonic()
            if now >= self._quiet_until:          # one line per 10 s, not one per idle worker per poll
                self._quiet_until = now + 10.0
                log.warning(kv("claim_failed", reason=f"{type(error).__name__}: {str(error)[:200]}"))
            return None

    def _next(self) -> Work | None:
        """Block until this worker holds a job (None: stop)."""
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return None
                    if self._ready:
                        return self._ready.popleft()
                    if not self._held and self._busy < self.slots:
                        self._reserve()
                        generation = self._generation
                        break
                    self._cond.wait()
            work = self._claim()
            if work is not None:
                return work
            with self._cond:
                self._unreserve()
                if self._generation == generation and not self._ready and not self._stopping:
                    self._cond.wait(self.poll_seconds)

    def _work(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            try:
                work.run()
            except Exception:  # noqa: BLE001 - a bug in one job must not kill the slot
                log.exception(kv("dispatch_failed", job_id=work.job_id))
            finally:
                with self._cond:
                    self._unreserve()
                    self._cond.notify_all()
