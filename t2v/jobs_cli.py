"""``t2v jobs``: follow the gateway's jobs from a terminal (list, show, cancel, delete, download).

Why a command: a backend that submits jobs over HTTP or SubmitJob needs an operator-side view of
the same queue without writing code; this is a thin client of the gateway's job RPCs. Times are shown
as ISO 8601 with seconds and the local UTC offset (``--utc``: UTC), with durations beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from t2v.client import (DEFAULT_GATEWAY, GenerateError, add_gateway_arg, add_tls_args, auth_metadata, duration,
                        explain, gateway_channel, tls_from_args)
from t2v.v1 import gateway_pb2, gateway_pb2_grpc

STATUSES = {name.removeprefix("JOB_STATUS_").lower(): value for name, value in gateway_pb2.JobStatus.items()
            if value != gateway_pb2.JOB_STATUS_UNSPECIFIED}


def _status(job: gateway_pb2.Job) -> str:
    return gateway_pb2.JobStatus.Name(job.status).removeprefix("JOB_STATUS_").lower()


def describe(job: gateway_pb2.Job, now: float | None = None) -> str:
    """One line: id, status, progress or queue position, age, prompt."""
    if job.status == gateway_pb2.JOB_STATUS_QUEUED:
        where = f"queue {job.queue_position}/{job.queue_length}"
    elif job.progress.total_steps:
        where = f"step {job.progress.step}/{job.progress.total_steps}"
    else:
        where = ""
    age = duration((time.time() if now is None else now) - job.created_unix_ms / 1000)
    prompt = job.params.prompt if len(job.params.prompt) <= 48 else job.params.prompt[:47] + "…"
    line = f"{job.job_id}  {_status(job):<10} {where:<14} {age + ' ago':>14}  {prompt}"
    if job.error.message:
        line += f"  ({job.error.code}: {job.error.message})"
    return line


def timestamp(unix_ms: int, utc: bool = False) -> str:
    """ISO 8601 with seconds: local time with its UTC offset (2026-12-01T11:39:48+01:00), or UTC (...Z)."""
    moment = datetime.fromtimestamp(unix_ms / 1000, timezone.utc)
    if utc:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.astimezone().isoformat(timespec="seconds")


def details(job: gateway_pb2.Job, now: float | None = None, utc: bool = False) -> str:
    """Every field of a job, one per line, for a person: times as ISO 8601 with the durations between them."""
    now = time.time() if now is None else now
    p = job.params
    rows = [("job", job.job_id), ("status", _status(job)),
            ("priority", gateway_pb2.Priority.Name(job.priority).removeprefix("PRIORITY_").lower()),
            ("prompt", p.prompt)]
    if p.negative_prompt:
        rows.append(("negative", p.negative_prompt))
    rows.append(("params", f"{p.num_frames} frames, {p.width}x{p.height}, {p.num_inference_steps} steps, guidance "
                           f"{p.guidance_scale:g}, seed {p.seed}, {p.fps} fps, scheduler {p.scheduler or 'default'}"))
    if job.status == gateway_pb2.JOB_STATUS_QUEUED:
        rows.append(("queue", f"position {job.queue_position} of {job.queue_length}"))
    if job.progress.total_steps:
        stage = gateway_pb2.Stage.Name(job.stage).removeprefix("STAGE_").lower()
        rows.append(("progress", f"step {job.progress.step}/{job.progress.total_steps}"
                                 + (f", in the {stage}" if job.status == gateway_pb2.JOB_STATUS_RUNNING
                                    and job.stage else "")))
    if job.waiting_for:
        rows.append(("waiting", job.waiting_for))
    created, started, finished = job.created_unix_ms, job.started_unix_ms, job.finished_unix_ms
    rows.append(("created", f"{timestamp(created, utc)}  ({duration(now - created / 1000)} ago)"))
    if started:
        rows.append(("started", f"{timestamp(started, utc)}  (after {duration((started - created) / 1000)} "
                                "in the queue)"))
    if finished:
        ran = f"ran {duration((finished - started) / 1000)}, " if started else ""
        rows.append(("finished", f"{timestamp(finished, utc)}  ({ran}{duration((finished - created) / 1000)} "
                                 "in all)"))
    elif started:
        rows.append(("running", f"for {duration(now - started / 1000)}"))
    if job.expires_unix_ms:
        left = job.expires_unix_ms / 1000 - now
        rows.append(("expires" if left > 0 else "expired",
                     f"{timestamp(job.expires_unix_ms, utc)}  ("
                     + (f"in {duration(left)})" if left > 0 else f"{duration(-left)} ago)")))
    if job.video_size:
        rows.append(("video", f"{job.video_size:,} bytes, {job.mime_type or 'video/mp4'}"
                              + (", from the cache" if job.cached else "")))
    if job.error.message:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    rows += [("warning", warning) for warning in job.warnings]
    return "\n".join(f"{name:<9} {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    metadata = auth_metadata(args.api_key or os.environ.get("T2V_API_KEY"))
    try:
        tls = tls_from_args(args)
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with gateway_channel(args.gateway, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            if args.action == "list":
                response = stub.ListJobs(gateway_pb2.ListJobsRequest(
                    status=STATUSES.get(args.status, 0), page_size=args.limit), timeout=30, metadata=metadata)
                for job in response.jobs:
                    print(describe(job))
                if not response.jobs:
                    print("no jobs", file=sys.stderr)
            elif args.action == "show":
                job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=args.job_id), timeout=30, metadata=metadata)
                print(job if args.raw else details(job, utc=args.utc), end="" if args.raw else "\n")
            elif args.action == "cancel":
                print(describe(stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=args.job_id), timeout=30,
                                              metadata=metadata)))
            elif args.action == "delete":
                deleted = stub.DeleteJob(gateway_pb2.DeleteJobRequest(job_id=args.job_id), timeout=30,
                                         metadata=metadata)
                print(f"{deleted.job_id}  deleted")
            else:  # download
                chunks = stub.GetVideo(gateway_pb2.GetVideoRequest(job_id=args.job_id), timeout=300,
                                       metadata=metadata)
                data = b"".join(chunk.data for chunk in chunks)
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_bytes(data)
                print(args.output.resolve())
        except grpc.RpcError as error:
            print(f"error: {explain(args.gateway, error)}", file=sys.stderr)
            return 1
    return 0


def _connection_args(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--gateway, --api-key and TLS: on ``t2v jobs`` and again on each action (``t2v jobs list --gateway H:P``)."""
    add_gateway_arg(parser, suppress)
    parser.add_argument("--api-key", default=argparse.SUPPRESS if suppress else None,
                        help="key for a gateway that requires one [env T2V_API_KEY]")
    add_tls_args(parser, suppress)


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="list, show, cancel, delete or download the gateway's jobs",
                          description="Follow the gateway's jobs: t2v jobs list | show ID | cancel ID | delete ID | "
                                      "download ID. "
                                      "The connection options (--gateway, --api-key, TLS) go before or after the "
                                      f"action; the gateway is $T2V_GATEWAY when set, else {DEFAULT_GATEWAY}.")
    _connection_args(jobs)
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="newest first")
    listing.add_argument("--status", choices=sorted(STATUSES), default=None, help="only jobs in this status")
    listing.add_argument("--limit", type=int, default=20, help="how many (at most 1000)")
    show = actions.add_parser("show", help="every field of one job, times in ISO 8601 with durations")
    show.add_argument("job_id", help="the job's id (32 hex characters)")
    show.add_argument("--utc", action="store_true", help="times in UTC (default: local time with its UTC offset)")
    show.add_argument("--raw", action="store_true", help="the Job message as protobuf text (Unix milliseconds)")
    cancel = actions.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", help="the job's id (32 hex characters)")
    delete = actions.add_parser("delete", help="delete a job and its video (a queued or running one is cancelled "
                                               "first); its id answers NOT_FOUND afterwards")
    delete.add_argument("job_id", help="the job's id (32 hex characters)")
    download = actions.add_parser("download", help="write a completed job's MP4")
    download.add_argument("job_id", help="the job's id")
    download.add_argument("-o", "--output", type=Path, default=Path("out/video.mp4"), help="where to write it")
    for action in (listing, show, cancel, delete, download):
        _connection_args(action, suppress=True)
    jobs.set_defaults(func=run)
