"""The latent -> RGB map of a model folder: what the denoiser's live previews are made with.

Why a linear map: a preview must cost the denoiser next to nothing, so it is not a VAE decode (which costs
as much as a few UNet steps) but ``rgb = weights @ latent + bias`` per latent pixel: 3 x C numbers and 3
more, fitted once per model (``t2v fit-preview``, t2v/fit_preview.py) by least squares against the VAE's
decoded frames average-pooled to latent resolution, and kept in the folder as ``vae/latent_rgb.json``. The
map takes the latents as the denoiser holds them, i.e. already multiplied by the VAE's ``scaling_factor``
(the decoder divides by it before decoding), and gives RGB in [0, 1].

A folder without the file still serves: the denoiser says previews are unavailable, and jobs that asked for
them run without. torch is imported only by ``tensors``, so reading the file costs the caller nothing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.model_folder import ModelFolderError

if TYPE_CHECKING:
    import torch

FILE = Path("vae") / "latent_rgb.json"
FORMAT = "t2v-latent-rgb/1"


def map_to_rgb(weights: "torch.Tensor", bias: "torch.Tensor", latents: "torch.Tensor") -> "torch.Tensor":
    """[C, F, h, w] latents -> uint8 [F, h, w, 3] through the map's (weights [3, C], bias [3]) tensors, on the
    latents' device (a few kernels; nothing waits for them)."""
    import torch

    rgb = torch.einsum("kc,cfhw->fhwk", weights, latents.float()) + bias
    return rgb.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


@dataclass(frozen=True)
class LatentRgb:
    """``rgb[k] = sum_c weights[k][c] * latent[c] + bias[k]`` for k in (R, G, B), RGB in [0, 1]."""

    weights: tuple[tuple[float, ...], ...]     # 3 rows (R, G, B) of C numbers: one per latent channel
    bias: tuple[float, float, float]
    scaling_factor: float = 0.0                # the VAE's, which the latents it applies to carry (a record)
    fit: dict[str, Any] = field(default_factory=dict, compare=False)   # how it was fitted (a record)

    @property
    def channels(self) -> int:
        return len(self.weights[0])

    def tensors(self, device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
        """(weights [3, C], bias [3]) as float32 tensors on ``device``."""
        import torch

        return (torch.tensor(self.weights, dtype=torch.float32, device=device),
                torch.tensor(self.bias, dtype=torch.float32, device=device))

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "about": "rgb = weights @ latent + bias for each latent pixel, RGB in [0, 1]; the latents as the "
                     "denoiser holds them (multiplied by the VAE's scaling_factor). Written by t2v fit-preview.",
            "latent_channels": self.channels, "scaling_factor": self.scaling_factor,
            "weights": [list(row) for row in self.weights], "bias": list(self.bias), "fit": self.fit,
        }, indent=2) + "\n"

    def save(self, model: str | Path) -> Path:
        """Write the map into the model folder through a temporary file, so a denoiser starting meanwhile
        reads the old map or the new one, never half of one."""
        path = Path(model) / FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(self.to_json())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @staticmethod
    def check_writable(model: str | Path) -> None:
        """ModelFolderError, with a sentence, unless the map can be written into ``model`` (checked before a
        fit of minutes, not after it)."""
        folder = (Path(model) / FILE).parent
        if folder.is_dir() and not os.access(folder, os.W_OK):     # no folder: the fit's own checks say so
            raise ModelFolderError(f"{folder} is not writable here: copy the model folder somewhere writable, "
                                   "or fit with --dry-run to see the fit without writing it")

    @classmethod
    def from_dict(cls, data: Any, where: str = "the latent -> RGB map") -> "LatentRgb":
        """Check and read what ``to_json`` wrote; ModelFolderError says what is wrong and what to do."""
        redo = "; run `t2v fit-preview MODEL_FOLDER` to write it again"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelFolderError(f"{where} is not a {FORMAT} file{redo}")
        weights, bias = data.get("weights"), data.get("bias")
        if (not isinstance(weights, list) or len(weights) != 3 or not all(isinstance(r, list) for r in weights)
                or not weights[0] or any(len(r) != len(weights[0]) for r in weights)):
            raise ModelFolderError(f"{where}: weights must be 3 rows (R, G, B) of one number per latent channel{redo}")
        if not isinstance(bias, list) or len(bias) != 3:
            raise ModelFolderError(f"{where}: bias must be 3 numbers (R, G, B){redo}")
        numbers = [v for row in weights for v in row] + bias
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ModelFolderError(f"{where}: weights and bias must be finite numbers{redo}")
        return cls(tuple(tuple(float(v) for v in row) for row in weights),
                   (float(bias[0]), float(bias[1]), float(bias[2])),
                   float(data.get("scaling_factor") or 0.0), dict(data.get("fit") or {}))

    @classmethod
    def load(cls, model: str | Path) -> "LatentRgb | None":
        """The folder's map, or None when it has none (previews unavailable); ModelFolderError if unreadable."""
        path = Path(model) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"{path} cannot be read as JSON ({exc}); run `t2v fit-preview {model}` to "
                                   "write it again") from None
        return cls.from_dict(data, str(path))


# What a caller who asked for previews is told when the denoiser's model folder has no map (no server path in
# it: a user of the API reads it, as a job warning).
UNAVAILABLE = (f"live previews are unavailable: the denoiser's model folder has no {FILE.as_posix()}, so the video "
               "is made without them (whoever runs the denoiser can write it with `t2v fit-preview MODEL_FOLDER`)")
