"""The PostgreSQL harness (tests/postgres.py) does what the job-store tests rely on: a real server
that restarts on the same port (clients must reconnect), survives a SIGKILL with its committed data,
gives each test its own database, and carries LISTEN/NOTIFY between connections."""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import urlsplit

import psycopg
import pytest

import tests.postgres
from tests.postgres import PostgresError, PostgresServer


def test_a_fresh_database_per_test_and_a_table_round_trip(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    url = urlsplit(postgres_dsn)
    assert url.scheme == "postgresql" and url.hostname == "127.0.0.1" and url.port == postgres_server.port
    assert url.username == "postgres" and url.password is None
    with psycopg.connect(postgres_dsn) as connection:
        assert connection.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        connection.execute("CREATE TABLE jobs (id text PRIMARY KEY, payload bytea)")
        connection.execute("INSERT INTO jobs VALUES (%s, %s)", ("j1", b"\x00\x01video"))
        connection.commit()
    assert postgres_server.psql("SELECT id, payload FROM jobs", database=url.path.lstrip("/")) == \
        [("j1", b"\x00\x01video")]
    assert int(postgres_server.psql("SHOW server_version_num")[0][0]) >= 130000


def test_it_listens_on_loopback_and_a_socket_in_its_own_folder(postgres_server: PostgresServer) -> None:
    assert postgres_server.psql("SHOW listen_addresses") == [("127.0.0.1",)]
    assert postgres_server.psql("SHOW unix_socket_directories") == [(str(postgres_server.socket_dir),)]
    assert (postgres_server.socket_dir / f".s.PGSQL.{postgres_server.port}").is_socket()
    with psycopg.connect(host=str(postgres_server.socket_dir), port=postgres_server.port, user="postgres",
                         dbname=postgres_server.database) as connection:
        assert connection.execute("SELECT current_user").fetchone() == ("postgres",)
        # under root the server runs as the unprivileged postgres user, never as root; the backend is looked
        # at while its connection is open (psql's own had sometimes exited by then: /proc/<pid> was gone)
        backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert os.stat(f"/proc/{backend}").st_uid != 0


def test_two_databases_are_isolated(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database("harness_isolated_a")
    second = postgres_server.create_database("harness_isolated_b")
    try:
        with psycopg.connect(first, autocommit=True) as a:
            a.execute("CREATE TABLE only_here (x int)")
            a.execute("INSERT INTO only_here VALUES (1)")
        with psycopg.connect(second, autocommit=True) as b:
            assert b.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
            b.execute("CREATE TABLE only_here (x int)")        # the same name, another table
            assert b.execute("SELECT count(*) FROM only_here").fetchone() == (0,)
    finally:
        postgres_server.drop_database("harness_isolated_a")
        postgres_server.drop_database("harness_isolated_b")


def test_listen_notify_between_two_connections(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as listener, \
            psycopg.connect(postgres_dsn, autocommit=True) as sender:
        listener.execute("LISTEN job_events")
        timer = threading.Timer(0.1, lambda: sender.execute("SELECT pg_notify('job_events', 'j1 cancel')"))
        timer.start()
        try:
            got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
        finally:
            timer.join()
        assert got == [("job_events", "j1 cancel")]
        # a notification inside a transaction is delivered only when it commits
        with sender.transaction():
            sender.execute("NOTIFY job_events, 'j2 progress 3/50'")
            assert list(listener.notifies(timeout=0.2)) == []
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["j2 progress 3/50"]


def test_restart_keeps_port_and_data_and_breaks_open_connections(postgres_server: PostgresServer,
                                                                  postgres_dsn: str) -> None:
    port = postgres_server.port
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (x int)")
        connection.execute("INSERT INTO kept VALUES (42)")
        postgres_server.restart()
        assert postgres_server.port == port and postgres_server.running
        with pytest.raises(psycopg.OperationalError):
            connection.execute("SELECT 1")
    with psycopg.connect(postgres_dsn) as again:
        assert again.execute("SELECT x FROM kept").fetchall() == [(42,)]


def test_kill_then_start_recovers_committed_data(postgres_server: PostgresServer, postgres_dsn: str) -> None:
    port, pid = postgres_server.port, postgres_server.pid
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE durable (x int)")
        connection.execute("INSERT INTO durable SELECT generate_series(1, 1000)")
        connection.execute("BEGIN")
        connection.execute("INSERT INTO durable VALUES (-1)")           # never committed
        started = time.monotonic()
        postgres_server.kill()
        assert not postgres_server.running and time.monotonic() - started < 5
        with pytest.raises(psycopg.OperationalError):
            connection.execute("COMMIT")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_dsn, connect_timeout=2)
    postgres_server.start()
    assert postgres_server.port == port and postgres_server.pid != pid
    with psycopg.connect(postgres_dsn) as again:
        assert again.execute("SELECT count(*), min(x) FROM durable").fetchone() == (1000, 1)


def test_a_stopped_server_is_started_again_for_the_next_test(postgres_server: PostgresServer,
                                                             postgres_dsn: str) -> None:
    postgres_server.stop()          # postgres_dsn's teardown starts it again; the next test shows it
    assert not postgres_server.running


def test_the_server_runs_after_a_test_stopped_it(postgres_server: PostgresServer) -> None:
    assert postgres_server.running and postgres_server.psql("SELECT 1") == [(1,)]


def test_without_postgresql_it_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(tests.postgres, "DEBIAN_ROOT", tmp_path)
    with pytest.raises(PostgresError, match=r"`make test` installs it \(apt-get install postgresql\)"):
        PostgresServer()
