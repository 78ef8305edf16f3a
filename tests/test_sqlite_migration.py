"""SQLite schema 4: a release-3 database gets report digests, order-independent states rebuilt from
the history, bounded bookkeeping, and one index for both history queries."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import struct
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import sqlite_utils
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import (
    Channel,
    DeliveryReport,
    DeliveryStatus,
    GmsStatusCodes,
    Price,
    RawStatus,
    SentSmsReportStatusCodes,
    Source,
)
from dlrhub.merge import MessageState, digest, merge
from dlrhub.store import SavedResponse, SqliteStore
from dlrhub.store import sqlite as sqlite_store
from dlrhub.store.sqlite import HISTORY_QUERY, MIGRATIONS

S = DeliveryStatus
GMS = Source.SOURCE_GMS
SSR = Source.SOURCE_SENT_SMS_REPORT


def gms(
    status: DeliveryStatus.ValueType, substatus: int, received: int, message_id: str = "g-1"
) -> DeliveryReport:
    """A GMS failure without `time`: ordered by its received time by release 3."""
    return DeliveryReport(
        source=GMS,
        message_id=message_id,
        channel=Channel.CHANNEL_SMS,
        status=status,
        final=True,
        raw=RawStatus(gms=GmsStatusCodes(status=3, substatus=substatus, sent_via="sms")),
        received_time=Timestamp(seconds=1_700_000_000 + received),
        raw_payload=f'{{"message_id": "{message_id}", "status": 3, "substatus": {substatus}}}',
    )


def ssr(status: DeliveryStatus.ValueType, seconds: int, message_id: str, price: str = "") -> DeliveryReport:
    group_id, status_id = {S.DELIVERY_STATUS_SENT: (1, 7), S.DELIVERY_STATUS_DELIVERED: (3, 5)}[status]
    report = DeliveryReport(
        source=SSR,
        message_id=message_id,
        channel=Channel.CHANNEL_SMS,
        status=status,
        final=status == S.DELIVERY_STATUS_DELIVERED,
        raw=RawStatus(sent_sms_report=SentSmsReportStatusCodes(group_id=group_id, id=status_id)),
        event_time=Timestamp(seconds=1_700_000_000 + seconds),
        received_time=Timestamp(seconds=1_700_000_100 + seconds),
        raw_payload=f'{{"messageId": "{message_id}", "t": {seconds}}}',
    )
    if price:
        report.price.CopyFrom(Price(amount=price, currency="EUR"))
    return report


def json_bookkeeping(reports: Sequence[DeliveryReport]) -> bytes:
    """Release 3's first form: every key seen, as JSON (an untimed report keyed by its received time)."""
    keys = [[report.status, report.received_time.ToNanoseconds(), digest(report).hex()] for report in reports]
    return json.dumps({"keys": keys, "suppliers": {}}).encode()


def packed_bookkeeping(reports: Sequence[DeliveryReport]) -> bytes:
    """Release 3's packed form (version 1): every key seen."""
    parts = [struct.pack(">BII", 1, len(reports), 0)]
    for report in reports:
        parts.append(struct.pack(">hqI16s", 40, report.event_time.seconds, 0, digest(report)))
    return b"".join(parts)


@contextlib.contextmanager
def schema(path: Path, version: int) -> Iterator[sqlite3.Connection]:
    """A new file at schema `version`, as the release that stopped there left it, to fill with rows."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for migration in MIGRATIONS[:version]:
            migration(sqlite_utils.Database(connection))
        connection.execute(f"PRAGMA user_version = {version}")
        yield connection
    finally:
        connection.close()


def release_3_database(
    path: Path, messages: Sequence[tuple[Sequence[DeliveryReport], DeliveryReport, bytes]]
) -> None:
    """A schema-3 file holding, per message, its history (in cursor order) and the state and
    bookkeeping release 3 stored for it."""
    with schema(path, 3) as connection:
        for history, state, bookkeeping in messages:
            cursor = 0
            for report in history:
                stored = DeliveryReport()
                stored.CopyFrom(report)
                stored.ClearField("raw_payload")
                cursor = connection.execute(
                    "INSERT INTO reports (source, message_id, report, state, raw) VALUES (?, ?, ?, ?, ?)"
                    " RETURNING cursor",
                    (report.source, report.message_id, stored.SerializeToString(), b"", report.raw_payload),
                ).fetchone()[0]
            connection.execute(
                "INSERT INTO messages (source, message_id, bulk_id, reference, status, report, merge, cursor)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    state.source,
                    state.message_id,
                    state.bulk_id,
                    state.reference,
                    state.status,
                    state.SerializeToString(),
                    bookkeeping,
                    cursor,
                ),
            )


def folded(history: Sequence[DeliveryReport]) -> MessageState:
    state: MessageState | None = None
    for report in history:
        state = merge(state, report)
    assert state is not None
    return state


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


def test_a_release_3_database_is_rebuilt_under_the_order_independent_merge(tmp_path: Path) -> None:
    path = tmp_path / "release3.db"
    # #19.6: two GMS failures without `time`. Release 3 kept the later received one; the greater
    # digest wins now, so receive the smaller-digest one last.
    one, other = gms(S.DELIVERY_STATUS_UNDELIVERED, 35, 0), gms(S.DELIVERY_STATUS_REJECTED, 36, 0)
    smaller, greater = sorted((one, other), key=digest)
    greater.received_time.seconds -= 10
    untimed = [greater, smaller]
    # A second source with the same message id, and a message in the packed form.
    ssr_history = [
        ssr(S.DELIVERY_STATUS_SENT, 1, "g-1", price="0.01"),
        ssr(S.DELIVERY_STATUS_DELIVERED, 2, "g-1"),
    ]
    packed_history = [ssr(S.DELIVERY_STATUS_SENT, 1, "s-2"), ssr(S.DELIVERY_STATUS_DELIVERED, 2, "s-2")]
    release_3_database(
        path,
        [
            (untimed, smaller, json_bookkeeping(untimed)),  # release 3: the later received one won
            (ssr_history, folded(ssr_history).report, json_bookkeeping(ssr_history)),
            (packed_history, folded(packed_history).report, packed_bookkeeping(packed_history)),
        ],
    )
    with sqlite3.connect(path) as connection:
        changes_before = connection.execute(
            "SELECT cursor, source, message_id, report, raw FROM reports"
        ).fetchall()

    store = SqliteStore(path)
    try:
        assert user_version(path) == sqlite_store.SCHEMA_VERSION
        [gms_state, ssr_state] = store.messages("g-1")
        assert gms_state == greater
        assert ssr_state == folded(ssr_history).report
        assert ssr_state.price.amount == "0.01"
        assert store.messages("s-2") == [folded(packed_history).report]
        with store.transaction() as tx:
            for history in (untimed, ssr_history, packed_history):
                source, message_id = history[0].source, history[0].message_id
                assert tx.load_state(source, message_id) == folded(history)
                assert all(tx.is_stored(digest(report)) for report in history)
            # New reports merge into the rebuilt states.
            seen = ssr(S.DELIVERY_STATUS_DELIVERED, 3, "s-2")
            assert not tx.is_stored(digest(seen))
            state = merge(tx.load_state(SSR, "s-2"), seen)
            tx.append(seen, digest(seen), state)
        assert store.messages("s-2")[0].event_time == seen.event_time
    finally:
        store.close()
    with sqlite3.connect(path) as connection:
        changes_after = connection.execute(
            "SELECT cursor, source, message_id, report, raw FROM reports WHERE cursor <= ?",
            (changes_before[-1][0],),
        ).fetchall()
        # The history itself is untouched: the same cursors, reports and raw texts.
        assert changes_after == changes_before
        digests = connection.execute("SELECT digest FROM reports ORDER BY cursor").fetchall()
        assert None not in {row[0] for row in digests}
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute("UPDATE reports SET digest = ? WHERE cursor = 1", (digests[1][0],))


def test_a_report_stored_twice_by_an_older_rule_keeps_its_place_and_is_merged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "twice.db"
    sent, delivered = ssr(S.DELIVERY_STATUS_SENT, 1, "m-1"), ssr(S.DELIVERY_STATUS_DELIVERED, 2, "m-1")
    history = [sent, delivered, sent]
    release_3_database(path, [(history, delivered, json_bookkeeping(history))])

    with caplog.at_level(logging.WARNING, logger=sqlite_store.__name__):
        store = SqliteStore(path)
    try:
        assert store.history("m-1") == history
        assert store.messages("m-1") == [folded([sent, delivered]).report]
    finally:
        store.close()
    assert any("a copy of an earlier report" in record.getMessage() for record in caplog.records)
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT digest FROM reports ORDER BY cursor").fetchall()
    assert [row[0] for row in rows] == [digest(sent), digest(delivered), None]


def test_a_big_migration_goes_in_chunks_and_logs_its_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.db"
    histories = [
        [
            ssr(S.DELIVERY_STATUS_DELIVERED, 2, f"m-{number:02}"),
            ssr(S.DELIVERY_STATUS_SENT, 1, f"m-{number:02}"),
        ]
        for number in range(25)
    ]
    release_3_database(path, [(history, history[0], json_bookkeeping(history)) for history in histories])
    # Chunks of 15 reports: most messages' histories are split between two chunks.
    monkeypatch.setattr(sqlite_store, "MIGRATION_CHUNK", 15)

    with caplog.at_level(logging.INFO, logger=sqlite_store.__name__):
        store = SqliteStore(path)
    try:
        with store.transaction() as tx:
            for history in histories:
                assert tx.load_state(SSR, history[0].message_id) == folded(history)
                assert all(tx.is_stored(digest(report)) for report in history)
    finally:
        store.close()
    progress = [record.getMessage() for record in caplog.records if "schema 4" in record.getMessage()]
    assert progress == [
        "migrating to schema 4: 50 reports to identify and merge again",
        "migrating to schema 4: 15 of 50 reports",
        "migrating to schema 4: 30 of 50 reports",
        "migrating to schema 4: 45 of 50 reports",
        "migrating to schema 4: 50 of 50 reports",
    ]


@pytest.mark.parametrize("source", [0, GMS])
@pytest.mark.parametrize("migrated", [False, True], ids=["new-file", "migrated-file"])
def test_both_history_queries_use_the_message_id_index(tmp_path: Path, source: int, migrated: bool) -> None:
    """#19.3: a history read was a full scan of the reports (227-256 ms at 1M)."""
    path = tmp_path / "plan.db"
    if migrated:
        release_3_database(path, [])
    SqliteStore(path).close()
    with sqlite3.connect(path) as connection:
        plan = connection.execute(f"EXPLAIN QUERY PLAN {HISTORY_QUERY}", ("m-1", source, source)).fetchall()
    details = [row[3] for row in plan]
    assert details == ["SEARCH reports USING INDEX idx_reports_message_id_cursor (message_id=?)"]


def test_answers_saved_without_a_request_digest_are_dropped(tmp_path: Path) -> None:
    """Schema 5: an answer saved by release 4 cannot tell a retry from a reused id."""
    path = tmp_path / "release4.db"
    with schema(path, 4) as connection:
        connection.execute(
            "INSERT INTO requests (request_id, response, created_seconds) VALUES ('old', x'00', 1700000000)"
        )

    store = SqliteStore(path)
    try:
        with store.transaction() as tx:
            assert tx.find_response("old", 0) is None
            tx.save_response("old", SavedResponse(b"digest", b"answer"), 1_700_000_100)
        with store.transaction() as tx:
            assert tx.find_response("old", 0) == SavedResponse(b"digest", b"answer")
    finally:
        store.close()


def test_open_quarantined_items_kept_more_than_once_become_one_counted_row(tmp_path: Path) -> None:
    """Schema 6: the rows of a provider's retries of one bad item merge into the first."""
    path = tmp_path / "release5.db"
    raw = '{"results": [{"to": "41793026727"}]}'
    rows = [  # (received seconds, nanos, request id, raw, resolved)
        (1_700_000_000, 1, "try-1", raw, None),
        (1_700_000_010, 2, "try-2", raw, 1_700_000_011),  # resolved already: stays as it is
        (1_700_000_020, 3, "try-3", raw, None),
        (1_700_000_030, 4, "other", raw + " ", None),  # another text: another item
        (1_700_000_040, 5, "try-4", raw, None),
    ]
    with schema(path, 5) as connection:
        for seconds, nanos, request_id, text, resolved in rows:
            connection.execute(
                "INSERT INTO quarantine (received_seconds, received_nanos, request_id, field, reason,"
                " description, raw, format, whole_payload, resolved_seconds)"
                " VALUES (?, ?, ?, 'results[0].messageId', 'MISSING_FIELD', 'required', ?, 2, 0, ?)",
                (seconds, nanos, request_id, text, resolved),
            )

    store = SqliteStore(path)
    try:
        kept = [
            (item.request_id, item.received_count, item.last_received_seconds)
            for _, item in store.quarantined(0, 10)
        ]
        assert kept == [("try-1", 3, 1_700_000_040), ("try-2", 1, None), ("other", 1, None)]
        [(first_id, first)] = store.quarantined(0, 1)
        assert first.last_received_nanos == 5
        assert store.open_quarantine_count() == 2
        # The row counts the next copy too.
        with store.transaction() as tx:
            tx.quarantine(replace(first, received_seconds=1_700_000_050, request_id="try-5"))
        [(again_id, again)] = store.quarantined(0, 1)
        assert (again_id, again.received_count, again.last_received_seconds) == (first_id, 4, 1_700_000_050)
    finally:
        store.close()


def test_schema_8_gives_every_message_its_channel_and_time_and_indexes_those_awaiting_seen(
    tmp_path: Path,
) -> None:
    path = tmp_path / "release-7.db"
    viber = gms(S.DELIVERY_STATUS_DELIVERED, 23, received=50, message_id="g-viber")
    viber.channel = Channel.CHANNEL_VIBER
    viber.event_time.FromSeconds(1_700_000_040)
    untimed = gms(S.DELIVERY_STATUS_DELIVERED, 23, received=60, message_id="g-whatsapp")
    untimed.channel = Channel.CHANNEL_WHATSAPP
    sms = gms(S.DELIVERY_STATUS_DELIVERED, 23, received=70, message_id="g-sms")
    with schema(path, 7) as connection:
        for cursor, state in enumerate((viber, untimed, sms), start=1):
            connection.execute(
                "INSERT INTO messages (source, message_id, bulk_id, reference, status, report, merge, cursor)"
                " VALUES (?, ?, '', '', ?, ?, ?, ?)",
                (GMS, state.message_id, state.status, state.SerializeToString(), b"", cursor),
            )

    store = SqliteStore(path)
    try:
        awaiting = store.awaiting_seen(0, (0, 0), 10)
    finally:
        store.close()
    # The event time, else the received time; the SMS message is not awaited.
    assert [(row.message_id, row.delivered_seconds) for row in awaiting] == [
        ("g-viber", 1_700_000_040),
        ("g-whatsapp", 1_700_000_060),
    ]
    connection = sqlite3.connect(path)
    try:
        plan = connection.execute(
            f"EXPLAIN QUERY PLAN {sqlite_store.AWAITING_SEEN_QUERY}", (GMS, 0, 0, 0, 10)
        ).fetchall()
    finally:
        connection.close()
    assert any("idx_messages_awaiting_seen" in str(row[-1]) for row in plan), plan
    assert not any("TEMP B-TREE" in str(row[-1]) for row in plan), plan  # the index's order: no sort


def test_messages_get_their_last_change_from_their_latest_report(tmp_path: Path) -> None:
    """Schema 9 (retention): a message's last change is the received time of the report its cursor
    names, read from the history, so that an upgrade can prune what was stored before it."""
    path = tmp_path / "release6.db"
    histories = {
        "old": [ssr(S.DELIVERY_STATUS_SENT, 1, "old"), ssr(S.DELIVERY_STATUS_DELIVERED, 2, "old")],
        "recent": [ssr(S.DELIVERY_STATUS_DELIVERED, 1, "recent"), ssr(S.DELIVERY_STATUS_SENT, 900, "recent")],
    }
    with schema(path, 6) as connection:
        for history in histories.values():
            state = folded(history)
            cursor = 0
            for report in history:
                stored = DeliveryReport()
                stored.CopyFrom(report)
                stored.ClearField("raw_payload")
                cursor = connection.execute(
                    "INSERT INTO reports (source, message_id, report, state, raw, digest)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING cursor",
                    (
                        SSR,
                        report.message_id,
                        stored.SerializeToString(),
                        b"",
                        report.raw_payload,
                        digest(report),
                    ),
                ).fetchone()[0]
            connection.execute(
                "INSERT INTO messages (source, message_id, bulk_id, reference, status, report, merge, cursor)"
                " VALUES (?, ?, '', '', ?, ?, ?, ?)",
                (
                    SSR,
                    state.report.message_id,
                    state.report.status,
                    state.report.SerializeToString(),
                    b"",
                    cursor,
                ),
            )

    store = SqliteStore(path)
    try:
        assert user_version(path) == sqlite_store.SCHEMA_VERSION
        assert store.pruned_through() == 0
        with store.transaction() as tx:
            # "old" last changed at 1_700_000_102, "recent" at 1_700_001_000 (its late SENT).
            assert tx.prune_messages(1_700_000_500, 10).messages == 1
        assert store.messages("old") == []
        assert store.history("recent") == histories["recent"]
    finally:
        store.close()
