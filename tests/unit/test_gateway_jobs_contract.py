"""The gateway's job settings (flags, env, checks, what `t2v up` passes) and the protobuf translation of jobs."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.common.config import parse_config
from services.common.errors import InvalidArgument
from services.gateway import messages
from services.gateway.domain import Finished, JobRecord, JobStatus, JobView, Params, Priority, Queued, Stage, new_job_id
from services.gateway.app import GatewayConfig, settings_from
from t2v.up import Mesh, MeshPorts
from t2v.v1 import gateway_pb2

PARAMS = Params(prompt="p", negative_prompt="n", num_frames=2, height=32, width=48, num_inference_steps=3,
                guidance_scale=1.0, seed=0, fps=8, scheduler="ddim")
NEW = ("slots", "max_queue", "aging_seconds", "state_dir", "result_ttl_hours", "cleanup_interval_seconds",
       "api_keys_file")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NEW:
        monkeypatch.delenv("T2V_" + name.upper(), raising=False)


def test_defaults() -> None:
    config = parse_config(GatewayConfig, [], "g", "d")
    assert (config.slots, config.max_queue, config.aging_seconds, config.state_dir, config.result_ttl_hours,
            config.cleanup_interval_seconds, config.api_keys_file) == (4, 256, 60.0, "out/state", 24.0, 60.0, "")
    settings = settings_from(config)
    assert settings.result_ttl_seconds == 24 * 3600 and settings.model.startswith("/")


def test_flags_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_SLOTS", "2")
    monkeypatch.setenv("T2V_STATE_DIR", "/var/lib/t2v")
    config = parse_config(GatewayConfig, ["--slots", "1", "--result-ttl-hours", "0.5"], "g", "d")
    assert (config.slots, config.state_dir, config.result_ttl_hours) == (1, "/var/lib/t2v", 0.5)


@pytest.mark.parametrize("flag, value", [("--slots", "0"), ("--max-queue", "0"), ("--result-ttl-hours", "-1"),
                                         ("--aging-seconds", "-5"), ("--cleanup-interval-seconds", "0")])
def test_settings_that_cannot_work_name_their_flag(flag: str, value: str) -> None:
    config = parse_config(GatewayConfig, [flag, value], "g", "d")
    with pytest.raises(ValueError, match=flag):
        settings_from(config)


def test_priorities_and_statuses_map_both_ways() -> None:
    assert messages.priority_from_proto(gateway_pb2.PRIORITY_UNSPECIFIED) == Priority.NORMAL
    for priority in Priority:
        assert messages.priority_from_proto(messages.priority_to_proto(priority)) == priority
    with pytest.raises(InvalidArgument):
        messages.priority_from_proto(42)
    assert messages.status_from_proto(gateway_pb2.JOB_STATUS_UNSPECIFIED) is None
    for status in JobStatus:
        if status == JobStatus.DELETED:           # never shown: a deleted job answers NOT_FOUND (GetJob), unlisted
            assert "JOB_STATUS_DELETED" not in gateway_pb2.JobStatus.keys()
            continue
        assert messages.status_from_proto(messages.status_to_proto(status)) == status
    with pytest.raises(InvalidArgument):
        messages.status_from_proto(42)


def test_a_job_message_carries_the_resolved_params_and_the_error() -> None:
    record = JobRecord(job_id=new_job_id(), status=JobStatus.FAILED, priority=Priority.HIGH, params=PARAMS,
                       created_ms=1, started_ms=2, finished_ms=3, step=1, total_steps=3, stage=Stage.DENOISER,
                       error_code="DEADLINE_EXCEEDED", error_message="too slow", warnings=("w",))
    job = messages.job_message(JobView(record))
    assert job.status == gateway_pb2.JOB_STATUS_FAILED and job.priority == gateway_pb2.PRIORITY_HIGH
    assert job.params.HasField("seed") and job.params.seed == 0 and job.params.HasField("guidance_scale")
    assert job.params.guidance_scale == 1.0 and job.params.negative_prompt == "n"
    assert (job.error.code, job.error.message) == ("DEADLINE_EXCEEDED", "too slow")
    assert job.stage == gateway_pb2.STAGE_UNSPECIFIED                  # only a running job has a stage
    assert (job.progress.step, job.progress.total_steps, list(job.warnings)) == (1, 3, ["w"])
    error = messages.error_for(Finished(JobView(record)))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and error.message == "too slow"


def test_queue_updates_become_queue_events() -> None:
    event = messages.event_message("j", Queued(3, 7))
    assert event is not None and (event.queue.position, event.queue.queue_length) == (3, 7)


def test_t2v_up_gives_the_gateway_a_state_dir() -> None:
    def state_arg(mesh: Mesh) -> list[str]:
        return [a for a in mesh.command("gateway") if a.startswith("--state-dir=")]

    assert state_arg(Mesh("127.0.0.1", MeshPorts(), "/m")) == ["--state-dir=out/state"]
    assert state_arg(Mesh("127.0.0.1", MeshPorts(), "/m", log_dir=Path("/l"))) == ["--state-dir=/l/state"]
    assert state_arg(Mesh("127.0.0.1", MeshPorts(), "/m", log_dir=Path("/l"), state_dir=Path("/s"))) == [
        "--state-dir=/s"]
    assert not any(a.startswith("--state-dir") for a in Mesh("127.0.0.1", MeshPorts(), "/m").command("denoiser"))


def test_a_row_written_by_a_newer_gateway_still_reads(caplog: pytest.LogCaptureFixture) -> None:
    """Gateways of one store side by side in a rolling update: a params field this one does not know (a
    newer gateway's) is left out with a log line; the row reads, so listing and claiming go on."""
    import json

    from services.gateway.store.base import from_row, to_row

    record = JobRecord(job_id=new_job_id(), status=JobStatus.QUEUED, priority=Priority.LOW, params=PARAMS,
                       created_ms=1)
    row = to_row(record)
    assert from_row(row) == record
    row["params"] = json.dumps({**json.loads(row["params"]), "frame_interpolation": 2})
    with caplog.at_level("WARNING", logger="gateway.store"):
        assert from_row(row) == record
    assert "params_unknown" in caplog.text and "frame_interpolation" in caplog.text
