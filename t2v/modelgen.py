"""Build a model folder in the exact diffusers layout of text-to-video-ms-1.7b, with random weights.

Why: no weights can be downloaded here, yet every service must load a real folder through the same
code that loads the real snapshot. ``world`` is the embedded default's architecture
(models/t2v-world holds it trained, see docs/model.md), ``tiny`` a smaller one for quick checks, ``full``
has the real 1.7B configs, so a benchmark's FLOPs are the real ones.
The tokenizer is always the real CLIP BPE (49408 tokens), copied from ``--tokenizer-from``. The folder gets
the latent -> RGB map of live previews too (vae/latent_rgb.json, t2v/fit_preview.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

# The scheduler of the real snapshot (scheduler/scheduler_config.json).
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# The same betas rescaled so the last step keeps no signal, with v-prediction and trailing timesteps
# (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024): on 8x8 latents
# the snapshot's last step leaves the layout readable, so a model trained on it reads the layout out
# of the starting noise instead of the prompt (docs/model.md). DDIM and DPM-Solver read these keys.
ZERO_TERMINAL_SNR_CONFIG = {
    **SCHEDULER_CONFIG,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}

PRESETS: dict[str, dict] = {
    # The real text-to-video-ms-1.7b: UNet3D 1411M, CLIP text 340M, VAE 84M parameters.
    "full": {
        "text_encoder": dict(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
            projection_dim=512, hidden_act="gelu",
        ),
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
            layers_per_block=2, attention_head_dim=64, cross_attention_dim=1024,
            norm_num_groups=32, sample_size=32,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
            sample_size=256,
        ),
    },
    # The embedded default (models/t2v-world, trained by t2v/train on 64x64 clips): the same block types
    # and an 8x VAE, scaled down so a 2-core CPU makes a 16-frame video in seconds. This preset gives
    # its architecture with random weights (the trained folder also carries the VAE's scaling_factor)
    # and the zero-terminal-SNR schedule it was trained on (run 9, docs/model.md).
    "world": {
        "scheduler": ZERO_TERMINAL_SNR_CONFIG,
        "text_encoder": dict(
            hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
            projection_dim=64, hidden_act="gelu",
        ),
        "unet": dict(
            block_out_channels=(64, 128, 128),
            down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
            layers_per_block=1, attention_head_dim=8, cross_attention_dim=64,
            norm_num_groups=16, sample_size=8,
        ),
        "vae": dict(
            block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16,
            sample_size=64,
        ),
    },
    # The smallest of the family (random weights): quick checks of the loading code.
    "tiny": {
        "text_encoder": dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            projection_dim=32, hidden_act="gelu",
        ),
        "unet": dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
            norm_num_groups=8, sample_size=16,
        ),
        "vae": dict(
            block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
            sample_size=256,
        ),
    },
}

DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "t2v-world" / "tokenizer"


def make_model(preset: str | dict, out_dir: Path, seed: int = 0, tokenizer_from: Path = DEFAULT_TOKENIZER,
               device: str = "cpu", dtype: str = "float32") -> Path:
    """Write a complete model folder for ``preset`` into ``out_dir`` and return it.

    ``preset`` is a name of PRESETS or a dict shaped like one (tests build odd models so: a 2-block VAE).
    ``device="cuda"`` initialises the weights on the GPU (seconds instead of minutes for ``full``);
    ``dtype="float16"`` halves the files. The weights are random either way.
    """
    import torch

    if isinstance(preset, dict):
        spec = preset
    elif preset in PRESETS:
        spec = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)

    def save(module: torch.nn.Module, folder: str) -> None:
        module.to(torch_dtype).save_pretrained(out_dir / folder)

    with torch.device(device):
        _build(spec, save)
    _finish(out_dir, tokenizer_from, spec.get("scheduler"))
    # The latent -> RGB map of live previews (vae/latent_rgb.json), fitted on random latents: the weights are
    # random, so the model's own videos would teach it nothing more (t2v fit-preview refits any folder).
    from t2v.fit_preview import fit_folder

    fit_folder(out_dir, source="random", device=device, seed=seed)
    return out_dir


def _build(spec: dict, save: Callable[[Any, str], None]) -> None:
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        layer_norm_eps=1e-5, **spec["text_encoder"],
    )
    save(CLIPTextModel(text_config), "text_encoder")
    save(UNet3DConditionModel(in_channels=4, out_channels=4, **spec["unet"]), "unet")
    n_blocks = len(spec["vae"]["block_out_channels"])
    save(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * n_blocks, up_block_types=("UpDecoderBlock2D",) * n_blocks,
        **spec["vae"],
    ), "vae")


def _finish(out_dir: Path, tokenizer_from: Path, scheduler_config: dict | None = None) -> Path:
    # Written as the real snapshot has it (its PNDM-era keys included), not through DDIMScheduler;
    # a model trained on another schedule (t2v.train --zero-terminal-snr) passes its own keys.
    (out_dir / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.15.0.dev0",
                 **(SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)}
    (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")

    tokenizer_dir = out_dir / "tokenizer"
    if Path(tokenizer_from).resolve() != tokenizer_dir.resolve():
        shutil.copytree(tokenizer_from, tokenizer_dir, dirs_exist_ok=True)
    model_index = {
        "_class_name": "TextToVideoSDPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return out_dir
