"""Regression of issue 16, defect 6: a model whose VAE does not scale by 8.

Before the fix the denoiser made latents of height // 8 and the gateway checked and defaulted sizes
with 8, while the decoder upsampled by the VAE's real factor: with a 2x VAE (2 blocks) a 64x64
request came back 16x16, with no error. Here a real model folder with a 2-block VAE runs through the
real stages and the gateway over gRPC on loopback.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import av
import grpc
import pytest
import torch

from services.common.model_folder import vae_scale_factor
from services.common.tensors import from_proto, to_proto
from t2v.modelgen import PRESETS, make_model
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc,
                    generation_pb2)
from tests.conftest import (RunningStage, start_decoder, start_denoiser, start_gateway, start_text_encoder,
                            stop_gateway, stop_stage)

# The tiny preset (2-block UNet, 32-wide CLIP) with a VAE of 2 blocks: scale factor 2 ** (2 - 1) = 2.
TWO_X = {**PRESETS["tiny"], "vae": dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                                        sample_size=64)}
UNET_SAMPLE_SIZE = PRESETS["tiny"]["unet"]["sample_size"]


@pytest.fixture(scope="module")
def two_x_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(TWO_X, tmp_path_factory.mktemp("vae2x") / "model")


@pytest.fixture(scope="module")
def mesh(two_x_model: Path) -> Iterator[dict[str, RunningStage]]:
    model = str(two_x_model)
    stages = {"text_encoder": start_text_encoder(model=model), "denoiser": start_denoiser(model=model),
              "decoder": start_decoder(model=model)}
    try:
        stages["gateway"] = start_gateway(stages["text_encoder"].address, stages["denoiser"].address,
                                          stages["decoder"].address, model=model)
        yield stages
    finally:
        if "gateway" in stages:
            stop_gateway(stages.pop("gateway"))
        for stage in stages.values():
            stop_stage(stage)


def generate(gateway: RunningStage, **fields) -> gateway_pb2.GenerationResult:
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    params = generation_pb2.GenerationParams(**{"prompt": "a red ball", "num_frames": 2, "num_inference_steps": 2,
                                                "seed": 3, **fields})
    return list(stub.Generate(gateway_pb2.GenerateRequest(params=params), timeout=120))[-1].result


def video_size(mp4: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of the decoded MP4."""
    with av.open(io.BytesIO(mp4)) as container:
        frames = [frame for frame in container.decode(video=0)]
    assert frames, "the MP4 holds no frames"
    assert len({(f.width, f.height) for f in frames}) == 1
    return len(frames), frames[0].width, frames[0].height


def test_the_factor_is_read_from_the_folder(two_x_model: Path) -> None:
    assert vae_scale_factor(two_x_model) == 2


@pytest.mark.parametrize("width,height", [(64, 64), (48, 64), (36, 22)])
def test_a_2x_vae_makes_the_size_asked_for(mesh: dict[str, RunningStage], width: int, height: int) -> None:
    result = generate(mesh["gateway"], width=width, height=height)
    assert (result.width, result.height) == (width, height)
    assert video_size(result.video) == (2, width, height)


def test_the_default_size_is_the_unet_sample_size_times_the_factor(mesh: dict[str, RunningStage]) -> None:
    result = generate(mesh["gateway"])
    size = UNET_SAMPLE_SIZE * 2
    assert (result.width, result.height) == (size, size)
    assert video_size(result.video) == (2, size, size)


@pytest.mark.parametrize("field", ["height", "width"])
def test_the_gateway_refuses_a_size_off_the_factor_naming_it(mesh: dict[str, RunningStage], field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        generate(mesh["gateway"], **{field: 33})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field} is 33; it must be a positive multiple of 2" in info.value.details()


def _denoise(stage: RunningStage, height: int, width: int) -> list[denoiser_pb2.DenoiseEvent]:
    stub = denoiser_pb2_grpc.DenoiserStub(stage.channel())
    embedding_dim = PRESETS["tiny"]["text_encoder"]["hidden_size"]
    request = denoiser_pb2.DenoiseRequest(request_id="vae2x", embeddings=to_proto(torch.randn(2, 77, embedding_dim)),
                                          num_frames=1, height=height, width=width, num_inference_steps=1,
                                          guidance_scale=9.0, seed=1, scheduler="ddim")
    return list(stub.Denoise(request, timeout=60))


def test_the_denoiser_makes_latents_of_size_over_the_factor(mesh: dict[str, RunningStage]) -> None:
    latents = from_proto(_denoise(mesh["denoiser"], 64, 36)[-1].latents)
    assert tuple(latents.shape) == (1, 4, 1, 32, 18)


def test_the_denoiser_refuses_a_size_off_the_factor_naming_it(mesh: dict[str, RunningStage]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _denoise(mesh["denoiser"], 64, 35)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "width is 35; it must be a positive multiple of 2" in info.value.details()


def test_the_decoder_upsamples_by_the_factor(mesh: dict[str, RunningStage]) -> None:
    stub = decoder_pb2_grpc.DecoderStub(mesh["decoder"].channel())
    response = stub.Decode(decoder_pb2.DecodeRequest(latents=to_proto(torch.randn(1, 4, 1, 8, 6)), fps=8),
                           timeout=30)
    assert (response.height, response.width) == (16, 12)
    assert video_size(response.video) == (1, 12, 16)
