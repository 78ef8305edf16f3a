"""What only the PostgreSQL store has to hold: several writers on one database (each a PostgresStore,
as each dlrhub process has its own), stream positions under concurrent commits, its schema version.

The contract every engine holds is tests/test_store_contract.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import sql

from deliveryreport.v1.delivery_report_pb2 import Channel, DeliveryReport
from deliveryreport.v1.delivery_report_service_pb2 import Format
from dlrhub.merge import digest, merge
from dlrhub.normalise import Normaliser
from dlrhub.store import SqliteStore, StoreError, postgres
from dlrhub.store.base import Store
from dlrhub.store.codec import encode_merge
from dlrhub.store.common import without_raw
from dlrhub.store.postgres import (
    AWAITING_SEEN_QUERY,
    COARSE,
    MIGRATIONS,
    SCHEMA_VERSION,
    SMALL,
    PostgresStore,
    Reconnect,
)
from dlrhub.write.submission import Applied, Submission, apply
from dlrhub.write.writer import request_digest
from tests.helpers import ACCEPTED, TIMEOUT, gms_batch
from tests.test_store_contract import BASE_SECONDS, GMS, SSR, S, commit, put, received, report


@pytest.fixture
def stores(postgres_db: str) -> Iterator[list[PostgresStore]]:
    """Four stores on one new database: four dlrhub processes' views of it."""
    opened = [PostgresStore(postgres_db) for _ in range(4)]
    try:
        yield opened
    finally:
        for store in opened:
            store.close()


def ingest(store: Store, group: list[DeliveryReport]) -> None:
    """What the committer does with a group: prefetch (lock, load), then merge and append the new."""
    with store.transaction() as tx:
        tx.prefetch({(r.source, r.message_id) for r in group}, {digest(r) for r in group})
        for incoming in group:
            if not tx.is_stored(digest(incoming)):
                put(tx, incoming)


def reports_of_many_messages() -> list[DeliveryReport]:
    """Reports of 2 x SMALL messages (two sources), several each, in an order that is not their events'."""
    statuses = [S.DELIVERY_STATUS_SENT, S.DELIVERY_STATUS_DELIVERED, S.DELIVERY_STATUS_UNDELIVERED]
    made = [
        report(f"m-{number}", status, seconds=seconds, source=source, bulk_id=f"B{number % 3}", price=price)
        for number in range(SMALL)
        for source in (GMS, SSR)
        for seconds, status in enumerate(statuses, start=1)
        for price in ("", "0.01")
    ]
    random.Random(15).shuffle(made)
    return made


def test_concurrent_writers_store_what_one_writer_stores(stores: list[PostgresStore], tmp_path: Path) -> None:
    """#15.3: four writers, each with every report in its own random order and groups (so each
    report arrives four times, concurrently), store the states and history one writer stores."""
    reports = reports_of_many_messages()

    def write_all(store: PostgresStore, seed: int) -> None:
        mine = reports[:]
        shuffler = random.Random(seed)
        shuffler.shuffle(mine)
        while mine:
            size = shuffler.randint(1, 3 * SMALL)  # small and large groups: both ways of locking
            group, mine = mine[:size], mine[size:]
            ingest(store, group + group[: shuffler.randint(0, 2)])  # duplicates in the group too

    with ThreadPoolExecutor(max_workers=len(stores)) as writers:
        for done in [writers.submit(write_all, store, seed) for seed, store in enumerate(stores)]:
            done.result()  # no deadlock, no unique key broken

    one = SqliteStore(tmp_path / "one.db")
    try:
        for incoming in reports:
            ingest(one, [incoming])
        message_ids = sorted({r.message_id for r in reports})
        shared = stores[0]
        for message_id in message_ids:
            assert shared.messages(message_id) == one.messages(message_id)
            history = shared.history(message_id)
            assert sorted(r.SerializeToString() for r in history) == sorted(
                r.SerializeToString() for r in one.history(message_id)
            )
        changes = shared.changes(0, 10_000)
        assert len(changes) == len({digest(r) for r in reports}) == len(reports)
        cursors = [change.cursor for change in changes]
        assert cursors == sorted(set(cursors))
        # Each change's state is the merge of the message's changes before it, in stream order.
        states: dict[tuple[int, str], object] = {}
        for change in changes:
            key = (change.report.source, change.report.message_id)
            merged = merge(states.get(key), change.report)  # type: ignore[arg-type]
            assert change.state == merged.report
            states[key] = merged
    finally:
        one.close()


def test_changes_stop_below_a_transaction_still_open(stores: list[PostgresStore]) -> None:
    """#15.4: a transaction that began first (a smaller position) and commits last holds back what
    `changes` returns, so a reader that resumes after the last change it got misses nothing."""
    first_writer, second_writer, reader = stores[:3]
    [before] = commit(reader, report("m-0"))
    opened = threading.Event()
    finish = threading.Event()
    early: list[int] = []

    def slow() -> None:
        with first_writer.transaction() as tx:
            early.append(put(tx, report("m-1"))[0])
            opened.set()
            assert finish.wait(10)

    with ThreadPoolExecutor(max_workers=1) as pool:
        slow_done = pool.submit(slow)
        assert opened.wait(10)
        [late] = commit(second_writer, report("m-2"))
        assert early[0] < late  # positions follow the order the transactions began in

        # Committed, but below it a smaller position may still commit: not returned yet.
        assert [change.cursor for change in reader.changes(0, 100)] == [before]
        assert reader.latest_cursor() == before
        assert reader.committed_cursor() == late  # an Ingest's cursor is never "ahead"

        finish.set()
        slow_done.result()
    assert [change.cursor for change in reader.changes(0, 100)] == [before, early[0], late]
    assert [change.report.message_id for change in reader.changes(before, 100)] == ["m-1", "m-2"]
    assert reader.latest_cursor() == reader.committed_cursor() == late


@pytest.mark.parametrize("count", [SMALL, 20 * COARSE])
def test_a_writer_holds_a_bounded_number_of_locks(postgres_db: str, count: int) -> None:
    """PostgreSQL's lock table is small and shared (it filled at ~20k locks in one transaction): a
    transaction writing many messages still takes at most COARSE locks."""
    store = PostgresStore(postgres_db)
    many = [report(f"m-{number}", seconds=1) for number in range(count)]
    try:
        with store.transaction() as tx, psycopg.connect(postgres_db) as other:
            tx.prefetch({(r.source, r.message_id) for r in many}, {digest(r) for r in many})
            [(held,)] = other.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            assert 0 < held <= COARSE
            for incoming in many:
                put(tx, incoming)
        assert len(store.changes(0, 2 * count)) == count
    finally:
        store.close()


def waiting_for_a_lock(url: str, count: int) -> None:
    """Returns once `count` dlrhub connections wait for a lock (fails after TIMEOUT seconds)."""
    deadline = time.monotonic() + TIMEOUT
    with psycopg.connect(url, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            [(waiting,)] = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'dlrhub' AND wait_event_type = 'Lock'"
            ).fetchall()
            if waiting >= count:
                return
            time.sleep(0.01)
    pytest.fail(f"no {count} dlrhub connections waiting for a lock within {TIMEOUT} s")


def test_one_request_id_on_two_processes_at_once_is_answered_once(
    stores: list[PostgresStore], postgres_db: str
) -> None:
    """#15.3: a request id is answered once across processes. Here two different requests carry the
    same id at the same moment (their messages differ, so no message lock orders them): the second
    waits for the first to commit, then is told its id names another request."""
    received = Timestamp(seconds=1_700_000_000)

    def submission(message_id: str) -> Submission:
        payload = gms_batch(message_id)
        items = Normaliser.load().normalise(payload, Format.FORMAT_GMS, received)
        digest = request_digest(payload, Format.FORMAT_GMS)
        return Submission(items, received, "nightly-1", payload=payload, request_digest=digest)

    first_in = threading.Event()
    commit_first = threading.Event()

    def first() -> Applied:
        with stores[0].transaction() as tx:
            [applied] = apply(tx, [submission("first")], stores[0].cursor_format)
            first_in.set()
            assert commit_first.wait(TIMEOUT)
        return applied

    def second() -> Applied:
        with stores[1].transaction() as tx:
            [applied] = apply(tx, [submission("second")], stores[1].cursor_format)
        return applied

    with ThreadPoolExecutor(max_workers=2) as pool:
        first_done = pool.submit(first)
        assert first_in.wait(TIMEOUT)
        second_done = pool.submit(second)
        waiting_for_a_lock(postgres_db, 1)
        commit_first.set()
        assert [result.outcome for result in first_done.result().response.results] == [ACCEPTED]
        assert second_done.result().reused
    assert stores[2].messages("first")
    assert not stores[2].messages("second")


def test_lost_connections_are_opened_again(stores: list[PostgresStore], postgres_db: str) -> None:
    """The server restarted, or a connection was cut: the call that finds its connection gone fails
    with StoreError (nothing of a transaction in it was committed), and the next call connects again."""
    store = stores[0]
    [cursor] = commit(store, report("m-1"))
    assert store.latest_cursor() == cursor  # this thread's reader is connected now
    with psycopg.connect(postgres_db, autocommit=True) as admin:
        cut = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'dlrhub' AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    assert len(cut) >= 2  # the writer and the reader, at least
    with pytest.raises(StoreError):
        store.latest_cursor()
    with pytest.raises(StoreError), store.transaction() as tx:
        put(tx, report("m-2"))
    assert store.latest_cursor() == cursor  # m-2 was not committed
    [later] = commit(store, report("m-2"))
    assert later > cursor
    store.check(write=True)
    assert [change.cursor for change in store.changes(0, 10)] == [cursor, later]


def test_a_database_that_refuses_connections_is_a_store_error_and_asked_again_after_a_backoff(
    postgres_db: str, postgres_url: str
) -> None:
    """Connecting again can fail too (the server is still down): that is a StoreError like any other
    failure, never psycopg's own; until the backoff has passed no call tries again (each fails at once),
    and the store serves again once the database takes connections."""
    now = [0.0]
    store = PostgresStore(postgres_db, clock=lambda: now[0])
    try:
        [cursor] = commit(store, report("m-1"))
        assert store.latest_cursor() == cursor  # this thread's reader is connected now
        with psycopg.connect(postgres_db) as connection:
            name = str(connection.info.dbname)
        database = sql.Identifier(name)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
            for _ in range(2):  # the broken connection, then the refused attempt to connect again
                with pytest.raises(StoreError), store.transaction() as tx:
                    put(tx, report("m-2"))
            with pytest.raises(StoreError):  # the reader's broken connection
                store.latest_cursor()
            with pytest.raises(StoreError, match=r"next attempt to connect is in 0\.1 s"):
                store.latest_cursor()
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(database))
        with pytest.raises(StoreError, match="next attempt to connect"):  # not asked before the backoff
            commit(store, report("m-2"))
        now[0] += Reconnect.FIRST_DELAY
        [later] = commit(store, report("m-2"))
        assert [change.cursor for change in store.changes(0, 10)] == [cursor, later]
    finally:
        store.close()


def test_a_newer_schema_is_refused(postgres_db: str) -> None:
    PostgresStore(postgres_db).close()
    with psycopg.connect(postgres_db, autocommit=True) as connection:
        connection.execute("UPDATE dlrhub_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1} is newer than this dlrhub"):
        PostgresStore(postgres_db)


def test_replicas_starting_together_migrate_once(postgres_db: str) -> None:
    with ThreadPoolExecutor(max_workers=4) as starting:
        opened = list(starting.map(lambda _: PostgresStore(postgres_db), range(4)))
    for store in opened:
        store.close()
    with psycopg.connect(postgres_db) as connection:
        assert connection.execute("SELECT version FROM dlrhub_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_schema_3_gives_every_message_its_channel_and_time_and_indexes_those_awaiting_seen(
    postgres_db: str,
) -> None:
    delivered = S.DELIVERY_STATUS_DELIVERED
    viber = report("g-viber", delivered, seconds=40, source=GMS, channel=Channel.CHANNEL_VIBER)
    untimed = report("g-whatsapp", delivered, source=GMS, channel=Channel.CHANNEL_WHATSAPP)
    untimed.ClearField("event_time")
    sms = report("g-sms", delivered, seconds=40, source=GMS)
    with psycopg.connect(postgres_db) as connection:  # a database that release left at schema 2
        connection.execute("CREATE TABLE dlrhub_schema (version integer NOT NULL)")
        connection.execute("INSERT INTO dlrhub_schema (version) VALUES (2)")
        for migration in MIGRATIONS[:2]:
            migration(connection)
        for cursor, state in enumerate((viber, untimed, sms), start=1):
            connection.execute(
                "INSERT INTO messages (source, message_id, bulk_id, reference, status, report, merge, cursor)"
                " VALUES (%s, %s, '', '', %s, %s, '', %s)",
                (GMS, state.message_id, state.status, state.SerializeToString(), cursor),
            )

    store = PostgresStore(postgres_db)
    try:
        awaiting = store.awaiting_seen(0, (0, 0), 10)
    finally:
        store.close()
    # The event time, else the received time; the SMS message is not awaited.
    assert [(row.message_id, row.delivered_seconds) for row in awaiting] == [
        ("g-viber", BASE_SECONDS + 40),
        ("g-whatsapp", BASE_SECONDS + 10_000),
    ]
    with psycopg.connect(postgres_db) as connection:
        connection.execute("SET enable_seqscan = off")  # a few rows: show that the index can serve it
        plan = connection.execute(f"EXPLAIN {AWAITING_SEEN_QUERY}", (GMS, 0, 0, 0, 10)).fetchall()
    assert any("messages_awaiting_seen" in row[0] for row in plan), plan
    assert not any("Sort" in row[0] for row in plan), plan  # the index's order: no sort


def test_schema_1_messages_get_their_last_change_from_their_latest_report(postgres_db: str) -> None:
    """PG migration 4 (retention): a message's last change is the received time of the report its
    cursor names, read from the history, so that an upgrade can prune what was stored before it."""
    histories = [
        [received(report("old", S.DELIVERY_STATUS_SENT, seconds=1), 100), received(report("old"), 100)],
        [received(report("recent"), 100), received(report("recent", S.DELIVERY_STATUS_SENT), 900)],
    ]
    with psycopg.connect(postgres_db, autocommit=True) as connection:
        with connection.transaction():
            connection.execute("CREATE TABLE dlrhub_schema (version integer NOT NULL)")
            connection.execute("INSERT INTO dlrhub_schema (version) VALUES (1)")
            MIGRATIONS[0](connection)
        for history in histories:
            with connection.transaction():
                row = connection.execute("SELECT pg_current_xact_id()::text").fetchone()
                assert row is not None
                state = None
                for ordinal, incoming in enumerate(history):
                    state = merge(state, incoming)
                    connection.execute(
                        "INSERT INTO reports (ordinal, source, message_id, report, state, raw, digest)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        (
                            ordinal,
                            SSR,
                            incoming.message_id,
                            without_raw(incoming),
                            b"",
                            "{}",
                            digest(incoming),
                        ),
                    )
                assert state is not None
                connection.execute(
                    "INSERT INTO messages (source, message_id, bulk_id, reference, status, report, merge,"
                    " cursor) VALUES (%s, %s, '', '', %s, %s, %s, %s)",
                    (
                        SSR,
                        state.report.message_id,
                        state.report.status,
                        state.report.SerializeToString(),
                        encode_merge(state),
                        postgres.position(int(row[0]), len(history) - 1),
                    ),
                )

    store = PostgresStore(postgres_db)
    try:
        assert store.pruned_through() == 0
        with store.transaction() as tx:
            # "old" last changed at BASE + 100 s, "recent" at BASE + 900 s (its late SENT).
            assert tx.prune_messages(BASE_SECONDS + 500, 10).messages == 1
        assert store.messages("old") == []
        assert [state.message_id for state in store.messages("recent")] == ["recent"]
    finally:
        store.close()


def test_a_prune_never_deletes_a_message_a_writer_has_just_changed(stores: list[PostgresStore]) -> None:
    """The prune takes the writers' message locks, then checks the age again: a report committed
    between its look and its delete keeps the message (and its new history)."""
    pruner, writer = stores[0], stores[1]
    commit(writer, received(report("busy"), 100))
    late = received(report("busy", S.DELIVERY_STATUS_SEEN, seconds=5), 900)
    with ThreadPoolExecutor(max_workers=1) as pool, psycopg.connect(writer.url, autocommit=True) as watcher:
        with writer.transaction() as tx:
            put(tx, late)  # holds the message's lock until it commits
            tx.flush()
            pruned = pool.submit(_prune, pruner, BASE_SECONDS + 500)
            # The prune has chosen "busy" (committed: last changed at 100) and waits for its lock.
            for _ in range(1000):  # 10 s at most
                assert not pruned.done(), "the prune did not wait for the writer's lock"
                if _waiting_for_an_advisory_lock(watcher):
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the prune never waited for the writer's lock")
        assert pruned.result() == 0
    assert [state.status for state in pruner.messages("busy")] == [S.DELIVERY_STATUS_SEEN]
    assert len(pruner.history("busy")) == 2


def _waiting_for_an_advisory_lock(connection: psycopg.Connection[Any]) -> bool:
    row = connection.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    return row is not None and row[0] > 0


def _prune(store: PostgresStore, before: int) -> int:
    with store.transaction() as tx:
        return tx.prune_messages(before, 10).messages
