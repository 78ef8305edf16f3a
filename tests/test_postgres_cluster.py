"""The PostgreSQL the tests get: tools/pg_cluster.py's throwaway cluster, and a fresh database per test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import ROOT
from tools import pg_cluster

# The databases the `postgres_db` cases below were given, in the order they ran.
GIVEN: list[str] = []


@pytest.mark.parametrize("case", ["first", "second"])
def test_each_test_gets_an_empty_database_of_its_own(postgres_db: str, case: str) -> None:
    with psycopg.connect(postgres_db, autocommit=True) as connection:
        name = connection.info.dbname
        tables = connection.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ).fetchone()
        assert tables == (0,), f"{case}: the database is not empty"
        # Would fail in whichever case runs second if the two shared a database.
        connection.execute("CREATE TABLE left_behind (id bigint PRIMARY KEY)")
        connection.execute("INSERT INTO left_behind VALUES (1)")
        assert name not in GIVEN
        still_there = connection.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", [GIVEN]
        ).fetchall()
        assert still_there == [], "an earlier test's database was not dropped"
    GIVEN.append(name)


def test_a_unix_socket_url_parses_as_the_server_will_read_it() -> None:
    url = pg_cluster.database_url(Path("/run/dlr hub/sockets"), "dlr hub")
    assert conninfo_to_dict(url) == {
        "host": "/run/dlr hub/sockets",
        "port": "5432",
        "user": "postgres",
        "dbname": "dlr hub",
    }


def test_the_cli_runs_a_command_against_a_durable_socket_only_cluster_and_removes_it() -> None:
    probe = (
        "import json, os, psycopg\n"
        "url = os.environ['DLRHUB_TEST_POSTGRES']\n"
        "with psycopg.connect(url) as c:\n"
        "    show = lambda name: c.execute('SELECT current_setting(%s)', [name]).fetchone()[0]\n"
        "    print(json.dumps({'url': url, 'host': c.info.host, 'database': c.info.dbname,\n"
        "        'tcp': c.execute('SELECT inet_server_addr()').fetchone()[0],\n"
        "        'settings': {n: show(n) for n in ('listen_addresses', 'fsync', 'synchronous_commit')}}))\n"
        "raise SystemExit(7)\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pg_cluster.py"), "run", "--", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 7, result.stderr  # the command's own exit status
    seen = json.loads(result.stdout)
    socket_dir = Path(seen["host"])
    assert seen["url"] == pg_cluster.database_url(socket_dir, "dlrhub")
    assert seen["database"] == "dlrhub"
    assert seen["tcp"] is None  # connected over the Unix socket
    assert seen["settings"] == {"listen_addresses": "", "fsync": "on", "synchronous_commit": "on"}
    assert not socket_dir.exists(), "the cluster's directory outlived it"
