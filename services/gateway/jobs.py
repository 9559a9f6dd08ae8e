"""The job system: submit, get, list, cancel, watch a job, open its video; and run the jobs this
gateway claims.

Why one class with plain-Python methods: the gRPC servicer (``server.py``) and the HTTP bridge
(``http.py``) only translate to and from it, so both front doors behave the same. The job store holds
the whole truth (``store/``): a job's status, its place in the queue, who runs it under what lease,
its progress and its last checkpoint. This class keeps in memory only what this gateway is doing:

- the runs it holds (``_runs``): a RunControl to stop each, its events so far (replayed to a late
  watcher), and the lease it renews every third of ``lease_seconds`` (a run whose lease is lost, to a
  cancel or a takeover elsewhere, is stopped);
- the watchers it serves (Generate streams, SSE): fed by its own runs, and by the store's notices for
  jobs that run on another gateway of a shared store;
- a housekeeper: deadlines (a job past its deadline fails, queued or running, wherever it runs) and
  the retention cleanup (one gateway at a time).

Rules it keeps: every accepted job is a row before anything runs, so nothing is lost on a restart; a
request with an explicit seed whose every parameter (and model) matches a stored, unexpired result
completes at once from the result store; any error on any path of a run ends the job (FAILED with a
sentence) and frees its slot, except a stop of this gateway, which leaves the job to the next one.

Traces (with tracing on, ``services/common/tracing.py``): a job is one trace. Its root span ("job") is named
at admission by the ``trace_parent`` stored in its row and recorded by whichever gateway writes its end (from
the admission to the end, with the end status); the claiming gateway records the queue wait ("queue_wait")
and makes the job's span current in the worker's thread while it runs the stages (the orchestrator's stage
call spans are its children) and stores the video ("store_video").
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue as stdqueue
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import BinaryIO, Callable, ContextManager, Iterator, Protocol

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.common.errors import (Cancelled, FailedPrecondition, InsufficientStorage, InvalidArgument, NotFound,
                                    ServiceError, Unavailable)
from services.common.logs import kv
from services.common.tracing import JOB_ID, TENANT, Tracing
from services.gateway.dispatcher import Dispatcher
from services.gateway.domain import (ACTIVE, Checkpoint, Finished, Interrupted, JobDeleted, JobRecord, JobRequest,
                                     JobStatus, JobUpdate, JobView, Params, Preview, Priority, Progress, Queued, QueueFull,
                                     Result, RunControl, RunEvent, Stage, StageRetried, StageStarted, Waiting, Warning,
                                     check_job_id, new_job_id)
from services.gateway.observer import JobObserver, SafeObserver
from services.gateway.queue import DepartureRate, QueuePolicy
from services.gateway.store import (Claimed, JobStore, Notice, ResultStore, ResultStoreFull, StoreFull, StoreQueueFull,
                                    StoreUnavailable)
from services.gateway.tenancy import EVERYONE, Caller

log = logging.getLogger("gateway.jobs")

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
_EVERY = 2**31 - 1                 # a list limit that is no limit
UNWRITTEN_RETRY_SECONDS = 1.0      # between tries of the ends a full store had no room for
STORE_RETRY_SECONDS = 0.5          # between tries of a write that must land (a job's end) while the store is down
JOB_SPAN, QUEUE_SPAN, STORE_SPAN = "job", "queue_wait", "store_video"     # the job system's span names
# What a job that asked for live previews is told when this gateway's --preview-every is 0 (its operator's
# choice; the web page asks for them always).
PREVIEWS_OFF = ("live previews are off on this gateway (its --preview-every is 0), so the video is made without "
                "them")
# What DELETE may delete once the job has ended (a queued or running job is cancelled first).
DELETABLE = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)


@dataclass(frozen=True)
class JobSettings:
    """How the job system behaves; the gateway fills it from its config."""

    slots: int = 4                          # jobs run at once across every gateway of the store
    max_queue: int = 256                    # jobs waiting at most; more get QueueFull
    aging_seconds: float = 60.0             # a waiting job rises one priority level per this
    result_ttl_seconds: float = 24 * 3600.0
    cleanup_interval_seconds: float = 60.0
    model: str = ""                         # the model folder: part of the result-cache key
    progress_write_seconds: float = 0.5     # at most one progress write to the store per job per this
    recovery_wait_seconds: float = 120.0    # after a restart, wait this long at most for the stages to be
                                            # SERVING before running the recovered jobs
    lease_seconds: float = 10.0             # a running job's lease; its gateway renews it every third
    checkpoint_every: int = 10              # denoising steps between checkpoints (0 = none)
    preview_every: int = 5                  # denoising steps between previews, for jobs that ask (0 = none)
    poll_seconds: float = 1.0               # an idle worker looks for leases run out this often


class Runner(Protocol):
    """What runs one job: ``orchestrator.Orchestrator`` (tests pass fakes)."""

    def run(self, job_id: str, params: Params, control: RunControl | None = None, deadline: float | None = None,
            resume: bytes | None = None, checkpoint_every: int = 0, preview_every: int = 0) -> Iterator[RunEvent]: ...


class Watch:
    """A subscription to one job's updates. Iterate it (ends after Finished or Interrupted); close it."""

    def __init__(self, service: "JobService", job_id: str) -> None:
        self.job_id = job_id
        self._service = service
        self._updates: stdqueue.SimpleQueue[JobUpdate] = stdqueue.SimpleQueue()
        self.last_position = 0

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
class LocalRun:
    """A job this gateway runs now, under its lease."""

    record: JobRecord
    deadline: float | None                      # on the service clock; None = no deadline
    resume: bytes | None = None
    control: RunControl = field(default_factory=RunControl)
    started_at: float = 0.0
    stage: Stage = Stage.NONE
    step: int = 0
    total_steps: int = 0
    warnings: list[str] = field(default_factory=list)
    waiting_for: str = ""                       # a Waiting's sentence, until the run moves again
    history: list[JobUpdate] = field(default_factory=list)   # this run's events, replayed to late watchers
    preview: Preview | None = None              # the latest preview (only the latest is kept, and never stored)
    last_progress_write: float = 0.0
    interrupted: bool = False                   # this gateway is stopping: leave the job to the next one
    ended: bool = False                         # its end is written (by this run or by anyone else)
    claimed_ms: int = 0                         # when this gateway claimed it (unix ms)
    taken_over: bool = False                    # claimed from a gateway whose lease ran out

    @property
    def job_id(self) -> str:
        return self.record.job_id


class _ClaimedWork:
    """What the dispatcher runs: one claimed job."""

    def __init__(self, service: "JobService", run: LocalRun) -> None:
        self.job_id = run.job_id
        self._service, self._run = service, run

    def run(self) -> None:
        self._service._execute(self._run)


@dataclass(frozen=True)
class UnwrittenEnd:
    """A job's end that the store had no room for: what to write, and the record it makes."""

    record: JobRecord
    owner: str | None
    fields: dict[str, object]


def cache_key(model: str, params: Params, tenant: str = "") -> str:
    """Same model folder and every parameter (seed included) -> same key -> same video; one cache per tenant,
    so a hit never tells one key what another asked for.

    ``cache`` counts only when it is not "none": an exact request keeps the key it had before the
    field existed, so videos stored then still answer it, and never answers a deep one (or back).
    ``preview`` never counts: previews change nothing of the video."""
    fields = dataclasses.asdict(params)
    del fields["preview"]
    if fields.get("cache") == "none":
        del fields["cache"]
    blob = json.dumps({"model": model, "params": fields, **({"tenant": tenant} if tenant else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- updates as notices between gateways -------------------------------------------------------------------
def update_data(update: JobUpdate) -> dict[str, object] | None:
    """A run's update as a notice's data (None: not sent between gateways)."""
    if isinstance(update, StageStarted):
        return {"stage": int(update.stage)}
    if isinstance(update, Progress):
        return {"step": update.step, "total": update.total, "timestep": update.timestep}
    if isinstance(update, Warning):
        return {"warning": update.text}
    return None


def update_of(data: dict[str, object]) -> JobUpdate | None:
    """The update a notice's data carries (None for what this gateway does not know)."""
    try:
        if "stage" in data:
            return StageStarted(Stage.of(int(data["stage"])))  # type: ignore[arg-type]
        if "step" in data:
            return Progress(int(data["step"]), int(data["total"]), int(data.get("timestep", 0)))  # type: ignore[arg-type]
        if "warning" in data:
            return Warning(str(data["warning"]))
    except (TypeError, ValueError):
        return None
    return None


def gateway_identity() -> str:
    """This gateway among the store's: host, process and a random part (a restarted pod is a new owner)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{new_job_id()[:6]}"


class JobService:
    """The job system. ``start()`` it, then submit / get / list / cancel / watch / open_video; ``stop()``."""

    def __init__(self, store: JobStore, results: ResultStore, runner: Runner, settings: JobSettings,
                 observer: JobObserver | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 stages_ready: Callable[[], bool] | None = None, owner: str | None = None,
                 tracing: Tracing | None = None) -> None:
        if settings.slots < 1:
            raise ValueError(f"slots is {settings.slots}; at least one job must be able to run")
        self.store = store
        self.results = results
        self.runner = runner
        self.settings = settings
        self.owner = owner or gateway_identity()
        self.observer = SafeObserver(observer)
        self.tracing = tracing or Tracing.off()
        self.policy = QueuePolicy(settings.aging_seconds)
        self._clock = clock
        self._wall = wall_clock
        self._departures = DepartureRate(clock)
        self._lock = threading.RLock()
        # created_ms and started_ms taken in store order, so a job never starts before it came. Only for the
        # embedded store, whose calls never wait on a network; gateways of a shared store differ by their
        # clocks anyway, and the store stamps a start no earlier than the acceptance.
        self._stamp: ContextManager[object] = threading.Lock() if not store.shared else contextlib.nullcontext()
        self._store_down_until = 0.0                     # best-effort writes are skipped until then
        self._wake = threading.Condition(self._lock)     # the housekeeper sleeps on it
        self._runs: dict[str, LocalRun] = {}
        # Ends of runs here that the store had no room to write (a full disk): told to the watchers and shown
        # by get/list at once, written by the housekeeper once there is room. Lost with this process: then
        # the job, still RUNNING in the store, runs again (the store's lease decides who).
        self._unwritten_ends: dict[str, UnwrittenEnd] = {}
        self._watchers: dict[str, list[Watch]] = {}
        self._accepting = False
        self._stopping = False
        self._last_depth: tuple[int, tuple[tuple[str, int], ...]] | None = None
        self._next_cleanup = 0.0
        self._threads: list[threading.Thread] = []
        self._stages_ready = stages_ready
        self._stopped = threading.Event()
        self.dispatcher = Dispatcher(self, settings.slots, settings.poll_seconds, self.observer.jobs_running)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "JobService":
        """Listen to the other gateways, sweep orphan videos, then start running jobs.

        Jobs left behind by a gateway that went away (RUNNING, lease run out) wait until the stages
        report SERVING (``stages_ready``; at most ``recovery_wait_seconds``): after ``t2v up`` restarts
        the mesh, the gateway is up in a blink while the stages still load their models, and the
        recovered jobs must not fail for that."""
        self.store.listen(self._on_notice)
        if not self.store.shared:        # shared: another gateway may be between a video and its row right now
            self.results.sweep(self._keeps_video)
        for record in self.store.overdue(self._now_ms()):      # the deadline passed while no gateway ran
            self._fail_deadline(record, "while no gateway was running it")
        recovered = self._recover()
        with self._lock:
            self._accepting = True
            self._next_cleanup = self._clock() + self.settings.cleanup_interval_seconds
        if recovered and self._stages_ready is not None:
            self.dispatcher.hold()
            self._thread(self._await_stages, "jobs-await-stages")
        self.dispatcher.start()
        self._thread(self._housekeeping, "jobs-housekeeping")
        self._thread(self._heartbeat, "jobs-lease")
        self._queue_changed()
        return self

    def _thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _recover(self) -> int:
        """How many jobs a gateway that went away left behind (to wait for the stages before running them).
        An embedded store's jobs are all this gateway's: they count as entering its queue again."""
        left = self.store.recoverable(self._now_ms())
        if not self.store.shared:
            waiting = self.store.list(JobStatus.QUEUED, _EVERY)
            running = [r for r in self.store.list(JobStatus.RUNNING, _EVERY) if r.lease_expires_ms <= self._now_ms()]
            for record in sorted(waiting + running, key=lambda r: r.seq):
                self.observer.job_queued(record)
            left += len(waiting)
        if left:
            log.info(kv("jobs_recovered", jobs=left))
        return left

    def _keeps_video(self, job_id: str) -> bool:
        """A stored video with no COMPLETED row is an orphan, unless its job runs (and is storing it now)."""
        record = self.store.get(job_id)
        return record is not None and record.status in (JobStatus.COMPLETED, JobStatus.RUNNING)

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

    def stop_accepting(self) -> None:
        """Refuse new jobs and start no queued one from now on (the server is draining): running jobs
        carry on, queued ones wait for the next gateway."""
        with self._lock:
            self._accepting = False
        self.dispatcher.hold()

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; let running jobs finish for up to ``grace`` seconds; hand the rest back.

        Jobs still running are released: their lease ends now, so the next gateway (another replica at
        once, or this one after a restart) resumes each from its last checkpoint. Watchers get
        ``Interrupted``."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._accepting = False
            self._stopped.set()
        self.dispatcher.drain(grace)
        with self._lock:
            self._stopping = True
            for run in list(self._runs.values()):
                run.interrupted = True
                run.control.cancel()
            message = ("the gateway stopped before job {job_id} finished; the job goes on (on another gateway of the "
                       "same job store, or here after a restart): follow it with GetJob")
            for job_id, watchers in self._watchers.items():
                for watch in watchers:
                    watch.put(Interrupted(message.format(job_id=job_id)))
            self._watchers.clear()
            self._wake.notify_all()
        self._signal_work()
        self.dispatcher.join(timeout=max(grace, 10.0))
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._write_unwritten_ends()     # a last try; what still finds no room runs again after a restart
        self.results.close()
        self.store.close()
        log.info(kv("jobs_stopped"))

    # --- the API ------------------------------------------------------------------------------------
    def submit(self, request: JobRequest) -> JobView:
        """Accept a job (or answer it from the cache); raise QueueFull when the queue is full."""
        return self._submit(request, False)[0]

    def submit_and_watch(self, request: JobRequest) -> Watch:
        """``submit`` and subscribe before the job can start, so no update is missed (Generate)."""
        watch = self._submit(request, True)[1]
        assert watch is not None
        return watch

    def get(self, job_id: str, caller: Caller = EVERYONE) -> JobView:
        """The job now; NotFound if no gateway of this store had it or it is not the caller's to see (the
        same sentence: ids cannot be probed), JobDeleted (a NotFound) if it was deleted, InvalidArgument if the
        id is malformed."""
        return self._view(self._record_for(job_id, caller))

    def _record_for(self, job_id: str, caller: Caller, deleted_ok: bool = False) -> JobRecord:
        check_job_id(job_id)
        record = self._store_call(lambda: self.store.get(job_id))
        if not isinstance(record, JobRecord) or not caller.sees(record.tenant):
            raise NotFound(f"job {job_id} does not exist on this gateway; ListJobs shows the jobs it knows")
        if record.status == JobStatus.DELETED and not deleted_ok:
            raise JobDeleted(f"job {job_id} was deleted, and its video with it; submit it again (the same seed and "
                             "parameters give the same video)")
        return record

    def seq_of(self, job_id: str, caller: Caller = EVERYONE) -> int:
        """Where a job stands in the listings (its store seq), a deleted one too: what a page cursor that names a
        job by id (the HTTP API's ``after``) continues from. NotFound as ``get``, but never for a deletion."""
        return self._record_for(job_id, caller, deleted_ok=True).seq

    def list(self, status: JobStatus | None = None, page_size: int = 0, page_token: str = "",
             caller: Caller = EVERYONE, oldest_first: bool = False) -> tuple[list[JobView], str]:
        """The caller's jobs, newest first (``oldest_first``: in the order they came), ``page_size`` (0 = 50, at
        most 1000) at a time; returns (jobs, next_page_token). A token continues in the order it was made in;
        ``str(seq_of(job_id))`` is the token of the page after that job. Deleted jobs are not listed."""
        if page_size < 0:
            raise InvalidArgument(f"page_size is {page_size}; use 0 for the default ({DEFAULT_PAGE_SIZE}) "
                                  f"or up to {MAX_PAGE_SIZE}")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        cursor = None
        if page_token:
            if not (page_token.isascii() and page_token.isdigit()) or len(page_token) > 18:   # not '²'
                raise InvalidArgument(f"page_token {page_token[:40]!r} is not one this gateway gave; pass the "
                                      "next_page_token of the previous answer, or nothing for the first page")
            cursor = int(page_token)
        after, before = (cursor, None) if oldest_first else (None, cursor)
        records = self._store_call(lambda: self.store.list(status, limit + 1, before, caller.scope, after,
                                                           oldest_first))
        places = self._places() if any(r.status == JobStatus.QUEUED for r in records[:limit]) else {}
        views = [self._view(r, places) for r in records[:limit]]
        token = str(records[limit - 1].seq) if len(records) > limit else ""
        return views, token

    def cancel(self, job_id: str, reason: str = "cancelled by CancelJob", caller: Caller = EVERYONE) -> JobView:
        """Remove a queued job or stop a running one, wherever it runs; a job that ended is returned unchanged."""
        self.get(job_id, caller)
        self._end(job_id, JobStatus.CANCELLED, "CANCELLED", f"the job was {reason}")
        return self.get(job_id, caller)

    def delete(self, job_id: str, caller: Caller = EVERYONE, reason: str = "deleted by DeleteJob") -> JobRecord:
        """Delete a job and its video, wherever it runs; return its record as it was. A queued or running job is
        cancelled first (its run stops, its watchers see it CANCELLED, with ``reason``), then its video leaves the
        result store and its row becomes DELETED: kept (every gateway, a running copy of it, a page cursor still
        know the id), but from then on ``get``, ``watch``, ``open_video``, ``cancel`` and ``delete`` answer
        JobDeleted and no listing shows it. NotFound as ``get`` (a deleted job too: it was deleted once)."""
        record = self._record_for(job_id, caller)
        if record.status in ACTIVE:
            self._end(job_id, JobStatus.CANCELLED, "CANCELLED", f"the job was {reason}")
        # The video first: should the store fail in between, the job is still there to delete again. A run that
        # stores its video after this finds its end refused (the job ended) and deletes that video itself.
        self._store_call(lambda: self.results.delete(job_id))
        if not self._store_call(lambda: self.store.transition(job_id, JobStatus.DELETED, DELETABLE)):
            self._record_for(job_id, caller)          # another call deleted it meanwhile: JobDeleted
            raise ServiceError(f"job {job_id} could not be deleted; try again")   # (nothing else leaves an end)
        log.info(kv("job_deleted", job_id=job_id, was=record.status.value))
        self._notify(Notice("finished", job_id))
        return record

    def abandon(self, job_id: str) -> None:
        """The client waiting for the job went away: cancel it, or fail it if its deadline has come."""
        try:
            record = self._store_call(lambda: self.store.get(job_id))
            if not isinstance(record, JobRecord) or record.status.is_terminal:
                return
            if record.deadline_ms and self._now_ms() >= record.deadline_ms - DEADLINE_SLACK_SECONDS * 1000:
                self._fail_deadline(record)
            else:
                self._end(job_id, JobStatus.CANCELLED, "CANCELLED",
                          "the job was cancelled: the client waiting for it went away")
        except Unavailable:
            log.warning(kv("abandon_failed", job_id=job_id, reason="the job store is unavailable"))
            # it runs on; its deadline (if any) still ends it

    def watch(self, job_id: str, caller: Caller = EVERYONE) -> Watch:
        """Subscribe to a job's updates: where it stands now first, then what happens next."""
        check_job_id(job_id)
        watch = Watch(self, job_id)
        with self._lock:                 # a run here: its history and its next events, nothing twice
            self._watchers.setdefault(job_id, []).append(watch)
            run = self._runs.get(job_id)
            if run is not None and not run.ended and caller.sees(run.record.tenant):
                for update in run.history:
                    watch.put(update)
                if run.preview is not None:      # the latest only: previews are not kept in the history
                    watch.put(run.preview)
                return watch
        try:
            record = self._record_for(job_id, caller)
        except BaseException:
            watch.close()
            raise
        self._replay(watch, record)
        return watch

    def open_video(self, job_id: str, caller: Caller = EVERYONE) -> Video:
        """The video of a COMPLETED job; NotFound (saying so) once it expired, FailedPrecondition before."""
        view = self.get(job_id, caller)
        opened = self.results.open(job_id) if view.status == JobStatus.COMPLETED else None
        if opened is None and view.status == JobStatus.COMPLETED:
            view = self.get(job_id)        # the cleanup may have just expired it
            if view.status == JobStatus.COMPLETED:
                raise NotFound(f"the video of job {job_id} is missing from the result store; submit the job again")
        if view.status == JobStatus.EXPIRED:
            raise NotFound(f"the video of job {job_id} expired at {_iso(view.record.expires_ms)} and was deleted: "
                           f"videos are kept {self._ttl_text()} after the job completes; submit the job again")
        if view.status in ACTIVE:
            raise FailedPrecondition(f"job {job_id} is {view.status.name}; its video can be fetched once GetJob "
                                     "says COMPLETED")
        if view.status != JobStatus.COMPLETED or opened is None:
            raise FailedPrecondition(f"job {job_id} ended {view.status.name} and has no video"
                                     + (f": {view.record.error_message}" if view.record.error_message else ""))
        handle, size = opened
        return Video(job_id, handle, size, view.record.mime_type or "video/mp4")

    def cleanup_expired(self) -> int:
        """Delete the videos whose retention time has passed (status -> EXPIRED); return how many. One
        gateway of a shared store at a time."""
        expired = 0
        with self.store.exclusive("cleanup") as mine:
            if not mine:
                return 0
            for job_id in self.store.due_to_expire(self._now_ms()):
                if self.store.transition(job_id, JobStatus.EXPIRED, [JobStatus.COMPLETED]):
                    self.results.delete(job_id)
                    expired += 1
                    log.info(kv("result_expired", job_id=job_id))
        if expired:
            self.observer.results_expired(expired)
        return expired

    def running_count(self) -> int:
        """Jobs this gateway runs now."""
        with self._lock:
            return len(self._runs)

    def queue_length(self) -> int:
        return self.store.count(JobStatus.QUEUED)

    def healthy(self) -> bool:
        """The job store answers (new work can be accepted)."""
        try:
            return self.store.healthy()
        except Exception:  # noqa: BLE001 - a probe must not raise
            return False

    # --- submit -------------------------------------------------------------------------------------
    def _submit(self, request: JobRequest, subscribe: bool) -> tuple[JobView, Watch | None]:
        timeout = request.timeout_seconds
        if timeout is not None and (not math.isfinite(timeout) or not 0 <= timeout <= MAX_TIMEOUT_SECONDS):
            raise InvalidArgument(f"timeout_seconds is {timeout}; it must be a number of seconds between 0 and "
                                  f"{MAX_TIMEOUT_SECONDS} (ten years; 0 = no limit)", field="timeout_seconds")
        if not self._accepting:
            raise Unavailable("the gateway is shutting down; retry in a moment")
        now_ms = self._now_ms()
        key = cache_key(self.settings.model, request.params, request.tenant) if request.seed_given else None
        if key is not None:
            hit = self._store_call(lambda: self._answer_from_cache(key, request, now_ms))
            if hit is not None:
                watch = Watch(self, hit.job_id) if subscribe else None
                if watch is not None:
                    watch.put(Finished(hit))
                return hit, watch
        try:
            self.results.check_room()
        except ResultStoreFull as full:
            raise InsufficientStorage(f"{full.strerror}: this gateway accepts no job until there is room again "
                                      "(its operator frees space or lowers the videos' retention); retry later") from None
        job_id = new_job_id()
        watch = None
        if subscribe:            # before the row exists: a worker may claim it the moment it does
            watch = Watch(self, job_id)
            with self._lock:
                self._watchers.setdefault(job_id, []).append(watch)

        trace_parent = self.tracing.new_root(JOB_SPAN) if self.tracing.enabled else ""

        def insert() -> JobRecord:
            with self._stamp:
                now = self._now_ms()
                return self.store.submit(JobRecord(
                    job_id=job_id, status=JobStatus.QUEUED, priority=request.priority, params=request.params,
                    seed_given=request.seed_given, cache_key=key, created_ms=now, tenant=request.tenant,
                    deadline_ms=now + math.ceil(timeout * 1000) if timeout else 0, trace_parent=trace_parent),
                    self.settings.max_queue)
        try:
            record = self._store_call(insert)
        except StoreQueueFull as full:
            if watch is not None:
                watch.close()
            raise QueueFull(full.length, self._departures.retry_after_seconds()) from None
        except BaseException:
            if watch is not None:
                watch.close()
            raise
        p = request.params
        log.info(kv("job_accepted", job_id=record.job_id, priority=request.priority.label,
                    frames=p.num_frames, height=p.height, width=p.width, steps=p.num_inference_steps,
                    seed=p.seed, timeout=timeout or 0))
        if self.tracing.enabled:         # the API call's span (a traced gRPC call) names the job it made
            trace.get_current_span().set_attribute(JOB_ID, record.job_id)
        if key is not None:
            self.observer.cache_miss(record)
        self.observer.job_queued(record)
        self.dispatcher.offer()          # a free slot takes it now: it never shows as queued
        if watch is not None:            # subscribed before the row existed: it missed nothing of a run
            self._replay(watch, record, run_so_far=False)
        self._notify(Notice("work", record.job_id))
        self._queue_changed()
        if record.deadline_ms:
            with self._lock:
                self._wake.notify_all()
        try:                             # the job is stored: an outage now must not make it look refused
            view = self._view(self.store.get(record.job_id) or record)
        except StoreUnavailable:
            view = JobView(record)
        return view, watch

    def _answer_from_cache(self, key: str, request: JobRequest, now_ms: int) -> JobView | None:
        source = self.store.find_cached(key, now_ms)
        if source is None:
            return None
        job_id = new_job_id()
        try:
            size = self.results.copy(source.job_id, job_id)
        except OSError:
            return None               # its video vanished (cleanup racing us) or no room: run the job instead
        record = self.store.insert(JobRecord(
            job_id=job_id, status=JobStatus.COMPLETED, priority=request.priority, params=request.params,
            seed_given=True, cache_key=key, created_ms=now_ms, started_ms=now_ms, finished_ms=now_ms,
            expires_ms=now_ms + self._ttl_ms(), stage=source.stage, step=source.step,
            total_steps=source.total_steps, warnings=source.warnings, cached=True, video_size=size,
            mime_type=source.mime_type, tenant=request.tenant,
            trace_parent=self.tracing.new_root(JOB_SPAN) if self.tracing.enabled else ""))
        log.info(kv("job_cached", job_id=job_id, source=source.job_id))
        self._trace_end(record, cached_from=source.job_id)
        self.observer.cache_hit(record)
        return JobView(record)

    # --- watchers -----------------------------------------------------------------------------------
    def _replay(self, watch: Watch, record: JobRecord, run_so_far: bool = True) -> None:
        """Tell a new watcher where the job stands: its end, its queue place, or its run so far (for a run on
        another gateway, what its row says)."""
        if record.status.is_terminal:
            self._deliver_end(record.job_id, record)
            return
        if record.status == JobStatus.QUEUED:
            places = self._places()
            if record.job_id in places:
                watch.last_position = places[record.job_id]
                watch.put(Queued(watch.last_position, len(places)))
            return
        with self._lock:
            if not run_so_far or record.job_id in self._runs:
                return
        if record.stage != Stage.NONE:          # it runs on another gateway: what its row says
            watch.put(StageStarted(record.stage))
        if record.total_steps:
            watch.put(Progress(record.step, record.total_steps, 0))

    def _unsubscribe(self, watch: Watch) -> None:
        with self._lock:
            watchers = self._watchers.get(watch.job_id)
            if watchers is not None and watch in watchers:
                watchers.remove(watch)
                if not watchers:
                    del self._watchers[watch.job_id]

    def _deliver(self, job_id: str, update: JobUpdate) -> None:
        with self._lock:
            for watch in self._watchers.get(job_id, ()):
                watch.put(update)

    def _deliver_end(self, job_id: str, record: JobRecord | None = None) -> None:
        """The job ended (here or elsewhere), or its run here lost its lease: a run of it here stops, and
        if it ended, its watchers get Finished (a job taken over runs on: they keep following it)."""
        record = record or self.store.get(job_id)
        if record is None:
            return
        view = self._view(record)
        with self._lock:
            if record.status.is_terminal:
                for watch in self._watchers.pop(job_id, []):
                    watch.put(Finished(view))
            run = self._runs.get(job_id)
            if run is not None and not run.ended:
                run.ended = True
                run.control.cancel()      # the denoiser drops the request at its next step

    def _places(self) -> dict[str, int]:
        """Every queued job's place (1 = next), in the policy's order."""
        order = self.policy.order(self.store.waiting(), self._now_ms())
        return {job.job_id: index for index, job in enumerate(order, start=1)}

    def _queue_changed(self) -> None:
        """Tell every waiting watcher here its new place, and the observer the new depth."""
        try:
            waiting = self.store.waiting()
        except Exception:  # noqa: BLE001 - the store is down: places are told again once it is back
            return
        depths = {priority.label: 0 for priority in Priority}
        for job in waiting:
            depths[job.priority.label] += 1
        depth = (len(waiting), tuple(sorted(depths.items())))
        if depth != self._last_depth:
            self._last_depth = depth
            self.observer.queue_depth(len(waiting), depths)
        with self._lock:
            if not any(self._watchers.get(job.job_id) for job in waiting):
                return
            order = self.policy.order(waiting, self._now_ms())
            for position, job in enumerate(order, start=1):
                for watch in self._watchers.get(job.job_id, ()):
                    if watch.last_position != position:
                        watch.last_position = position
                        watch.put(Queued(position, len(order)))

    # --- between gateways ------------------------------------------------------------------------------
    def _notify(self, notice: Notice) -> None:
        if not self.store.shared:
            return
        try:
            self.store.notify(dataclasses.replace(notice, origin=self.owner))
        except Exception:  # noqa: BLE001 - the others find out by their own polling
            log.warning(kv("notify_failed", kind=notice.kind, job_id=notice.job_id))

    def _on_notice(self, notice: Notice) -> None:
        """What another gateway of the store said."""
        if notice.origin == self.owner:
            return
        if notice.kind == "event":
            update = update_of(dict(notice.data))
            if update is not None:
                self._deliver(notice.job_id, update)
            return
        if notice.kind in ("finished", "cancel"):
            self._deliver_end(notice.job_id)
        else:                                # "work", "queue": a new job, maybe with a nearer deadline
            with self._lock:
                self._wake.notify_all()
        self._signal_work()
        self._queue_changed()

    # --- the dispatcher's side: WorkSource -----------------------------------------------------------------
    def _signal_work(self) -> None:
        self.dispatcher.wake()

    def claim(self) -> _ClaimedWork | None:
        if not self._accepting or self._stopping:
            return None
        with self._stamp:          # acceptance and start stamped in one order: a job never starts before it came
            claimed: Claimed | None = self.store.claim(self.owner, self._now_ms(), self._lease_ms(),
                                                       self.settings.slots, self.policy)
        if claimed is None:
            return None
        record = claimed.record
        now = self._clock()
        deadline = now + (record.deadline_ms - self._now_ms()) / 1000 if record.deadline_ms else None
        run = LocalRun(record, deadline, claimed.checkpoint, started_at=now,
                       stage=record.stage if claimed.taken_over else Stage.NONE, claimed_ms=self._now_ms(),
                       taken_over=claimed.taken_over)
        with self._lock:
            if record.job_id in self._unwritten_ends:
                # It ended here; its end waits for room in the store, and the lease of its run ran out meanwhile.
                self._wake.notify_all()
                return None
            if record.job_id in self._runs:
                # Its lease ran out while this gateway was cut off from the store, and this gateway took it
                # back: the run it already has goes on (its lease is ours again); never run one job twice.
                log.info(kv("lease_regained", job_id=record.job_id))
                return None
            self._runs[record.job_id] = run
        # A job ended between the store's claim and the line above (cancelled right after it was submitted) was
        # ended with no run here to stop: look again now that a cancel finds the run, or the stages would make
        # every step of a job nobody waits for.
        try:
            now_stored = self.store.get(record.job_id)
        except Exception:  # noqa: BLE001 - the store just answered the claim; if it is gone now, the run runs
            now_stored = record
        if now_stored is None or now_stored.status.is_terminal:
            with self._lock:
                run.ended = True
            run.control.cancel()
        waited = max(0.0, (self._now_ms() - record.created_ms) / 1000)
        self._departures.departed(still_waiting=True)
        log.info(kv("job_started", job_id=record.job_id, queued_seconds=round(waited, 3), run=record.runs,
                    resumed_from_step=record.checkpoint_step if claimed.checkpoint else 0,
                    taken_over=claimed.taken_over))
        self.observer.job_started(record, waited)
        if self.tracing.enabled and record.trace_parent and record.runs == 1:
            self._traced(lambda: self.tracing.record_span(QUEUE_SPAN, record.trace_parent, record.created_ms,
                                                          run.claimed_ms, self._trace_attributes(record)))
        self._notify(Notice("queue", record.job_id))
        self._queue_changed()
        return _ClaimedWork(self, run)

    # --- running a claimed job ------------------------------------------------------------------------------
    def _execute(self, run: LocalRun) -> None:
        """Run one claimed job to its end. Any exception ends the job, except a stop of this gateway."""
        try:
            with self.tracing.current(run.record.trace_parent):    # the stage calls' spans are the job's
                result = self._run_stages(run)
                if result is not None:
                    self._complete(run, result)
        except ServiceError as error:
            self._failed(run, error)
        except StoreFull as error:
            log.error(kv("job_store_full", job_id=run.job_id, reason=str(error)[:200]))
            self._failed(run, InsufficientStorage(f"the job store is full ({error}); submit the job again once "
                                                  "there is room"))
        except Exception as error:  # noqa: BLE001 - reported to the user as INTERNAL, logged here
            log.exception(kv("job_crashed", job_id=run.job_id))
            self._failed(run, ServiceError(f"internal error ({type(error).__name__}); the gateway log has the "
                                           "details"))
        finally:
            with self._lock:
                self._runs.pop(run.job_id, None)
            self._notify(Notice("work"))
            self._signal_work()

    def _run_stages(self, run: LocalRun) -> Result | None:
        result = None
        # preview_every only for a job that asks: a run without previews is the call it was before they existed
        previews = {"preview_every": self.settings.preview_every} if run.record.params.preview else {}
        if previews and not self.settings.preview_every and PREVIEWS_OFF not in run.record.warnings:
            self._publish(run, Warning(PREVIEWS_OFF))        # asked, and off here: told once, not silently none
        events = self.runner.run(run.job_id, run.record.params, run.control, run.deadline, resume=run.resume,
                                 checkpoint_every=self.settings.checkpoint_every, **previews)
        for event in events:
            if isinstance(event, Result):
                result = event
            elif isinstance(event, Checkpoint):
                self._checkpoint(run, event)
            else:
                self._publish(run, event)
        if result is None:
            raise ServiceError("the job ended without a video")
        return result

    def _checkpoint(self, run: LocalRun, checkpoint: Checkpoint) -> None:
        """A checkpoint lost costs steps on a takeover, never the job."""
        self._best_effort(lambda: self.store.save_checkpoint(run.job_id, self.owner, checkpoint.step, checkpoint.data),
                          "checkpoint")

    def _publish(self, run: LocalRun, event: RunEvent) -> None:
        """A running job's event: remember it, store it (throttled), tell the watchers here and elsewhere."""
        if isinstance(event, Preview):     # the latest is kept for GetJob and late watchers; never written
            with self._lock:
                if not run.ended:
                    run.preview = event
                    self._deliver(run.job_id, event)
            return
        now = self._clock()
        write = False
        if isinstance(event, StageStarted):
            run.stage, run.waiting_for, write = event.stage, "", True
        elif isinstance(event, Progress):
            run.step, run.total_steps, run.waiting_for = event.step, event.total, ""
            kept = run.preview             # a retry from an earlier step: the kept preview is of the broken try
            if kept is not None and kept.step > event.step:
                with self._lock:           # (the lock only then: this runs at every step of every job)
                    if run.preview is kept:
                        run.preview = None
            write = event.step == event.total or now - run.last_progress_write >= self.settings.progress_write_seconds
        elif isinstance(event, Waiting):
            run.waiting_for = event.text
            return                         # a state of this run, shown by GetJob here; not a job event
        elif isinstance(event, StageRetried) and not self._accepting:
            return                         # the gateway stops, and the stages with it: nothing to keep
        elif isinstance(event, Warning):
            run.warnings.append(event.text)
            self._best_effort(lambda: self.store.add_warning(run.job_id, event.text), "warning")
        if write:
            run.last_progress_write = now
            self._best_effort(lambda: self.store.progress(run.job_id, self.owner, run.stage, run.step,
                                                          run.total_steps), "progress")
        with self._lock:
            if run.ended:
                return
            run.history.append(event)      # type: ignore[arg-type]
            self._deliver(run.job_id, event)   # type: ignore[arg-type]
        data = update_data(event)          # type: ignore[arg-type]
        if data is not None and (write or isinstance(event, Warning)):
            self._notify(Notice("event", run.job_id, data))

    def _best_effort(self, write: Callable[[], object], what: str) -> None:
        """A write a run can do without (progress, a warning): a full or absent store must not fail the job,
        nor slow it: after a store outage or a full disk such writes are skipped for a second instead of each
        waiting (and logging)."""
        if self._clock() < self._store_down_until:
            return
        try:
            write()
        except Exception as error:  # noqa: BLE001
            if isinstance(error, (StoreUnavailable, StoreFull)):
                self._store_down_until = self._clock() + 1.0
            log.warning(kv("store_write_failed", what=what, reason=str(error)[:200]))

    def _complete(self, run: LocalRun, result: Result) -> None:
        """Store the video, then mark the job COMPLETED (unless it ended meanwhile)."""
        if run.ended or not self._holds_lease(run):
            return                       # another gateway runs it now: its video is that one's to store
        span = self.tracing.start_span(STORE_SPAN, attributes={JOB_ID: run.job_id, "t2v.video_bytes": len(result.video)}
                                       ) if self.tracing.enabled and run.record.trace_parent else None
        try:
            size = self._until_stored(lambda: self.results.save(run.job_id, result.video))
            if size is None:
                return                   # this gateway stops: the job is released to the next one
        except (ResultStoreFull, OSError) as error:
            full = isinstance(error, ResultStoreFull)
            log.error(kv("result_save_failed", job_id=run.job_id, reason=str(error)[:200]))
            failure = InsufficientStorage if full else ServiceError
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
            raise failure(f"the result store is full: the video of job {run.job_id} could not be kept; free space "
                          "on the gateway's result store and submit the job again" if full else
                          f"the video of job {run.job_id} could not be stored ({error}); submit the job again") from None
        finally:
            if span is not None:
                span.end()
        done = self._write_end(run.job_id, JobStatus.COMPLETED, owner=self.owner, video_size=size,
                               mime_type=result.mime_type, expires_ms=self._now_ms() + self._ttl_ms(),
                               stage=run.stage, step=run.step, total_steps=run.total_steps)
        if not done:                     # it ended meanwhile: remove this video, unless it is the winner's
            ended = self._until_stored(lambda: self.store.get(run.job_id))
            if ended is None or getattr(ended, "status", None) != JobStatus.COMPLETED:
                self._best_effort(lambda: self.results.delete(run.job_id), "delete")

    def _holds_lease(self, run: LocalRun) -> bool:
        try:
            return run.job_id in self.store.heartbeat(self.owner, [run.job_id], self._now_ms(), self._lease_ms())
        except (StoreUnavailable, StoreFull):
            return True                  # the end's own compare-and-set decides once the store is back

    def _until_stored(self, save: Callable[[], object]) -> object | None:
        """``save()``, tried again while the store is down (PostgreSQL restarting); None if this gateway stops."""
        while True:
            try:
                return save()
            except StoreUnavailable:
                if self._stopped.is_set():
                    return None
                self._stopped.wait(STORE_RETRY_SECONDS)

    def _failed(self, run: LocalRun, error: ServiceError) -> None:
        """The run raised: record why (CANCELLED for a cancel, else FAILED with the error's code), unless
        the job ended already or this gateway is stopping (then the next gateway takes it over)."""
        if run.ended:
            return
        if run.interrupted or (not self._accepting and isinstance(error, (Unavailable, Cancelled))):
            # The gateway is stopping (and a stage may have gone away in the same shutdown: ``t2v up``
            # stops every service at once): hand the job back rather than fail it.
            self._best_effort(lambda: self.store.release(self.owner, run.job_id), "release")
            log.info(kv("job_released", job_id=run.job_id, step=run.step))
            return
        status = JobStatus.CANCELLED if isinstance(error, Cancelled) else JobStatus.FAILED
        self._write_end(run.job_id, status, owner=self.owner, error_code=error.code.name,
                        error_message=error.message, stage=run.stage, step=run.step, total_steps=run.total_steps)

    # --- ending a job --------------------------------------------------------------------------------------
    def _end(self, job_id: str, status: JobStatus, error_code: str, error_message: str) -> bool:
        """End a job that may be queued or running anywhere (a cancel, a deadline, a client gone). While the
        store is down this raises Unavailable: the caller (a client, the housekeeper) tries again."""
        return self._write_end(job_id, status, persist=False, error_code=error_code, error_message=error_message)

    def _write_end(self, job_id: str, status: JobStatus, owner: str | None = None, persist: bool = True,
                   **fields: object) -> bool:
        """Move a job to a final status, once: the store's compare-and-set decides who wins. A run's end
        (``persist``) is written even while the store is down: tried again until it is back or this
        gateway stops."""
        call = self._until_stored if persist else self._store_call
        before = call(lambda: self.store.get(job_id))
        if not isinstance(before, JobRecord) or before.status.is_terminal:
            return False
        fields.setdefault("finished_ms", self._now_ms())
        try:
            if not call(lambda: self.store.transition(job_id, status, ACTIVE, owner=owner, **fields)):
                return False
        except StoreFull as error:       # only a run's own end comes here: a client's gets InsufficientStorage
            record = dataclasses.replace(before, status=status, owner="", lease_expires_ms=0, **fields)
            with self._lock:
                self._unwritten_ends[job_id] = UnwrittenEnd(record, owner, dict(fields))
                self._wake.notify_all()
            log.warning(kv("job_end_unwritten", job_id=job_id, status=status.value, reason=str(error)[:200]))
            self._announce_end(record, before.status)
            return True
        record = self._until_stored(lambda: self.store.get(job_id))
        if not isinstance(record, JobRecord):
            return True                  # written; this gateway stops before it could tell anyone
        self._announce_end(record, before.status)
        return True

    def _announce_end(self, record: JobRecord, before: JobStatus) -> None:
        """A job ended: log, count, tell its watchers here and the other gateways, free its place."""
        job_id, status = record.job_id, record.status
        seconds = (record.finished_ms - record.started_ms) / 1000 if record.started_ms else 0.0
        log.info(kv("job_finished", job_id=job_id, status=status.value, code=record.error_code or "OK",
                    seconds=round(seconds, 3)))
        self.observer.job_finished(record, status, seconds)
        self._trace_end(record)
        self._deliver_end(job_id, record)
        self._notify(Notice("finished", job_id))
        if before == JobStatus.QUEUED:
            self._queue_changed()
        self._signal_work()

    def _write_unwritten_ends(self) -> None:
        """Store the ends kept in memory for want of room; those that still find none wait for the next try."""
        with self._lock:
            pending = list(self._unwritten_ends.items())
        for job_id, end in pending:
            try:
                self.store.transition(job_id, end.record.status, ACTIVE, owner=end.owner, **end.fields)
            except (StoreFull, StoreUnavailable):
                return
            with self._lock:
                self._unwritten_ends.pop(job_id, None)
            log.info(kv("job_end_written", job_id=job_id, status=end.record.status.value))
            self._notify(Notice("finished", job_id))

    def _fail_deadline(self, record: JobRecord, while_: str = "") -> None:
        waited = max(0.0, (self._now_ms() - record.created_ms) / 1000)
        if while_:
            where, advice = while_, "submit it again, with a longer deadline if the gateways may be down that long"
        elif record.status == JobStatus.QUEUED:
            places = self._places()
            where = (f"while it was still queued (position {places.get(record.job_id, 0)} of {len(places)})")
            advice = "retry later, with a longer deadline or a higher priority"
        else:
            with self._lock:
                run = self._runs.get(record.job_id)
            stage, step, total = (run.stage, run.step, run.total_steps) if run else (
                record.stage, record.step, record.total_steps)
            name = stage.label                 # a job waits in a stage that has no replica up
            in_stage = f"{name} stage, " if name else ""
            where = f"while it was running ({in_stage}step {step} of {total})"
            advice = ("ask for fewer frames or steps, or allow a longer deadline; if it did not move, check that "
                      f"the {name or 'stages'} {'stage is' if name else 'are'} up (the gateway's /healthz)")
        self._end(record.job_id, JobStatus.FAILED, "DEADLINE_EXCEEDED",
                  f"the job's deadline passed after {waited:.1f} s {where}; {advice}")

    # --- traces ---------------------------------------------------------------------------------------
    @staticmethod
    def _trace_attributes(record: JobRecord) -> dict[str, object]:
        """What every job span says of its job: the id, and whose it is (the tenant: a digest of the API key,
        never the key; absent with keys off)."""
        attributes: dict[str, object] = {JOB_ID: record.job_id, "t2v.priority": record.priority.label}
        if record.tenant:
            attributes[TENANT] = record.tenant
        return attributes

    def _trace_end(self, record: JobRecord, cached_from: str = "") -> None:
        """Record the job's root span, now that it ended: from its admission to its end, with its end status.
        This gateway's run of it, if any, adds when it claimed the job (and whether it took it over)."""
        if not self.tracing.enabled or not record.trace_parent:
            return
        attributes = {**self._trace_attributes(record), "t2v.status": record.status.value, "t2v.runs": record.runs,
                      "t2v.cached": record.cached}
        if record.error_code:
            attributes["t2v.error_code"] = record.error_code
        if cached_from:
            attributes["t2v.cached_from"] = cached_from
        if record.status == JobStatus.COMPLETED:
            status = Status(StatusCode.OK)
        elif record.status == JobStatus.FAILED:
            status = Status(StatusCode.ERROR, record.error_message[:500])
        else:
            status = Status(StatusCode.UNSET)       # cancelled: the client's wish, not a fault
        with self._lock:
            run = self._runs.get(record.job_id)
        events = []
        if run is not None and run.claimed_ms:
            events.append(("taken_over" if run.taken_over else "claimed", run.claimed_ms,
                           {"t2v.run": run.record.runs, "t2v.resumed_from_step":
                            run.record.checkpoint_step if run.resume else 0}))
        end_ms = record.finished_ms or self._now_ms()
        self._traced(lambda: self.tracing.record_root(record.trace_parent, JOB_SPAN, record.created_ms, end_ms,
                                                      attributes, status, events))

    @staticmethod
    def _traced(record: Callable[[], object]) -> None:
        """A span recorded; a tracing fault is logged, never the job's."""
        try:
            record()
        except Exception as error:  # noqa: BLE001
            log.warning(kv("trace_failed", reason=f"{type(error).__name__}: {str(error)[:200]}"))

    # --- views ----------------------------------------------------------------------------------------
    def _view(self, record: JobRecord, places: dict[str, int] | None = None) -> JobView:
        with self._lock:
            run = self._runs.get(record.job_id)
            unwritten = self._unwritten_ends.get(record.job_id)
        if unwritten is not None and not record.status.is_terminal:
            return JobView(unwritten.record)
        if run is not None and record.status == JobStatus.RUNNING:
            record = dataclasses.replace(record, stage=run.stage, step=run.step, total_steps=run.total_steps,
                                         warnings=tuple(run.warnings) or record.warnings)
            return JobView(record, waiting_for=run.waiting_for, preview=run.preview)
        elif record.status == JobStatus.QUEUED:
            places = places if places is not None else self._places()
            return JobView(record, places.get(record.job_id, 0), len(places) if record.job_id in places else 0)
        if record.status == JobStatus.COMPLETED and record.expires_ms and record.expires_ms <= self._now_ms():
            record = dataclasses.replace(record, status=JobStatus.EXPIRED)   # the cleanup will catch up
        return JobView(record)

    # --- background work ------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        """Renew this gateway's leases; stop the runs whose lease is lost (cancelled or taken over)."""
        interval = max(0.05, self.settings.lease_seconds / 3)
        while not self._stopped.wait(interval):
            with self._lock:
                ids = [job_id for job_id, run in self._runs.items() if not run.ended]
            if not ids:
                continue
            try:
                held = self.store.heartbeat(self.owner, ids, self._now_ms(), self._lease_ms())
            except Exception as error:  # noqa: BLE001 - the store is down: the runs go on, renewed later
                log.warning(kv("lease_renewal_failed", jobs=len(ids), reason=str(error)[:200]))
                continue
            for job_id in set(ids) - held:
                log.info(kv("lease_lost", job_id=job_id))
                self._deliver_end(job_id)

    def _housekeeping(self) -> None:
        """Fail jobs whose deadline passed (queued or running, on any gateway), clean expired videos."""
        while True:
            self._write_unwritten_ends()
            try:
                for record in self.store.overdue(self._now_ms()):
                    self._fail_deadline(record)
                next_deadline = self.store.next_deadline_ms()
            except Exception as error:  # noqa: BLE001 - the store is down: look again soon
                log.warning(kv("housekeeping_failed", reason=str(error)[:200]))
                next_deadline = self._now_ms() + 1000
            with self._lock:
                if self._stopping:
                    return
                now = self._clock()
                wake_at = self._next_cleanup
                if next_deadline is not None:
                    wake_at = min(wake_at, now + max(0.0, (next_deadline - self._now_ms()) / 1000))
                if self._unwritten_ends:
                    wake_at = min(wake_at, now + UNWRITTEN_RETRY_SECONDS)
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
    def _store_call(self, call: Callable[[], object]) -> object:
        """A store call on behalf of a client: a store that is down is UNAVAILABLE, in a sentence."""
        try:
            return call()
        except StoreUnavailable as error:
            raise Unavailable(f"the job store is unavailable ({error}); the gateway reconnects by itself: "
                              "retry in a few seconds") from None
        except StoreFull as error:
            raise InsufficientStorage(f"the job store is full ({error}): what it holds is kept, but nothing new "
                                      "can be written until its operator frees space; retry later") from None

    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _ttl_ms(self) -> int:
        return int(self.settings.result_ttl_seconds * 1000)

    def _lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    def _ttl_text(self) -> str:
        hours = self.settings.result_ttl_seconds / 3600
        return f"{hours:g} hours" if hours >= 1 else f"{self.settings.result_ttl_seconds:g} seconds"
