"""Finding the parts of a diffusers text-to-video model folder, and the torch device and dtype.

Why: a wrong ``--model`` path is the first thing a new user gets wrong; it must fail with a sentence
that names the folder and what is missing, not a stack trace from ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from services.common.tensors import DTYPE_NAMES


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelFolderError(f"device {name} was asked for but this machine has no CUDA GPU; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ModelFolderError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)} or auto")
    return DTYPE_NAMES[name]
