"""Gateway gRPC servicer: the public front door over gRPC. It translates between protobuf and the job
system's plain values, and decides nothing.

Every request is a job (``jobs.JobService``). Generate is SubmitJob + watching the job, streamed;
SubmitJob / GetJob / ListJobs / CancelJob / DeleteJob / GetVideo expose the same jobs one call at a time. The
rules live in jobs.py, queue.py, store/ and validation.py; ``app.Gateway`` builds this servicer and its
sibling, the HTTP API (http.py), over one job system.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

import grpc

from services.common.auth import presented_key
from services.common.errors import Unavailable, grpc_errors
from services.gateway import messages
from services.gateway.domain import Finished, Interrupted, JobRequest, JobStatus, Limits, QueueFull
from services.gateway.jobs import JobService
from services.gateway.tenancy import Caller, Tenancy
from services.gateway.validation import validate
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

SERVICE_NAME = "t2v.v1.Gateway"
# The end of the sentence of a stream refused by --max-streams (services/common/server.py, StreamLimit).
STREAMS_HINT = "; or submit with SubmitJob and poll GetJob, which hold no stream"


def _deadline_seconds(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the call's deadline; None when the client set none (gRPC then reports years)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 24 * 3600:
        return None
    return max(remaining, 0.001)


def _retry_after(context: grpc.ServicerContext, error: QueueFull) -> None:
    """A full queue: tell the client when to come back, in the trailing metadata too."""
    context.set_trailing_metadata((("retry-after", str(error.retry_after_seconds)),))


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """``jobs`` gives the job system (raising Unavailable while it loads or drains); ``draining`` is set
    once the server stops taking work; ``tenancy`` says whose jobs a call's key sees (the API-key
    interceptor has checked the key already)."""

    def __init__(self, jobs: Callable[[], JobService], limits: Limits, draining: threading.Event,
                 tenancy: Tenancy | None = None) -> None:
        self._jobs = jobs
        self.limits = limits
        self.draining = draining
        self.tenancy = tenancy or Tenancy()

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        return self.tenancy.caller(presented_key(context.invocation_metadata()))

    def _job_request(self, params: generation_pb2.GenerationParams, priority: int,
                     timeout: float | None, context: grpc.ServicerContext) -> JobRequest:
        return JobRequest(validate(messages.params_input(params), self.limits),
                          messages.priority_from_proto(priority), seed_given=params.HasField("seed"),
                          timeout_seconds=timeout, tenant=self._caller(context).tenant)

    @grpc_errors
    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[gateway_pb2.GenerateEvent]:
        jobs = self._jobs()
        job_request = self._job_request(request.params, request.priority, _deadline_seconds(context), context)
        try:
            watch = jobs.submit_and_watch(job_request)
        except QueueFull as error:
            _retry_after(context, error)
            raise
        job_id = watch.job_id

        def client_gone() -> None:
            if not self.draining.is_set():     # a stopping server keeps the job for its successor
                jobs.abandon(job_id)
        if not context.add_callback(client_gone):
            client_gone()
        with watch:
            for update in watch:
                if isinstance(update, Finished):
                    if update.job.status != JobStatus.COMPLETED:
                        raise messages.error_for(update)
                    with jobs.open_video(job_id) as video:
                        data = video.read()
                    record = update.job.record
                    # A cached job never ran here: its warnings (e.g. truncation) come with the result.
                    yield gateway_pb2.GenerateEvent(job_id=job_id, result=messages.result_message(record, data),
                                                    warnings=list(record.warnings) if record.cached else [])
                elif isinstance(update, Interrupted):
                    raise Unavailable(update.message)
                else:
                    message = messages.event_message(job_id, update)
                    if message is not None:
                        yield message

    @grpc_errors
    def SubmitJob(self, request: gateway_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> gateway_pb2.Job:
        jobs = self._jobs()
        job_request = self._job_request(request.params, request.priority, request.timeout_seconds or None, context)
        try:
            return messages.job_message(jobs.submit(job_request))
        except QueueFull as error:
            _retry_after(context, error)
            raise

    @grpc_errors
    def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> gateway_pb2.Job:
        return messages.job_message(self._jobs().get(request.job_id, self._caller(context)))

    @grpc_errors
    def ListJobs(self, request: gateway_pb2.ListJobsRequest, context: grpc.ServicerContext
                 ) -> gateway_pb2.ListJobsResponse:
        views, token = self._jobs().list(messages.status_from_proto(request.status), request.page_size,
                                         request.page_token, self._caller(context))
        return gateway_pb2.ListJobsResponse(jobs=[messages.job_message(v, preview=False) for v in views], next_page_token=token)

    @grpc_errors
    def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.ServicerContext) -> gateway_pb2.Job:
        return messages.job_message(self._jobs().cancel(request.job_id, caller=self._caller(context)))

    @grpc_errors
    def DeleteJob(self, request: gateway_pb2.DeleteJobRequest, context: grpc.ServicerContext
                  ) -> gateway_pb2.DeleteJobResponse:
        record = self._jobs().delete(request.job_id, self._caller(context))
        return gateway_pb2.DeleteJobResponse(job_id=record.job_id, deleted=True)

    @grpc_errors
    def GetVideo(self, request: gateway_pb2.GetVideoRequest, context: grpc.ServicerContext
                 ) -> Iterator[gateway_pb2.VideoChunk]:
        with self._jobs().open_video(request.job_id, self._caller(context)) as video:
            for offset, data in video.chunks(request.offset):
                yield gateway_pb2.VideoChunk(data=data, offset=offset, total_size=video.size,
                                             mime_type=video.mime_type)
