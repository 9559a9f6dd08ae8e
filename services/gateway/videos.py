"""The HTTP API's bodies in the shape of OpenAI's Videos API, and their translation to and from the job
system's plain values (``JobRequest`` in, ``JobView`` and watch updates out). No HTTP server here.

Why apart from ``http.py``: these classes are the HTTP contract (``/openapi.json`` is built from them),
and the translation has rules worth testing without a server: ``size`` "WxH" and ``seconds`` become
height, width and frames; the job's six statuses become OpenAI's four; progress becomes a percentage.
Every range rule stays in ``validation.validate`` (one voice for both front doors), so the schema here
only documents the limits: pydantic checks types, ``validate`` checks values.

Status mapping (``status`` is what OpenAI clients switch on; ``job_status`` is ours, exact):

    job_status   status        notes
    queued       queued        queue_position / queue_length say where it waits
    running      in_progress   progress 0-99: the share of denoising steps done
    completed    completed     progress 100; GET .../content serves the MP4
    failed       failed        error.code is the gRPC code in lower case, e.g. "deadline_exceeded"
    cancelled    failed        error.code "cancelled" (DELETE, or the client of a Generate went away)
    expired      completed     the MP4 was deleted after the retention time: GET answers 404 saying so
    (deleted)    -             DELETE /v1/videos/{id}: GET and /content answer 404 saying so; not listed
"""

from __future__ import annotations

import base64
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.contract import CACHE_MODES, DEFAULT_FPS, SCHEDULERS
from services.common.errors import InvalidArgument
from services.gateway.domain import (Finished, Interrupted, JobRequest, JobStatus, JobUpdate, JobView, Limits,
                                     ParamsInput, Preview, Priority, Progress as StepProgress, Queued, Stage,
                                     StageStarted, Warning)
from services.gateway.validation import validate

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]
# The job statuses a video object shows (a deleted job has none: it answers 404).
JobStatusName = Literal["queued", "running", "completed", "failed", "cancelled", "expired"]
PriorityName = Literal["low", "normal", "high"]
StageName = Literal["text_encoder", "denoiser", "decoder"]

_STATUS = {JobStatus.QUEUED: "queued", JobStatus.RUNNING: "in_progress", JobStatus.COMPLETED: "completed",
           JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed", JobStatus.EXPIRED: "completed"}
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
# Fields of an OpenAI request this gateway cannot honour, with the sentence that says why.
_UNSUPPORTED = {"input_reference": "input_reference is not supported: this model makes videos from text only; "
                                   "leave it out",
                "remix_video_id": "remixing is not supported; send a new prompt instead"}


# --- request ------------------------------------------------------------------------------------------
class CreateVideoRequest(BaseModel):
    """POST /v1/videos (and /v1/videos/sync): OpenAI's fields (prompt, model, size, seconds, user), the names
    vLLM-Omni's /v1/videos adds (width, height, num_frames, fps, num_inference_steps, guidance_scale,
    negative_prompt, seed), and this gateway's own (scheduler, priority, timeout_seconds).

    Sent as JSON, or as multipart/form-data or a urlencoded form as OpenAI's SDKs do. Unset fields take
    the defaults of diffusers' TextToVideoSDPipeline."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "a red ball moving right on a black background", "size": "64x64", "num_frames": 8,
         "num_inference_steps": 25, "seed": 42, "priority": "normal"}]})

    prompt: str = Field(description="What the video shows. The text encoder reads the first 77 tokens.",
                        json_schema_extra={"minLength": 1, "maxLength": 10_000})
    model: Optional[str] = Field(None, description="Accepted for OpenAI clients and ignored: the gateway serves "
                                                   "one model, named in the response's `model`.")
    size: Optional[str] = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$",
                                description="WIDTHxHEIGHT in pixels, each a multiple of the model's VAE scale factor "
                                            "(8 for text-to-video-ms-1.7b; default: the model's own size, e.g. "
                                            "256x256 for text-to-video-ms-1.7b).",
                                examples=["256x256"])
    width: Optional[int] = Field(None, description="Pixels across, as vLLM-Omni names it: the width of `size`. Give "
                                                   "`size`, or `width` and `height`, or both agreeing (the other of "
                                                   "the two left out takes the model's size).",
                                 json_schema_extra={"minimum": 1, "maximum": 1024})
    height: Optional[int] = Field(None, description="Pixels down, as vLLM-Omni names it: the height of `size`.",
                                  json_schema_extra={"minimum": 1, "maximum": 1024})
    seconds: Optional[Union[str, float]] = Field(
        None, description="Length of the video; with `fps` it gives `num_frames` = round(seconds x fps). "
                          "A number or a numeric string as OpenAI sends it (\"4\"). Give `seconds` or "
                          "`num_frames`, not both.", examples=["2"])
    num_frames: Optional[int] = Field(None, description="Frames to generate (default 16).",
                                      json_schema_extra={"minimum": 1, "maximum": 64})
    fps: Optional[int] = Field(None, description="Frames per second of the MP4 (default 8).",
                               json_schema_extra={"minimum": 1, "maximum": 60})
    negative_prompt: Optional[str] = Field(None, description="What the video should not show.",
                                           json_schema_extra={"maxLength": 10_000})
    num_inference_steps: Optional[int] = Field(None, description="Denoising steps (default 50): more is slower "
                                                                 "and finer.",
                                               json_schema_extra={"minimum": 1, "maximum": 200})
    guidance_scale: Optional[float] = Field(None, description="Classifier-free guidance (default 9.0); <= 1 "
                                                              "turns guidance off.",
                                            json_schema_extra={"minimum": 0})
    seed: Optional[int] = Field(None, description="Same seed and parameters, same video; such a request is "
                                                  "answered at once from the result cache when the video is "
                                                  "still stored (default: a random seed, never cached).",
                                json_schema_extra={"minimum": 0})
    scheduler: Optional[str] = Field(None, description="Sampling scheduler (default ddim).",
                                     json_schema_extra={"enum": list(SCHEDULERS)})
    cache: Optional[str] = Field(None, description="Step caching: none (default: the exact UNet every step) or "
                                                   "deep (DeepCache: the whole UNet every few steps, its shallow "
                                                   "part between them; faster, approximate, see docs/api.md).",
                                 json_schema_extra={"enum": list(CACHE_MODES)})
    priority: PriorityName = Field("normal", description="Queue priority: high jobs run first; a waiting job "
                                                         "rises one level per aging period, so low never starves.")
    timeout_seconds: Optional[float] = Field(None, description="Seconds the job may take from now, queue time "
                                                               "included; then it fails with deadline_exceeded. "
                                                               "Unset or 0 = no limit.",
                                             json_schema_extra={"minimum": 0})
    user: Optional[str] = Field(None, description="Your end user, as OpenAI and vLLM-Omni take it: written to the "
                                                  "gateway's log beside the job id (its first 64 characters), never "
                                                  "stored and never an identity (the API key is).")
    preview: Optional[bool] = Field(None, description="Live previews while it denoises (default false): a small "
                                                      "PNG of the latents every few steps (the gateway's "
                                                      "preview_every) as `preview` events on /events and at "
                                                      "GET /v1/videos/{id}/preview. The video is the same.")


def schema_limits(limits: Limits) -> dict[str, dict[str, int]]:
    """The request schema's bounds that come from the gateway's settings, by property name."""
    return {"num_frames": {"maximum": limits.max_frames}, "num_inference_steps": {"maximum": limits.max_steps},
            "fps": {"maximum": limits.max_fps}, "prompt": {"maxLength": limits.max_prompt_chars},
            "negative_prompt": {"maxLength": limits.max_prompt_chars}, "width": {"maximum": limits.max_size},
            "height": {"maximum": limits.max_size}}


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, bool) or value is None else repr(value)   # JSON's true, not True
    return text if len(text) <= 60 else text[:57] + "..."


def parse_request(body: Any, strict: bool = False) -> CreateVideoRequest:
    """The request, or InvalidArgument with a sentence and the field at fault (pydantic's messages are
    rewritten: a user should read what to send, not a validator's vocabulary). ``strict`` for JSON, whose
    values carry their types: ``true`` is no number of frames, ``"5"`` no number (``seconds`` alone takes a
    numeric string, as OpenAI sends it); a form's values are all strings, read as numbers where one is due."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object with at least a prompt, e.g. "
                              "{\"prompt\": \"a red ball moving right\"}")
    for name, sentence in _UNSUPPORTED.items():
        if name in body:
            raise InvalidArgument(sentence, field=name)
    try:
        return CreateVideoRequest.model_validate(body, strict=strict)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidArgument(_sentence(field or "the body", first), field=field) from None


def _sentence(field: str, error: Any) -> str:
    kind, given = error["type"], error.get("input")
    if kind == "missing":
        return f"{field} is missing; it is required (e.g. \"prompt\": \"a red ball moving right\")"
    if kind == "extra_forbidden":
        known = ", ".join(CreateVideoRequest.model_fields)
        return f"{field} is not a field of this API; the fields are: {known}"
    if kind == "string_pattern_mismatch" and field == "size":
        return f"size {_shown(given)} is not WIDTHxHEIGHT in pixels; send e.g. \"256x256\""
    if kind == "literal_error":
        return f"{field} {_shown(given)} is unknown; use one of {error['ctx']['expected']}"
    if kind.startswith("int_"):
        return f"{field} is {_shown(given)}; it must be a whole number"
    if kind.startswith("float_"):
        return f"{field} is {_shown(given)}; it must be a number"
    if kind.startswith("string_"):
        return f"{field} is {_shown(given)}; it must be a string"
    return f"{field} is {_shown(given)}; {error['msg'][0].lower()}{error['msg'][1:]}"


def to_job_request(body: CreateVideoRequest, limits: Limits) -> JobRequest:
    """The job request of a POST /v1/videos body: size and seconds resolved, then ``validate``."""
    for name, most in (("num_frames", limits.max_frames), ("fps", limits.max_fps),
                       ("num_inference_steps", limits.max_steps), ("width", limits.max_size),
                       ("height", limits.max_size)):
        value = getattr(body, name)          # 0 means "the default" over gRPC; here a number must be one
        if value is not None and not 1 <= value <= most:
            raise InvalidArgument(f"{name} is {value}; it must be between 1 and {most}", field=name)
    width, height = body.width or 0, body.height or 0
    if body.size is not None:
        match = _SIZE.fullmatch(body.size)
        assert match is not None                 # the model's pattern checked it
        width, height = int(match[1]), int(match[2])
        if not width or not height:
            raise InvalidArgument(f"size is {body.size!r}; width and height must be positive multiples of "
                                  f"{limits.vae_scale_factor}, e.g. \"256x256\"", field="size")
        for name, given, meant in (("width", body.width, width), ("height", body.height, height)):
            if given is not None and given != meant:
                raise InvalidArgument(f"size is {body.size!r} but {name} is {given}; they say two different sizes: "
                                      f"send size, or width and height, or make them agree", field=name)
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise InvalidArgument(f"seed is {body.seed}; it must be between 0 and 2**63 - 1", field="seed")
    params = ParamsInput(prompt=body.prompt, negative_prompt=body.negative_prompt or "",
                         num_frames=_frames(body, limits), height=height, width=width,
                         num_inference_steps=body.num_inference_steps or 0, guidance_scale=body.guidance_scale,
                         seed=body.seed, fps=body.fps or 0, scheduler=body.scheduler or "", cache=body.cache or "",
                         preview=bool(body.preview))
    try:
        resolved = validate(params, limits)
    except InvalidArgument as error:
        if error.field in ("height", "width") and body.size is not None:
            error.field = "size"
        if error.field == "num_frames" and body.seconds is not None:
            error.field = "seconds"
        raise
    timeout = body.timeout_seconds or None
    if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
        raise InvalidArgument(f"timeout_seconds is {timeout}; it must be a number of seconds >= 0 (0 = no limit)",
                              field="timeout_seconds")
    return JobRequest(resolved, Priority.parse(body.priority), seed_given=body.seed is not None,
                      timeout_seconds=timeout)


def _frames(body: CreateVideoRequest, limits: Limits) -> int:
    """num_frames as given, or round(seconds x fps); 0 = the default."""
    if body.seconds is None:
        return body.num_frames or 0
    if body.num_frames is not None:
        raise InvalidArgument("give seconds or num_frames, not both: num_frames = seconds x fps", field="seconds")
    try:
        seconds = float(body.seconds)
    except ValueError:
        raise InvalidArgument(f"seconds is {_shown(body.seconds)}; send a number of seconds, e.g. \"2\"",
                              field="seconds") from None
    fps = body.fps or DEFAULT_FPS
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(f"seconds is {body.seconds}; it must be a positive number", field="seconds")
    exact = seconds * fps       # compared before round(), which overflows on 1e308 seconds (inf frames)
    if exact > limits.max_frames + 0.5:
        raise InvalidArgument(f"seconds is {body.seconds}: {exact:.0f} frames at {fps} fps; at most "
                              f"{limits.max_frames} frames are accepted ({limits.max_frames / fps:g} s at {fps} fps)",
                              field="seconds")
    return max(1, round(exact))


# --- response -------------------------------------------------------------------------------------------
class VideoError(BaseModel):
    code: str = Field(description="The gRPC status code in lower case: deadline_exceeded, cancelled, "
                                  "unavailable, invalid_argument, internal, ...", examples=["deadline_exceeded"])
    message: str = Field(description="A sentence saying what happened and what to do.")


class Video(BaseModel):
    """A video job, in the shape of OpenAI's video object, with this gateway's fields after ``error``."""

    id: str = Field(description="The job id: 32 lowercase hex characters.", examples=["3f2a" + "0" * 28])
    object: Literal["video"] = "video"
    created_at: int = Field(description="Unix seconds when the job was accepted.")
    completed_at: Optional[int] = Field(None, description="Unix seconds when the job ended (any end).")
    expires_at: Optional[int] = Field(None, description="Unix seconds when the MP4 is (or was) deleted.")
    status: VideoStatus = Field(description="OpenAI's four statuses; `job_status` tells cancelled and expired "
                                            "apart (cancelled -> failed, expired -> completed).")
    progress: int = Field(ge=0, le=100, description="Percent done: the share of denoising steps; 100 once "
                                                    "completed.")
    model: str = Field(description="The model folder's name.")
    size: str = Field(description="WIDTHxHEIGHT in pixels.", examples=["256x256"])
    seconds: str = Field(description="Length of the video: num_frames / fps, as a string like OpenAI's.")
    prompt: str
    error: Optional[VideoError] = Field(None, description="Why the job failed or was cancelled.")
    job_status: JobStatusName = Field(description="The job system's exact status.")
    priority: PriorityName
    queue_position: Optional[int] = Field(None, ge=1, description="1 = next to run; null when not queued.")
    queue_length: Optional[int] = Field(None, ge=1, description="Jobs waiting in all; null when not queued.")
    stage: Optional[StageName] = Field(None, description="The stage running now (in_progress only).")
    step: int = Field(ge=0, description="Denoising steps done.")
    total_steps: int = Field(ge=0, description="Denoising steps in all, once the denoiser started.")
    started_at: Optional[int] = Field(None, description="Unix seconds when the job started running.")
    seed: int = Field(description="The seed used: send it back with the same parameters for the same video.")
    num_frames: int
    fps: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    cache: str = Field(description="none (exact) or deep (DeepCache step caching).")
    negative_prompt: str
    cached: bool = Field(description="Completed at once from the result cache (same explicit seed and params).")
    video_size: Optional[int] = Field(None, description="Bytes of the MP4, once completed.")
    warnings: list[str] = Field(description="E.g. a prompt cut at 77 tokens.")
    waiting_for: Optional[str] = Field(None, description="In progress but not moving: what the job waits for, "
                                                         "in a sentence (e.g. a replica of the denoiser stage).")
    preview: bool = Field(False, description="The job asked for live previews (GET /v1/videos/{id}/preview).")


class VideoList(BaseModel):
    """A page of videos, newest first (or oldest first with `order=asc`), as OpenAI lists them."""

    object: Literal["list"] = "list"
    data: list[Video]
    first_id: Optional[str] = None
    last_id: Optional[str] = Field(None, description="Pass it as `after` for the next page.")
    has_more: bool


class VideoDeleted(BaseModel):
    """DELETE /v1/videos/{id}: the video and its job are gone (a queued or running job was cancelled first)."""

    id: str = Field(description="The id of the deleted video.")
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = Field(True, description="Always true: a video that cannot be deleted is an error answer.")


class ErrorBody(BaseModel):
    message: str = Field(description="A sentence saying what is wrong and what to do.")
    type: Literal["invalid_request_error", "authentication_error", "rate_limit_error", "server_error"]
    param: Optional[str] = Field(None, description="The request field at fault, when one is.")
    code: str = Field(description="The gRPC status code in lower case (see docs/api.md for the mapping).")


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody


def _seconds(ms: int) -> Optional[int]:
    return ms // 1000 if ms else None


def progress_percent(job_status: JobStatus, stage: Stage, step: int, total_steps: int) -> int:
    """0 while queued or encoding, the share of steps while denoising (at most 99), 99 while decoding,
    100 once completed; a job that ended otherwise keeps what it had reached."""
    if job_status in (JobStatus.COMPLETED, JobStatus.EXPIRED):
        return 100
    if job_status == JobStatus.QUEUED:
        return 0
    if stage == Stage.DECODER:
        return 99
    return min(99, 100 * step // total_steps) if total_steps else 0


def video_object(view: JobView, model: str) -> Video:
    r, p = view.record, view.record.params
    error = VideoError(code=r.error_code.lower(), message=r.error_message) if r.error_code else None
    return Video(
        id=r.job_id, created_at=r.created_ms // 1000,
        completed_at=_seconds(r.finished_ms), expires_at=_seconds(r.expires_ms), status=_STATUS[r.status],
        progress=progress_percent(r.status, r.stage, r.step, r.total_steps), model=model,
        size=f"{p.width}x{p.height}", seconds=f"{p.num_frames / p.fps:g}", prompt=p.prompt, error=error,
        job_status=r.status.value, priority=r.priority.label,
        queue_position=view.queue_position or None, queue_length=view.queue_length or None,
        stage=(r.stage.label or None) if r.status == JobStatus.RUNNING else None,
        step=r.step, total_steps=r.total_steps, started_at=_seconds(r.started_ms),
        seed=p.seed, num_frames=p.num_frames, fps=p.fps, width=p.width, height=p.height,
        num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale, scheduler=p.scheduler,
        cache=p.cache, negative_prompt=p.negative_prompt, cached=r.cached, video_size=r.video_size or None,
        warnings=list(r.warnings), waiting_for=view.waiting_for or None,
        preview=p.preview)


def model_name(model: str) -> str:
    """What ``model`` says in responses: the model folder's name."""
    return Path(model).name or model


class Model(BaseModel):
    """The model this gateway serves, in the shape of OpenAI's model object."""

    id: str = Field(description="The model folder's name: what `model` says in every video.", examples=["t2v-world"])
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds when the model folder was written (its model_index.json); 0 "
                                     "when the gateway has no copy of the folder to look at.")
    owned_by: str = Field("t2v-mesh", description="Who serves it.")


class ModelList(BaseModel):
    """GET /v1/models: one model, the one every stage of this mesh loads."""

    object: Literal["list"] = "list"
    data: list[Model]


def model_object(model: str) -> Model:
    """The model folder ``model`` as OpenAI's model object."""
    created = 0
    for path in (Path(model) / "model_index.json", Path(model)):
        try:
            created = int(path.stat().st_mtime)
            break
        except OSError:
            continue
    return Model(id=model_name(model), created=created)


def deleted_sentence(video_id: str) -> str:
    return (f"video {video_id} was deleted (DELETE /v1/videos/{{id}}), and its MP4 with it; create it again (the same "
            "seed and parameters give the same video)")


def expired_sentence(view: JobView) -> str:
    when = datetime.fromtimestamp(view.record.expires_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"video {view.job_id} expired at {when} and was deleted after the gateway's retention time; "
            "create it again (the same seed and parameters give the same video)")


def preview_fields(preview: Preview) -> dict[str, Any]:
    """A preview's picture as a data: URL (an <img> shows it as it is) and how its frames are laid out."""
    return {"image": "data:image/png;base64," + base64.b64encode(preview.png).decode("ascii"),
            "num_frames": preview.num_frames, "columns": preview.columns, "rows": preview.rows,
            "frame_width": preview.frame_width, "frame_height": preview.frame_height}


# --- server-sent events -------------------------------------------------------------------------------
class Progress:
    """What a watcher has seen so far of a running job, to put a percentage on each event."""

    def __init__(self) -> None:
        self.stage = Stage.NONE
        self.step = 0
        self.total = 0

    def percent(self) -> int:
        return progress_percent(JobStatus.RUNNING, self.stage, self.step, self.total)


def event_of(job_id: str, update: JobUpdate, seen: Progress, model: str) -> tuple[str, dict[str, Any]] | None:
    """The (event name, data) of a watch update for GET /v1/videos/{id}/events; None to send nothing.

    Events: ``queued`` {queue_position, queue_length}; ``stage`` {stage}; ``progress`` {step, total_steps};
    ``preview`` {step, total_steps, image (a data: URL of the PNG), num_frames, columns, rows, frame_width,
    frame_height} for a job that asked for previews; ``warning`` {message}; then one of ``completed`` / ``failed``
    (the whole video object) or ``error`` (the gateway stopped first: the job runs again after its restart; or the
    video was deleted). Every event but ``error`` carries
    ``id``, ``status`` and ``progress``.
    """
    if isinstance(update, Queued):
        return "queued", {"id": job_id, "status": "queued", "progress": 0, "queue_position": update.position,
                          "queue_length": update.length}
    if isinstance(update, StageStarted):
        seen.stage = update.stage
        return "stage", {"id": job_id, "status": "in_progress", "progress": seen.percent(),
                         "stage": update.stage.label or None}
    if isinstance(update, StepProgress):
        seen.step, seen.total = update.step, update.total
        return "progress", {"id": job_id, "status": "in_progress", "progress": seen.percent(),
                            "stage": "denoiser", "step": update.step, "total_steps": update.total}
    if isinstance(update, Preview):
        return "preview", {"id": job_id, "status": "in_progress", "progress": seen.percent(), "step": update.step,
                           "total_steps": update.total, **preview_fields(update)}
    if isinstance(update, Warning):
        return "warning", {"id": job_id, "status": "in_progress", "progress": seen.percent(),
                           "message": update.text}
    if isinstance(update, Finished) and update.job.status == JobStatus.DELETED:
        return "error", {"error": {"message": deleted_sentence(job_id), "type": "invalid_request_error",
                                   "param": None, "code": "not_found"}}
    if isinstance(update, Finished):
        video = video_object(update.job, model)
        return ("completed" if video.status == "completed" else "failed"), video.model_dump(mode="json")
    if isinstance(update, Interrupted):
        return "error", {"error": {"message": update.message, "type": "server_error", "param": None,
                                   "code": "unavailable"}}
    return None

