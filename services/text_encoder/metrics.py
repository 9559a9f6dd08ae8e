"""The text encoder's Prometheus metrics: encode time, prompts encoded, prompts truncated."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import DURATION_BUCKETS, ServiceMetrics


class TextEncoderMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("text_encoder", registry)
        r = self.registry
        self.encode_seconds = Histogram("t2v_text_encoder_encode_duration_seconds", "Time to encode the prompts "
                                        "of one call (CLIP text model forward, copy to the CPU), in seconds",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.prompts = Counter("t2v_text_encoder_prompts", "Prompts encoded (a negative prompt counts as one)",
                               registry=r)
        self.truncated = Counter("t2v_text_encoder_prompts_truncated", "Prompts longer than the model's 77 "
                                 "tokens, whose end was dropped", registry=r)

    def encoded(self, prompts: int, truncated: int, seconds: float) -> None:
        self.encode_seconds.observe(seconds)
        self.prompts.inc(prompts)
        self.truncated.inc(truncated)
