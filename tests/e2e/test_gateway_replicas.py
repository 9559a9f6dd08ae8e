"""Several gateways on one PostgreSQL job store, with real processes, real signals and a real database.

The three stages run once for the module (``t2v serve text_encoder|denoiser|decoder``, CPU, float32, the
embedded model), one PostgreSQL database on the session's throwaway cluster (``tests/postgres.py``), and
three gateways a, b, c on it (``t2v serve gateway --job-store postgresql://...``, each with its own gRPC,
HTTP and metrics ports; ``--slots`` is the global cap on running jobs). Every process logs to a file of its
own (the folder is printed at the end of the module); a failure prints the tails of the logs that matter.

- 200 jobs submitted over all three replicas, priorities mixed, while one gateway is SIGKILLed (holding
  running jobs) and another is restarted with SIGTERM: every job completes exactly once, with one video
  that every replica serves; no priority inversion; the dead gateway's jobs are taken over and resumed
  from their checkpoints; its clients follow their jobs by id on another replica.
- A cancel on one replica stops the job where another replica runs it, at the denoiser's next step.
- A Generate stream on one replica gets, live and in order, the progress of its job run by another.
- The database restarted under load (and, once, down for longer than a lease): no job lost, none stuck,
  and the gateways report NOT_SERVING / 503 while it is down.
- Two gateways on one SQLite state dir: the second is refused with a one-line error.

Sizes: tiny jobs (2 frames of 32x32, 6 denoising steps) and 2 s leases, so the module takes ~2 minutes on
a 2-core machine. Run: HF_HUB_OFFLINE=1 .venv/bin/pytest -s tests/e2e/test_gateway_replicas.py (-s prints
the figures).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc
import pytest

from services.gateway.domain import Priority
from services.gateway.queue import QueuePolicy
from tests.replicas import (GATEWAY_SERVICE, LEVEL, NOT_SERVING, PRIORITY, SERVING, S, Cluster, Follow, Gateway,
                            HarnessError, Shape, wait_until)

pytestmark = pytest.mark.slow

SLOTS = 8                  # the global cap on running jobs (every gateway's --slots); the denoiser batches 8
LEASE_SECONDS = 2.0
CHECKPOINT_EVERY = 2
AGING_SECONDS = 3600.0     # no job waits an hour here: effective priority = declared priority
GRACE_SECONDS = 5.0
SHAPE = Shape(frames=2, size=32, steps=6, guidance=1.0)   # no CFG: one UNet row a job, twice the jobs a second
JOBS = 200
FOLLOW_STEPS = 40          # the Generate jobs of the gateway that is killed: still running when it dies
GATEWAY_ARGS = [f"--slots={SLOTS}", f"--lease-seconds={LEASE_SECONDS}", f"--checkpoint-every={CHECKPOINT_EVERY}",
                f"--aging-seconds={AGING_SECONDS}", f"--grace-seconds={GRACE_SECONDS}", "--max-queue=1000"]
# Times stamped by different gateways (started_unix_ms is the claimer's clock read just before its claim
# transaction, which then may wait for the claim lock of another gateway): two starts closer than this
# cannot be ordered from the rows.
CLOCK_NOISE_MS = 250
FIGURES: dict[str, object] = {}


def now_ms() -> int:
    return int(time.time() * 1000)


# --- the module's mesh ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(postgres_server, tmp_path_factory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("replicas")
    name = f"replicas_{os.getpid()}"
    dsn = postgres_server.create_database(name)
    mesh = Cluster(logs, dsn, denoiser_batch=SLOTS, gateway_args=GATEWAY_ARGS)
    mesh.sql = lambda sql, params=None: postgres_server.psql(sql, params, database=name)
    try:
        mesh.start_stages()
        for gateway in "abc":
            mesh.add_gateway(gateway)
        for gateway in mesh.gateways.values():
            gateway.wait_ready()
        yield mesh
    finally:
        mesh.close()
        print(f"\nreplica figures: {json.dumps(FIGURES, indent=1, default=str)}\nlogs: {logs}")
        with contextlib.suppress(Exception):
            if not postgres_server.running:
                postgres_server.start()
            postgres_server.drop_database(name)


@pytest.fixture
def replicas(cluster: Cluster) -> list[Gateway]:
    """a, b and c, each running and ready, with nothing queued or running in the store and the denoiser idle."""
    gateways = [cluster.gateways[name] for name in "abc"]
    for gateway in gateways:
        if not gateway.alive:
            gateway.start()
    for gateway in gateways:
        gateway.wait_ready()
    wait_until(lambda: not active_jobs(gateways[-1]), 60, "the store to hold no queued or running job",
               logs=cluster.tails)
    wait_until(lambda: cluster.denoiser_active() == 0, 30, "the denoiser to hold no request", logs=cluster.tails)
    return gateways


def runs_of(cluster: Cluster, job_ids: Iterable[str]) -> dict[str, int]:
    """How many times each job was claimed: the ``runs`` column of its row (the API does not show it)."""
    ids = list(job_ids)
    return {job_id: int(runs) for job_id, runs in cluster.sql("SELECT job_id, runs FROM jobs WHERE job_id = ANY(%s)",
                                                              (ids,))}


def active_jobs(gateway: Gateway) -> list[S.Job]:
    return [j for status in (S.JOB_STATUS_QUEUED, S.JOB_STATUS_RUNNING) for j in gateway.list_all(status)]


@contextlib.contextmanager
def explained(cluster: Cluster, *names: str) -> Iterator[None]:
    """On any failure inside, print the tails of the logs (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        print(cluster.tails(names or None, lines=40))
        print(f"logs: {cluster.log_dir}")
        raise


# --- what the logs say ----------------------------------------------------------------------------------------
def log_events(cluster: Cluster, event: str) -> list[dict[str, str]]:
    """Every ``event=NAME`` line of every gateway log (each start of each gateway), as key=value dicts."""
    found = []
    for line in cluster.gateway_logs().splitlines():
        if f"event={event} " in line:
            found.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)))
    return found


def running_on(gateway: Gateway) -> set[str]:
    """Jobs this start of ``gateway`` started and has not finished or handed back (from its own log)."""
    text = gateway.log()
    started = set(re.findall(r"event=job_started job_id=(\w+)", text))
    ended = set(re.findall(r"event=(?:job_finished|job_released|lease_lost) job_id=(\w+)", text))
    return started - ended


# --- the order check --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    job_id: str
    level: int            # declared priority, 0 low .. 2 high
    created_ms: int       # the gateway's stamp at submission
    ack_ms: int           # the client's clock when SubmitJob answered: the row was committed before this
    started_ms: int       # the claimer's clock at the first claim


def inversions(rows: list[Row], policy: QueuePolicy, noise_ms: int = CLOCK_NOISE_MS
               ) -> tuple[int, list[tuple[Row, Row]]]:
    """Pairs of jobs that waited together, and those among them started out of priority order.

    Two jobs A and B *waited together* when both were surely queued at the moment the first of them
    started: each was acknowledged to its client (so committed, so visible to every gateway's claim)
    before the other started. Because started_ms is read by the claiming gateway just before its claim
    transaction, and claims of different gateways queue behind one lock, two starts less than
    ``noise_ms`` apart cannot be ordered; such pairs are not counted. An *inversion* is a pair that waited
    together where B started before A (by more than the noise) although A's effective priority was higher
    than B's at the moment B started: the policy's aging rule (``queue.QueuePolicy.effective``) applied to
    the time each had waited since its created_ms. With --aging-seconds 3600 effective = declared.

    Jobs taken over after a gateway died keep their first start (a store stamps started_ms once), so a
    takeover does not count as a start."""
    pairs, bad = 0, []
    for a, b in itertools.permutations(rows, 2):
        if not (a.started_ms and b.started_ms) or b.started_ms + noise_ms >= a.started_ms:
            continue                                     # B did not surely start first
        if not (a.ack_ms < b.started_ms and b.ack_ms < b.started_ms):
            continue                                     # A was not surely queued when B started
        pairs += 1
        at = b.started_ms
        a_level = policy.effective(Priority(a.level), at - a.created_ms)
        if a_level > policy.effective(Priority(b.level), at - b.created_ms):
            bad.append((a, b))
    return pairs, bad


def max_running(jobs: list[S.Job], noise_ms: int = CLOCK_NOISE_MS) -> int:
    """The most jobs that ran at once (of those that ran once), each interval shrunk by the clock noise at
    both ends: a lower bound of the true peak, so over the cap means the cap was broken."""
    edges = []
    for job in jobs:
        start, end = job.started_unix_ms + noise_ms, job.finished_unix_ms - noise_ms
        if start < end:
            edges += [(start, 1), (end, -1)]
    peak = current = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        current += delta
        peak = max(peak, current)
    return peak


# --- 1. 200 jobs, a SIGKILL and a restart ----------------------------------------------------------------------
@dataclass
class Submitted:
    job_id: str
    priority: str
    gateway: str
    ack_ms: int
    steps: int


class Submitters:
    """Threads that submit ``plan`` round-robin over the gateways; a gateway that fails (dead, draining) is
    skipped for the next one, as a client with several addresses does. Each thread submits ``burst`` jobs
    back to back, then waits ``pace`` seconds a job: a burst larger than the slots queues jobs however fast
    the machine runs them (at a steady pace a fast machine kept up, and too few jobs waited together)."""

    def __init__(self, gateways: list[Gateway], plan: list[str], threads: int = 4, pace: float = 0.0,
                 burst: int = 1) -> None:
        if burst < 1:
            raise ValueError(f"burst {burst}: at least one job a burst")
        self.gateways, self.plan, self.pace, self.burst = gateways, plan, pace, burst
        self.accepted: dict[str, Submitted] = {}
        self.failed_attempts = Counter[str]()     # code -> count: a call that failed may still have stored a job
        self.unexpected: list[str] = []           # failures other than UNAVAILABLE, with their details
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._next = iter(enumerate(plan))
        self._threads = [threading.Thread(target=self._run, name=f"submit-{i}", daemon=True) for i in range(threads)]

    def start(self) -> "Submitters":
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise HarnessError(f"the submitters did not finish in {timeout:g} s ({len(self.accepted)} accepted)")

    def _run(self) -> None:
        for submitted in itertools.count(1):
            with self._lock:
                item = next(self._next, None)
            if item is None:
                return
            index, priority = item
            for attempt in range(200):
                gateway = self.gateways[(index + attempt) % len(self.gateways)]
                try:
                    job = gateway.submit(SHAPE.params(f"replica job {index}"), priority, timeout=10)
                except grpc.RpcError as error:
                    with self._lock:
                        self.failed_attempts[error.code().name] += 1
                        if error.code() != grpc.StatusCode.UNAVAILABLE:
                            self.unexpected.append(f"SubmitJob on {gateway.name}: {error.code().name}: {error.details()}")
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self.accepted[job.job_id] = Submitted(job.job_id, priority, gateway.name, now_ms(), SHAPE.steps)
                break
            else:
                with self._lock:
                    self.errors.append(f"job {index} was refused 200 times")
            if submitted % self.burst == 0:
                time.sleep(self.pace * self.burst)


def test_200_jobs_survive_a_sigkilled_and_a_restarted_gateway(cluster: Cluster, replicas: list[Gateway]) -> None:
    a, b, c = replicas
    with explained(cluster):
        _run_the_200(cluster, a, b, c)


def _run_the_200(cluster: Cluster, a: Gateway, b: Gateway, c: Gateway) -> None:
    started = time.monotonic()
    phases: dict[str, float] = {}
    since_ms = now_ms() - 1
    steps_before = cluster.steps_done()
    plan = [("high", "normal", "low")[i % 3] for i in range(JOBS)]
    random.Random(7).shuffle(plan)
    finished_before = len(log_events(cluster, "job_finished"))
    # ~8 jobs/s for ~25 s in bursts of 12 a thread (more than the 8 slots): the queue backs up on any machine, and
    # submissions go on through the SIGKILL and the restart (a client whose gateway fails tries the next)
    submitters = Submitters([a, b, c], plan, threads=4, pace=0.45, burst=12).start()

    # a's clients: Generate streams opened on a, longer jobs, in flight when a dies.
    wait_until(lambda: len(log_events(cluster, "job_finished")) - finished_before >= 30, 90,
               "30 jobs to complete", logs=cluster.tails, interval=0.2)
    follows = [Follow(a, S.GenerateRequest(params=SHAPE.params(f"a's client {i}", steps=FOLLOW_STEPS),
                                           priority=PRIORITY["high"]), timeout=120) for i in range(3)]
    wait_until(lambda: all(f.job_id for f in follows), 30, "the Generate streams on a to name their jobs",
               logs=lambda: a.tail())

    # SIGKILL a while it runs a job that has a checkpoint (past step CHECKPOINT_EVERY) and is not done.
    def mid_job() -> str | None:
        for job_id in running_on(a):
            try:
                job = a.get(job_id, timeout=2)
            except grpc.RpcError:
                continue
            if job.stage == S.STAGE_DENOISER and CHECKPOINT_EVERY < job.progress.step < job.progress.total_steps:
                return job_id
        return None
    mid = wait_until(mid_job, 60, "gateway a to run a job past its first checkpoint", logs=lambda: a.tail(),
                     interval=0.02)
    held = running_on(a)
    phases["sigkill"] = time.monotonic() - started
    killed_ms = now_ms()
    a.kill()
    FIGURES["replica_a_jobs_at_sigkill"] = len(held)

    # a's clients: their streams break; each follows its job by id on c (GetJob, SSE) and gets its video there.
    for follow in follows:
        assert follow.done.wait(30), "a Generate stream on the killed gateway did not end"
    broken = [f for f in follows if f.error is not None]
    assert broken, "every Generate stream on a ended before a was killed: nothing followed a job elsewhere"
    assert all(f.error.code() == grpc.StatusCode.UNAVAILABLE for f in broken), [f.error for f in broken]
    sse: dict[str, list] = {}
    followers = [threading.Thread(target=lambda f=f: sse.__setitem__(f.job_id, c.sse_events(f.job_id, 120)),
                                  daemon=True) for f in broken]
    for thread in followers:
        thread.start()

    # the takeover: a's jobs run again elsewhere once their leases ran out
    def taken_over() -> bool:
        rows = cluster.sql("SELECT job_id, runs, status FROM jobs WHERE job_id = ANY(%s)", (list(held),))
        return all(runs >= 2 or status != "running" for _, runs, status in rows)
    wait_until(taken_over, 30, "the killed gateway's jobs to be taken over", logs=cluster.tails)
    phases["takeover_done"] = time.monotonic() - started

    # restart b: SIGTERM (it drains), wait for the exit, start it again
    code = b.terminate(timeout=GRACE_SECONDS + 30)
    assert code == 0, f"gateway b exited with {code} after SIGTERM\n{b.tail()}"
    b.start().wait_ready()
    phases["b_restarted"] = time.monotonic() - started

    submitters.join(120)
    assert submitters.errors == []
    accepted = submitters.accepted
    for follow in follows:
        accepted[follow.job_id] = Submitted(follow.job_id, "high", "a", int(follow.events[0][0] * 1000), FOLLOW_STEPS)
    wait_until(lambda: not [j for j in active_jobs(c) if j.created_unix_ms >= since_ms], 120,
               "every job to end", logs=cluster.tails)
    phases["all_ended"] = time.monotonic() - started
    for thread in followers:
        thread.join(60)
    a.start().wait_ready()                    # back, to show that it serves the videos too
    seconds = time.monotonic() - started

    # every accepted job ended COMPLETED; the store holds no other job but ones whose SubmitJob failed
    listed = {j.job_id: j for j in c.list_all() if j.created_unix_ms >= since_ms}
    missing = set(accepted) - set(listed)
    assert not missing, f"{len(missing)} accepted jobs are not in ListJobs, e.g. {sorted(missing)[:3]}"
    orphans = set(listed) - set(accepted)
    assert len(orphans) <= sum(submitters.failed_attempts.values()), (orphans, submitters.failed_attempts)
    statuses = Counter(S.JobStatus.Name(j.status) for j in listed.values())
    assert statuses == {"JOB_STATUS_COMPLETED": len(listed)}, statuses
    jobs = {job_id: c.get(job_id) for job_id in listed}
    runs = runs_of(cluster, listed)
    assert all(j.status == S.JOB_STATUS_COMPLETED and j.video_size > 0 for j in jobs.values())

    # exactly once: one job_finished line per job (whoever wrote the end), status completed
    finished = Counter((e["job_id"], e["status"]) for e in log_events(cluster, "job_finished") if e["job_id"] in listed)
    assert {k: n for k, n in finished.items() if n != 1 or k[1] != "completed"} == {}
    assert len(finished) == len(listed)

    # runs: how many times each job was claimed, as the logs of every gateway say (a job_started per claim);
    # SIGKILL may strike between a claim's commit and its log line once
    starts = Counter(e["job_id"] for e in log_events(cluster, "job_started") if e["job_id"] in listed)
    off = {job_id: (n, starts[job_id]) for job_id, n in runs.items() if n != starts[job_id]}
    assert len(off) <= 1 and all(runs == logged + 1 for runs, logged in off.values()), off
    # a's jobs ran again elsewhere (but one that a finished in the instant of the kill: its end written, not logged)
    twice = {job_id for job_id, n in runs.items() if n >= 2}
    left = {j for j in held if not (runs[j] == 1 and jobs[j].finished_unix_ms <= killed_ms)}
    assert mid in left and left <= twice, f"jobs a ran when it died and that did not run again: {left - twice}"
    # resumed, not restarted: the job a ran past its checkpoint went on from there
    resumed = [e for e in log_events(cluster, "job_started") if e["job_id"] in held and e.get("taken_over") == "True"]
    mid_resumed = [int(e["resumed_from_step"]) for e in resumed if e["job_id"] == mid]
    assert mid_resumed and mid_resumed[0] >= CHECKPOINT_EVERY, (mid, resumed)
    asked = sum(s.steps for job_id, s in accepted.items()) + sum(SHAPE.steps for _ in orphans)
    steps = cluster.steps_done() - steps_before
    assert steps < 2 * asked, f"the denoiser ran {steps} steps for {asked} asked"

    # every replica serves each video, the same bytes
    for job_id, job in jobs.items():
        videos = {g.name: g.video(job_id) for g in (a, b, c)}
        assert {len(v) for v in videos.values()} == {job.video_size}, (job_id, {k: len(v) for k, v in videos.items()})
        assert len(set(videos.values())) == 1

    # a's clients followed their jobs on c
    for follow in broken:
        events = sse.get(follow.job_id)
        assert events and events[-1][0] == "completed", (follow.job_id, events[-3:] if events else events)

    # priority order among jobs that waited together
    policy = QueuePolicy(AGING_SECONDS)
    rows = [Row(job_id, LEVEL[jobs[job_id].priority], jobs[job_id].created_unix_ms, s.ack_ms,
                jobs[job_id].started_unix_ms) for job_id, s in accepted.items()]
    pairs, bad = inversions(rows, policy)
    FIGURES["s1_inversions_if_no_clock_noise_allowed"] = {ms: len(inversions(rows, policy, ms)[1]) for ms in (0, 50)}
    assert pairs >= 1000, f"only {pairs} pairs of jobs waited together: the queue never backed up"
    assert bad == [], f"{len(bad)} priority inversions, e.g. {bad[:3]}"
    once = [j for job_id, j in jobs.items() if runs[job_id] == 1]
    peak = max_running(once)
    assert peak <= SLOTS, f"{peak} jobs ran at once on a cap of {SLOTS}"
    FIGURES.update({
        "s1_seconds": round(seconds, 1), "s1_phases_s": {k: round(v, 1) for k, v in phases.items()},
        "s1_jobs": len(listed), "s1_orphans": len(orphans),
        "s1_failed_submit_attempts": dict(submitters.failed_attempts), "s1_taken_over": sorted(held),
        "s1_submitted_after_the_sigkill": sum(1 for s in accepted.values() if s.ack_ms > killed_ms),
        "s1_resumed_from_steps": [int(e["resumed_from_step"]) for e in resumed],
        "s1_steps_asked": asked, "s1_steps_run": steps, "s1_steps_redone": steps - asked,
        "s1_pairs_waited_together": pairs, "s1_inversions": len(bad), "s1_peak_running_lower_bound": peak,
    })


# --- 2. cancel anywhere ----------------------------------------------------------------------------------------
LONG_STEPS = 200


def runner_of(gateways: list[Gateway], job_id: str, timeout: float = 30.0) -> Gateway:
    """The gateway that claimed the job (its log says job_started)."""
    return wait_until(lambda: next((g for g in gateways if g.ran(job_id)), None), timeout,
                      f"a gateway to start job {job_id}", logs=lambda: "\n".join(g.tail() for g in gateways))


def test_a_cancel_on_one_replica_stops_the_job_where_another_runs_it(cluster: Cluster, replicas: list[Gateway]) -> None:
    with explained(cluster):
        steps_at_submit = cluster.steps_done()
        job_id = replicas[0].submit(SHAPE.params("a long job to cancel", steps=LONG_STEPS)).job_id
        runner = runner_of(replicas, job_id)
        other = next(g for g in replicas if g is not runner)
        wait_until(lambda: runner.get(job_id).progress.step >= 10, 60, "the long job to run 10 steps",
                   logs=lambda: runner.tail())
        cancelled_before = cluster.denoiser.metric('t2v_denoiser_requests_total{outcome="cancelled"}')
        asked_at = time.monotonic()
        answer = other.cancel(job_id)
        assert answer.status == S.JOB_STATUS_CANCELLED, S.JobStatus.Name(answer.status)
        seen = runner.get(job_id)
        assert seen.status == S.JOB_STATUS_CANCELLED, f"GetJob on the runner says {S.JobStatus.Name(seen.status)}"
        wait_until(lambda: cluster.denoiser_active() == 0, 5, "the denoiser to drop the cancelled request",
                   logs=lambda: cluster.tails([runner.name, "denoiser"]), interval=0.02)
        dropped_s = time.monotonic() - asked_at
        steps = cluster.steps_done()
        time.sleep(1.0)
        assert cluster.steps_done() == steps, "the denoiser still runs steps after the cancel"
        assert cluster.denoiser.metric('t2v_denoiser_requests_total{outcome="cancelled"}') == cancelled_before + 1
        assert dropped_s <= 1.5, f"the denoiser dropped the request {dropped_s:.2f} s after the cancel"
        final = runner.get(job_id)
        assert final.status == S.JOB_STATUS_CANCELLED and final.progress.step < LONG_STEPS
        assert f"event=job_finished job_id={job_id} status=cancelled" in other.log()
        FIGURES["s2_cancel_to_denoiser_drop_s"] = round(dropped_s, 3)
        FIGURES["s2_steps_run_before_drop"] = int(steps - steps_at_submit)


# --- 3. progress across replicas -------------------------------------------------------------------------------
def test_a_generate_stream_sees_the_progress_of_its_job_run_by_another_replica(
        cluster: Cluster, replicas: list[Gateway]) -> None:
    """The Generate call goes to a front-door gateway d started with --slots 1: --slots is the cap each
    claimer applies to the whole store, so while one job runs anywhere d claims nothing, and its own job is
    claimed by a, b or c (a homogeneous set of gateways would run it on d itself: the submitter offers a
    new job to its own free slots first)."""
    with explained(cluster):
        front = cluster.gateways.get("d") or cluster.add_gateway("d", "--slots=1")
        if not front.alive:
            front.start()
        front.wait_ready()
        blocker = replicas[0].submit(SHAPE.params("a job that keeps one slot busy", steps=LONG_STEPS)).job_id
        replicas[0].wait_status(blocker, [S.JOB_STATUS_RUNNING], 30)
        try:
            steps = 30
            follow = Follow(front, S.GenerateRequest(params=SHAPE.params("watched from d", steps=steps)), timeout=120)
            assert follow.done.wait(120), f"the Generate stream on d did not end\n{front.tail()}"
            assert follow.error is None, f"{follow.error.code().name}: {follow.error.details()}"
        finally:
            replicas[0].cancel(blocker)
        runner = runner_of(replicas + [front], follow.job_id)
        assert runner is not front, "d ran the job itself"
        progress = follow.steps()
        assert len(progress) >= 2 and progress == sorted(set(progress)) and progress[-1] == steps, progress
        stages = [e.stage.stage for _, e in follow.events if e.HasField("stage")]
        order = [s for s in (S.STAGE_TEXT_ENCODER, S.STAGE_DENOISER, S.STAGE_DECODER) if s in stages]
        assert stages == sorted(stages) and S.STAGE_DENOISER in order, stages
        kinds = follow.kinds()
        assert kinds[-1] == "result" and kinds.index("progress") < kinds.index("result"), kinds
        result = follow.result()
        job = runner.get(follow.job_id)
        assert result is not None and len(result.video) == job.video_size > 0
        first_progress = next(t for t, e in follow.events if e.HasField("progress"))
        assert first_progress * 1000 < job.finished_unix_ms - 200, "the progress came only at the end, not live"
        code = front.terminate(30)
        assert code == 0, front.tail()
        FIGURES["s3_progress_events_on_d"] = progress
        FIGURES["s3_run_by"] = runner.name


# --- 4. the database restarted under load -----------------------------------------------------------------------
def in_parallel(calls: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run each call on a thread of its own; their results (or the exception each raised) by name."""
    results: dict[str, object] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        try:
            results[name] = call()
        except Exception as error:  # noqa: BLE001 - reported to the caller
            results[name] = error
    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_no_job_is_lost_or_stuck_when_the_database_restarts_under_load(
        cluster: Cluster, replicas: list[Gateway], postgres_server) -> None:
    """Two outages under load: ``restart()`` (pg_ctl restart: a fast shutdown, then a start; ~0.5 s), then a
    stop long enough for leases to run out (held while the gateways are asked how they are). A running job
    may then run twice (its lease ran out; the job store decides who writes its end), but each ends
    COMPLETED exactly once; a SubmitJob meanwhile is refused UNAVAILABLE, never anything else (a refusal
    of another kind would tell a client that a job stored anyway had failed)."""
    since_ms = now_ms() - 1
    plan = [("high", "normal", "low")[i % 3] for i in range(60)]
    crashes_before = len(log_events(cluster, "job_crashed")) + len(log_events(cluster, "dispatch_failed"))
    submitters = Submitters(replicas, plan, threads=3, pace=0.15).start()
    try:
        with explained(cluster):
            wait_until(lambda: len(submitters.accepted) >= 15, 60, "15 jobs to be accepted", logs=cluster.tails)
            restart_at = time.monotonic()
            postgres_server.restart()                           # pg_ctl restart: fast shutdown, start
            FIGURES["s4_restart_s"] = round(time.monotonic() - restart_at, 2)
            wait_until(lambda: len(submitters.accepted) >= 30, 60, "jobs to be accepted after the restart",
                       logs=cluster.tails)
            wait_until(lambda: replicas[2].list_all(S.JOB_STATUS_RUNNING), 30, "a job to run", logs=cluster.tails)
            # once more, down for longer than a lease, while jobs run: the gateways say so, and refuse new work
            postgres_server.stop()
            down_at = time.monotonic()
            wait_until(lambda: all(g.health(GATEWAY_SERVICE, timeout=3) == NOT_SERVING for g in replicas), 15,
                       "every gateway to report NOT_SERVING while the database is down", logs=cluster.tails)
            FIGURES["s4_not_serving_after_s"] = round(time.monotonic() - down_at, 2)
            answers = in_parallel({**{f"healthz {g.name}": (lambda g=g: g.healthz(timeout=10)) for g in replicas},
                                   **{f"live {g.name}": (lambda g=g: g.health("", timeout=3)) for g in replicas},
                                   "submit": lambda: replicas[0].submit(SHAPE.params("while it is down"), timeout=10)})
            problems = []           # breaches of the contract, all reported at the end
            refused = answers.pop("submit")
            if not (isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAVAILABLE
                    and "job store" in (refused.details() or "")):
                problems.append(f"SubmitJob while the database is down (10 s deadline) answered "
                                f"{getattr(refused, 'code', lambda: refused)()}: "
                                f"{getattr(refused, 'details', lambda: '')()}; expected UNAVAILABLE naming the job store")
            expected = {**{f"healthz {g.name}": 503 for g in replicas}, **{f"live {g.name}": SERVING for g in replicas}}
            if answers != expected:           # not ready (503), but alive: no restart wanted
                problems.append(f"while the database is down: {answers}, expected {expected}")
            time.sleep(max(0.0, LEASE_SECONDS + 1 - (time.monotonic() - down_at)))
            FIGURES["s4_down_s"] = round(time.monotonic() - down_at, 2)
            postgres_server.start()
            up_at = time.monotonic()
            for gateway in replicas:
                gateway.wait_ready(30)
            FIGURES["s4_ready_after_db_start_s"] = round(time.monotonic() - up_at, 2)
            submitters.join(120)
            assert submitters.errors == []
            wait_until(lambda: not [j for j in active_jobs(replicas[2]) if j.created_unix_ms >= since_ms], 120,
                       "every job to end after the database restarts", logs=cluster.tails)
            listed = {j.job_id: j for j in replicas[2].list_all() if j.created_unix_ms >= since_ms}
            assert set(submitters.accepted) <= set(listed), set(submitters.accepted) - set(listed)
            statuses = Counter(S.JobStatus.Name(j.status) for j in listed.values())
            assert statuses == {"JOB_STATUS_COMPLETED": len(listed)}, statuses
            runs = runs_of(cluster, listed)
            FIGURES.update({"s4_jobs": len(listed), "s4_runs_over_1": sum(1 for n in runs.values() if n > 1),
                            "s4_failed_submit_attempts": dict(submitters.failed_attempts)})
            # the rest of the contract, every breach listed at once
            finished = Counter(e["job_id"] for e in log_events(cluster, "job_finished") if e["job_id"] in listed)
            if set(finished.values()) != {1} or len(finished) != len(listed):
                problems.append(f"jobs not ended exactly once: {[j for j in listed if finished[j] != 1]}")
            for job_id, job in listed.items():
                try:
                    size = len(replicas[1].video(job_id))
                except grpc.RpcError as error:
                    problems.append(f"job {job_id} is COMPLETED (runs={runs[job_id]}) but GetVideo says "
                                    f"{error.code().name}: {error.details()}")
                    continue
                if size != job.video_size or size == 0:
                    problems.append(f"job {job_id}: GetVideo gave {size} bytes, GetJob says {job.video_size}")
            # an outage of the store is UNAVAILABLE to a client, and a job's end waits for the store
            problems += submitters.unexpected
            crashes = [e["job_id"] for e in log_events(cluster, "job_crashed") + log_events(cluster, "dispatch_failed")]
            if len(crashes) > crashes_before:
                problems.append(f"{len(crashes) - crashes_before} job_crashed / dispatch_failed lines: a run that "
                                "ended while the store was down crashed instead of waiting for it (the job then ran "
                                "again elsewhere)")
            assert problems == [], "\n".join(problems)
    finally:
        if not postgres_server.running:
            postgres_server.start()


# --- the embedded store is one gateway's ----------------------------------------------------------------------
def test_a_second_gateway_on_the_same_sqlite_state_dir_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = cluster.add_gateway("sqlite-1", f"--state-dir={state}", job_store="")
    with explained(cluster, "sqlite-1", "sqlite-2"):
        first.wait_ready()
        second = cluster.add_gateway("sqlite-2", f"--state-dir={state}", job_store="")
        assert second.proc is not None
        code = second.proc.wait(timeout=60)
        assert code != 0
        lines = [line for line in second.log().splitlines() if line.strip()]
        assert "Traceback" not in second.log(), second.log()
        last = lines[-1]        # what the process says last, on one line: the reason and what to do
        assert last.startswith(f"gateway: the job database {state / 'jobs.sqlite3'} is in use by another gateway"), \
            lines[-3:]
        assert "--state-dir" in last and "--job-store postgresql://" in last, last
        assert first.health() == SERVING
        assert first.terminate(30) == 0
