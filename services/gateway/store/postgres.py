"""The shared job store: rows (and, by default, the videos) in one PostgreSQL database. Any number of gateways.

Why PostgreSQL: gateways must be stateless replicas that can die at any moment without taking a job with
them. Each job row holds its whole truth (``base.py``); a gateway claims a job with ``FOR UPDATE SKIP
LOCKED`` and holds it under a lease it renews; a successor takes over a job whose lease ran out, from its
last checkpoint. The bounds that hold across gateways (the queue's length, how many jobs run at once) are
checked and changed in one transaction serialized by a transaction-level advisory lock, so two gateways can
never both pass a check that only one may pass. LISTEN/NOTIFY carries progress, cancels and "there is
work" between the gateways (``notify``/``listen``); nothing depends on a notice arriving, since every
gateway also polls.

Why a connection pool with a check: after a database restart every pooled connection is dead; each one is
tested before it is handed out and replaced when it fails, so the store works again by itself once the
server is back, and until then every call raises ``StoreUnavailable`` (a sentence), never a raw traceback.

The semantics are those of the embedded store (``sqlite.py``), statement for statement; the contract tests
(tests/integration/test_job_store.py) run against both.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import re
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from services.gateway.domain import JobRecord, JobStatus, Priority, Stage, check_job_id
from services.gateway.queue import QueuePolicy, Waiting
from services.gateway.store.urls import describe_url
from services.gateway.store.base import (COLUMNS, Claimed, Notice, ResultStoreFull, StoreFull, StoreQueueFull,
                                         StoreUnavailable, check_fields, encode, from_row, to_row)

log = logging.getLogger("gateway.store.postgres")

SCHEMA_VERSION = 3                      # 2: jobs.tenant (issue 16); 3: jobs.trace_parent (issue 17)
CHANNEL = "t2v_jobs"                    # the LISTEN/NOTIFY channel of every gateway of one database
NOTIFY_LIMIT = 8000                     # PostgreSQL refuses a payload of this many bytes or more
CHUNK_BYTES = 1 << 20                   # a video is stored as rows of this many bytes (the last one shorter)
LISTEN_POLL_SECONDS = 0.5               # how often the listener looks up from waiting (to stop, to ping)
LISTEN_PING_SECONDS = 5.0               # a silent listener connection is tested this often
LISTEN_BACKOFF = (0.2, 2.0)             # seconds between reconnection attempts of the listener: first, most
_ENDED = {"owner": "", "lease_expires_ms": 0, "checkpoint_step": 0}   # what ending a job clears (as sqlite.py)

_QUEUED, _RUNNING, _COMPLETED = JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.COMPLETED.value
_SELECT = ", ".join(COLUMNS)            # every column of a record (never the checkpoint, which may be large)

# Created when missing; columns added by a later version go into _ADDED_COLUMNS (ADD COLUMN IF NOT EXISTS).
_TABLES = {
    "schema_version": "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "jobs": """CREATE TABLE IF NOT EXISTS jobs (
        seq           BIGSERIAL PRIMARY KEY,
        job_id        TEXT    NOT NULL UNIQUE,
        status        TEXT    NOT NULL,
        priority      TEXT    NOT NULL,
        params        TEXT    NOT NULL,
        seed_given    INTEGER NOT NULL DEFAULT 0,
        cache_key     TEXT,
        created_ms    BIGINT  NOT NULL DEFAULT 0,
        deadline_ms   BIGINT  NOT NULL DEFAULT 0,
        started_ms    BIGINT  NOT NULL DEFAULT 0,
        finished_ms   BIGINT  NOT NULL DEFAULT 0,
        expires_ms    BIGINT  NOT NULL DEFAULT 0,
        stage         INTEGER NOT NULL DEFAULT 0,
        step          INTEGER NOT NULL DEFAULT 0,
        total_steps   INTEGER NOT NULL DEFAULT 0,
        error_code    TEXT    NOT NULL DEFAULT '',
        error_message TEXT    NOT NULL DEFAULT '',
        warnings      TEXT    NOT NULL DEFAULT '[]',
        cached        INTEGER NOT NULL DEFAULT 0,
        video_size    BIGINT  NOT NULL DEFAULT 0,
        mime_type     TEXT    NOT NULL DEFAULT '',
        runs          INTEGER NOT NULL DEFAULT 0
    )""",
    # The videos, cut into rows of CHUNK_BYTES: a reader fetches one row at a time, never the whole video.
    "videos": """CREATE TABLE IF NOT EXISTS videos (
        job_id TEXT    NOT NULL,
        idx    INTEGER NOT NULL,
        data   BYTEA   NOT NULL,
        PRIMARY KEY (job_id, idx)
    )""",
    # The per-key rate limits of every gateway (PostgresRateBuckets): one token bucket per client, by the
    # sha256 of its identity (never the API key itself): ``tokens`` at the time ``updated_ms`` (below 0 after
    # a refusal: see _TAKE). No index on updated_ms: every request rewrites it.
    "rate_buckets": """CREATE TABLE IF NOT EXISTS rate_buckets (
        identity   TEXT             PRIMARY KEY,
        tokens     DOUBLE PRECISION NOT NULL,
        updated_ms BIGINT           NOT NULL
    )""",
}
_ADDED_COLUMNS = {
    "owner": "TEXT NOT NULL DEFAULT ''",
    "lease_expires_ms": "BIGINT NOT NULL DEFAULT 0",
    "checkpoint_step": "INTEGER NOT NULL DEFAULT 0",
    "checkpoint": "BYTEA",
    "tenant": "TEXT NOT NULL DEFAULT ''",
    "trace_parent": "TEXT NOT NULL DEFAULT ''",
}
_INDEXES = {
    "jobs_by_status": "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq)",
    "jobs_by_cache_key": "CREATE INDEX IF NOT EXISTS jobs_by_cache_key ON jobs (cache_key, seq) "
                         "WHERE cache_key IS NOT NULL",
    "jobs_queued": f"CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (created_ms, seq) WHERE status = '{_QUEUED}'",
    "jobs_leases": "CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_expires_ms, seq) "
                   f"WHERE status = '{_RUNNING}'",
    "jobs_deadlines": "CREATE INDEX IF NOT EXISTS jobs_deadlines ON jobs (deadline_ms) "
                      f"WHERE status IN ('{_QUEUED}', '{_RUNNING}') AND deadline_ms > 0",
    "jobs_expiring": f"CREATE INDEX IF NOT EXISTS jobs_expiring ON jobs (expires_ms) WHERE status = '{_COMPLETED}'",
    "jobs_by_tenant": "CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq)",
}
# Videos and latents hardly compress: store them out of line as they are (no pglz pass on every write).
_STORAGE = {("videos", "data"): "EXTERNAL", ("jobs", "checkpoint"): "EXTERNAL"}


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (the same in every process and version)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


_SCHEMA_KEY = lock_key("t2v:schema")
_QUEUE_KEY = lock_key("t2v:queue")
_CLAIM_KEY = lock_key("t2v:claim")


def _reason(error: BaseException) -> str:
    """An error's text on one line (libpq's messages span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _describe(url: str) -> str:
    """The URL (or key=value conninfo) with its password hidden."""
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", describe_url(url), flags=re.IGNORECASE)


def _text(value: Any) -> Any:
    """PostgreSQL's TEXT cannot hold NUL characters (SQLite's can): they are stored as U+FFFD."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _is_full(error: BaseException) -> bool:
    """The server is out of disk (SQLSTATE 53100 disk_full, or 53000 insufficient_resources)."""
    return getattr(error, "sqlstate", None) in ("53100", "53000")


def payload_of(notice: Notice, limit: int = NOTIFY_LIMIT) -> str:
    """The notice as compact JSON under ``limit`` bytes: long strings in its data (warnings) are cut."""
    data = dict(notice.data)

    def dump() -> str:
        return json.dumps({"k": notice.kind, "j": notice.job_id, "d": data, "o": notice.origin},
                          separators=(",", ":"), ensure_ascii=False, default=str)

    text = dump()
    while len(text.encode()) >= limit:
        strings = [(len(v), k) for k, v in data.items() if isinstance(v, str) and v]
        if not strings:
            data = {}                   # nothing left to cut: send the notice without its data
            text = dump()
            break
        _, key = max(strings)
        excess = len(text.encode()) - limit + 1
        value = data[key]
        # each character takes at least one byte: cutting ``excess`` (plus room for the mark) is enough
        data[key] = value[:max(0, len(value) - excess - 8)] + "..." if len(value) > excess + 8 else ""
        text = dump()
    return text


def notice_of(payload: str) -> Notice | None:
    """A received payload as a Notice (None if it is not one of ours)."""
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("k"), str):
        return None
    data = value.get("d")
    return Notice(value["k"], str(value.get("j") or ""), data if isinstance(data, dict) else {},
                  str(value.get("o") or ""))


class PostgresJobStore:
    """Job rows in a PostgreSQL database that any number of gateways share. Thread-safe (a pool)."""

    shared = True

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 3.0,
                 connect_timeout: float = 5.0, lock_timeout: float = 10.0, name: str = "t2v-jobs") -> None:
        """``timeout``: how long a call waits for a connection (then StoreUnavailable); ``lock_timeout``: how
        long a statement waits for a lock, e.g. the claim lock of a gateway frozen in mid-claim."""
        self.url = url
        self.where = _describe(url)
        # every session: a lock is never waited for forever, and a transaction its gateway left open (a
        # frozen or partitioned process) is ended by the server, releasing its locks
        self._settings = {"lock_timeout": f"{max(1, round(lock_timeout * 1000))}ms",
                          "idle_in_transaction_session_timeout": "60s"}
        self._connect_kwargs: dict[str, Any] = {
            "connect_timeout": max(2, round(connect_timeout)),
            # a dead peer that never says goodbye (a partition, a vanished host) is noticed in ~25 s
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "application_name": "t2v-gateway",
        }
        self._handlers: list[Callable[[Notice], None]] = []
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        self._rechecking = False
        self._closed = False
        try:
            with psycopg.connect(url, row_factory=dict_row, **self._connect_kwargs) as connection:
                self._configure(connection)
                self._migrate(connection)
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"cannot reach the job store at {self.where}: {_reason(error)}; "
                                   "check --job-store") from None
        except psycopg.Error as error:
            raise StoreUnavailable(f"the job store at {self.where} could not be prepared: {_reason(error)}; "
                                   "check --job-store and that its user may create tables in that database") from None
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url, kwargs={**self._connect_kwargs, "row_factory": dict_row}, min_size=min_size,
            max_size=max(min_size, max_size), open=False, configure=self._configure, check=self._check, timeout=timeout,
            # the pool's reconnection backs off 1, 2, 4 s...: give it up after 2 s instead, and the next request
            # starts a fresh attempt at once, so the store works again within about a second of the server
            reconnect_timeout=2.0,
            name=name)
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise StoreUnavailable(f"cannot reach the job store at {self.where}: no connection within "
                                   f"{connect_timeout:g} s; check --job-store") from None

    @classmethod
    def open(cls, url: str, **options: Any) -> "PostgresJobStore":
        return cls(url, **options)

    # --- the database -------------------------------------------------------------------------------
    @staticmethod
    def _migrate(connection: psycopg.Connection[Any]) -> None:
        """Create or bring up to date the tables, columns and indexes; one gateway at a time, and only the
        DDL that is missing (ALTER TABLE locks the whole table, so gateways that run are not stopped)."""
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_KEY,))
            tables = {r["relname"] for r in connection.execute(
                "SELECT relname FROM pg_class WHERE relkind = 'r' "
                "AND relnamespace = current_schema()::regnamespace")}
            for table, ddl in _TABLES.items():
                if table not in tables:
                    connection.execute(ddl)
            columns = {(r["table_name"], r["column_name"]): r["attstorage"] for r in connection.execute(
                "SELECT c.relname AS table_name, a.attname AS column_name, a.attstorage FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid WHERE c.relnamespace = current_schema()::regnamespace "
                "AND a.attnum > 0 AND NOT a.attisdropped")}
            for column, kind in _ADDED_COLUMNS.items():
                if ("jobs", column) not in columns:
                    connection.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {column} {kind}")
                    columns[("jobs", column)] = ""
            for (table, column), storage in _STORAGE.items():
                if columns.get((table, column)) != storage[0].lower():
                    connection.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE {storage}")
            indexes = {r["indexname"] for r in connection.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}
            for index, ddl in _INDEXES.items():
                if index not in indexes:
                    connection.execute(ddl)
            row = connection.execute("SELECT max(version) AS v FROM schema_version").fetchone()
            version = row["v"] if row else None
            if version is None:
                connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                connection.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                log.warning("event=job_store_newer schema_version=%s ours=%s", version, SCHEMA_VERSION)

    def _configure(self, connection: psycopg.Connection[Any]) -> None:
        names = list(self._settings)
        connection.execute("SELECT " + ", ".join("set_config(%s, %s, false)" for _ in names),
                           [value for name in names for value in (name, self._settings[name])])
        connection.commit()

    def _check(self, connection: psycopg.Connection[Any]) -> None:
        """The pool's test of a connection before it is handed out; the first dead one (the server
        restarted) has every idle one tested at once, so the dead are replaced together."""
        try:
            ConnectionPool.check_connection(connection)
        except Exception:
            self._recheck_idle()
            raise

    def _recheck_idle(self) -> None:
        with self._lock:
            if self._rechecking or self._closed:
                return
            self._rechecking = True

        def run() -> None:
            try:
                self._pool.check()
            except Exception:  # noqa: BLE001 - the pool's own checks go on
                pass
            finally:
                with self._lock:
                    self._rechecking = False

        threading.Thread(target=run, name="jobs-pg-recheck", daemon=True).start()

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        if isinstance(error, PoolTimeout):
            return StoreUnavailable(f"the job store at {self.where} is unreachable: no connection within "
                                    f"{self._pool.timeout:g} s (it may be down or restarting)")
        if isinstance(error, PoolClosed):
            return StoreUnavailable(f"the job store at {self.where} is closed (the gateway is stopping)")
        return StoreUnavailable(f"the job store at {self.where} is unavailable: {_reason(error)}")

    @contextlib.contextmanager
    def connection(self, full: Callable[[BaseException], Exception] | None = None
                   ) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction (committed at the end, rolled back on an error). Losing the
        server raises StoreUnavailable; ``full`` makes the error for a server out of disk."""
        try:
            with self._pool.connection() as connection:
                yield connection
        except psycopg.Error as error:
            if _is_full(error):
                raise (full or self._full)(error) from None
            if isinstance(error, psycopg.OperationalError):
                raise self._unavailable(error) from None
            raise
        except (PoolTimeout, PoolClosed) as error:
            raise self._unavailable(error) from None

    def _full(self, error: BaseException) -> StoreFull:
        return StoreFull(f"the database at {self.where} has no room left ({_reason(error)})")

    def _rows(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        with self.connection() as connection:
            return connection.execute(sql, args).fetchall()

    def _change(self, sql: str, args: Any = None) -> int:
        with self.connection() as connection:
            return connection.execute(sql, args).rowcount

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=LISTEN_POLL_SECONDS * 4 + 1)
        self._pool.close()

    def healthy(self) -> bool:
        try:
            with self._pool.connection(timeout=min(2.0, self._pool.timeout)) as connection:
                connection.execute("SET LOCAL statement_timeout = 2000")
                connection.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means "not now"
            return False

    # --- one job --------------------------------------------------------------------------------
    @staticmethod
    def _insert(connection: psycopg.Connection[Any], record: JobRecord) -> JobRecord:
        check_job_id(record.job_id)
        row = {name: _text(value) for name, value in to_row(record).items() if name != "seq"}
        seq = connection.execute(
            f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(f'%({name})s' for name in row)}) RETURNING seq",
            row).fetchone()["seq"]
        return JobRecord(**{**record.__dict__, "seq": int(seq)})

    def submit(self, record: JobRecord, max_queued: int) -> JobRecord:
        with self.connection() as connection:
            # one submitter at a time across every gateway: the count and the insert are one step
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_KEY,))
            queued = connection.execute("SELECT count(*) AS n FROM jobs WHERE status = %s", (_QUEUED,)).fetchone()["n"]
            if queued >= max_queued:
                raise StoreQueueFull(int(queued))
            return self._insert(connection, record)

    def insert(self, record: JobRecord) -> JobRecord:
        with self.connection() as connection:
            return self._insert(connection, record)

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._rows(f"SELECT {_SELECT} FROM jobs WHERE job_id = %s", (_text(job_id),))
        return from_row(rows[0]) if rows else None

    def claim(self, owner: str, now_ms: int, lease_ms: int, max_running: int,
              policy: QueuePolicy) -> Claimed | None:
        with self.connection() as connection:
            # one claimer at a time across every gateway, so ``max_running`` holds for all of them together
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_CLAIM_KEY,))
            running = connection.execute("SELECT count(*) AS n FROM jobs WHERE status = %s AND lease_expires_ms > %s",
                                         (_RUNNING, now_ms)).fetchone()["n"]
            if running >= max_running:
                return None
            row = connection.execute(
                "SELECT job_id FROM jobs WHERE status = %s AND lease_expires_ms <= %s ORDER BY seq LIMIT 1 "
                "FOR UPDATE SKIP LOCKED", (_RUNNING, now_ms)).fetchone()
            taken_over = row is not None
            if row is None:
                row = connection.execute(
                    f"SELECT job_id FROM jobs WHERE status = %(queued)s {policy.order_sql('%(now)s')} LIMIT 1 "
                    "FOR UPDATE SKIP LOCKED", {"queued": _QUEUED, "now": now_ms}).fetchone()
            if row is None:
                return None
            claimed = connection.execute(
                "UPDATE jobs SET status = %(running)s, owner = %(owner)s, lease_expires_ms = %(lease)s, "
                "runs = runs + 1, started_ms = CASE WHEN started_ms = 0 THEN GREATEST(%(now)s, created_ms) ELSE started_ms END "
                f"WHERE job_id = %(job_id)s RETURNING {_SELECT}, checkpoint",
                {"running": _RUNNING, "owner": _text(owner), "lease": now_ms + lease_ms, "now": now_ms,
                 "job_id": row["job_id"]}).fetchone()
        checkpoint = claimed["checkpoint"]
        return Claimed(from_row(claimed), bytes(checkpoint) if claimed["checkpoint_step"] and checkpoint is not None
                       else None, taken_over)

    def heartbeat(self, owner: str, job_ids: Iterable[str], now_ms: int, lease_ms: int) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        rows = self._rows("UPDATE jobs SET lease_expires_ms = %s WHERE owner = %s AND status = %s AND job_id = ANY(%s) "
                          "RETURNING job_id", (now_ms + lease_ms, _text(owner), _RUNNING, ids))
        return {row["job_id"] for row in rows}

    def release(self, owner: str, job_id: str) -> bool:
        return self._change("UPDATE jobs SET lease_expires_ms = 0 WHERE job_id = %s AND owner = %s AND status = %s",
                            (job_id, _text(owner), _RUNNING)) == 1

    def transition(self, job_id: str, status: JobStatus, expected: Iterable[JobStatus],
                   owner: str | None = None, **fields: Any) -> bool:
        check_fields(fields)
        if status.is_terminal:
            fields = {**_ENDED, **fields}
        args: dict[str, Any] = {f"v_{name}": _text(encode(name, value)) for name, value in fields.items()}
        sets = ["status = %(status)s"] + [f"{name} = %(v_{name})s" for name in fields]
        if status.is_terminal:
            sets.append("checkpoint = NULL")
        args.update(status=status.value, job_id=_text(job_id), expected=[s.value for s in expected])
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE job_id = %(job_id)s AND status = ANY(%(expected)s)"
        if owner is not None:
            sql += " AND owner = %(owner)s"
            args["owner"] = _text(owner)
        return self._change(sql, args) == 1

    def progress(self, job_id: str, owner: str, stage: Stage, step: int, total_steps: int) -> None:
        self._change("UPDATE jobs SET stage = %s, step = %s, total_steps = %s WHERE job_id = %s AND status = %s "
                     "AND owner = %s", (int(stage), step, total_steps, job_id, _RUNNING, _text(owner)))

    def add_warning(self, job_id: str, text: str) -> None:
        # read, append, write under the row's lock: two gateways' warnings never overwrite each other
        # (and the JSON is Python's, as the embedded store writes it: jsonb refuses \u0000)
        with self.connection() as connection:
            row = connection.execute("SELECT warnings FROM jobs WHERE job_id = %s FOR UPDATE",
                                     (_text(job_id),)).fetchone()
            if row is not None:
                warnings = json.loads(row["warnings"]) + [text]
                connection.execute("UPDATE jobs SET warnings = %s WHERE job_id = %s", (json.dumps(warnings), job_id))

    def save_checkpoint(self, job_id: str, owner: str, step: int, data: bytes) -> bool:
        return self._change("UPDATE jobs SET checkpoint = %s, checkpoint_step = %s WHERE job_id = %s AND owner = %s "
                            "AND status = %s", (bytes(data), step, job_id, _text(owner), _RUNNING)) == 1

    # --- many jobs ------------------------------------------------------------------------------
    def list(self, status: JobStatus | None = None, limit: int = 50, before_seq: int | None = None,
             tenant: str | None = None, after_seq: int | None = None, oldest_first: bool = False) -> list[JobRecord]:
        where, args = ["status = %s" if status is not None else "status <> %s"], [(status or JobStatus.DELETED).value]
        if tenant is not None:
            where.append("tenant = %s")
            args.append(tenant)
        if before_seq is not None:
            where.append("seq < %s")
            args.append(before_seq)
        if after_seq is not None:
            where.append("seq > %s")
            args.append(after_seq)
        sql = (f"SELECT {_SELECT} FROM jobs WHERE {' AND '.join(where)} "
               f"ORDER BY seq {'ASC' if oldest_first else 'DESC'} LIMIT %s")
        return [from_row(r) for r in self._rows(sql, (*args, limit))]

    def waiting(self) -> list[Waiting]:
        rows = self._rows("SELECT job_id, priority, created_ms, seq FROM jobs WHERE status = %s", (_QUEUED,))
        return [Waiting(r["job_id"], Priority.parse(r["priority"]), int(r["created_ms"]), int(r["seq"])) for r in rows]

    def running(self, now_ms: int) -> int:
        return int(self._rows("SELECT count(*) AS n FROM jobs WHERE status = %s AND lease_expires_ms > %s",
                              (_RUNNING, now_ms))[0]["n"])

    def recoverable(self, now_ms: int) -> int:
        return int(self._rows("SELECT count(*) AS n FROM jobs WHERE status = %s AND lease_expires_ms <= %s",
                              (_RUNNING, now_ms))[0]["n"])

    def find_cached(self, cache_key: str, now_ms: int) -> JobRecord | None:
        rows = self._rows(f"SELECT {_SELECT} FROM jobs WHERE cache_key = %s AND status = %s AND expires_ms > %s "
                          "ORDER BY seq DESC LIMIT 1", (cache_key, _COMPLETED, now_ms))
        return from_row(rows[0]) if rows else None

    def overdue(self, now_ms: int) -> list[JobRecord]:
        rows = self._rows(f"SELECT {_SELECT} FROM jobs WHERE status IN (%s, %s) AND deadline_ms > 0 "
                          "AND deadline_ms <= %s ORDER BY seq", (_QUEUED, _RUNNING, now_ms))
        return [from_row(r) for r in rows]

    def next_deadline_ms(self) -> int | None:
        value = self._rows("SELECT min(deadline_ms) AS v FROM jobs WHERE status IN (%s, %s) AND deadline_ms > 0",
                           (_QUEUED, _RUNNING))[0]["v"]
        return int(value) if value is not None else None

    def due_to_expire(self, now_ms: int) -> list[str]:
        return [r["job_id"] for r in self._rows(
            "SELECT job_id FROM jobs WHERE status = %s AND expires_ms <= %s ORDER BY seq", (_COMPLETED, now_ms))]

    def count(self, status: JobStatus) -> int:
        return int(self._rows("SELECT count(*) AS n FROM jobs WHERE status = %s", (status.value,))[0]["n"])

    # --- between gateways ------------------------------------------------------------------------------
    def notify(self, notice: Notice) -> None:
        with self.connection() as connection:
            connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, _text(payload_of(notice))))

    def listen(self, handler: Callable[[Notice], None], wait: float = 2.0) -> None:
        """Call ``handler`` for every notice of the channel (on the listener's thread). Returns once the
        listener is subscribed (at most ``wait`` seconds: a server that is down is waited for in the
        background, and once it answers the handler hears "work" and "queue" to look again)."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"the job store at {self.where} is closed")
            self._handlers.append(handler)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen_loop, name="jobs-pg-listen", daemon=True)
                self._listener.start()
        self._listening.wait(wait)

    def _dispatch(self, notice: Notice) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            try:
                handler(notice)
            except Exception:  # noqa: BLE001 - a handler's bug must not stop the listener
                log.exception("event=notice_handler_failed kind=%s job_id=%s", notice.kind, notice.job_id)

    def _listen_loop(self) -> None:
        delay, missed = LISTEN_BACKOFF[0], False
        while not self._stop.is_set():
            try:
                connection = psycopg.connect(self.url, autocommit=True, **self._connect_kwargs)
            except Exception as error:  # noqa: BLE001 - down or restarting: try again
                if not missed:
                    log.warning("event=job_store_listen_failed url=%s reason=%r", self.where, _reason(error)[:200])
                missed = True
                self._stop.wait(delay)
                delay = min(LISTEN_BACKOFF[1], delay * 2)
                continue
            try:
                with connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    delay = LISTEN_BACKOFF[0]
                    self._listening.set()
                    if missed:          # notices sent while we were away are lost: look again
                        log.info("event=job_store_listen_resumed url=%s", self.where)
                        missed = False
                        self._dispatch(Notice("work"))
                        self._dispatch(Notice("queue"))
                    last = time.monotonic()
                    while not self._stop.is_set():
                        for item in connection.notifies(timeout=LISTEN_POLL_SECONDS):
                            last = time.monotonic()
                            notice = notice_of(item.payload)
                            if notice is None:
                                log.debug("event=notice_unknown payload=%r", item.payload[:200])
                            else:
                                self._dispatch(notice)
                        if time.monotonic() - last >= LISTEN_PING_SECONDS:
                            connection.execute("SELECT 1")     # a silent connection may be a dead one
                            last = time.monotonic()
            except Exception as error:  # noqa: BLE001 - the connection dropped: reconnect
                if self._stop.is_set():
                    break
                log.warning("event=job_store_listen_lost url=%s reason=%r", self.where, _reason(error)[:200])
                missed = True
                self._stop.wait(delay)
                delay = min(LISTEN_BACKOFF[1], delay * 2)

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A session advisory lock on a pooled connection held for the block (True = this gateway's)."""
        key = lock_key("t2v:exclusive:" + name)
        try:
            connection = self._pool.getconn()
        except (PoolTimeout, PoolClosed) as error:
            raise self._unavailable(error) from None
        clean = False           # the connection may go back into the pool: no lock held, autocommit off
        try:
            try:
                connection.autocommit = True        # no transaction left open while the block runs
                mine = bool(connection.execute("SELECT pg_try_advisory_lock(%s) AS ok", (key,)).fetchone()["ok"])
            except psycopg.OperationalError as error:
                raise self._unavailable(error) from None
            try:
                yield mine
            finally:
                with contextlib.suppress(psycopg.Error):
                    if mine:
                        connection.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    connection.autocommit = False
                    clean = True
        finally:
            if not clean:
                connection.close()      # a lock we could not release must not go back into the pool
            self._pool.putconn(connection)

    def rate_buckets(self) -> "PostgresRateBuckets":
        """The per-key rate limits' buckets in this database, so a key's budget holds across every gateway."""
        return PostgresRateBuckets(self)


class _ChunkReader(io.RawIOBase):
    """A stored video read one chunk row at a time (at most one chunk held in memory)."""

    def __init__(self, store: PostgresJobStore, job_id: str, lengths: list[int]) -> None:
        super().__init__()
        self._store, self._job_id = store, job_id
        self._starts = [0]
        for length in lengths:
            self._starts.append(self._starts[-1] + length)
        self._size = self._starts[-1]
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()                                                        # type: ignore[attr-defined]
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"whence {whence} is not 0, 1 or 2")
        position = base + offset
        if position < 0:
            raise OSError(errno.EINVAL, f"cannot seek to {position}")
        self._pos = position
        return position

    def tell(self) -> int:
        self._checkClosed()                                                        # type: ignore[attr-defined]
        return self._pos

    def _chunk(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        self._cached = None
        try:
            with self._store.connection() as connection:
                with connection.cursor(binary=True) as cursor:
                    row = cursor.execute("SELECT data FROM videos WHERE job_id = %s AND idx = %s",
                                         (self._job_id, index)).fetchone()
        except StoreUnavailable as error:
            raise OSError(errno.EIO, f"the video of job {self._job_id} could not be read: {error}") from None
        if row is None or len(row["data"]) != self._starts[index + 1] - self._starts[index]:
            raise OSError(errno.ENOENT, f"the video of job {self._job_id} was deleted or replaced while it was read")
        data = row["data"]
        self._cached = (index, data if isinstance(data, bytes) else bytes(data))
        return self._cached[1]

    def readinto(self, buffer: Any) -> int:
        self._checkClosed()                                                        # type: ignore[attr-defined]
        if self._pos >= self._size:
            return 0
        index = bisect.bisect_right(self._starts, self._pos) - 1
        while self._starts[index + 1] == self._starts[index]:     # an empty chunk (only for an empty video)
            index += 1
        chunk = self._chunk(index)
        start = self._pos - self._starts[index]
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(chunk) - start)
        view[:count] = memoryview(chunk)[start:start + count]
        self._pos += count
        return count

    def close(self) -> None:
        self._cached = None
        super().close()


class PostgresResultStore:
    """Videos as rows of the job store's database (``videos``: one row per CHUNK_BYTES), on its pool."""

    def __init__(self, job_store: PostgresJobStore, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.jobs = job_store
        self.chunk_bytes = chunk_bytes

    def close(self) -> None:
        """The job store closes the pool."""

    def _full(self, error: BaseException) -> ResultStoreFull:
        return ResultStoreFull(errno.ENOSPC, f"the result store is full (the database at {self.jobs.where}: "
                                             f"{_reason(error)})")

    def check_room(self) -> None:
        """PostgreSQL does not tell a client its free disk: a full server is found by its writes."""

    def space(self) -> tuple[int, int] | None:
        """Unknown: PostgreSQL does not tell a client its free disk (watch the server itself)."""
        return None

    def save(self, job_id: str, data: bytes) -> int:
        """Store the video in one transaction (readers see the old one or the whole new one); return its size."""
        check_job_id(job_id)
        view = memoryview(data).cast("B")
        size, step = len(view), self.chunk_bytes
        chunks = ((job_id, index, view[offset:offset + step])
                  for index, offset in enumerate(range(0, size, step) if size else [0]))
        with self.jobs.connection(full=self._full) as connection:
            connection.execute("DELETE FROM videos WHERE job_id = %s", (job_id,))
            with connection.cursor() as cursor:
                cursor.executemany("INSERT INTO videos (job_id, idx, data) VALUES (%s, %s, %b)", chunks)
        return size

    def copy(self, source_id: str, job_id: str) -> int:
        """A copy made by the server (the video never travels to the gateway); FileNotFoundError if it is gone."""
        check_job_id(source_id)
        check_job_id(job_id)
        if source_id == job_id:
            opened = self.size(job_id)
            if opened is None:
                raise FileNotFoundError(errno.ENOENT, f"no stored video for job {source_id}")
            return opened
        with self.jobs.connection(full=self._full) as connection:
            connection.execute("DELETE FROM videos WHERE job_id = %s", (job_id,))
            rows = connection.execute("INSERT INTO videos (job_id, idx, data) SELECT %s, idx, data FROM videos "
                                      "WHERE job_id = %s RETURNING octet_length(data) AS n",
                                      (job_id, source_id)).fetchall()
            if not rows:
                raise FileNotFoundError(errno.ENOENT, f"no stored video for job {source_id}")
        return sum(int(r["n"]) for r in rows)

    def _lengths(self, job_id: str) -> list[int] | None:
        rows = self.jobs._rows("SELECT idx, octet_length(data) AS n FROM videos WHERE job_id = %s ORDER BY idx",
                               (job_id,))
        if not rows or [r["idx"] for r in rows] != list(range(len(rows))):
            return None                 # none, or a partial set (never written so: not ours to serve)
        return [int(r["n"]) for r in rows]

    def size(self, job_id: str) -> int | None:
        lengths = self._lengths(check_job_id(job_id))
        return sum(lengths) if lengths is not None else None

    def open(self, job_id: str) -> tuple[BinaryIO, int] | None:
        """The video as a read-only, seekable file that fetches one chunk at a time, and its size."""
        lengths = self._lengths(check_job_id(job_id))
        if lengths is None:
            return None
        raw = _ChunkReader(self.jobs, job_id, lengths)
        return io.BufferedReader(raw, buffer_size=64 * 1024), sum(lengths)  # type: ignore[return-value]

    def exists(self, job_id: str) -> bool:
        return bool(self.jobs._rows("SELECT 1 AS x FROM videos WHERE job_id = %s LIMIT 1", (check_job_id(job_id),)))

    def delete(self, job_id: str) -> bool:
        return self.jobs._change("DELETE FROM videos WHERE job_id = %s", (check_job_id(job_id),)) > 0

    def sweep(self, keep: Callable[[str], bool]) -> int:
        swept = 0
        for row in self.jobs._rows("SELECT DISTINCT job_id FROM videos"):
            try:
                job_id = check_job_id(row["job_id"])
            except Exception:  # noqa: BLE001 - not ours: leave it alone
                continue
            if not keep(job_id):
                self.delete(job_id)
                swept += 1
        return swept


# The database's clock in unix ms (the same all through a statement): one clock for every gateway (a process's
# monotonic clock means nothing to another, and their wall clocks may disagree).
_NOW_MS = "(extract(epoch FROM statement_timestamp()) * 1000)::bigint"
# A bucket refilled to now: LEAST(burst, tokens + elapsed * rate), never going back in time.
_REFILLED = "LEAST(%(burst)s, b.tokens + GREATEST(0, EXCLUDED.updated_ms - b.updated_ms) * %(per_ms)s)"
_LATEST = "GREATEST(b.updated_ms, EXCLUDED.updated_ms)"
# One atomic statement. A new client's bucket starts full and pays one token at once. A known one is refilled
# to now and pays one token if it has one; the row is locked for the update, so gateways taking at the same
# moment wait for each other and never both spend the last token. A refusal spends nothing, and writes the
# same bucket (the same refill line) at the point ``shift_ms`` earlier, where it holds ``shift_tokens`` (at
# least one) fewer: below zero. So the returned row alone tells a take (tokens >= 0) from a refusal
# (tokens < 0) and gives the exact wait, however many gateways take at once.
_TAKE = f"""
INSERT INTO rate_buckets AS b (identity, tokens, updated_ms) VALUES (%(identity)s, %(burst)s - 1, {_NOW_MS})
ON CONFLICT (identity) DO UPDATE SET
    tokens = CASE WHEN {_REFILLED} >= 1 THEN {_REFILLED} - 1 ELSE {_REFILLED} - %(shift_tokens)s END,
    updated_ms = CASE WHEN {_REFILLED} >= 1 THEN {_LATEST} ELSE {_LATEST} - %(shift_ms)s END
RETURNING tokens, ((1 - tokens) / %(per_ms)s - ({_NOW_MS} - updated_ms)) / 1000.0 AS wait_seconds
"""
# Rows of buckets that have refilled completely equal no row: dropped (a scan, once a minute).
_PRUNE = f"DELETE FROM rate_buckets WHERE updated_ms < {_NOW_MS} - %(full_ms)s"
# What a take treats as "the database cannot be reached now": it lets the request through.
_UNREACHABLE = (PoolTimeout, PoolClosed, psycopg.OperationalError, StoreUnavailable)


class PostgresRateBuckets:
    """Token buckets for the per-key rate limits (``ratelimit.Buckets``) in the job store's database, on its
    pool, so every gateway of the store counts against the same budget. Thread-safe.

    Fails open: while the database cannot be reached a request is let through unchecked (it then gets the
    job store's own UNAVAILABLE, a clear sentence), with a warning at most every ``warn_seconds``; for
    ``retry_seconds`` after such a failure the database is not asked, so a request is not slowed twice."""

    PRUNE_SECONDS = 60.0                # rows that have refilled are deleted at most this often, per gateway

    def __init__(self, store: PostgresJobStore, timeout: float = 1.0, retry_seconds: float = 1.0,
                 warn_seconds: float = 10.0) -> None:
        self._store = store
        self._timeout = timeout             # the longest a take waits for a pooled connection
        self._retry_seconds = retry_seconds
        self._warn_seconds = warn_seconds
        self._lock = threading.Lock()
        self._pruned = time.monotonic()     # the first prune comes a minute after the start
        self._skip_until = 0.0
        self._warned = -float("inf")

    def take(self, identity: str, now: float, rate_per_second: float, burst: float) -> float:
        """See ``ratelimit.Buckets``; ``now`` is unused (the database's clock counts)."""
        del now
        local = time.monotonic()
        if local < self._skip_until:
            return 0.0
        args = {"identity": hashlib.sha256(identity.encode()).hexdigest(), "burst": float(burst),
                **self._shift(rate_per_second)}
        try:
            with self._store._pool.connection(timeout=self._timeout) as connection:
                row = connection.execute(_TAKE, args).fetchone()
            if local - self._pruned >= self.PRUNE_SECONDS:
                self._prune(local, rate_per_second, burst)
        except _UNREACHABLE as error:
            self._fail_open(local, error)
            return 0.0
        if row["tokens"] >= 0:
            return 0.0
        return max(float(row["wait_seconds"]), 0.001)      # refused: never 0.0, which means a token was taken

    @staticmethod
    def _shift(rate_per_second: float) -> dict[str, float]:
        """The rate in tokens a millisecond, and how far back a refusal writes its bucket: ``shift_ms``, a
        whole number of milliseconds worth ``shift_tokens`` >= 1 token (computed once here, so SQL's float
        arithmetic gives the same number)."""
        per_ms = rate_per_second / 1000.0
        shift_ms = math.ceil(1.0 / per_ms)
        if shift_ms * per_ms < 1.0:
            shift_ms += 1
        return {"per_ms": per_ms, "shift_ms": shift_ms, "shift_tokens": shift_ms * per_ms}

    def _prune(self, local: float, rate_per_second: float, burst: float) -> None:
        """Delete the rows of buckets that have refilled (at most every PRUNE_SECONDS; the take it follows
        stands whatever happens here)."""
        with self._lock:
            if local - self._pruned < self.PRUNE_SECONDS:
                return                      # another thread prunes
            self._pruned = local
        shift = self._shift(rate_per_second)          # a refused bucket may hold -shift_tokens: full after
        full_ms = math.ceil((burst + shift["shift_tokens"]) / shift["per_ms"]) + 1
        try:
            with self._store._pool.connection(timeout=self._timeout) as connection:
                deleted = connection.execute(_PRUNE, {"full_ms": full_ms}).rowcount
        except _UNREACHABLE as error:
            log.debug("event=rate_buckets_prune_failed reason=%r", _reason(error)[:200])
            return
        log.debug("event=rate_buckets_pruned rows=%s", deleted)

    def _fail_open(self, local: float, error: BaseException) -> None:
        with self._lock:
            self._skip_until = local + self._retry_seconds
            if local - self._warned < self._warn_seconds:
                return
            self._warned = local
        log.warning("event=rate_limit_unchecked url=%s reason=%r (the job store cannot be reached: requests pass "
                    "without a rate limit until it answers)", self._store.where, _reason(error)[:200])

