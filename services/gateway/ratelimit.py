"""Per-key rate limits for the gateway's two front doors: a token bucket per API key (per client
address when keys are off), shared by gRPC and HTTP, so a key's budget is the same whichever it uses.

Why a token bucket: a client may send a burst (``burst`` requests at once, e.g. submit a few jobs and
poll them), then ``per_minute`` a minute on average; a refusal says exactly when the next request
will pass. Why here and not in the queue: the queue's limit (``--max-queue``) protects the GPUs from
too many jobs in all; this one keeps one client from taking the whole gateway (its queue slots, its
gRPC threads, its SQLite) from the others, whatever the calls are.

Every call that needs a key counts once (health checks, ``GET /`` and ``GET /healthz`` never do); a
call refused for a missing or wrong key counts nothing (the check comes after the key check).
Refusals are ``RESOURCE_EXHAUSTED`` with a ``retry-after`` trailer (gRPC) or 429 with ``Retry-After``
(HTTP). Keys are never logged nor used as metric labels: the refusal counter's only label is ``api``.

Where the buckets live (``Buckets``): in this process (``MemoryBuckets``, the default), or, when the job
store is shared by several gateways, in its database (the store's ``rate_buckets()``; PostgreSQL's keeps
one row per client), so a key's budget holds across every gateway instead of being N times it. This module
defines the protocol and the store implements it: the limiter knows nothing of the store.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import grpc

from services.common.auth import OPEN_METHOD_PREFIXES, presented_key

MAX_BUCKETS = 10_000          # clients tracked at once; full buckets are dropped first (they equal no bucket)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimited(Exception):
    """A request over its key's rate; ``retry_after_seconds`` until the next one passes."""

    def __init__(self, retry_after_seconds: int, per_minute: float, burst: int, by_key: bool = True) -> None:
        self.retry_after_seconds = retry_after_seconds
        who = "this API key" if by_key else "this client address"
        super().__init__(f"too many requests for {who} (the gateway allows {per_minute:g} a minute, "
                         f"{burst} at once); retry in about {retry_after_seconds} s")


class Buckets(Protocol):
    """Token buckets by client identity: where a limiter keeps them (this process, or a shared database)."""

    def take(self, identity: str, now: float, rate_per_second: float, burst: float) -> float:
        """Refill ``identity``'s bucket (``burst`` tokens at most, ``rate_per_second``) and spend one token:
        0.0 when one was spent, else the seconds until one will be there. ``now`` is the limiter's clock
        (seconds); buckets shared between processes use one clock of their own instead (a process's
        monotonic clock means nothing to another)."""


class MemoryBuckets:
    """The buckets in this process's memory: at most MAX_BUCKETS, refilled ones dropped first. Thread-safe."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identity: str, now: float, rate_per_second: float, burst: float) -> float:
        with self._lock:
            bucket = self._buckets.get(identity)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._prune(now, rate_per_second, burst)
                bucket = self._buckets[identity] = _Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate_per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate_per_second

    def _prune(self, now: float, rate_per_second: float, burst: float) -> None:
        """Forget buckets that have refilled (they equal a new one); if none has, the least recent half."""
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.updated) * rate_per_second >= burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:
            by_age = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in by_age[: len(by_age) // 2]:
                del self._buckets[key]


class RateLimiter:
    """Token buckets by client identity: ``burst`` tokens each, refilled at ``per_minute`` a minute.

    ``on_refused(api)`` is called once per refusal (the gateway counts them in its metrics). The buckets
    are ``buckets`` (default: in this process); ``use`` switches to others, e.g. the shared job store's
    once it is open (the gRPC interceptors need the limiter before that)."""

    def __init__(self, per_minute: float, burst: int = 0, clock: Callable[[], float] = time.monotonic,
                 on_refused: Callable[[str], None] | None = None, buckets: Buckets | None = None) -> None:
        if not per_minute > 0:
            raise ValueError(f"--rate-limit-per-minute is {per_minute}; it must be above 0 (or 0 for no limit)")
        if burst < 0:
            raise ValueError(f"--rate-limit-burst is {burst}; it must be at least 0 (0 = one minute's worth)")
        self.per_minute = per_minute
        self.burst = burst or max(1, math.ceil(per_minute))
        self._rate = per_minute / 60.0                     # tokens a second
        self._clock = clock
        self._on_refused = on_refused
        self.buckets: Buckets = buckets if buckets is not None else MemoryBuckets()

    def use(self, buckets: Buckets) -> None:
        """Keep the buckets in ``buckets`` from now on (what this process counted so far is not carried over)."""
        self.buckets = buckets

    def take(self, identity: str, api: str) -> None:
        """Spend one token of ``identity``'s bucket, or raise RateLimited (``api``: grpc or http)."""
        wait = self.buckets.take(identity, self._clock(), self._rate, float(self.burst))
        if wait <= 0.0:
            return
        if self._on_refused is not None:
            self._on_refused(api)
        raise RateLimited(max(1, math.ceil(wait)), self.per_minute, self.burst, identity.startswith("key:"))


def identity(key: str | None, peer_host: str) -> str:
    """Whom a request counts against: its API key, else (keys off) the client's address."""
    return f"key:{key}" if key is not None else f"addr:{peer_host}"


def peer_host(peer: str) -> str:
    """The address part of gRPC's ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer


class RateLimitInterceptor(grpc.ServerInterceptor):
    """Charges each call to its key's bucket; over the rate, RESOURCE_EXHAUSTED with ``retry-after``.

    The charge happens when the handler runs, not in ``intercept_service``: ``ApiKeyInterceptor``
    (placed before this one) looks up the handler even for a call it refuses, and such a call must
    cost its (wrong) key nothing."""

    def __init__(self, limiter: RateLimiter, by_key: bool,
                 open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        self._limiter = limiter
        self._by_key = by_key          # keys on (and checked before): count by key; else by address only
        self._open = open_prefixes

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        # With keys off a sent key is unchecked: counting by it would let a client dodge its limit.
        key = presented_key(handler_call_details.invocation_metadata) if self._by_key else None
        limiter = self._limiter

        def charged(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    limiter.take(identity(key, peer_host(context.peer())), "grpc")
                except RateLimited as refused:
                    context.set_trailing_metadata((("retry-after", str(refused.retry_after_seconds)),))
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refused))
                return behavior(request, context)
            return run

        for attribute, make in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                                ("unary_stream", grpc.unary_stream_rpc_method_handler),
                                ("stream_unary", grpc.stream_unary_rpc_method_handler),
                                ("stream_stream", grpc.stream_stream_rpc_method_handler)):
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return make(charged(behavior), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler
