"""The job store (SQLite rows, result files) and the job service, with a fake runner instead of the
stages: submit / get / list / cancel / watch / open_video, priorities, deadlines, cache, TTL, restart."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.gateway import domain
from services.gateway.jobs import (Finished, Interrupted, JobRequest, JobService, JobSettings, Queued,
                                   cache_key)
from services.gateway.observer import JobObserver
from services.gateway.domain import Params, Priority, QueueFull
from services.gateway.domain import JobRecord, JobStatus, check_job_id, new_job_id
from services.gateway.store.sqlite import FileResultStore as ResultStore, SqliteJobStore as JobStore
from t2v.v1 import gateway_pb2

LOW, NORMAL, HIGH = Priority.LOW, Priority.NORMAL, Priority.HIGH


def params(steps: int = 3, seed: int = 1, prompt: str = "a red ball") -> Params:
    return Params(prompt=prompt, negative_prompt="", num_frames=2, height=32, width=32, num_inference_steps=steps,
                  guidance_scale=9.0, seed=seed, fps=8, scheduler="ddim")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class FakeRunner:
    """Stands in for the orchestrator: stages, one Progress per step, then a 'video' naming the job.

    While ``hold`` is set, a job waits before its first step (polling its RunControl, as the real
    denoiser stream would notice a cancel) until ``release()``.
    """

    def __init__(self, hold: bool = False) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self._go = threading.Event()
        if not hold:
            self._go.set()

    def release(self) -> None:
        self._go.set()

    def run(self, job_id: str, params: Params, control: domain.RunControl | None = None,
            deadline: float | None = None, resume: bytes | None = None, checkpoint_every: int = 0,
            preview_every: int = 0) -> Iterator[domain.RunEvent]:
        control = control or domain.RunControl()
        self.started.append(job_id)
        yield domain.StageStarted(domain.Stage.TEXT_ENCODER)
        yield domain.StageStarted(domain.Stage.DENOISER)
        while not self._go.wait(0.002):
            if control.cancelled.is_set():
                raise Cancelled("the job was cancelled")
        for step in range(1, params.num_inference_steps + 1):
            if control.cancelled.is_set():
                raise Cancelled("the job was cancelled")
            yield domain.Progress(step, params.num_inference_steps, 1000 - step)
        yield domain.StageStarted(domain.Stage.DECODER)
        self.finished.append(job_id)
        yield domain.Result(video=b"MP4:" + job_id.encode(), mime_type="video/mp4", num_frames=params.num_frames,
                          height=params.height, width=params.width)


class Wall:
    """A wall clock the test moves (for TTLs); starts at the real time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Recorder(JobObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def job_queued(self, job: JobRecord) -> None:
        self.events.append(("queued", job.job_id))

    def job_started(self, job: JobRecord, queued_seconds: float) -> None:
        self.events.append(("started", job.job_id))

    def job_finished(self, job: JobRecord, outcome: JobStatus, seconds: float) -> None:
        self.events.append((outcome.value, job.job_id))

    def cache_hit(self, job: JobRecord) -> None:
        self.events.append(("cache_hit", job.job_id))

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., JobService]]:
    services: list[JobService] = []

    def make(runner: FakeRunner | None = None, state: Path | None = None, observer: JobObserver | None = None,
             wall: Callable[[], float] = time.time, stages_ready: Callable[[], bool] | None = None,
             **settings: object) -> JobService:
        state = state or tmp_path / "state"
        state.mkdir(exist_ok=True)
        service = JobService(JobStore(state / "jobs.sqlite3"), ResultStore(state / "results"),
                             runner or FakeRunner(), JobSettings(**{"slots": 1, "model": "/models/m", **settings}),
                             observer, wall_clock=wall, stages_ready=stages_ready)
        services.append(service.start())
        return service

    yield make
    for service in services:
        service.stop(0)


def status_of(service: JobService, job_id: str) -> JobStatus:
    return service.get(job_id).status


def wait_status(service: JobService, job_id: str, status: JobStatus, timeout: float = 10.0) -> None:
    wait_for(lambda: status_of(service, job_id) == status, timeout, f"job {job_id} to be {status.name}")


# --- ids and the result store ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "/etc/passwd", "A" * 32, "g" * 32, "0" * 31, "0" * 33,
                                 "0" * 31 + "/", "0" * 32 + "\n", " " + "0" * 31])
def test_malformed_job_ids_are_refused_before_any_file_use(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        check_job_id(bad)
    with pytest.raises(InvalidArgument):
        ResultStore(tmp_path).path(bad)


def test_new_job_ids_pass_the_check() -> None:
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100 and all(check_job_id(i) == i for i in ids)


def test_result_store_saves_atomically_copies_opens_and_deletes(tmp_path: Path) -> None:
    (tmp_path / f"{'a' * 32}.mp4.tmp").write_bytes(b"half")     # left by a crash
    results = ResultStore(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    first, second = new_job_id(), new_job_id()
    assert results.save(first, b"video bytes") == 11
    assert results.copy(first, second) == 11
    with results.open(second)[0] as handle:
        assert handle.read() == b"video bytes"
    assert results.delete(first) and not results.exists(first)
    assert results.exists(second)           # a copy, not a reference: deleting the source keeps it
    assert results.open(first) is None and results.delete(first) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{second}.mp4"]


# --- the job service ---------------------------------------------------------------------------------------
def test_a_job_runs_and_its_video_can_be_read(make_service) -> None:
    recorder = Recorder()
    service = make_service(observer=recorder)
    view = service.submit(JobRequest(params(steps=4), HIGH))
    assert view.record.priority == HIGH and view.record.params == params(steps=4)
    wait_status(service, view.job_id, JobStatus.COMPLETED)
    job = service.get(view.job_id).record
    assert (job.step, job.total_steps, job.runs, job.cached) == (4, 4, 1, False)
    assert job.video_size == len(b"MP4:" + view.job_id.encode()) and job.mime_type == "video/mp4"
    assert job.created_ms <= job.started_ms <= job.finished_ms < job.expires_ms
    with service.open_video(view.job_id) as video:
        assert video.read() == b"MP4:" + view.job_id.encode()
        chunks = list(video.chunks(chunk_size=10))
        assert [o for o, _ in chunks] == [0, 10, 20, 30] and b"".join(c for _, c in chunks) == video.read()
        assert list(video.chunks(offset=video.size)) == [(video.size, b"")]
        with pytest.raises(InvalidArgument, match="outside the video"):
            list(video.chunks(offset=video.size + 1))
    assert [k for k, _ in recorder.events] == ["queued", "started", "completed"]


def test_generate_style_watch_sees_stages_steps_then_the_end(make_service) -> None:
    service = make_service()
    with service.submit_and_watch(JobRequest(params(steps=2))) as watch:
        updates = list(watch)
    kinds = [type(u).__name__ for u in updates]
    assert kinds == ["StageStarted", "StageStarted", "Progress", "Progress", "StageStarted", "Finished"]
    assert updates[-1].job.status == JobStatus.COMPLETED


def test_a_late_watcher_gets_the_run_so_far_replayed(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    job = service.submit(JobRequest(params(steps=2))).job_id
    wait_for(lambda: service.get(job).record.stage == domain.Stage.DENOISER, what="denoiser stage")
    watch = service.watch(job)
    runner.release()
    kinds = [type(u).__name__ for u in watch]
    assert kinds == ["StageStarted", "StageStarted", "Progress", "Progress", "StageStarted", "Finished"]
    finished_watch = list(service.watch(job))                  # after the end: just the end
    assert len(finished_watch) == 1 and isinstance(finished_watch[0], Finished)


def test_queued_jobs_report_their_place_and_see_it_change(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    first = service.submit(JobRequest(params()))
    assert first.status == JobStatus.RUNNING and first.queue_position == 0
    second = service.submit(JobRequest(params()))
    third_watch = service.submit_and_watch(JobRequest(params()))
    assert (second.queue_position, second.queue_length) == (1, 1)
    assert third_watch.next(1) == Queued(2, 2)
    got = service.get(third_watch.job_id)
    assert (got.status, got.queue_position, got.queue_length) == (JobStatus.QUEUED, 2, 2)
    service.cancel(second.job_id)
    assert third_watch.next(1) == Queued(1, 1)
    runner.release()
    assert isinstance(list(third_watch)[-1], Finished)


def test_high_priority_overtakes_jobs_queued_earlier(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    low = service.submit(JobRequest(params(), LOW)).job_id             # takes the one slot
    normals = [service.submit(JobRequest(params(), NORMAL)).job_id for _ in range(3)]
    high = service.submit(JobRequest(params(), HIGH)).job_id
    assert service.get(high).queue_position == 1
    runner.release()
    wait_for(lambda: len(runner.finished) == 5, what="every job to finish")
    assert runner.started == [low, high, *normals]


def test_a_full_queue_refuses_with_retry_after(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner, max_queue=2)
    for _ in range(3):                                # one runs, two wait
        service.submit(JobRequest(params()))
    with pytest.raises(QueueFull) as info:
        service.submit(JobRequest(params()))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after_seconds >= 1
    assert len(service.list()[0]) == 3                 # the refused job left no row


def test_cancel_a_queued_job_a_running_job_and_a_finished_one(make_service) -> None:
    runner = FakeRunner(hold=True)
    recorder = Recorder()
    service = make_service(runner, observer=recorder)
    running = service.submit(JobRequest(params())).job_id
    queued = service.submit(JobRequest(params())).job_id
    after = service.submit(JobRequest(params())).job_id

    cancelled = service.cancel(queued)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.record.error_code == "CANCELLED"
    assert queued not in [w.job_id for w in service.store.waiting()] and service.get(after).queue_position == 1

    assert service.cancel(running).status == JobStatus.CANCELLED
    wait_for(lambda: after in runner.started, what="the freed slot to take the next job")
    assert running not in runner.finished
    runner.release()
    wait_status(service, after, JobStatus.COMPLETED)
    assert service.cancel(after).status == JobStatus.COMPLETED      # nothing to cancel: unchanged
    assert recorder.count("cancelled") == 2 and recorder.count("completed") == 1


class StubbornRunner(FakeRunner):
    """A run that does not notice a cancel: it goes on to its video once released (a stage that finishes the
    call it started)."""

    def run(self, job_id: str, params: Params, control: domain.RunControl | None = None,
            deadline: float | None = None, resume: bytes | None = None, checkpoint_every: int = 0
            ) -> Iterator[domain.RunEvent]:
        return super().run(job_id, params, None, deadline, resume, checkpoint_every)


def test_delete_a_finished_job_a_running_one_and_a_queued_one(make_service) -> None:
    runner = StubbornRunner(hold=True)
    recorder = Recorder()
    service = make_service(runner, observer=recorder)
    running = service.submit(JobRequest(params())).job_id
    queued = service.submit(JobRequest(params())).job_id
    wait_for(lambda: running in runner.started, what="the first job to start")

    before = service.delete(queued)
    assert (before.job_id, before.status) == (queued, JobStatus.QUEUED)
    assert service.store.get(queued).status == JobStatus.DELETED and service.store.count(JobStatus.QUEUED) == 0
    assert service.delete(running).status == JobStatus.RUNNING
    runner.release()                                 # its video comes after all, for a job that is gone
    wait_for(lambda: running in runner.finished and service.running_count() == 0, what="the run to end")
    assert not service.results.exists(running) and service.store.get(running).status == JobStatus.DELETED
    for job_id in (running, queued):
        for call in (service.get, service.open_video, service.watch, service.cancel, service.delete):
            with pytest.raises(domain.JobDeleted, match="was deleted"):
                call(job_id)
    assert service.list() == ([], "") and service.seq_of(running) > 0
    assert recorder.count("cancelled") == 2 and recorder.count("completed") == 0

    done = service.submit(JobRequest(params(seed=5), seed_given=True)).job_id
    wait_status(service, done, JobStatus.COMPLETED)
    assert service.results.exists(done) and service.delete(done).status == JobStatus.COMPLETED
    assert not service.results.exists(done)
    again = service.submit(JobRequest(params(seed=5), seed_given=True))      # the cache no longer has it
    assert not again.record.cached
    with pytest.raises(NotFound, match="does not exist"):
        service.delete(new_job_id())


def test_a_deadline_fails_a_queued_job_and_frees_its_place(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    service.submit(JobRequest(params()))
    late = service.submit(JobRequest(params(), timeout_seconds=0.2)).job_id
    wait_status(service, late, JobStatus.FAILED)
    job = service.get(late).record
    assert job.error_code == "DEADLINE_EXCEEDED" and "still queued" in job.error_message
    assert service.queue_length() == 0 and late not in runner.started


def test_a_deadline_stops_a_running_job(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    job = service.submit(JobRequest(params(), timeout_seconds=0.2)).job_id
    wait_status(service, job, JobStatus.FAILED)
    record_ = service.get(job).record
    assert record_.error_code == "DEADLINE_EXCEEDED" and "while it was running" in record_.error_message
    wait_for(lambda: service.dispatcher.busy == 0, what="the slot to be freed")


def test_a_client_that_goes_away_cancels_its_job_or_meets_its_deadline(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    gone = service.submit(JobRequest(params())).job_id
    service.abandon(gone)
    assert service.get(gone).record.error_message == "the job was cancelled: the client waiting for it went away"
    timed = service.submit(JobRequest(params(), timeout_seconds=0.3)).job_id
    service.abandon(timed)                                 # within the slack of its deadline
    assert service.get(timed).record.error_code == "DEADLINE_EXCEEDED"


def test_bad_timeouts_are_refused(make_service) -> None:
    service = make_service()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="timeout_seconds"):
            service.submit(JobRequest(params(), timeout_seconds=bad))


def test_the_cache_answers_an_explicit_seed_with_the_same_params(make_service) -> None:
    recorder = Recorder()
    runner = FakeRunner()
    service = make_service(runner, observer=recorder)
    first = service.submit(JobRequest(params(seed=5), seed_given=True)).job_id
    wait_status(service, first, JobStatus.COMPLETED)

    again = service.submit(JobRequest(params(seed=5), seed_given=True))
    assert again.status == JobStatus.COMPLETED and again.record.cached and again.job_id != first
    with service.open_video(again.job_id) as video:
        assert video.read() == b"MP4:" + first.encode()
    assert recorder.count("cache_hit") == 1 and runner.started == [first]

    with service.submit_and_watch(JobRequest(params(seed=5), seed_given=True)) as watch:
        updates = list(watch)
    assert len(updates) == 1 and updates[0].job.record.cached

    unseeded = service.submit(JobRequest(params(seed=5), seed_given=False))   # the seed was drawn at random
    other = service.submit(JobRequest(params(seed=5, prompt="another"), seed_given=True))
    assert not unseeded.record.cached and not other.record.cached
    wait_status(service, other.job_id, JobStatus.COMPLETED)
    assert runner.started == [first, unseeded.job_id, other.job_id]


def test_cache_key_covers_the_model_and_every_param() -> None:
    base = params()
    keys = {cache_key("/m", base), cache_key("/other", base)}
    for name, value in [("prompt", "x"), ("negative_prompt", "y"), ("num_frames", 3), ("height", 40),
                        ("width", 40), ("num_inference_steps", 9), ("guidance_scale", 1.0), ("seed", 2),
                        ("fps", 9), ("scheduler", "dpmsolver++"), ("cache", "deep")]:
        keys.add(cache_key("/m", dataclasses.replace(base, **{name: value})))
    assert len(keys) == 13


def test_an_exact_request_keeps_the_cache_key_it_had_before_the_cache_field() -> None:
    """Videos stored before ``cache`` existed still answer exact requests: the key leaves "none" out."""
    import hashlib
    import json

    base = params()
    before = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("cache", "preview")}   # neither then
    blob = json.dumps({"model": "/m", "params": before}, sort_keys=True)
    assert base.cache == "none" and cache_key("/m", base) == hashlib.sha256(blob.encode()).hexdigest()


def test_expired_videos_are_deleted_and_say_so(make_service) -> None:
    wall = Wall()
    service = make_service(wall=wall, result_ttl_seconds=60)
    job = service.submit(JobRequest(params(seed=3), seed_given=True)).job_id
    wait_status(service, job, JobStatus.COMPLETED)
    assert service.cleanup_expired() == 0
    wall.offset = 61
    assert service.get(job).status == JobStatus.EXPIRED            # due: shown as expired at once
    assert service.cleanup_expired() == 1
    assert not service.results.exists(job)
    assert service.store.get(job).status == JobStatus.EXPIRED
    with pytest.raises(NotFound, match="expired at .* and was deleted"):
        service.open_video(job)
    again = service.submit(JobRequest(params(seed=3), seed_given=True))
    assert not again.record.cached                                 # an expired result is no cache


def test_video_of_an_unfinished_or_failed_job(make_service) -> None:
    runner = FakeRunner(hold=True)
    service = make_service(runner)
    running = service.submit(JobRequest(params())).job_id
    with pytest.raises(FailedPrecondition, match="RUNNING"):
        service.open_video(running)
    service.cancel(running)
    with pytest.raises(FailedPrecondition, match="ended CANCELLED and has no video"):
        service.open_video(running)


def test_unknown_and_malformed_ids(make_service) -> None:
    service = make_service()
    for call in (service.get, service.cancel, service.open_video, service.watch):
        with pytest.raises(NotFound, match="does not exist"):
            call(new_job_id())
        with pytest.raises(InvalidArgument, match="malformed"):
            call("../../etc/passwd")


def test_list_pages_newest_first_or_oldest_first(make_service) -> None:
    service = make_service()
    ids = [service.submit(JobRequest(params())).job_id for _ in range(5)]
    wait_for(lambda: all(status_of(service, j) == JobStatus.COMPLETED for j in ids), what="all jobs")
    seen, token = [], ""
    while True:
        page, token = service.list(page_size=2, page_token=token)
        seen += [v.job_id for v in page]
        if not token:
            break
    assert seen == ids[::-1]
    assert [v.job_id for v in service.list(JobStatus.COMPLETED)[0]] == ids[::-1]
    assert service.list(JobStatus.FAILED) == ([], "")
    seen, token = [], ""
    while True:
        page, token = service.list(page_size=2, page_token=token, oldest_first=True)
        seen += [v.job_id for v in page]
        if not token:
            break
    assert seen == ids
    page, _ = service.list(page_token=str(service.seq_of(ids[2])), oldest_first=True)
    assert [v.job_id for v in page] == ids[3:]
    with pytest.raises(InvalidArgument, match="page_token"):
        service.list(page_token="abc")
    with pytest.raises(InvalidArgument, match="page_size"):
        service.list(page_size=-1)


def test_a_restart_runs_queued_and_interrupted_jobs_once(make_service, tmp_path: Path) -> None:
    state = tmp_path / "shared"
    runner = FakeRunner(hold=True)
    first = make_service(runner, state=state)
    running = first.submit(JobRequest(params())).job_id
    queued = first.submit(JobRequest(params(), LOW)).job_id
    later = first.submit(JobRequest(params(), LOW)).job_id
    watch = first.watch(queued)
    assert watch.next(1) == Queued(1, 2)
    wait_for(lambda: running in runner.started, what="the first job to start")
    first.stop(0)
    assert isinstance(watch.next(1), Interrupted)
    assert first.store is not None
    with pytest.raises(Unavailable):
        first.submit(JobRequest(params()))
    assert runner.finished == []

    recorder = Recorder()
    second_runner = FakeRunner()
    second = make_service(second_runner, state=state, observer=recorder)
    for job in (running, queued, later):
        wait_status(second, job, JobStatus.COMPLETED)
    assert second_runner.started == [running, queued, later]          # original order
    records = {j: second.get(j).record for j in (running, queued, later)}
    assert (records[running].runs, records[queued].runs) == (2, 1)
    assert recorder.count("completed") == 3 and recorder.count("queued") == 3


def test_recovered_jobs_wait_until_the_stages_are_serving(make_service, tmp_path: Path) -> None:
    state = tmp_path / "shared"
    first = make_service(FakeRunner(hold=True), state=state)
    interrupted = first.submit(JobRequest(params())).job_id
    waiting = first.submit(JobRequest(params())).job_id
    first.stop(0)

    probes: list[bool] = []
    serving = threading.Event()

    def stages_ready() -> bool:
        probes.append(serving.is_set())
        return serving.is_set()

    runner = FakeRunner()
    second = make_service(runner, state=state, stages_ready=stages_ready)
    fresh = second.submit(JobRequest(params())).job_id                 # accepted meanwhile, queued behind
    wait_for(lambda: len(probes) >= 2, what="two probes of the stages")
    assert runner.started == [] and status_of(second, fresh) == JobStatus.QUEUED
    serving.set()
    for job in (interrupted, waiting, fresh):
        wait_status(second, job, JobStatus.COMPLETED)
    assert runner.started == [interrupted, waiting, fresh]


def test_recovered_jobs_run_anyway_when_the_stages_never_answer(make_service, tmp_path: Path) -> None:
    state = tmp_path / "shared"
    first = make_service(FakeRunner(hold=True), state=state)
    job = first.submit(JobRequest(params())).job_id
    first.stop(0)
    second = make_service(FakeRunner(), state=state, stages_ready=lambda: False, recovery_wait_seconds=0.2)
    wait_status(second, job, JobStatus.COMPLETED)


def test_a_restart_fails_jobs_whose_deadline_passed_meanwhile(make_service, tmp_path: Path) -> None:
    state = tmp_path / "shared"
    wall = Wall()
    runner = FakeRunner(hold=True)
    first = make_service(runner, state=state, wall=wall)
    first.submit(JobRequest(params()))
    waiting = first.submit(JobRequest(params(), timeout_seconds=30)).job_id
    first.stop(0)
    wall.offset = 60
    second = make_service(FakeRunner(), state=state, wall=wall)
    job = second.get(waiting).record
    assert job.status == JobStatus.FAILED and job.error_code == "DEADLINE_EXCEEDED"


def test_orphan_video_files_are_swept_at_start(make_service, tmp_path: Path) -> None:
    state = tmp_path / "state"
    results = ResultStore(state / "results")
    orphan = new_job_id()
    results.save(orphan, b"no row")
    (state / "results" / "notes.mp4").write_bytes(b"not ours")
    make_service(state=state)
    assert not results.exists(orphan)
    assert (state / "results" / "notes.mp4").exists()


def test_an_observer_that_raises_does_not_break_jobs(make_service) -> None:
    class Broken(JobObserver):
        def job_started(self, job: JobRecord, queued_seconds: float) -> None:
            raise RuntimeError("boom")

    service = make_service(observer=Broken())
    job = service.submit(JobRequest(params())).job_id
    wait_status(service, job, JobStatus.COMPLETED)


def test_a_run_that_loses_its_lease_stops_and_its_watchers_keep_following(make_service) -> None:
    """Another gateway took the job over (its lease ran out while this one was cut off from the store):
    the run here stops at once, and a watcher here is not told the job ended, for it goes on there."""
    runner = FakeRunner(hold=True)
    service = make_service(runner, lease_seconds=0.3)
    job = service.submit(JobRequest(params())).job_id
    wait_for(lambda: job in runner.started, what="the job to start")
    watch = service.watch(job)
    service.store._change("UPDATE jobs SET owner = 'another-gateway' WHERE job_id = ?", (job,))
    wait_for(lambda: service.running_count() == 0, what="the run here to stop")
    assert status_of(service, job) == JobStatus.RUNNING and runner.finished == []
    seen = list(iter(lambda: watch.next(0.2), None))
    assert not any(isinstance(update, Finished) for update in seen), seen


def test_a_cancel_between_the_claim_and_the_run_stops_the_run(make_service) -> None:
    """A cancel that lands after the store gave the job to this gateway but before its run was registered (a job
    cancelled right after it was submitted) once found no run to stop: the job read CANCELLED while its stages
    ran every step to the end. Now the claim looks again once the run is registered."""
    runner = FakeRunner()
    service = make_service(runner)
    claim = service.store.claim
    cancelled: list[str] = []

    def claim_then_cancel(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        claimed = claim(*args, **kwargs)
        if claimed is not None and not cancelled:
            cancelled.append(claimed.record.job_id)
            service.cancel(claimed.record.job_id)       # lands before the claim registers the run
        return claimed

    service.store.claim = claim_then_cancel        # type: ignore[method-assign]
    job = service.submit(JobRequest(params(steps=200)))
    wait_for(lambda: cancelled and not service._runs, what="the run to leave")
    assert cancelled == [job.job_id] and status_of(service, job.job_id) == JobStatus.CANCELLED
    assert job.job_id not in runner.finished, "its stages ran to the end for a cancelled job"


# --- live previews ------------------------------------------------------------------------------------------
class PreviewRunner:
    """Stages and steps like FakeRunner, and a Preview after every ``preview_every``-th step as the orchestrator
    passes the denoiser's on; holds after step ``hold_at`` until ``release()``. Records what each run asked."""

    def __init__(self, hold_at: int) -> None:
        self.hold_at = hold_at
        self.asked: list[int] = []
        self.held = threading.Event()
        self._go = threading.Event()

    def release(self) -> None:
        self._go.set()

    def run(self, job_id: str, params: Params, control: domain.RunControl | None = None,
            deadline: float | None = None, resume: bytes | None = None, checkpoint_every: int = 0,
            preview_every: int = 0) -> Iterator[domain.RunEvent]:
        control = control or domain.RunControl()
        self.asked.append(preview_every)
        yield domain.StageStarted(domain.Stage.DENOISER)
        for step in range(1, params.num_inference_steps + 1):
            yield domain.Progress(step, params.num_inference_steps, 0)
            if preview_every and step % preview_every == 0:
                yield domain.Preview(step, params.num_inference_steps, b"PNG%d" % step, 2, 2, 1, 4, 4)
            if step == self.hold_at:
                self.held.set()
                while not self._go.wait(0.002):
                    if control.cancelled.is_set():
                        raise Cancelled("the job was cancelled")
        yield domain.Result(video=b"MP4", mime_type="video/mp4", num_frames=2, height=32, width=32)


class RetriedPreviewRunner(PreviewRunner):
    """Steps 1-4 with previews, then the denoise call breaks and is tried again from step 1 (no checkpoint), as
    the orchestrator reports it; holds after step ``hold_at`` of the second attempt."""

    def run(self, job_id: str, params: Params, control: domain.RunControl | None = None,
            deadline: float | None = None, resume: bytes | None = None, checkpoint_every: int = 0,
            preview_every: int = 0) -> Iterator[domain.RunEvent]:
        yield domain.StageStarted(domain.Stage.DENOISER)
        for step in range(1, 5):
            yield domain.Progress(step, params.num_inference_steps, 0)
            if step % preview_every == 0:
                yield domain.Preview(step, params.num_inference_steps, b"PNG%d" % step, 2, 2, 1, 4, 4)
        yield domain.StageRetried("the denoiser stage failed during the call; trying again, attempt 2 of 3")
        yield from super().run(job_id, params, control, deadline, resume, checkpoint_every, preview_every)


def test_a_kept_preview_is_never_ahead_of_the_progress_after_a_retry_from_the_start(make_service) -> None:
    """The latest preview (step 4) was of the attempt that broke; once the retry's progress is behind it, GetJob
    and a late watcher have none until the retry makes its own (it once showed step 4's picture at step 1)."""
    runner = RetriedPreviewRunner(hold_at=1)
    service = make_service(runner, preview_every=2)
    with service.submit_and_watch(JobRequest(dataclasses.replace(params(steps=6), preview=True))) as early:
        wait_for(runner.held.is_set, what="the retry to reach its step 1")
        view = service.get(early.job_id)
        assert view.preview is None, view.preview
        with service.watch(early.job_id) as late:
            replayed = list(iter(lambda: late.next(timeout=0.2), None))
        assert not [u for u in replayed if isinstance(u, domain.Preview) and u.step > 1], replayed
        runner.release()
        updates = list(early)
    assert [u.step for u in updates if isinstance(u, domain.Preview)] == [2, 4, 2, 4, 6]


def test_previews_only_when_asked_the_latest_kept_for_get_and_late_watchers_never_stored(make_service) -> None:
    runner = PreviewRunner(hold_at=5)
    service = make_service(runner, preview_every=2)
    asked = dataclasses.replace(params(steps=6), preview=True)
    with service.submit_and_watch(JobRequest(asked)) as early:
        wait_for(runner.held.is_set, what="the run to reach step 5")
        job_id = early.job_id
        view = service.get(job_id)
        assert view.preview is not None and view.preview.step == 4 and view.preview.png == b"PNG4"
        with service.watch(job_id) as late:                  # the run so far, then the latest preview only
            replayed = [late.next(timeout=1) for _ in range(7)]
            assert [type(u).__name__ for u in replayed] == ["StageStarted"] + ["Progress"] * 5 + ["Preview"]
            assert replayed[-1].step == 4 and late.next(timeout=0.05) is None
        runner.release()
        updates = list(early)
    assert [u.step for u in updates if isinstance(u, domain.Preview)] == [2, 4, 6]
    assert runner.asked == [2]
    done = service.get(job_id)
    assert done.status == JobStatus.COMPLETED and done.preview is None       # kept only while it runs
    row = sqlite3.connect(service.store.path).execute("SELECT params FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    assert "PNG" not in row[0] and '"preview": true' in row[0] and done.record.params.preview

    runner.hold_at = 0
    plain = service.submit(JobRequest(params(steps=4)))
    wait_status(service, plain.job_id, JobStatus.COMPLETED)
    assert runner.asked == [2, 0]                            # a job that did not ask: the denoiser is asked for none
    row = sqlite3.connect(service.store.path).execute("SELECT params FROM jobs WHERE job_id = ?",
                                                      (plain.job_id,)).fetchone()
    assert "preview" not in row[0]                            # its row is as it was before previews existed
    assert cache_key("/m", asked) == cache_key("/m", dataclasses.replace(asked, preview=False))
