"""CFG-parallel denoising on the CPU (issue 18): a denoiser started with --cfg-parallel runs half the UNet
rows of every step in a second process (torch.distributed, gloo), and its latents and decoded frames equal
those of the one-device denoiser within 1e-4 (float32), for DDIM and DPM-Solver++, alone and batched.

Both denoisers are real servers on loopback ports: the CFG-parallel one a process of its own (with its
follower process beside it), the reference the session's in-process one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import torch

from services.common.tensors import from_proto, to_proto
from t2v.v1 import decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc
from tests.conftest import EMBEDDING_DIM, STAGE_PROCESS_ARGS, RunningStage, ServiceProcess

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4


def request(scheduler: str, seed: int, guidance: float = 9.0) -> denoiser_pb2.DenoiseRequest:
    rows = 2 if guidance > 1.0 else 1
    embeddings = torch.randn(rows, 77, EMBEDDING_DIM, generator=torch.Generator().manual_seed(seed))
    return denoiser_pb2.DenoiseRequest(request_id=f"cfg-{seed}", embeddings=to_proto(embeddings), num_frames=2,
                                       height=32, width=32, num_inference_steps=6, guidance_scale=guidance,
                                       seed=seed, scheduler=scheduler)


def latents_of(stub: denoiser_pb2_grpc.DenoiserStub, requests: list[denoiser_pb2.DenoiseRequest]
               ) -> list[torch.Tensor]:
    """Every request at once (so the engine batches them), their final latents in order."""
    out: list[torch.Tensor | None] = [None] * len(requests)

    def run(index: int) -> None:
        events = list(stub.Denoise(requests[index], timeout=300))
        out[index] = from_proto(events[-1].latents)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert all(latents is not None for latents in out)
    return out  # type: ignore[return-value]


def frames_of(decoder: decoder_pb2_grpc.DecoderStub, latents: torch.Tensor) -> torch.Tensor:
    answer = decoder.Decode(decoder_pb2.DecodeRequest(request_id="cfg", latents=to_proto(latents), fps=8,
                                                      return_frames=True), timeout=120)
    return from_proto(answer.frames)


@pytest.fixture(scope="module")
def cfg_parallel_denoiser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The CFG-parallel denoiser; at the end, SIGTERM, and its follower must have run forwards and exited."""
    log_path = Path(tmp_path_factory.mktemp("cfg")) / "denoiser.log"
    command = [sys.executable, "-m", "t2v", "serve", "denoiser", "--host", "127.0.0.1", "--port", "0",
               *STAGE_PROCESS_ARGS, "--max-batch", "4", "--cfg-parallel", "true"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    process = ServiceProcess("denoiser", proc, log_path)
    try:
        yield process.wait_serving(timeout=180)
    finally:
        process.signal(15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    done = re.search(r"event=follower_done forwards=(\d+)", process.log())
    assert done and int(done.group(1)) > 0, process.log()[-2000:]      # the follower did its rows, then stopped


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_cfg_parallel_equals_one_device(cfg_parallel_denoiser: ServiceProcess, denoiser_stage: RunningStage,
                                        decoder_stage: RunningStage, scheduler: str, batched: bool) -> None:
    requests = [request(scheduler, 5)]
    if batched:               # three requests in one batch: 2 + 2 + 1 rows, an odd count to split
        requests += [request(scheduler, 6), request(scheduler, 7, guidance=1.0)]
    with grpc.insecure_channel(cfg_parallel_denoiser.address) as channel:
        split = latents_of(denoiser_pb2_grpc.DenoiserStub(channel), requests)
    one = latents_of(denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel()), requests)
    decoder = decoder_pb2_grpc.DecoderStub(decoder_stage.channel())
    for a, b in zip(split, one):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= TOLERANCE
        assert float((frames_of(decoder, a) - frames_of(decoder, b)).abs().max()) <= TOLERANCE
    log = cfg_parallel_denoiser.log()
    assert "event=cfg_parallel devices=cpu,cpu" in log and "event=follower_ready" in log


def test_a_follower_runs_beside_the_cfg_parallel_denoiser(cfg_parallel_denoiser: ServiceProcess) -> None:
    found = subprocess.run(["pgrep", "-f", "services.denoiser.cfg_parallel"], capture_output=True, text=True)
    assert found.stdout.strip(), "no follower process runs beside the CFG-parallel denoiser"
