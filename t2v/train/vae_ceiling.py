"""How well a model folder's VAE alone reproduces held-out clips, judged by the checker.

    python -m t2v.train.vae_ceiling --model models/t2v-world --clips 256

Why: every video the mesh makes comes out of the VAE decoder, so the checker's verdicts on plain
encode -> decode round trips bound what any UNet on that VAE can reach (the VAE of runs 1-4: shape
44%; the shipped one: 100%, docs/model.md). No UNet, no text: seconds on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from services.common.config import DEFAULT_MODEL
from t2v.train.train import load_part, vae_adherence


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2v.train.vae_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL), help="model folder (its vae/ is read)")
    p.add_argument("--clips", type=int, default=256, help="held-out clips to round-trip")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    vae = load_part(args.model, "vae").to(device)
    vae_adherence(vae, args.clips, args.seed, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
