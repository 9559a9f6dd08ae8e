"""Jobs belong to the API key that made them (issue 16, defect 2), over gRPC and HTTP, on a real gateway.

Before: with keys alice and bob, bob listed alice's jobs and prompts, fetched her video, cancelled her
running job and learned her parameters from a cache hit. Now another key's job is NOT_FOUND / 404 with
the very sentence of an id that does not exist, lists hold one's own jobs, the cache is per key, and an
admin key sees and cancels every job."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest

from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage, http_call, wait_for

pytestmark = pytest.mark.slow

S = gateway_pb2
SMALL = dict(num_frames=2, height=32, width=32)
ALICE, BOB, ADMIN = "alice-key-0001", "bob-key-0002", "admin-key-0003"


@pytest.fixture
def gateway(gateway_factory: Callable[..., RunningStage], tmp_path: Path) -> RunningStage:
    keys, admins = tmp_path / "keys", tmp_path / "admin-keys"
    keys.write_text(f"{ALICE}\n{BOB}\n")
    admins.write_text(f"{ADMIN}\n")
    return gateway_factory(api_keys_file=str(keys), admin_keys_file=str(admins), http_port=0, max_steps=500)


class As:
    """One key's gRPC calls."""

    def __init__(self, gateway: RunningStage, key: str) -> None:
        self.stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
        self.metadata = [("authorization", f"Bearer {key}")]

    def submit(self, steps: int = 2, seed: int | None = None, prompt: str = "alice's secret prompt") -> Any:
        params = generation_pb2.GenerationParams(prompt=prompt, num_inference_steps=steps, **SMALL)
        if seed is not None:
            params.seed = seed
        return self.stub.SubmitJob(S.SubmitJobRequest(params=params), metadata=self.metadata, timeout=30)

    def get(self, job_id: str) -> Any:
        return self.stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=30)

    def ids(self) -> set[str]:
        answer = self.stub.ListJobs(S.ListJobsRequest(page_size=1000), metadata=self.metadata, timeout=30)
        return {job.job_id for job in answer.jobs}

    def cancel(self, job_id: str) -> Any:
        return self.stub.CancelJob(S.CancelJobRequest(job_id=job_id), metadata=self.metadata, timeout=30)

    def video(self, job_id: str) -> bytes:
        chunks = self.stub.GetVideo(S.GetVideoRequest(job_id=job_id), metadata=self.metadata, timeout=30)
        return b"".join(chunk.data for chunk in chunks)

    def wait_done(self, job_id: str) -> Any:
        return wait_for(lambda: (job := self.get(job_id)).status == S.JOB_STATUS_COMPLETED and job, 60,
                        f"job {job_id} to complete")


def refused_like_a_stranger(call: Callable[[], Any], job_id: str, stranger_details: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
    assert refused.value.details() == stranger_details.replace("{id}", job_id)


def http(gateway: RunningStage, key: str, method: str, path: str) -> tuple[int, bytes]:
    return http_call(gateway.http_url + path, method, headers={"Authorization": f"Bearer {key}"})


def test_another_keys_jobs_are_invisible_over_grpc_and_the_admin_sees_all(gateway: RunningStage) -> None:
    alice, bob, admin = As(gateway, ALICE), As(gateway, BOB), As(gateway, ADMIN)
    done = alice.wait_done(alice.submit(seed=7).job_id)
    running = alice.submit(steps=500).job_id            # long: cancelled by the admin at the end
    bobs = bob.submit(prompt="bob's own").job_id

    unknown = uuid.uuid4().hex                          # what an id nobody made answers, word for word
    with pytest.raises(grpc.RpcError) as stranger:
        bob.get(unknown)
    sentence = stranger.value.details().replace(unknown, "{id}")
    for job_id in (done.job_id, running):
        refused_like_a_stranger(lambda: bob.get(job_id), job_id, sentence)
        refused_like_a_stranger(lambda: bob.cancel(job_id), job_id, sentence)
    with pytest.raises(grpc.RpcError) as no_video:
        bob.video(done.job_id)
    assert no_video.value.code() == grpc.StatusCode.NOT_FOUND
    assert alice.get(running).status in (S.JOB_STATUS_QUEUED, S.JOB_STATUS_RUNNING)   # bob's cancel did nothing

    assert bobs in bob.ids() and not bob.ids() & {done.job_id, running}
    assert {done.job_id, running} <= alice.ids() and bobs not in alice.ids()
    assert {done.job_id, running, bobs} <= admin.ids()

    # the same explicit seed and parameters: bob's own run, not a copy of alice's video
    same = bob.submit(seed=7)
    assert not same.cached
    assert alice.submit(seed=7).cached                  # alice's own cache still answers her

    assert admin.get(done.job_id).params.prompt == "alice's secret prompt"
    assert admin.video(done.job_id) == alice.video(done.job_id)
    assert admin.cancel(running).status == S.JOB_STATUS_CANCELLED


def test_another_keys_videos_are_404_over_http(gateway: RunningStage) -> None:
    alice = As(gateway, ALICE)
    job_id = alice.wait_done(alice.submit().job_id).job_id
    status, body = http(gateway, BOB, "GET", f"/v1/videos/{uuid.uuid4().hex}")
    assert status == 404
    for method, path in [("GET", f"/v1/videos/{job_id}"), ("GET", f"/v1/videos/{job_id}/content"),
                         ("GET", f"/v1/videos/{job_id}/events"), ("DELETE", f"/v1/videos/{job_id}"),
                         ("GET", f"/v1/videos?after={job_id}")]:
        status, body = http(gateway, BOB, method, path)
        assert status == 404, (method, path, body)
        assert job_id in json.loads(body)["error"]["message"] and "does not exist" in body.decode()
    status, body = http(gateway, BOB, "GET", "/v1/videos?limit=100")
    assert status == 200 and job_id not in body.decode()
    for key in (ALICE, ADMIN):
        status, body = http(gateway, key, "GET", f"/v1/videos/{job_id}/content")
        assert status == 200 and body[4:8] == b"ftyp"
        status, body = http(gateway, key, "GET", "/v1/videos?limit=100")
        assert status == 200 and job_id in body.decode()
