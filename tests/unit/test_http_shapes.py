"""The HTTP API's pure parts: Range headers, the OpenAI-shaped request and video object, the status and
error mappings, and where `t2v up` puts the web page. No server here (tests/integration/test_http_api.py)."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import InvalidArgument, Unimplemented
from services.gateway import domain
from services.gateway.http import HTTP_STATUS, error_response, service_error_response
from services.gateway.domain import (Finished, Interrupted, JobRecord, JobStatus, JobView, Limits, Params, Priority,
                                     QueueFull, Queued)
from services.gateway.ranges import ByteRange, RangeNotSatisfiable, parse_range
from services.gateway import videos
from t2v.up import Mesh, MeshPorts
from t2v.v1 import gateway_pb2

LIMITS = Limits(max_frames=64, default_size=128)


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-99", ByteRange(0, 99)),
    ("bytes=100-", ByteRange(100, 999)),
    ("bytes=-10", ByteRange(990, 999)),
    ("bytes=-5000", ByteRange(0, 999)),            # more than the file: all of it
    ("bytes=900-5000", ByteRange(900, 999)),       # an end past the file is clipped
    ("BYTES = 1-2", ByteRange(1, 2)),
    (None, None), ("", None),
    ("bytes=5-1", None),                           # invalid: ignored, the whole file is sent
    ("bytes=0-1,5-9", None),                       # several ranges: ignored likewise
    ("items=0-1", None), ("bytes=", None), ("bytes=-", None), ("nonsense", None),
])
def test_range_headers(header, expected) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header, size", [("bytes=1000-", 1000), ("bytes=5000-6000", 1000), ("bytes=-0", 1000),
                                          ("bytes=0-", 0), ("bytes=-1", 0)])
def test_ranges_outside_the_file_are_416(header, size) -> None:
    with pytest.raises(RangeNotSatisfiable, match=f"has {size} bytes"):
        parse_range(header, size)


def test_a_content_range_line() -> None:
    assert ByteRange(10, 19).content_range(100) == "bytes 10-19/100" and ByteRange(10, 19).length == 10


def request(**fields) -> videos.CreateVideoRequest:
    return videos.parse_request({"prompt": "a red ball", **fields})


def test_size_and_seconds_become_height_width_and_frames() -> None:
    job = videos.to_job_request(request(size="64x32", seconds="2", fps=12, priority="high", seed=3), LIMITS)
    p = job.params
    assert (p.width, p.height, p.num_frames, p.fps, p.seed) == (64, 32, 24, 12, 3)
    assert job.priority == Priority.HIGH and job.seed_given and job.timeout_seconds is None
    default = videos.to_job_request(request(), LIMITS)
    assert (default.params.width, default.params.num_frames, default.seed_given) == (128, 16, False)
    assert videos.to_job_request(request(seconds=0.01), LIMITS).params.num_frames == 1    # at least one
    assert videos.to_job_request(request(timeout_seconds=30), LIMITS).timeout_seconds == 30


def test_form_values_arrive_as_strings_and_still_parse() -> None:
    job = videos.to_job_request(videos.parse_request({"prompt": "x", "num_frames": "4", "guidance_scale": "1",
                                                      "seed": "0", "model": "sora-2"}), LIMITS)
    assert (job.params.num_frames, job.params.guidance_scale, job.params.seed, job.seed_given) == (4, 1.0, 0, True)


@pytest.mark.parametrize("body, field, words", [
    ([1, 2], None, "JSON object"),
    ({"prompt": "x", "seed": -1}, "seed", "between 0 and"),
    ({"prompt": "x", "seed": 2**70}, "seed", "2**63"),
    ({"prompt": "x", "size": "0x32"}, "size", "positive"),
    ({"prompt": "x", "fps": 0}, "fps", "between 1 and 60"),
    ({"prompt": "x", "seconds": "soon"}, "seconds", "number of seconds"),
    ({"prompt": "x", "seconds": -1}, "seconds", "positive"),
    ({"prompt": "x", "timeout_seconds": -5}, "timeout_seconds", ">= 0"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": "x", "remix_video_id": "v"}, "remix_video_id", "not supported"),
])
def test_bad_requests_name_their_field(body, field, words) -> None:
    with pytest.raises(InvalidArgument) as info:
        videos.to_job_request(videos.parse_request(body), LIMITS)
    assert info.value.field == field and words in info.value.message


def record(status: JobStatus, **fields) -> JobRecord:
    params = Params(prompt="p", negative_prompt="", num_frames=16, height=64, width=96, num_inference_steps=10,
                    guidance_scale=9.0, seed=1, fps=8, scheduler="ddim")
    return JobRecord(job_id="a" * 32, status=status, priority=Priority.LOW, params=params, created_ms=1_700_000_000_500,
                     **fields)


@pytest.mark.parametrize("status, shown, percent", [
    (JobStatus.QUEUED, "queued", 0), (JobStatus.RUNNING, "in_progress", 40), (JobStatus.COMPLETED, "completed", 100),
    (JobStatus.FAILED, "failed", 40), (JobStatus.CANCELLED, "failed", 40), (JobStatus.EXPIRED, "completed", 100),
])
def test_six_job_statuses_map_to_openais_four(status, shown, percent) -> None:
    video = videos.video_object(JobView(record(status, stage=domain.Stage.DENOISER, step=4, total_steps=10)),
                                "t2v-world")
    assert (video.status, video.job_status, video.progress) == (shown, status, percent)
    assert (video.size, video.seconds, video.created_at, video.priority) == ("96x64", "2", 1_700_000_000, "low")
    assert video.stage == ("denoiser" if status == JobStatus.RUNNING else None)


def test_a_failed_video_carries_its_error_and_a_queued_one_its_place() -> None:
    failed = videos.video_object(JobView(record(JobStatus.FAILED, error_code="DEADLINE_EXCEEDED",
                                                error_message="too slow")), "m")
    assert failed.error is not None and (failed.error.code, failed.error.message) == ("deadline_exceeded", "too slow")
    queued = videos.video_object(JobView(record(JobStatus.QUEUED), 2, 5), "m")
    assert (queued.queue_position, queued.queue_length, queued.error) == (2, 5, None)


def test_events_of_a_run() -> None:
    seen = videos.Progress()
    names = []
    for update in [Queued(2, 3), domain.StageStarted(domain.Stage.TEXT_ENCODER),
                   domain.StageStarted(domain.Stage.DENOISER), domain.Progress(5, 10, 500), domain.Warning("cut"),
                   domain.StageStarted(domain.Stage.DECODER), Finished(JobView(record(JobStatus.COMPLETED)))]:
        name, data = videos.event_of("a" * 32, update, seen, "m")
        names.append((name, data.get("progress")))
    assert names == [("queued", 0), ("stage", 0), ("stage", 0), ("progress", 50), ("warning", 50), ("stage", 99),
                     ("completed", 100)]
    name, data = videos.event_of("a" * 32, Interrupted("stopping"), seen, "m")
    assert name == "error" and data["error"]["code"] == "unavailable"
    cancelled = videos.event_of("a" * 32, Finished(JobView(record(JobStatus.CANCELLED))), seen, "m")
    assert cancelled[0] == "failed" and cancelled[1]["job_status"] == "cancelled"
    name, data = videos.event_of("a" * 32, Finished(JobView(record(JobStatus.DELETED))), seen, "m")
    assert name == "error" and data["error"]["code"] == "not_found" and "was deleted" in data["error"]["message"]


def test_grpc_codes_map_to_http_statuses() -> None:
    assert {code.name: status for code, status in HTTP_STATUS.items()} == {
        "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409,
        "CANCELLED": 409, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
        "UNIMPLEMENTED": 501}
    full = service_error_response(QueueFull(3, 12))
    assert full.status_code == 429 and full.headers["retry-after"] == "12"
    assert b'"type":"rate_limit_error"' in full.body and b'"code":"resource_exhausted"' in full.body
    assert b'"param":"num_frames"' in service_error_response(InvalidArgument("bad", field="num_frames")).body
    assert b'"type":"server_error"' in error_response(503, "down", "unavailable").body
    assert grpc.StatusCode.OK not in HTTP_STATUS
    unsupported = service_error_response(Unimplemented("remixing is not supported"))
    assert unsupported.status_code == 501 and unsupported.headers["x-should-retry"] == "false"   # SDKs: ask once
    assert b'"type":"invalid_request_error"' in unsupported.body and b'"code":"unimplemented"' in unsupported.body


def test_t2v_up_serves_the_web_page_at_the_gateway_port_plus_30() -> None:
    mesh = Mesh("127.0.0.1", MeshPorts(), "/m")
    assert "--http-port=50080" in mesh.command("gateway") and mesh.web_url == "http://127.0.0.1:50080/"
    assert not any(a.startswith("--http-port") for a in mesh.command("denoiser"))
    off = Mesh("127.0.0.1", MeshPorts.from_base(6000), "/m", http_offset=-1)
    assert off.web_url is None and not any(a.startswith("--http-port") for a in off.command("gateway"))
