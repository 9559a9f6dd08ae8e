"""The job system as one in-process service: submit, get, list, cancel, watch a job, open its video.

Why one class with plain-Python methods: the gRPC servicer (``server.py``) and the HTTP bridge only
translate to and from it, so both front doors behave the same and the rules live in one place:

- every accepted job is a row in SQLite before anything runs (``store.JobStore``), so a restart loses
  none: QUEUED rows are queued again in their order, RUNNING rows are run again;
- a request with an explicit seed whose every parameter (and model) matches a stored, unexpired result
  completes at once from the result store (``cached``); without an explicit seed nothing is cached;
- queued jobs wait in ``queue.JobQueue`` (priority, aging, bounded); ``dispatcher.Dispatcher`` runs
  them on ``slots`` worker threads through the orchestrator;
- a deadline covers queue time and run time: when it passes the job fails with DEADLINE_EXCEEDED and
  gives back its queue entry, its slot and its denoiser call;
- watchers (Generate streams) get every event of a job: its queue position while it waits, then its
  stages, steps and warnings (replayed from the start if they subscribe late), then its end.

Thread-safety: one lock guards the in-memory state; the store has its own. Hooks for metrics go
through ``observer.JobObserver``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import queue as stdqueue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

from services.common.errors import (Cancelled, FailedPrecondition, InvalidArgument, NotFound, ServiceError,
                                    Unavailable)
from services.common.logs import kv
from services.gateway import orchestrator as orch
from services.gateway.dispatcher import Dispatcher, Runner
from services.gateway.observer import JobObserver, SafeObserver
from services.gateway.queue import JobQueue, Priority, QueueFull
from services.gateway.store import JobRecord, JobStatus, JobStore, ResultStore, check_job_id, new_job_id
from services.gateway.validation import Params

log = logging.getLogger("gateway.jobs")

DB_NAME = "jobs.sqlite3"
RESULTS_DIR = "results"
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
# A job's longest timeout: ten years (as Generate ignores a longer gRPC deadline). Beyond it the deadline in
# milliseconds overflows SQLite's INTEGER and the housekeeper's wait.
MAX_TIMEOUT_SECONDS = 10 * 365 * 24 * 3600
VIDEO_CHUNK_BYTES = 1 << 20
# A client that goes away this close to its deadline is taken to have hit the deadline (the client's
# clock fires a little before ours), so the job is recorded as DEADLINE_EXCEEDED, not CANCELLED.
DEADLINE_SLACK_SECONDS = 0.5
STAGE_PROBE_SECONDS = 0.5          # how often a restarted gateway asks whether the stages are up
_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class JobSettings:
    """How the job system behaves; the gateway fills it from its config."""

    slots: int = 4                          # jobs run at once (what the denoiser pool can take)
    max_queue: int = 256                    # jobs waiting at most; more get QueueFull
    aging_seconds: float = 60.0             # a waiting job rises one priority level per this
    result_ttl_seconds: float = 24 * 3600.0
    cleanup_interval_seconds: float = 60.0
    model: str = ""                         # the model folder: part of the result-cache key
    progress_write_seconds: float = 0.5     # at most one progress write to SQLite per job per this
    recovery_wait_seconds: float = 120.0    # after a restart, wait this long at most for the stages to be
                                            # SERVING before running the recovered jobs


@dataclass(frozen=True)
class JobRequest:
    """What a caller asks for, validated (see ``validation.validate``)."""

    params: Params
    priority: Priority = Priority.NORMAL
    seed_given: bool = False                # the user named the seed: only then may the cache answer
    timeout_seconds: float | None = None    # queue + run time allowed from now; None = no limit


@dataclass(frozen=True)
class JobView:
    """A job as a caller sees it now: its row, with live progress and queue place merged in."""

    record: JobRecord
    queue_position: int = 0                 # 1 = next; 0 when not queued
    queue_length: int = 0                   # jobs waiting in all, when queued

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def status(self) -> JobStatus:
        return self.record.status


# --- what a watcher receives, besides the orchestrator's StageStarted / Progress / Warning -----------
@dataclass(frozen=True)
class Queued:
    """The job waits; sent when it starts waiting and whenever its place changes."""

    position: int
    length: int


@dataclass(frozen=True)
class Finished:
    """The job ended (COMPLETED, FAILED, CANCELLED, or EXPIRED for an old one); the last update."""

    job: JobView


@dataclass(frozen=True)
class Interrupted:
    """The gateway is stopping before the job ended; it runs again when the gateway restarts."""

    message: str


JobUpdate = Union[Queued, orch.StageStarted, orch.Progress, orch.Warning, Finished, Interrupted]


class Watch:
    """A subscription to one job's updates. Iterate it (ends after Finished or Interrupted); close it."""

    def __init__(self, service: "JobService", job_id: str) -> None:
        self.job_id = job_id
        self._service = service
        self._updates: stdqueue.SimpleQueue[JobUpdate] = stdqueue.SimpleQueue()

    def put(self, update: JobUpdate) -> None:
        self._updates.put(update)

    def next(self, timeout: float | None = None) -> JobUpdate | None:
        """The next update, or None if none came within ``timeout`` seconds."""
        try:
            return self._updates.get(timeout=timeout)
        except stdqueue.Empty:
            return None

    def __iter__(self) -> Iterator[JobUpdate]:
        while True:
            update = self._updates.get()
            yield update
            if isinstance(update, (Finished, Interrupted)):
                return

    def close(self) -> None:
        self._service._unsubscribe(self)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Video:
    """A completed job's MP4, opened. Read it with ``chunks``; close it (or use ``with``)."""

    job_id: str
    file: BinaryIO
    size: int
    mime_type: str

    def chunks(self, offset: int = 0, chunk_size: int = VIDEO_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces from ``offset`` to the end; at least one, possibly empty."""
        if not 0 <= offset <= self.size:
            raise InvalidArgument(f"offset {offset} is outside the video, which has {self.size} bytes")
        self.file.seek(offset)
        sent = False
        while True:
            data = self.file.read(chunk_size)
            if not data:
                if not sent:
                    yield offset, b""
                return
            yield offset, data
            sent = True
            offset += len(data)

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Video":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class LiveJob:
    """What the service keeps in memory for a job that is QUEUED or RUNNING."""

    record: JobRecord
    deadline: float | None                      # on the service clock; None = no deadline
    queued_at: float
    control: orch.RunControl = field(default_factory=orch.RunControl)
    status: JobStatus = JobStatus.QUEUED
    started_at: float | None = None
    stage: int = 0
    step: int = 0
    total_steps: int = 0
    warnings: list[str] = field(default_factory=list)
    history: list[JobUpdate] = field(default_factory=list)   # this run's events, replayed to late watchers
    watchers: list[Watch] = field(default_factory=list)
    last_position: int = 0
    last_progress_write: float = 0.0
    interrupted: bool = False                   # the gateway is stopping: leave the row for a restart

    @property
    def job_id(self) -> str:
        return self.record.job_id


def cache_key(model: str, params: Params) -> str:
    """Same model folder and every parameter (seed included) -> same key -> same video."""
    blob = json.dumps({"model": model, "params": dataclasses.asdict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class JobService:
    """The job system. ``start()`` it, then submit / get / list / cancel / watch / open_video; ``stop()``."""

    def __init__(self, store: JobStore, results: ResultStore, runner: Runner, settings: JobSettings,
                 observer: JobObserver | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 stages_ready: Callable[[], bool] | None = None) -> None:
        if settings.slots < 1:
            raise ValueError(f"slots is {settings.slots}; at least one job must be able to run")
        self.store = store
        self.results = results
        self.settings = settings
        self.observer = SafeObserver(observer)
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)     # the housekeeping thread sleeps on it
        self.queue = JobQueue(settings.max_queue, settings.aging_seconds, clock=clock)
        self._live: dict[str, LiveJob] = {}
        self._accepting = False
        self._stopping = False
        self._last_depth = -1
        self._next_cleanup = 0.0
        self._housekeeper: threading.Thread | None = None
        self._stages_ready = stages_ready
        self._stopped = threading.Event()
        self.dispatcher = Dispatcher(self, runner, settings.slots, self._lock)

    @classmethod
    def open(cls, state_dir: str | Path, runner: Runner, settings: JobSettings,
             observer: JobObserver | None = None, stages_ready: Callable[[], bool] | None = None) -> "JobService":
        """A service whose jobs and videos live in ``state_dir`` (created if missing)."""
        root = Path(state_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        return cls(JobStore(root / DB_NAME), ResultStore(root / RESULTS_DIR), runner, settings, observer,
                   stages_ready=stages_ready)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "JobService":
        """Recover what a previous gateway left (queued and running jobs), then start dispatching.

        Recovered jobs wait until the stages report SERVING (``stages_ready``; at most
        ``recovery_wait_seconds``): after ``t2v up`` restarts the mesh, the gateway is up in a blink
        while the stages still load their models, and the recovered jobs must not fail for that.
        """
        with self._lock:
            recovered = self._recover()
            self._accepting = True
            self._next_cleanup = self._clock() + self.settings.cleanup_interval_seconds
            if recovered and self._stages_ready is not None:
                self.dispatcher.hold()
                threading.Thread(target=self._await_stages, name="jobs-await-stages", daemon=True).start()
        self._sweep_orphan_files()
        self.dispatcher.start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="jobs-housekeeping", daemon=True)
        self._housekeeper.start()
        with self._lock:
            self.dispatcher.assign()
        return self

    def _await_stages(self) -> None:
        assert self._stages_ready is not None
        started = time.monotonic()
        log.info(kv("waiting_for_stages", max_seconds=self.settings.recovery_wait_seconds))
        while not self._stopped.is_set():
            try:
                ready = self._stages_ready()
            except Exception:  # noqa: BLE001 - a failing probe counts as not ready
                log.exception(kv("stage_probe_failed"))
                ready = False
            waited = time.monotonic() - started
            if ready or waited >= self.settings.recovery_wait_seconds:
                log.info(kv("dispatching", stages_ready=ready, waited_seconds=round(waited, 2)))
                break
            self._stopped.wait(min(STAGE_PROBE_SECONDS, self.settings.recovery_wait_seconds - waited))
        with self._lock:
            if self._accepting and not self._stopping:
                self.dispatcher.resume()
                self.dispatcher.assign()

    def stop_accepting(self) -> None:
        """Refuse new jobs and start no queued one from now on (the server is draining): running jobs
        carry on, queued ones wait for the next gateway on this state dir."""
        with self._lock:
            self._accepting = False
            self.dispatcher.hold()

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; let running jobs finish for up to ``grace`` seconds; interrupt the rest.

        Interrupted and queued jobs keep their rows (RUNNING / QUEUED): the next gateway on the same
        state dir runs them. Watchers get ``Interrupted``.
        """
        with self._lock:
            if self._stopped.is_set():
                return
            self._accepting = False
            self._stopped.set()
        self.dispatcher.drain(grace)
        with self._lock:
            self._stopping = True
            for live in list(self._live.values()):
                if live.status == JobStatus.RUNNING:
                    live.interrupted = True
                    live.control.cancel()
                message = (f"the gateway stopped before job {live.job_id} finished; it runs again when the "
                           "gateway restarts: follow it with GetJob")
                for watch in live.watchers:
                    watch.put(Interrupted(message))
                live.watchers.clear()
            self._wake.notify_all()
        self.dispatcher.join(timeout=max(grace, 10.0))
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=5.0)
        self.store.close()
        log.info(kv("jobs_stopped", left_queued=len(self.queue)))

    # --- the API ------------------------------------------------------------------------------------
    def submit(self, request: JobRequest) -> JobView:
        """Accept a job (or answer it from the cache); raise QueueFull when the queue is full."""
        return self._submit(request, None)[0]

    def submit_and_watch(self, request: JobRequest) -> Watch:
        """``submit`` and subscribe before the job can start, so no update is missed (Generate)."""
        return self._submit(request, True)[1]  # type: ignore[return-value]

    def get(self, job_id: str) -> JobView:
        """The job now; NotFound if this gateway never had it, InvalidArgument if the id is malformed."""
        check_job_id(job_id)
        with self._lock:
            record = self.store.get(job_id)
            if record is None:
                raise NotFound(f"job {job_id} does not exist on this gateway; ListJobs shows the jobs it knows")
            return self._view(record)

    def list(self, status: JobStatus | None = None, page_size: int = 0, page_token: str = ""
             ) -> tuple[list[JobView], str]:
        """Newest first, ``page_size`` (0 = 50, at most 1000) at a time; returns (jobs, next_page_token)."""
        if page_size < 0:
            raise InvalidArgument(f"page_size is {page_size}; use 0 for the default ({DEFAULT_PAGE_SIZE}) "
                                  f"or up to {MAX_PAGE_SIZE}")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before = None
        if page_token:
            if not (page_token.isascii() and page_token.isdigit()) or len(page_token) > 18:   # not '²'
                raise InvalidArgument(f"page_token {page_token[:40]!r} is not one this gateway gave; pass the "
                                      "next_page_token of the previous answer, or nothing for the first page")
            before = int(page_token)
        with self._lock:
            records = self.store.list(status, limit + 1, before)
            views = [self._view(r) for r in records[:limit]]
        token = str(records[limit - 1].seq) if len(records) > limit else ""
        return views, token

    def cancel(self, job_id: str, reason: str = "cancelled by CancelJob") -> JobView:
        """Remove a queued job or stop a running one; a job that already ended is returned unchanged."""
        check_job_id(job_id)
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                self._finish(live, JobStatus.CANCELLED, "CANCELLED", f"the job was {reason}")
            return self.get(job_id)

    def abandon(self, job_id: str) -> None:
        """The client waiting for the job went away: cancel it, or fail it if its deadline has come."""
        with self._lock:
            live = self._live.get(job_id)
            if live is None:
                return
            if live.deadline is not None and self._clock() >= live.deadline - DEADLINE_SLACK_SECONDS:
                self._fail_deadline(live)
            else:
                self._finish(live, JobStatus.CANCELLED, "CANCELLED",
                             "the job was cancelled: the client waiting for it went away")

    def watch(self, job_id: str) -> Watch:
        """Subscribe to a job's updates: where it stands now first, then what happens next."""
        check_job_id(job_id)
        with self._lock:
            live = self._live.get(job_id)
            watch = Watch(self, job_id)
            if live is not None:
                self._subscribe(live, watch)
                return watch
            view = self.get(job_id)
            if view.status.is_terminal:
                watch.put(Finished(view))
            else:
                watch.put(Interrupted(f"job {job_id} is not running on this gateway (it is stopping); it runs "
                                      "again when the gateway restarts"))
            return watch

    def open_video(self, job_id: str) -> Video:
        """The video of a COMPLETED job; NotFound (saying so) once it expired, FailedPrecondition before."""
        view = self.get(job_id)
        handle = self.results.open(job_id) if view.status == JobStatus.COMPLETED else None
        if handle is None and view.status == JobStatus.COMPLETED:
            view = self.get(job_id)        # the cleanup may have just expired it
            if view.status == JobStatus.COMPLETED:
                raise NotFound(f"the video of job {job_id} is missing from the result store; submit the job again")
        if view.status == JobStatus.EXPIRED:
            raise NotFound(f"the video of job {job_id} expired at {_iso(view.record.expires_ms)} and was deleted: "
                           f"videos are kept {self._ttl_text()} after the job completes; submit the job again")
        if view.status in _ACTIVE:
            raise FailedPrecondition(f"job {job_id} is {view.status.name}; its video can be fetched once GetJob "
                                     "says COMPLETED")
        if view.status != JobStatus.COMPLETED or handle is None:
            raise FailedPrecondition(f"job {job_id} ended {view.status.name} and has no video"
                                     + (f": {view.record.error_message}" if view.record.error_message else ""))
        return Video(job_id, handle, os.fstat(handle.fileno()).st_size, view.record.mime_type or "video/mp4")

    def cleanup_expired(self) -> int:
        """Delete the videos whose retention time has passed (status -> EXPIRED); return how many."""
        expired = 0
        for job_id in self.store.due_to_expire(self._now_ms()):
            if self.store.update_status(job_id, JobStatus.EXPIRED, expected=[JobStatus.COMPLETED]):
                self.results.delete(job_id)
                expired += 1
                log.info(kv("result_expired", job_id=job_id))
        if expired:
            self.observer.results_expired(expired)
        return expired

    def running_count(self) -> int:
        with self._lock:
            return sum(1 for live in self._live.values() if live.status == JobStatus.RUNNING)

    # --- submit -------------------------------------------------------------------------------------
    def _submit(self, request: JobRequest, subscribe: bool | None) -> tuple[JobView, Watch | None]:
        timeout = request.timeout_seconds
        if timeout is not None and (not math.isfinite(timeout) or not 0 <= timeout <= MAX_TIMEOUT_SECONDS):
            raise InvalidArgument(f"timeout_seconds is {timeout}; it must be a number of seconds between 0 and "
                                  f"{MAX_TIMEOUT_SECONDS} (ten years; 0 = no limit)", field="timeout_seconds")
        with self._lock:
            if not self._accepting:
                raise Unavailable("the gateway is shutting down; retry in a moment")
            now, now_ms = self._clock(), self._now_ms()
            key = cache_key(self.settings.model, request.params) if request.seed_given else None
            if key is not None:
                hit = self._answer_from_cache(key, request, now_ms)
                if hit is not None:
                    watch = None
                    if subscribe:
                        watch = Watch(self, hit.job_id)
                        watch.put(Finished(hit))
                    return hit, watch
            if len(self.queue) >= self.queue.max_size:
                raise QueueFull(len(self.queue), self.queue.retry_after_seconds())
            record = self.store.create(JobRecord(
                job_id=new_job_id(), status=JobStatus.QUEUED, priority=request.priority, params=request.params,
                seed_given=request.seed_given, cache_key=key, created_ms=now_ms,
                deadline_ms=now_ms + math.ceil(timeout * 1000) if timeout else 0))
            live = LiveJob(record, now + timeout if timeout else None, now)
            self._live[record.job_id] = live
            self.queue.push(record.job_id, request.priority)
            p = request.params
            log.info(kv("job_accepted", job_id=record.job_id, priority=request.priority.name.lower(),
                        frames=p.num_frames, height=p.height, width=p.width, steps=p.num_inference_steps,
                        seed=p.seed, timeout=timeout or 0))
            if key is not None:
                self.observer.cache_miss(record)
            self.observer.job_queued(record)
            self.dispatcher.assign()
            watch = None
            if subscribe:
                # After assign: a job that found a free slot is RUNNING already and shows no queue
                # place; its worker cannot publish before we release the lock, so nothing is missed.
                watch = Watch(self, record.job_id)
                self._subscribe(live, watch)
            self._queue_changed()
            if live.deadline is not None:
                self._wake.notify_all()
            return self._view(self.store.get(record.job_id) or record), watch

    def _answer_from_cache(self, key: str, request: JobRequest, now_ms: int) -> JobView | None:
        source = self.store.find_cached(key, now_ms)
        if source is None:
            return None
        job_id = new_job_id()
        try:
            size = self.results.copy(source.job_id, job_id)
        except OSError:
            return None               # its file vanished (cleanup racing us): run the job instead
        record = self.store.create(JobRecord(
            job_id=job_id, status=JobStatus.COMPLETED, priority=request.priority, params=request.params,
            seed_given=True, cache_key=key, created_ms=now_ms, started_ms=now_ms, finished_ms=now_ms,
            expires_ms=now_ms + self._ttl_ms(), stage=source.stage, step=source.step,
            total_steps=source.total_steps, warnings=source.warnings, cached=True, video_size=size,
            mime_type=source.mime_type))
        log.info(kv("job_cached", job_id=job_id, source=source.job_id))
        self.observer.cache_hit(record)
        return JobView(record)

    # --- state changes (lock held) -------------------------------------------------------------------
    def _subscribe(self, live: LiveJob, watch: Watch) -> None:
        live.watchers.append(watch)
        if live.status == JobStatus.QUEUED:
            live.last_position = self.queue.position(live.job_id)
            watch.put(Queued(live.last_position, len(self.queue)))
        else:
            for update in live.history:
                watch.put(update)

    def _unsubscribe(self, watch: Watch) -> None:
        with self._lock:
            live = self._live.get(watch.job_id)
            if live is not None and watch in live.watchers:
                live.watchers.remove(watch)

    # --- what the dispatcher calls: take_next (lock held), publish, completed, failed ------------------
    def publish(self, live: LiveJob, event: orch.JobEvent) -> None:
        """A running job's event (from the dispatcher): remember it, store it, tell the watchers."""
        with self._lock:
            self._publish(live, event)

    def _publish(self, live: LiveJob, event: orch.JobEvent) -> None:
        if live.status != JobStatus.RUNNING:
            return
        now = self._clock()
        write = False
        if isinstance(event, orch.StageStarted):
            live.stage, write = event.stage, True
        elif isinstance(event, orch.Progress):
            live.step, live.total_steps = event.step, event.total
            write = (event.step == event.total
                     or now - live.last_progress_write >= self.settings.progress_write_seconds)
        elif isinstance(event, orch.Warning):
            live.warnings.append(event.text)
            self.store.add_warning(live.job_id, event.text)
        if write:
            live.last_progress_write = now
            self.store.update_progress(live.job_id, live.stage, live.step, live.total_steps)
        live.history.append(event)
        for watch in live.watchers:
            watch.put(event)

    def _mark_started(self, live: LiveJob) -> bool:
        """QUEUED -> RUNNING; False if the row is no longer queued (then the job is dropped here)."""
        now_ms = self._now_ms()
        if not self.store.start(live.job_id, now_ms):
            self._live.pop(live.job_id, None)
            return False
        live.status, live.started_at = JobStatus.RUNNING, self._clock()
        live.stage = live.step = live.total_steps = 0
        live.history.clear()
        live.record = dataclasses.replace(live.record, status=JobStatus.RUNNING, started_ms=now_ms,
                                          runs=live.record.runs + 1)
        waited = live.started_at - live.queued_at
        log.info(kv("job_started", job_id=live.job_id, queued_seconds=round(waited, 3), run=live.record.runs))
        self.observer.job_started(live.record, waited)
        return True

    def completed(self, live: LiveJob, result: orch.Result) -> None:
        """The dispatcher got the video: store it and mark the job COMPLETED (unless it ended meanwhile)."""
        with self._lock:
            if live.status != JobStatus.RUNNING:
                return
        size = self.results.save(live.job_id, result.video)     # file I/O outside the lock
        with self._lock:
            done = self._finish(live, JobStatus.COMPLETED, video_size=size, mime_type=result.mime_type,
                                expires_ms=self._now_ms() + self._ttl_ms())
        if not done:
            self.results.delete(live.job_id)

    def failed(self, live: LiveJob, error: ServiceError) -> None:
        """The run raised: record why (CANCELLED for a cancel, else FAILED with the error's code)."""
        with self._lock:
            if live.status != JobStatus.RUNNING or live.interrupted:
                return
            if not self._accepting and isinstance(error, Unavailable):
                # The gateway is stopping and a stage went away: most likely the same shutdown (``t2v up``
                # stops every service at once). Keep the job for the next gateway rather than fail it.
                live.interrupted = True
                return
            status = JobStatus.CANCELLED if isinstance(error, Cancelled) else JobStatus.FAILED
            self._finish(live, status, error.code.name, error.message)

    def _finish(self, live: LiveJob, status: JobStatus, error_code: str = "", error_message: str = "",
                **fields: object) -> bool:
        """Move a live job to a final status, once: the store's compare-and-set decides who wins."""
        was = live.status
        ok = self.store.update_status(
            live.job_id, status, expected=_ACTIVE, finished_ms=self._now_ms(), error_code=error_code,
            error_message=error_message, stage=live.stage, step=live.step, total_steps=live.total_steps,
            **fields)
        if not ok:
            return False
        live.status = status
        self._live.pop(live.job_id, None)
        if was == JobStatus.QUEUED:
            self.queue.remove(live.job_id)
            self._queue_changed()
        elif status != JobStatus.COMPLETED:
            live.control.cancel()           # frees the slot: the denoiser drops the request at its next step
        record = self.store.get(live.job_id) or live.record
        seconds = self._clock() - live.started_at if live.started_at is not None else 0.0
        log.info(kv("job_finished", job_id=live.job_id, status=status.value, code=error_code or "OK",
                    seconds=round(seconds, 3)))
        view = JobView(record)
        for watch in live.watchers:
            watch.put(Finished(view))
        live.watchers.clear()
        live.history.clear()
        self.observer.job_finished(record, status, seconds)
        return True

    def _fail_deadline(self, live: LiveJob) -> None:
        waited = self._clock() - live.queued_at
        if live.status == JobStatus.QUEUED:
            where = f"while it was still queued (position {self.queue.position(live.job_id)} of {len(self.queue)})"
            advice = "retry later, with a longer deadline or a higher priority"
        else:
            stage = orch.stage_name(live.stage)     # a job waits in a stage that has no replica up
            in_stage = f"{stage} stage, " if stage else ""
            where = f"while it was running ({in_stage}step {live.step} of {live.total_steps})"
            advice = ("ask for fewer frames or steps, or allow a longer deadline; if it did not move, check that "
                      f"the {stage or 'stages'} {'stage is' if stage else 'are'} up (the gateway's /healthz)")
        self._finish(live, JobStatus.FAILED, "DEADLINE_EXCEEDED",
                     f"the job's deadline passed after {waited:.1f} s {where}; {advice}")

    def _queue_changed(self) -> None:
        """Tell every waiting watcher its new place, and the observer the new depth."""
        length = len(self.queue)
        if length != self._last_depth:
            self._last_depth = length
            self.observer.queue_depth(length, self.queue.depths())
        if not any(live.watchers for live in self._live.values() if live.status == JobStatus.QUEUED):
            return
        for job_id, position in self.queue.positions().items():
            live = self._live.get(job_id)
            if live is not None and live.watchers and position != live.last_position:
                live.last_position = position
                for watch in live.watchers:
                    watch.put(Queued(position, length))

    def take_next(self) -> LiveJob | None:
        """The dispatcher's pick: the queue's next job, marked RUNNING; None when nothing waits."""
        while len(self.queue):
            job_id = self.queue.pop()
            live = self._live.get(job_id) if job_id else None
            if live is not None and self._mark_started(live):
                self._queue_changed()
                return live
        self._queue_changed()
        return None

    # --- views ----------------------------------------------------------------------------------------
    def _view(self, record: JobRecord) -> JobView:
        live = self._live.get(record.job_id)
        if live is not None and live.status == JobStatus.RUNNING:
            record = dataclasses.replace(record, status=JobStatus.RUNNING, stage=live.stage, step=live.step,
                                         total_steps=live.total_steps, warnings=tuple(live.warnings))
        elif live is not None and live.status == JobStatus.QUEUED:
            return JobView(record, self.queue.position(record.job_id), len(self.queue))
        if record.status == JobStatus.COMPLETED and record.expires_ms and record.expires_ms <= self._now_ms():
            record = dataclasses.replace(record, status=JobStatus.EXPIRED)   # the cleanup will catch up
        return JobView(record)

    # --- background work ------------------------------------------------------------------------------
    def _recover(self) -> int:
        """Queue again what a stopped gateway left: RUNNING rows are reset to QUEUED, in their order."""
        rerun = self.store.requeue_running()
        now, now_ms = self._clock(), self._now_ms()
        requeued = 0
        for record in self.store.queued():
            if record.deadline_ms and record.deadline_ms <= now_ms:
                self.store.update_status(record.job_id, JobStatus.FAILED, expected=[JobStatus.QUEUED],
                                         finished_ms=now_ms, error_code="DEADLINE_EXCEEDED",
                                         error_message="the job's deadline passed while the gateway was down")
                continue
            waited = max(0.0, (now_ms - record.created_ms) / 1000)
            deadline = now + (record.deadline_ms - now_ms) / 1000 if record.deadline_ms else None
            self._live[record.job_id] = LiveJob(record, deadline, now - waited)
            self.queue.push(record.job_id, record.priority, waited_seconds=waited, force=True)
            self.observer.job_queued(record)
            requeued += 1
        if requeued or rerun:
            log.info(kv("jobs_recovered", queued=requeued, rerun=len(rerun)))
        self._queue_changed()
        return requeued

    def _sweep_orphan_files(self) -> None:
        """Delete video files with no COMPLETED row (a crash between writing the file and the row)."""
        for path in self.results.folder.glob("*.mp4"):
            job_id = path.stem
            try:
                record = self.store.get(check_job_id(job_id))
            except InvalidArgument:
                continue                     # not ours: leave it alone
            if record is None or record.status != JobStatus.COMPLETED:
                path.unlink(missing_ok=True)

    def _housekeeping(self) -> None:
        """One thread: fail jobs whose deadline passed (queued or running), clean expired videos."""
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = self._clock()
                for live in list(self._live.values()):
                    if live.deadline is not None and live.deadline <= now:
                        self._fail_deadline(live)
                wake_at = min([self._next_cleanup] + [live.deadline for live in self._live.values()
                                                      if live.deadline is not None])
                if wake_at > now:
                    self._wake.wait(wake_at - now)
                if self._stopping:
                    return
                cleanup_due = self._clock() >= self._next_cleanup
                if cleanup_due:
                    self._next_cleanup = self._clock() + self.settings.cleanup_interval_seconds
            if cleanup_due:
                try:
                    self.cleanup_expired()
                except Exception:  # noqa: BLE001 - try again next round
                    log.exception(kv("cleanup_failed"))

    # --- small helpers -------------------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _ttl_ms(self) -> int:
        return int(self.settings.result_ttl_seconds * 1000)

    def _ttl_text(self) -> str:
        hours = self.settings.result_ttl_seconds / 3600
        return f"{hours:g} hours" if hours >= 1 else f"{self.settings.result_ttl_seconds:g} seconds"
