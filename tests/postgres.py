"""PostgreSQL for the tests (a pytest plugin, registered in conftest.py).

`postgres_url` is the server for the whole session: `DLRHUB_TEST_POSTGRES` when set (a libpq URL of
a role that may CREATE DATABASE), otherwise a throwaway cluster started by tools/pg_cluster.py.
`postgres_db` is a fresh, empty database for one test, dropped after it. When PostgreSQL cannot be
had, the tests that need it fail and say why: they are never skipped.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg import sql

from dlrhub.store import PostgresStore
from tools import pg_cluster


def with_database(url: str, database: str) -> str:
    """The libpq URL `url` naming another database (its path)."""
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{quote(database, safe='')}{query}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL database on a server the session may create databases on."""
    given = os.environ.get(pg_cluster.URL_ENV)
    if given:
        try:
            psycopg.connect(given, connect_timeout=10).close()
        except psycopg.Error as error:
            pytest.fail(
                f"{pg_cluster.URL_ENV} is set, but PostgreSQL there refuses us: {error}", pytrace=False
            )
        yield given
        return
    try:
        running = pg_cluster.start()
    except pg_cluster.ClusterError as error:
        pytest.fail(f"cannot start a throwaway PostgreSQL (tools/pg_cluster.py): {error}", pytrace=False)
    try:
        yield running.url
    finally:
        pg_cluster.stop(running)


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """The URL of a new empty database (a copy of template0) on the server of `url`; dropped at the
    end, with any connection left open."""
    name = f"test_{uuid.uuid4().hex}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """The URL of a new empty database for this test alone; dropped after it."""
    with fresh_database(postgres_url) as url:
        yield url


def position(cursor: str) -> int:
    """The position of a PostgreSQL cursor (as the API gives it out): they sort by it."""
    parsed = PostgresStore.cursor_format.parse(cursor)
    assert parsed is not None, f"not a PostgreSQL cursor: {cursor!r}"
    return parsed
