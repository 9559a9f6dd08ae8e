"""Hook points of the job system, for whoever wants to watch it (metrics, audit logs, tests).

Why a separate module: metrics (``services/gateway/metrics.py``) subclass ``JobObserver`` and hand it
to ``JobService``; the job logic never imports a metrics library and metrics never reach into the job
logic. The job system calls these methods with its lock possibly held: they must be quick and must
not raise (an exception is logged and swallowed, see ``SafeObserver``). This base does nothing.
"""

from __future__ import annotations

import logging

from services.common.logs import kv
from services.gateway.domain import JobRecord, JobStatus

log = logging.getLogger("gateway.observer")


class JobObserver:
    """Override what you need. ``job`` is the row as it is at that moment."""

    def job_queued(self, job: JobRecord) -> None:
        """A job was accepted and waits in the queue (also once per job re-queued after a restart)."""

    def job_started(self, job: JobRecord, queued_seconds: float) -> None:
        """A job left the queue for a slot after waiting ``queued_seconds``."""

    def job_finished(self, job: JobRecord, outcome: JobStatus, seconds: float) -> None:
        """A job ended: ``outcome`` is COMPLETED, FAILED (``job.error_code`` says why, e.g.
        DEADLINE_EXCEEDED) or CANCELLED. ``seconds`` runs from when it started (0 if it never ran);
        from submission it is ``(job.finished_ms - job.created_ms) / 1000``. Not called for cache hits."""

    def cache_hit(self, job: JobRecord) -> None:
        """A job completed at once from the result cache (it was never queued)."""

    def cache_miss(self, job: JobRecord) -> None:
        """A cacheable job (explicit seed) found nothing in the result cache; it is queued."""

    def queue_depth(self, depth: int, by_priority: dict[str, int]) -> None:
        """The number of queued jobs changed: ``depth`` in all, and by priority ("low", "normal", "high")."""

    def jobs_running(self, count: int) -> None:
        """The number of jobs holding a slot changed."""

    def results_expired(self, count: int) -> None:
        """The cleanup deleted ``count`` videos whose retention time had passed."""


class SafeObserver(JobObserver):
    """Forwards to another observer; a failing hook is logged once per call, never breaks a job."""

    def __init__(self, inner: JobObserver | None) -> None:
        self.inner = inner or JobObserver()

    def _call(self, name: str, *args: object) -> None:
        try:
            getattr(self.inner, name)(*args)
        except Exception:  # noqa: BLE001 - an observer must not fail a job
            log.exception(kv("observer_failed", hook=name))

    def job_queued(self, job: JobRecord) -> None:
        self._call("job_queued", job)

    def job_started(self, job: JobRecord, queued_seconds: float) -> None:
        self._call("job_started", job, queued_seconds)

    def job_finished(self, job: JobRecord, outcome: JobStatus, seconds: float) -> None:
        self._call("job_finished", job, outcome, seconds)

    def cache_hit(self, job: JobRecord) -> None:
        self._call("cache_hit", job)

    def cache_miss(self, job: JobRecord) -> None:
        self._call("cache_miss", job)

    def queue_depth(self, depth: int, by_priority: dict[str, int]) -> None:
        self._call("queue_depth", depth, by_priority)

    def jobs_running(self, count: int) -> None:
        self._call("jobs_running", count)

    def results_expired(self, count: int) -> None:
        self._call("results_expired", count)
