"""DeepCache for diffusers' UNet3DConditionModel: a full forward that also hands back the UNet's deep
features, and a shallow forward that reuses them.

Why: between neighbouring denoising steps the UNet's deep (low-resolution) features barely change
(Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024: 2.3x on Stable
Diffusion 1.5 at a small loss). On a "full" step a request runs the whole UNet and keeps the input
of the last up-block (the output of every deeper block, upsampled to the first resolution); on the
steps in between it runs only the shallow path, the branch that never leaves the first resolution:
time embedding, ``conv_in``, ``transformer_in``, the layers of the first down-block (not its
downsampler), then the last up-block on the kept features and the skip connections it just
computed, and the output convolution. On text-to-video-ms-1.7b at 16x256x256 that path is about a
fifth of the full forward's FLOPs (docs/benchmarks.md has the measured figures).

Both forwards are written out as diffusers 0.42.1's ``UNet3DConditionModel.forward`` runs them (same
operations, same order; no attention mask, class labels, timestep condition or ControlNet
residuals), so on one device ``full`` returns bit for bit what ``unet(...)`` returns, and ``shallow``
given the features of the same inputs returns bit for bit the same noise too
(tests/unit/test_deepcache.py checks both). Nothing here knows of requests, batches or gRPC: the
engine (engine.py) decides which rows run which path.

Features travel as ``[rows, frames, C, h, w]`` (a view of the UNet's ``[rows * frames, C, h, w]``),
so every input and output of both forwards has the batch's rows first: CUDA graphs (graphs.py) pad
and slice them like the samples.
"""

from __future__ import annotations

from typing import Any

import torch

from services.denoiser.cross_attention import attention_kwargs


class DeepCacheUNet:
    """``full(sample, timesteps, embeddings) -> (noise, features)`` and
    ``shallow(sample, timesteps, embeddings, features) -> noise`` for one UNet3DConditionModel.

    ``branch`` (DeepCache's skip branch) says how much of the first resolution the shallow path runs:
    the first ``branch`` layers of the first down-block and the last ``branch + 1`` layers of the last
    up-block; the features are the input of the first of those up-block layers. ``branch`` = the
    UNet's layers per block (the default) runs both blocks whole; 0 runs only conv_in,
    transformer_in and the last layer of the last up-block (cheaper, less faithful)."""

    def __init__(self, unet: Any, branch: int | None = None) -> None:
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        layers = len(first.resnets)
        # The last up-block takes as skip connections conv_in's output and the output of each layer of
        # the first down-block (its layer j the one of down-layer L-1-j, its last layer conv_in's); the
        # downsampler's output goes to the up-block before it.
        if len(last.resnets) != 1 + layers:
            raise ValueError(f"DeepCache needs the last up-block to take {1 + layers} skip connections "
                             f"(conv_in and each layer of the first down-block); it has {len(last.resnets)}")
        if getattr(last, "upsamplers", None):
            raise ValueError("the last up-block upsamples; DeepCache's shallow path expects it not to")
        if any(getattr(block, name, None) for block in unet.up_blocks for name in ("s1", "s2", "b1", "b2")):
            raise ValueError("FreeU is enabled on this UNet; DeepCache's forwards do not apply it")
        branch = layers if branch is None else int(branch)
        if not 0 <= branch <= layers:
            raise ValueError(f"deep-cache branch is {branch}; this UNet's blocks have {layers} layers, so it "
                             f"must be between 0 and {layers}")
        self.unet, self.layers, self.branch = unet, layers, branch

    # --- the parts both forwards share ---------------------------------------------------------
    def _inputs(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Time embedding, conv_in and transformer_in, as UNet3DConditionModel.forward's steps 1-2."""
        unet = self.unet
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.int64, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        num_frames = sample.shape[2]
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = unet.time_proj(timesteps)
        t_emb = t_emb.to(dtype=unet.dtype)
        emb = unet.time_embedding(t_emb, None)
        emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(
            num_frames, dim=0, output_size=encoder_hidden_states.shape[0] * num_frames)
        sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1) + sample.shape[3:])
        sample = unet.conv_in(sample)
        # transformer_in and the temporal attentions attend over frames (no prompt): no frame count for them
        sample = unet.transformer_in(sample, num_frames=num_frames, cross_attention_kwargs=None,
                                     return_dict=False)[0]
        return sample, emb, encoder_hidden_states, num_frames

    def _layer(self, block: Any, i: int, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor,
               num_frames: int) -> torch.Tensor:
        """Layer ``i`` of a 3D down- or up-block (its input already concatenated with the skip connection
        for an up-block), as the block's forward runs it."""
        sample = block.resnets[i](sample, emb)
        sample = block.temp_convs[i](sample, num_frames=num_frames)
        if getattr(block, "has_cross_attention", False):
            sample = block.attentions[i](sample, encoder_hidden_states=encoder_hidden_states,
                                         cross_attention_kwargs=attention_kwargs(self.unet, num_frames),
                                         return_dict=False)[0]
            sample = block.temp_attentions[i](sample, num_frames=num_frames, cross_attention_kwargs=None,
                                              return_dict=False)[0]
        return sample

    def _output(self, sample: torch.Tensor, first_layer: int, res_samples: tuple[torch.Tensor, ...],
                emb: torch.Tensor, encoder_hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The last up-block from its layer ``first_layer`` on (each layer takes the last of
        ``res_samples`` as its skip connection), then the output convolution."""
        unet, block = self.unet, self.unet.up_blocks[-1]
        for j in range(first_layer, len(block.resnets)):
            res_hidden_states, res_samples = res_samples[-1], res_samples[:-1]
            sample = torch.cat([sample, res_hidden_states], dim=1)
            sample = self._layer(block, j, sample, emb, encoder_hidden_states, num_frames)
        if unet.conv_norm_out:
            sample = unet.conv_norm_out(sample)
            sample = unet.conv_act(sample)
        sample = unet.conv_out(sample)
        return sample[None, :].reshape((-1, num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)

    # --- the two forwards ----------------------------------------------------------------------
    def full(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet: (noise [B, C, F, H, W], features [B, F, C', H, W] for ``shallow``)."""
        unet = self.unet
        rows = sample.shape[0]
        forward_upsample_size = any(s % (2 ** unet.num_upsamplers) != 0 for s in sample.shape[-2:])
        upsample_size = None
        sample, emb, encoder_hidden_states, num_frames = self._inputs(sample, timestep, encoder_hidden_states)

        down_block_res_samples: tuple[torch.Tensor, ...] = (sample,)
        for downsample_block in unet.down_blocks:
            if getattr(downsample_block, "has_cross_attention", False):
                sample, res_samples = downsample_block(
                    hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                    attention_mask=None, num_frames=num_frames,
                    cross_attention_kwargs=attention_kwargs(unet, num_frames))
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb, num_frames=num_frames)
            down_block_res_samples += res_samples

        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states, attention_mask=None,
                                    num_frames=num_frames, cross_attention_kwargs=attention_kwargs(unet, num_frames))

        for upsample_block in unet.up_blocks[:-1]:
            res_samples = down_block_res_samples[-len(upsample_block.resnets):]
            down_block_res_samples = down_block_res_samples[:-len(upsample_block.resnets)]
            if forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if getattr(upsample_block, "has_cross_attention", False):
                sample = upsample_block(
                    hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size, attention_mask=None,
                    num_frames=num_frames, cross_attention_kwargs=attention_kwargs(unet, num_frames))
            else:
                sample = upsample_block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples,
                                        upsample_size=upsample_size, num_frames=num_frames)

        # The last up-block layer by layer, keeping the input of the layer the shallow path starts at.
        block, res_samples = unet.up_blocks[-1], down_block_res_samples
        start = self.layers - self.branch
        features = sample
        for j in range(start):
            res_hidden_states, res_samples = res_samples[-1], res_samples[:-1]
            sample = torch.cat([sample, res_hidden_states], dim=1)
            sample = self._layer(block, j, sample, emb, encoder_hidden_states, num_frames)
            features = sample
        noise = self._output(sample, start, res_samples, emb, encoder_hidden_states, num_frames)
        return noise, features.reshape((rows, num_frames) + features.shape[1:])

    def shallow(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
        """The noise from the shallow path, with ``features`` [B, F, C', H, W] kept by an earlier ``full``."""
        sample, emb, encoder_hidden_states, num_frames = self._inputs(sample, timestep, encoder_hidden_states)
        res_samples: tuple[torch.Tensor, ...] = (sample,)
        block = self.unet.down_blocks[0]
        for i in range(self.branch):         # the first down-block's first layers, not its downsampler
            sample = self._layer(block, i, sample, emb, encoder_hidden_states, num_frames)
            res_samples += (sample,)
        cached = features.reshape((-1,) + features.shape[2:])
        return self._output(cached, self.layers - self.branch, res_samples, emb, encoder_hidden_states, num_frames)
