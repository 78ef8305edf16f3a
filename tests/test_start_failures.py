"""`dlrhub serve` starts or fails clearly: every start failure is one line on stderr,
`dlrhub: cannot start: ...` naming the problem (no traceback), and exit status 2. Each case runs the
real command as a process."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dlrhub.store import PostgresStore, SqliteStore, StoreError
from dlrhub.store.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
from dlrhub.store.postgres import describe
from dlrhub.store.sqlite import SCHEMA_VERSION
from tools import launcher

PREFIX = "dlrhub: cannot start: "


def serve(*flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`dlrhub serve` on free ports unless `flags` say otherwise, with only the DLRHUB_* variables given."""
    return serve_in(None, *flags, **env)


def serve_in(cwd: Path | None, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`serve`, in the directory `cwd` (None: this one)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DLRHUB_")}
    defaults = {"--listen": "127.0.0.1:0", "--http-listen": "127.0.0.1:0"}
    for flag in flags:
        defaults.pop(flag, None)
    command = [sys.executable, "-m", "dlrhub.cli", "serve", *flags]
    for flag, value in defaults.items():
        command += [flag, value]
    return subprocess.run(
        command, env={**environment, **env}, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def the_line(finished: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start writes, without its prefix; fails unless there is exactly one."""
    assert finished.returncode == 2, finished.stderr
    assert "Traceback" not in finished.stderr
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0].removeprefix(PREFIX)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another socket listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "notes.db"
    db.write_text("these are my notes, not a database; " * 100)
    assert the_line(serve("--db", str(db))) == f"cannot open {db}: file is not a database"
    assert db.read_text().startswith("these are my notes")  # left as it was


def test_a_database_with_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    with sqlite3.connect(db) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    line = the_line(serve("--db", str(db)))
    assert line == (
        f"cannot open {db}: the database has schema version {SCHEMA_VERSION + 1},"
        f" newer than this release ({SCHEMA_VERSION})"
    )


def test_a_postgresql_database_with_a_newer_schema(postgres_db: str) -> None:
    PostgresStore(postgres_db).close()
    with psycopg.connect(postgres_db, autocommit=True) as connection:
        connection.execute("UPDATE dlrhub_schema SET version = %s", (POSTGRES_SCHEMA_VERSION + 1,))
    line = the_line(serve("--db", postgres_db))
    name = describe(postgres_db)
    assert line == (
        f"cannot open {name}: schema version {POSTGRES_SCHEMA_VERSION + 1} is newer than this dlrhub"
        f" ({POSTGRES_SCHEMA_VERSION}): upgrade dlrhub"
    )


def test_an_unreachable_postgresql_names_the_database_but_never_the_password(tmp_path: Path) -> None:
    """#15.1: before, such a URL was a file path: a folder named `postgresql:` appeared."""
    line = the_line(serve_in(tmp_path, "--db", "postgresql://dlrhub:s3cret@127.0.0.1:1/ledger"))
    assert line.startswith("cannot open PostgreSQL database 'ledger' on 127.0.0.1:1: "), line
    assert "s3cret" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "db",
    # "" and "." were taken for the file Path("."): the line was "PosixPath('.') has an empty name".
    ["mysql://db.example/ledger", "host=/run/postgresql dbname=ledger", "", "."],
)
def test_a_database_that_is_neither_a_path_nor_a_postgresql_url(tmp_path: Path, db: str) -> None:
    line = the_line(serve_in(tmp_path, "--db", db))
    assert line.startswith("the database "), line
    assert "postgresql://" in line  # says what would do
    assert list(tmp_path.iterdir()) == []  # nothing made of it


def test_a_directory_nobody_may_write() -> None:
    """/sys: no file can be created there, by any user (root included)."""
    line = the_line(serve("--db", "/sys/dlrhub.db"))
    assert line.startswith("cannot open /sys/dlrhub.db")


def test_a_database_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    db = tmp_path / "plain" / "dlrhub.db"
    assert the_line(serve("--db", str(db))) == f"cannot open {db}: {db.parent} is not a directory"


def test_a_grpc_port_in_use(tmp_path: Path, taken_port: int) -> None:
    line = the_line(serve("--listen", f"127.0.0.1:{taken_port}", "--db", str(tmp_path / "x.db")))
    assert line == f"cannot listen on 127.0.0.1:{taken_port}: Address already in use"


def test_an_http_port_in_use(tmp_path: Path, taken_port: int) -> None:
    line = the_line(serve("--http-listen", f"127.0.0.1:{taken_port}", "--db", str(tmp_path / "x.db")))
    assert line == f"cannot listen on 127.0.0.1:{taken_port} (HTTP): Address already in use"


def test_an_address_this_host_does_not_have(tmp_path: Path) -> None:
    line = the_line(serve("--listen", "256.0.0.1:1", "--db", str(tmp_path / "x.db")))
    assert line.startswith("cannot listen on 256.0.0.1:1: ")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"DLRHUB_MAX_STREAMS": "many"},
            "DLRHUB_MAX_STREAMS: invalid literal for int() with base 10: 'many'",
        ),
        ({"DLRHUB_REFLECTION": "perhaps"}, "DLRHUB_REFLECTION: expected on or off, not 'perhaps'"),
        ({"DLRHUB_STREAM_BUFFER_BYTES": "0"}, "DLRHUB_STREAM_BUFFER_BYTES: at least 1, not 0"),
        ({"DLRHUB_TRACING": "bogus"}, "DLRHUB_TRACING must be off, console or otlp, not 'bogus'"),
        (
            {"DLRHUB_GMS_WEBHOOK_AUTH": "open"},
            "DLRHUB_GMS_WEBHOOK_AUTH: webhook auth must be basic:USER:PASSWORD or token:SECRET",
        ),
        ({"DLRHUB_TLS_CERT": "cert.pem"}, "TLS needs both DLRHUB_TLS_CERT and DLRHUB_TLS_KEY"),
        (
            {"DLRHUB_GMS_SEEN_BASE_URL": "https://dr-v2.hyber.im/1234"},
            "DLRHUB_GMS_SEEN_BASE_URL is set: set DLRHUB_GMS_SEEN_LOGIN and DLRHUB_GMS_SEEN_PASSWORD too"
            " (GMS's GET report takes HTTP Basic credentials)",
        ),
        (
            {
                "DLRHUB_GMS_SEEN_BASE_URL": "https://dr-v2.hyber.im/1234",
                "DLRHUB_GMS_SEEN_LOGIN": "login",
                "DLRHUB_GMS_SEEN_PASSWORD": "password",
                "DLRHUB_GMS_SEEN_CONCURRENCY": "0",
            },
            "DLRHUB_GMS_SEEN_CONCURRENCY must be at least 1, not 0",
        ),
    ],
)
def test_a_bad_setting(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    db = tmp_path / "x.db"
    assert the_line(serve("--db", str(db), **env)) == expected
    assert not db.exists()  # refused before anything started


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ("--workers", "2"),
            "--workers 2 needs a database several processes can write (PostgreSQL: --db postgresql://...);"
            " {db} is SQLite, which one process writes",
        ),
        (
            ("--workers", "2", "--listen", "127.0.0.1:0"),
            "--workers 2 needs fixed ports, but DLRHUB_LISTEN is 127.0.0.1:0: each worker would listen on"
            " a different free port",
        ),
        (("--workers", "0"), "DLRHUB_WORKERS: at least 1, not 0"),
    ],
)
def test_workers_they_cannot_share(tmp_path: Path, flags: tuple[str, ...], expected: str) -> None:
    db = tmp_path / "x.db"
    ports = ("--listen", "127.0.0.1:50999", "--http-listen", "127.0.0.1:50998")
    assert the_line(serve("--db", str(db), *ports, *flags)) == expected.format(db=db)
    assert not db.exists()  # refused before anything started


def test_a_code_table_that_is_not_one(tmp_path: Path) -> None:
    table = tmp_path / "codes.json"
    table.write_text('{"rules": 5}')
    line = the_line(serve("--db", str(tmp_path / "x.db"), "--gms-codes", str(table)))
    assert line == f"{table}: expected an object with a `rules` array"


def test_a_second_server_on_the_same_file_is_refused_until_the_first_has_gone(db_path: Path) -> None:
    first = launcher.start(db_path)
    try:
        line = the_line(serve("--db", str(db_path)))
        pid = first.pid
        assert line == f"{db_path} is in use by another dlrhub (pid {pid}): one server per database file"
    finally:
        first.stop(signal.SIGKILL)  # however it ends, the kernel releases its lock
    with launcher.start(db_path) as second:
        assert second.stop() == 0


def test_one_store_per_file_in_a_process_too(db_path: Path) -> None:
    store = SqliteStore(db_path)
    try:
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
            SqliteStore(db_path)
    finally:
        store.close()
    SqliteStore(db_path).close()  # closed, the file is free again
