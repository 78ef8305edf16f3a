"""The Store contract (dlrhub/store/base.py), written once and run against every engine.

To add an engine, add one line to ENGINES: a function that opens the engine's store for a test (for
the same test and directory again, on the same data). The tests at the end are about SQLite itself
(its schema version).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
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
from dlrhub.store import SqliteStore, StoreError
from dlrhub.store.base import (
    Change,
    Pruned,
    QuarantinedItem,
    SavedResponse,
    Selector,
    StagedBody,
    Store,
    Transaction,
)
from dlrhub.store.postgres import PostgresStore
from dlrhub.store.sqlite import SCHEMA_VERSION

S = DeliveryStatus
GMS = Source.SOURCE_GMS
SSR = Source.SOURCE_SENT_SMS_REPORT
BASE_SECONDS = 1_700_000_000
NOW = BASE_SECONDS + 50_000
# A page's byte limit that no page here comes near.
ANY_SIZE = 1 << 30

# Opens an engine's store for a test (the same test and directory again: the same data).
Opener = Callable[[pytest.FixtureRequest, Path], Store]


def _open_sqlite(request: pytest.FixtureRequest, directory: Path) -> Store:
    return SqliteStore(directory / "dlrhub.db")


def _open_postgres(request: pytest.FixtureRequest, directory: Path) -> Store:
    return PostgresStore(request.getfixturevalue("postgres_db"))  # the test's own database


# One line per engine.
ENGINES = [
    pytest.param(_open_sqlite, id="sqlite"),
    pytest.param(_open_postgres, id="postgres"),
]


@dataclass
class Handle:
    """An open store of one engine, which a test can close and open again on the same data."""

    opener: Opener
    request: pytest.FixtureRequest
    directory: Path
    store: Store

    def reopen(self) -> Store:
        self.store.close()
        self.store = self.opener(self.request, self.directory)
        return self.store


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Handle]:
    opener: Opener = request.param
    handle = Handle(opener, request, tmp_path, opener(request, tmp_path))
    try:
        yield handle
    finally:
        handle.store.close()


# --- helpers -------------------------------------------------------------------------------------

SSR_CODES: dict[int, tuple[int, int]] = {
    S.DELIVERY_STATUS_ACCEPTED: (1, 26),
    S.DELIVERY_STATUS_SENT: (1, 7),
    S.DELIVERY_STATUS_UNDELIVERED: (2, 9),
    S.DELIVERY_STATUS_DELIVERED: (3, 5),
    S.DELIVERY_STATUS_EXPIRED: (4, 15),
    S.DELIVERY_STATUS_REJECTED: (5, 6),
}
GMS_CODES: dict[int, tuple[int, int]] = {
    S.DELIVERY_STATUS_SENT: (1, 11),
    S.DELIVERY_STATUS_DELIVERED: (2, 23),
    S.DELIVERY_STATUS_UNDELIVERED: (3, 35),
    S.DELIVERY_STATUS_SEEN: (2, 0),  # GMS publishes no code for "seen": the store stores any codes
}


def at(seconds: int) -> Timestamp:
    return Timestamp(seconds=BASE_SECONDS + seconds)


def report(
    message_id: str,
    status: DeliveryStatus.ValueType = S.DELIVERY_STATUS_DELIVERED,
    *,
    seconds: int = 0,
    source: Source.ValueType = SSR,
    bulk_id: str = "",
    reference: str = "",
    price: str = "",
    channel: Channel.ValueType = Channel.CHANNEL_SMS,
) -> DeliveryReport:
    """A normalised report, as the normalisers would produce it (with its original text)."""
    if source == SSR and status == S.DELIVERY_STATUS_SEEN:
        raw = RawStatus(sent_sms_report=SentSmsReportStatusCodes(seen=True))
    elif source == SSR:
        group_id, status_id = SSR_CODES[status]
        raw = RawStatus(sent_sms_report=SentSmsReportStatusCodes(group_id=group_id, id=status_id))
    else:
        gms_status, substatus = GMS_CODES[status]
        raw = RawStatus(gms=GmsStatusCodes(status=gms_status, substatus=substatus, sent_via="sms"))
    result = DeliveryReport(
        source=source,
        message_id=message_id,
        bulk_id=bulk_id,
        reference=reference,
        recipient="+41793026727",
        channel=channel,
        status=status,
        final=status not in (S.DELIVERY_STATUS_ACCEPTED, S.DELIVERY_STATUS_SENT),
        event_time=at(seconds),
        received_time=at(10_000),
        raw=raw,
        raw_payload=f'{{"messageId": "{message_id}", "t": {seconds}, "note": "caf\u00e9 \u2713"}}',
    )
    if price:
        result.price.CopyFrom(Price(amount=price, currency="EUR"))
    return result


def put(tx: Transaction, incoming: DeliveryReport) -> tuple[int, MessageState]:
    """What Ingest does with one new report: load, merge, append."""
    assert not tx.is_stored(digest(incoming))
    state = merge(tx.load_state(incoming.source, incoming.message_id), incoming)
    return tx.append(incoming, digest(incoming), state), state


def commit(store: Store, *reports: DeliveryReport) -> list[int]:
    with store.transaction() as tx:
        return [put(tx, incoming)[0] for incoming in reports]


def item(number: int) -> QuarantinedItem:
    return QuarantinedItem(
        raw=f'{{"broken": {number},',
        field=f"results[{number}].messageId",
        reason="MISSING_FIELD",
        description=f"results[{number}].messageId is required",
        received_seconds=BASE_SECONDS + number,
        received_nanos=number * 1_000_000 + 7,
        request_id=f"request-{number}",
    )


def all_changes(store: Store) -> list[Change]:
    return store.changes(0, 1_000_000)


def page_ids(states: list[DeliveryReport]) -> list[str]:
    return [state.message_id for state in states]


def staged_body(number: int, body: bytes = b"") -> StagedBody:
    return StagedBody(
        body=body or f'{{"results": [{number}]}}'.encode(),
        content_type="application/json; charset=unicode_escape",
        format=2,
        default_channel=number % 3,
        received_seconds=BASE_SECONDS + number,
        received_nanos=number * 1000,
    )


def saved(response: bytes) -> SavedResponse:
    """An answer saved for a request (its digest made up from the answer)."""
    return SavedResponse(b"request:" + response, response)


class Boom(Exception):
    pass


# --- transactions --------------------------------------------------------------------------------


def test_a_committed_transaction_is_visible_whole_and_only_after_commit(engine: Handle) -> None:
    store = engine.store
    first = report("m-1", S.DELIVERY_STATUS_SENT, seconds=1, bulk_id="B")
    second = report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=2, bulk_id="B")
    third = report("m-2", S.DELIVERY_STATUS_EXPIRED, seconds=3, bulk_id="B")
    with ThreadPoolExecutor(max_workers=1) as reader, store.transaction() as tx:
        cursors = [put(tx, incoming)[0] for incoming in (first, second, third)]
        tx.quarantine(item(1))
        tx.save_response("r-1", saved(b"answer"), NOW)

        # Readers (on other threads, as in the service) see none of it before the commit.
        def snapshot() -> tuple[object, ...]:
            return (
                store.messages("m-1"),
                store.history("m-1"),
                store.messages_by(Selector.BULK_ID, "B", 0, 0, 10, ANY_SIZE).total,
                store.changes(0, 10),
                store.latest_cursor(),
                store.quarantined(0, 10),
            )

        assert reader.submit(snapshot).result() == ([], [], 0, [], 0, [])

    assert [state.status for state in store.messages("m-1")] == [S.DELIVERY_STATUS_DELIVERED]
    assert [state.status for state in store.messages("m-2")] == [S.DELIVERY_STATUS_EXPIRED]
    assert store.history("m-1") == [first, second]
    assert [change.cursor for change in all_changes(store)] == cursors
    assert store.latest_cursor() == cursors[-1]
    assert [quarantined for _, quarantined in store.quarantined(0, 10)] == [item(1)]
    with store.transaction() as tx:
        assert tx.find_response("r-1", NOW) == saved(b"answer")


def test_a_transaction_that_raises_is_rolled_back_whole(engine: Handle) -> None:
    store = engine.store
    before = report("m-1", S.DELIVERY_STATUS_SENT, seconds=1, bulk_id="B", reference="R")
    [cursor] = commit(store, before)
    with store.transaction() as tx:
        tx.quarantine(item(1))
        tx.save_response("kept", saved(b"kept"), NOW)
        staged_id = tx.stage(staged_body(1))
    changes_before = all_changes(store)
    quarantined_before = store.quarantined(0, 10)

    def failing() -> None:
        with store.transaction() as tx:
            put(tx, report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=2, bulk_id="B", reference="R"))
            put(tx, report("m-2", S.DELIVERY_STATUS_DELIVERED, seconds=2, bulk_id="B", reference="R"))
            tx.quarantine(item(2))
            tx.save_response("lost", saved(b"lost"), NOW)
            tx.unstage(staged_id)
            tx.stage(staged_body(2))
            raise Boom

    with pytest.raises(Boom):
        failing()

    assert [state.status for state in store.messages("m-1")] == [S.DELIVERY_STATUS_SENT]
    assert store.history("m-1") == [before]
    assert store.messages("m-2") == []
    assert store.history("m-2") == []
    page = store.messages_by(Selector.BULK_ID, "B", 0, 0, 10, ANY_SIZE)
    assert page_ids(page.states) == ["m-1"]
    assert (page.total, page.status_counts) == (1, {S.DELIVERY_STATUS_SENT: 1})
    assert page_ids(store.messages_by(Selector.REFERENCE, "R", 0, 0, 10, ANY_SIZE).states) == ["m-1"]
    assert all_changes(store) == changes_before
    assert store.latest_cursor() == cursor
    assert store.quarantined(0, 10) == quarantined_before
    with store.transaction() as tx:
        assert tx.find_response("lost", NOW) is None
        assert tx.find_response("kept", NOW) == saved(b"kept")
        assert tx.staged(0, 10) == [replace(staged_body(1), id=staged_id)]
        # The merge bookkeeping and the digests were rolled back too.
        state = tx.load_state(SSR, "m-1")
        assert state is not None
        assert state.winner == merge(None, before).winner
        rolled_back = report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=2, bulk_id="B", reference="R")
        assert not tx.is_stored(digest(rolled_back))
        assert tx.is_stored(digest(before))

    # The store goes on working after a rollback.
    [after] = commit(store, report("m-2", S.DELIVERY_STATUS_DELIVERED, seconds=5))
    assert after > cursor
    assert [state.status for state in store.messages("m-2")] == [S.DELIVERY_STATUS_DELIVERED]


def test_load_state_sees_writes_earlier_in_the_same_transaction(engine: Handle) -> None:
    store = engine.store
    with store.transaction() as tx:
        assert tx.load_state(SSR, "m-1") is None
        _, first = put(tx, report("m-1", S.DELIVERY_STATUS_SENT, seconds=1, price="0.0075"))
        assert tx.load_state(SSR, "m-1") == first
        _, second = put(tx, report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=2))
        seen = tx.load_state(SSR, "m-1")
        assert seen == second
        assert seen.report.status == S.DELIVERY_STATUS_DELIVERED
        assert seen.report.price.amount == "0.0075"  # from the earlier report of this transaction
        assert seen.suppliers["price"] == first.winner
        # Another source's message with the same id is another message.
        assert tx.load_state(GMS, "m-1") is None
        # A duplicate of a report appended in this transaction is recognised.
        assert tx.is_stored(digest(report("m-1", S.DELIVERY_STATUS_SENT, seconds=1, price="0.0075")))
        assert not tx.is_stored(digest(report("m-1", S.DELIVERY_STATUS_SENT, seconds=1)))
    with store.transaction() as tx:
        assert tx.load_state(SSR, "m-1") == second


def test_prefetch_is_a_hint_that_changes_no_answer(engine: Handle) -> None:
    store = engine.store
    stored = report("m-1", S.DELIVERY_STATUS_SENT, seconds=1)
    commit(store, stored)
    later = report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=2)
    new = report("m-2", S.DELIVERY_STATUS_DELIVERED, seconds=2)
    with store.transaction() as tx:
        tx.prefetch({(SSR, "m-1"), (SSR, "m-2"), (GMS, "m-1")}, {digest(stored), digest(later), digest(new)})
        assert tx.is_stored(digest(stored))
        assert not tx.is_stored(digest(later))
        assert tx.load_state(GMS, "m-1") is None
        _, state = put(tx, later)
        # Writes after the prefetch are seen.
        assert tx.is_stored(digest(later))
        assert tx.load_state(SSR, "m-1") == state
        _, created = put(tx, new)
        assert tx.load_state(SSR, "m-2") == created
        # So are messages and digests it did not name.
        other = report("m-3", S.DELIVERY_STATUS_SENT, seconds=1)
        assert tx.load_state(SSR, "m-3") is None
        assert not tx.is_stored(digest(other))
        put(tx, other)
        assert tx.is_stored(digest(other))
    assert [state.status for state in store.messages("m-1")] == [S.DELIVERY_STATUS_DELIVERED]


def test_a_digest_is_stored_once(engine: Handle) -> None:
    """The unique key under is_stored: appending a stored digest fails, and nothing of the
    transaction is kept."""
    store = engine.store
    first = report("m-1", S.DELIVERY_STATUS_SENT, seconds=1)
    [cursor] = commit(store, first)

    def again() -> None:
        with store.transaction() as tx:
            put(tx, report("m-2", S.DELIVERY_STATUS_SENT, seconds=1))
            retried = report("m-1", S.DELIVERY_STATUS_SENT, seconds=1)
            tx.append(retried, digest(retried), merge(tx.load_state(SSR, "m-1"), retried))

    with pytest.raises(StoreError):
        again()
    assert store.latest_cursor() == cursor
    assert store.history("m-1") == [first]
    assert store.messages("m-2") == []


def test_reads_from_another_thread_see_a_commit_from_the_writer_thread(engine: Handle) -> None:
    store = engine.store
    with ThreadPoolExecutor(max_workers=1) as writer, ThreadPoolExecutor(max_workers=1) as reader:
        assert reader.submit(store.latest_cursor).result() == 0
        [cursor] = writer.submit(commit, store, report("m-1")).result()
        assert reader.submit(store.latest_cursor).result() == cursor
        assert reader.submit(store.messages, "m-1").result()[0].message_id == "m-1"


# --- cursors -------------------------------------------------------------------------------------


def test_cursors_are_strictly_increasing_and_never_reused(engine: Handle) -> None:
    store = engine.store
    committed: list[int] = []
    committed += commit(store, report("m-1", seconds=1), report("m-2", seconds=1), report("m-3", seconds=1))
    committed += commit(store, report("m-1", S.DELIVERY_STATUS_SENT, seconds=0))

    def failing() -> None:
        with store.transaction() as tx:
            rolled_back = put(tx, report("m-4", seconds=1))[0]
            assert rolled_back > committed[-1]
            raise Boom

    with pytest.raises(Boom):
        failing()
    committed += commit(store, report("m-5", seconds=1))

    store = engine.reopen()
    assert store.latest_cursor() == committed[-1]
    committed += commit(store, report("m-6", seconds=1), report("m-1", S.DELIVERY_STATUS_SEEN, seconds=9))

    assert committed == sorted(committed)
    assert len(set(committed)) == len(committed)
    assert [change.cursor for change in all_changes(store)] == committed
    assert store.latest_cursor() == committed[-1]
    assert "m-4" not in {change.report.message_id for change in all_changes(store)}


def test_latest_cursor(engine: Handle) -> None:
    store = engine.store
    assert store.latest_cursor() == 0
    cursors = commit(store, report("m-1"), report("m-2"))
    assert store.latest_cursor() == max(cursors)
    with store.transaction() as tx:
        put(tx, report("m-3"))
        assert store.latest_cursor() == max(cursors)  # not committed yet
    assert store.latest_cursor() > max(cursors)


def test_committed_cursor_is_the_greatest_committed_one(engine: Handle) -> None:
    """One writer: committed_cursor is latest_cursor (PostgreSQL with several writers:
    test_postgres_store.py)."""
    store = engine.store
    assert store.committed_cursor() == 0
    [cursor] = commit(store, report("m-1"))
    assert store.committed_cursor() == store.latest_cursor() == cursor
    with store.transaction() as tx:
        put(tx, report("m-2"))
        assert store.committed_cursor() == cursor  # not committed yet
    assert store.committed_cursor() == store.latest_cursor() > cursor


def test_a_cursor_is_written_and_read_back_by_its_engine_only(engine: Handle) -> None:
    store = engine.store
    [cursor] = commit(store, report("m-1"))
    cursors = store.cursor_format
    assert cursors.parse(cursors.format(cursor)) == cursor
    assert cursors.parse(cursors.format(0)) == 0
    other = {SqliteStore.cursor_format, PostgresStore.cursor_format} - {cursors}
    assert len(other) == 1
    assert other.pop().parse(cursors.format(cursor)) is None  # the other engine's cursor
    text = cursors.format(cursor)
    for malformed in ("", "-1", "1e3", "12a", " 12", "\u0661", text + "x", cursors.format(1 << 63)):
        assert cursors.parse(malformed) is None, malformed


# --- reads ---------------------------------------------------------------------------------------


def test_messages_and_history_by_message_id_and_source(engine: Handle) -> None:
    store = engine.store
    gms_sent = report("shared", S.DELIVERY_STATUS_SENT, seconds=1, source=GMS)
    ssr_delivered = report("shared", S.DELIVERY_STATUS_DELIVERED, seconds=2, source=SSR)
    gms_delivered = report("shared", S.DELIVERY_STATUS_DELIVERED, seconds=3, source=GMS)
    other = report("other", S.DELIVERY_STATUS_SENT, seconds=1, source=GMS)
    with store.transaction() as tx:
        states: dict[int, MessageState] = {}
        for incoming in (gms_sent, ssr_delivered, other, gms_delivered):
            _, state = put(tx, incoming)
            if incoming.message_id == "shared":
                states[incoming.source] = state

    # One state per source, GMS before SentSMSReport.
    assert store.messages("shared") == [states[GMS].report, states[SSR].report]
    assert store.messages("shared", GMS) == [states[GMS].report]
    assert store.messages("shared", SSR) == [states[SSR].report]
    assert store.messages("shared", GMS)[0].status == S.DELIVERY_STATUS_DELIVERED
    assert store.messages("unknown") == []
    assert store.messages("other", SSR) == []

    # Every distinct report in the order stored, with its original text byte for byte.
    assert store.history("shared") == [gms_sent, ssr_delivered, gms_delivered]
    assert store.history("shared")[0].raw_payload == gms_sent.raw_payload
    assert store.history("shared", GMS) == [gms_sent, gms_delivered]
    assert store.history("shared", SSR) == [ssr_delivered]
    assert store.history("unknown") == []


@pytest.mark.parametrize("column", [Selector.BULK_ID, Selector.REFERENCE])
def test_messages_by_pages_with_totals_and_status_counts(engine: Handle, column: Selector) -> None:
    store = engine.store

    def in_set(message_id: str, status: DeliveryStatus.ValueType, seconds: int = 1) -> DeliveryReport:
        return report(message_id, status, seconds=seconds, **{column: "wanted"})  # type: ignore[arg-type]

    statuses = [
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_SENT,
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_EXPIRED,
        S.DELIVERY_STATUS_DELIVERED,
        S.DELIVERY_STATUS_REJECTED,
        S.DELIVERY_STATUS_SENT,
    ]
    wanted = [f"m-{number}" for number in range(len(statuses))]
    commit(
        store,
        report("noise-1", **{column: "other"}),  # type: ignore[arg-type]
        *[in_set(message_id, status) for message_id, status in zip(wanted[:4], statuses, strict=False)],
        report("noise-2", S.DELIVERY_STATUS_SENT),
        *[in_set(message_id, status) for message_id, status in zip(wanted[4:], statuses[4:], strict=True)],
    )
    expected_counts = dict(Counter(statuses))

    seen: list[str] = []
    after = 0
    pages = 0
    while True:
        page = store.messages_by(column, "wanted", 0, after, 3, ANY_SIZE)
        pages += 1
        assert len(page.states) <= 3
        assert page.total == len(wanted)
        assert page.status_counts == expected_counts
        seen += page_ids(page.states)
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == wanted  # stable order: the order the messages were first stored
    assert pages == 3

    # Keyset paging: a message new since the first page appears at the end, and a message whose
    # state changes keeps its place (and moves between status counts).
    first = store.messages_by(column, "wanted", 0, 0, 3, ANY_SIZE)
    assert first.next_after is not None
    commit(store, in_set("m-new", S.DELIVERY_STATUS_SENT), in_set("m-0", S.DELIVERY_STATUS_SEEN, seconds=9))
    rest: list[str] = []
    after = first.next_after
    while True:
        page = store.messages_by(column, "wanted", 0, after, 3, ANY_SIZE)
        rest += page_ids(page.states)
        if page.next_after is None:
            break
        after = page.next_after
    assert page_ids(first.states) + rest == [*wanted, "m-new"]
    counts = store.messages_by(column, "wanted", 0, 0, 1, ANY_SIZE).status_counts
    assert counts == {
        **expected_counts,
        S.DELIVERY_STATUS_DELIVERED: 2,
        S.DELIVERY_STATUS_SENT: 3,
        S.DELIVERY_STATUS_SEEN: 1,
    }

    # A page holding exactly the rest has no next position.
    whole = store.messages_by(column, "wanted", 0, 0, len(wanted) + 1, ANY_SIZE)
    assert (len(whole.states), whole.next_after) == (len(wanted) + 1, None)

    # Unknown value: an empty page.
    empty = store.messages_by(column, "unknown", 0, 0, 3, ANY_SIZE)
    assert (empty.states, empty.next_after, empty.total, empty.status_counts) == ([], None, 0, {})


def test_messages_by_stops_a_page_at_max_bytes(engine: Handle) -> None:
    store = engine.store
    ids = [f"m-{number}" for number in range(6)]
    commit(store, *(report(message_id, bulk_id="B") for message_id in ids))
    size = store.messages_by(Selector.BULK_ID, "B", 0, 0, 1, ANY_SIZE).states[0].ByteSize()
    assert all(
        state.ByteSize() == size
        for state in store.messages_by(Selector.BULK_ID, "B", 0, 0, 10, ANY_SIZE).states
    )

    seen: list[str] = []
    after = 0
    while True:  # room for two and a half states: two a page, though six are allowed by count
        page = store.messages_by(Selector.BULK_ID, "B", 0, after, 6, size * 5 // 2)
        assert len(page.states) == 2
        assert page.total == len(ids)
        seen += page_ids(page.states)
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == ids
    # A state larger than the limit still makes a page of its own.
    tiny = store.messages_by(Selector.BULK_ID, "B", 0, 0, 6, 1)
    assert (page_ids(tiny.states), tiny.next_after is not None) == (["m-0"], True)


def test_messages_by_filters_by_source(engine: Handle) -> None:
    store = engine.store
    commit(
        store,
        report("g-1", source=GMS, reference="R"),
        report("s-1", S.DELIVERY_STATUS_SENT, source=SSR, reference="R"),
        report("g-2", S.DELIVERY_STATUS_SENT, source=GMS, reference="R"),
    )
    gms_page = store.messages_by(Selector.REFERENCE, "R", GMS, 0, 10, ANY_SIZE)
    assert (page_ids(gms_page.states), gms_page.total) == (["g-1", "g-2"], 2)
    assert gms_page.status_counts == {S.DELIVERY_STATUS_DELIVERED: 1, S.DELIVERY_STATUS_SENT: 1}
    ssr_page = store.messages_by(Selector.REFERENCE, "R", SSR, 0, 10, ANY_SIZE)
    assert (page_ids(ssr_page.states), ssr_page.total) == (["s-1"], 1)
    assert page_ids(store.messages_by(Selector.REFERENCE, "R", 0, 0, 10, ANY_SIZE).states) == [
        "g-1",
        "s-1",
        "g-2",
    ]


def test_changes_in_cursor_order_with_the_state_after_each(engine: Handle) -> None:
    store = engine.store
    sent = report("m-1", S.DELIVERY_STATUS_SENT, seconds=1, price="0.01")
    delivered = report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=3)
    late_accepted = report("m-1", S.DELIVERY_STATUS_ACCEPTED, seconds=0)  # out of order: changes nothing
    other = report("m-2", S.DELIVERY_STATUS_EXPIRED, seconds=2)
    with store.transaction() as tx:
        appended = [(*put(tx, incoming), incoming) for incoming in (sent, delivered)]
    with store.transaction() as tx:
        appended += [(*put(tx, incoming), incoming) for incoming in (other, late_accepted)]

    changes = all_changes(store)
    assert [change.cursor for change in changes] == [cursor for cursor, _, _ in appended]
    for change, (_, state, incoming) in zip(changes, appended, strict=True):
        assert change.report == incoming  # with its original text
        assert change.state == state.report  # the snapshot right after it, not the current state
    assert changes[0].state.status == S.DELIVERY_STATUS_SENT
    assert changes[1].state.status == S.DELIVERY_STATUS_DELIVERED
    assert changes[1].state.price.amount == "0.01"
    assert changes[3].report.status == S.DELIVERY_STATUS_ACCEPTED
    assert changes[3].state.status == S.DELIVERY_STATUS_DELIVERED

    cursors = [change.cursor for change in changes]
    assert [change.cursor for change in store.changes(cursors[0], 2)] == cursors[1:3]
    assert [change.cursor for change in store.changes(cursors[1], 100)] == cursors[2:]
    assert [change.cursor for change in store.changes(0, 1)] == cursors[:1]
    assert store.changes(cursors[-1], 100) == []
    assert store.changes(cursors[-1] + 1000, 100) == []


def test_any_text_is_kept_as_given(engine: Handle) -> None:
    """NUL and backslashes in ids and text (valid UTF-8, and valid JSON as \\u0000; PostgreSQL's
    text cannot hold NUL): each value is its own, and comes back as given."""
    store = engine.store
    odd = ["a\x00b", "a\\0b", "a\\\\0b", "a\\", "\x00", "a0b"]
    reports = [report(text, bulk_id=text, reference=text) for text in odd]
    for made in reports:
        made.raw_payload = f"{made.message_id}\x00 \\"
    items = [replace(item(number), raw=text, field=text, description=text) for number, text in enumerate(odd)]
    with store.transaction() as tx:
        for incoming in reports:
            put(tx, incoming)
        for quarantined in items:
            tx.quarantine(quarantined)
        tx.save_response("r\x00", saved(b"nul"), NOW)
    with store.transaction() as tx:
        assert tx.find_response("r\x00", NOW) == saved(b"nul")
        assert tx.find_response("r\\0", NOW) is None
        assert [tx.load_state(SSR, text).report.message_id for text in odd] == odd  # type: ignore[union-attr]
    for text, incoming in zip(odd, reports, strict=True):
        assert page_ids(store.messages(text)) == [text]
        assert store.history(text) == [incoming]
        for selector in Selector:
            assert page_ids(store.messages_by(selector, text, 0, 0, 10, ANY_SIZE).states) == [text]
    assert [change.report for change in all_changes(store)] == reports
    assert [quarantined for _, quarantined in store.quarantined(0, 10)] == items


# --- quarantine and saved responses --------------------------------------------------------------


def test_quarantine_round_trip(engine: Handle) -> None:
    store = engine.store
    assert store.quarantined(0, 10) == []
    odd = QuarantinedItem(
        raw='{"extra_id": AD-6640-7006", "note": "\u00fcml\u00e4ut \U0001f600"}',
        field="",
        reason="INVALID_JSON",
        description="invalid JSON: line 1 column 14",
        received_seconds=BASE_SECONDS,
    )
    with store.transaction() as tx:
        tx.quarantine(item(1))
        tx.quarantine(odd)
    with store.transaction() as tx:
        tx.quarantine(item(3))

    kept = store.quarantined(0, 10)
    assert [quarantined for _, quarantined in kept] == [item(1), odd, item(3)]
    ids = [number for number, _ in kept]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert store.quarantined(ids[0], 10) == kept[1:]
    assert store.quarantined(0, 2) == kept[:2]
    assert store.quarantined(ids[-1], 10) == []
    # Quarantine is not history.
    assert all_changes(store) == []


def test_the_same_open_item_is_counted_not_kept_again(engine: Handle) -> None:
    """#19.11: a provider retrying a partly bad batch 20 times made 20 open rows."""
    store = engine.store
    first = item(1)
    # Received again later, under another request id (and worded otherwise): the same item.
    again = replace(first, received_seconds=first.received_seconds + 60, received_nanos=5, request_id="retry")
    distinct = [
        replace(first, reason="INVALID_VALUE"),
        replace(first, field="results[2].messageId"),
        replace(first, whole_payload=True),
        replace(first, format=1),
        replace(first, raw=first.raw + " "),
    ]
    with store.transaction() as tx:
        tx.quarantine(first)
        tx.quarantine(again)
    with store.transaction() as tx:
        tx.quarantine(replace(again, received_seconds=again.received_seconds + 60, description="reworded"))
        for other in distinct:
            tx.quarantine(other)

    kept = store.quarantined(0, 10)
    counted = replace(
        first, received_count=3, last_received_seconds=first.received_seconds + 120, last_received_nanos=5
    )
    assert [quarantined for _, quarantined in kept] == [counted, *distinct]
    assert counted.last_received_time() == Timestamp(seconds=first.received_seconds + 120, nanos=5)
    assert first.last_received_time() == first.received_time()
    assert store.open_quarantine_count() == 6

    # Once resolved, the same item received again is open again, as a new row.
    with store.transaction() as tx:
        tx.resolve_quarantined(kept[0][0], NOW)
        tx.quarantine(first)
    resolved, *_, reopened = store.quarantined(0, 10)
    assert resolved == (kept[0][0], replace(counted, resolved_seconds=NOW))
    assert reopened[1] == first
    assert reopened[0] > kept[-1][0]
    assert store.open_quarantine_count() == 6


def test_an_items_default_channel_is_kept_and_tells_it_apart(engine: Handle) -> None:
    store = engine.store
    whatsapp = replace(item(1), default_channel=3)
    with store.transaction() as tx:
        tx.quarantine(item(1))
        tx.quarantine(whatsapp)  # the same text from a WhatsApp endpoint: another item
        tx.quarantine(whatsapp)
    kept = [quarantined for _, quarantined in store.quarantined(0, 10)]
    counted = replace(whatsapp, received_count=2, last_received_seconds=whatsapp.received_seconds)
    assert kept == [item(1), replace(counted, last_received_nanos=whatsapp.received_nanos)]


# --- staged bodies --------------------------------------------------------------------------------


def test_staged_bodies_round_trip_until_unstaged(engine: Handle) -> None:
    store = engine.store
    binary = staged_body(2, bytes(range(256)) * 3)  # kept as bytes, whatever they are
    with store.transaction() as tx:
        assert tx.staged(0, 10) == []
        first = tx.stage(staged_body(1))
        second = tx.stage(binary)
        # Seen within the transaction that staged them.
        assert [staged.id for staged in tx.staged(0, 10)] == [first, second]
    with store.transaction() as tx:
        third = tx.stage(staged_body(3))
    assert first < second < third
    with store.transaction() as tx:
        assert tx.staged(0, 10) == [
            replace(staged_body(1), id=first),
            replace(binary, id=second),
            replace(staged_body(3), id=third),
        ]
        assert [staged.id for staged in tx.staged(first, 1)] == [second]
        tx.unstage(second)
    store = engine.reopen()  # durable
    with store.transaction() as tx:
        assert [staged.id for staged in tx.staged(0, 10)] == [first, third]
        tx.unstage(first)
        tx.unstage(third)
        fourth = tx.stage(staged_body(4))
    with store.transaction() as tx:
        assert [staged.id for staged in tx.staged(0, 10)] == [fourth]
    assert fourth > third  # an id is never reused
    assert staged_body(4).received_time() == Timestamp(seconds=BASE_SECONDS + 4, nanos=4000)


def test_find_response_and_save_response(engine: Handle) -> None:
    store = engine.store
    answer = SavedResponse(bytes(range(16)), bytes(range(256)))
    with store.transaction() as tx:
        assert tx.find_response("r-1", NOW) is None
        tx.save_response("r-1", answer, NOW)
        assert tx.find_response("r-1", NOW) == answer  # in the same transaction
        tx.save_response("r-2", SavedResponse(b"", b""), NOW)
    with store.transaction() as tx:
        assert tx.find_response("r-1", NOW) == answer
        assert tx.find_response("r-2", NOW) == SavedResponse(b"", b"")
        assert tx.find_response("R-1", NOW) is None


def test_saved_responses_expire(engine: Handle) -> None:
    store = engine.store
    with store.transaction() as tx:
        for number in range(5):
            tx.save_response(f"old-{number}", saved(b"old"), NOW - 100 - number)
        tx.save_response("new", saved(b"new"), NOW)
    with store.transaction() as tx:
        # Saved before `since_seconds`: expired, as if never saved.
        assert tx.find_response("old-0", NOW - 100) == saved(b"old")
        assert tx.find_response("old-0", NOW - 99) is None
        # An expired id is saved again in place of the old answer.
        tx.save_response("old-0", saved(b"again"), NOW)
        assert tx.find_response("old-0", NOW) == saved(b"again")
    with store.transaction() as tx:
        assert tx.expire_responses(NOW, 3) == 3
        assert tx.expire_responses(NOW, 3) == 1
        assert tx.expire_responses(NOW, 3) == 0
        assert tx.find_response("old-0", 0) == saved(b"again")
        assert tx.find_response("new", 0) == saved(b"new")
        assert [tx.find_response(f"old-{number}", 0) for number in range(1, 5)] == [None] * 4


# --- durability ----------------------------------------------------------------------------------


def test_reopening_keeps_everything(engine: Handle) -> None:
    store = engine.store
    reports = [
        report("m-1", S.DELIVERY_STATUS_SENT, seconds=1, bulk_id="B", reference="R", price="0.0075"),
        report("m-1", S.DELIVERY_STATUS_DELIVERED, seconds=2, bulk_id="B"),
        report("m-2", S.DELIVERY_STATUS_EXPIRED, seconds=1, bulk_id="B", source=SSR),
        report("m-2", S.DELIVERY_STATUS_SENT, seconds=1, source=GMS, reference="R"),
    ]
    commit(store, *reports[:2])
    with store.transaction() as tx:
        for incoming in reports[2:]:
            put(tx, incoming)
        tx.quarantine(item(7))
        tx.save_response("r-1", saved(b"\x00saved\xff"), NOW)

    def everything(store: Store) -> tuple[object, ...]:
        with store.transaction() as tx:
            states = [tx.load_state(source, name) for source in (SSR, GMS) for name in ("m-1", "m-2")]
            response = tx.find_response("r-1", NOW)
        return (
            [store.messages(message_id) for message_id in ("m-1", "m-2")],
            [store.history(message_id) for message_id in ("m-1", "m-2")],
            store.messages_by(Selector.BULK_ID, "B", 0, 0, 10, ANY_SIZE),
            store.messages_by(Selector.REFERENCE, "R", 0, 0, 10, ANY_SIZE),
            all_changes(store),
            store.latest_cursor(),
            store.quarantined(0, 10),
            states,
            response,
        )

    before = everything(store)
    store = engine.reopen()
    assert everything(store) == before
    assert store.messages("m-1")[0].price.amount == "0.0075"

    # The merge bookkeeping survived too: a stored report is still a duplicate, and a new one merges.
    with store.transaction() as tx:
        state = tx.load_state(SSR, "m-1")
        assert tx.is_stored(digest(reports[0]))
        seen = report("m-1", S.DELIVERY_STATUS_SEEN, seconds=3)
        assert not tx.is_stored(digest(seen))
        assert merge(state, seen).report.price.amount == "0.0075"


# --- awaiting seen ---------------------------------------------------------------------------------

VIBER = Channel.CHANNEL_VIBER
WHATSAPP = Channel.CHANNEL_WHATSAPP


def awaiting_ids(store: Store, since: int, page: int = 100) -> list[str]:
    """Every message awaiting "seen" since BASE_SECONDS + `since`, page after page."""
    found: list[str] = []
    after = (0, 0)
    while rows := store.awaiting_seen(BASE_SECONDS + since, after, page):
        assert len(rows) <= page
        found += [row.message_id for row in rows]
        after = rows[-1].key
    return found


def test_awaiting_seen_is_gms_delivered_on_viber_or_whatsapp_since_a_time(engine: Handle) -> None:
    store = engine.store
    delivered = S.DELIVERY_STATUS_DELIVERED
    commit(
        store,
        report("v-late", delivered, seconds=30, source=GMS, channel=VIBER),
        report("w-early", delivered, seconds=10, source=GMS, channel=WHATSAPP),
        report("v-mid", delivered, seconds=20, source=GMS, channel=VIBER),
        report("w-same-time", delivered, seconds=20, source=GMS, channel=WHATSAPP),
        # Never asked about: before the window, an SMS, not delivered, not GMS.
        report("v-old", delivered, seconds=1, source=GMS, channel=VIBER),
        report("sms", delivered, seconds=20, source=GMS),
        report("v-sent", S.DELIVERY_STATUS_SENT, seconds=20, source=GMS, channel=VIBER),
        report("ssr-viber", delivered, seconds=20, source=SSR, channel=VIBER),
    )
    expected = ["w-early", "v-mid", "w-same-time", "v-late"]  # by delivered time, then as stored
    assert awaiting_ids(store, since=10) == expected
    assert awaiting_ids(store, since=10, page=1) == expected  # keyset pages: none lost or repeated
    first = store.awaiting_seen(BASE_SECONDS + 10, (0, 0), 1)[0]
    assert (first.message_id, first.delivered_seconds) == ("w-early", BASE_SECONDS + 10)
    assert awaiting_ids(store, since=21) == ["v-late"]

    # Seen (SEEN outranks DELIVERED), or sent after all on SMS: no longer awaited.
    commit(
        store,
        report("v-mid", S.DELIVERY_STATUS_SEEN, seconds=25, source=GMS, channel=VIBER),
        report("v-sent", delivered, seconds=22, source=GMS, channel=VIBER),
    )
    assert awaiting_ids(store, since=10) == ["w-early", "w-same-time", "v-sent", "v-late"]
    assert awaiting_ids(engine.reopen(), since=10) == ["w-early", "w-same-time", "v-sent", "v-late"]


def test_awaiting_seen_falls_back_to_the_received_time(engine: Handle) -> None:
    untimed = report("v-untimed", S.DELIVERY_STATUS_DELIVERED, source=GMS, channel=VIBER)
    untimed.ClearField("event_time")  # received at BASE_SECONDS + 10_000
    commit(engine.store, untimed)
    assert awaiting_ids(engine.store, since=10_000) == ["v-untimed"]
    assert awaiting_ids(engine.store, since=10_001) == []


# --- retention ------------------------------------------------------------------------------------


def received(incoming: DeliveryReport, seconds: int) -> DeliveryReport:
    """`incoming`, received at BASE_SECONDS + `seconds`."""
    copy = DeliveryReport()
    copy.CopyFrom(incoming)
    copy.received_time.CopyFrom(at(seconds))
    return copy


def test_prune_deletes_exactly_the_final_messages_that_last_changed_before(engine: Handle) -> None:
    store = engine.store
    old_final = [
        received(report("old-final", S.DELIVERY_STATUS_SENT, seconds=1, bulk_id="B"), 100),
        received(report("old-final", S.DELIVERY_STATUS_DELIVERED, seconds=2, bulk_id="B"), 100),
    ]
    old_failed = [received(report("old-failed", S.DELIVERY_STATUS_UNDELIVERED, seconds=1, source=GMS), 200)]
    old_pending = [received(report("old-pending", S.DELIVERY_STATUS_SENT, seconds=1, bulk_id="B"), 100)]
    recent_final = [received(report("recent-final", S.DELIVERY_STATUS_DELIVERED, seconds=1), 900)]
    # Final long ago, but a (late, lower) report arrived recently: its last change is recent.
    late = [
        received(report("late", S.DELIVERY_STATUS_DELIVERED, seconds=2), 100),
        received(report("late", S.DELIVERY_STATUS_SENT, seconds=1), 900),
    ]
    cursors = commit(store, *old_final, *old_pending, *recent_final, *late, *old_failed)
    latest = store.latest_cursor()

    with store.transaction() as tx:
        pruned = tx.prune_messages(BASE_SECONDS + 500, 100)
    assert pruned == Pruned(messages=2, reports=3)
    for message_id in ("old-final", "old-failed"):
        assert store.messages(message_id) == []
        assert store.history(message_id) == []
    for kept in (old_pending, recent_final, late):
        assert store.history(kept[0].message_id) == kept
    assert [change.report.message_id for change in all_changes(store)] == [
        "old-pending",
        "recent-final",
        "late",
        "late",
    ]
    page = store.messages_by(Selector.BULK_ID, "B", 0, 0, 10, ANY_SIZE)
    assert (page_ids(page.states), page.status_counts) == (["old-pending"], {S.DELIVERY_STATUS_SENT: 1})
    # The greatest cursor deleted: the last one (old-failed's) here, so the latest stays where it was.
    assert store.pruned_through() == cursors[-1] == latest
    assert store.latest_cursor() == latest
    with store.transaction() as tx:
        assert tx.prune_messages(BASE_SECONDS + 500, 100) == Pruned()
    assert store.pruned_through() == latest

    # A late report of a pruned message starts it afresh: its old reports are no longer stored.
    again = received(report("old-final", S.DELIVERY_STATUS_SEEN, seconds=3), 1000)
    with store.transaction() as tx:
        assert tx.load_state(SSR, "old-final") is None
        assert not tx.is_stored(digest(old_final[1]))
        put(tx, again)
    assert store.history("old-final") == [again]
    assert [state.status for state in store.messages("old-final")] == [S.DELIVERY_STATUS_SEEN]


def test_prune_takes_at_most_limit_messages_and_remembers_the_greatest_cursor(engine: Handle) -> None:
    store = engine.store
    cursors = commit(store, *(report(f"m-{n}", S.DELIVERY_STATUS_DELIVERED, seconds=n) for n in range(5)))
    [kept] = commit(store, report("pending", S.DELIVERY_STATUS_SENT))
    batches = []
    for _ in range(4):
        with store.transaction() as tx:
            batches.append(tx.prune_messages(BASE_SECONDS + 10_001, 2).messages)
    assert batches == [2, 2, 1, 0]
    assert store.pruned_through() == cursors[-1]
    assert [change.cursor for change in all_changes(store)] == [kept]
    assert engine.reopen().pruned_through() == cursors[-1]


def test_pruned_through_starts_at_zero_and_latest_cursor_survives_pruning_the_last(engine: Handle) -> None:
    store = engine.store
    assert (store.pruned_through(), store.latest_cursor()) == (0, 0)
    [cursor] = commit(store, report("m-1", S.DELIVERY_STATUS_DELIVERED))
    with store.transaction() as tx:
        assert tx.prune_messages(BASE_SECONDS + 10_001, 10) == Pruned(messages=1, reports=1)
    assert all_changes(store) == []
    assert (store.pruned_through(), store.latest_cursor()) == (cursor, cursor)
    [after] = commit(store, report("m-2", S.DELIVERY_STATUS_SENT))
    assert after > cursor  # a cursor is never reused, pruned or not
    assert store.latest_cursor() == after


def test_dismissed_items_are_closed_kept_and_pruned_later(engine: Handle) -> None:
    store = engine.store
    with store.transaction() as tx:
        for number in range(1, 6):
            tx.quarantine(item(number))
    ids = [quarantine_id for quarantine_id, _ in store.quarantined(0, 10)]
    with store.transaction() as tx:
        # By id; an id dismissed already (or not open) is left as it is.
        assert tx.dismiss_quarantined(NOW, 10, ids=[ids[0], ids[1]]) == 2
        assert tx.dismiss_quarantined(NOW + 5, 10, ids=[ids[0]]) == 0
        # By the last received time: item 3 was received at BASE + 3 s and 3,000,007 ns.
        before = Timestamp(seconds=BASE_SECONDS + 3, nanos=3_000_007)
        assert tx.dismiss_quarantined(NOW, 10, received_before=before) == 0
        before.nanos += 1
        assert tx.dismiss_quarantined(NOW, 10, received_before=before) == 1
        # Item 4, received again after the cut-off, is still live; item 5 is resolved, not open.
        tx.quarantine(replace(item(4), received_seconds=BASE_SECONDS + 100))
        tx.resolve_quarantined(ids[4], NOW + 10)
        assert tx.dismiss_quarantined(NOW, 10, received_before=at(50)) == 0
    assert store.open_quarantine_count() == 1
    assert [quarantine_id for quarantine_id, _ in store.quarantined(0, 10, include_resolved=False)] == [
        ids[3]
    ]
    closed = dict(store.quarantined(0, 10))
    assert [closed[i].dismissed_seconds for i in ids] == [NOW, NOW, NOW, None, None]
    assert closed[ids[4]].resolved_seconds == NOW + 10

    # The same item received again after its dismissal is a new open item.
    with store.transaction() as tx:
        tx.quarantine(replace(item(1), received_seconds=NOW + 20))
    assert store.open_quarantine_count() == 2
    assert len(store.quarantined(0, 10)) == 6

    # Pruning deletes closed items closed before the cut-off, never open ones.
    with store.transaction() as tx:
        assert tx.prune_quarantined(NOW + 1, 2) == 2
        assert tx.prune_quarantined(NOW + 1, 2) == 1
        assert tx.prune_quarantined(NOW + 1, 2) == 0
        assert tx.prune_quarantined(NOW + 11, 10) == 1  # the resolved one
    assert [found.dismissed_seconds for _, found in store.quarantined(0, 10)] == [None, None]
    assert store.open_quarantine_count() == 2


# --- SQLite: the schema version ------------------------------------------------------------------


def user_version(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    finally:
        connection.close()
    return version


def test_sqlite_records_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SqliteStore(path).close()
    assert SCHEMA_VERSION >= 1
    assert user_version(path) == SCHEMA_VERSION
    # Opening a current database again keeps its version and its data.
    store = SqliteStore(path)
    try:
        commit(store, report("m-1"))
    finally:
        store.close()
    store = SqliteStore(path)
    try:
        assert store.messages("m-1")[0].message_id == "m-1"
    finally:
        store.close()
    assert user_version(path) == SCHEMA_VERSION


def test_sqlite_refuses_a_database_from_a_newer_release(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE future (x)")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)
    assert user_version(path) == SCHEMA_VERSION + 1


def test_sqlite_migrates_an_empty_file_from_version_zero(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    assert user_version(path) == 0
    store = SqliteStore(path)
    try:
        assert user_version(path) == SCHEMA_VERSION
        [cursor] = commit(store, report("m-1"))
        assert store.latest_cursor() == cursor
        with store.transaction() as tx:
            tx.quarantine(item(1))
            tx.save_response("r", saved(b"x"), NOW)
        assert len(store.quarantined(0, 10)) == 1
    finally:
        store.close()
