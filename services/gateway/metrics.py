"""The gateway's Prometheus metrics: the queue, the jobs, the stages as the gateway sees them.

``GatewayMetrics`` is a ``ServiceMetrics`` (ready state, gRPC calls by method and code) plus the job
metrics below, and it is an ``observer.JobObserver``: the job system's hooks feed it. Nothing is
wired here; the wiring, in ``services/gateway/app.py``'s ``Gateway``:

    # __init__: serve() then serves self.metrics on --metrics-port and grpc_errors counts the calls
    self.metrics = GatewayMetrics()
    self.observer = observer or self.metrics
    # load(): the runner wrapped, so the orchestrator's events give stage durations and steps
    self.jobs = JobService(store, results, self.metrics.observing(self.orchestrator), settings,
                           self.observer).start()

The observer hooks give the queue, job, cache and slot metrics; ``observing(orchestrator)`` gives
each stage's duration and the denoising steps (``observe(events)`` does the same for any loop over
``orchestrator.run``). Without the job system the plain methods do the same by hand: ``queued``,
``set_queue_depth``, ``started``, ``in_flight``, ``finished``, ``cache_hit``, ``cache_miss``,
``stage_seconds``, ``steps``.

``priority`` may be ``queue.Priority``, the ``t2v.v1.Priority`` number or a name ("high",
"PRIORITY_HIGH"); ``stage`` the ``t2v.v1.Stage`` number or a name ("denoiser"). Label values stay
bounded: an unknown outcome, priority or stage raises ValueError (the job system's ``SafeObserver``
logs it; the tests catch it).

Two more feeds, wired in ``app.Gateway.load``: ``watch_result_store(results.space)`` reads the result
store's free and total bytes at each scrape (a statvfs for a folder; nothing for PostgreSQL, which cannot
tell), and the HTTP API's ``HttpRequestMetrics`` middleware counts each request by method, route
template (``/v1/videos/{video_id}``, never the raw path) and status class, and times it.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import DURATION_BUCKETS, ServiceMetrics
from services.gateway.answers import AnswerWatch
from services.gateway.domain import JobRecord, JobStatus, Progress, Result, RunEvent, StageStarted
from services.gateway.observer import JobObserver
from t2v.v1 import gateway_pb2

OUTCOMES = ("completed", "failed", "cancelled", "expired", "deadline_exceeded")
PRIORITIES = ("low", "normal", "high")
STAGES = ("text_encoder", "denoiser", "decoder")
APIS = ("grpc", "http")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
OTHER = "other"                 # a method outside HTTP_METHODS, a path that matches no route

log = logging.getLogger("gateway.metrics")

_PRIORITY_NUMBERS = {gateway_pb2.PRIORITY_UNSPECIFIED: "normal", gateway_pb2.PRIORITY_LOW: "low",
                     gateway_pb2.PRIORITY_NORMAL: "normal", gateway_pb2.PRIORITY_HIGH: "high"}
_STAGE_NUMBERS = {gateway_pb2.STAGE_TEXT_ENCODER: "text_encoder", gateway_pb2.STAGE_DENOISER: "denoiser",
                  gateway_pb2.STAGE_DECODER: "decoder"}
# Queue waits: from instant to an hour behind a long line of long videos.
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


def priority_label(priority: int | str) -> str:
    if isinstance(priority, enum.Enum):          # queue.Priority (LOW = 0 ...): its name, not its number
        priority = priority.name
    elif isinstance(priority, int) and priority in _PRIORITY_NUMBERS:
        return _PRIORITY_NUMBERS[priority]
    name = str(priority).lower().removeprefix("priority_")
    if name == "unspecified":
        return "normal"
    if name not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    return name


def stage_label(stage: int | str) -> str:
    if isinstance(stage, enum.Enum):
        stage = stage.name
    elif isinstance(stage, int) and stage in _STAGE_NUMBERS:
        return _STAGE_NUMBERS[stage]
    name = str(stage).lower().removeprefix("stage_")
    if name not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return name


def outcome_label(job: JobRecord, status: JobStatus) -> str:
    """COMPLETED -> completed, CANCELLED -> cancelled, FAILED -> failed or deadline_exceeded."""
    if status == JobStatus.FAILED and job.error_code == "DEADLINE_EXCEEDED":
        return "deadline_exceeded"
    return JobStatus(status).value


class GatewayMetrics(ServiceMetrics, JobObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("gateway", registry)
        r = self.registry
        self._queued = Counter("t2v_gateway_jobs_queued", "Jobs that entered the queue, by priority",
                               ["priority"], registry=r)
        self._queue_depth = Gauge("t2v_gateway_queue_depth", "Jobs waiting in the queue now, by priority",
                                  ["priority"], registry=r)
        self._queue_seconds = Histogram("t2v_gateway_queue_wait_seconds", "Time a job waited in the "
                                        "queue before it started, in seconds, by priority", ["priority"],
                                        buckets=QUEUE_BUCKETS, registry=r)
        self._jobs = Counter("t2v_gateway_jobs", "Jobs that ended, by outcome (completed, failed, cancelled, "
                             "deadline_exceeded; expired: a completed job's video deleted after its "
                             "retention time, counted again); cache hits are not included", ["outcome"],
                             registry=r)
        self._job_seconds = Histogram("t2v_gateway_job_duration_seconds", "Time from submission to the end of "
                                      "a job (queue time included), in seconds, by outcome", ["outcome"],
                                      buckets=JOB_BUCKETS, registry=r)
        self._in_flight = Gauge("t2v_gateway_jobs_in_flight", "Jobs holding a slot (running in the stages) now",
                                registry=r)
        self._stage_seconds = Histogram("t2v_gateway_stage_duration_seconds", "Time of one stage of a job as "
                                        "the gateway sees it (call and transfer included), in seconds, by stage",
                                        ["stage"], buckets=DURATION_BUCKETS, registry=r)
        self._steps = Counter("t2v_gateway_denoising_steps", "Denoising steps reported by the denoiser for "
                              "the gateway's jobs", registry=r)
        self._cache_hits = Counter("t2v_gateway_cache_hits", "Jobs answered from the result cache", registry=r)
        self._cache_misses = Counter("t2v_gateway_cache_misses", "Cacheable jobs not found in the result cache",
                                     registry=r)
        for priority in PRIORITIES:       # every series exists from the start, at 0
            self._queued.labels(priority)
            self._queue_depth.labels(priority)
            self._queue_seconds.labels(priority)
        for outcome in OUTCOMES:
            self._jobs.labels(outcome)
            if outcome != "expired":
                self._job_seconds.labels(outcome)
        for stage in STAGES:
            self._stage_seconds.labels(stage)
        self._rate_limited = Counter("t2v_gateway_rate_limited", "Requests refused by the per-key rate limit "
                                     "(--rate-limit-per-minute), by front door (grpc, http); never by key",
                                     ["api"], registry=r)
        for api in APIS:
            self._rate_limited.labels(api)
        self._http_requests = Counter("t2v_gateway_http_requests", "HTTP API requests answered, by method, route "
                                      "template (/v1/videos/{video_id}, never the raw path; other: no route) and "
                                      "status class (2xx ... 5xx; none: the client left before an answer)",
                                      ["method", "route", "status"], registry=r)
        self._http_seconds = Histogram("t2v_gateway_http_request_duration_seconds", "Time to answer an HTTP API "
                                       "request, until its last byte (an event stream: as long as it was open), in "
                                       "seconds, by method and route template", ["method", "route"],
                                       buckets=DURATION_BUCKETS, registry=r)
        self._result_store_space: Callable[[], tuple[int, int] | None] | None = None
        r.register(_ResultStoreCollector(self))

    # --- the HTTP API (HttpRequestMetrics calls it) -------------------------------------------------
    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request answered with ``status`` (0: none sent) on ``route``, a route template or OTHER."""
        method = method if method in HTTP_METHODS else OTHER
        status_class = f"{status // 100}xx" if 100 <= status <= 599 else "none"
        self._http_requests.labels(method, route, status_class).inc()
        self._http_seconds.labels(method, route).observe(seconds)

    # --- the result store ----------------------------------------------------------------------
    def watch_result_store(self, space: Callable[[], tuple[int, int] | None]) -> None:
        """Read the result store's (bytes free, bytes in all) from ``space()`` at each scrape
        (``ResultStore.space``); None, or an OSError, exports nothing then."""
        self._result_store_space = space

    def rate_limited(self, api: str) -> None:
        """A request refused by the per-key rate limit (``ratelimit.RateLimiter``'s ``on_refused``)."""
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; expected one of {', '.join(APIS)}")
        self._rate_limited.labels(api).inc()

    # --- the queue ---------------------------------------------------------------------------
    def queued(self, priority: int | str) -> None:
        self._queued.labels(priority_label(priority)).inc()

    def set_queue_depth(self, priority: int | str, n: int) -> None:
        self._queue_depth.labels(priority_label(priority)).set(n)

    def watch_queue(self, depth: Callable[[str], int]) -> None:
        """Instead of ``set_queue_depth`` calls: read ``depth("high")`` ... at each scrape."""
        for priority in PRIORITIES:
            self._queue_depth.labels(priority).set_function(lambda p=priority: depth(p))

    def started(self, priority: int | str, queue_seconds: float) -> None:
        self._queue_seconds.labels(priority_label(priority)).observe(queue_seconds)

    # --- the jobs ----------------------------------------------------------------------------
    def in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def finished(self, outcome: str, seconds: float | None = None, count: int = 1) -> None:
        """A job ended; ``seconds`` from submission to the end (None: count it, observe no time)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown job outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
        self._jobs.labels(outcome).inc(count)
        if seconds is not None:
            self._job_seconds.labels(outcome).observe(seconds)

    def cache_hit(self, job: JobRecord | None = None) -> None:
        self._cache_hits.inc()

    def cache_miss(self, job: JobRecord | None = None) -> None:
        self._cache_misses.inc()

    # --- the job system's hooks (observer.JobObserver) ------------------------------------------
    def job_queued(self, job: JobRecord) -> None:
        self.queued(job.priority)

    def job_started(self, job: JobRecord, queued_seconds: float) -> None:
        self.started(job.priority, queued_seconds)

    def job_finished(self, job: JobRecord, outcome: JobStatus, seconds: float) -> None:
        total = (job.finished_ms - job.created_ms) / 1000 if job.finished_ms and job.created_ms else seconds
        self.finished(outcome_label(job, outcome), max(0.0, total))

    def queue_depth(self, depth: int, by_priority: dict[str, int] | None = None) -> None:
        for priority, n in (by_priority or {}).items():
            self.set_queue_depth(priority, n)

    def jobs_running(self, count: int) -> None:
        self.in_flight(count)

    def results_expired(self, count: int) -> None:
        self.finished("expired", count=count)

    # --- the stages --------------------------------------------------------------------------
    def stage_seconds(self, stage: int | str, seconds: float) -> None:
        self._stage_seconds.labels(stage_label(stage)).observe(seconds)

    def steps(self, n: int = 1) -> None:
        self._steps.inc(n)

    def observe(self, events: Iterable[RunEvent]) -> Iterator[RunEvent]:
        """Pass the orchestrator's events through unchanged, recording each stage's duration (from its
        StageStarted to the next StageStarted or the Result) and one denoising step per Progress.

        A stage that fails or is cancelled records no duration (the job's outcome says what happened).
        The time is taken as the events arrive, so it includes the consumer's own time between two
        events: small for the job system, which only stores them.
        """
        stage: int | None = None
        since = 0.0
        try:
            for event in events:
                now = time.monotonic()
                if isinstance(event, StageStarted):
                    if stage is not None:
                        self.stage_seconds(stage, now - since)
                    stage, since = event.stage, now
                elif isinstance(event, Progress):
                    self.steps()
                elif isinstance(event, Result) and stage is not None:
                    self.stage_seconds(stage, now - since)
                    stage = None
                yield event
        finally:
            close = getattr(events, "close", None)     # the consumer stopped early: stop the run now
            if close is not None:
                close()

    def observing(self, runner: Any) -> "ObservedRunner":
        """``runner`` (the orchestrator, or anything with its ``run``) with its events observed."""
        return ObservedRunner(runner, self)


class ObservedRunner:
    """A runner whose ``run`` yields the inner runner's events through ``GatewayMetrics.observe``."""

    def __init__(self, inner: Any, metrics: GatewayMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def run(self, *args: Any, **kwargs: Any) -> Iterator[RunEvent]:
        return self.metrics.observe(self.inner.run(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:      # close() and the rest: the orchestrator's own
        return getattr(self.inner, name)


class _ResultStoreCollector(Collector):
    """``t2v_gateway_result_store_free_bytes`` and ``..._size_bytes``, read at each scrape; absent while the
    store cannot tell (PostgreSQL) or is not watched yet."""

    FREE = "t2v_gateway_result_store_free_bytes"
    SIZE = "t2v_gateway_result_store_size_bytes"

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.FREE, ""), GaugeMetricFamily(self.SIZE, "")]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        space = self.metrics._result_store_space
        if space is None:
            return
        try:
            answer = space()
        except OSError as error:               # the folder is gone or unreadable: say nothing rather than fail
            log.debug("result store space unknown: %s", error)
            return
        if answer is None:
            return
        free, size = answer
        yield GaugeMetricFamily(self.FREE, "Bytes free for videos where the result store keeps them (its file "
                                "system's space available to the gateway); file stores only", value=free)
        yield GaugeMetricFamily(self.SIZE, "Size in bytes of the file system the result store keeps videos on; "
                                "file stores only", value=size)


def route_template(scope: dict[str, Any], routes: Iterable[Any] = ()) -> str:
    """The path template of the route that served ``scope`` (``/v1/videos/{video_id}/content``), else of the
    first of ``routes`` that matches it (a request refused before routing: 401, 429), else OTHER. A path
    asked with the wrong method (405) still names its route. The label never carries a raw path, so its
    values are as few as the routes."""
    from starlette.routing import Match     # here: only the HTTP API needs starlette

    served = getattr(scope.get("route"), "path", None)      # set by the router (Starlette, FastAPI)
    if isinstance(served, str):
        return served
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route.path
        if match is Match.PARTIAL and partial is None:
            partial = route.path
    return partial or OTHER


class HttpRequestMetrics:
    """ASGI middleware, outside the API-key door: every request, refused ones (401, 429) included, is counted
    and timed by ``GatewayMetrics.http_request`` when its answer ends (answers.py: just before its last
    bytes go to the server, so a client that has its answer finds it counted on its next scrape), else
    when the app ends without one (an error, a client gone). ``routes``: the API's routes
    (``APIRouter.routes``, the app's own), to name the route of a request the router did not mark as its."""

    def __init__(self, app: Any, metrics: GatewayMetrics, routes: Iterable[Any] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = [r for r in routes if isinstance(getattr(r, "path", None), str)]   # not included routers

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        answer = AnswerWatch(send, lambda status: self.metrics.http_request(
            scope["method"], route_template(scope, self.routes), status, time.monotonic() - started))
        await answer.serve(self.app, scope, receive)
