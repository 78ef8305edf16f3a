"""`--db` / DLRHUB_DB names the engine: a file path is SQLite, a postgresql:// URL is PostgreSQL
(store/engine.py). What is neither is refused at start: tests/test_start_failures.py."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from deliveryreport.v1.delivery_report_service_pb2 import GetMessageRequest, StreamRequest
from deliveryreport.v1.delivery_report_service_pb2_grpc import DeliveryReportServiceStub
from dlrhub.store import PostgresStore, SqliteStore, StoreError, database_name, open_store
from tests.helpers import ACCEPTED, get_message, gms, ingest, payload_of, read_changes, streaming
from tools import launcher


@pytest.mark.parametrize("db", ["dlrhub.db", "./odd:name.db", "data/x:y.db", Path("plain:path.db")])
def test_a_path_is_sqlite(db: str | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store(db)
    try:
        assert isinstance(store, SqliteStore)
        assert (tmp_path / db).is_file()
    finally:
        store.close()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_postgresql_url_is_postgresql(postgres_db: str, scheme: str, tmp_path: Path) -> None:
    store = open_store(scheme + postgres_db.removeprefix("postgresql"))
    try:
        assert isinstance(store, PostgresStore)
        assert store.latest_cursor() == 0
    finally:
        store.close()


@pytest.mark.parametrize(
    "db",
    [
        "mysql://db.example/ledger",
        "sqlite:dlrhub.db",
        "postgresql:ledger",
        "PostgreSQL://db.example/ledger",  # libpq knows the lower-case schemes only
        "file:///tmp/dlrhub.db",
        "host=/run/postgresql dbname=ledger",
    ],
)
def test_what_is_neither_a_path_nor_a_postgresql_url_is_refused(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each says what would do (the one-line start failure: tests/test_start_failures.py)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="postgresql://"):
        open_store(db)
    assert list(tmp_path.iterdir()) == []  # nothing made of it


def test_a_database_is_named_without_its_password() -> None:
    assert database_name("postgresql://dlrhub:s3cret@db.example:6432/ledger?sslmode=require") == (
        "PostgreSQL database 'ledger' on db.example:6432"
    )
    assert database_name("postgresql:///ledger?host=/run/postgresql") == (
        "PostgreSQL database 'ledger' on /run/postgresql"
    )
    assert database_name(Path("data/dlrhub.db")) == "data/dlrhub.db"
    with pytest.raises(StoreError, match="not a file path or a postgresql:// URL"):
        open_store("mysql://db.example/ledger")


async def test_serve_over_postgresql(postgres_db: str) -> None:
    """`dlrhub serve --db postgresql://...`: the real process stores in PostgreSQL, logs the database
    without its password, and finds everything again after a restart."""
    # The test server trusts local connections: the password is only there to be kept out of logs.
    url = postgres_db.replace("postgresql:///", "postgresql://postgres:s3cret@/", 1)
    with launcher.start(url) as first:
        async with grpc.aio.insecure_channel(first.address) as channel:
            response = await ingest(DeliveryReportServiceStub(channel), payload_of(gms("over-pg")))
            assert [result.outcome for result in response.results] == [ACCEPTED]
            cursor = response.results[0].cursor
            assert cursor.startswith("pg-")
        assert first.stop() == 0
    serving = [json.loads(line) for line in first.output.stderr if '"serving"' in line]
    assert serving[0]["db"].startswith("PostgreSQL database 'test_")
    assert "s3cret" not in "".join([*first.output.stderr, *first.output.stdout])
    with launcher.start(url) as second:
        async with grpc.aio.insecure_channel(second.address) as channel:
            stub = DeliveryReportServiceStub(channel)
            [state] = (await get_message(stub, GetMessageRequest(message_id="over-pg"))).messages
            assert state.message_id == "over-pg"
            async with streaming(stub, StreamRequest(from_beginning=True), start=0) as call:
                [change] = await read_changes(call, 1)
                assert (change.cursor, change.change.report.message_id) == (cursor, "over-pg")
