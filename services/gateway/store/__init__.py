"""Where jobs live, chosen by one URL: ``open_stores(job_store_url, state_dir, result_store_url)``.

- ``sqlite:///PATH`` (or ""): the embedded store, rows in ``PATH`` (default ``<state_dir>/jobs.sqlite3``)
  and videos as files in ``<state_dir>/results``; one gateway.
- ``postgresql://USER@HOST:PORT/DB``: the shared store; any number of gateways, no local state; the
  videos go into the same database unless ``result_store_url`` names a folder (``file:///PATH``).

Nothing outside this package knows which engine runs.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from services.gateway.store.base import (Claimed, JobStore, Notice, ResultStore, ResultStoreFull, StoreFull,
                                         StoreQueueFull, StoreUnavailable)
from services.gateway.store.urls import check_url, describe_url
from services.gateway.store.sqlite import DB_NAME, RESULTS_DIR, FileResultStore, SqliteJobStore, StateDirBusy

__all__ = ["Claimed", "JobStore", "Notice", "ResultStore", "ResultStoreFull", "StoreFull", "StoreQueueFull",
           "StoreUnavailable",
           "StateDirBusy", "open_stores", "describe_url", "check_url"]

def open_stores(job_store_url: str, state_dir: str | Path, result_store_url: str = ""
                ) -> tuple[JobStore, ResultStore]:
    """The job store and the result store the URLs name (see the module doc)."""
    kind = check_url(job_store_url)
    result_kind = check_url(result_store_url, "--result-store") if result_store_url else ""
    root = Path(state_dir).expanduser()
    if kind == "sqlite":
        path = Path(job_store_url[len("sqlite://"):]) if job_store_url else root / DB_NAME
        jobs: JobStore = SqliteJobStore(path)
        if result_kind in ("", "sqlite"):
            return jobs, FileResultStore(root / RESULTS_DIR)
    else:
        from services.gateway.store.postgres import PostgresJobStore, PostgresResultStore
        pg = PostgresJobStore(job_store_url)
        jobs = pg
        if result_kind in ("", "postgresql"):
            return jobs, PostgresResultStore(pg)
    if result_kind == "file":
        return jobs, FileResultStore(urlsplit(result_store_url).path)
    raise ValueError(f"--result-store {describe_url(result_store_url)!r} must be file:///PATH or the job store's "
                     "own database (leave it unset)")
