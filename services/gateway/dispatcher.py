"""Runs queued jobs: ``slots`` worker threads, each taking the queue's next job and running it through
the orchestrator, one job at a time.

Why a fixed number of workers: ``slots`` is how many jobs the denoiser pool takes at once; more would
only wait inside the denoiser, where the gateway can no longer reorder them by priority. A worker is
handed a job the moment it is free (``assign``, called on submit and whenever a job ends), so a job
that finds a free slot never shows as queued. The job bookkeeping (store, watchers, deadlines) is
``jobs.JobService``'s; this module only moves jobs through slots.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Iterator, Protocol

from services.common.errors import ServiceError
from services.common.logs import kv
from services.gateway import orchestrator as orch
from services.gateway.validation import Params

if TYPE_CHECKING:
    from services.gateway.jobs import JobService, LiveJob

log = logging.getLogger("gateway.dispatcher")


class Runner(Protocol):
    """What runs one job: ``orchestrator.Orchestrator`` (tests pass fakes)."""

    def run(self, job_id: str, params: Params, control: orch.RunControl | None = None,
            deadline: float | None = None) -> Iterator[orch.JobEvent]: ...


class Dispatcher:
    """Worker threads fed from the service's queue. ``assign`` must be called with ``lock`` held."""

    def __init__(self, service: "JobService", runner: Runner, slots: int, lock: threading.RLock) -> None:
        self.service = service
        self.runner = runner
        self.slots = slots
        self._lock = lock
        self._cond = threading.Condition(lock)
        self._ready: collections.deque[LiveJob] = collections.deque()
        self._busy = 0                    # slots holding a job (handed over or running)
        self._draining = False            # take nothing more from the queue
        self._stopping = False            # workers exit
        self._threads: list[threading.Thread] = []

    @property
    def busy(self) -> int:
        return self._busy

    def start(self) -> None:
        for index in range(self.slots):
            thread = threading.Thread(target=self._work, name=f"jobs-slot-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def assign(self) -> None:
        """Hand queued jobs to free slots, best first. Lock held."""
        while self._busy < self.slots and not self._draining:
            live = self.service.take_next()
            if live is None:
                return
            self._busy += 1
            self._ready.append(live)
            self._cond.notify_all()
            self.service.observer.jobs_running(self._busy)

    def hold(self) -> None:
        """Take no more jobs from the queue (until ``resume``). Lock held."""
        self._draining = True

    def resume(self) -> None:
        """Take jobs from the queue again; call ``assign`` next. Lock held."""
        self._draining = False

    def drain(self, grace: float) -> None:
        """Take no more jobs; wait up to ``grace`` seconds for the running ones to end."""
        deadline = time.monotonic() + grace
        with self._cond:
            self._draining = True
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

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return          # jobs still in _ready keep RUNNING rows: the next gateway re-runs them
                live = self._ready.popleft()
            try:
                self._run(live)
            except Exception:  # noqa: BLE001 - a bug in one job must not kill the slot
                log.exception(kv("dispatch_failed", job_id=live.job_id))
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
                    self.service.observer.jobs_running(self._busy)
                    self.assign()

    def _run(self, live: "LiveJob") -> None:
        result = None
        try:
            for event in self.runner.run(live.job_id, live.record.params, live.control, live.deadline):
                if isinstance(event, orch.Result):
                    result = event
                else:
                    self.service.publish(live, event)
        except ServiceError as error:
            self.service.failed(live, error)
            return
        except Exception as error:  # noqa: BLE001 - reported to the user as INTERNAL, logged here
            log.exception(kv("job_crashed", job_id=live.job_id))
            self.service.failed(live, ServiceError(
                f"internal error ({type(error).__name__}); the gateway log has the details"))
            return
        if result is None:
            self.service.failed(live, ServiceError("the job ended without a video"))
        else:
            self.service.completed(live, result)
