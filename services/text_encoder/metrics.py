"""The text encoder's Prometheus metrics: encode time, prompts encoded and truncated, prompts a forward."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import DURATION_BUCKETS, ServiceMetrics


class TextEncoderMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("text_encoder", registry)
        r = self.registry
        self.encode_seconds = Histogram("t2v_text_encoder_encode_duration_seconds", "Time of one forward of "
                                        "the text model (CLIP, copy to the CPU), for the prompts of every "
                                        "Encode call batched into it, in seconds",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.prompts = Counter("t2v_text_encoder_prompts", "Prompts encoded (a negative prompt counts as one)",
                               registry=r)
        self.truncated = Counter("t2v_text_encoder_prompts_truncated", "Prompts longer than the model's 77 "
                                 "tokens, whose end was dropped", registry=r)
        self.batch_prompts = Histogram("t2v_text_encoder_batch_prompts", "Prompts in one forward, of all the "
                                       "Encode calls that shared it", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                                       registry=r)

    def encoded(self, prompts: int, truncated: int) -> None:
        """One Encode call answered."""
        self.prompts.inc(prompts)
        self.truncated.inc(truncated)

    def batched(self, prompts: int, seconds: float) -> None:
        """One forward run, for ``prompts`` of one or more calls."""
        self.encode_seconds.observe(seconds)
        self.batch_prompts.observe(prompts)
