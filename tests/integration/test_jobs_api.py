"""The gateway's job API over gRPC, in front of real stage servers: SubmitJob / GetJob / ListJobs /
CancelJob / GetVideo, queue positions, priorities, a full queue, the cache, expiry, a restart,
cancellation, deadlines and API keys. Each test gets its own gateway and state dir; the stages are
shared. "Long" jobs (500 steps) are always cancelled before they end."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import av
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.observer import JobObserver
from services.gateway.domain import JobRecord, JobStatus
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage, stop_gateway, wait_for

pytestmark = pytest.mark.slow

LONG = 500           # steps: ~7 s on a 2-core CPU; never run to the end here
SMALL = dict(num_frames=2, height=32, width=32)
S = gateway_pb2


class Client:
    """A GatewayStub with the small helpers these tests repeat."""

    def __init__(self, stage: RunningStage, key: str | None = None) -> None:
        self.channel = stage.channel()
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.metadata = [("authorization", f"Bearer {key}")] if key else None

    def submit(self, steps: int = 2, seed: int | None = None, priority: int = S.PRIORITY_UNSPECIFIED,
               timeout_seconds: float = 0.0, prompt: str = "a red ball") -> gateway_pb2.Job:
        params = generation_pb2.GenerationParams(prompt=prompt, num_inference_steps=steps, **SMALL)
        if seed is not None:
            params.seed = seed
        return self.stub.SubmitJob(S.SubmitJobRequest(params=params, priority=priority,
                                                      timeout_seconds=timeout_seconds),
                                   metadata=self.metadata, timeout=30)

    def get(self, job_id: str) -> gateway_pb2.Job:
        return self.stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=30)

    def cancel(self, job_id: str) -> gateway_pb2.Job:
        return self.stub.CancelJob(S.CancelJobRequest(job_id=job_id), metadata=self.metadata, timeout=30)

    def list(self, **fields: Any) -> gateway_pb2.ListJobsResponse:
        return self.stub.ListJobs(S.ListJobsRequest(**fields), metadata=self.metadata, timeout=30)

    def video(self, job_id: str, offset: int = 0) -> list[gateway_pb2.VideoChunk]:
        return list(self.stub.GetVideo(S.GetVideoRequest(job_id=job_id, offset=offset), metadata=self.metadata,
                                       timeout=30))

    def generate(self, steps: int = 2, seed: int | None = None, timeout: float | None = 60,
                 priority: int = S.PRIORITY_UNSPECIFIED) -> Any:
        params = generation_pb2.GenerationParams(prompt="a red ball", num_inference_steps=steps, **SMALL)
        if seed is not None:
            params.seed = seed
        return self.stub.Generate(S.GenerateRequest(params=params, priority=priority), metadata=self.metadata,
                                  timeout=timeout)

    def wait(self, job_id: str, *statuses: int, timeout: float = 60.0) -> gateway_pb2.Job:
        names = "/".join(S.JobStatus.Name(s) for s in statuses)
        return wait_for(lambda: (job := self.get(job_id)).status in statuses and job, timeout,
                        f"job {job_id} to be {names}")

    def wait_running(self, job_id: str, min_step: int = 1) -> gateway_pb2.Job:
        return wait_for(lambda: (job := self.get(job_id)).status == S.JOB_STATUS_RUNNING
                        and job.progress.step >= min_step and job, 60, f"job {job_id} to run step {min_step}")


class Finishes(JobObserver):
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, JobStatus]] = []

    def job_finished(self, job: JobRecord, outcome: JobStatus, seconds: float) -> None:
        self.outcomes.append((job.job_id, outcome))


@pytest.fixture
def make_gateway(gateway_factory: Callable[..., RunningStage], tmp_path: Path) -> Callable[..., RunningStage]:
    def make(**overrides: Any) -> RunningStage:
        overrides.setdefault("state_dir", str(tmp_path / "state"))   # restart tests reuse one state dir
        overrides.setdefault("max_steps", LONG)
        return gateway_factory(**overrides)
    return make


def decode_frames(data: bytes) -> list[tuple[int, int]]:
    with av.open(io.BytesIO(data)) as container:
        return [(frame.width, frame.height) for frame in container.decode(video=0)]


def test_submit_get_list_and_fetch_the_video(make_gateway) -> None:
    client = Client(make_gateway())
    job = client.submit(steps=3, seed=11, priority=S.PRIORITY_HIGH)
    assert len(job.job_id) == 32 and job.status in (S.JOB_STATUS_QUEUED, S.JOB_STATUS_RUNNING)
    assert job.priority == S.PRIORITY_HIGH and job.created_unix_ms > 0
    p = job.params                                         # resolved: every default filled in
    assert (p.seed, p.guidance_scale, p.scheduler, p.fps, p.num_frames, p.num_inference_steps) == (
        11, 9.0, "ddim", 8, 2, 3)

    done = client.wait(job.job_id, S.JOB_STATUS_COMPLETED)
    assert (done.progress.step, done.progress.total_steps) == (3, 3)
    assert done.video_size > 0 and done.mime_type == "video/mp4" and not done.cached
    assert done.created_unix_ms <= done.started_unix_ms <= done.finished_unix_ms < done.expires_unix_ms
    assert done.queue_position == 0 and not done.HasField("error")

    listed = client.list()
    assert [j.job_id for j in listed.jobs] == [job.job_id] and listed.next_page_token == ""
    assert [j.job_id for j in client.list(status=S.JOB_STATUS_COMPLETED).jobs] == [job.job_id]
    assert list(client.list(status=S.JOB_STATUS_QUEUED).jobs) == []

    chunks = client.video(job.job_id)
    data = b"".join(c.data for c in chunks)
    assert len(data) == done.video_size
    assert all(c.total_size == done.video_size and c.mime_type == "video/mp4" for c in chunks)
    assert [c.offset for c in chunks] == [sum(len(x.data) for x in chunks[:i]) for i in range(len(chunks))]
    assert decode_frames(data) == [(32, 32), (32, 32)]
    tail = client.video(job.job_id, offset=100)
    assert b"".join(c.data for c in tail) == data[100:] and tail[0].offset == 100


def test_ids_that_are_unknown_or_malformed(make_gateway) -> None:
    client = Client(make_gateway())
    for call in (client.get, client.cancel, client.video):
        with pytest.raises(grpc.RpcError) as info:
            call(uuid.uuid4().hex)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            call("../../etc/passwd")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.list(page_token="not-a-token")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.submit(steps=2, priority=9)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in info.value.details()


def test_a_waiting_generate_streams_its_queue_position(make_gateway) -> None:
    client = Client(make_gateway(slots=1))
    long = client.submit(steps=LONG)
    client.wait_running(long.job_id)
    call = client.generate(steps=2)
    first = next(call)
    assert first.WhichOneof("event") == "queue"
    assert (first.queue.position, first.queue.queue_length) == (1, 1)
    waiting = client.get(first.job_id)
    assert (waiting.status, waiting.queue_position, waiting.queue_length) == (S.JOB_STATUS_QUEUED, 1, 1)
    high = client.submit(steps=2, priority=S.PRIORITY_HIGH)        # goes ahead: our place becomes 2
    moved = next(call)
    assert (moved.queue.position, moved.queue.queue_length) == (2, 2)
    assert client.get(high.job_id).queue_position == 1

    client.cancel(long.job_id)
    rest = list(call)
    kinds = [e.WhichOneof("event") for e in rest]
    assert kinds[-1] == "result" and "stage" in kinds and "progress" in kinds
    assert "queue" not in kinds[kinds.index("stage"):]
    assert decode_frames(rest[-1].result.video) == [(32, 32), (32, 32)]


def test_a_high_priority_job_overtakes_normal_jobs_queued_earlier(make_gateway) -> None:
    client = Client(make_gateway(slots=1))
    low = client.submit(steps=LONG, priority=S.PRIORITY_LOW)
    client.wait_running(low.job_id)
    normals = [client.submit(steps=1).job_id for _ in range(3)]
    high = client.submit(steps=1, priority=S.PRIORITY_HIGH).job_id
    assert [client.get(j).queue_position for j in [high, *normals]] == [1, 2, 3, 4]
    client.cancel(low.job_id)
    done = [client.wait(j, S.JOB_STATUS_COMPLETED) for j in [high, *normals]]
    started = sorted(done, key=lambda j: (j.started_unix_ms, j.finished_unix_ms))
    assert [j.job_id for j in started] == [high, *normals]
    assert all(a.finished_unix_ms <= b.started_unix_ms for a, b in zip(started, started[1:]))   # one slot


def test_a_full_queue_says_when_to_retry(make_gateway) -> None:
    client = Client(make_gateway(slots=1, max_queue=1))
    long = client.submit(steps=LONG)
    client.wait_running(long.job_id)
    queued = client.submit(steps=1)
    for attempt in (lambda: client.submit(steps=1), lambda: list(client.generate(steps=1))):
        with pytest.raises(grpc.RpcError) as info:
            attempt()
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry_after = dict(error.trailing_metadata())["retry-after"]
        assert int(retry_after) >= 1
        assert "queue is full" in error.details() and f"retry in about {retry_after} s" in error.details()
    assert len(client.list().jobs) == 2                     # refused jobs leave no row
    client.cancel(long.job_id)
    client.wait(queued.job_id, S.JOB_STATUS_COMPLETED)


def test_the_same_explicit_seed_and_params_complete_at_once_from_the_cache(make_gateway, denoiser_stage) -> None:
    client = Client(make_gateway())
    first = client.wait(client.submit(steps=3, seed=21).job_id, S.JOB_STATUS_COMPLETED)
    steps_before = denoiser_stage.servicer.engine.stats.steps

    again = client.submit(steps=3, seed=21)
    assert again.status == S.JOB_STATUS_COMPLETED and again.cached and again.job_id != first.job_id
    assert again.video_size == first.video_size and again.params.seed == 21
    original = b"".join(c.data for c in client.video(first.job_id))
    assert b"".join(c.data for c in client.video(again.job_id)) == original
    events = list(client.generate(steps=3, seed=21))
    assert [e.WhichOneof("event") for e in events] == ["result"] and events[0].result.video == original
    assert denoiser_stage.servicer.engine.stats.steps == steps_before      # nothing ran

    unseeded = [client.submit(steps=3) for _ in range(2)]                  # random seeds: never cached
    other_seed = client.submit(steps=3, seed=22)
    for job in [*unseeded, other_seed]:
        assert not client.wait(job.job_id, S.JOB_STATUS_COMPLETED).cached


def test_an_expired_video_is_not_found_and_says_it_expired(make_gateway) -> None:
    gateway = make_gateway(result_ttl_hours=0.5 / 3600, cleanup_interval_seconds=3600)   # a 0.5 s TTL
    client = Client(gateway)
    job = client.wait(client.submit(steps=1, seed=5).job_id, S.JOB_STATUS_COMPLETED, S.JOB_STATUS_EXPIRED)
    wait_for(lambda: gateway.servicer.jobs.cleanup_expired() == 1, 10, "the cleanup to expire the video")
    expired = client.get(job.job_id)
    assert expired.status == S.JOB_STATUS_EXPIRED and expired.expires_unix_ms <= int(time.time() * 1000)
    with pytest.raises(grpc.RpcError) as info:
        client.video(job.job_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in info.value.details() and "submit the job again" in info.value.details()
    assert not client.submit(steps=1, seed=5).cached                      # an expired result is no cache


def test_a_restart_runs_the_queued_and_the_interrupted_job_once_each(make_gateway, denoiser_stage,
                                                                       tmp_path) -> None:
    first_finishes, second_finishes = Finishes(), Finishes()
    first = make_gateway(slots=1, observer=first_finishes)
    client = Client(first)
    running = client.submit(steps=60, seed=1)
    client.wait_running(running.job_id)
    queued = client.submit(steps=2, seed=2)
    assert client.get(queued.job_id).status == S.JOB_STATUS_QUEUED
    stop_gateway(first)
    wait_for(lambda: denoiser_stage.servicer.engine.active_jobs() == 0, 30, "the interrupted run to be dropped")
    assert first_finishes.outcomes == []

    second = make_gateway(slots=1, observer=second_finishes)
    client = Client(second)
    for job in (running, queued):
        done = client.wait(job.job_id, S.JOB_STATUS_COMPLETED)
        assert done.params.seed == job.params.seed and done.video_size > 0
    assert sorted(second_finishes.outcomes) == sorted([(running.job_id, JobStatus.COMPLETED),
                                                       (queued.job_id, JobStatus.COMPLETED)])
    assert len(client.list().jobs) == 2
    assert sorted(p.stem for p in (tmp_path / "state" / "results").glob("*.mp4")) == sorted(
        [running.job_id, queued.job_id])


def test_cancel_stops_a_running_job_in_the_denoiser_and_frees_its_slot(make_gateway, denoiser_stage) -> None:
    engine = denoiser_stage.servicer.engine
    client = Client(make_gateway(slots=1))
    steps_before = engine.stats.steps
    long = client.submit(steps=LONG)
    client.wait_running(long.job_id, min_step=2)
    next_job = client.submit(steps=2)
    assert client.get(next_job.job_id).status == S.JOB_STATUS_QUEUED

    cancelled = client.cancel(long.job_id)
    assert cancelled.status == S.JOB_STATUS_CANCELLED and cancelled.error.code == "CANCELLED"
    client.wait(next_job.job_id, S.JOB_STATUS_COMPLETED)            # the slot went to the next job
    wait_for(lambda: engine.active_jobs() == 0, 30, "the cancelled request to leave the denoiser")
    assert engine.stats.steps - steps_before < LONG
    final = client.get(long.job_id)
    assert final.status == S.JOB_STATUS_CANCELLED and final.progress.step < LONG
    with pytest.raises(grpc.RpcError) as info:
        client.video(long.job_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_generate_client_that_goes_away_cancels_its_job(make_gateway, denoiser_stage) -> None:
    client = Client(make_gateway(slots=1))
    call = client.generate(steps=LONG)
    job_id = next(e.job_id for e in call if e.HasField("progress") and e.progress.step >= 2)
    call.cancel()
    job = client.wait(job_id, S.JOB_STATUS_CANCELLED)
    assert "went away" in job.error.message
    wait_for(lambda: denoiser_stage.servicer.engine.active_jobs() == 0, 30, "the request to leave the denoiser")


def test_a_deadline_covers_queue_time(make_gateway) -> None:
    gateway = make_gateway(slots=1)
    client = Client(gateway)
    long = client.submit(steps=LONG)
    client.wait_running(long.job_id)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate(steps=1, timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 5
    waited = [j for j in client.list().jobs if j.job_id != long.job_id]
    assert len(waited) == 1
    job = client.wait(waited[0].job_id, S.JOB_STATUS_FAILED)
    assert job.error.code == "DEADLINE_EXCEEDED" and job.started_unix_ms == 0

    submitted = client.submit(steps=1, timeout_seconds=1.0)
    job = client.wait(submitted.job_id, S.JOB_STATUS_FAILED)
    assert job.error.code == "DEADLINE_EXCEEDED" and "still queued" in job.error.message
    assert job.started_unix_ms == 0 and 900 <= job.finished_unix_ms - job.created_unix_ms < 5000
    assert list(client.list(status=S.JOB_STATUS_QUEUED).jobs) == [] and gateway.servicer.jobs.queue_length() == 0
    assert client.get(long.job_id).status == S.JOB_STATUS_RUNNING        # the running job was not disturbed
    client.cancel(long.job_id)


def test_api_keys_are_required_when_configured(make_gateway, tmp_path, monkeypatch) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# who: the web team\nkey-from-file\n\n")
    monkeypatch.setenv("T2V_API_KEYS", "key-from-env, second-env-key")
    gateway = make_gateway()

    for key, words in [(None, "needs an API key"), ("wrong", "not valid")]:
        client = Client(gateway, key)
        for call in (lambda: client.list(), lambda: client.get(uuid.uuid4().hex), lambda: list(client.generate())):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in info.value.details()

    assert list(Client(gateway, "key-from-env").list().jobs) == []
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    assert list(stub.ListJobs(S.ListJobsRequest(), metadata=[("x-api-key", "second-env-key")]).jobs) == []
    with gateway.channel() as channel:                                     # probes need no key
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    monkeypatch.delenv("T2V_API_KEYS")
    filed = make_gateway(api_keys_file=str(keys), state_dir=str(tmp_path / "other"))
    assert list(Client(filed, "key-from-file").list().jobs) == []
    with pytest.raises(grpc.RpcError) as info:
        Client(filed, "key-from-env").list()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
