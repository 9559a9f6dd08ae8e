"""The latent -> RGB map of live previews: the least-squares fit recovers a map that is exactly linear, the file
round-trips and refuses what it cannot use with a sentence, the embedded model ships one that draws its clips'
colours (encoded by its own VAE, then mapped), and `t2v make-model` writes one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.latent_rgb import FILE, FORMAT, LatentRgb
from services.common.model_folder import ModelFolderError
from t2v.fit_preview import heldout_error, least_squares, pooled_frames, random_latents

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "t2v-world"


def test_the_fit_recovers_a_linear_decoder_exactly() -> None:
    weights = torch.tensor([[0.3, -0.2, 0.1, 0.05], [-0.1, 0.25, 0.2, -0.15], [0.05, 0.1, -0.3, 0.35]],
                           dtype=torch.float64)
    bias = torch.tensor([0.5, 0.45, 0.55], dtype=torch.float64)

    def decode(latents: torch.Tensor) -> torch.Tensor:      # each latent pixel -> an 8x8 block of its colour
        rgb = torch.einsum("kc,nchw->nkhw", weights, latents.double()) + bias[None, :, None, None]
        return rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)

    latents = random_latents(4, 3, 4, 5, 6, seed=1) * 0.2        # small: no colour leaves [0, 1]
    frames = latents.permute(0, 2, 1, 3, 4).reshape(12, 4, 5, 6)
    targets = pooled_frames(decode, frames, 8, chunk=5)
    assert targets.shape == (12, 3, 5, 6) and 0 < targets.min() and targets.max() < 1
    fitted_weights, fitted_bias, report = least_squares(frames, targets)
    assert torch.allclose(fitted_weights, weights, atol=1e-9) and torch.allclose(fitted_bias, bias, atol=1e-9)
    assert report["pixels"] == 12 * 5 * 6 and report["rmse_levels"] < 1e-6 and min(report["r2_rgb"]) > 0.999999
    assert heldout_error(frames, targets) < 1e-6


def test_the_pooling_averages_each_latents_block() -> None:
    def decode(latents: torch.Tensor) -> torch.Tensor:       # a picture whose 2x2 blocks average to known numbers
        picture = torch.zeros(len(latents), 3, 4, 4, dtype=torch.float64)
        picture[:, :, 0, 0] = 1.0                             # one bright pixel in the top-left block
        return picture

    pooled = pooled_frames(decode, torch.zeros(2, 4, 2, 2), 2)
    assert pooled[0, 0].tolist() == [[0.25, 0.0], [0.0, 0.0]]


def test_the_file_round_trips_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    rgb = LatentRgb(((1.0, 2.0), (3.0, 4.0), (5.0, 6.0)), (0.1, 0.2, 0.3), 0.5, {"source": "test"})
    (tmp_path / "vae").mkdir()
    assert LatentRgb.load(tmp_path) is None                   # no file: previews unavailable, no error
    assert rgb.save(tmp_path) == tmp_path / FILE
    loaded = LatentRgb.load(tmp_path)
    assert loaded == rgb and loaded.channels == 2 and loaded.fit == {"source": "test"}
    weights, bias = loaded.tensors(torch.device("cpu"))
    assert weights.shape == (3, 2) and weights.dtype == torch.float32 and bias.tolist() == pytest.approx([0.1, 0.2, 0.3])

    good = json.loads((tmp_path / FILE).read_text())
    for change, words in [({"format": "other/9"}, FORMAT), ({"weights": [[1, 2], [3, 4]]}, "3 rows"),
                          ({"weights": [[1, 2], [3], [5, 6]]}, "3 rows"), ({"bias": [0, 1]}, "bias must be 3"),
                          ({"weights": [[1, 2], [3, 4], [5, "x"]]}, "finite numbers"),
                          ({"bias": [0, 1, float("nan")]}, "finite numbers")]:
        (tmp_path / FILE).write_text(json.dumps({**good, **change}))
        with pytest.raises(ModelFolderError, match=words) as refused:
            LatentRgb.load(tmp_path)
        assert "t2v fit-preview" in str(refused.value) and str(tmp_path / FILE) in str(refused.value)
    (tmp_path / FILE).write_text("{not json")
    with pytest.raises(ModelFolderError, match="cannot be read as JSON"):
        LatentRgb.load(tmp_path)


@pytest.mark.slow
def test_the_embedded_models_map_draws_its_clips_colours() -> None:
    """World clips (t2v/train/world.py: what models/t2v-world was trained on) encoded by the model's own VAE and
    scaled as the denoiser holds latents, then mapped: each clip's background comes out near its colour, and the
    whole picture within the error the fit reported."""
    from diffusers import AutoencoderKL

    from t2v.train import world

    latent_rgb = LatentRgb.load(EMBEDDED)
    assert latent_rgb is not None, f"models/t2v-world ships {FILE}: `t2v fit-preview models/t2v-world` writes it"
    vae = AutoencoderKL.from_pretrained(EMBEDDED / "vae").eval()
    assert latent_rgb.channels == vae.config.latent_channels
    assert latent_rgb.scaling_factor == pytest.approx(vae.config.scaling_factor)
    fit = latent_rgb.fit
    assert fit["source"] == "denoise" and fit["pixels"] >= 10_000 and fit["heldout_rmse_levels"] < 50, fit
    weights, bias = (t.double() for t in latent_rgb.tensors(torch.device("cpu")))
    errors = []
    for background, shape, colour in (("black", "circle", "red"), ("gray", "square", "yellow"),
                                      ("dark blue", "triangle", "white"), ("dark green", "circle", "blue")):
        clip = world.render(world.Spec(shape, colour, "right", background), seed=3)[:4]      # [4, 64, 64, 3]
        pixels = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor      # [4, 4, 8, 8]
        rgb = (torch.einsum("kc,nchw->nkhw", weights, latents.double()) + bias[None, :, None, None]).clamp(0, 1)
        truth = torch.nn.functional.avg_pool2d(torch.from_numpy(clip).permute(0, 3, 1, 2).double() / 255, 8)
        errors.append(float((rgb - truth).pow(2).mean().sqrt()) * 255)
        corner = rgb[:, :, 0, 0].mean(0) * 255                    # a corner of every frame: background only
        expected = np.array(world.BACKGROUNDS[background])
        assert np.abs(corner.numpy() - expected).max() < 60, (background, corner.tolist(), expected.tolist())
    assert np.mean(errors) < 1.5 * fit["heldout_rmse_levels"] + 10, (errors, fit)


@pytest.mark.slow
def test_make_model_writes_a_map(tmp_path: Path) -> None:
    from t2v.modelgen import make_model

    out = make_model("tiny", tmp_path / "m")
    latent_rgb = LatentRgb.load(out)
    assert latent_rgb is not None and latent_rgb.channels == 4
    assert latent_rgb.fit["source"] == "random" and latent_rgb.fit["pixels"] > 0
    assert latent_rgb.scaling_factor == pytest.approx(0.18215)


@pytest.mark.slow
def test_fit_preview_says_in_a_sentence_where_it_cannot_write(tmp_path: Path) -> None:
    """A folder that is no model is refused at once; a map the fit cannot write (here
    vae/latent_rgb.json is a folder; a read-only volume answers the same way) is an error line, exit 1,
    never a traceback, and leaves no temporary file behind."""
    import shutil
    import subprocess
    import sys

    from services.common.config import DEFAULT_MODEL

    def fit(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "t2v", "fit-preview", "--source", "random", str(folder)],
                              capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", **os.environ})

    (tmp_path / "empty").mkdir()
    nothing = fit(tmp_path / "empty")
    assert nothing.returncode == 1 and "Traceback" not in nothing.stderr
    assert nothing.stderr.strip().endswith("has no model_index.json; it is not a diffusers model folder")

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("unet", "text_encoder"))
    (model / FILE).unlink()
    (model / FILE).mkdir()
    blocked = fit(model)
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr
    assert blocked.stderr.strip().splitlines()[-1] == f"error: could not write {model / FILE}: Is a directory"
    assert sorted(p.name for p in (model / "vae").iterdir() if p.name.startswith(".")) == []
