"""The denoiser's Prometheus metrics: steps, batch sizes, GPU time per batched step, request outcomes.

The engine knows nothing of Prometheus: it reports to an ``EngineObserver``, and
``DenoiserMetrics`` is the observer the server hands it.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import DURATION_BUCKETS, ServiceMetrics
from services.denoiser.engine import EngineObserver

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
OUTCOMES = ("finished", "cancelled", "failed")


class DenoiserMetrics(ServiceMetrics, EngineObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("denoiser", registry)
        r = self.registry
        self.unet_forwards = Counter("t2v_denoiser_unet_forwards", "UNet forwards run (one per batched step)",
                                     registry=r)
        self.request_steps = Counter("t2v_denoiser_steps", "Denoising steps run, summed over requests (a "
                                     "forward for a batch of 3 counts 3)", registry=r)
        self.batch_size = Histogram("t2v_denoiser_batch_size", "Requests sharing one UNet forward",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("t2v_denoiser_step_duration_seconds", "GPU time of one batched denoising "
                                      "step (UNet forward, guidance, scheduler step); on CUDA measured with events, "
                                      "so Python's time is not counted", buckets=DURATION_BUCKETS, registry=r)
        self.requests = Counter("t2v_denoiser_requests", "Requests that left the engine, by outcome "
                                "(finished, cancelled, failed)", ["outcome"], registry=r)
        self.active = Gauge("t2v_denoiser_active_requests", "Requests in the engine now (admitted or waiting "
                            "to be), at most --max-jobs", registry=r)
        self.cache_steps_total = Counter("t2v_denoiser_cache_steps", "Denoising steps of cache=deep requests, by the "
                                         "path they ran: full (the whole UNet, keeping its deep features) or "
                                         "shallow (DeepCache's shallow path on them)", ["path"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for path in ("full", "shallow"):
            self.cache_steps_total.labels(path)

    def watch_active(self, count: Callable[[], int]) -> None:
        """Read the active requests from ``count()`` at each scrape."""
        self.active.set_function(count)

    # --- EngineObserver ----------------------------------------------------------------------
    def step(self, batch_size: int, seconds: float) -> None:
        self.unet_forwards.inc()
        self.request_steps.inc(batch_size)
        self.batch_size.observe(batch_size)
        self.step_seconds.observe(seconds)

    def request_done(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def cache_steps(self, full: int, shallow: int) -> None:
        self.cache_steps_total.labels("full").inc(full)
        self.cache_steps_total.labels("shallow").inc(shallow)
