"""A full disk under the gateway's state dir (issue 16, defect 1), on a real 4 MiB tmpfs.

Before the fix: a failed progress write or a failed MP4 save ended the job inside the dispatcher and
nothing ended it (RUNNING forever, the slot taken, SSE keep-alives), and a submission got INTERNAL.
Now every job ends (FAILED with a sentence, RESOURCE_EXHAUSTED) and frees its slot, its followers
hear the end, a submission gets RESOURCE_EXHAUSTED / 507 with a sentence, no temporary file is left,
and once space is freed the gateway works again without a restart.

The tmpfs is mounted for the test (root, or an unprivileged user where the kernel allows mounts in a
user namespace is not enough: the test process itself must see it), so without the right to mount
the tests are skipped and say why."""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import requests

from services.gateway.domain import JobStatus
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage, wait_for

pytestmark = pytest.mark.slow

DISK_BYTES = 4 * 1024 * 1024
SMALL = dict(num_frames=2, height=32, width=32)
S = gateway_pb2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, unmounted after the test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "t2v-test", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Filler:
    """Takes every free byte of a disk, and gives them back."""

    def __init__(self, disk: Path) -> None:
        self.path = disk / f"filler-{uuid.uuid4().hex}"

    def fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 4096, 512, 1):          # down to the last byte
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC, error
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def gateway_on_small_disk(gateway_factory: Callable[..., RunningStage], small_disk: Path
                          ) -> Iterator[tuple[RunningStage, Filler]]:
    filler = Filler(small_disk)
    gateway = gateway_factory(state_dir=str(small_disk / "state"), http_port=0, slots=1)
    yield gateway, filler
    filler.free()


def submit(stub: gateway_pb2_grpc.GatewayStub, steps: int, seed: int | None = None) -> gateway_pb2.Job:
    params = generation_pb2.GenerationParams(prompt="a red ball", num_inference_steps=steps, **SMALL)
    if seed is not None:
        params.seed = seed
    return stub.SubmitJob(S.SubmitJobRequest(params=params), timeout=30)


def leftovers(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.rglob("*.tmp"))


def wait_terminal(stub: gateway_pb2_grpc.GatewayStub, job_id: str, timeout: float = 60) -> gateway_pb2.Job:
    def ended() -> gateway_pb2.Job | None:
        job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10)
        return job if job.status in (S.JOB_STATUS_COMPLETED, S.JOB_STATUS_FAILED, S.JOB_STATUS_CANCELLED) else None
    return wait_for(ended, timeout, f"job {job_id} to end")


def test_a_submission_on_a_full_disk_is_refused_with_a_sentence(gateway_on_small_disk) -> None:
    gateway, filler = gateway_on_small_disk
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    first = submit(stub, steps=2)                       # the store works before the disk fills
    wait_terminal(stub, first.job_id)
    filler.fill()
    with pytest.raises(grpc.RpcError) as refused:
        submit(stub, steps=2)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "full" in refused.value.details()
    http = f"http://127.0.0.1:{gateway.servicer.http.port}"
    answer = requests.post(f"{http}/v1/videos", json={"prompt": "a red ball", "num_inference_steps": 2, "size": "32x32", "num_frames": 2},
                           timeout=30)
    assert answer.status_code == 507, answer.text
    assert "full" in answer.json()["error"]["message"]
    assert gateway.servicer.jobs.running_count() == 0
    filler.free()                                      # space again: no restart needed
    job = wait_terminal(stub, submit(stub, steps=2).job_id)
    assert job.status == S.JOB_STATUS_COMPLETED, job.error.message


def test_a_disk_that_fills_during_a_run_fails_the_job_frees_its_slot_and_tells_its_followers(
        gateway_on_small_disk, small_disk: Path) -> None:
    gateway, filler = gateway_on_small_disk
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    params = generation_pb2.GenerationParams(prompt="a red ball", num_inference_steps=60, **SMALL)
    stream = stub.Generate(S.GenerateRequest(params=params), timeout=120)
    job_id = ""
    with pytest.raises(grpc.RpcError) as ended:           # its follower hears the end: the stream fails
        for event in stream:                             # once it runs, take the disk's last byte
            job_id = job_id or event.job_id
            if event.HasField("progress") and event.progress.step == 2:
                filler.fill()
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
    assert "full" in ended.value.details()
    job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10)
    assert job.status == S.JOB_STATUS_FAILED and job.error.code == "RESOURCE_EXHAUSTED", job
    wait_for(lambda: gateway.servicer.jobs.running_count() == 0, 10, "the slot to be freed")
    assert leftovers(small_disk) == []
    filler.free()                                       # its end, kept in memory meanwhile, reaches the store
    store = gateway.servicer.jobs.store
    wait_for(lambda: store.get(job_id).status == JobStatus.FAILED, 10, "the job's end to be written")
    job = wait_terminal(stub, submit(stub, steps=2).job_id)
    assert job.status == S.JOB_STATUS_COMPLETED, job.error.message
