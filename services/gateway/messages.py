"""Protobuf <-> plain Python for the gateway's contract: jobs, priorities, events, errors.

Why apart from server.py: the gRPC servicer and the HTTP bridge (which speaks the same messages as
JSON) translate the job system's plain values the same way; this module is that one translation.
"""

from __future__ import annotations

import grpc

from services.common.errors import InvalidArgument, ServiceError
from services.gateway.domain import (Finished, JobRecord, JobStatus, JobUpdate, JobView, Params, ParamsInput, Preview,
                                     Priority, Progress, Queued, Stage, StageStarted, Warning)
from t2v.v1 import gateway_pb2, generation_pb2

_PRIORITY_FROM_PROTO = {gateway_pb2.PRIORITY_UNSPECIFIED: Priority.NORMAL, gateway_pb2.PRIORITY_LOW: Priority.LOW,
                        gateway_pb2.PRIORITY_NORMAL: Priority.NORMAL, gateway_pb2.PRIORITY_HIGH: Priority.HIGH}
_PRIORITY_TO_PROTO = {Priority.LOW: gateway_pb2.PRIORITY_LOW, Priority.NORMAL: gateway_pb2.PRIORITY_NORMAL,
                      Priority.HIGH: gateway_pb2.PRIORITY_HIGH}
_STAGE_TO_PROTO = {Stage.NONE: gateway_pb2.STAGE_UNSPECIFIED, Stage.TEXT_ENCODER: gateway_pb2.STAGE_TEXT_ENCODER,
                   Stage.DENOISER: gateway_pb2.STAGE_DENOISER, Stage.DECODER: gateway_pb2.STAGE_DECODER}


def params_input(params: generation_pb2.GenerationParams) -> ParamsInput:
    """What a gRPC client sent, for ``validation.validate`` (unset optional fields stay None)."""
    return ParamsInput(
        prompt=params.prompt, negative_prompt=params.negative_prompt, num_frames=params.num_frames,
        height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale if params.HasField("guidance_scale") else None,
        seed=params.seed if params.HasField("seed") else None, fps=params.fps, scheduler=params.scheduler,
        cache=params.cache, preview=params.preview)


def stage_to_proto(stage: Stage) -> int:
    return _STAGE_TO_PROTO[stage]


def priority_from_proto(value: int) -> Priority:
    if value not in _PRIORITY_FROM_PROTO:
        raise InvalidArgument(f"priority {value} is unknown; use PRIORITY_LOW, PRIORITY_NORMAL or PRIORITY_HIGH")
    return _PRIORITY_FROM_PROTO[value]


def priority_to_proto(priority: Priority) -> int:
    return _PRIORITY_TO_PROTO[priority]


def status_to_proto(status: JobStatus) -> int:
    return gateway_pb2.JobStatus.Value("JOB_STATUS_" + status.name)


def status_from_proto(value: int) -> JobStatus | None:
    """None for JOB_STATUS_UNSPECIFIED (= any status)."""
    if value == gateway_pb2.JOB_STATUS_UNSPECIFIED:
        return None
    try:
        return JobStatus[gateway_pb2.JobStatus.Name(value).removeprefix("JOB_STATUS_")]
    except (ValueError, KeyError):
        raise InvalidArgument(f"status {value} is unknown; use one of "
                              f"{', '.join(gateway_pb2.JobStatus.keys()[1:])}") from None


def params_message(params: Params) -> generation_pb2.GenerationParams:
    """Resolved params: every field set, so a client can send them back for the same video."""
    return generation_pb2.GenerationParams(
        prompt=params.prompt, negative_prompt=params.negative_prompt, num_frames=params.num_frames,
        height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale, seed=params.seed, fps=params.fps, scheduler=params.scheduler,
        cache=params.cache, preview=params.preview)


def preview_message(preview: Preview) -> generation_pb2.Preview:
    return generation_pb2.Preview(
        step=preview.step, total_steps=preview.total, png=preview.png, num_frames=preview.num_frames,
        columns=preview.columns, rows=preview.rows, frame_width=preview.frame_width, frame_height=preview.frame_height)


def job_message(view: JobView, preview: bool = True) -> gateway_pb2.Job:
    """The Job message; ``preview=False`` leaves the live preview out (ListJobs: a page of running jobs'
    PNGs could pass a client's 4 MiB message limit; GetJob carries it)."""
    r = view.record
    job = gateway_pb2.Job(
        job_id=r.job_id, status=status_to_proto(r.status), priority=priority_to_proto(r.priority),
        params=params_message(r.params), progress=generation_pb2.StepProgress(step=r.step, total_steps=r.total_steps),
        stage=stage_to_proto(r.stage) if r.status == JobStatus.RUNNING else gateway_pb2.STAGE_UNSPECIFIED,
        queue_position=view.queue_position, queue_length=view.queue_length,
        created_unix_ms=r.created_ms, started_unix_ms=r.started_ms, finished_unix_ms=r.finished_ms,
        cached=r.cached, video_size=r.video_size, mime_type=r.mime_type, expires_unix_ms=r.expires_ms,
        warnings=list(r.warnings), waiting_for=view.waiting_for)
    if preview and view.preview is not None:
        job.preview.CopyFrom(preview_message(view.preview))
    if r.error_code:
        job.error.CopyFrom(gateway_pb2.JobError(code=r.error_code, message=r.error_message))
    return job


def result_message(record: JobRecord, video: bytes) -> gateway_pb2.VideoResult:
    p = record.params
    return gateway_pb2.VideoResult(
        video=video, mime_type=record.mime_type or "video/mp4", seed=p.seed, num_frames=p.num_frames,
        height=p.height, width=p.width, fps=p.fps, num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale, scheduler=p.scheduler, cache=p.cache)


def event_message(job_id: str, update: JobUpdate) -> gateway_pb2.GenerateEvent | None:
    """A GenerateEvent for a queue / stage / progress / preview / warning update; None for the others."""
    if isinstance(update, Queued):
        return gateway_pb2.GenerateEvent(job_id=job_id, queue=gateway_pb2.QueuePosition(
            position=update.position, queue_length=update.length))
    if isinstance(update, StageStarted):
        return gateway_pb2.GenerateEvent(job_id=job_id, stage=gateway_pb2.StageStarted(stage=stage_to_proto(update.stage)))
    if isinstance(update, Progress):
        return gateway_pb2.GenerateEvent(job_id=job_id, progress=generation_pb2.StepProgress(
            step=update.step, total_steps=update.total, timestep=update.timestep))
    if isinstance(update, Preview):
        return gateway_pb2.GenerateEvent(job_id=job_id, preview=preview_message(update))
    if isinstance(update, Warning):
        return gateway_pb2.GenerateEvent(job_id=job_id, warnings=[update.text])
    return None


def error_for(finished: Finished) -> ServiceError:
    """The status a Generate stream ends with when its job did not complete."""
    record = finished.job.record
    code = getattr(grpc.StatusCode, record.error_code, None) if record.error_code else None
    if record.status == JobStatus.CANCELLED:
        code = grpc.StatusCode.CANCELLED
    elif record.status == JobStatus.DELETED:
        code = grpc.StatusCode.NOT_FOUND
    error = ServiceError(record.error_message or f"job {record.job_id} ended {record.status.name}")
    error.code = code or grpc.StatusCode.INTERNAL
    return error
