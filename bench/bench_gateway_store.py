"""The gateway's job stores, measured: takeover after a SIGKILL, steps redone, call throughput, bytes per job.

Runs the three stages once (``t2v serve ...``, CPU, float32, the embedded model), a throwaway PostgreSQL
cluster (``tests/postgres.PostgresServer``: initdb + postgres on a loopback port, one database per part)
and gateways as real processes (``tests/replicas.Cluster``), then measures:

1. **Takeover time** (``--trials`` trials, 2 gateways on PostgreSQL, ``--lease-seconds``): a job of
   ``--takeover-steps`` steps runs on one gateway; at a random step past its first checkpoint that gateway
   is SIGKILLed. Measured from the kill: until the job is RUNNING again on the other gateway (its row's
   ``runs`` goes to 2: the claim), and until its next denoising step there (GetJob on the survivor shows a
   step past the checkpoint it resumed from). The killed gateway is started again after each trial.
2. **Steps redone per takeover** (same trials, ``--checkpoint-every``): the denoiser's step counter
   (``t2v_denoiser_steps_total``) over the trial minus the steps asked. It counts the steps done after the
   last checkpoint before the kill, plus any the denoiser ran for the dead gateway's call before it noticed.
3. **SubmitJob and GetJob throughput** on 1 and 3 gateways on PostgreSQL and on the SQLite single
   gateway: ``--clients`` threads (each with its own channel, spread round-robin over the gateways) call
   for ``--seconds`` seconds; calls/s and p50/p99 latency. The gateways run ``--slots 1`` while one long
   job holds that slot, so no submitted job runs (the stages stay idle, the store is what is measured);
   each submitted job is cancelled by its client right after (untimed, so the queue stays ~``--clients``
   deep; the cancel's own latency is reported too). GetJob reads those cancelled jobs, at random.
4. **Store bytes per completed job**: ``--size-jobs`` jobs of ``--size-frames`` frames of
   ``--size-px``x``--size-px``, ``--size-steps`` steps, run to completion on one gateway of each store.
   PostgreSQL: ``pg_total_relation_size`` of ``jobs`` and ``videos`` (indexes and TOAST included) after
   minus before, per job, as written (dead row versions of the job's updates included: progress, leases,
   checkpoints) and after ``VACUUM FULL`` (live rows only). SQLite: ``jobs.sqlite3`` plus its ``-wal``,
   and the ``results/`` folder. Beside it, the mean MP4 size.

Prints a JSON document and markdown tables; ``--out DIR`` also writes results.json and results.md there.

    python bench/bench_gateway_store.py                   # the full run: ~5 minutes on 2 CPU cores
    python bench/bench_gateway_store.py --quick           # smoke run of every part: ~1 minute
    python bench/bench_gateway_store.py --lease-seconds 2 --trials 10 --out /tmp/bench-store

Flags: --lease-seconds S (5) --checkpoint-every N (10) --trials T (5) --takeover-steps K (60)
--clients C (8) --seconds D (5) --size-jobs J (30) --size-frames F (8) --size-px P (64) --size-steps K (4)
--seed X (0) --out DIR --keep-logs DIR --quick. Every gateway, stage and database is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402

from tests.postgres import PostgresServer  # noqa: E402
from tests.replicas import S, Cluster, Gateway, Shape, percentile, wait_until  # noqa: E402
from t2v.v1 import gateway_pb2_grpc  # noqa: E402


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
            "python": platform.python_version()}


def stats(values: list[float], digits: int = 3) -> dict[str, float]:
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), digits), "min": round(min(values), digits),
            "median": round(statistics.median(values), digits), "max": round(max(values), digits)}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.pg = PostgresServer()
        self.cluster: Cluster | None = None
        self.sql = None

    # --- the mesh ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        log("starting PostgreSQL and the stages")
        self.pg.start()
        self.cluster = Cluster(self.work / "logs", "", denoiser_batch=8)
        self.cluster.start_stages()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        self.pg.close()

    def database(self, name: str) -> str:
        return self.pg.create_database(name)

    def gateway(self, name: str, job_store: str, *args: str) -> Gateway:
        assert self.cluster is not None
        return self.cluster.add_gateway(name, *args, job_store=job_store)

    def query(self, database: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.pg.psql(sql, params, database=database)

    # --- 1 and 2: takeover -----------------------------------------------------------------------------------
    def takeover(self) -> dict[str, Any]:
        args, cluster = self.args, self.cluster
        assert cluster is not None
        db = "takeover"
        dsn = self.database(db)
        common = [f"--lease-seconds={args.lease_seconds}", f"--checkpoint-every={args.checkpoint_every}",
                  "--slots=4", "--aging-seconds=0"]
        gateways = [self.gateway(name, dsn, *common) for name in ("t1", "t2")]
        for gateway in gateways:
            gateway.wait_ready()
        shape = Shape(frames=2, size=32, steps=args.takeover_steps, guidance=1.0)
        rng = random.Random(args.seed)
        connection = self.pg.connect(db)
        trials = []
        try:
            for trial in range(args.trials):
                for gateway in gateways:
                    if not gateway.alive:
                        gateway.start()
                for gateway in gateways:
                    gateway.wait_ready()
                wait_until(lambda: cluster.denoiser_active() == 0, 60, "the denoiser to be idle")
                steps_before = cluster.steps_done()
                job_id = gateways[trial % 2].submit(shape.params(f"takeover trial {trial}")).job_id
                runner = wait_until(lambda: next((g for g in gateways if g.ran(job_id)), None), 30,
                                    f"a gateway to start job {job_id}")
                survivor = next(g for g in gateways if g is not runner)
                kill_step = rng.randint(args.checkpoint_every + 1, max(args.checkpoint_every + 1,
                                                                      args.takeover_steps - 5))
                wait_until(lambda: runner.get(job_id).progress.step >= kill_step, 120,
                           f"job {job_id} to reach step {kill_step}", interval=0.005)
                killed = time.monotonic()
                runner.kill()
                row = lambda: connection.execute("SELECT runs, checkpoint_step, status FROM jobs WHERE job_id = %s",
                                                 (job_id,)).fetchone()
                resumed_from = row()[1]
                wait_until(lambda: row()[0] >= 2, args.lease_seconds + 30, f"job {job_id} to be taken over",
                           interval=0.01)
                running_again = time.monotonic() - killed

                def progressed() -> bool:
                    job = survivor.get(job_id)
                    return job.status == S.JOB_STATUS_COMPLETED or (
                        job.stage == S.STAGE_DENOISER and job.progress.step > resumed_from)
                wait_until(progressed, 60, f"job {job_id} to make progress on {survivor.name}", interval=0.01)
                next_progress = time.monotonic() - killed
                survivor.wait_status(job_id, [S.JOB_STATUS_COMPLETED], 120)
                wait_until(lambda: cluster.denoiser_active() == 0, 30, "the denoiser to be idle")
                redone = cluster.steps_done() - steps_before - args.takeover_steps
                trials.append({"killed_at_step": kill_step, "resumed_from_step": resumed_from,
                               "kill_to_running_s": round(running_again, 3),
                               "kill_to_next_progress_s": round(next_progress, 3), "steps_redone": int(redone)})
                log(f"takeover trial {trial}: {trials[-1]}")
        finally:
            connection.close()
            for gateway in gateways:
                gateway.kill()
        return {"lease_seconds": args.lease_seconds, "checkpoint_every": args.checkpoint_every,
                "steps": args.takeover_steps, "trials": trials,
                "kill_to_running_s": stats([t["kill_to_running_s"] for t in trials]),
                "kill_to_next_progress_s": stats([t["kill_to_next_progress_s"] for t in trials]),
                "steps_redone": stats([float(t["steps_redone"]) for t in trials], 1)}

    # --- 3: throughput ----------------------------------------------------------------------------------------
    def throughput(self) -> list[dict[str, Any]]:
        args = self.args
        dsn = self.database("throughput")
        common = ["--slots=1", "--max-queue=1000000", "--max-steps=500"]
        pg = [self.gateway(f"p{i}", dsn, *common) for i in (1, 2, 3)]
        lite = self.gateway("s1", "", *common, f"--state-dir={self.work / 'sqlite-throughput'}")
        for gateway in [*pg, lite]:
            gateway.wait_ready()
        shape = Shape(frames=2, size=32, steps=2, guidance=1.0)
        blockers = []
        for front in (pg[0], lite):       # one long job holds the store's only slot: nothing else runs
            blocker = front.submit(shape.params("the job that holds the slot", steps=500)).job_id
            front.wait_status(blocker, [S.JOB_STATUS_RUNNING], 30)
            blockers.append((front, blocker))
        rows = []
        try:
            for label, gateways in (("PostgreSQL, 1 gateway", pg[:1]), ("PostgreSQL, 3 gateways", pg),
                                    ("SQLite, 1 gateway", [lite])):
                ids, submit, cancel = self._submit_load(gateways, shape, label)
                get = self._get_load(gateways, ids)
                rows.append({"store": label, "clients": args.clients, "seconds": args.seconds,
                             "submit": submit, "cancel": cancel, "get": get})
                log(f"throughput {label}: submit {submit['calls_per_s']}/s, get {get['calls_per_s']}/s")
        finally:
            for front, blocker in blockers:
                try:
                    front.cancel(blocker)
                except grpc.RpcError:
                    pass
            for gateway in [*pg, lite]:
                gateway.kill()
        return rows

    def _clients(self, gateways: list[Gateway], body: Callable[[gateway_pb2_grpc.GatewayStub, int, float], None]
                 ) -> float:
        """Run ``body(stub, index, end)`` on --clients threads, each with its own channel; the seconds taken."""
        threads, channels = [], []
        end = time.monotonic() + self.args.seconds
        for index in range(self.args.clients):
            channel = grpc.insecure_channel(gateways[index % len(gateways)].address)
            grpc.channel_ready_future(channel).result(timeout=10)
            channels.append(channel)
            threads.append(threading.Thread(target=body, args=(gateway_pb2_grpc.GatewayStub(channel), index, end),
                                            daemon=True))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.args.seconds + 120)
        took = time.monotonic() - started
        for channel in channels:
            channel.close()
        return took

    def _submit_load(self, gateways: list[Gateway], shape: Shape, label: str
                     ) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        submit_latency: list[float] = []
        cancel_latency: list[float] = []
        ids: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def body(stub: gateway_pb2_grpc.GatewayStub, index: int, end: float) -> None:
            n = 0
            while time.monotonic() < end:
                n += 1
                request = S.SubmitJobRequest(params=shape.params(f"{label} client {index} call {n}"),
                                             priority=S.PRIORITY_NORMAL)
                try:
                    started = time.perf_counter()
                    job = stub.SubmitJob(request, timeout=30)
                    took = time.perf_counter() - started
                    started = time.perf_counter()
                    stub.CancelJob(S.CancelJobRequest(job_id=job.job_id), timeout=30)
                    cancelled = time.perf_counter() - started
                except grpc.RpcError as error:
                    with lock:
                        errors.append(f"{error.code().name}: {error.details()}")
                    continue
                with lock:
                    submit_latency.append(took)
                    cancel_latency.append(cancelled)
                    ids.append(job.job_id)

        took = self._clients(gateways, body)
        return ids, self._figures(submit_latency, took, errors), self._figures(cancel_latency, took, [])

    def _get_load(self, gateways: list[Gateway], ids: list[str]) -> dict[str, Any]:
        latency: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def body(stub: gateway_pb2_grpc.GatewayStub, index: int, end: float) -> None:
            rng = random.Random(index)
            while time.monotonic() < end:
                try:
                    started = time.perf_counter()
                    stub.GetJob(S.GetJobRequest(job_id=rng.choice(ids)), timeout=30)
                    took = time.perf_counter() - started
                except grpc.RpcError as error:
                    with lock:
                        errors.append(f"{error.code().name}: {error.details()}")
                    continue
                with lock:
                    latency.append(took)

        took = self._clients(gateways, body) if ids else 0.0
        return self._figures(latency, took, errors)

    @staticmethod
    def _figures(latency: list[float], seconds: float, errors: list[str]) -> dict[str, Any]:
        return {"calls": len(latency), "calls_per_s": round(len(latency) / seconds, 1) if seconds else math.nan,
                "p50_ms": round(percentile(latency, 50) * 1000, 2), "p99_ms": round(percentile(latency, 99) * 1000, 2),
                "errors": len(errors), "error_examples": sorted(set(errors))[:3]}

    # --- 4: bytes per job -------------------------------------------------------------------------------------
    def sizes(self) -> list[dict[str, Any]]:
        args = self.args
        shape = Shape(frames=args.size_frames, size=args.size_px, steps=args.size_steps, guidance=9.0)
        common = ["--slots=4", f"--checkpoint-every={args.checkpoint_every}", "--max-queue=100000"]
        rows = []
        db = "sizes"
        dsn = self.database(db)
        tables = ("jobs", "videos")

        def pg_sizes() -> dict[str, int]:
            return {t: int(self.query(db, "SELECT pg_total_relation_size(%s)", (t,))[0][0]) for t in tables}

        gateway = self.gateway("z1", dsn, *common)
        gateway.wait_ready()
        before = pg_sizes()
        videos = self._run_jobs(gateway, shape, args.size_jobs)
        after = pg_sizes()
        gateway.kill()
        self.query(db, "VACUUM FULL jobs")
        self.query(db, "VACUUM FULL videos")
        vacuumed = pg_sizes()
        count = len(videos)
        rows.append({"store": "PostgreSQL", "jobs": count, "mp4_bytes_mean": round(statistics.fmean(videos)),
                     **{f"{t}_bytes_per_job": round((after[t] - before[t]) / count) for t in tables},
                     **{f"{t}_bytes_per_job_after_vacuum_full": round((vacuumed[t] - before[t]) / count)
                        for t in tables},
                     "total_bytes_per_job": round(sum(after[t] - before[t] for t in tables) / count),
                     "total_bytes_per_job_after_vacuum_full": round(sum(vacuumed[t] - before[t] for t in tables)
                                                                    / count)})
        state = self.work / "sqlite-sizes"
        gateway = self.gateway("z2", "", *common, f"--state-dir={state}")
        gateway.wait_ready()

        def lite_sizes() -> dict[str, int]:
            files = {name: (state / name).stat().st_size if (state / name).exists() else 0
                     for name in ("jobs.sqlite3", "jobs.sqlite3-wal")}
            results = sum(p.stat().st_size for p in (state / "results").glob("*") if p.is_file())
            return {"db": files["jobs.sqlite3"], "wal": files["jobs.sqlite3-wal"], "results": results}
        before = lite_sizes()
        videos = self._run_jobs(gateway, shape, args.size_jobs)
        after = lite_sizes()
        gateway.terminate(60)             # the last connection closes: the WAL is checkpointed into the file
        closed = lite_sizes()
        with sqlite3.connect(state / "jobs.sqlite3") as db:
            db.execute("VACUUM")
        vacuumed = lite_sizes()
        count = len(videos)
        rows.append({"store": "SQLite + files", "jobs": count, "mp4_bytes_mean": round(statistics.fmean(videos)),
                     "db_and_wal_bytes_per_job": round((after["db"] + after["wal"] - before["db"] - before["wal"])
                                                       / count),
                     "db_bytes_per_job_after_close": round((closed["db"] - before["db"]) / count),
                     "db_bytes_per_job_after_vacuum": round((vacuumed["db"] - before["db"]) / count),
                     "results_bytes_per_job": round((after["results"] - before["results"]) / count),
                     "total_bytes_per_job": round((after["db"] + after["wal"] + after["results"] - before["db"]
                                                   - before["wal"] - before["results"]) / count),
                     "total_bytes_per_job_after_vacuum": round((vacuumed["db"] + vacuumed["results"] - before["db"]
                                                                - before["results"]) / count)})
        log(f"sizes: {rows}")
        return rows

    @staticmethod
    def _run_jobs(gateway: Gateway, shape: Shape, count: int) -> list[int]:
        ids = [gateway.submit(shape.params(f"size job {i}")).job_id for i in range(count)]
        sizes = []
        for job_id in ids:
            job = gateway.wait_status(job_id, [S.JOB_STATUS_COMPLETED], 600)
            sizes.append(job.video_size)
        return sizes


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average_at_start']:.1f} at start; "
             f"`{report['command']}`", ""]
    t = report.get("takeover")
    if t:
        lines += [f"**Takeover after SIGKILL** (2 gateways on PostgreSQL, --lease-seconds {t['lease_seconds']}, "
                  f"--checkpoint-every {t['checkpoint_every']}, {t['steps']}-step jobs, {len(t['trials'])} trials)", "",
                  "| | mean | min | median | max |", "| --- | --- | --- | --- | --- |"]
        for key, name in (("kill_to_running_s", "kill to RUNNING on the other gateway (s)"),
                          ("kill_to_next_progress_s", "kill to its next denoising step there (s)"),
                          ("steps_redone", "steps redone per takeover")):
            s = t[key]
            lines.append(f"| {name} | {s['mean']} | {s['min']} | {s['median']} | {s['max']} |")
        lines += ["", "| trial | killed at step | resumed from step | kill to RUNNING (s) | kill to next step (s) | "
                  "steps redone |", "| --- | --- | --- | --- | --- | --- |"]
        for i, trial in enumerate(t["trials"]):
            lines.append(f"| {i} | {trial['killed_at_step']} | {trial['resumed_from_step']} | "
                         f"{trial['kill_to_running_s']} | {trial['kill_to_next_progress_s']} | {trial['steps_redone']} |")
        lines.append("")
    rows = report.get("throughput")
    if rows:
        lines += [f"**Call throughput** ({rows[0]['clients']} client threads, {rows[0]['seconds']} s each; every "
                  "SubmitJob followed by an untimed CancelJob)", "",
                  "| store | SubmitJob calls/s | p50 ms | p99 ms | GetJob calls/s | p50 ms | p99 ms | CancelJob p50 ms | "
                  "p99 ms | errors |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            s, g, c = r["submit"], r["get"], r["cancel"]
            lines.append(f"| {r['store']} | {s['calls_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {g['calls_per_s']} | "
                         f"{g['p50_ms']} | {g['p99_ms']} | {c['p50_ms']} | {c['p99_ms']} | {s['errors'] + g['errors']} |")
        lines.append("")
    sizes = report.get("sizes")
    if sizes:
        a = report["args"]
        lines += [f"**Store bytes per completed job** ({sizes[0]['jobs']} jobs of {a['size_frames']} frames "
                  f"{a['size_px']}x{a['size_px']}, {a['size_steps']} steps, checkpoints every {a['checkpoint_every']})",
                  "", "| store | MP4 (mean) | rows | videos | total | after VACUUM (FULL) |", "| --- | --- | --- | --- | --- | --- |"]
        for r in sizes:
            if r["store"] == "PostgreSQL":
                lines.append(f"| PostgreSQL (`jobs` / `videos`, indexes and TOAST) | {r['mp4_bytes_mean']} | "
                             f"{r['jobs_bytes_per_job']} | {r['videos_bytes_per_job']} | {r['total_bytes_per_job']} | "
                             f"{r['total_bytes_per_job_after_vacuum_full']} (rows {r['jobs_bytes_per_job_after_vacuum_full']}, "
                             f"videos {r['videos_bytes_per_job_after_vacuum_full']}) |")
            else:
                lines.append(f"| SQLite (`jobs.sqlite3` + WAL / `results/`) | {r['mp4_bytes_mean']} | "
                             f"{r['db_and_wal_bytes_per_job']} | {r['results_bytes_per_job']} | {r['total_bytes_per_job']} "
                             f"| {r['total_bytes_per_job_after_vacuum']} (rows {r['db_bytes_per_job_after_vacuum']}; "
                             f"after close {r['db_bytes_per_job_after_close']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lease-seconds", type=float, default=5.0, help="the gateways' --lease-seconds (part 1)")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="the gateways' --checkpoint-every")
    parser.add_argument("--trials", type=int, default=5, help="takeover trials")
    parser.add_argument("--takeover-steps", type=int, default=60, help="steps of each takeover trial's job")
    parser.add_argument("--clients", type=int, default=8, help="client threads of the throughput part")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds each throughput measure lasts")
    parser.add_argument("--size-jobs", type=int, default=30, help="completed jobs of the size part, per store")
    parser.add_argument("--size-frames", type=int, default=8)
    parser.add_argument("--size-px", type=int, default=64, help="height and width of the size part's jobs")
    parser.add_argument("--size-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill steps")
    parser.add_argument("--parts", default="takeover,throughput,sizes", help="which parts to run, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    parser.add_argument("--keep-logs", type=Path, default=None, help="keep every process's log here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part (seconds, not figures)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lease_seconds, args.trials, args.takeover_steps = min(args.lease_seconds, 1.0), 1, 16
        args.checkpoint_every = min(args.checkpoint_every, 4)
        args.seconds, args.clients = 1.0, min(args.clients, 4)
        args.size_jobs, args.size_frames, args.size_px, args.size_steps = 3, 2, 32, 2
    work = args.keep_logs or Path(tempfile.mkdtemp(prefix="t2v-bench-store-"))
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", "bench/bench_gateway_store.py",
                                                                         *(argv if argv is not None else sys.argv[1:])]),
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    bench = Bench(args, work)
    parts = set(args.parts.split(","))
    try:
        bench.start()
        if "takeover" in parts:
            report["takeover"] = bench.takeover()
        if "throughput" in parts:
            report["throughput"] = bench.throughput()
        if "sizes" in parts:
            report["sizes"] = bench.sizes()
    except BaseException:
        log(f"failed; the logs are in {work / 'logs'}")
        raise
    finally:
        bench.close()
    table = markdown(report)
    print(json.dumps(report, indent=2))
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "results.md").write_text(table + "\n")
    if args.keep_logs is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
