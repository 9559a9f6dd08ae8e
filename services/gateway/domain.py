"""The gateway's vocabulary: plain types that every room of the gateway speaks, and nothing else.

Why one module: the store, the queue policy, the job service, the dispatcher and both front doors
(gRPC and HTTP) all talk about jobs, priorities, statuses, stages and the events of a run. When each
defined its own, they imported each other for types and the store kept raw protobuf numbers. Here
they are plain Python (no gRPC, no SQL), so any room may import this one and this one imports none.
"""

from __future__ import annotations

import enum
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from services.common.contract import DEFAULT_VAE_SCALE_FACTOR
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted

JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


class Priority(enum.IntEnum):
    """Levels, higher value = runs first. ``label`` is what the store, logs and metrics write."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Priority":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"priority {text!r} is not one of low, normal, high") from None


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    # Deleted by its owner (HTTP DELETE /v1/videos/{id}, gRPC DeleteJob): the row stays, so every gateway and a
    # list's cursor still know the id, but the job is gone for its callers: get / watch / its video answer
    # NOT_FOUND saying it was deleted, and no listing shows it. Never shown as a status.
    DELETED = "deleted"

    @property
    def is_terminal(self) -> bool:
        return self not in ACTIVE


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


class Stage(enum.IntEnum):
    """Where a running job is. The values are stored in job rows; ``label`` is the stage's name."""

    NONE = 0
    TEXT_ENCODER = 1
    DENOISER = 2
    DECODER = 3

    @property
    def label(self) -> str:
        """``text_encoder``, ``denoiser`` or ``decoder`` ("" for NONE)."""
        return "" if self is Stage.NONE else self.name.lower()

    @classmethod
    def of(cls, value: int) -> "Stage":
        """The stage of a stored number; an unknown one (a newer gateway's) reads as NONE."""
        try:
            return cls(value)
        except ValueError:
            return cls.NONE


RUN_STAGES = (Stage.TEXT_ENCODER, Stage.DENOISER, Stage.DECODER)


def new_job_id() -> str:
    """A fresh job id: uuid4 as 32 lowercase hex characters (the only form ``check_job_id`` accepts)."""
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it has the form the gateway generates, else raise InvalidArgument.

    Why strict: ids name files and rows; a path is never built from user text, so ``../`` cannot
    reach the disk."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) and len(job_id) <= 64 else f"{str(job_id)[:64]}..."
        raise InvalidArgument(f"job id {shown!r} is malformed; a job id is the 32 lowercase hex characters "
                              "that SubmitJob or Generate returned")
    return job_id


# --- what a user asks for -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamsInput:
    """Generation parameters as a front door received them: None (or 0 for the numbers gRPC cannot leave
    unset) = the default. Both front doors build one, ``validation.validate`` resolves it: one path."""

    prompt: str = ""
    negative_prompt: str = ""
    num_frames: int = 0
    height: int = 0
    width: int = 0
    num_inference_steps: int = 0
    guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    fps: int = 0
    scheduler: str = ""
    cache: str = ""
    preview: bool = False


@dataclass(frozen=True)
class Params:
    """A validated request with every default filled in."""

    prompt: str
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    fps: int
    scheduler: str
    cache: str = "none"           # "none" (exact) or "deep" (DeepCache); rows stored before it read "none"
    preview: bool = False          # live previews while it denoises; changes nothing of the video

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class Limits:
    max_frames: int = 64
    max_size: int = 1024
    max_steps: int = 200
    max_fps: int = 60
    max_prompt_chars: int = 10_000
    default_size: int = 256          # the model's unet sample_size * vae_scale_factor
    vae_scale_factor: int = DEFAULT_VAE_SCALE_FACTOR   # sizes are multiples of it (model_folder.vae_scale_factor)


@dataclass(frozen=True)
class JobRequest:
    """What a caller asks for, validated (see ``validation.validate``)."""

    params: Params
    priority: Priority = Priority.NORMAL
    seed_given: bool = False                # the user named the seed: only then may the cache answer
    timeout_seconds: float | None = None    # queue + run time allowed from now; None = no limit
    tenant: str = ""                        # whose job it will be (tenancy.Caller.tenant)


# --- a job ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobRecord:
    """One job row, as plain Python. Times are unix milliseconds, 0 = not yet / none."""

    job_id: str
    status: JobStatus
    priority: Priority
    params: Params
    seed_given: bool = False          # the request named its seed (only such jobs use the result cache)
    cache_key: str | None = None      # set only when seed_given
    created_ms: int = 0
    deadline_ms: int = 0              # the job fails with DEADLINE_EXCEEDED after this; 0 = no deadline
    started_ms: int = 0
    finished_ms: int = 0
    expires_ms: int = 0               # when the video is (COMPLETED) or was (EXPIRED) deleted
    stage: Stage = Stage.NONE         # while running
    step: int = 0
    total_steps: int = 0
    error_code: str = ""              # a gRPC status code name
    error_message: str = ""
    warnings: tuple[str, ...] = ()
    cached: bool = False
    video_size: int = 0
    mime_type: str = ""
    runs: int = 0                     # times the job was started (> 1 after a takeover or restart)
    seq: int = 0                      # insertion order, assigned by the store
    owner: str = ""                   # the gateway whose lease holds it while RUNNING
    lease_expires_ms: int = 0         # RUNNING and past this: its gateway is gone, another takes it over
    checkpoint_step: int = 0          # denoising steps the stored checkpoint has done (0 = none)
    tenant: str = ""                  # whose job: a digest of the API key that made it ("" = keys off)
    trace_parent: str = ""            # W3C traceparent naming the job's root span ("" = not traced); set at
                                      # admission, so whichever gateway runs or ends the job continues its trace


@dataclass(frozen=True)
class JobView:
    """A job as a caller sees it now: its row, with its queue place when it waits."""

    record: JobRecord
    queue_position: int = 0                 # 1 = next; 0 when not queued
    queue_length: int = 0                   # jobs waiting in all, when queued
    waiting_for: str = ""                   # RUNNING but not moving: what it waits for, in a sentence
    preview: Optional["Preview"] = None     # RUNNING here, asked for previews: the latest one

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def status(self) -> JobStatus:
        return self.record.status


class JobDeleted(NotFound):
    """NOT_FOUND for a job its owner deleted (the sentence says so, where an unknown id's says "does not exist")."""


class QueueFull(ResourceExhausted):
    """The queue holds its most jobs; the caller should retry after ``retry_after_seconds``."""

    def __init__(self, length: int, retry_after_seconds: int) -> None:
        super().__init__(f"the queue is full ({length} jobs waiting); retry in about "
                         f"{retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


# --- what a run reports (the orchestrator yields them) -------------------------------------------------
@dataclass(frozen=True)
class StageStarted:
    stage: Stage


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    timestep: int


@dataclass(frozen=True)
class Warning:  # noqa: A001 - a job warning, not the builtin
    text: str


@dataclass(frozen=True)
class StageRetried(Warning):
    """A stage call broke mid-way and is tried again. Kept with the job like any warning, except while its
    gateway stops: the stages stop with it then (``t2v up``), and the job's next run owes nothing to that."""


@dataclass(frozen=True)
class Waiting:
    """The run waits for a replica of ``stage`` to answer (its last one went away): why the job's step does
    not move. Ends with the next Progress or StageStarted."""

    stage: Stage
    text: str


@dataclass(frozen=True)
class Checkpoint:
    """The denoiser's state after ``step`` steps, opaque to the gateway: a successor resumes from it."""

    step: int
    data: bytes


@dataclass(frozen=True)
class Preview:
    """The latents after ``step`` steps as a small PNG (the denoiser's; protos/t2v/v1/generation.proto says how
    its frames are laid out). Kept by the gateway running the job, the latest only; never stored."""

    step: int
    total: int
    png: bytes
    num_frames: int
    columns: int
    rows: int
    frame_width: int
    frame_height: int


@dataclass(frozen=True)
class Result:
    video: bytes
    mime_type: str
    num_frames: int
    height: int
    width: int
    frames: object | None = None   # float frames from the decoder, only when asked for (parity checks)


RunEvent = Union[StageStarted, Progress, Warning, Waiting, Checkpoint, Preview, Result]


# --- what a watcher receives, besides StageStarted / Progress / Warning ----------------------------------
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
    """This gateway is stopping before the job ended; the job goes on (here after a restart, or on another
    gateway of the same job store): follow it by id."""

    message: str


JobUpdate = Union[Queued, StageStarted, Progress, Preview, Warning, Finished, Interrupted]


class RunControl:
    """Lets another thread stop a running job: the stage call in flight (anything with ``cancel()``,
    e.g. a gRPC call future) is cancelled at once, so the denoiser drops the request at its next step."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._call: object | None = None
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            if self._call is not None:
                self._call.cancel()  # type: ignore[attr-defined]

    def track(self, call: object | None) -> None:
        with self._lock:
            self._call = call
            if call is not None and self.cancelled.is_set():
                call.cancel()  # type: ignore[attr-defined]
