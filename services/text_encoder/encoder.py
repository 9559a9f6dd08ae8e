"""CLIP tokenizer + text model: prompts in, per-token embeddings out. Knows nothing of gRPC.

It does exactly what diffusers' TextToVideoSDPipeline.encode_prompt does (pad to 77, truncate,
attention mask only if the config asks for it, last hidden state), so the mesh's embeddings equal
the one-process pipeline's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from services.common.model_folder import model_part


@dataclass(frozen=True)
class PromptReport:
    num_tokens: int
    truncated: bool
    dropped_text: str


class TextEncoder:
    def __init__(self, model: str | Path, device: torch.device, dtype: torch.dtype) -> None:
        self.tokenizer = CLIPTokenizer.from_pretrained(model_part(model, "tokenizer"))
        self.model = CLIPTextModel.from_pretrained(model_part(model, "text_encoder"), dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.max_length = int(self.tokenizer.model_max_length)
        # The fast tokenizer keeps its padding and truncation settings in shared state that every call
        # rewrites, so two gRPC threads tokenizing at once can pad one call's batch by the other's
        # settings (ragged rows, a ValueError). Found by the load test (tests/e2e/test_load.py).
        self._tokenizer_lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def report(self, prompts: list[str]) -> list[PromptReport]:
        """How many tokens each prompt has and what truncation at ``max_length`` drops."""
        reports = []
        for prompt in prompts:
            with self._tokenizer_lock:
                ids = self.tokenizer(prompt, verbose=False).input_ids
                truncated = len(ids) > self.max_length
                dropped = self.tokenizer.decode(ids[self.max_length - 1 : -1]) if truncated else ""
            reports.append(PromptReport(len(ids), truncated, dropped))
        return reports

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), 77, hidden] in the model's dtype, all prompts in one forward pass."""
        with self._tokenizer_lock:
            inputs = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.model.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        return self.model(inputs.input_ids.to(self.device), attention_mask=mask)[0]
