"""Finding the parts of a diffusers text-to-video model folder, and the torch device and dtype.

Why: a wrong ``--model`` path is the first thing a new user gets wrong; it must fail with a sentence
that names the folder and what is missing, not a stack trace from ``from_pretrained``.

The VAE's scale factor is read here, once for every stage: the denoiser makes latents of
height / factor, the decoder upsamples them by the factor, and the gateway checks sizes against it;
each assuming its own number made videos of the wrong size (issue 16, defect 6).

torch is imported only by the functions that need it, so the gateway (which reads only JSON from the
model folder) does not load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ModelFolderError(RuntimeError):
    """The model folder is missing or is not in the text-to-video-ms-1.7b layout."""


def model_part(model: str | Path, part: str) -> Path:
    """Return ``model/part`` after checking the folder looks like a diffusers text-to-video model."""
    root = Path(model).expanduser()
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist; pass --model (or T2V_MODEL) a diffusers "
                               "text-to-video folder such as a text-to-video-ms-1.7b snapshot")
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"{root} has no model_index.json; it is not a diffusers model folder")
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{index} cannot be read as JSON ({exc}); is the download complete?") from None
    folder = root / part
    if part not in components or not folder.is_dir():
        raise ModelFolderError(f"model folder {root} has no '{part}' component; expected the "
                               "text-to-video-ms-1.7b layout (text_encoder/, tokenizer/, unet/, vae/, scheduler/)")
    return folder


def vae_scale_factor(model: str | Path) -> int:
    """Pixels per latent along each side: ``2 ** (len(vae.config.block_out_channels) - 1)``, as diffusers
    reads it (8 for text-to-video-ms-1.7b's 4-block VAE). Heights and widths must be multiples of it.

    Read from ``vae/config.json`` alone, without loading the weights."""
    path = model_part(model, "vae") / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path} cannot be read as JSON ({exc}); is the download complete?") from None
    blocks = config.get("block_out_channels") if isinstance(config, dict) else None
    if not isinstance(blocks, list) or not blocks:
        raise ModelFolderError(f"{path} has no block_out_channels list; it is not an AutoencoderKL config, "
                               "so the VAE's scale factor (and the video size) is unknown")
    return 2 ** (len(blocks) - 1)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelFolderError(f"device {name} was asked for but this machine has no CUDA GPU; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    from services.common.tensors import DTYPE_NAMES

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ModelFolderError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)} or auto")
    return DTYPE_NAMES[name]
