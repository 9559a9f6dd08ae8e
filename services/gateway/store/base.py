"""The job store and the result store as protocols, and what both engines share: the row codec.

Why protocols: the gateway's job logic (``jobs.JobService``) must not know which engine holds its jobs.
SQLite plus files is the embedded default (one gateway, nothing to run); PostgreSQL is the shared one
(any number of gateways, no local state). The store holds the whole truth of a job: its status, its
place in the queue, who runs it (a lease its gateway renews), its progress, its last denoiser
checkpoint. What a gateway keeps in memory is only what it is doing itself (the runs it holds, the
watchers it serves), so a gateway can die without taking any job with it.

Every transition out of a status is a compare-and-set: whoever changes the row first (a worker
finishing, a cancel from any gateway, a deadline, a takeover) wins, and the others see False.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, ContextManager, Iterable, Mapping, Protocol

from services.common.logs import kv
from services.gateway.domain import JobRecord, JobStatus, Params, Priority, Stage
from services.gateway.queue import QueuePolicy, Waiting

log = logging.getLogger("gateway.store")
PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(Params))


class StoreQueueFull(Exception):
    """``submit`` found ``length`` jobs queued already (the queue's bound holds across gateways)."""

    def __init__(self, length: int) -> None:
        super().__init__(f"{length} jobs queued")
        self.length = length


class StoreUnavailable(Exception):
    """The database cannot be reached now (PostgreSQL down or restarting); nothing was changed."""


class StoreFull(Exception):
    """The job store has no room for a write (its disk, or its database server's, is full); nothing was
    changed, what it held stays, and writes work again once there is room."""


@dataclass(frozen=True)
class Claimed:
    """A job this gateway now runs under its lease."""

    record: JobRecord
    checkpoint: bytes | None = None         # the denoiser's state to resume from (opaque), if any
    taken_over: bool = False                # it was RUNNING under a lease that ran out (its gateway died)


@dataclass(frozen=True)
class Notice:
    """A message between the gateways of one job store: ``kind`` is "work" (a job may be claimed),
    "queue" (the queue changed), "event" (a running job's update, ``data`` its fields), "finished" (a job
    ended) or "cancel" (stop it wherever it runs). ``origin`` is the sending gateway."""

    kind: str
    job_id: str = ""
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    origin: str = ""


class JobStore(Protocol):
    """Where jobs live. Thread-safe. Times are unix milliseconds."""

    shared: bool                            # other gateways may use the same store at once

    def close(self) -> None: ...

    def healthy(self) -> bool:
        """The store answers now (False while its database is down)."""

    # --- one job -----------------------------------------------------------------------------------------
    def submit(self, record: JobRecord, max_queued: int) -> JobRecord:
        """Insert a QUEUED job unless ``max_queued`` wait already (StoreQueueFull); return it with its seq."""

    def insert(self, record: JobRecord) -> JobRecord:
        """Insert a job row as it is (a completed cache hit)."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def claim(self, owner: str, now_ms: int, lease_ms: int, max_running: int,
              policy: QueuePolicy) -> Claimed | None:
        """Take the next job for ``owner``: first a RUNNING one whose lease ran out (resumed from its
        checkpoint), else the queue's best by ``policy``; None when nothing waits or ``max_running``
        jobs hold live leases across every gateway. The job is RUNNING under ``owner``'s lease."""

    def heartbeat(self, owner: str, job_ids: Iterable[str], now_ms: int, lease_ms: int) -> set[str]:
        """Renew ``owner``'s leases; return the ids it still holds (a job missing was cancelled, ended
        or taken over: its run must stop)."""

    def release(self, owner: str, job_id: str) -> bool:
        """``owner`` stops running a job that has not ended (its gateway is stopping): the lease ends now,
        so the next gateway takes it over at once, from its checkpoint."""

    def transition(self, job_id: str, status: JobStatus, expected: Iterable[JobStatus],
                   owner: str | None = None, **fields: Any) -> bool:
        """Set the status (and ``fields``) if the status is one of ``expected`` (and, with ``owner``, the
        job is under that owner's lease); True if it changed. Ending a job clears its lease and checkpoint."""

    def progress(self, job_id: str, owner: str, stage: Stage, step: int, total_steps: int) -> None: ...

    def add_warning(self, job_id: str, text: str) -> None: ...

    def save_checkpoint(self, job_id: str, owner: str, step: int, data: bytes) -> bool:
        """Keep the denoiser's state after ``step`` steps (replacing the last); False if no longer ours."""

    # --- many jobs -----------------------------------------------------------------------------------------
    def list(self, status: JobStatus | None = None, limit: int = 50, before_seq: int | None = None,
             tenant: str | None = None, after_seq: int | None = None, oldest_first: bool = False) -> list[JobRecord]:
        """Newest first (``oldest_first``: in the order they came); ``before_seq`` / ``after_seq`` keep only the
        rows with a smaller / larger seq (exclusive), so a page continues after the last row of the previous one
        (``before_seq`` newest first, ``after_seq`` oldest first); ``tenant`` keeps only that tenant's jobs (None =
        everyone's). DELETED jobs are never listed unless ``status`` asks for them."""

    def waiting(self) -> list[Waiting]:
        """Every QUEUED job (for queue places; the policy orders them)."""

    def running(self, now_ms: int) -> int:
        """Jobs RUNNING under a live lease, on every gateway."""

    def recoverable(self, now_ms: int) -> int:
        """Jobs a gateway left behind: RUNNING with a lease run out."""

    def find_cached(self, cache_key: str, now_ms: int) -> JobRecord | None:
        """The newest COMPLETED, unexpired job with this cache key, if any."""

    def overdue(self, now_ms: int) -> list[JobRecord]:
        """QUEUED or RUNNING jobs whose deadline has passed."""

    def next_deadline_ms(self) -> int | None:
        """The earliest deadline of a QUEUED or RUNNING job."""

    def due_to_expire(self, now_ms: int) -> list[str]:
        """Ids of COMPLETED jobs whose retention time has passed."""

    def count(self, status: JobStatus) -> int: ...

    # --- between gateways ------------------------------------------------------------------------------------
    def notify(self, notice: Notice) -> None:
        """Tell the other gateways of this store (nothing to do when the store is not shared)."""

    def listen(self, handler: Callable[[Notice], None]) -> None:
        """Call ``handler`` (on a thread of the store's) for every notice another gateway sends."""

    def exclusive(self, name: str) -> ContextManager[bool]:
        """A lock across gateways for work one of them should do at a time (True = yours now)."""

    def rate_buckets(self) -> object | None:
        """Shared buckets for per-key rate limits (a ``ratelimit.Buckets``), or None to keep them in this
        process."""


class ResultStore(Protocol):
    """Where finished videos live, by job id."""

    def check_room(self) -> None:
        """Raise ResultStoreFull when there is clearly no room for another video (a submission is refused
        then, rather than run to fail at its end); a store that cannot tell cheaply does nothing."""

    def space(self) -> tuple[int, int] | None:
        """(bytes free, bytes in all) where the videos are kept, read cheaply (it runs at every metrics
        scrape), or None when the store cannot tell (a database server does not tell its clients)."""

    def save(self, job_id: str, data: bytes) -> int:
        """Store the video whole (readers never see part of it); return its size."""

    def copy(self, source_id: str, job_id: str) -> int:
        """Give ``job_id`` its own copy of another job's video (a cache hit); OSError if it is gone."""

    def open(self, job_id: str) -> tuple[BinaryIO, int] | None:
        """The video opened for reading and its size, or None if it is not there."""

    def delete(self, job_id: str) -> bool: ...

    def sweep(self, keep: Callable[[str], bool]) -> int:
        """Delete videos whose job ``keep`` refuses (a crash between storing the video and the row)."""

    def close(self) -> None: ...


class ResultStoreFull(OSError):
    """The result store has no room for a video (a full disk or database)."""


# --- the row codec both engines use -----------------------------------------------------------------------
COLUMNS = [f.name for f in dataclasses.fields(JobRecord)]
# Columns a transition may set besides status (never the job's identity or its request).
UPDATABLE = frozenset(COLUMNS) - {"job_id", "params", "seq", "status", "priority", "seed_given", "cache_key",
                                  "created_ms", "trace_parent"}


def to_row(record: JobRecord) -> dict[str, Any]:
    row = dataclasses.asdict(record)
    row["status"] = record.status.value
    row["priority"] = record.priority.label
    params = dataclasses.asdict(record.params)
    if not params["preview"]:
        del params["preview"]      # a job without previews is the row it was before they existed
    row["params"] = json.dumps(params, sort_keys=True)
    row["warnings"] = json.dumps(list(record.warnings))
    row["stage"] = int(record.stage)
    row["seed_given"], row["cached"] = int(record.seed_given), int(record.cached)
    return row


def params_from_json(text: str, job_id: str) -> Params:
    """A row's params; a field this gateway does not know (written by a newer one sharing the store during a
    rolling update) is left out with a log line, so the row still reads instead of failing every list."""
    fields = json.loads(text)
    unknown = sorted(set(fields) - PARAM_NAMES)
    if unknown:
        log.warning(kv("params_unknown", job_id=job_id, fields=",".join(unknown),
                       action="read without them: a newer gateway wrote this job; upgrade every gateway of the store"))
    return Params(**{k: v for k, v in fields.items() if k in PARAM_NAMES})


def from_row(row: Mapping[str, Any]) -> JobRecord:
    values = {name: row[name] for name in COLUMNS}
    values["status"] = JobStatus(values["status"])
    values["priority"] = Priority.parse(values["priority"])
    values["params"] = params_from_json(values["params"], values["job_id"])
    values["warnings"] = tuple(json.loads(values["warnings"]))
    values["stage"] = Stage.of(int(values["stage"]))
    values["seed_given"], values["cached"] = bool(values["seed_given"]), bool(values["cached"])
    values["cache_key"] = values["cache_key"] or None
    return JobRecord(**values)


def encode(column: str, value: Any) -> Any:
    """A transition's field value as the column stores it."""
    if column == "warnings":
        return json.dumps(list(value))
    if column in ("cached", "seed_given"):
        return int(value)
    if column == "stage":
        return int(value)
    return value


def check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"a transition cannot set {sorted(unknown)}")
