"""Metrics without servers: the registries, what each method records, the gRPC wrapper's counting,
the gateway's event adapter, and promtool on every service's exposition."""

from __future__ import annotations

import asyncio
import os
import re
import types
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from prometheus_client import generate_latest

from services.common import metrics as common_metrics
from services.common.config import ServerConfig, parse_config
from services.common.errors import InvalidArgument, Unavailable, grpc_errors
from services.common.metrics import ServiceMetrics, build_info, git_revision, metrics_of
from services.decoder.metrics import DecoderMetrics
from services.denoiser.engine import EngineObserver
from services.denoiser.metrics import DenoiserMetrics
from services.gateway import metrics as gateway_metrics
from services.gateway import domain
from services.gateway.metrics import GatewayMetrics, priority_label, stage_label
from services.gateway.http import Backend, create_app
from services.gateway.observer import JobObserver
from services.gateway.domain import JobRecord, JobStatus, Limits, Priority
from services.gateway.store.postgres import PostgresResultStore
from services.gateway.store.sqlite import FileResultStore
from services.text_encoder.metrics import TextEncoderMetrics
from t2v.up import Mesh, MeshPorts
from t2v.v1 import gateway_pb2
from tests.promtool import promtool_check


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    assert sample is not None, f"{name}{labels} is not exposed"
    return sample


# --- common ------------------------------------------------------------------------------------

def test_each_service_metrics_has_its_own_registry() -> None:
    a, b = ServiceMetrics("a"), ServiceMetrics("b")   # same metric names twice: no "Duplicated timeseries"
    a.rpc_started("Encode")
    a.rpc_finished("Encode", "OK", 0.2)
    assert value(a, "t2v_grpc_requests_total", method="Encode", code="OK") == 1
    assert b.registry.get_sample_value("t2v_grpc_requests_total", {"method": "Encode", "code": "OK"}) is None
    assert value(a, "t2v_grpc_request_duration_seconds_sum", method="Encode") == pytest.approx(0.2)
    assert value(a, "t2v_grpc_requests_in_progress", method="Encode") == 0


def test_model_loaded_starts_at_zero_and_records_the_load_time() -> None:
    metrics = ServiceMetrics("decoder")
    assert value(metrics, "t2v_model_loaded", stage="decoder") == 0
    metrics.model_loaded(3.5)
    assert value(metrics, "t2v_model_loaded", stage="decoder") == 1
    assert value(metrics, "t2v_model_load_duration_seconds_sum", stage="decoder") == 3.5
    assert value(metrics, "t2v_model_load_duration_seconds_count", stage="decoder") == 1
    metrics.model_unloaded()
    assert value(metrics, "t2v_model_loaded", stage="decoder") == 0


def test_the_standard_process_metrics_are_in_every_registry() -> None:
    text = generate_latest(ServiceMetrics("x").registry).decode()
    assert "process_resident_memory_bytes" in text and "python_info" in text


@pytest.mark.parametrize("cls", [TextEncoderMetrics, DenoiserMetrics, DecoderMetrics, GatewayMetrics])
def test_every_service_says_which_build_runs(cls: type[ServiceMetrics]) -> None:
    info = build_info()
    assert value(cls(), "t2v_build_info", **info) == 1
    assert info["version"] == metadata.version("t2v-mesh") and info["grpc"] == metadata.version("grpcio")
    assert info["torch"] == metadata.version("torch")
    assert re.fullmatch(r"[0-9a-f]{12}|unknown", info["revision"]), info


def test_build_info_takes_the_images_revision_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    build_info.cache_clear()
    try:
        monkeypatch.setenv(common_metrics.ENV_REVISION, "0123456789ab")
        assert build_info()["revision"] == "0123456789ab"
        assert value(ServiceMetrics("x"), "t2v_build_info", **build_info()) == 1
    finally:
        build_info.cache_clear()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_git_revision_reads_a_checkout_without_git(tmp_path: Path) -> None:
    commit, other = "a" * 40, "b" * 40
    plain = tmp_path / "plain"
    write(plain / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(plain / ".git" / "refs" / "heads" / "main", commit + "\n")
    assert git_revision(plain) == "a" * 12
    packed = tmp_path / "packed"                    # after `git gc`: the branch only in packed-refs
    write(packed / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(packed / ".git" / "packed-refs", f"# pack-refs with: peeled\n{other} refs/heads/dev\n{commit} refs/heads/main\n")
    assert git_revision(packed) == "a" * 12
    detached = tmp_path / "detached"
    write(detached / ".git" / "HEAD", other + "\n")
    assert git_revision(detached) == "b" * 12
    worktree = tmp_path / "worktree"                # `git worktree add`: .git is a file, branches in the main .git
    gitdir = plain / ".git" / "worktrees" / "wt"
    write(worktree / ".git", f"gitdir: {gitdir}\n")
    write(gitdir / "HEAD", "ref: refs/heads/main\n")
    write(gitdir / "commondir", "../..\n")
    assert git_revision(worktree) == "a" * 12
    assert git_revision(tmp_path / "nothing") == "unknown"
    broken = tmp_path / "broken"
    write(broken / ".git" / "HEAD", "ref: refs/heads/gone\n")
    assert git_revision(broken) == "unknown"


def test_metrics_port_off_serves_nothing() -> None:
    metrics = ServiceMetrics("x")
    assert metrics.serve_http("127.0.0.1", -1) is None
    assert metrics.http_port is None
    metrics.stop_http()   # nothing to stop: no error


def test_metrics_of_uses_the_servicers_own_or_gives_it_the_common_ones() -> None:
    own = TextEncoderMetrics()
    assert metrics_of(types.SimpleNamespace(metrics=own), "text_encoder") is own
    bare = types.SimpleNamespace()
    given = metrics_of(bare, "gateway")
    assert bare.metrics is given and given.stage == "gateway"
    other = types.SimpleNamespace(metrics="something else")
    assert isinstance(metrics_of(other, "gateway"), ServiceMetrics) and other.metrics == "something else"


def test_metrics_port_setting_defaults_to_off_and_reads_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("T2V_METRICS_PORT", raising=False)
    assert parse_config(ServerConfig, [], "x", "x").metrics_port == -1
    assert parse_config(ServerConfig, ["--metrics-port", "0"], "x", "x").metrics_port == 0
    monkeypatch.setenv("T2V_METRICS_PORT", "9464")
    assert parse_config(ServerConfig, [], "x", "x").metrics_port == 9464


def test_t2v_up_gives_each_service_its_grpc_port_plus_100_for_metrics() -> None:
    mesh = Mesh("127.0.0.1", MeshPorts.from_base(40000), "/m")
    for stage, port in (("gateway", 40100), ("text_encoder", 40101), ("denoiser", 40102), ("decoder", 40103)):
        assert f"--metrics-port={port}" in mesh.command(stage)
        assert mesh.metrics_port(stage) == port
    off = Mesh("127.0.0.1", MeshPorts(), "/m", metrics_offset=-1)
    assert not any(a.startswith("--metrics-port") for a in off.command("denoiser"))


# --- grpc_errors counts every call --------------------------------------------------------------

class Aborted(Exception):
    pass


class FakeContext:
    code: grpc.StatusCode | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


class DemoServicer:
    def __init__(self) -> None:
        self.metrics = ServiceMetrics("demo")

    @grpc_errors
    def Unary(self, request: str, context: FakeContext) -> str:
        if request == "bad":
            raise InvalidArgument("bad request")
        if request == "bug":
            raise KeyError("unexpected")
        return "ok"

    @grpc_errors
    def Stream(self, request: str, context: FakeContext) -> Iterator[int]:
        yield 1
        yield 2
        if request == "down":
            raise Unavailable("gone")


def test_grpc_errors_counts_unary_calls_by_code() -> None:
    servicer = DemoServicer()
    assert servicer.Unary("fine", FakeContext()) == "ok"
    for request, code in (("bad", grpc.StatusCode.INVALID_ARGUMENT), ("bug", grpc.StatusCode.INTERNAL)):
        context = FakeContext()
        with pytest.raises(Aborted):
            servicer.Unary(request, context)
        assert context.code == code
    m = servicer.metrics
    assert value(m, "t2v_grpc_requests_total", method="Unary", code="OK") == 1
    assert value(m, "t2v_grpc_requests_total", method="Unary", code="INVALID_ARGUMENT") == 1
    assert value(m, "t2v_grpc_requests_total", method="Unary", code="INTERNAL") == 1
    assert value(m, "t2v_grpc_request_duration_seconds_count", method="Unary") == 3
    assert value(m, "t2v_grpc_requests_in_progress", method="Unary") == 0


def test_grpc_errors_counts_streams_when_they_end_fail_or_are_abandoned() -> None:
    servicer = DemoServicer()
    assert list(servicer.Stream("fine", FakeContext())) == [1, 2]
    with pytest.raises(Aborted):
        list(servicer.Stream("down", FakeContext()))
    stream = servicer.Stream("fine", FakeContext())
    assert next(stream) == 1
    assert value(servicer.metrics, "t2v_grpc_requests_in_progress", method="Stream") == 1
    stream.close()                                   # the client went away
    m = servicer.metrics
    assert value(m, "t2v_grpc_requests_total", method="Stream", code="OK") == 1
    assert value(m, "t2v_grpc_requests_total", method="Stream", code="UNAVAILABLE") == 1
    assert value(m, "t2v_grpc_requests_total", method="Stream", code="CANCELLED") == 1
    assert value(m, "t2v_grpc_requests_in_progress", method="Stream") == 0


def test_grpc_errors_works_for_a_servicer_without_metrics() -> None:
    class Plain:
        @grpc_errors
        def Unary(self, request: str, context: FakeContext) -> str:
            return "ok"
    assert Plain().Unary("x", FakeContext()) == "ok"


# --- the stages ---------------------------------------------------------------------------------

def test_text_encoder_metrics() -> None:
    m = TextEncoderMetrics()
    m.encoded(prompts=2, truncated=1)                    # two calls answered ...
    m.encoded(prompts=1, truncated=0)
    m.batched(prompts=3, seconds=0.05)                   # ... by one forward
    assert value(m, "t2v_text_encoder_prompts_total") == 3
    assert value(m, "t2v_text_encoder_prompts_truncated_total") == 1
    assert value(m, "t2v_text_encoder_encode_duration_seconds_count") == 1
    assert value(m, "t2v_text_encoder_encode_duration_seconds_sum") == pytest.approx(0.05)
    assert value(m, "t2v_text_encoder_batch_prompts_sum") == 3


def test_denoiser_metrics_observe_the_engine() -> None:
    m = DenoiserMetrics()
    assert isinstance(m, EngineObserver)
    m.step(batch_size=3, seconds=0.2)
    m.step(batch_size=1, seconds=0.1)
    m.request_done("finished")
    m.request_done("cancelled")
    assert value(m, "t2v_denoiser_unet_forwards_total") == 2
    assert value(m, "t2v_denoiser_steps_total") == 4
    assert value(m, "t2v_denoiser_batch_size_count") == 2
    assert value(m, "t2v_denoiser_batch_size_sum") == 4
    assert value(m, "t2v_denoiser_batch_size_bucket", le="2.0") == 1
    assert value(m, "t2v_denoiser_step_duration_seconds_sum") == pytest.approx(0.3)
    assert value(m, "t2v_denoiser_requests_total", outcome="finished") == 1
    assert value(m, "t2v_denoiser_requests_total", outcome="cancelled") == 1
    assert value(m, "t2v_denoiser_requests_total", outcome="failed") == 0
    m.watch_active(lambda: 5)
    assert value(m, "t2v_denoiser_active_requests") == 5


def test_decoder_metrics() -> None:
    m = DecoderMetrics()
    m.decoded(frames=16, seconds=0.4)
    m.encoded(mp4_bytes=50_000, seconds=0.1)
    m.batched(frames=48)
    assert value(m, "t2v_decoder_vae_batch_frames_bucket", le="32.0") == 0
    assert value(m, "t2v_decoder_vae_batch_frames_bucket", le="64.0") == 1
    assert value(m, "t2v_decoder_frames_decoded_total") == 16
    assert value(m, "t2v_decoder_vae_decode_duration_seconds_sum") == pytest.approx(0.4)
    assert value(m, "t2v_decoder_mp4_encode_duration_seconds_sum") == pytest.approx(0.1)
    assert value(m, "t2v_decoder_mp4_size_bytes_sum") == 50_000
    assert value(m, "t2v_decoder_mp4_size_bytes_bucket", le="65536.0") == 1


# --- the gateway --------------------------------------------------------------------------------

def test_gateway_labels_are_bounded() -> None:
    assert priority_label(gateway_pb2.PRIORITY_HIGH) == "high"
    assert priority_label(Priority.LOW) == "low" and priority_label(Priority.HIGH) == "high"   # by name, not number
    assert priority_label(gateway_pb2.PRIORITY_UNSPECIFIED) == "normal"
    assert priority_label("PRIORITY_LOW") == "low" and priority_label("normal") == "normal"
    assert stage_label(gateway_pb2.STAGE_DENOISER) == "denoiser" and stage_label("decoder") == "decoder"
    for bad in (lambda: priority_label("urgent"), lambda: priority_label(99), lambda: stage_label("vae"),
                lambda: GatewayMetrics().finished("succeeded", 1.0)):
        with pytest.raises(ValueError):
            bad()


def test_gateway_job_metrics() -> None:
    m = GatewayMetrics()
    assert value(m, "t2v_model_loaded", stage="gateway") == 0
    assert value(m, "t2v_gateway_queue_depth", priority="low") == 0          # every series from the start
    assert value(m, "t2v_gateway_jobs_total", outcome="deadline_exceeded") == 0
    m.queued(gateway_pb2.PRIORITY_HIGH)
    m.queued("normal")
    m.set_queue_depth("high", 1)
    m.set_queue_depth(gateway_pb2.PRIORITY_NORMAL, 1)
    m.started("high", queue_seconds=0.5)
    m.set_queue_depth("high", 0)
    m.in_flight(1)
    m.stage_seconds(gateway_pb2.STAGE_TEXT_ENCODER, 0.1)
    m.steps(4)
    m.in_flight(0)
    m.finished("completed", 7.0)
    m.finished("expired")
    m.cache_hit()
    m.cache_miss()
    m.cache_miss()
    assert value(m, "t2v_gateway_jobs_queued_total", priority="high") == 1
    assert value(m, "t2v_gateway_jobs_queued_total", priority="normal") == 1
    assert value(m, "t2v_gateway_queue_depth", priority="high") == 0
    assert value(m, "t2v_gateway_queue_depth", priority="normal") == 1
    assert value(m, "t2v_gateway_queue_wait_seconds_sum", priority="high") == 0.5
    assert value(m, "t2v_gateway_queue_wait_seconds_count", priority="high") == 1
    assert value(m, "t2v_gateway_jobs_in_flight") == 0
    assert value(m, "t2v_gateway_stage_duration_seconds_sum", stage="text_encoder") == pytest.approx(0.1)
    assert value(m, "t2v_gateway_denoising_steps_total") == 4
    assert value(m, "t2v_gateway_jobs_total", outcome="completed") == 1
    assert value(m, "t2v_gateway_jobs_total", outcome="expired") == 1
    assert value(m, "t2v_gateway_job_duration_seconds_sum", outcome="completed") == 7.0
    assert m.registry.get_sample_value("t2v_gateway_job_duration_seconds_count", {"outcome": "expired"}) is None
    assert value(m, "t2v_gateway_cache_hits_total") == 1
    assert value(m, "t2v_gateway_cache_misses_total") == 2
    m.watch_queue(lambda priority: {"low": 3, "normal": 2, "high": 1}[priority])
    assert [value(m, "t2v_gateway_queue_depth", priority=p) for p in ("low", "normal", "high")] == [3, 2, 1]


def record(priority: Priority = Priority.NORMAL, **fields) -> JobRecord:
    return JobRecord(job_id="a" * 32, status=JobStatus.QUEUED, priority=priority, params=None, **fields)


def test_gateway_metrics_follow_the_job_systems_hooks() -> None:
    m = GatewayMetrics()
    assert isinstance(m, JobObserver)
    m.job_queued(record(Priority.HIGH))
    m.queue_depth(1, {"low": 0, "normal": 0, "high": 1})
    m.job_started(record(Priority.HIGH), 2.5)
    m.queue_depth(0, {"low": 0, "normal": 0, "high": 0})
    m.jobs_running(1)
    m.job_finished(record(Priority.HIGH, created_ms=1_000, finished_ms=13_000), JobStatus.COMPLETED, 9.5)
    m.job_finished(record(error_code="DEADLINE_EXCEEDED", created_ms=1_000, finished_ms=4_000),
                   JobStatus.FAILED, 0.0)
    m.job_finished(record(error_code="UNAVAILABLE"), JobStatus.FAILED, 1.0)
    m.job_finished(record(), JobStatus.CANCELLED, 0.0)
    m.jobs_running(0)
    m.cache_hit(record())
    m.cache_miss(record())
    m.results_expired(3)
    assert value(m, "t2v_gateway_jobs_queued_total", priority="high") == 1
    assert value(m, "t2v_gateway_queue_wait_seconds_sum", priority="high") == 2.5
    assert value(m, "t2v_gateway_queue_depth", priority="high") == 0
    assert value(m, "t2v_gateway_jobs_in_flight") == 0
    assert value(m, "t2v_gateway_jobs_total", outcome="completed") == 1
    assert value(m, "t2v_gateway_job_duration_seconds_sum", outcome="completed") == 12.0   # from submission
    assert value(m, "t2v_gateway_jobs_total", outcome="deadline_exceeded") == 1
    assert value(m, "t2v_gateway_job_duration_seconds_sum", outcome="deadline_exceeded") == 3.0
    assert value(m, "t2v_gateway_jobs_total", outcome="failed") == 1
    assert value(m, "t2v_gateway_job_duration_seconds_sum", outcome="failed") == 1.0       # no timestamps
    assert value(m, "t2v_gateway_jobs_total", outcome="cancelled") == 1
    assert value(m, "t2v_gateway_jobs_total", outcome="expired") == 3
    assert value(m, "t2v_gateway_cache_hits_total") == 1 and value(m, "t2v_gateway_cache_misses_total") == 1


def fake_clock(monkeypatch: pytest.MonkeyPatch, *times: float) -> None:
    monkeypatch.setattr(gateway_metrics, "time", types.SimpleNamespace(monotonic=iter(times).__next__))


def test_gateway_observe_times_each_stage_from_the_orchestrators_events(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [domain.StageStarted(domain.Stage.TEXT_ENCODER), domain.Warning("truncated"),
              domain.StageStarted(domain.Stage.DENOISER), domain.Progress(1, 3, 900), domain.Progress(2, 3, 600),
              domain.Progress(3, 3, 300), domain.StageStarted(domain.Stage.DECODER),
              domain.Result(b"mp4", "video/mp4", 8, 64, 64)]
    fake_clock(monkeypatch, 10.0, 10.5, 11.0, 11.1, 11.2, 11.3, 14.0, 14.5)
    m = GatewayMetrics()
    assert list(m.observe(iter(events))) == events            # passed through unchanged
    assert value(m, "t2v_gateway_stage_duration_seconds_sum", stage="text_encoder") == pytest.approx(1.0)
    assert value(m, "t2v_gateway_stage_duration_seconds_sum", stage="denoiser") == pytest.approx(3.0)
    assert value(m, "t2v_gateway_stage_duration_seconds_sum", stage="decoder") == pytest.approx(0.5)
    assert value(m, "t2v_gateway_denoising_steps_total") == 3


def test_gateway_observing_wraps_a_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeOrchestrator:
        closed = False

        def run(self, job_id, params, control=None, deadline=None):
            yield domain.StageStarted(domain.Stage.DECODER)
            yield domain.Result(b"mp4", "video/mp4", 1, 8, 8)

        def close(self):
            self.closed = True

    fake_clock(monkeypatch, 5.0, 7.0)
    m = GatewayMetrics()
    inner = FakeOrchestrator()
    runner = m.observing(inner)
    assert [type(e) for e in runner.run("j", None, deadline=None)] == [domain.StageStarted, domain.Result]
    assert value(m, "t2v_gateway_stage_duration_seconds_sum", stage="decoder") == 2.0
    runner.close()
    assert inner.closed


def test_gateway_observe_closes_the_run_when_its_consumer_stops() -> None:
    stopped = []

    def run() -> Iterator[domain.RunEvent]:
        try:
            yield domain.StageStarted(domain.Stage.TEXT_ENCODER)
            yield domain.StageStarted(domain.Stage.DENOISER)
        finally:
            stopped.append(True)

    events = GatewayMetrics().observe(run())
    next(events)
    events.close()
    assert stopped == [True]


def test_gateway_observe_records_no_time_for_the_stage_that_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing() -> Iterator[domain.RunEvent]:
        yield domain.StageStarted(domain.Stage.TEXT_ENCODER)
        yield domain.StageStarted(domain.Stage.DENOISER)
        yield domain.Progress(1, 5, 999)
        raise Unavailable("the denoiser stage is unavailable")

    fake_clock(monkeypatch, 1.0, 1.25, 2.0)
    m = GatewayMetrics()
    with pytest.raises(Unavailable):
        list(m.observe(failing()))
    assert value(m, "t2v_gateway_stage_duration_seconds_sum", stage="text_encoder") == pytest.approx(0.25)
    assert value(m, "t2v_gateway_stage_duration_seconds_count", stage="denoiser") == 0
    assert value(m, "t2v_gateway_denoising_steps_total") == 1


def test_gateway_reads_the_result_stores_space_at_each_scrape(tmp_path: Path) -> None:
    m = GatewayMetrics()
    free, size = "t2v_gateway_result_store_free_bytes", "t2v_gateway_result_store_size_bytes"
    assert m.registry.get_sample_value(free) is None                  # not watched yet: not exported
    answers = iter([(10, 100), (7, 100)])
    m.watch_result_store(lambda: next(answers))
    assert value(m, free) == 10 and value(m, free) == 7               # read anew at each scrape
    m.watch_result_store(lambda: None)                                 # a store that cannot tell
    assert m.registry.get_sample_value(free) is None and m.registry.get_sample_value(size) is None

    def gone() -> tuple[int, int]:
        raise FileNotFoundError("the folder is gone")
    m.watch_result_store(gone)
    assert m.registry.get_sample_value(free) is None and b"t2v_gateway_queue_depth" in generate_latest(m.registry)


def test_the_file_result_store_reports_its_disk_and_postgresql_nothing(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path / "results")
    got_free, got_size = store.space()
    info = os.statvfs(tmp_path)
    assert got_size == info.f_blocks * info.f_frsize
    assert abs(got_free - info.f_bavail * info.f_frsize) < 64 << 20     # others may write meanwhile
    assert 0 < got_free <= got_size
    assert PostgresResultStore(job_store=None).space() is None          # type: ignore[arg-type]


def test_http_status_classes_are_bounded() -> None:
    m = GatewayMetrics()
    for status in (101, 200, 206, 304, 404, 429, 503, 0, 999):
        m.http_request("GET", "/healthz", status, 0.01)
    m.http_request("BREW", "other", 404, 0.01)
    statuses = {s.labels["status"] for f in m.registry.collect() if f.name == "t2v_gateway_http_requests"
                for s in f.samples if s.name.endswith("_total")}
    assert statuses == {"1xx", "2xx", "3xx", "4xx", "5xx", "none"}
    assert value(m, "t2v_gateway_http_requests_total", method="GET", route="/healthz", status="none") == 2
    assert value(m, "t2v_gateway_http_requests_total", method="other", route="other", status="4xx") == 1
    assert value(m, "t2v_gateway_http_request_duration_seconds_count", method="GET", route="/healthz") == 9


def asgi_status(app, method: str, path: str, headers: tuple[tuple[bytes, bytes], ...] = (),
                on_send: Callable[[dict], None] = lambda message: None) -> int:
    """One request through the ASGI app, no server: its status. ``on_send`` sees each message as it is sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": list(headers),
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        on_send(message)
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_http_requests_are_counted_by_route_template_never_the_raw_path() -> None:
    def loading():
        raise Unavailable("the gateway is loading")

    m = GatewayMetrics()
    app = create_app(Backend(loading, Limits(), "models/t2v-world", lambda: False, frozenset({"k-1"}), metrics=m))
    key = ((b"authorization", b"Bearer k-1"),)
    video = "a" * 32
    calls = [("GET", "/", (), 200), ("GET", "/healthz", (), 503),
             ("GET", f"/v1/videos/{video}", (), 401),                  # refused before routing: still its route
             ("GET", f"/v1/videos/{video}", key, 503), ("GET", f"/v1/videos/{video}/content", key, 503),
             ("PUT", "/v1/videos", key, 405), ("GET", f"/no/such/{video}", key, 404), ("BREW", "/", key, 405),
             ("GET", "/openapi.json", key, 200)]
    for method, path, headers, status in calls:
        assert asgi_status(app, method, path, headers) == status, (method, path)
    counted = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
               for f in m.registry.collect() if f.name == "t2v_gateway_http_requests"
               for s in f.samples if s.name.endswith("_total")}
    assert counted == {("GET", "/", "2xx"): 1, ("GET", "/healthz", "5xx"): 1,
                       ("GET", "/v1/videos/{video_id}", "4xx"): 1, ("GET", "/v1/videos/{video_id}", "5xx"): 1,
                       ("GET", "/v1/videos/{video_id}/content", "5xx"): 1, ("PUT", "/v1/videos", "4xx"): 1,
                       ("GET", "other", "4xx"): 1, ("other", "/", "4xx"): 1, ("GET", "/openapi.json", "2xx"): 1}
    assert not any(video in route for _, route, _ in counted)
    assert value(m, "t2v_gateway_http_request_duration_seconds_count", method="GET",
                 route="/v1/videos/{video_id}") == 2
    no_metrics = create_app(Backend(loading, Limits(), "models/t2v-world", lambda: False))
    assert asgi_status(no_metrics, "GET", "/") == 200                 # the middleware is optional


def test_an_http_request_is_counted_before_its_last_byte_reaches_the_client() -> None:
    """The count was made after the app returned, so a client that had its answer could scrape before it
    (an integration test saw 13 polls counted of 14). Now the last body message finds it counted."""
    m = GatewayMetrics()
    def loading():
        raise Unavailable("the gateway is loading")

    app = create_app(Backend(loading, Limits(), "models/t2v-world", lambda: False, metrics=m))
    seen = []

    def on_send(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            seen.append(value(m, "t2v_gateway_http_requests_total", method="GET", route="/", status="2xx"))

    assert asgi_status(app, "GET", "/", on_send=on_send) == 200
    assert seen == [1]
    assert value(m, "t2v_gateway_http_requests_total", method="GET", route="/", status="2xx") == 1


# --- promtool on every service's exposition -----------------------------------------------------

@pytest.mark.parametrize("cls", [TextEncoderMetrics, DenoiserMetrics, DecoderMetrics, GatewayMetrics])
def test_promtool_accepts_each_services_metrics(cls: type[ServiceMetrics]) -> None:
    m = cls()
    m.model_loaded(1.0)
    m.rpc_started("Method")
    m.rpc_finished("Method", "OK", 0.01)
    if isinstance(m, GatewayMetrics):
        m.queued("high")
        m.started("high", 1.0)
        m.finished("completed", 2.0)
        m.stage_seconds("denoiser", 1.5)
        m.http_request("GET", "/v1/videos/{video_id}", 200, 0.01)
        m.watch_result_store(lambda: (1 << 30, 1 << 40))
    text = generate_latest(m.registry)
    assert b"t2v_build_info{" in text
    promtool_check(text, cls.__name__)


def test_promtool_check_fails_on_a_bad_exposition() -> None:
    with pytest.raises(AssertionError, match="promtool"):
        promtool_check("# TYPE t2v_thing counter\nt2v_thing 1\n", "a counter without _total and help")
