"""Property-based fuzzing of every Gateway RPC over real gRPC, in front of the real stages.

Generate and SubmitJob get GenerationParams built field by field: a case breaks one or two fields
(then INVALID_ARGUMENT with a sentence, and no job) or is a valid tiny job (then it is accepted and,
for Generate, streamed to its MP4). GetJob, CancelJob and GetVideo get ids that are path-like, carry
NUL bytes, nearly match the real form, are well-formed but unknown, or are real; ListJobs gets any
status, page size and token. Never INTERNAL, never a hang, and nothing but the job database and
videos named by job id ever appears in the state dir. A draining gateway answers UNAVAILABLE, with
a sentence, to everything.
"""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from services.common.contract import SCHEDULERS
from services.gateway.jobs import MAX_TIMEOUT_SECONDS
from services.gateway.domain import JOB_ID_PATTERN
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage
from tests.fuzzing import (CALL_TIMEOUT, INT32, Outcome, check_refusal, fuzz_settings, hostile_texts, int32s, int64s,
                           job_ids, odd_floats, outcome, shows_something)

pytestmark = pytest.mark.slow

INVALID = {grpc.StatusCode.INVALID_ARGUMENT}
Draw = Callable[[st.SearchStrategy[Any]], Any]
STATE_FILES = re.compile(r"jobs\.sqlite3(-wal|-shm|-journal|\.lock)?|results|results/[0-9a-f]{32}\.mp4")
PARAM_FIELDS = ["prompt", "negative_prompt", "num_frames", "height", "width", "num_inference_steps",
                "guidance_scale", "fps", "scheduler", "seed", "priority"]


def out_of(low: int, high: int, zero_ok: bool = False) -> st.SearchStrategy[int]:
    """An int32 outside [low, high]; 0 too unless it means "the default" (``zero_ok``)."""
    below = min(low - 1, -1) if zero_ok else low - 1
    return st.one_of(st.integers(INT32[0], below), st.integers(high + 1, INT32[1]))


@st.composite
def params_cases(draw: Draw, limits: Any) -> tuple[generation_pb2.GenerationParams, int, frozenset[str]]:
    """(params, priority, the fields broken). Valid fields are tiny (1-2 frames, 8-16 px, 1-2 steps); a
    field left 0 would mean a default-sized job, so the size fields are never 0 here."""
    broken = draw(st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(PARAM_FIELDS), min_size=1,
                                                                 max_size=2)))
    bad = broken.__contains__
    most = limits.max_prompt_chars
    text_ok = hostile_texts(200, nul=False)
    if bad("prompt"):
        invisible = " \t\n\r\u3000\u00a0\u200b\u200d\ufeff\u2060\u3164\x1b"
        prompt = draw(st.one_of(st.text(alphabet=invisible, max_size=10),
                                text_ok.map(lambda t: t + "\x00"),
                                st.sampled_from(["x" * (most + 1), "x" * 100_000, "\U0001F600" * 25_000])))
    else:
        prompt = draw(st.one_of(hostile_texts(200, min_size=1, nul=False).filter(shows_something),
                                st.just("a red ball " * (most // 11))))
    negative = draw(st.sampled_from(["\x00", "a\x00b", "n" * (most + 1)]) if bad("negative_prompt") else text_ok)
    params = generation_pb2.GenerationParams(
        prompt=prompt, negative_prompt=negative,
        num_frames=draw(out_of(1, limits.max_frames, True) if bad("num_frames") else st.integers(1, 2)),
        height=draw(out_of(1, limits.max_size, True) | st.integers(1, limits.max_size).filter(lambda v: v % 8)
                    if bad("height") else st.sampled_from([8, 16])),
        width=draw(out_of(1, limits.max_size, True) | st.integers(1, limits.max_size).filter(lambda v: v % 8)
                   if bad("width") else st.sampled_from([8, 16])),
        num_inference_steps=draw(out_of(1, limits.max_steps, True) if bad("num_inference_steps")
                                 else st.integers(1, 2)),
        fps=draw(out_of(0, limits.max_fps) if bad("fps") else st.integers(0, limits.max_fps)),
        scheduler=draw(st.text(min_size=1, max_size=20).filter(lambda s: s.strip().lower() not in SCHEDULERS + ("",))
                       if bad("scheduler") else st.sampled_from(["", *SCHEDULERS, " DDIM ", "DPMSolver++"])))
    if bad("guidance_scale"):
        params.guidance_scale = draw(st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -1.0]),
                                               st.floats(max_value=-1.0, width=32)))
    elif draw(st.booleans()):
        params.guidance_scale = draw(st.floats(0, 20, width=32))
    if bad("seed"):
        params.seed = draw(st.integers(-2**63, -1))
    elif draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**63 - 1))
    priority = draw(out_of(0, 3) if bad("priority") else st.integers(0, 3))
    return params, priority, broken


def state_dir_is_clean(gateway: RunningStage) -> None:
    """Only the job database and videos named by job ids: no id from a client ever became a path."""
    root = Path(gateway.servicer.config.state_dir)
    for path in root.rglob("*"):
        name = path.relative_to(root).as_posix()
        assert STATE_FILES.fullmatch(name), f"unexpected file in the state dir: {name!r}"


@pytest.fixture
def gateway(gateway_factory: Callable[..., RunningStage]) -> RunningStage:
    return gateway_factory()


@pytest.fixture
def known_jobs(gateway: RunningStage) -> dict[str, Any]:
    """Two real jobs: one COMPLETED (with its MP4 bytes) and one CANCELLED."""
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    small = dict(prompt="a red ball", num_frames=1, height=8, width=8, num_inference_steps=1, seed=1)
    events = list(stub.Generate(gateway_pb2.GenerateRequest(params=generation_pb2.GenerationParams(**small)),
                                timeout=CALL_TIMEOUT))
    done = events[-1]
    long = stub.SubmitJob(gateway_pb2.SubmitJobRequest(params=generation_pb2.GenerationParams(
        **{**small, "num_inference_steps": gateway.servicer.limits.max_steps})), timeout=CALL_TIMEOUT)
    stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=long.job_id), timeout=CALL_TIMEOUT)
    return {"completed": done.job_id, "video": done.result.video, "cancelled": long.job_id}


def expected_for_id(job_id: str, known: dict[str, Any]) -> grpc.StatusCode:
    if not JOB_ID_PATTERN.fullmatch(job_id):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.OK if job_id in (known["completed"], known["cancelled"]) else grpc.StatusCode.NOT_FOUND


# --- Generate and SubmitJob ---------------------------------------------------------------------------
@given(data=st.data())
@fuzz_settings(200)
def test_generate_refuses_bad_params_and_streams_good_ones(gateway, data: st.DataObject) -> None:
    params, priority, broken = data.draw(params_cases(gateway.servicer.limits))
    event(f"broken: {', '.join(sorted(broken)) or 'nothing'}")
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    request = gateway_pb2.GenerateRequest(params=params, priority=priority)
    result = outcome(lambda: stub.Generate(request, timeout=CALL_TIMEOUT))
    if broken:
        check_refusal(result, INVALID, f"Generate breaking {sorted(broken)}")
        return
    assert result.ok, f"a valid Generate was refused: {result.code.name} {result.details!r}"
    last = result.answer[-1]
    assert last.WhichOneof("event") == "result" and last.result.video[4:8] == b"ftyp"
    assert (last.result.num_frames, last.result.height, last.result.width) == (
        params.num_frames, params.height, params.width)
    if params.HasField("seed"):
        assert last.result.seed == params.seed


@given(data=st.data(), timeout=st.one_of(st.just(0.0), st.floats(0.001, 3600), odd_floats().map(float),
                                         st.sampled_from([1e20, 1e300, MAX_TIMEOUT_SECONDS + 1.0])))
@fuzz_settings(300)
def test_submit_job_refuses_bad_params_and_queues_good_ones(gateway, data: st.DataObject, timeout: float) -> None:
    params, priority, broken = data.draw(params_cases(gateway.servicer.limits))
    if not (math.isfinite(timeout) and 0 <= timeout <= MAX_TIMEOUT_SECONDS):
        broken |= {"timeout_seconds"}
    event(f"broken: {', '.join(sorted(broken)) or 'nothing'}")
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    before = len(gateway.servicer.jobs.list(page_size=1000)[0])
    request = gateway_pb2.SubmitJobRequest(params=params, priority=priority, timeout_seconds=timeout)
    result = outcome(lambda: stub.SubmitJob(request, timeout=CALL_TIMEOUT))
    if broken:
        check_refusal(result, INVALID, f"SubmitJob breaking {sorted(broken)}")
        assert len(gateway.servicer.jobs.list(page_size=1000)[0]) == before, "a refused request left a job"
        return
    assert result.ok, f"a valid SubmitJob was refused: {result.code.name} {result.details!r}"
    job = result.answer
    assert JOB_ID_PATTERN.fullmatch(job.job_id) and job.status != gateway_pb2.JOB_STATUS_UNSPECIFIED
    assert (job.params.num_frames, job.params.height, job.params.width, job.params.prompt) == (
        params.num_frames, params.height, params.width, params.prompt)


# --- GetJob, CancelJob, GetVideo, ListJobs --------------------------------------------------------------
def call_with_drawn_id(gateway, known_jobs, data: st.DataObject, method: str, request: type
                       ) -> tuple[str, Outcome] | None:
    """Call ``method`` with a drawn job id; None when it was refused as it must be (else its answer)."""
    job_id = data.draw(job_ids([known_jobs["completed"], known_jobs["cancelled"]]))
    expected = expected_for_id(job_id, known_jobs)
    event(f"expected: {expected.name}")
    call = getattr(gateway_pb2_grpc.GatewayStub(gateway.channel()), method)
    result = outcome(lambda: call(request(job_id=job_id), timeout=CALL_TIMEOUT))
    if expected != grpc.StatusCode.OK:
        check_refusal(result, {expected}, f"{method}({job_id!r})")
        return None
    assert result.ok and result.answer.job_id == job_id
    return job_id, result


@given(data=st.data())
@fuzz_settings(300)
def test_get_job_takes_only_real_ids(gateway, known_jobs, data: st.DataObject) -> None:
    if call_with_drawn_id(gateway, known_jobs, data, "GetJob", gateway_pb2.GetJobRequest) is not None:
        state_dir_is_clean(gateway)


@given(data=st.data())
@fuzz_settings(200)
def test_cancel_job_takes_only_real_ids(gateway, known_jobs, data: st.DataObject) -> None:
    answered = call_with_drawn_id(gateway, known_jobs, data, "CancelJob", gateway_pb2.CancelJobRequest)
    if answered is None:
        return
    job_id, result = answered
    ended = {known_jobs["completed"]: gateway_pb2.JOB_STATUS_COMPLETED,
             known_jobs["cancelled"]: gateway_pb2.JOB_STATUS_CANCELLED}
    assert result.answer.status == ended[job_id], "cancelling an ended job changed it"


@given(data=st.data(), offset=st.one_of(int64s(), st.integers(0, 4096)))
@fuzz_settings(300)
def test_get_video_takes_only_real_ids_and_offsets(gateway, known_jobs, data: st.DataObject, offset: int) -> None:
    job_id = data.draw(job_ids([known_jobs["completed"], known_jobs["cancelled"]]))
    video = known_jobs["video"]
    expected = expected_for_id(job_id, known_jobs)
    if job_id == known_jobs["cancelled"]:
        expected = grpc.StatusCode.FAILED_PRECONDITION
    elif job_id == known_jobs["completed"] and not 0 <= offset <= len(video):
        expected = grpc.StatusCode.INVALID_ARGUMENT
    event(f"expected: {expected.name}")
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    request = gateway_pb2.GetVideoRequest(job_id=job_id, offset=offset)
    result = outcome(lambda: stub.GetVideo(request, timeout=CALL_TIMEOUT))
    if expected != grpc.StatusCode.OK:
        check_refusal(result, {expected}, f"GetVideo({job_id!r}, offset={offset})")
        return
    assert result.ok, f"GetVideo of a completed job: {result.code.name} {result.details!r}"
    assert b"".join(chunk.data for chunk in result.answer) == video[offset:]
    assert all(chunk.total_size == len(video) for chunk in result.answer)


@given(status=st.one_of(st.sampled_from(gateway_pb2.JobStatus.values()), int32s()),
       page_size=st.one_of(st.integers(0, 1000), int32s()),
       page_token=st.one_of(st.just(""), st.text(alphabet="0123456789", min_size=1, max_size=22), st.text(max_size=30),
                            st.sampled_from(["²", "\u0663", "-1", " 1", "1 ", "0x10", "1e3", "+5"])))
@fuzz_settings(300)
def test_list_jobs_refuses_bad_filters_and_pages(gateway, known_jobs, status: int, page_size: int,
                                                 page_token: str) -> None:
    valid_token = page_token == "" or (page_token.isascii() and page_token.isdigit() and len(page_token) <= 18)
    valid = status in gateway_pb2.JobStatus.values() and page_size >= 0 and valid_token
    event(f"valid: {valid}")
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    request = gateway_pb2.ListJobsRequest(status=status, page_size=page_size, page_token=page_token)
    result = outcome(lambda: stub.ListJobs(request, timeout=CALL_TIMEOUT))
    if not valid:
        check_refusal(result, INVALID, f"ListJobs({status}, {page_size}, {page_token!r})")
        return
    assert result.ok, f"a valid ListJobs was refused: {result.code.name} {result.details!r}"
    assert len(result.answer.jobs) <= min(page_size or 50, 1000)
    if status:
        assert all(job.status == status for job in result.answer.jobs)


# --- draining -------------------------------------------------------------------------------------------
RPCS = {
    "Generate": lambda stub, text: stub.Generate(gateway_pb2.GenerateRequest(
        params=generation_pb2.GenerationParams(prompt=text)), timeout=CALL_TIMEOUT),
    "SubmitJob": lambda stub, text: stub.SubmitJob(gateway_pb2.SubmitJobRequest(
        params=generation_pb2.GenerationParams(prompt=text)), timeout=CALL_TIMEOUT),
    "GetJob": lambda stub, text: stub.GetJob(gateway_pb2.GetJobRequest(job_id=text), timeout=CALL_TIMEOUT),
    "ListJobs": lambda stub, text: stub.ListJobs(gateway_pb2.ListJobsRequest(page_token=text), timeout=CALL_TIMEOUT),
    "CancelJob": lambda stub, text: stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=text), timeout=CALL_TIMEOUT),
    "GetVideo": lambda stub, text: stub.GetVideo(gateway_pb2.GetVideoRequest(job_id=text), timeout=CALL_TIMEOUT),
}


@pytest.fixture
def draining_gateway(gateway: RunningStage) -> RunningStage:
    gateway.servicer.gate.drain()          # what SIGTERM does first: refuse new work, finish the old
    return gateway


@given(rpc=st.sampled_from(sorted(RPCS)), text=st.one_of(hostile_texts(), st.just(uuid.uuid4().hex)))
@fuzz_settings(100)
def test_a_draining_gateway_answers_unavailable_with_a_sentence(draining_gateway, rpc: str, text: str) -> None:
    stub = gateway_pb2_grpc.GatewayStub(draining_gateway.channel())
    result = outcome(lambda: RPCS[rpc](stub, text))
    check_refusal(result, {grpc.StatusCode.UNAVAILABLE}, f"{rpc} while draining")

