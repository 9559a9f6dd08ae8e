"""Where jobs live: rows in one SQLite file (``JobStore``) and their videos as files (``ResultStore``).

Why SQLite and files: a gateway restart must lose no accepted job, and one gateway needs no database
server; WAL mode lets readers (GetJob, ListJobs) go on while a worker writes. The interface is narrow
(create / get / list / update_status / update_progress / ...) and speaks plain dataclasses, so a server
database can replace it later without touching the job logic. No gRPC here.

Why files are named only by job ids the gateway generated: a path is never built from user text. Every
id is checked against a strict pattern (32 lowercase hex characters, a uuid4's hex) before any file
system use, so ``../`` or an absolute path cannot reach the disk.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import json
import os
import re
import shutil
import sqlite3
import stat
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from services.common.errors import InvalidArgument
from services.gateway.queue import Priority
from services.gateway.validation import Params

JOB_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
VIDEO_SUFFIX = ".mp4"


class StateDirBusy(RuntimeError):
    """Another process holds this job database; two gateways must not share one state dir."""


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


def new_job_id() -> str:
    """A fresh job id: uuid4 as 32 lowercase hex characters (the only form ``check_job_id`` accepts)."""
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it has the form the gateway generates, else raise InvalidArgument."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) and len(job_id) <= 64 else f"{str(job_id)[:64]}..."
        raise InvalidArgument(f"job id {shown!r} is malformed; a job id is the 32 lowercase hex characters "
                              "that SubmitJob or Generate returned")
    return job_id


@dataclass(frozen=True)
class JobRecord:
    """One job row, as plain Python. Times are unix milliseconds, 0 = not yet / none."""

    job_id: str
    status: JobStatus
    priority: Priority
    params: Params
    seed_given: bool = False          # the request named its seed (only such jobs use the result cache)
    cache_key: str | None = None      # set only when seed_given
    created_ms: int = 0
    deadline_ms: int = 0              # the job fails with DEADLINE_EXCEEDED after this; 0 = no deadline
    started_ms: int = 0
    finished_ms: int = 0
    expires_ms: int = 0               # when the video is (COMPLETED) or was (EXPIRED) deleted
    stage: int = 0                    # gateway_pb2.Stage value while running
    step: int = 0
    total_steps: int = 0
    error_code: str = ""              # a gRPC status code name
    error_message: str = ""
    warnings: tuple[str, ...] = ()
    cached: bool = False
    video_size: int = 0
    mime_type: str = ""
    runs: int = 0                     # times the job was started (> 1 after a restart re-ran it)
    seq: int = 0                      # insertion order, assigned by the store


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        TEXT    NOT NULL UNIQUE,
    status        TEXT    NOT NULL,
    priority      TEXT    NOT NULL,
    params        TEXT    NOT NULL,
    seed_given    INTEGER NOT NULL DEFAULT 0,
    cache_key     TEXT,
    created_ms    INTEGER NOT NULL DEFAULT 0,
    deadline_ms   INTEGER NOT NULL DEFAULT 0,
    started_ms    INTEGER NOT NULL DEFAULT 0,
    finished_ms   INTEGER NOT NULL DEFAULT 0,
    expires_ms    INTEGER NOT NULL DEFAULT 0,
    stage         INTEGER NOT NULL DEFAULT 0,
    step          INTEGER NOT NULL DEFAULT 0,
    total_steps   INTEGER NOT NULL DEFAULT 0,
    error_code    TEXT    NOT NULL DEFAULT '',
    error_message TEXT    NOT NULL DEFAULT '',
    warnings      TEXT    NOT NULL DEFAULT '[]',
    cached        INTEGER NOT NULL DEFAULT 0,
    video_size    INTEGER NOT NULL DEFAULT 0,
    mime_type     TEXT    NOT NULL DEFAULT '',
    runs          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_cache_key ON jobs (cache_key) WHERE cache_key IS NOT NULL;
"""
_COLUMNS = [f.name for f in dataclasses.fields(JobRecord)]
# Columns update_status may set besides status (never job_id, params, seq: a job's identity is fixed).
_UPDATABLE = frozenset(_COLUMNS) - {"job_id", "params", "seq", "status", "priority", "seed_given", "cache_key",
                                    "created_ms"}


def _to_row(record: JobRecord) -> dict[str, Any]:
    row = dataclasses.asdict(record)
    row["status"] = record.status.value
    row["priority"] = record.priority.name.lower()
    row["params"] = json.dumps(dataclasses.asdict(record.params), sort_keys=True)
    row["warnings"] = json.dumps(list(record.warnings))
    row["seed_given"], row["cached"] = int(record.seed_given), int(record.cached)
    return row


def _from_row(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["status"] = JobStatus(values["status"])
    values["priority"] = Priority.parse(values["priority"])
    values["params"] = Params(**json.loads(values["params"]))
    values["warnings"] = tuple(json.loads(values["warnings"]))
    values["seed_given"], values["cached"] = bool(values["seed_given"]), bool(values["cached"])
    return JobRecord(**values)


def _encode(column: str, value: Any) -> Any:
    if column == "warnings":
        return json.dumps(list(value))
    if column == "cached":
        return int(value)
    return value


class JobStore:
    """Job rows in one SQLite file (WAL). Thread-safe: one connection behind a lock.

    One process at a time: at start a gateway re-runs the RUNNING rows it finds, which would be
    wrong if another gateway were running them, so the store takes an exclusive lock on
    ``<db>.lock`` for as long as it is open.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._owner = open(self.path.with_name(self.path.name + ".lock"), "a")   # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise StateDirBusy(f"the job database {self.path} is in use by another gateway; give each gateway "
                               "its own --state-dir") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: durable across a process crash
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._owner.close()          # releases the lock

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _change(self, sql: str, args: Iterable[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, tuple(args)).rowcount

    # --- one job --------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> JobRecord:
        """Insert a new job row; return it with its ``seq``."""
        check_job_id(record.job_id)
        row = _to_row(record)
        del row["seq"]
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            cursor = self._db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))
            seq = cursor.lastrowid
        return dataclasses.replace(record, seq=int(seq or 0))

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _from_row(rows[0]) if rows else None

    def update_status(self, job_id: str, status: JobStatus, expected: Iterable[JobStatus] | None = None,
                      **fields: Any) -> bool:
        """Set the status (and ``fields``) if the job's status is one of ``expected``; True if it changed.

        The compare-and-set is what keeps a job from finishing twice when a cancel, a deadline and a
        worker race for it: only the first transition out of RUNNING wins.
        """
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"update_status cannot set {sorted(unknown)}")
        sets = ["status = ?"] + [f"{name} = ?" for name in fields]
        args: list[Any] = [status.value] + [_encode(name, value) for name, value in fields.items()]
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ?"
        args.append(job_id)
        if expected is not None:
            allowed = [s.value for s in expected]
            sql += f" AND status IN ({', '.join('?' for _ in allowed)})"
            args += allowed
        return self._change(sql, args) == 1

    def start(self, job_id: str, started_ms: int) -> bool:
        """QUEUED -> RUNNING (counting the run); False if the job is no longer queued."""
        return self._change(
            "UPDATE jobs SET status = ?, started_ms = ?, runs = runs + 1, stage = 0, step = 0, total_steps = 0 "
            "WHERE job_id = ? AND status = ?",
            (JobStatus.RUNNING.value, started_ms, job_id, JobStatus.QUEUED.value)) == 1

    def update_progress(self, job_id: str, stage: int, step: int, total_steps: int) -> None:
        self._change("UPDATE jobs SET stage = ?, step = ?, total_steps = ? WHERE job_id = ? AND status = ?",
                     (stage, step, total_steps, job_id, JobStatus.RUNNING.value))

    def add_warning(self, job_id: str, text: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT warnings FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None:
                warnings = json.loads(row["warnings"]) + [text]
                self._db.execute("UPDATE jobs SET warnings = ? WHERE job_id = ?", (json.dumps(warnings), job_id))

    # --- many jobs ------------------------------------------------------------------------------
    def list(self, status: JobStatus | None = None, limit: int = 50, before_seq: int | None = None
             ) -> list[JobRecord]:
        """Newest first; ``before_seq`` continues after the last row of a previous page."""
        where, args = [], []
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._query(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit])
        return [_from_row(r) for r in rows]

    def queued(self) -> list[JobRecord]:
        """Every QUEUED job, oldest first (the order to re-queue them in)."""
        return [_from_row(r) for r in self._query("SELECT * FROM jobs WHERE status = ? ORDER BY seq",
                                                  (JobStatus.QUEUED.value,))]

    def requeue_running(self) -> list[str]:
        """RUNNING -> QUEUED for jobs a stopped gateway left running; return their ids."""
        with self._lock:
            rows = self._db.execute("SELECT job_id FROM jobs WHERE status = ?", (JobStatus.RUNNING.value,)).fetchall()
            self._db.execute("UPDATE jobs SET status = ?, stage = 0, step = 0, total_steps = 0 WHERE status = ?",
                             (JobStatus.QUEUED.value, JobStatus.RUNNING.value))
        return [r["job_id"] for r in rows]

    def find_cached(self, cache_key: str, now_ms: int) -> JobRecord | None:
        """The newest COMPLETED, unexpired job with this cache key, if any."""
        rows = self._query("SELECT * FROM jobs WHERE cache_key = ? AND status = ? AND expires_ms > ? "
                           "ORDER BY seq DESC LIMIT 1", (cache_key, JobStatus.COMPLETED.value, now_ms))
        return _from_row(rows[0]) if rows else None

    def due_to_expire(self, now_ms: int) -> list[str]:
        """Ids of COMPLETED jobs whose retention time has passed."""
        return [r["job_id"] for r in self._query(
            "SELECT job_id FROM jobs WHERE status = ? AND expires_ms <= ? ORDER BY seq",
            (JobStatus.COMPLETED.value, now_ms))]

    def count(self, status: JobStatus) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM jobs WHERE status = ?", (status.value,))[0]["n"])


class ResultStore:
    """Videos as files ``<folder>/<job_id>.mp4``; written atomically (temp file, then rename)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob("*.tmp"):       # a write cut short by a crash
            leftover.unlink(missing_ok=True)

    def path(self, job_id: str) -> Path:
        return self.folder / (check_job_id(job_id) + VIDEO_SUFFIX)

    def save(self, job_id: str, data: bytes) -> int:
        """Write the video; return its size. Readers never see a half-written file."""
        final = self.path(job_id)
        temp = final.with_name(final.name + ".tmp")
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
        return len(data)

    def copy(self, source_id: str, job_id: str) -> int:
        """Give ``job_id`` its own copy of another job's video (a hard link when the disk allows)."""
        source, target = self.path(source_id), self.path(job_id)
        temp = target.with_name(target.name + ".tmp")
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
        os.replace(temp, target)
        return target.stat().st_size

    def open(self, job_id: str) -> BinaryIO | None:
        """The video opened for reading, or None if it is not there. An open file survives deletion.

        Only a regular file is served: the store writes files (and hard links), never symlinks, so a
        symlink or anything else found under a job's name was put there by someone else and is not
        followed (O_NOFOLLOW), whatever it points to."""
        try:
            # O_NONBLOCK: a FIFO put there must not hang the open (no effect on a regular file)
            fd = os.open(self.path(job_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:              # a symlink
                return None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def exists(self, job_id: str) -> bool:
        return self.path(job_id).is_file()

    def delete(self, job_id: str) -> bool:
        try:
            self.path(job_id).unlink()
            return True
        except FileNotFoundError:
            return False
