"""The embedded job store: rows in one SQLite file, videos as files beside it. One gateway.

Why SQLite and files: a gateway restart must lose no accepted job, and one gateway needs no database
server; WAL mode lets readers (GetJob, ListJobs) go on while a worker writes. It is one gateway's
store: at open it takes an exclusive lock on ``<db>.lock`` and ends every lease it finds (the gateway
that held them is gone, since the lock was free), so jobs left RUNNING resume at once. Several gateways
share a PostgreSQL store instead (``postgres.py``).

Why files are named only by job ids the gateway generated: a path is never built from user text (every
id passes ``domain.check_job_id`` first), so ``../`` or an absolute path cannot reach the disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from services.gateway.domain import JobRecord, JobStatus, Priority, Stage, check_job_id
from services.gateway.queue import QueuePolicy, Waiting
from services.gateway.store.base import (Claimed, Notice, ResultStoreFull, StoreFull, StoreQueueFull, check_fields,
                                         encode, from_row, to_row)

DB_NAME = "jobs.sqlite3"
RESULTS_DIR = "results"
VIDEO_SUFFIX = ".mp4"
MIN_FREE_BYTES = 1 << 20           # a submission is refused when the result store's disk has less left

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
# Indexes on added columns: made once those columns exist.
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq);"
# Columns added since the first schema: a state dir of an older gateway gains them at open.
_ADDED_COLUMNS = {
    "owner": "TEXT NOT NULL DEFAULT ''",
    "lease_expires_ms": "INTEGER NOT NULL DEFAULT 0",
    "checkpoint_step": "INTEGER NOT NULL DEFAULT 0",
    "checkpoint": "BLOB",
    "tenant": "TEXT NOT NULL DEFAULT ''",
    "trace_parent": "TEXT NOT NULL DEFAULT ''",
}
_ENDED = {"owner": "", "lease_expires_ms": 0, "checkpoint_step": 0}


class StateDirBusy(RuntimeError):
    """Another process holds this job database; two gateways must not share one state dir."""


class SqliteJobStore:
    """Job rows in one SQLite file (WAL). Thread-safe: one connection behind a lock."""

    shared = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._owner = open(self.path.with_name(self.path.name + ".lock"), "a")   # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._owner.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._owner.close()
            raise StateDirBusy(f"the job database {self.path} is in use by another gateway; give each gateway "
                               "its own --state-dir, or share a PostgreSQL job store (--job-store "
                               "postgresql://...) between them") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: durable across a process crash
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            self._db.executescript(_ADDED_INDEXES)
            # The lock was free, so whoever held these leases is gone: their jobs resume at once.
            self._db.execute("UPDATE jobs SET lease_expires_ms = 0 WHERE status = ?", (JobStatus.RUNNING.value,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._owner.close()          # releases the lock

    def healthy(self) -> bool:
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; a full disk raises StoreFull (the statement changed nothing)."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as error:
                if _out_of_room(error):
                    raise StoreFull(f"{self.path.parent} has no room left ({error})") from None
                raise

    def _query(self, sql: str, args: Any = ()) -> list[sqlite3.Row]:
        with self._locked() as db:
            return db.execute(sql, args).fetchall()

    def _change(self, sql: str, args: Any = ()) -> int:
        with self._locked() as db:
            return db.execute(sql, args).rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE .. COMMIT; any failure, the COMMIT's own included (a full disk), rolls back, so
        the connection is never left inside a transaction."""
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # --- one job --------------------------------------------------------------------------------
    def _insert(self, db: sqlite3.Connection, record: JobRecord) -> JobRecord:
        check_job_id(record.job_id)
        row = to_row(record)
        del row["seq"]
        cursor = db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                            tuple(row.values()))
        return JobRecord(**{**record.__dict__, "seq": int(cursor.lastrowid or 0)})

    def submit(self, record: JobRecord, max_queued: int) -> JobRecord:
        with self._transaction() as db:
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (JobStatus.QUEUED.value,)).fetchone()[0]
            if queued >= max_queued:
                raise StoreQueueFull(int(queued))
            return self._insert(db, record)

    def insert(self, record: JobRecord) -> JobRecord:
        with self._transaction() as db:
            return self._insert(db, record)

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return from_row(rows[0]) if rows else None

    def claim(self, owner: str, now_ms: int, lease_ms: int, max_running: int,
              policy: QueuePolicy) -> Claimed | None:
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND lease_expires_ms > ?",
                                 (JobStatus.RUNNING.value, now_ms)).fetchone()[0]
            if running >= max_running:
                return None
            row = db.execute("SELECT * FROM jobs WHERE status = ? AND lease_expires_ms <= ? ORDER BY seq LIMIT 1",
                             (JobStatus.RUNNING.value, now_ms)).fetchone()
            taken_over = row is not None
            if row is None:
                row = db.execute(f"SELECT * FROM jobs WHERE status = :queued {policy.order_sql(':now')} LIMIT 1",
                                 {"queued": JobStatus.QUEUED.value, "now": now_ms}).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, owner = ?, lease_expires_ms = ?, runs = runs + 1, "
                       "started_ms = CASE WHEN started_ms = 0 THEN MAX(?, created_ms) ELSE started_ms END WHERE job_id = ?",
                       (JobStatus.RUNNING.value, owner, now_ms + lease_ms, now_ms, row["job_id"]))
            claimed = db.execute("SELECT * FROM jobs WHERE job_id = ?", (row["job_id"],)).fetchone()
        return Claimed(from_row(claimed), claimed["checkpoint"] if claimed["checkpoint_step"] else None, taken_over)

    def heartbeat(self, owner: str, job_ids: Iterable[str], now_ms: int, lease_ms: int) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        marks = ", ".join("?" for _ in ids)
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET lease_expires_ms = ? WHERE owner = ? AND status = ? AND job_id IN ({marks})",
                       (now_ms + lease_ms, owner, JobStatus.RUNNING.value, *ids))
            rows = db.execute(f"SELECT job_id FROM jobs WHERE owner = ? AND status = ? AND job_id IN ({marks})",
                              (owner, JobStatus.RUNNING.value, *ids)).fetchall()
        return {row["job_id"] for row in rows}

    def release(self, owner: str, job_id: str) -> bool:
        return self._change("UPDATE jobs SET lease_expires_ms = 0 WHERE job_id = ? AND owner = ? AND status = ?",
                            (job_id, owner, JobStatus.RUNNING.value)) == 1

    def transition(self, job_id: str, status: JobStatus, expected: Iterable[JobStatus],
                   owner: str | None = None, **fields: Any) -> bool:
        check_fields(fields)
        if status.is_terminal:
            fields = {**_ENDED, **fields}
        sets = ["status = ?"] + [f"{name} = ?" for name in fields] + (["checkpoint = NULL"] if status.is_terminal else [])
        args: list[Any] = [status.value] + [encode(name, value) for name, value in fields.items()]
        allowed = [s.value for s in expected]
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = ? AND status IN ({', '.join('?' for _ in allowed)})"
        args += [job_id, *allowed]
        if owner is not None:
            sql += " AND owner = ?"
            args.append(owner)
        return self._change(sql, args) == 1

    def progress(self, job_id: str, owner: str, stage: Stage, step: int, total_steps: int) -> None:
        self._change("UPDATE jobs SET stage = ?, step = ?, total_steps = ? WHERE job_id = ? AND status = ? AND owner = ?",
                     (int(stage), step, total_steps, job_id, JobStatus.RUNNING.value, owner))

    def add_warning(self, job_id: str, text: str) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT warnings FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None:
                warnings = json.loads(row["warnings"]) + [text]
                db.execute("UPDATE jobs SET warnings = ? WHERE job_id = ?", (json.dumps(warnings), job_id))

    def save_checkpoint(self, job_id: str, owner: str, step: int, data: bytes) -> bool:
        return self._change("UPDATE jobs SET checkpoint = ?, checkpoint_step = ? WHERE job_id = ? AND owner = ? "
                            "AND status = ?", (data, step, job_id, owner, JobStatus.RUNNING.value)) == 1

    # --- many jobs ------------------------------------------------------------------------------
    def list(self, status: JobStatus | None = None, limit: int = 50, before_seq: int | None = None,
             tenant: str | None = None, after_seq: int | None = None, oldest_first: bool = False) -> list[JobRecord]:
        where, args = ["status = ?" if status is not None else "status != ?"], [(status or JobStatus.DELETED).value]
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        if after_seq is not None:
            where.append("seq > ?")
            args.append(after_seq)
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq {'ASC' if oldest_first else 'DESC'} LIMIT ?"
        return [from_row(r) for r in self._query(sql, (*args, limit))]

    def waiting(self) -> list[Waiting]:
        rows = self._query("SELECT job_id, priority, created_ms, seq FROM jobs WHERE status = ?",
                           (JobStatus.QUEUED.value,))
        return [Waiting(r["job_id"], Priority.parse(r["priority"]), r["created_ms"], r["seq"]) for r in rows]

    def running(self, now_ms: int) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs WHERE status = ? AND lease_expires_ms > ?",
                               (JobStatus.RUNNING.value, now_ms))[0][0])

    def recoverable(self, now_ms: int) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs WHERE status = ? AND lease_expires_ms <= ?",
                               (JobStatus.RUNNING.value, now_ms))[0][0])

    def find_cached(self, cache_key: str, now_ms: int) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE cache_key = ? AND status = ? AND expires_ms > ? "
                           "ORDER BY seq DESC LIMIT 1", (cache_key, JobStatus.COMPLETED.value, now_ms))
        return from_row(rows[0]) if rows else None

    def overdue(self, now_ms: int) -> list[JobRecord]:
        rows = self._query("SELECT * FROM jobs WHERE status IN (?, ?) AND deadline_ms > 0 AND deadline_ms <= ? "
                           "ORDER BY seq", (JobStatus.QUEUED.value, JobStatus.RUNNING.value, now_ms))
        return [from_row(r) for r in rows]

    def next_deadline_ms(self) -> int | None:
        value = self._query("SELECT MIN(deadline_ms) FROM jobs WHERE status IN (?, ?) AND deadline_ms > 0",
                            (JobStatus.QUEUED.value, JobStatus.RUNNING.value))[0][0]
        return int(value) if value is not None else None

    def due_to_expire(self, now_ms: int) -> list[str]:
        return [r["job_id"] for r in self._query(
            "SELECT job_id FROM jobs WHERE status = ? AND expires_ms <= ? ORDER BY seq",
            (JobStatus.COMPLETED.value, now_ms))]

    def count(self, status: JobStatus) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs WHERE status = ?", (status.value,))[0][0])

    # --- between gateways: there are none ----------------------------------------------------------
    def notify(self, notice: Notice) -> None:
        """One gateway per SQLite store: nobody else to tell."""

    def listen(self, handler: Callable[[Notice], None]) -> None:
        """One gateway per SQLite store: nobody else will speak."""

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        yield True                       # the file lock makes this gateway the only one

    def rate_buckets(self) -> None:
        """One gateway per SQLite store: its rate limits stay in its memory."""
        return None


def _out_of_room(error: sqlite3.Error) -> bool:
    """SQLITE_FULL, or an I/O error of a write on a disk with no room (SQLITE_IOERR)."""
    primary = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR) or "disk is full" in str(error)


def _full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class FileResultStore:
    """Videos as files ``<folder>/<job_id>.mp4``; written atomically (temp file, then rename)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob("*.tmp"):       # a write cut short by a crash
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Files need no closing."""

    def path(self, job_id: str) -> Path:
        return self.folder / (check_job_id(job_id) + VIDEO_SUFFIX)

    def check_room(self) -> None:
        """Raise ResultStoreFull when the folder's disk has less than MIN_FREE_BYTES left: a job accepted
        then would run only to find no room for its video."""
        info = os.statvfs(self.folder)
        free = info.f_bavail * info.f_frsize
        if free < MIN_FREE_BYTES:
            raise ResultStoreFull(errno.ENOSPC, f"the result store is full ({self.folder}: {free} bytes free, "
                                                f"{MIN_FREE_BYTES >> 20} MiB needed)")

    def space(self) -> tuple[int, int] | None:
        """The folder's file system: bytes free to this process (statvfs' f_bavail, what a write may use; root's
        reserve left out) and its size, in microseconds."""
        info = os.statvfs(self.folder)
        return info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize

    def save(self, job_id: str, data: bytes) -> int:
        """Write the video; return its size. Readers never see a half-written file; a full disk leaves no
        temporary file behind and raises ResultStoreFull."""
        final = self.path(job_id)
        temp = final.with_name(final.name + ".tmp")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if _full(exc):
                raise ResultStoreFull(exc.errno, f"the result store is full ({self.folder}: {exc.strerror})") from None
            raise
        return len(data)

    def copy(self, source_id: str, job_id: str) -> int:
        """Give ``job_id`` its own copy of another job's video (a hard link when the disk allows)."""
        source, target = self.path(source_id), self.path(job_id)
        temp = target.with_name(target.name + ".tmp")
        try:
            try:
                os.link(source, temp)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise
                shutil.copyfile(source, temp)
            os.replace(temp, target)
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def open(self, job_id: str) -> tuple[BinaryIO, int] | None:
        """The video opened for reading, or None if it is not there. An open file survives deletion.

        Only a regular file is served: the store writes files (and hard links), never symlinks, so a
        symlink or a FIFO put there by someone else is not followed."""
        try:
            # O_NONBLOCK: a FIFO put there must not hang the open (no effect on a regular file)
            fd = os.open(self.path(job_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:              # a symlink
                return None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb"), info.st_size

    def exists(self, job_id: str) -> bool:
        return self.path(job_id).is_file()

    def delete(self, job_id: str) -> bool:
        try:
            self.path(job_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def sweep(self, keep: Callable[[str], bool]) -> int:
        swept = 0
        for path in self.folder.glob("*" + VIDEO_SUFFIX):
            try:
                job_id = check_job_id(path.stem)
            except Exception:  # noqa: BLE001 - not ours: leave it alone
                continue
            if not keep(job_id):
                path.unlink(missing_ok=True)
                swept += 1
        return swept
