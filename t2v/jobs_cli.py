"""``t2v jobs``: follow the gateway's jobs from a terminal (list, show, cancel, download).

Why a command: a backend that submits jobs over HTTP or SubmitJob needs an operator-side view of
the same queue without writing code; this is a thin client of the gateway's job RPCs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc

from t2v.client import GenerateError, add_tls_args, auth_metadata, explain, gateway_channel, tls_from_args
from t2v.v1 import gateway_pb2, gateway_pb2_grpc

STATUSES = {name.removeprefix("JOB_STATUS_").lower(): value for name, value in gateway_pb2.JobStatus.items()
            if value != gateway_pb2.JOB_STATUS_UNSPECIFIED}


def describe(job: gateway_pb2.Job) -> str:
    """One line: id, status, progress or queue position, age, prompt."""
    status = gateway_pb2.JobStatus.Name(job.status).removeprefix("JOB_STATUS_").lower()
    if job.status == gateway_pb2.JOB_STATUS_QUEUED:
        where = f"queue {job.queue_position}/{job.queue_length}"
    elif job.progress.total_steps:
        where = f"step {job.progress.step}/{job.progress.total_steps}"
    else:
        where = ""
    age = max(0.0, time.time() - job.created_unix_ms / 1000)
    prompt = job.params.prompt if len(job.params.prompt) <= 48 else job.params.prompt[:47] + "…"
    line = f"{job.job_id}  {status:<10} {where:<14} {age:7.0f}s ago  {prompt}"
    if job.error.message:
        line += f"  ({job.error.code}: {job.error.message})"
    return line


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
                print(stub.GetJob(gateway_pb2.GetJobRequest(job_id=args.job_id), timeout=30, metadata=metadata))
            elif args.action == "cancel":
                print(describe(stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=args.job_id), timeout=30,
                                              metadata=metadata)))
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="list, show, cancel or download the gateway's jobs",
                          description="Follow the gateway's jobs: t2v jobs list | show ID | cancel ID | download ID")
    jobs.add_argument("--gateway", default="127.0.0.1:50050", help="gateway address")
    jobs.add_argument("--api-key", default=None, help="key for a gateway that requires one [env T2V_API_KEY]")
    add_tls_args(jobs)
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="newest first")
    listing.add_argument("--status", choices=sorted(STATUSES), default=None, help="only jobs in this status")
    listing.add_argument("--limit", type=int, default=20, help="how many (at most 1000)")
    for name, text in (("show", "every field of one job"), ("cancel", "cancel a queued or running job")):
        actions.add_parser(name, help=text).add_argument("job_id", help="the job's id (32 hex characters)")
    download = actions.add_parser("download", help="write a completed job's MP4")
    download.add_argument("job_id", help="the job's id")
    download.add_argument("-o", "--output", type=Path, default=Path("out/video.mp4"), help="where to write it")
    jobs.set_defaults(func=run)
