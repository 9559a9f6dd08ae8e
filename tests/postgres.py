"""A real, throwaway PostgreSQL cluster for the tests: the shared job store's engine.

:class:`PostgresServer` runs Debian's (or any) PostgreSQL binaries -- ``initdb`` once, then the
``postgres`` server itself -- on a temporary data folder, listening on 127.0.0.1 on a port chosen at
run time and on a unix socket in that folder, with ``trust`` authentication (a test-only cluster
that nothing but this machine's loopback can reach). ``make test`` installs PostgreSQL when it is
missing (``apt-get install postgresql``; Debian puts the binaries in /usr/lib/postgresql/<ver>/bin).

initdb and postgres refuse to run as root, so under root they run as the unprivileged ``postgres``
user that Debian's package creates (the temporary folder is made that user's); otherwise as
yourself.

Fixtures (made visible to every test by one import line in tests/conftest.py):

* ``postgres_server`` (session): the one :class:`PostgresServer` of the test session, started.
* ``postgres_dsn`` (function): a fresh, empty database on it (``CREATE DATABASE``: milliseconds),
  as a ``postgresql://postgres@127.0.0.1:PORT/NAME`` URL; dropped afterwards.

Example::

    def test_jobs_survive_a_database_restart(postgres_server, postgres_dsn):
        store = PostgresJobStore.open(postgres_dsn)     # what the gateway does with --job-store URL
        ...
        postgres_server.restart()                       # same port and data: clients must reconnect
        postgres_server.kill()                          # SIGKILL, as a crashed pod; then .start()

A test that stops or kills the session server need not start it again: ``postgres_dsn`` does so
when it tears down, so the next test finds it running.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from t2v.up import free_port

SUPERUSER = "postgres"          # the cluster's superuser (initdb --username), whoever runs the server
DEFAULT_DATABASE = "t2v"
DEBIAN_ROOT = Path("/usr/lib/postgresql")      # Debian's layout: <ver>/bin/{initdb,pg_ctl,postgres}
_NOT_INSTALLED = ("PostgreSQL is not installed here (no initdb and pg_ctl on PATH or in "
                  "/usr/lib/postgresql/*/bin): `make test` installs it (apt-get install postgresql); "
                  "or install PostgreSQL 13 or newer yourself and put its bin folder on PATH")


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised or started; the message says why and what to do."""


def find_bin_dir() -> Path:
    """The folder with initdb, pg_ctl and postgres: from PATH, else Debian's newest version."""
    on_path = [shutil.which(tool) for tool in ("initdb", "pg_ctl")]
    if all(on_path):
        folder = Path(on_path[0]).resolve().parent     # /usr/local/bin/initdb may link into Debian's folder
        if (folder / "postgres").is_file():
            return folder
    versions = []
    for folder in DEBIAN_ROOT.glob("*/bin"):
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            try:
                versions.append((int(folder.parent.name.split(".")[0]), folder))
            except ValueError:
                continue
    if not versions:
        raise PostgresError(_NOT_INSTALLED)
    return max(versions)[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``start()``, ``stop()``, ``restart()``, ``kill()``, ``close()``.

    ``dsn`` is the URL of its default database; ``create_database(name)`` makes another one and
    returns its URL; ``psql(sql)`` runs one statement and returns the rows. Usable as a context
    manager (started on enter; stopped and its folder deleted on exit).
    """

    def __init__(self, database: str = DEFAULT_DATABASE, bin_dir: Path | str | None = None) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.database = database
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.user = SUPERUSER
        self.root: Path | None = None           # the temporary folder: data/, the unix socket, postgres.log
        self._process: subprocess.Popen[bytes] | None = None
        self._prefix: list[str] = []
        self._as: dict[str, Any] = {}           # subprocess arguments that drop root, when we are root
        self._log_handle: Any = None
        self._atexit_registered = False

    # --- where things are ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the server was never started"
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "the server was never started"
        return self.root

    @property
    def log_file(self) -> Path:
        assert self.root is not None, "the server was never started"
        return self.root / "postgres.log"

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/t2v``: the default database, over TCP."""
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        if self.port is None:
            raise PostgresError("the PostgreSQL server has no port yet: call start() first")
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- life cycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "PostgresServer":
        """Start the server (initialising the cluster the first time); returns once it accepts
        connections. After a stop(), restart() or kill() it starts on the same port and data."""
        if self.running:
            return self
        first = self.root is None
        if first:
            self._init_cluster()
        for attempt in range(3):
            if first:
                self.port = free_port(self.host)
                self._write_port()
            try:
                self._launch(timeout)
                break
            except PostgresError as error:
                # another process took the port between free_port() and the bind: pick another
                if first and attempt < 2 and ("could not bind" in str(error) or "TCP/IP socket" in str(error)):
                    continue
                raise
        if first:
            self.psql(f'CREATE DATABASE "{self.database}"', database="postgres")
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop cleanly, as ``pg_ctl stop -m fast`` does (SIGINT: sessions are ended, then a
        checkpoint). Open connections fail from now on."""
        if not self.running:
            self._reap()
            return
        assert self._process is not None
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PostgresError(f"PostgreSQL did not stop within {timeout:g} s and was killed; "
                                f"its log:\n{self.log_tail()}") from None
        self._wait_for_backends()
        self._reap()

    def restart(self, timeout: float = 30.0) -> None:
        """Like ``pg_ctl restart``: stop, then start on the same port and data. Connections opened
        before fail; new ones work."""
        self.stop(timeout)
        self.start(timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends, as when its pod or machine dies (no checkpoint,
        no goodbye to clients). start() recovers from the WAL: committed data survives."""
        if not self.running:
            self._reap()
            return
        assert self._process is not None
        # The backends call setsid(), so they leave the postmaster's process group: find them by parent
        # before the postmaster goes (a backend left alive would still answer its client).
        children = _children(self._process.pid)
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._process.wait()
        _wait_gone(children)
        self._wait_for_backends()
        self._reap()

    def close(self) -> None:
        """Stop the server and delete its folder."""
        try:
            if self.running:
                try:
                    self.stop(timeout=15)
                except PostgresError:
                    pass
        finally:
            self._reap()
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- SQL ----------------------------------------------------------------------------------------
    def connect(self, database: str | None = None, **kwargs: Any) -> Any:
        """A new psycopg connection (autocommit unless told otherwise) to ``database``."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(self.dsn_for(database or self.database), **kwargs)

    def psql(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None,
             database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) and return its rows ([] for a statement without any)."""
        with self.connect(database) as connection:
            cursor = connection.execute(sql, params)
            return cursor.fetchall() if cursor.description is not None else []

    def create_database(self, name: str) -> str:
        """A new, empty database (CREATE DATABASE: a copy of template1, fast); returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use 1-63 lowercase letters, digits and _")
        self.psql(f'CREATE DATABASE "{name}"', database="postgres")
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any session still connected to it (PostgreSQL 13+)."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', database="postgres")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    # --- inside -------------------------------------------------------------------------------------
    def _init_cluster(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="t2v-pg-"))    # under /tmp: the postgres user can reach it
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(SUPERUSER)
            except KeyError:
                self.close()
                raise PostgresError("running as root, and PostgreSQL refuses to run as root; there is no "
                                    f"unprivileged '{SUPERUSER}' user to run it as (Debian's package creates "
                                    "one: apt-get install postgresql; or `useradd --system postgres`), "
                                    "or run the tests as another user") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid}
            # setpriv execs the program as that user: Popen(user=...) would fork this process (its gRPC
            # threads running) without vfork, and such a child sometimes died before its exec (SIGSEGV).
            self._prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
        self.root.chmod(0o700)
        done = subprocess.run(
            [*self._prefix, str(self.bin_dir / "initdb"), "--pgdata", str(self.data_dir), "--username", SUPERUSER,
             "--auth", "trust", "--encoding", "UTF8", "--locale", "C",
             "--no-sync"],   # nothing to make durable: the folder is thrown away after the tests
            capture_output=True, text=True, env=self._env(), timeout=120)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            self.close()
            raise PostgresError(f"initdb failed (exit {done.returncode}): {output}")
        (self.data_dir / "pg_hba.conf").write_text(
            "# test-only cluster: anyone on this machine may connect as anyone, without a password\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# --- tests/postgres.py: a throwaway cluster for the tests ---\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                # fsync off: PostgreSQL never asks the kernel to flush to disk. Data still reaches the
                # kernel at each commit (synchronous_commit stays on), so it survives kill() -- only an
                # OS crash could lose it, and the folder is thrown away anyway. Much faster tests.
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 300\n"        # many gateways with connection pools in one test
                "shared_buffers = 32MB\n"
                "log_line_prefix = '%m [%p] %d '\n"
                "include_if_exists = 'port.conf'\n")
        if self._as:
            os.chown(self.data_dir / "pg_hba.conf", self._as["user"], self._as["group"])

    def _write_port(self) -> None:
        port_conf = self.data_dir / "port.conf"
        port_conf.write_text(f"port = {self.port}\n")
        if self._as:
            os.chown(port_conf, self._as["user"], self._as["group"])

    def _env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC",
                "HOME": str(self.root)}

    def _launch(self, timeout: float) -> None:
        import psycopg

        self._log_handle = self.log_file.open("ab")
        self._process = subprocess.Popen(
            [*self._prefix, str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
            stdin=subprocess.DEVNULL, stdout=self._log_handle, stderr=subprocess.STDOUT, env=self._env(),
            start_new_session=True)     # its own process group
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._reap()
                raise PostgresError(f"PostgreSQL exited at start (code {code}); its log:\n{self.log_tail()}")
            try:
                psycopg.connect(self.dsn_for("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    self.kill()
                    raise PostgresError(f"PostgreSQL did not accept connections within {timeout:g} s "
                                        f"({str(error).strip()}); its log:\n{self.log_tail()}") from None
                time.sleep(0.02)

    def _wait_for_backends(self, timeout: float = 10.0) -> None:
        """Wait until no live process is left in the postmaster's process group, so the next start
        finds its shared memory free."""
        if self._process is None:
            return
        group = self._process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _live_members(group):
                return
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            self._process = None
        if self._log_handle is not None and self._process is None:
            self._log_handle.close()
            self._log_handle = None


def _stat_fields(pid: str) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()     # after "pid (comm)": state, ppid, pgrp, ...


def _children(parent: int) -> list[int]:
    """The pids whose parent is ``parent`` now."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(entry)[1]) == parent:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Until none of ``pids`` runs (a zombie counts as gone: it holds no memory and answers nobody)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if _stat_fields(str(pid))[0] != "Z":
                    alive.append(pid)
            except (OSError, IndexError):
                continue
        if not alive:
            return
        time.sleep(0.02)


def _live_members(group: int) -> list[int]:
    """Processes of a process group that still run (zombies, which hold no memory, do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The test session's PostgreSQL cluster, started (one per session: initdb takes a second)."""
    try:
        server = PostgresServer().start()
    except PostgresError as error:
        pytest.fail(str(error), pytrace=False)
    yield server
    server.close()


_counter = itertools.count(1)


@pytest.fixture()
def postgres_dsn(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test on the session's cluster, as a URL; dropped after."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40] or "test"
    name = f"t{next(_counter)}_{stem}"
    dsn = postgres_server.create_database(name)
    yield dsn
    if not postgres_server.running:        # the test stopped or killed it: leave it running for the next
        postgres_server.start()
    postgres_server.drop_database(name)
