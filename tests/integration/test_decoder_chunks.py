"""The VAE decodes a video a few frames at a time (bounded memory) with the same frames as all at once."""

from __future__ import annotations

import pytest
import torch

from services.decoder.vae import DecodeTiming, VaeDecoder

pytestmark = pytest.mark.slow


def test_chunked_decode_equals_one_pass(model_dir):
    latents = torch.randn(1, 4, 7, 8, 8, generator=torch.Generator().manual_seed(0))
    small = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2)
    whole = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=64)
    timing = DecodeTiming()
    chunks = list(small.iter_decode(latents, timing))
    assert [c.shape[0] for c in chunks] == [2, 2, 2, 1]
    assert timing.vae_seconds > 0
    assert torch.allclose(torch.cat(chunks), whole.decode(latents), atol=1e-5, rtol=0)


def test_warm_shapes_parse_and_warm_the_engine_on_cpu(model_dir):
    from services.denoiser import engine as eng
    from services.denoiser.server import parse_shapes

    assert parse_shapes("16x256x256, 8x64x32") == [(16, 256, 256), (8, 64, 32)]
    assert parse_shapes("") == []
    with pytest.raises(ValueError, match="FRAMESxHEIGHTxWIDTH"):
        parse_shapes("16x256")
    engine = eng.DenoiseEngine.from_folder(model_dir, torch.device("cpu"), torch.float32, max_batch=2)
    engine.warm([(2, 32, 32)])      # runs every batch bucket once; must not raise
    with pytest.raises(ValueError, match="CUDA"):
        engine.use_cuda_graphs()
