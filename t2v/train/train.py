"""Train the embedded model's architecture on the clips of ``t2v.train.world`` and save a model folder.

    python -m t2v.train.train --out runs/world --device cuda --time-budget 390   # on the lent GPU (docs/model.md)
    python -m t2v.train.train --out /tmp/smoke --smoke                           # the code path on a CPU, seconds

The architecture of ``t2v.modelgen``'s ``world`` preset by default (CLIPTextModel, UNet3DConditionModel
with CrossAttn/Down 3D blocks, AutoencoderKL with 4 levels = 8x downsampling), built by modelgen's own
``_build`` and saved by its ``_finish``, so the services load the result unchanged. For 64x64 clips
of 16 frames the latents are 4 x 16 x 8 x 8 (the engine hard-codes the 8x VAE, so the VAE keeps 4
levels; every width is a flag).

Two phases:

a. AutoencoderKL on single frames: L1 + MSE reconstruction + ``--kl-weight`` x KL. Afterwards its
   ``scaling_factor`` is set to 1/std of the latents (as Stable Diffusion's 0.18215 was found), since
   the decoder service divides by it.
b. UNet3DConditionModel on the (frozen) VAE's latents, DDPM epsilon loss with a DDPMScheduler built
   from ``modelgen.SCHEDULER_CONFIG`` (or v-prediction on ``ZERO_TERMINAL_SNR_CONFIG`` with
   ``--zero-terminal-snr``; the folder keeps the schedule and the services sample with it), conditioned on the
   CLIP text encoder's last hidden state (as the text_encoder service computes it, no attention
   mask). The text encoder is TRAINED JOINTLY: the preset's CLIP has no pretrained weights, so
   freezing it would freeze random features; jointly trained it learns the world's small vocabulary
   (``--freeze-text`` turns this off, e.g. for a pretrained encoder). 10% of captions are replaced by
   "" (``--cfg-drop``), the unconditional prompt the services use for classifier-free guidance.

Data is drawn on the fly by ``world.sample`` in ``--workers`` DataLoader processes (nothing on
disk); the UNet phase draws its batches from a ``LatentBank`` of VAE-encoded clips on the device,
refreshed every step. bf16 autocast on CUDA. ``--eval-clips N`` samples N train, held-out and paraphrased prompts at the end
with the services' own sampling code (DDIM, guidance 9) and prints the checker's adherence figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from t2v import modelgen
from t2v.train import world
from t2v.train.distributed import Group, SharedClock

TOKENIZER_FROM = modelgen.DEFAULT_TOKENIZER


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t2v.train.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model folder to write (diffusers layout)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few tiny steps on the CPU (tests the code path, < 60 s)")
    # phase (a): VAE
    p.add_argument("--vae-steps", type=int, default=6000, help="VAE steps (at most)")
    p.add_argument("--vae-time-budget", type=float, default=0.0, help="seconds the VAE phase may take (0 = no limit)")
    p.add_argument("--vae-batch", type=int, default=256, help="frames per VAE step")
    p.add_argument("--vae-lr", type=float, default=4e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-frames-per-clip", type=int, default=4,
                   help="frames taken from each clip in a VAE batch (fewer = more clips, more varied batches)")
    p.add_argument("--vae-fg-weight", type=float, default=4.0,
                   help="extra reconstruction weight on the shape's pixels (far from the frame's border colour): "
                        "the shape covers ~5%% of a frame, and an unweighted loss rounds its corners away")
    p.add_argument("--vae-eval-clips", type=int, default=256,
                   help="held-out clips the checker judges after VAE reconstruction (the ceiling of the model)")
    p.add_argument("--vae-from", type=Path, default=None, help="skip phase (a): load vae/ from this model folder")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this model folder: load all three parts (phase (a) skipped)")
    # phase (b): UNet (+ text encoder)
    p.add_argument("--steps", type=int, default=40000, help="UNet steps (at most)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds the UNet phase may take (0 = no limit); the learning-rate schedule follows "
                        "whichever of steps or time runs out first, so a run on a lent GPU ends on time")
    p.add_argument("--batch", type=int, default=128, help="clips per UNet step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-lr", type=float, default=3e-4)
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its initial weights")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of captions replaced by ''")
    p.add_argument("--min-snr", type=float, default=5.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023: min(SNR, gamma) / SNR for epsilon "
                        "prediction; converges several times faster than the plain loss); 0 = off")
    p.add_argument("--snr-floor", type=float, default=1.0,
                   help="least weight of a timestep, as a loss on the clean latents (the epsilon loss gives "
                        "the high-noise steps, which decide the motion, ~SNR = 0.005; 1 = v-prediction's "
                        "weighting there); 0 = off (runs 1-6)")
    p.add_argument("--bank", type=int, default=65536,
                   help="clips whose VAE latents are kept on the device and sampled for UNet batches (at least "
                        "--batch; 65536 take ~1 GB and ~27 s to fill on an H100): a large batch costs only the UNet")
    p.add_argument("--bank-refresh", type=int, default=256,
                   help="fresh clips encoded into the bank per step, replacing the oldest (the data stays varied)")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="train (and save the model with) modelgen.ZERO_TERMINAL_SNR_CONFIG: the betas rescaled "
                        "so the last step keeps no signal, v-prediction, trailing timesteps (the shipped "
                        "model's; without it the direction of motion follows the seed, docs/model.md); "
                        "default: the schedule "
                        "of --init-from's folder, else the real snapshot's")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of UNet/text weights saved (0 = off)")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--checkpoint-every", type=float, default=0.0,
                   help="seconds between checkpoints of the UNet phase into --out (EMA weights, a loadable "
                        "model folder; 0 = only at the end): a lent GPU taken back mid-run loses less")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for training (fewer, fused kernels; costs a compile at start, "
                        "counted in --time-budget); runs in the CPU smoke test, not yet timed on a GPU")
    # sizes (defaults: modelgen's "world" preset, the embedded default's architecture)
    world_spec = modelgen.PRESETS["world"]
    text, unet, vae = world_spec["text_encoder"], world_spec["unet"], world_spec["vae"]
    p.add_argument("--frames", type=int, default=world.FRAMES)
    p.add_argument("--unet-channels", type=ints, default=unet["block_out_channels"])
    p.add_argument("--unet-layers", type=int, default=unet["layers_per_block"])
    p.add_argument("--attention-head-dim", type=int, default=unet["attention_head_dim"])
    p.add_argument("--unet-groups", type=int, default=unet["norm_num_groups"])
    p.add_argument("--text-hidden", type=int, default=text["hidden_size"])
    p.add_argument("--text-intermediate", type=int, default=text["intermediate_size"])
    p.add_argument("--text-heads", type=int, default=text["num_attention_heads"])
    p.add_argument("--text-layers", type=int, default=text["num_hidden_layers"])
    p.add_argument("--vae-channels", type=ints, default=vae["block_out_channels"], help="4 levels = 8x (required)")
    p.add_argument("--vae-layers", type=int, default=vae["layers_per_block"])
    p.add_argument("--vae-groups", type=int, default=vae["norm_num_groups"])
    # plumbing
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-clips", type=int, default=32, help="train and held-out prompts sampled at the end (0 = none)")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps per evaluation video")
    p.add_argument("--eval-guidance", type=float, default=9.0, help="guidance scale of the evaluation videos")
    p.add_argument("--eval-batch", type=int, default=32, help="evaluation videos generated together")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float16",
                   help="dtype of the saved weights (float16 halves the folder; the services cast on load)")
    p.add_argument("--tokenizer-from", type=Path, default=TOKENIZER_FROM)
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    args.device, args.workers = "cpu", 0
    args.vae_steps, args.vae_batch, args.steps, args.batch = 3, 8, 3, 2
    args.bank, args.bank_refresh, args.vae_eval_clips = 8, 2, 4
    args.warmup, args.log_every, args.eval_clips, args.eval_steps = 1, 1, 1, 2
    args.save_dtype = "float32"


def model_spec(args: argparse.Namespace) -> dict:
    """A modelgen preset dict from the size flags (block types follow the tiny/full presets)."""
    if len(args.vae_channels) != 4:
        raise SystemExit("--vae-channels needs 4 levels: the services assume an 8x VAE (latents = frames / 8)")
    n = len(args.unet_channels)
    return {
        "text_encoder": {"hidden_size": args.text_hidden, "intermediate_size": args.text_intermediate,
                             "num_attention_heads": args.text_heads, "num_hidden_layers": args.text_layers,
                             "projection_dim": args.text_hidden, "hidden_act": "gelu"},
        "unet": {"block_out_channels": tuple(args.unet_channels),
                     "down_block_types": ("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
                     "up_block_types": ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1),
                     "layers_per_block": args.unet_layers, "attention_head_dim": args.attention_head_dim,
                     "cross_attention_dim": args.text_hidden, "norm_num_groups": args.unet_groups,
                     "sample_size": world.SIZE // 8},
        "vae": {"block_out_channels": tuple(args.vae_channels), "layers_per_block": args.vae_layers,
                    "norm_num_groups": args.vae_groups, "sample_size": world.SIZE},
    }


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """text_encoder, unet, vae with fresh weights, through modelgen's own constructor."""
    torch.manual_seed(args.seed)
    modules: dict[str, torch.nn.Module] = {}
    modelgen._build(model_spec(args), lambda module, folder: modules.__setitem__(folder, module))
    if args.init_from is not None:
        for part in ("text_encoder", "unet"):
            modules[part] = load_part(args.init_from, part)
    vae_from = args.vae_from or args.init_from
    if vae_from is not None:
        modules["vae"] = load_part(vae_from, "vae")
    return modules


def load_part(folder: Path | str, part: str) -> torch.nn.Module:
    """One trained part of a model folder ("text_encoder", "unet" or "vae"), in float32."""
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import CLIPTextModel

    classes = {"text_encoder": CLIPTextModel, "unet": UNet3DConditionModel, "vae": AutoencoderKL}
    return classes[part].from_pretrained(Path(folder) / part, dtype=torch.float32)


def folder_schedule(folder: Path | str) -> dict:
    """The noise schedule a model folder was trained on and is sampled with (its scheduler config)."""
    saved = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    return {k: v for k, v in saved.items() if not k.startswith("_")}


class WorldClips(torch.utils.data.IterableDataset):
    """An endless stream of (frames uint8 [F, H, W, 3], token ids [77]) from the training split.

    Captions are tokenized here, in the worker processes, with a cache: the slow CLIP BPE takes
    ~1 ms a caption, which in the training loop cost more than the UNet step itself.
    """

    def __init__(self, seed: int, tokenizer_from: Path) -> None:
        self.seed, self.tokenizer_from = seed, tokenizer_from

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from transformers import CLIPTokenizer

        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        if info is not None:
            torch.set_num_threads(1)
        tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_from)
        cache: dict[str, torch.Tensor] = {}
        while True:
            _, frames, caption = world.sample(rng, "train")
            if caption not in cache:
                cache[caption] = tokenize(tokenizer, [caption])[0]
            yield torch.from_numpy(frames), cache[caption]


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """As services/text_encoder: padded to 77 tokens, truncated, int64 ids [N, 77]."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def batches(args: argparse.Namespace, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(WorldClips(seed, args.tokenizer_from), batch_size=batch,
                                         num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=args.workers > 0)
    return iter(loader)


def to_pixels(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, F, H, W, 3] uint8 -> [B*F, 3, H, W] float in [-1, 1] on ``device``."""
    x = frames.to(device, non_blocking=True).flatten(0, 1).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] VAE output in [-1, 1] -> [N, H, W, 3] uint8: the decoder service's own conversion."""
    from services.decoder.vae import to_frames, to_uint8 as frames_to_uint8

    return frames_to_uint8(to_frames(images).cpu())


class Schedule:
    """Linear warm-up, then cosine decay over whichever runs out first: ``steps`` or ``budget`` seconds.

    Why time: a lent GPU gives minutes, not steps; throughput is only known once running, so the
    decay follows the clock and the run still ends at a low learning rate. The clock is rank 0's
    in a multi-GPU run (``distributed.SharedClock``), so all processes step alike.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, steps: int, budget: float,
                 clock: Callable[[int], float] | None = None) -> None:
        self.optimizer, self.warmup, self.steps, self.budget = optimizer, warmup, steps, budget
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.start = time.perf_counter()
        self.clock = clock or (lambda step: time.perf_counter() - self.start)

    def progress(self, step: int) -> float:
        by_steps = step / max(1, self.steps)
        by_time = self.clock(step) / self.budget if self.budget > 0 else 0.0
        return min(1.0, max(by_steps, by_time))

    def done(self, step: int) -> bool:
        return step >= self.steps or self.progress(step) >= 1.0

    def update(self, step: int) -> float:
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor
        return self.base[0] * factor


class Meter:
    """Loss average and samples/s (of all processes) between two log lines; only rank 0 prints."""

    def __init__(self, name: str, unit: str, sync: bool, group: Group | None = None) -> None:
        self.name, self.unit, self.sync = name, unit, sync
        self.group = group or Group()
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.loss, self.n = time.perf_counter(), 0, 0.0, 0
        self.waited = 0.0      # seconds spent waiting for the DataLoader

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += float(loss.detach())
        self.samples += samples
        self.n += 1

    def log(self, step: int, total: int, extra: str = "") -> float:
        if self.sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start
        loss = self.loss / max(1, self.n)
        if self.group.main:
            rate = self.samples * self.group.world / elapsed
            print(f"[{self.name}] step {step}/{total} loss {loss:.5f} {rate:.1f} {self.unit}/s "
                  f"data-wait {100 * self.waited / elapsed:.0f}%{extra}", flush=True)
        self.reset()
        return loss


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------ phase (a)

def foreground_weight(x: torch.Tensor, extra: float) -> torch.Tensor:
    """[N, 1, H, W]: 1 + ``extra`` on pixels far from their frame's border colour (the shape), else 1.

    Why: the shape covers a few percent of a frame, so a plain per-pixel loss is nearly all
    background; the first VAE, trained that way, rounded corners off (the checker read its
    reconstructions' shape right only 47% of the time, docs/model.md)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)   # [N, 3, 4W]
    background = border.median(dim=2).values[:, :, None, None]
    far = (x - background).abs().sum(dim=1, keepdim=True) > 0.3      # ~40 RGB levels summed over channels
    return 1.0 + extra * far.float()


class VaeRoundTrip(torch.nn.Module):
    """Encode, sample, decode: one forward, so DistributedDataParallel can wrap the VAE's training step."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


def train_vae(args: argparse.Namespace, vae: torch.nn.Module, device: torch.device, group: Group) -> float:
    """Phase (a); returns the last logged loss."""
    vae.train().requires_grad_(True)
    round_trip = group.wrap(VaeRoundTrip(vae))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, fused=device.type == "cuda")
    clock = SharedClock(group)
    schedule = Schedule(opt, min(args.warmup, args.vae_steps), args.vae_steps, args.vae_time_budget, clock)
    per_clip = max(1, min(args.vae_frames_per_clip, args.frames))
    clips_per_step = max(1, math.ceil(args.vae_batch / per_clip))
    data = batches(args, clips_per_step, args.seed + 1 + 1000 * group.rank)
    meter, last = Meter("vae", "frames", device.type == "cuda", group), float("nan")
    step = 0
    while not schedule.done(step):
        lr = schedule.update(step)
        step += 1
        frames, _ = next(data)
        # A few random frames of many clips: frames of one clip are nearly alike.
        pick = torch.rand(frames.shape[:2]).argsort(dim=1)[:, :per_clip]
        x = to_pixels(frames[torch.arange(len(frames))[:, None], pick], device)
        with autocast(device):
            recon, kl = round_trip(x)
        error = recon.float() - x
        weight = foreground_weight(x, args.vae_fg_weight)
        loss = (weight * (error.abs() + error ** 2)).mean() + args.kl_weight * kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
        opt.step()
        meter.add(loss, len(x))
        if step % args.log_every == 0 or schedule.done(step):
            last = meter.log(step, args.vae_steps, f" lr {lr:.2e} elapsed {time.perf_counter() - schedule.start:.0f}s")
    group.check_in_step([vae])
    return last


@torch.no_grad()
def vae_adherence(vae: torch.nn.Module, clips: int, seed: int, device: torch.device) -> dict[str, float]:
    """The checker's verdicts on VAE reconstructions of ``clips`` held-out clips: a ceiling for the
    whole model, since every video the mesh makes comes out of this decoder."""
    from t2v.train import checker

    vae.eval()
    rng = np.random.default_rng(seed)
    judged = []
    for start in range(0, clips, 16):
        samples = [world.sample(rng, "heldout") for _ in range(min(16, clips - start))]
        x = to_pixels(torch.stack([torch.from_numpy(frames) for _, frames, _ in samples]), device)
        with autocast(device):
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        videos = to_uint8(recon).reshape(len(samples), -1, *x.shape[2:], 3)
        judged += [(video, spec) for video, (spec, _, _) in zip(videos, samples)]
    result = checker.accuracy(judged)
    print("[vae] reconstructions of held-out clips: " + " ".join(f"{k} {v:.3f}" for k, v in result.items()),
          flush=True)
    return result


@torch.no_grad()
def calibrate_scaling(args: argparse.Namespace, vae: torch.nn.Module, device: torch.device, group: Group) -> float:
    """scaling_factor = 1 / std of the latents, so the UNet sees roughly unit-variance inputs (rank 0's
    figure on every process)."""
    vae.eval()
    data = batches(args, max(2, min(16, args.batch)), args.seed + 2)
    latents = []
    for _ in range(2 if args.smoke else 8):
        frames, _ = next(data)
        latents.append(vae.encode(to_pixels(frames, device)).latent_dist.sample().float())
    std = float(torch.cat(latents).std())
    return group.broadcast(1.0 / max(std, 1e-6))


# ------------------------------------------------------------------------------------------ phase (b)

def encode_text(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    """As services/text_encoder: no attention mask, last hidden state."""
    return text_encoder(tokenize(tokenizer, captions).to(device))[0]


class LatentBank:
    """VAE latent distributions of many training clips, kept on the device; UNet batches are drawn from it.

    Why: at the batch sizes that keep the GPU busy (512 clips; 128 and less are bound by kernel
    launches, docs/model.md), encoding every batch with the VAE (~40% of the UNet's FLOPs per clip)
    and shipping ~100 MB of pixels a step from the DataLoader would add to every step. Here a clip is
    encoded once and drawn several
    times; every step ``refresh`` fresh clips replace the oldest, and every draw samples the latent
    distribution anew, so the data stays varied. Caption dropout for classifier-free guidance is
    applied at the draw.
    """

    def __init__(self, size: int, vae: torch.nn.Module, data: Iterator, device: torch.device,
                 empty_ids: torch.Tensor, cfg_drop: float) -> None:
        self.size, self.vae, self.data, self.device = size, vae, data, device
        self.empty_ids, self.cfg_drop = empty_ids.to(device), cfg_drop
        self.mean = self.std = self.ids = None
        self.next, self.filled = 0, 0
        while self.filled < size:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Encode the DataLoader's next batch into the oldest slots."""
        frames, ids = next(self.data)
        bsz, n_frames = frames.shape[:2]
        with autocast(self.device):
            dist = self.vae.encode(to_pixels(frames, self.device)).latent_dist

        def per_clip(t: torch.Tensor) -> torch.Tensor:      # [B*F, C, h, w] -> [B, C, F, h, w]
            return t.unflatten(0, (bsz, n_frames)).permute(0, 2, 1, 3, 4).to(torch.bfloat16)

        mean, std = per_clip(dist.mean), per_clip(dist.std)
        if self.mean is None:
            self.mean = torch.empty((self.size, *mean.shape[1:]), dtype=torch.bfloat16, device=self.device)
            self.std = torch.empty_like(self.mean)
            self.ids = torch.empty((self.size, ids.shape[1]), dtype=ids.dtype, device=self.device)
        slots = (self.next + torch.arange(bsz, device=self.device)) % self.size
        self.mean[slots], self.std[slots], self.ids[slots] = mean, std, ids.to(self.device)
        self.next = (self.next + bsz) % self.size
        self.filled = min(self.size, self.filled + bsz)

    def draw(self, batch: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` random clips: scaled latents [B, C, F, h, w] (float32) and token ids [B, 77]."""
        index = torch.randint(self.filled, (batch,), device=self.device)
        mean, std = self.mean[index].float(), self.std[index].float()
        latents = (mean + std * torch.randn_like(mean)) * scaling
        drop = torch.rand(batch, device=self.device) < self.cfg_drop
        ids = torch.where(drop[:, None], self.empty_ids[None], self.ids[index])
        return latents, ids


def schedule_config(args: argparse.Namespace) -> dict:
    """The noise schedule to train on and to save in the folder (the services sample with it)."""
    if args.zero_terminal_snr:
        return dict(modelgen.ZERO_TERMINAL_SNR_CONFIG)
    if args.init_from is not None:
        return folder_schedule(args.init_from)
    return dict(modelgen.SCHEDULER_CONFIG)


def snr_loss_weights(alphas_cumprod: torch.Tensor, gamma: float, floor: float,
                     prediction: str = "epsilon") -> torch.Tensor:
    """Per-sample weights on the epsilon loss so that each timestep weighs clamp(SNR, floor, gamma) as a
    loss on the clean latents it implies (the epsilon loss itself weighs SNR there).

    Why the cap (``gamma``, Min-SNR, Hang et al. 2023): the low-noise steps only sharpen details, and
    uncapped they take most of the gradient. Why the floor: the high-noise steps decide the layout
    (where the shape is in each frame, hence its motion), and there the epsilon loss weighs the
    clean latents by SNR, ~0.005 at the last step, so the prompt barely steers them; a floor of 1 gives
    them the weight v-prediction's loss would (SNR + 1). Runs 5-6 without it (floor 0) drew shapes
    that moved, but in directions unrelated to the prompt (docs/model.md). ``gamma``/``floor`` <= 0: off.

    For ``prediction="v_prediction"`` the same clean-latent weights are returned for the v loss, which
    weighs the clean latents by SNR + 1 itself (finite at zero terminal SNR, where epsilon's is 0).
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = snr.clamp(max=gamma) if gamma > 0 else snr
    if floor > 0:
        weight = weight.clamp(min=floor)
    if prediction == "v_prediction":
        return weight / (snr + 1)
    if prediction != "epsilon":
        raise ValueError(f"unsupported prediction_type {prediction!r}")
    return weight / snr


def training_target(prediction: str, latents: torch.Tensor, noise: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for ``noisy = sqrt(a) latents + sqrt(1 - a) noise``: the noise
    (epsilon) or v = sqrt(a) noise - sqrt(1 - a) latents (= DDPMScheduler.get_velocity)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    raise ValueError(f"unsupported prediction_type {prediction!r}")


class Denoiser(torch.nn.Module):
    """Text encoder + UNet as one forward, so DistributedDataParallel averages both one's gradients."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, t, encoder_hidden_states=self.text_encoder(ids)[0]).sample


class Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        """The averaged weights into ``modules``: the trained ones, or copies of them in the same order."""
        targets = [p for m in modules for p in m.parameters() if p.requires_grad]
        if len(targets) != len(self.shadow):
            raise ValueError("copy_to needs the modules the average was made of, in the same order")
        for p, s in zip(targets, self.shadow):
            p.copy_(s)


class Checkpoints:
    """The model as it stands (EMA weights), saved as a whole model folder every ``every`` seconds.

    Why: a lent GPU can be taken back mid-run; the last checkpoint is then a loadable model
    (``--init-from``) rather than nothing. Written beside the folder and swapped in, so a reader
    copying the folder meanwhile finds the previous checkpoint or this one, never half of one.
    """

    def __init__(self, args: argparse.Namespace, modules: dict[str, torch.nn.Module], ema: Ema | None,
                 group: Group, summary: dict) -> None:
        self.args, self.modules, self.ema, self.group, self.summary = args, modules, ema, group, summary
        self.every, self.last = args.checkpoint_every, time.perf_counter()

    def maybe_save(self, step: int, loss: float) -> None:
        if not self.group.main or self.every <= 0 or time.perf_counter() - self.last < self.every:
            return
        copies = {name: copy.deepcopy(module) for name, module in self.modules.items()}
        if self.ema is not None:
            self.ema.copy_to([copies["unet"], copies["text_encoder"]])
        save_atomically(self.args.out, copies, self.args.tokenizer_from, self.args.save_dtype,
                        {**self.summary, "unet_loss": loss, "unet_steps": step, "checkpoint": True},
                        schedule_config(self.args))
        self.last = time.perf_counter()
        print(f"[unet] checkpoint of step {step} saved in {self.args.out}", flush=True)


def train_unet(args, unet, text_encoder, vae, tokenizer, device: torch.device, group: Group | None = None,
               summary: dict | None = None) -> float:
    from diffusers import DDPMScheduler

    group = group or Group()
    noise_scheduler = DDPMScheduler.from_config(schedule_config(args))
    alphas = noise_scheduler.alphas_cumprod.to(device)
    prediction = noise_scheduler.config.prediction_type
    vae.eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(not args.freeze_text)
    if args.freeze_text:
        text_encoder.eval()
    denoiser = group.wrap(Denoiser(unet, text_encoder))
    # The step is launch-bound at this size (docs/model.md): --compile fuses the UNet's small kernels.
    forward = torch.compile(denoiser) if args.compile else denoiser
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if not args.freeze_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": args.text_lr})
    # fused: one kernel for the whole update; the unfused loop took 23 ms a step on the H100 (docs/model.md)
    opt = torch.optim.AdamW(groups, weight_decay=1e-2, fused=device.type == "cuda")
    ema = Ema([unet] + ([] if args.freeze_text else [text_encoder]), args.ema) if args.ema > 0 else None
    checkpoints = Checkpoints(args, {"unet": unet, "text_encoder": text_encoder, "vae": vae}, ema, group,
                              summary or {})
    started = time.perf_counter()
    bank = LatentBank(max(args.bank, args.batch), vae, batches(args, args.bank_refresh, args.seed + 4 + 1000 * group.rank),
                      device, tokenize(tokenizer, [""])[0], args.cfg_drop)
    filling = time.perf_counter() - started
    if group.main:
        print(f"[unet] latent bank of {bank.size} clips encoded in {filling:.1f}s", flush=True)
    # The bank's filling counts in --time-budget; the learning-rate cosine spans what is left.
    budget = group.broadcast(max(1.0, args.time_budget - filling) if args.time_budget > 0 else 0.0)
    schedule = Schedule(opt, min(args.warmup, args.steps), args.steps, budget, SharedClock(group))
    scaling = vae.config.scaling_factor
    meter, last = Meter("unet", "clips", device.type == "cuda", group), float("nan")
    params = [p for g in groups for p in g["params"]]
    torch.manual_seed(args.seed + 7 + group.rank)       # each process its own noise and timesteps
    step = 0
    while not schedule.done(step):
        lr = schedule.update(step)
        step += 1
        waited = time.perf_counter()
        bank.refresh()
        meter.waited += time.perf_counter() - waited
        latents, ids = bank.draw(args.batch, scaling)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise      # = DDPMScheduler.add_noise
        with autocast(device):
            pred = forward(noisy, t, ids)
        target = training_target(prediction, latents, noise, a)
        per_sample = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3, 4))
        loss = (snr_loss_weights(alphas[t], args.min_snr, args.snr_floor, prediction) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(step)
        meter.add(loss, len(latents))
        if step % args.log_every == 0 or schedule.done(step):
            last = meter.log(step, args.steps, f" lr {lr:.2e} elapsed {time.perf_counter() - schedule.start:.0f}s")
        checkpoints.maybe_save(step, last)
    args.steps_done = step
    group.check_in_step([unet, text_encoder])
    if ema is not None:
        ema.copy_to([unet] + ([] if args.freeze_text else [text_encoder]))
    return last


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def generate(unet, text_encoder, vae, tokenizer, prompts: list[str], seeds: list[int], steps: int,
             guidance: float, frames: int, device: torch.device, schedule: dict,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Videos with the denoiser service's own math (services.denoiser.sampling) on the model's noise
    ``schedule``, one per prompt, each from its own seeded noise (passed through ``transform`` first,
    if given): uint8 [N, F, H, W, 3]."""
    from services.denoiser import sampling

    unet.eval(), text_encoder.eval(), vae.eval()
    scheduler = sampling.make_scheduler("ddim", {"_class_name": "DDIMScheduler", **schedule})
    scheduler.set_timesteps(steps, device=device)
    n = len(prompts)
    states = encode_text(tokenizer, text_encoder, [""] * n + list(prompts), device).float()
    size = unet.config.sample_size
    starts = [sampling.initial_latents((1, unet.config.in_channels, frames, size, size), seed, device,
                                       torch.float32, scheduler.init_noise_sigma) for seed in seeds]
    latents = torch.cat([latent for latent, _ in starts])
    if transform is not None:
        latents = transform(latents)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        with autocast(device):
            pred = unet(x, t, encoder_hidden_states=states).sample.float()
        # DDIM with eta 0 draws no noise, so one step for the whole batch equals N separate steps.
        latents = sampling.scheduler_step(scheduler, sampling.apply_guidance(pred, guidance), t, latents,
                                          {"eta": 0.0})
    flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / vae.config.scaling_factor
    out = to_uint8(torch.cat([vae.decode(chunk).sample.float() for chunk in flat.split(256)]))
    return out.reshape(n, frames, *out.shape[1:])


def eval_prompts(split: str, paraphrase: bool, count: int, seed: int) -> list[tuple[world.Spec, str]]:
    """``count`` (spec, caption) pairs of ``split``, fixed by ``seed`` (the same for every model)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        spec = world.sample_spec(rng, split)
        out.append((spec, world.captions(spec, rng, paraphrase)))
    return out


EVAL_SETS = (("train", "train", False), ("heldout", "heldout", False), ("paraphrase", "train", True))


def evaluate(args, unet, text_encoder, vae, tokenizer, device: torch.device) -> dict:
    """Checker adherence on ``--eval-clips`` train-split, held-out and paraphrased prompts."""
    from t2v.train import checker

    results, schedule = {}, schedule_config(args)
    for name, split, paraphrase in EVAL_SETS:
        pairs = eval_prompts(split, paraphrase, args.eval_clips, args.seed + 5)
        clips = []
        for start in range(0, len(pairs), args.eval_batch):
            chunk = pairs[start:start + args.eval_batch]
            videos = generate(unet, text_encoder, vae, tokenizer, [c for _, c in chunk],
                              list(range(start, start + len(chunk))), args.eval_steps, args.eval_guidance,
                              args.frames, device, schedule)
            clips += [(video, spec) for video, (spec, _) in zip(videos, chunk)]
        results[name] = checker.accuracy(clips)
        print(f"[eval] {name}: " + " ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    return results


# ------------------------------------------------------------------------------------------ main

def save(out: Path, modules: dict[str, torch.nn.Module], tokenizer_from: Path, dtype: str = "float32",
         schedule: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("text_encoder", "unet", "vae"):
        modules[folder].to("cpu", getattr(torch, dtype)).save_pretrained(out / folder)
        # A part loaded with --init-from records where it came from (a run folder on the GPU host): drop it.
        config = out / folder / "config.json"
        fields = json.loads(config.read_text())
        if fields.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return modelgen._finish(out, tokenizer_from, schedule)


def save_atomically(out: Path, modules: dict[str, torch.nn.Module], tokenizer_from: Path, dtype: str,
                    summary: dict, schedule: dict | None = None) -> Path:
    """``save`` plus training.json into a folder beside ``out``, then swapped in for ``out``."""
    fresh, old = out.with_name(out.name + ".new"), out.with_name(out.name + ".old")
    for stale in (fresh, old):
        shutil.rmtree(stale, ignore_errors=True)
    save(fresh, modules, tokenizer_from, dtype, schedule)
    (fresh / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        out.rename(old)
    fresh.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    from transformers import CLIPTokenizer

    group = Group()
    device = group.start(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True       # fixed shapes: pick the fastest conv algorithms once
    started = time.perf_counter()
    modules = build_models(args)
    for m in modules.values():
        m.to(device)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_from)
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in modules.items()}
    if group.main:
        print("parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in counts.items())
              + f"; processes {group.world}", flush=True)

    summary: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "processes": group.world}
    vae = modules["vae"]
    if args.vae_from is None and args.init_from is None:
        summary["vae_loss"] = train_vae(args, vae, device, group)
        scale = calibrate_scaling(args, vae, device, group)
        vae.register_to_config(scaling_factor=scale)
        if group.main:
            print(f"[vae] scaling_factor {scale:.5f}", flush=True)
            # Saved now, so a failure in phase (b) does not lose it (--vae-from DIR reuses it).
            copy.deepcopy(vae).to("cpu", getattr(torch, args.save_dtype)).save_pretrained(args.out / "vae")
    if args.vae_eval_clips > 0 and group.main:
        summary["vae_reconstruction"] = vae_adherence(vae, args.vae_eval_clips, args.seed + 6, device)
    group.barrier()
    summary["unet_loss"] = train_unet(args, modules["unet"], modules["text_encoder"], vae, tokenizer, device,
                                      group, summary)
    summary["unet_steps"] = getattr(args, "steps_done", 0)
    if group.main:
        if args.eval_clips > 0:
            summary["eval"] = evaluate(args, modules["unet"], modules["text_encoder"], vae, tokenizer, device)
        summary["wall_s"] = time.perf_counter() - started
        out = save_atomically(args.out, modules, args.tokenizer_from, args.save_dtype, summary, schedule_config(args))
        print(f"saved {out} in {summary['wall_s']:.1f} s", flush=True)
    group.barrier()
    group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
