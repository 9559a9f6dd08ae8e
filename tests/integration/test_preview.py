"""Live previews through a real gateway in front of real stages, over loopback (issue 17): a job that asks for
them gets one every --preview-every steps and after the last, on the Generate stream, as `preview` server-sent
events, in GetJob and at GET /v1/videos/{id}/preview, each a PNG of the frames in a grid at latent resolution;
a job that does not ask gets none, another key's job is a 404 like an id nobody made, and a denoiser whose
model folder has no latent -> RGB map makes the video anyway, with a job warning saying so."""

from __future__ import annotations

import base64
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from PIL import Image

from services.common.config import DEFAULT_MODEL
from services.common.latent_rgb import FILE, UNAVAILABLE
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage, start_denoiser, stop_stage
from tests.integration.test_http_api import Http

pytestmark = pytest.mark.slow

S = gateway_pb2
ALICE, BOB = "alice-preview-key", "bob-preview-key"
EVERY = 2
# 3 frames of 32x32: latents of 4x4 (the embedded model's VAE scale factor is 8), in a grid of 2 x 2 cells.
FRAMES, SIZE, CELL, GRID = 3, 32, 4, (2, 2)
LONG = 500            # steps: never run to the end here


@pytest.fixture
def gateway(gateway_factory: Callable[..., RunningStage], tmp_path: Path) -> RunningStage:
    keys = tmp_path / "keys"
    keys.write_text(f"{ALICE}\n{BOB}\n")
    return gateway_factory(api_keys_file=str(keys), http_port=0, max_steps=LONG, preview_every=EVERY)


def stub(gateway: RunningStage) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(gateway.channel())


def metadata(key: str = ALICE) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def params(steps: int, preview: bool, seed: int | None = None) -> generation_pb2.GenerationParams:
    message = generation_pb2.GenerationParams(prompt="a red circle moving right on a black background",
                                              num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                                              preview=preview)
    if seed is not None:
        message.seed = seed
    return message


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        return image.size


def check_preview(preview: Any, step: int, total: int) -> None:
    """A generation_pb2.Preview of FRAMES frames of CELL x CELL after ``step`` of ``total`` steps."""
    assert (preview.step, preview.total_steps, preview.num_frames) == (step, total, FRAMES)
    assert (preview.columns, preview.rows, preview.frame_width, preview.frame_height) == (*GRID, CELL, CELL)
    assert png_size(preview.png) == (GRID[0] * CELL, GRID[1] * CELL)


def test_a_generate_stream_with_previews_gets_one_every_n_steps_and_after_the_last(gateway: RunningStage) -> None:
    steps = 5
    stream = stub(gateway).Generate(S.GenerateRequest(params=params(steps, True)), metadata=metadata(), timeout=120)
    seen = [(event.WhichOneof("event"), event) for event in stream]
    kinds = [kind for kind, _ in seen]
    assert kinds[-1] == "result" and seen[-1][1].result.num_frames == FRAMES
    previews = [event.preview for kind, event in seen if kind == "preview"]
    assert [p.step for p in previews] == [2, 4, 5]
    for preview in previews:
        check_preview(preview, preview.step, steps)
        before = kinds.index("preview", [i for i, (k, e) in enumerate(seen) if k == "progress"
                                         and e.progress.step == preview.step][0])
        assert seen[before][1].preview.step == preview.step       # each right after its step's progress
    assert len({p.png for p in previews}) == len(previews), "every preview shows the latents of its own step"

    plain = [event.WhichOneof("event") for event in stub(gateway).Generate(
        S.GenerateRequest(params=params(steps, False)), metadata=metadata(), timeout=120)]
    assert "preview" not in plain and plain[-1] == "result" and plain.count("progress") >= 1


def test_sse_getjob_and_the_preview_route_carry_the_latest_and_only_to_its_key(gateway: RunningStage) -> None:
    alice, bob = Http(gateway.http_url, ALICE), Http(gateway.http_url, BOB)
    video = alice.create(steps=LONG, num_frames=FRAMES, size=f"{SIZE}x{SIZE}", preview=True)
    assert video["preview"] is True
    job_id = video["id"]
    try:
        stream = alice.events(job_id)
        got = []
        for name, data in stream:
            if name == "preview":
                got.append(data)
                if len(got) == 3:
                    break
        stream.close()
        assert [d["step"] for d in got] == [2 * (i + 1) + got[0]["step"] - 2 for i in range(3)]
        assert got[0]["step"] % EVERY == 0
        for data in got:
            assert data["id"] == job_id and data["status"] == "in_progress" and data["total_steps"] == LONG
            assert (data["num_frames"], data["columns"], data["rows"]) == (FRAMES, *GRID)
            assert (data["frame_width"], data["frame_height"]) == (CELL, CELL)
            assert data["image"].startswith("data:image/png;base64,")
            assert png_size(base64.b64decode(data["image"].split(",", 1)[1])) == (GRID[0] * CELL, GRID[1] * CELL)

        job = stub(gateway).GetJob(S.GetJobRequest(job_id=job_id), metadata=metadata(), timeout=30)
        assert job.status == S.JOB_STATUS_RUNNING and job.params.preview
        assert job.HasField("preview") and job.preview.step >= got[-1]["step"]
        check_preview(job.preview, job.preview.step, LONG)
        assert job.preview.step % EVERY == 0 and job.progress.step >= job.preview.step
        # a ListJobs page carries no PNGs (GetJob does): many running jobs' previews could pass 4 MiB
        listed = stub(gateway).ListJobs(S.ListJobsRequest(), metadata=metadata(), timeout=30).jobs
        assert [j.job_id for j in listed if j.job_id == job_id] == [job_id]
        assert not any(j.HasField("preview") for j in listed)

        answer = alice.call("GET", f"/v1/videos/{job_id}/preview")
        assert answer.status == 200 and answer.headers["Content-Type"] == "image/png", answer.body[:300]
        assert png_size(answer.body) == (GRID[0] * CELL, GRID[1] * CELL)
        step = int(answer.headers["X-Preview-Step"])
        assert step >= job.preview.step and step % EVERY == 0 and answer.headers["X-Preview-Total-Steps"] == str(LONG)
        assert answer.headers["Cache-Control"] == "no-store"

        # bob: the very answer of an id nobody made, over HTTP and gRPC
        stranger = bob.call("GET", f"/v1/videos/{job_id}/preview")
        nobody = bob.call("GET", f"/v1/videos/{(unknown := uuid.uuid4().hex)}/preview")
        assert stranger.status == nobody.status == 404
        assert stranger.error["message"].replace(job_id, "ID") == nobody.error["message"].replace(unknown, "ID")
        with pytest.raises(grpc.RpcError) as refused:
            stub(gateway).GetJob(S.GetJobRequest(job_id=job_id), metadata=metadata(BOB), timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert Http(gateway.http_url).call("GET", f"/v1/videos/{job_id}/preview").status == 401   # no key
    finally:
        alice.call("POST", f"/v1/videos/{job_id}/cancel")
    alice.wait(job_id, "cancelled")
    gone = alice.call("GET", f"/v1/videos/{job_id}/preview")
    assert gone.status == 404 and "only while a video is made" in gone.error["message"]
    assert not stub(gateway).GetJob(S.GetJobRequest(job_id=job_id), metadata=metadata(), timeout=30).HasField("preview")


def test_a_job_without_previews_gets_none_and_shares_the_cache_with_one_that_asks(gateway: RunningStage) -> None:
    alice = Http(gateway.http_url, ALICE)
    long = alice.create(steps=LONG, num_frames=FRAMES)["id"]
    before = alice.call("GET", f"/v1/videos/{long}/preview")
    alice.call("POST", f"/v1/videos/{long}/cancel")
    plain = alice.create(steps=4, num_frames=FRAMES, size=f"{SIZE}x{SIZE}", seed=11)
    assert plain["preview"] is False
    names = [name for name, _ in alice.events(plain["id"])]
    assert "progress" in names and "preview" not in names and names[-1] == "completed"
    job = stub(gateway).GetJob(S.GetJobRequest(job_id=plain["id"]), metadata=metadata(), timeout=30)
    assert not job.HasField("preview") and not job.params.preview
    assert before.status == 404 and "not created with \"preview\": true" in before.error["message"], before.body

    # the same video with previews: the cache answers (previews change nothing of the video)
    again = alice.create(steps=4, num_frames=FRAMES, size=f"{SIZE}x{SIZE}", seed=11, preview=True)
    assert again["cached"] is True and again["job_status"] == "completed"


@pytest.fixture
def denoiser_without_map(tmp_path: Path) -> Iterator[RunningStage]:
    """A denoiser on a copy of the embedded model without vae/latent_rgb.json (its big files linked)."""
    model = tmp_path / "no-preview-model"
    shutil.copytree(DEFAULT_MODEL, model, copy_function=os.symlink)
    (model / FILE).unlink()
    stage = start_denoiser(model=str(model))
    yield stage
    stop_stage(stage)


def test_a_denoiser_without_a_map_makes_the_video_with_a_warning(gateway_factory: Callable[..., RunningStage],
                                                                 denoiser_without_map: RunningStage) -> None:
    assert (Path(DEFAULT_MODEL) / FILE).is_file(), "the embedded model ships its map"
    gateway = gateway_factory(denoiser=denoiser_without_map.address, preview_every=EVERY)
    seen = list(stub(gateway).Generate(S.GenerateRequest(params=params(4, True)), timeout=120))
    kinds = [event.WhichOneof("event") for event in seen]
    assert kinds[-1] == "result" and "preview" not in kinds
    warnings = [w for event in seen for w in event.warnings]
    assert warnings == [UNAVAILABLE], warnings
    job = stub(gateway).GetJob(S.GetJobRequest(job_id=seen[-1].job_id), timeout=30)
    assert job.status == S.JOB_STATUS_COMPLETED and list(job.warnings) == [UNAVAILABLE]
    # and one that did not ask is told nothing
    plain = list(stub(gateway).Generate(S.GenerateRequest(params=params(2, False)), timeout=120))
    assert not [w for event in plain for w in event.warnings]


def test_a_gateway_with_previews_off_tells_a_job_that_asks_once(gateway_factory: Callable[..., RunningStage]) -> None:
    """--preview-every 0 turns previews off for every job: one that asks gets its video and a warning saying
    so (it once got nothing, silently), one that does not ask is told nothing."""
    from services.gateway.jobs import PREVIEWS_OFF

    gateway = gateway_factory(preview_every=0)
    seen = list(stub(gateway).Generate(S.GenerateRequest(params=params(4, True)), timeout=120))
    kinds = [event.WhichOneof("event") for event in seen]
    assert kinds[-1] == "result" and "preview" not in kinds
    assert [w for event in seen for w in event.warnings] == [PREVIEWS_OFF]
    job = stub(gateway).GetJob(S.GetJobRequest(job_id=seen[-1].job_id), timeout=30)
    assert job.status == S.JOB_STATUS_COMPLETED and list(job.warnings) == [PREVIEWS_OFF]
    plain = list(stub(gateway).Generate(S.GenerateRequest(params=params(2, False)), timeout=120))
    assert not [w for event in plain for w in event.warnings]
