"""The job store's contract, run against both engines: the embedded one (SQLite plus files) and the shared
one (PostgreSQL, on the real server tests/postgres.py starts). What ``jobs.JobService`` relies on holds in
both: the queue's bound, the claim order of ``queue.QueuePolicy``, leases and takeovers with checkpoints,
compare-and-set transitions, the result store's whole-or-nothing videos.

The PostgreSQL-only tests are about what only a shared store has: two gateways (two store instances on one
database) claiming at once, notices between them, a lock one holds at a time, a schema two create at once,
and a database that restarts under them.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import queue as queue_module
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import psycopg
import pytest

from services.common.errors import InvalidArgument
from services.gateway.domain import JobRecord, JobStatus, Params, Priority, Stage, new_job_id
from services.gateway.queue import QueuePolicy
from services.gateway.store import open_stores
from services.gateway.store.base import Notice, ResultStoreFull, StoreQueueFull, StoreUnavailable
from services.gateway.store.postgres import (CHUNK_BYTES, NOTIFY_LIMIT, SCHEMA_VERSION, PostgresJobStore,
                                             PostgresResultStore, lock_key, payload_of)
from services.gateway.store.sqlite import FileResultStore, SqliteJobStore
from t2v.up import free_port

NOW = 1_700_000_000_000          # a fake clock, in unix milliseconds
LEASE = 10_000
FIFO = QueuePolicy(aging_seconds=0)
QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED,
                                                 JobStatus.FAILED, JobStatus.CANCELLED)
ACTIVE = (QUEUED, RUNNING)


def params(seed: int = 1, prompt: str = "a red ball moving right") -> Params:
    return Params(prompt=prompt, negative_prompt="blurry", num_frames=8, height=64, width=64, num_inference_steps=20,
                  guidance_scale=7.5, seed=seed, fps=8, scheduler="ddim")


def job(priority: Priority = Priority.NORMAL, created_ms: int = NOW, **fields: Any) -> JobRecord:
    return JobRecord(job_id=new_job_id(), status=QUEUED, priority=priority, params=params(), created_ms=created_ms,
                     **fields)


@dataclass
class Stores:
    engine: str
    jobs: Any
    results: Any
    dsn: str = ""

    def checkpoint_column(self, job_id: str) -> bytes | None:
        """The stored checkpoint itself (no record field shows it)."""
        if self.engine == "sqlite":
            row = self.jobs._db.execute("SELECT checkpoint FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return row[0]
        with psycopg.connect(self.dsn) as connection:
            value = connection.execute("SELECT checkpoint FROM jobs WHERE job_id = %s", (job_id,)).fetchone()[0]
            return bytes(value) if value is not None else None


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def stores(request: pytest.FixtureRequest, tmp_path) -> Iterator[Stores]:
    if request.param == "sqlite":
        jobs = SqliteJobStore(tmp_path / "jobs.sqlite3")
        made = Stores("sqlite", jobs, FileResultStore(tmp_path / "results"))
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        jobs = PostgresJobStore(dsn)
        made = Stores("postgres", jobs, PostgresResultStore(jobs), dsn)
    yield made
    made.results.close()
    made.jobs.close()


def submit(store: Any, *records: JobRecord, max_queued: int = 1000) -> list[JobRecord]:
    return [store.submit(record, max_queued) for record in records]


def claim(store: Any, owner: str = "gw-a", now: int = NOW, max_running: int = 100, policy: QueuePolicy = FIFO,
          lease: int = LEASE):
    return store.claim(owner, now, lease, max_running, policy)


# --- one job -------------------------------------------------------------------------------------------
def test_a_record_round_trips_every_field(stores: Stores) -> None:
    record = JobRecord(
        job_id=new_job_id(), status=COMPLETED, priority=Priority.HIGH,
        params=params(seed=42, prompt="ünïcode ☃ 'q' \""),
        seed_given=True, cache_key="ab" * 32, created_ms=NOW, deadline_ms=NOW + 5, started_ms=NOW + 1,
        finished_ms=NOW + 2, expires_ms=NOW + 3, stage=Stage.DECODER, step=20, total_steps=20, error_code="OK",
        error_message="fine", warnings=("first", "second ☃"), cached=True, video_size=12345, mime_type="video/mp4",
        runs=2, owner="gw-z", lease_expires_ms=NOW + 4, checkpoint_step=7,
        trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    stored = stores.jobs.insert(record)
    assert stored.seq > 0 and stored == dataclasses.replace(record, seq=stored.seq)
    assert stores.jobs.get(record.job_id) == stored
    assert stores.jobs.list() == [stored]
    assert stores.jobs.get(new_job_id()) is None
    plain = stores.jobs.submit(job(), 10)                     # the defaults round-trip too (cache_key None)
    assert stores.jobs.get(plain.job_id) == plain and plain.seq > stored.seq and plain.cache_key is None
    with pytest.raises(InvalidArgument):
        stores.jobs.insert(dataclasses.replace(record, job_id="../etc/passwd"))


def test_submit_holds_the_queue_bound(stores: Stores) -> None:
    first, second = submit(stores.jobs, job(), job(), max_queued=2)
    assert second.seq > first.seq and stores.jobs.count(QUEUED) == 2
    with pytest.raises(StoreQueueFull) as full:
        stores.jobs.submit(job(), 2)
    assert full.value.length == 2 and stores.jobs.count(QUEUED) == 2
    assert claim(stores.jobs) is not None                     # a job that runs no longer counts
    stores.jobs.submit(job(), 2)
    stores.jobs.insert(dataclasses.replace(job(), status=COMPLETED))   # nor does a cache hit
    with pytest.raises(StoreQueueFull):
        stores.jobs.submit(job(), 2)


def test_claim_takes_the_highest_level_first_then_first_come(stores: Stores) -> None:
    low, normal_1, high, normal_2 = submit(stores.jobs, job(Priority.LOW, NOW), job(Priority.NORMAL, NOW + 1),
                                           job(Priority.HIGH, NOW + 2), job(Priority.NORMAL, NOW + 1))
    order = [claim(stores.jobs, now=NOW + 10).record.job_id for _ in range(4)]
    assert order == [high.job_id, normal_1.job_id, normal_2.job_id, low.job_id]   # same created_ms: seq decides
    assert claim(stores.jobs, now=NOW + 10) is None


def test_claim_ages_waiting_jobs_as_the_policy_orders_them(stores: Stores) -> None:
    policy = QueuePolicy(aging_seconds=10)
    old_low = submit(stores.jobs, job(Priority.LOW, NOW))[0]
    submit(stores.jobs, job(Priority.HIGH, NOW + 15_000), job(Priority.NORMAL, NOW + 1_000),
           job(Priority.LOW, NOW + 19_000))
    now = NOW + 20_000          # the old low job has waited 20 s: two levels up, as high as the high one
    expected = [w.job_id for w in policy.order(stores.jobs.waiting(), now)]
    assert expected[0] == old_low.job_id
    assert [claim(stores.jobs, now=now, policy=policy).record.job_id for _ in range(4)] == expected
    # without aging the same queue runs by level
    submit(stores.jobs, job(Priority.LOW, NOW), job(Priority.HIGH, NOW + 15_000))
    assert claim(stores.jobs, now=now, policy=FIFO).record.priority == Priority.HIGH


def test_claim_respects_max_running_and_fills_the_record(stores: Stores) -> None:
    records = submit(stores.jobs, job(), job(), job())
    first = claim(stores.jobs, owner="gw-a", now=NOW + 5, max_running=2)
    assert first.taken_over is False and first.checkpoint is None
    assert first.record == dataclasses.replace(records[0], status=RUNNING, owner="gw-a", runs=1, started_ms=NOW + 5,
                                               lease_expires_ms=NOW + 5 + LEASE)
    assert stores.jobs.get(records[0].job_id) == first.record
    assert claim(stores.jobs, owner="gw-b", now=NOW + 6, max_running=2).record.job_id == records[1].job_id
    assert claim(stores.jobs, owner="gw-b", now=NOW + 7, max_running=2) is None     # both slots hold live leases
    assert stores.jobs.running(NOW + 7) == 2 and stores.jobs.count(QUEUED) == 1
    assert claim(stores.jobs, now=NOW, max_running=0) is None


def test_a_job_whose_lease_ran_out_is_taken_over_with_its_checkpoint(stores: Stores) -> None:
    old, waiting = submit(stores.jobs, job(), job())
    mine = claim(stores.jobs, owner="gw-a", now=NOW)
    assert stores.jobs.save_checkpoint(old.job_id, "gw-a", 3, b"\x00latents" * 100)
    stores.jobs.progress(old.job_id, "gw-a", Stage.DENOISER, 3, 20)
    assert stores.jobs.recoverable(NOW + LEASE - 1) == 0 and stores.jobs.recoverable(NOW + LEASE) == 1
    later = NOW + LEASE + 1                                   # gw-a went away: its lease ran out
    assert stores.jobs.running(later) == 0
    taken = claim(stores.jobs, owner="gw-b", now=later)       # before the queued job
    assert taken.taken_over is True and taken.checkpoint == b"\x00latents" * 100
    assert taken.record.job_id == old.job_id and taken.record.owner == "gw-b" and taken.record.runs == 2
    assert taken.record.started_ms == mine.record.started_ms == NOW and taken.record.checkpoint_step == 3
    assert taken.record.stage == Stage.DENOISER and taken.record.step == 3
    # gw-a comes back: it holds nothing any more and can change nothing
    assert stores.jobs.heartbeat("gw-a", [old.job_id], later, LEASE) == set()
    assert not stores.jobs.save_checkpoint(old.job_id, "gw-a", 5, b"stale")
    stores.jobs.progress(old.job_id, "gw-a", Stage.DECODER, 20, 20)
    assert not stores.jobs.transition(old.job_id, COMPLETED, ACTIVE, owner="gw-a")
    assert not stores.jobs.release("gw-a", old.job_id)
    assert stores.jobs.get(old.job_id).stage == Stage.DENOISER
    assert stores.checkpoint_column(old.job_id) == b"\x00latents" * 100
    second = claim(stores.jobs, owner="gw-b", now=later)
    assert second.record.job_id == waiting.job_id and second.taken_over is False


def test_heartbeat_renews_leases_and_reports_the_jobs_lost(stores: Stores) -> None:
    one, two, three = submit(stores.jobs, job(), job(), job())
    for _ in range(2):
        claim(stores.jobs, owner="gw-a", now=NOW)
    claim(stores.jobs, owner="gw-b", now=NOW)
    assert stores.jobs.heartbeat("gw-a", [one.job_id, two.job_id, three.job_id], NOW + 5_000, LEASE) == \
        {one.job_id, two.job_id}                              # three is gw-b's
    assert stores.jobs.get(one.job_id).lease_expires_ms == NOW + 5_000 + LEASE
    assert stores.jobs.get(three.job_id).lease_expires_ms == NOW + LEASE
    assert stores.jobs.transition(two.job_id, CANCELLED, ACTIVE)        # cancelled from anywhere
    assert stores.jobs.heartbeat("gw-a", [one.job_id, two.job_id], NOW + 6_000, LEASE) == {one.job_id}
    assert stores.jobs.heartbeat("gw-a", [], NOW, LEASE) == set()
    assert stores.jobs.running(NOW + LEASE + 1) == 1                     # only the renewed one lives on


def test_release_ends_the_lease_at_once(stores: Stores) -> None:
    record = submit(stores.jobs, job())[0]
    claim(stores.jobs, owner="gw-a")
    assert not stores.jobs.release("gw-b", record.job_id)
    assert stores.jobs.release("gw-a", record.job_id)
    released = stores.jobs.get(record.job_id)
    assert released.status == RUNNING and released.lease_expires_ms == 0 and released.owner == "gw-a"
    assert stores.jobs.running(NOW) == 0 and stores.jobs.recoverable(NOW) == 1
    taken = claim(stores.jobs, owner="gw-b", now=NOW + 1)
    assert taken.taken_over and taken.record.owner == "gw-b"


def test_transitions_are_compare_and_set(stores: Stores) -> None:
    record = submit(stores.jobs, job())[0]
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def end(status: JobStatus) -> None:
        barrier.wait()
        results.append(stores.jobs.transition(record.job_id, status, ACTIVE, error_code=status.name))

    threads = [threading.Thread(target=end, args=(CANCELLED if i % 2 else FAILED,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    ended = stores.jobs.get(record.job_id)
    assert ended.error_code == ended.status.name
    # the owner must match; an unknown job, or one not in the expected status, never changes
    other = submit(stores.jobs, job())[0]
    claim(stores.jobs, owner="gw-a")
    assert not stores.jobs.transition(other.job_id, COMPLETED, [RUNNING], owner="gw-b")
    assert not stores.jobs.transition(other.job_id, COMPLETED, [QUEUED], owner="gw-a")
    assert not stores.jobs.transition(new_job_id(), COMPLETED, ACTIVE)
    assert stores.jobs.transition(other.job_id, RUNNING, [RUNNING], owner="gw-a", step=4)     # not an end
    assert stores.jobs.get(other.job_id).owner == "gw-a" and stores.jobs.get(other.job_id).step == 4
    with pytest.raises(ValueError, match="cannot set"):
        stores.jobs.transition(other.job_id, FAILED, ACTIVE, created_ms=1)


def test_ending_a_job_clears_its_lease_and_checkpoint(stores: Stores) -> None:
    record = submit(stores.jobs, job())[0]
    claim(stores.jobs, owner="gw-a")
    assert stores.jobs.save_checkpoint(record.job_id, "gw-a", 9, b"state")
    assert stores.checkpoint_column(record.job_id) == b"state"
    assert stores.jobs.transition(record.job_id, COMPLETED, ACTIVE, owner="gw-a", video_size=99, mime_type="video/mp4",
                                  expires_ms=NOW + 60_000, finished_ms=NOW + 5, warnings=("w",), cached=False,
                                  stage=Stage.DECODER)
    done = stores.jobs.get(record.job_id)
    assert (done.status, done.owner, done.lease_expires_ms, done.checkpoint_step) == (COMPLETED, "", 0, 0)
    assert (done.video_size, done.mime_type, done.finished_ms, done.warnings, done.stage) == \
        (99, "video/mp4", NOW + 5, ("w",), Stage.DECODER)
    assert stores.checkpoint_column(record.job_id) is None
    assert not stores.jobs.save_checkpoint(record.job_id, "gw-a", 10, b"late")
    assert claim(stores.jobs, now=NOW + LEASE * 10) is None and stores.jobs.recoverable(NOW + LEASE * 10) == 0


def test_progress_is_written_only_while_running_under_that_owner(stores: Stores) -> None:
    record = submit(stores.jobs, job())[0]
    stores.jobs.progress(record.job_id, "gw-a", Stage.DENOISER, 1, 20)          # still queued
    assert stores.jobs.get(record.job_id).step == 0
    claim(stores.jobs, owner="gw-a")
    stores.jobs.progress(record.job_id, "gw-b", Stage.DENOISER, 2, 20)
    assert stores.jobs.get(record.job_id).step == 0
    stores.jobs.progress(record.job_id, "gw-a", Stage.DENOISER, 3, 20)
    now = stores.jobs.get(record.job_id)
    assert (now.stage, now.step, now.total_steps) == (Stage.DENOISER, 3, 20)


def test_warnings_append_even_from_many_threads(stores: Stores) -> None:
    record = submit(stores.jobs, job())[0]
    stores.jobs.add_warning(record.job_id, "first ☃ \"quoted\" \\ back")
    threads = [threading.Thread(target=stores.jobs.add_warning, args=(record.job_id, f"w{i}")) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    warnings = stores.jobs.get(record.job_id).warnings
    assert warnings[0] == "first ☃ \"quoted\" \\ back" and sorted(warnings[1:]) == sorted(f"w{i}" for i in range(10))
    stores.jobs.add_warning(new_job_id(), "nobody")           # an unknown job: nothing happens


def test_a_listing_keeps_to_one_tenant_and_the_tenant_round_trips(stores: Stores) -> None:
    alices = submit(stores.jobs, *[job(tenant="a" * 32) for _ in range(3)])
    bobs = submit(stores.jobs, job(tenant="b" * 32))
    keyless = submit(stores.jobs, job())
    assert [r.job_id for r in stores.jobs.list(tenant="a" * 32)] == [r.job_id for r in reversed(alices)]
    assert [r.job_id for r in stores.jobs.list(QUEUED, tenant="b" * 32)] == [bobs[0].job_id]
    page = stores.jobs.list(limit=2, tenant="a" * 32)
    assert [r.job_id for r in stores.jobs.list(limit=2, before_seq=page[-1].seq, tenant="a" * 32)] == [alices[0].job_id]
    assert len(stores.jobs.list()) == 5                       # None: everyone's
    assert stores.jobs.get(alices[0].job_id).tenant == "a" * 32
    assert stores.jobs.get(keyless[0].job_id).tenant == ""


TRACE_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_trace_parent_stays_with_the_job_through_a_takeover_and_its_end(stores: Stores) -> None:
    """What lets a successor gateway continue the job's trace: the row's traceparent, set at admission, comes
    back with every claim (a takeover included) and no transition can change it."""
    traced, untraced = submit(stores.jobs, job(trace_parent=TRACE_PARENT), job())
    assert stores.jobs.get(traced.job_id).trace_parent == TRACE_PARENT
    assert stores.jobs.get(untraced.job_id).trace_parent == ""
    first = claim(stores.jobs, "gw-a")
    assert first.record.job_id == traced.job_id and first.record.trace_parent == TRACE_PARENT
    assert stores.jobs.save_checkpoint(traced.job_id, "gw-a", 3, b"state")
    taken = claim(stores.jobs, "gw-b", now=NOW + LEASE + 1)          # gw-a's lease ran out: gw-b takes it over
    assert taken.taken_over and taken.record.job_id == traced.job_id and taken.checkpoint == b"state"
    assert taken.record.trace_parent == TRACE_PARENT and taken.record.runs == 2
    with pytest.raises(ValueError):
        stores.jobs.transition(traced.job_id, COMPLETED, ACTIVE, owner="gw-b", trace_parent="00-" + "1" * 32 + "-" +
                               "2" * 16 + "-01")
    assert stores.jobs.transition(traced.job_id, COMPLETED, ACTIVE, owner="gw-b", finished_ms=NOW + LEASE + 2)
    assert stores.jobs.get(traced.job_id).trace_parent == TRACE_PARENT
    assert [r.trace_parent for r in stores.jobs.list(COMPLETED)] == [TRACE_PARENT]


def test_list_pages_newest_first_with_a_filter(stores: Stores) -> None:
    records = submit(stores.jobs, *[job() for _ in range(7)])
    claim(stores.jobs)                                        # records[0] runs
    newest_first = [r.job_id for r in reversed(records)]
    page = stores.jobs.list(limit=3)
    assert [r.job_id for r in page] == newest_first[:3]
    page = stores.jobs.list(limit=3, before_seq=page[-1].seq)
    assert [r.job_id for r in page] == newest_first[3:6]
    assert [r.job_id for r in stores.jobs.list(limit=3, before_seq=page[-1].seq)] == newest_first[6:]
    assert [r.job_id for r in stores.jobs.list(QUEUED, limit=100)] == newest_first[:6]
    assert [r.job_id for r in stores.jobs.list(RUNNING)] == [records[0].job_id]
    assert stores.jobs.list(COMPLETED) == []
    assert sorted(w.job_id for w in stores.jobs.waiting()) == sorted(r.job_id for r in records[1:])
    assert {w.seq for w in stores.jobs.waiting()} == {r.seq for r in records[1:]}
    assert (stores.jobs.count(QUEUED), stores.jobs.count(RUNNING), stores.jobs.count(FAILED)) == (6, 1, 0)


def test_list_pages_oldest_first_with_after_seq(stores: Stores) -> None:
    records = submit(stores.jobs, *[job(tenant="a" * 32 if i % 3 else "") for i in range(7)])
    claim(stores.jobs)                                        # records[0] runs
    oldest_first = [r.job_id for r in records]
    page = stores.jobs.list(limit=3, oldest_first=True)
    assert [r.job_id for r in page] == oldest_first[:3]
    page = stores.jobs.list(limit=3, after_seq=page[-1].seq, oldest_first=True)
    assert [r.job_id for r in page] == oldest_first[3:6]
    assert [r.job_id for r in stores.jobs.list(limit=3, after_seq=page[-1].seq, oldest_first=True)] == oldest_first[6:]
    assert stores.jobs.list(after_seq=records[-1].seq, oldest_first=True) == []
    assert [r.job_id for r in stores.jobs.list(QUEUED, oldest_first=True)] == oldest_first[1:]
    alices = [r.job_id for r in records if r.tenant]
    assert [r.job_id for r in stores.jobs.list(tenant="a" * 32, oldest_first=True)] == alices
    assert [r.job_id for r in stores.jobs.list(tenant="a" * 32, after_seq=records[1].seq, oldest_first=True)] \
        == alices[1:]
    # the bounds hold in either order: after_seq newest first, both at once
    assert [r.job_id for r in stores.jobs.list(after_seq=records[4].seq)] == oldest_first[:4:-1]
    between = stores.jobs.list(after_seq=records[1].seq, before_seq=records[5].seq, oldest_first=True)
    assert [r.job_id for r in between] == oldest_first[2:5]


def test_deleted_jobs_are_never_listed_unless_asked_for(stores: Stores) -> None:
    kept, gone, other = submit(stores.jobs, job(), job(tenant="a" * 32), job(tenant="a" * 32))
    assert stores.jobs.transition(gone.job_id, CANCELLED, ACTIVE)
    assert stores.jobs.transition(gone.job_id, JobStatus.DELETED, [CANCELLED, COMPLETED, FAILED])
    assert not stores.jobs.transition(gone.job_id, JobStatus.DELETED, [CANCELLED, COMPLETED, FAILED])   # once
    for listing in (stores.jobs.list(), stores.jobs.list(oldest_first=True), stores.jobs.list(tenant="a" * 32),
                    stores.jobs.list(before_seq=other.seq), stores.jobs.list(after_seq=kept.seq, oldest_first=True)):
        assert gone.job_id not in [r.job_id for r in listing]
    assert [r.job_id for r in stores.jobs.list()] == [other.job_id, kept.job_id]
    assert [r.job_id for r in stores.jobs.list(JobStatus.DELETED)] == [gone.job_id]
    assert stores.jobs.get(gone.job_id).status == JobStatus.DELETED          # the row stays: its seq, its tenant
    assert stores.jobs.count(QUEUED) == 2 and gone.job_id not in [w.job_id for w in stores.jobs.waiting()]


def test_find_cached_and_due_to_expire(stores: Stores) -> None:
    key = "cd" * 32

    def completed(expires_ms: int, cache_key: str | None = key) -> JobRecord:
        return stores.jobs.insert(dataclasses.replace(job(seed_given=True, cache_key=cache_key), status=COMPLETED,
                                                      expires_ms=expires_ms))

    older, newer, _gone = completed(NOW + 100), completed(NOW + 50), completed(NOW - 1)
    other = completed(NOW + 10, cache_key=None)
    submit(stores.jobs, job(seed_given=True, cache_key=key))  # queued: not a cache hit
    assert stores.jobs.find_cached(key, NOW).job_id == newer.job_id
    assert stores.jobs.find_cached(key, NOW + 60).job_id == older.job_id
    assert stores.jobs.find_cached(key, NOW + 100) is None and stores.jobs.find_cached("ef" * 32, NOW) is None
    assert stores.jobs.due_to_expire(NOW) == [_gone.job_id]
    assert stores.jobs.due_to_expire(NOW + 50) == [newer.job_id, _gone.job_id, other.job_id]   # by seq
    assert stores.jobs.transition(_gone.job_id, JobStatus.EXPIRED, [COMPLETED])
    assert _gone.job_id not in stores.jobs.due_to_expire(NOW + 1000)


def test_overdue_and_next_deadline(stores: Stores) -> None:
    assert stores.jobs.next_deadline_ms() is None and stores.jobs.overdue(NOW) == []
    late, later, none = submit(stores.jobs, job(deadline_ms=NOW + 100), job(deadline_ms=NOW + 200), job())
    claim(stores.jobs)                                        # late runs: still counts
    stores.jobs.insert(dataclasses.replace(job(deadline_ms=NOW + 1), status=FAILED))     # ended: never
    assert stores.jobs.next_deadline_ms() == NOW + 100
    assert stores.jobs.overdue(NOW + 99) == []
    assert [r.job_id for r in stores.jobs.overdue(NOW + 100)] == [late.job_id]
    assert [r.job_id for r in stores.jobs.overdue(NOW + 10_000)] == [late.job_id, later.job_id]
    assert stores.jobs.transition(late.job_id, FAILED, ACTIVE, error_code="DEADLINE_EXCEEDED")
    assert stores.jobs.next_deadline_ms() == NOW + 200


def test_the_embedded_store_needs_no_other_gateway(tmp_path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        assert store.shared is False and store.healthy()
        store.notify(Notice("work"))
        store.listen(lambda notice: None)
        with store.exclusive("cleanup") as mine:
            assert mine
    finally:
        store.close()


# --- the result store --------------------------------------------------------------------------------------
def test_videos_are_saved_opened_read_and_sought(stores: Stores) -> None:
    a, b = new_job_id(), new_job_id()
    video = os.urandom(2 * CHUNK_BYTES + 12345)               # three chunks in PostgreSQL
    assert stores.results.open(a) is None
    assert stores.results.save(a, video) == len(video)
    handle, size = stores.results.open(a)
    with handle:
        assert size == len(video)
        assert handle.read(10) == video[:10] and handle.tell() == 10
        handle.seek(CHUNK_BYTES - 5)                          # across a chunk's end
        assert handle.read(10) == video[CHUNK_BYTES - 5:CHUNK_BYTES + 5]
        handle.seek(size - 3)
        assert handle.read(100) == video[-3:] and handle.read(1) == b""
        handle.seek(0)
        assert handle.read() == video
        handle.seek(-7, io.SEEK_END)
        assert handle.tell() == size - 7 and handle.read() == video[-7:]
    small = b"\x00\x00\x00\x18ftypmp42"
    assert stores.results.save(a, small) == len(small)        # replaces the old one whole
    handle, size = stores.results.open(a)
    with handle:
        assert (size, handle.read()) == (len(small), small)
    assert stores.results.save(b, b"") == 0                   # an empty video is still a video
    handle, size = stores.results.open(b)
    with handle:
        assert (size, handle.read()) == (0, b"")
    for bad in ("../x", "A" * 32, ""):
        with pytest.raises(InvalidArgument):
            stores.results.open(bad)
        with pytest.raises(InvalidArgument):
            stores.results.save(bad, b"x")


def test_videos_are_copied_deleted_and_swept(stores: Stores) -> None:
    source, copy, orphan, missing = (new_job_id() for _ in range(4))
    video = os.urandom(CHUNK_BYTES + 1)
    stores.results.save(source, video)
    assert stores.results.copy(source, copy) == len(video)
    with pytest.raises(OSError):
        stores.results.copy(missing, new_job_id())
    assert stores.results.delete(source) and not stores.results.delete(source)
    handle, size = stores.results.open(copy)                  # the copy is its own
    with handle:
        assert size == len(video) and handle.read() == video
    stores.results.save(orphan, b"orphan")
    seen: list[str] = []

    def keep(job_id: str) -> bool:
        seen.append(job_id)
        return job_id == copy

    assert stores.results.sweep(keep) == 1
    assert sorted(seen) == sorted([copy, orphan])
    assert stores.results.open(orphan) is None and stores.results.open(copy) is not None


# --- PostgreSQL only: the shared store --------------------------------------------------------------------
@pytest.fixture()
def two(postgres_dsn: str) -> Iterator[tuple[PostgresJobStore, PostgresJobStore]]:
    first, second = PostgresJobStore(postgres_dsn), PostgresJobStore(postgres_dsn)
    yield first, second
    first.close()
    second.close()


@pytest.mark.slow
def test_two_gateways_claiming_at_once_keep_the_bounds(two: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    """20 threads on two gateways: never more than max_running at once, never one job twice."""
    first, second = two
    max_running, jobs = 4, 40
    submit(first, *[job(created_ms=NOW + i) for i in range(jobs)])
    claimed: list[str] = []
    held = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(store: PostgresJobStore, owner: str) -> None:
        try:
            idle_until = time.monotonic() + 20
            while time.monotonic() < idle_until:
                got = store.claim(owner, int(time.time() * 1000), 60_000, max_running, FIFO)
                if got is None:
                    if store.count(QUEUED) == 0:
                        return
                    time.sleep(0.001)
                    continue
                with lock:
                    held[0] += 1
                    claimed.append(got.record.job_id)
                    assert held[0] <= max_running, f"{held[0]} jobs run at once"
                assert store.running(int(time.time() * 1000)) <= max_running
                time.sleep(0.002)
                with lock:
                    held[0] -= 1              # before the end is written: never more than the store counts
                assert store.transition(got.record.job_id, COMPLETED, [RUNNING], owner=owner)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=((first, second)[i % 2], f"gw-{i % 2}-t{i}")) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len(claimed) == jobs and len(set(claimed)) == jobs
    assert first.count(COMPLETED) == jobs and all(r.runs == 1 for r in second.list(limit=100))


@pytest.mark.slow
def test_two_gateways_submitting_at_once_keep_the_queue_bound(two: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    bound, accepted, refused = 15, [], []
    barrier = threading.Barrier(20)

    def worker(store: PostgresJobStore) -> None:
        barrier.wait()
        for _ in range(3):
            try:
                accepted.append(store.submit(job(), bound))
            except StoreQueueFull as full:
                refused.append(full.length)

    threads = [threading.Thread(target=worker, args=(two[i % 2],)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == bound and two[0].count(QUEUED) == bound and set(refused) == {bound}


@pytest.mark.slow
def test_notices_travel_between_gateways(two: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    first, second = two
    got: queue_module.Queue[Notice] = queue_module.Queue()

    def broken(notice: Notice) -> None:
        raise RuntimeError("a handler's bug")              # logged; the listener goes on

    first.listen(broken)
    first.listen(got.put)
    job_id = new_job_id()
    second.notify(Notice("event", job_id, {"step": 3, "total": 20, "timestep": 981}, origin="gw-b"))
    assert got.get(timeout=5) == Notice("event", job_id, {"step": 3, "total": 20, "timestep": 981}, "gw-b")
    long = "☃ a warning that goes on " * 2000                 # far over PostgreSQL's 8000 bytes
    second.notify(Notice("event", job_id, {"warning": long}, origin="gw-b"))
    arrived = got.get(timeout=5)
    assert arrived.kind == "event" and long.startswith(arrived.data["warning"][:-3])
    assert arrived.data["warning"].endswith("...") and len(payload_of(arrived).encode()) < NOTIFY_LIMIT
    second.notify(Notice("cancel", job_id, origin="gw-b"))
    assert got.get(timeout=5) == Notice("cancel", job_id, {}, "gw-b")
    first.notify(Notice("work", origin="gw-a"))               # a gateway hears itself too (jobs.py skips it)
    assert got.get(timeout=5).origin == "gw-a"


def test_notice_payloads_stay_under_the_limit() -> None:
    for text in ("x" * 10_000, "☃" * 5_000, "\"\\\x01" * 4_000, "y" * 7_950):
        payload = payload_of(Notice("event", "a" * 32, {"warning": text, "other": text}, "gw-" + "o" * 60))
        assert len(payload.encode()) < NOTIFY_LIMIT
    assert payload_of(Notice("work")) == '{"k":"work","j":"","d":{},"o":""}'


@pytest.mark.slow
def test_exclusive_is_held_by_one_gateway_at_a_time(two: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    first, second = two
    with first.exclusive("cleanup") as mine:
        assert mine
        with second.exclusive("cleanup") as theirs:
            assert not theirs
        with second.exclusive("other") as other:
            assert other
    with second.exclusive("cleanup") as theirs:
        assert theirs
    with pytest.raises(RuntimeError):
        with first.exclusive("cleanup") as mine:
            assert mine
            raise RuntimeError("the block failed")
    with second.exclusive("cleanup") as theirs:           # released all the same
        assert theirs
    assert first.claim("gw-a", NOW, LEASE, 1, FIFO) is None   # the pooled connection works as before


@pytest.mark.slow
def test_a_gateway_frozen_in_mid_claim_does_not_hang_the_others(postgres_dsn: str) -> None:
    store = PostgresJobStore(postgres_dsn, lock_timeout=0.3)
    try:
        record = store.submit(job(), 10)
        with psycopg.connect(postgres_dsn) as frozen:         # holds the claim lock in an open transaction
            frozen.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("t2v:claim"),))
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                store.claim("gw-a", NOW, LEASE, 5, FIFO)
            assert time.monotonic() - started < 3
            assert store.submit(job(), 10).seq > record.seq     # the rest of the store works meanwhile
        assert store.claim("gw-a", NOW, LEASE, 5, FIFO).record.job_id == record.job_id
    finally:
        store.close()


@pytest.mark.slow
def test_the_schema_is_created_once_when_gateways_start_together(postgres_server, postgres_dsn: str) -> None:
    opened: list[PostgresJobStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            opened.append(PostgresJobStore(postgres_dsn))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors and len(opened) == 4
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:
            assert connection.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
            # a gateway starting while another has a transaction open on the jobs table is not blocked
            holder = psycopg.connect(postgres_dsn)
            holder.execute("SELECT count(*) FROM jobs")          # holds ACCESS SHARE until it ends
            started = time.monotonic()
            PostgresJobStore(postgres_dsn).close()
            assert time.monotonic() - started < 2
            holder.close()
    finally:
        for store in opened:
            store.close()


@pytest.mark.slow
def test_an_older_schema_gains_the_new_columns(postgres_dsn: str) -> None:
    old_id = new_job_id()
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:   # the first schema: no leases yet
        connection.execute("""CREATE TABLE jobs (seq BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL, priority TEXT NOT NULL, params TEXT NOT NULL, seed_given INTEGER NOT NULL DEFAULT 0,
            cache_key TEXT, created_ms BIGINT NOT NULL DEFAULT 0, deadline_ms BIGINT NOT NULL DEFAULT 0,
            started_ms BIGINT NOT NULL DEFAULT 0, finished_ms BIGINT NOT NULL DEFAULT 0,
            expires_ms BIGINT NOT NULL DEFAULT 0, stage INTEGER NOT NULL DEFAULT 0, step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL DEFAULT 0, error_code TEXT NOT NULL DEFAULT '',
            error_message TEXT NOT NULL DEFAULT '', warnings TEXT NOT NULL DEFAULT '[]',
            cached INTEGER NOT NULL DEFAULT 0, video_size BIGINT NOT NULL DEFAULT 0,
            mime_type TEXT NOT NULL DEFAULT '', runs INTEGER NOT NULL DEFAULT 0)""")
        connection.execute("INSERT INTO jobs (job_id, status, priority, params, created_ms) VALUES (%s, 'queued', "
                           "'normal', %s, %s)", (old_id, '{"prompt": "p", "negative_prompt": "", "num_frames": 8, '
                           '"height": 64, "width": 64, "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 1, '
                           '"fps": 8, "scheduler": "ddim"}', NOW))
    store = PostgresJobStore(postgres_dsn)
    try:
        old = store.get(old_id)
        assert old.status == QUEUED and old.owner == "" and old.lease_expires_ms == 0 and old.params.seed == 1
        assert old.tenant == "" and old.trace_parent == ""
        taken = store.claim("gw-a", NOW, LEASE, 1, FIFO)
        assert taken.record.job_id == old_id and store.save_checkpoint(old_id, "gw-a", 1, b"c")
    finally:
        store.close()


def test_an_older_sqlite_state_dir_gains_the_new_columns(tmp_path) -> None:
    """A state dir of the first gateway (no leases, tenants or traces yet) opens, and its jobs read and run."""
    import sqlite3

    old_id = new_job_id()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as connection:
        connection.execute("""CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL, priority TEXT NOT NULL, params TEXT NOT NULL, seed_given INTEGER NOT NULL DEFAULT 0,
            cache_key TEXT, created_ms INTEGER NOT NULL DEFAULT 0, deadline_ms INTEGER NOT NULL DEFAULT 0,
            started_ms INTEGER NOT NULL DEFAULT 0, finished_ms INTEGER NOT NULL DEFAULT 0,
            expires_ms INTEGER NOT NULL DEFAULT 0, stage INTEGER NOT NULL DEFAULT 0, step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL DEFAULT 0, error_code TEXT NOT NULL DEFAULT '',
            error_message TEXT NOT NULL DEFAULT '', warnings TEXT NOT NULL DEFAULT '[]',
            cached INTEGER NOT NULL DEFAULT 0, video_size INTEGER NOT NULL DEFAULT 0,
            mime_type TEXT NOT NULL DEFAULT '', runs INTEGER NOT NULL DEFAULT 0)""")
        connection.execute("INSERT INTO jobs (job_id, status, priority, params, created_ms) VALUES (?, 'queued', "
                           "'normal', ?, ?)", (old_id, '{"prompt": "p", "negative_prompt": "", "num_frames": 8, '
                           '"height": 64, "width": 64, "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 1, '
                           '"fps": 8, "scheduler": "ddim"}', NOW))
    connection.close()
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        old = store.get(old_id)
        assert old.status == QUEUED and old.tenant == "" and old.trace_parent == "" and old.params.seed == 1
        traced = store.submit(job(trace_parent=TRACE_PARENT), 10)
        assert store.get(traced.job_id).trace_parent == TRACE_PARENT
        assert claim(store).record.job_id == old_id
    finally:
        store.close()


@pytest.mark.slow
def test_a_full_database_is_a_full_result_store(postgres_dsn: str) -> None:
    jobs = PostgresJobStore(postgres_dsn)
    results = PostgresResultStore(jobs)
    try:
        job_id = new_job_id()
        results.save(job_id, b"the old video")
        with psycopg.connect(postgres_dsn, autocommit=True) as connection:     # the server's own disk_full error
            connection.execute("CREATE FUNCTION no_room() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                               "RAISE EXCEPTION 'could not extend file: No space left on device' "
                               "USING ERRCODE = 'disk_full'; END $$")
            connection.execute("CREATE TRIGGER no_room BEFORE INSERT ON videos FOR EACH ROW EXECUTE FUNCTION no_room()")
        with pytest.raises(ResultStoreFull) as full:
            results.save(job_id, os.urandom(CHUNK_BYTES * 2))
        assert full.value.errno == errno.ENOSPC and "the result store is full" in str(full.value)
        assert isinstance(full.value, OSError)
        handle, size = results.open(job_id)                  # the old video, whole
        with handle:
            assert handle.read() == b"the old video"
    finally:
        jobs.close()


def test_an_unreachable_server_at_start_is_a_sentence() -> None:
    port = free_port("127.0.0.1")
    with pytest.raises(StoreUnavailable, match=r"password=\*\*\*") as error:
        PostgresJobStore(f"host=127.0.0.1 port={port} user=t2v password=s3cret dbname=jobs")
    assert "s3cret" not in str(error.value)
    url = f"postgresql://t2v:s3cret@127.0.0.1:{port}/jobs"
    with pytest.raises(StoreUnavailable) as error:
        PostgresJobStore(url)
    text = str(error.value)
    assert text.startswith("cannot reach the job store at postgresql://t2v:***@127.0.0.1:") and "s3cret" not in text
    assert text.endswith("; check --job-store") and "\n" not in text
    with pytest.raises(StoreUnavailable):
        open_stores(url, "/nonexistent")


def wait_until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> float:
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except StoreUnavailable:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_the_store_survives_a_database_restart(postgres_server, postgres_dsn: str) -> None:
    jobs = PostgresJobStore(postgres_dsn, timeout=0.25)
    other = PostgresJobStore(postgres_dsn)
    results = PostgresResultStore(jobs)
    heard: queue_module.Queue[Notice] = queue_module.Queue()
    try:
        jobs.listen(heard.put)
        kept = jobs.submit(job(), 10)
        results.save(kept.job_id, b"video")
        postgres_server.stop()
        # every call says so in a sentence: never a raw psycopg traceback, never a hang
        calls: list[Callable[[], object]] = [
            lambda: jobs.get(kept.job_id), lambda: jobs.submit(job(), 10),
            lambda: jobs.claim("gw-a", NOW, LEASE, 5, FIFO), lambda: jobs.heartbeat("gw-a", [kept.job_id], NOW, LEASE),
            lambda: jobs.transition(kept.job_id, CANCELLED, ACTIVE), lambda: jobs.notify(Notice("work")),
            lambda: jobs.list(), lambda: results.save(kept.job_id, b"x"), lambda: results.open(kept.job_id),
            lambda: jobs.exclusive("cleanup").__enter__()]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="job store at postgresql://"):
                call()
            assert time.monotonic() - started < 5
        assert not jobs.healthy()
        postgres_server.start()
        took = wait_until("the store works again", lambda: jobs.get(kept.job_id) is not None)
        assert took < 10 and jobs.healthy()
        assert jobs.claim("gw-a", NOW, LEASE, 5, FIFO).record.job_id == kept.job_id
        handle, _ = results.open(kept.job_id)
        with handle:
            assert handle.read() == b"video"
        # the listener came back: it asks the gateway to look again, then hears new notices
        kinds = set()
        wait_until("the listener's catch-up notices", lambda: kinds.add(heard.get(timeout=10).kind) or
                   {"work", "queue"} <= kinds)
        wait_until("a notice after the restart", lambda: other.notify(Notice("cancel", kept.job_id, origin="o")) or
                   _drain_for(heard, "cancel", 0.3))
        # a plain restart (stop, start at once): calls fail or succeed, and soon succeed again
        postgres_server.restart()
        wait_until("the store works after restart()", lambda: jobs.count(RUNNING) == 1)
        wait_until("a notice after restart()", lambda: other.notify(Notice("finished", kept.job_id, origin="o")) or
                   _drain_for(heard, "finished", 0.3))
    finally:
        jobs.close()
        other.close()


def _drain_for(heard: queue_module.Queue[Notice], kind: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if heard.get(timeout=max(0.01, deadline - time.monotonic())).kind == kind:
                return True
        except queue_module.Empty:
            return False
    return False
