"""Train the tiny text-to-video architecture on the clips of ``t2v.train.world`` and save a model folder.

    python -m t2v.train.train --out runs/world-v1 --device cuda          # the real run (GPU)
    python -m t2v.train.train --out /tmp/smoke --smoke                   # a few steps on the CPU, < 60 s

Same architecture family as ``t2v.modelgen``'s ``tiny`` preset (CLIPTextModel, UNet3DConditionModel
with CrossAttn/Down 3D blocks, AutoencoderKL with 4 levels = 8x downsampling), built by modelgen's own
``_build`` and saved by its ``_finish``, so the services load the result unchanged. For 64x64 clips
of 16 frames the latents are 4 x 16 x 8 x 8 (the engine hard-codes the 8x VAE, so the VAE keeps 4
levels; every width is a flag).

Two phases:

a. AutoencoderKL on single frames: L1 + MSE reconstruction + ``--kl-weight`` x KL. Afterwards its
   ``scaling_factor`` is set to 1/std of the latents (as Stable Diffusion's 0.18215 was found), since
   the decoder service divides by it.
b. UNet3DConditionModel on the (frozen) VAE's latents, DDPM epsilon loss with a DDPMScheduler built
   from ``modelgen.SCHEDULER_CONFIG`` (the schedule the services sample with), conditioned on the
   CLIP text encoder's last hidden state (as the text_encoder service computes it, no attention
   mask). The text encoder is TRAINED JOINTLY: the tiny preset's CLIP has no pretrained weights, so
   freezing it would freeze random features; jointly trained it learns the world's small vocabulary
   (``--freeze-text`` turns this off, e.g. for a pretrained encoder). 10% of captions are replaced by
   "" (``--cfg-drop``), the unconditional prompt the services use for classifier-free guidance.

Data is drawn on the fly by ``world.sample`` in ``--workers`` DataLoader processes (nothing on
disk). bf16 autocast on CUDA. ``--eval-clips N`` samples N train, held-out and paraphrased prompts at the end
with the services' own sampling code (DDIM, guidance 9) and prints the checker's adherence figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from t2v import modelgen
from t2v.train import world

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
    p.add_argument("--vae-steps", type=int, default=6000)
    p.add_argument("--vae-batch", type=int, default=64, help="frames per VAE step")
    p.add_argument("--vae-lr", type=float, default=4e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-from", type=Path, default=None, help="skip phase (a): load vae/ from this model folder")
    # phase (b): UNet (+ text encoder)
    p.add_argument("--steps", type=int, default=40000, help="UNet steps")
    p.add_argument("--batch", type=int, default=64, help="clips per UNet step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--text-lr", type=float, default=1e-4)
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its initial weights")
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of captions replaced by ''")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of UNet/text weights saved (0 = off)")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # sizes (defaults: modelgen's tiny preset, sample sizes for 64x64)
    p.add_argument("--frames", type=int, default=world.FRAMES)
    p.add_argument("--unet-channels", type=ints, default=(32, 64))
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--attention-head-dim", type=int, default=8)
    p.add_argument("--unet-groups", type=int, default=8)
    p.add_argument("--text-hidden", type=int, default=32)
    p.add_argument("--text-intermediate", type=int, default=64)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vae-channels", type=ints, default=(16, 16, 32, 32), help="4 levels = 8x (required)")
    p.add_argument("--vae-layers", type=int, default=1)
    p.add_argument("--vae-groups", type=int, default=8)
    # plumbing
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-clips", type=int, default=32, help="train and held-out prompts sampled at the end (0 = none)")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps per evaluation video")
    p.add_argument("--tokenizer-from", type=Path, default=TOKENIZER_FROM)
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    args.device, args.workers = "cpu", 0
    args.vae_steps, args.vae_batch, args.steps, args.batch = 3, 8, 3, 2
    args.warmup, args.log_every, args.eval_clips, args.eval_steps = 1, 1, 1, 2


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
    if args.vae_from is not None:
        from diffusers import AutoencoderKL
        modules["vae"] = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae")
    return modules


class WorldClips(torch.utils.data.IterableDataset):
    """An endless stream of (frames uint8 [F, H, W, 3], caption) from the training split."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        if info is not None:
            torch.set_num_threads(1)
        while True:
            _, frames, caption = world.sample(rng, "train")
            yield torch.from_numpy(frames), caption


def batches(args: argparse.Namespace, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    loader = torch.utils.data.DataLoader(WorldClips(seed), batch_size=batch, num_workers=args.workers,
                                         pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=args.workers > 0)
    return iter(loader)


def to_pixels(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, F, H, W, 3] uint8 -> [B*F, 3, H, W] float in [-1, 1] on ``device``."""
    x = frames.to(device, non_blocking=True).flatten(0, 1).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class Meter:
    """Loss average and samples/s between two log lines."""

    def __init__(self, name: str, unit: str, sync: bool) -> None:
        self.name, self.unit, self.sync = name, unit, sync
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.loss, self.n = time.perf_counter(), 0, 0.0, 0

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += float(loss.detach())
        self.samples += samples
        self.n += 1

    def log(self, step: int, total: int, extra: str = "") -> float:
        if self.sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self.start
        loss = self.loss / max(1, self.n)
        print(f"[{self.name}] step {step}/{total} loss {loss:.5f} {self.samples / elapsed:.1f} {self.unit}/s{extra}",
              flush=True)
        self.reset()
        return loss


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------ phase (a)

def train_vae(args: argparse.Namespace, vae: torch.nn.Module, device: torch.device) -> float:
    """Phase (a); returns the last logged loss."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(args.warmup, args.vae_steps), args.vae_steps))
    clips_per_step = max(1, math.ceil(args.vae_batch / args.frames))
    data = batches(args, clips_per_step, args.seed + 1)
    meter, last = Meter("vae", "frames", device.type == "cuda"), float("nan")
    for step in range(1, args.vae_steps + 1):
        frames, _ = next(data)
        x = to_pixels(frames, device)
        x = x[torch.randperm(len(x), device=device)[: args.vae_batch]]
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        loss = (recon - x).abs().mean() + torch.mean((recon - x) ** 2) + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        meter.add(loss, len(x))
        if step % args.log_every == 0 or step == args.vae_steps:
            last = meter.log(step, args.vae_steps)
    return last


@torch.no_grad()
def calibrate_scaling(args: argparse.Namespace, vae: torch.nn.Module, device: torch.device) -> float:
    """scaling_factor = 1 / std of the latents, so the UNet sees roughly unit-variance inputs."""
    vae.eval()
    data = batches(args, max(2, min(16, args.batch)), args.seed + 2)
    latents = []
    for _ in range(2 if args.smoke else 8):
        frames, _ = next(data)
        latents.append(vae.encode(to_pixels(frames, device)).latent_dist.sample().float())
    std = float(torch.cat(latents).std())
    return 1.0 / max(std, 1e-6)


# ------------------------------------------------------------------------------------------ phase (b)

def encode_text(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    """As services/text_encoder: padded to 77 tokens, no attention mask, last hidden state."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def to_latents(vae, frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, F, H, W, 3] uint8 -> [B, 4, F, H/8, W/8] scaled latents."""
    bsz, n_frames = frames.shape[:2]
    with torch.no_grad(), autocast(device):
        z = vae.encode(to_pixels(frames, device)).latent_dist.sample().float() * vae.config.scaling_factor
    return z.unflatten(0, (bsz, n_frames)).permute(0, 2, 1, 3, 4).contiguous()


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
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_unet(args, unet, text_encoder, vae, tokenizer, device: torch.device) -> float:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(modelgen.SCHEDULER_CONFIG)
    alphas = noise_scheduler.alphas_cumprod.to(device)
    vae.eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(not args.freeze_text)
    if args.freeze_text:
        text_encoder.eval()
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if not args.freeze_text:
        groups.append({"params": list(text_encoder.parameters()), "lr": args.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(args.warmup, args.steps), args.steps))
    ema = Ema([unet] + ([] if args.freeze_text else [text_encoder]), args.ema) if args.ema > 0 else None
    rng = np.random.default_rng(args.seed + 3)
    data = batches(args, args.batch, args.seed + 4)
    meter, last = Meter("unet", "clips", device.type == "cuda"), float("nan")
    params = [p for g in groups for p in g["params"]]
    for step in range(1, args.steps + 1):
        frames, captions = next(data)
        captions = ["" if rng.random() < args.cfg_drop else c for c in captions]
        latents = to_latents(vae, frames, device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise      # = DDPMScheduler.add_noise
        with autocast(device):
            states = encode_text(tokenizer, text_encoder, captions, device)
            pred = unet(noisy, t, encoder_hidden_states=states).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(step)
        meter.add(loss, len(latents))
        if step % args.log_every == 0 or step == args.steps:
            last = meter.log(step, args.steps, f" lr {sched.get_last_lr()[0]:.2e}")
    if ema is not None:
        ema.copy_to_model()
    return last


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def generate(unet, text_encoder, vae, tokenizer, prompt: str, seed: int, steps: int, guidance: float,
             frames: int, device: torch.device) -> np.ndarray:
    """One video with the denoiser service's own math (services.denoiser.sampling): uint8 [F, H, W, 3]."""
    from services.denoiser import sampling

    unet.eval(), text_encoder.eval(), vae.eval()
    scheduler = sampling.make_scheduler("ddim", {"_class_name": "DDIMScheduler", **modelgen.SCHEDULER_CONFIG})
    scheduler.set_timesteps(steps, device=device)
    states = encode_text(tokenizer, text_encoder, ["", prompt], device).float()
    size = unet.config.sample_size
    latents, generator = sampling.initial_latents((1, unet.config.in_channels, frames, size, size), seed, device,
                                                  torch.float32, scheduler.init_noise_sigma)
    kwargs = sampling.step_kwargs(scheduler, generator)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        with autocast(device):
            pred = unet(x, t, encoder_hidden_states=states).sample.float()
        latents = sampling.scheduler_step(scheduler, sampling.apply_guidance(pred, guidance), t, latents, kwargs)
    flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1) / vae.config.scaling_factor
    images = (vae.decode(flat).sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (images.cpu().numpy() * 255 + 0.5).astype(np.uint8)


def evaluate(args, unet, text_encoder, vae, tokenizer, device: torch.device) -> dict:
    """Checker adherence on ``--eval-clips`` train-split, held-out and paraphrased prompts."""
    from t2v.train import checker

    results = {}
    for name, split, paraphrase in (("train", "train", False), ("heldout", "heldout", False),
                                    ("paraphrase", "train", True)):
        rng = np.random.default_rng(args.seed + 5)
        clips = []
        for i in range(args.eval_clips):
            spec = world.sample_spec(rng, split)
            prompt = world.captions(spec, rng, paraphrase)
            clips.append((generate(unet, text_encoder, vae, tokenizer, prompt, i, args.eval_steps, 9.0,
                                   args.frames, device), spec))
        results[name] = checker.accuracy(clips)
        print(f"[eval] {name}: " + " ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    return results


# ------------------------------------------------------------------------------------------ main

def save(out: Path, modules: dict[str, torch.nn.Module], tokenizer_from: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("text_encoder", "unet", "vae"):
        modules[folder].to("cpu").save_pretrained(out / folder)
    return modelgen._finish(out, tokenizer_from)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    from transformers import CLIPTokenizer

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    modules = build_models(args)
    for m in modules.values():
        m.to(device)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_from)
    counts = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in modules.items()}
    print("parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in counts.items()), flush=True)

    summary: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    vae = modules["vae"]
    if args.vae_from is None:
        summary["vae_loss"] = train_vae(args, vae, device)
        scale = calibrate_scaling(args, vae, device)
        vae.register_to_config(scaling_factor=scale)
        print(f"[vae] scaling_factor {scale:.5f}", flush=True)
    summary["unet_loss"] = train_unet(args, modules["unet"], modules["text_encoder"], vae, tokenizer, device)
    if args.eval_clips > 0:
        summary["eval"] = evaluate(args, modules["unet"], modules["text_encoder"], vae, tokenizer, device)
    out = save(args.out, modules, args.tokenizer_from)
    summary["wall_s"] = time.perf_counter() - started
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {out} in {summary['wall_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
