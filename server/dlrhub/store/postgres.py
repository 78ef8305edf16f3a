"""The PostgreSQL store: several dlrhub processes on one database (PostgreSQL 13 or newer).

Sections: the schema and its migrations (add a store's tables as the next migration); positions
(cursors); text (NUL escaped); the store (connections, reads); the transaction (locks, the group's
reads, its writes sent in bulk at commit).

Tables (migration 1 holds what SQLite's schema 6 holds; `dlrhub_schema` records the version):
- messages: the merged state of each (source, message_id); `id` is its place for paging;
- reports: the history; each row's position is (txid, ordinal): the id of the transaction that
  stored it (pg_current_xact_id()) and its place in that transaction; `digest` is unique;
- quarantine, requests, staged: as in SQLite;
- retention: one row, the greatest cursor pruned (Store.pruned_through).

Positions. A sequence would not do: an id is taken before commit, so a transaction can commit a
smaller id after a reader has passed it. A transaction id is taken before commit too, but every
transaction whose id is below `pg_snapshot_xmin(pg_current_snapshot())` has finished, so `changes`
reads only below that watermark: no row can appear later at a position already read. The cursor is
`txid << ORDINAL_BITS | ordinal` (a signed 64-bit integer). A long transaction anywhere on the
cluster holds the watermark back, and so the Stream; `committed_cursor` is not held back.

Writers. The merge needs a message's stored state, so writers are serialised per message: a
transaction takes advisory locks on its messages (hashed into buckets, so that it takes at most
COARSE of them: see lock_modes) and on its request ids, in key order and in one statement, before
it reads their states and saved answers (unordered locking deadlocks). Its writes are sent at
commit in a few statements with binary parameters. READ COMMITTED: a statement after the locks sees
what the previous holder committed. synchronous_commit is never off on the writer's connection: a
commit is durable before it is acknowledged. A prune (retention) takes the locks of the messages it
chose as a writer would, then deletes only those still final and old: a report that came meanwhile
keeps its message.

Connections: one for the writer thread, one per reader thread (autocommit; messages_by reads in a
REPEATABLE READ transaction, one snapshot for the page and its counts). A connection found broken is
opened again on its next use. Every psycopg error is a StoreError.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import conninfo

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport, Source
from dlrhub.merge import MessageState
from dlrhub.store.base import (
    AwaitingSeen,
    Change,
    CursorFormat,
    MessagePage,
    Pruned,
    QuarantinedItem,
    SavedResponse,
    Selector,
    StagedBody,
    StoreError,
)
from dlrhub.store.codec import decode_state, encode_merge
from dlrhub.store.common import (
    FINAL,
    OPEN,
    QUARANTINE_COLUMNS,
    channel_and_seconds,
    message_page,
    quarantined_item,
    store_errors,
    with_raw,
    without_raw,
)
from dlrhub.store.postgres_listen import Listener, Notifier

log = logging.getLogger(__name__)
Connection = psycopg.Connection[Any]
_store_errors = store_errors(psycopg.Error)
# The messages table's column for each selector of messages_by.
_COLUMNS = {Selector.BULK_ID: "bulk_id", Selector.REFERENCE: "reference"}
_CONNECT_TIMEOUT = 10
# Messages read at a time by the migrations that fill a new column (3, 4).
MIGRATION_CHUNK = 10_000

# --- schema ----------------------------------------------------------------------------------------


def _migration_1(connection: Connection) -> None:
    """Everything SQLite's schema 6 holds."""
    for statement in (
        """CREATE TABLE messages (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            source integer NOT NULL,
            message_id text NOT NULL,
            bulk_id text NOT NULL,
            reference text NOT NULL,
            status integer NOT NULL,
            report bytea NOT NULL,
            merge bytea NOT NULL,
            cursor bigint NOT NULL,
            UNIQUE (message_id, source)  -- also serves lookups by message id alone
        )""",
        "CREATE INDEX messages_bulk_id ON messages (bulk_id, id)",
        "CREATE INDEX messages_reference ON messages (reference, id)",
        """CREATE TABLE reports (
            txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            ordinal integer NOT NULL,
            source integer NOT NULL,
            message_id text NOT NULL,
            report bytea NOT NULL,
            state bytea NOT NULL,
            raw text NOT NULL,
            digest bytea NOT NULL,
            PRIMARY KEY (txid, ordinal)
        )""",
        "CREATE UNIQUE INDEX reports_digest ON reports (digest)",
        "CREATE INDEX reports_message_id ON reports (message_id, txid, ordinal)",
        """CREATE TABLE quarantine (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            received_seconds bigint NOT NULL,
            received_nanos integer NOT NULL DEFAULT 0,
            request_id text NOT NULL,
            field text NOT NULL,
            reason text NOT NULL,
            description text NOT NULL,
            raw text NOT NULL,
            format integer NOT NULL DEFAULT 0,
            whole_payload boolean NOT NULL DEFAULT false,
            resolved_seconds bigint,
            digest bytea NOT NULL,
            received_count integer NOT NULL DEFAULT 1,
            last_received_seconds bigint,
            last_received_nanos integer NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX quarantine_resolved ON quarantine (resolved_seconds, id)",
        "CREATE UNIQUE INDEX quarantine_open_digest ON quarantine (digest) WHERE resolved_seconds IS NULL",
        """CREATE TABLE requests (
            request_id text PRIMARY KEY,
            request_digest bytea NOT NULL,
            response bytea NOT NULL,
            created_seconds bigint NOT NULL
        )""",
        "CREATE INDEX requests_created ON requests (created_seconds)",
    ):
        connection.execute(statement)


def _migration_2(connection: Connection) -> None:
    """As SQLite's schema 7: fetched bodies are staged (kept raw until their reports commit), and a
    quarantined item keeps the channel of the endpoint it came to (0: none said, SMS)."""
    for statement in (
        """CREATE TABLE staged (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            received_seconds bigint NOT NULL,
            received_nanos integer NOT NULL,
            format integer NOT NULL,
            default_channel integer NOT NULL,
            content_type text NOT NULL,
            body bytea NOT NULL
        )""",
        "ALTER TABLE quarantine ADD COLUMN default_channel integer NOT NULL DEFAULT 0",
    ):
        connection.execute(statement)


def _migration_3(connection: Connection) -> None:
    """As SQLite's schema 8: messages keep their state's channel and time (Store.awaiting_seen),
    filled from each state, and a partial index holds the messages the GMS seen fetcher asks about:
    DELIVERED (3) on Viber (2) or WhatsApp (3), values of the contract's enums that never change."""
    connection.execute("ALTER TABLE messages ADD COLUMN channel integer NOT NULL DEFAULT 0")
    connection.execute("ALTER TABLE messages ADD COLUMN state_seconds bigint NOT NULL DEFAULT 0")
    after = 0
    while rows := connection.execute(
        "SELECT id, report FROM messages WHERE id > %s ORDER BY id LIMIT %s", (after, MIGRATION_CHUNK)
    ).fetchall():
        filled = [
            (row_id, *channel_and_seconds(DeliveryReport.FromString(report))) for row_id, report in rows
        ]
        connection.execute(
            "UPDATE messages SET channel = filled.channel, state_seconds = filled.seconds"
            " FROM unnest(%s::bigint[], %s::integer[], %s::bigint[]) AS filled(id, channel, seconds)"
            " WHERE messages.id = filled.id",
            _columns(filled, 3),
        )
        after = rows[-1][0]
    connection.execute(
        "CREATE INDEX messages_awaiting_seen ON messages (source, state_seconds, id)"
        " WHERE status = 3 AND channel IN (2, 3)"
    )


def _migration_4(connection: Connection) -> None:
    """Retention, as SQLite's schema 9: messages know when they last changed (the received time of
    the report their cursor names, read from it for the rows stored before), quarantined items can
    be dismissed, and the greatest cursor pruned is kept."""
    connection.execute("ALTER TABLE messages ADD COLUMN changed_seconds bigint NOT NULL DEFAULT 0")
    after = 0
    while rows := connection.execute(
        "SELECT m.id, r.report FROM messages m JOIN reports r"
        " ON r.txid = (m.cursor >> %s)::text::xid8 AND r.ordinal = (m.cursor & %s)"
        " WHERE m.id > %s ORDER BY m.id LIMIT %s",
        (ORDINAL_BITS, MAX_ORDINAL, after, MIGRATION_CHUNK),
    ).fetchall():
        with connection.cursor() as cursor:
            changed = [
                (DeliveryReport.FromString(data).received_time.seconds, row_id) for row_id, data in rows
            ]
            cursor.executemany("UPDATE messages SET changed_seconds = %s WHERE id = %s", changed)
        after = rows[-1][0]
    for statement in (
        f"CREATE INDEX messages_final_changed ON messages (changed_seconds) WHERE {FINAL}",
        "ALTER TABLE quarantine ADD COLUMN dismissed_seconds bigint",
        "DROP INDEX quarantine_open_digest",
        f"CREATE UNIQUE INDEX quarantine_open_digest ON quarantine (digest) WHERE {OPEN}",
        "CREATE TABLE retention (id integer PRIMARY KEY CHECK (id = 1), pruned_through bigint NOT NULL)",
        "INSERT INTO retention (id, pruned_through) VALUES (1, 0)",
    ):
        connection.execute(statement)


# Append only: a release never edits a migration that has shipped. Each runs in the one transaction
# that brings the schema up to date, under the migration lock.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Advisory lock keys (bigint) are shared with every other user of the database: dlrhub's are
# NAMESPACE << 32 plus a small number: the message locks (see lock_modes), then the migration lock.
_NAMESPACE = int.from_bytes(b"dlr") << 32
_MIGRATION_LOCK = _NAMESPACE + (1 << 30)


def migrate(connection: Connection) -> int:
    """Brings the schema up to SCHEMA_VERSION in one transaction, under an advisory lock (replicas
    starting together migrate once); returns the version found. A newer schema: StoreError."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS dlrhub_schema (version integer NOT NULL)")
        row = connection.execute("SELECT version FROM dlrhub_schema").fetchone()
        if row is None:
            connection.execute("INSERT INTO dlrhub_schema (version) VALUES (0)")
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"schema version {found} is newer than this dlrhub ({SCHEMA_VERSION}): upgrade dlrhub"
            )
        for version in range(found, SCHEMA_VERSION):
            log.info("migrating the PostgreSQL schema to version %d", version + 1)
            MIGRATIONS[version](connection)
        if found < SCHEMA_VERSION:
            connection.execute("UPDATE dlrhub_schema SET version = %s", (SCHEMA_VERSION,))
    return found


# --- positions -------------------------------------------------------------------------------------

# A transaction numbers its reports below 2**ORDINAL_BITS (the committer's groups stay far below);
# transaction ids fit the other 39 bits of a positive int64 (5.5e11 ids: decades of a busy cluster).
ORDINAL_BITS = 24
MAX_ORDINAL = (1 << ORDINAL_BITS) - 1
MAX_TXID = (1 << (63 - ORDINAL_BITS)) - 1


def position(txid: int, ordinal: int) -> int:
    """The cursor of a report: its transaction's id, then its place in that transaction."""
    return txid << ORDINAL_BITS | ordinal


def split(cursor: int) -> tuple[int, int]:
    """A cursor's transaction id and ordinal."""
    return cursor >> ORDINAL_BITS, cursor & MAX_ORDINAL


# Rows below the watermark: every transaction that could still add a smaller position has ended.
_BELOW_WATERMARK = "txid < pg_snapshot_xmin(pg_current_snapshot())"
_CHANGES_QUERY = (
    "SELECT txid::text, ordinal, report, state, raw FROM reports"  # noqa: S608
    f" WHERE (txid, ordinal) > (%s::text::xid8, %s) AND {_BELOW_WATERMARK}"
    " ORDER BY reports.txid, ordinal LIMIT %s"  # the column: `txid` alone is the text above
)

# A message with a change no Stream may read yet (an older transaction is still open): a prune waits
# for it, or every live Stream would skip that change unseen (their followers read it after).
_UNREADABLE = (
    "EXISTS (SELECT 1 FROM reports WHERE reports.message_id = messages.message_id"
    " AND reports.source = messages.source AND NOT reports.txid < pg_snapshot_xmin(pg_current_snapshot()))"
)


def _last_position(connection: Connection, where: str) -> int:
    row = connection.execute(
        f"SELECT txid::text, ordinal FROM reports {where} ORDER BY reports.txid DESC, ordinal DESC LIMIT 1"  # noqa: S608
    ).fetchone()
    return 0 if row is None else position(int(row[0]), row[1])


# --- text ------------------------------------------------------------------------------------------

# PostgreSQL's text cannot hold NUL, which a report's text, ids and a quarantined item may (valid
# UTF-8, valid JSON as \u0000). Every text column written from a report or a request holds its
# value escaped: backslash doubled, NUL as backslash-0. One-to-one, so lookups by escaped value find
# exactly the values asked for, and it changes nothing in text without either character.
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def text(value: str) -> str:
    """A value as a text column holds it."""
    if "\\" in value or "\0" in value:
        return value.replace("\\", "\\\\").replace("\0", "\\0")
    return value


def untext(value: str) -> str:
    """A text column's value as it was given."""
    if "\\" in value:
        return _ESCAPED.sub(lambda found: "\0" if found.group(1) == "0" else found.group(1), value)
    return value


# --- the store -------------------------------------------------------------------------------------


def describe(url: str) -> str:
    """The database a libpq URL names, for messages: database, user, host and port (no password)."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL database (an unreadable URL)"
    host = str(parts.get("host") or "the default host")
    port = f":{parts['port']}" if parts.get("port") else ""
    database = parts.get("dbname") or parts.get("user") or "the default database"
    return f"PostgreSQL database {database!r} on {host}{port}"


class Reconnect:
    """Paces the attempts to connect again after one failed: the next is allowed after a delay that
    doubles from FIRST_DELAY up to MAX_DELAY seconds, and is forgotten once one succeeds. Shared by
    the store's threads: while the database is down, their calls fail at once instead of each
    waiting for a connection attempt."""

    FIRST_DELAY = 0.1
    MAX_DELAY = 5.0

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._delay = 0.0
        self._next = 0.0

    def wait(self) -> None:
        """Returns if an attempt may be made now, else raises StoreError saying when."""
        with self._lock:
            left = self._next - self._clock()
        if left > 0:
            raise StoreError(f"{self._name} is unreachable: the next attempt to connect is in {left:.1f} s")

    def failed(self) -> None:
        with self._lock:
            self._delay = min(max(self._delay * 2, self.FIRST_DELAY), self.MAX_DELAY)
            self._next = self._clock() + self._delay

    def succeeded(self) -> None:
        with self._lock:
            self._delay = self._next = 0.0


@_store_errors
class PostgresStore:
    """The Store interface over one PostgreSQL database, shared by any number of dlrhub processes."""

    # Distinct from SQLite's plain numbers: a cursor of the other engine is refused, not misread.
    cursor_format = CursorFormat("pg-")

    def __init__(self, url: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Connects and migrates; raises StoreError naming the database (never its password). `clock`
        (seconds) paces the attempts to connect again."""
        self.url = url
        self.name = describe(url)
        self._reconnect = Reconnect(self.name, clock)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[Connection] = []
        try:
            self._writer = self._open_writer()
        except psycopg.Error as error:
            raise StoreError(f"cannot open {self.name}: {_first_line(error)}") from error
        try:
            migrate(self._writer)
        except (psycopg.Error, StoreError) as error:
            self._writer.close()
            raise StoreError(f"cannot open {self.name}: {_first_line(error)}") from error

    # Writes.

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTransaction]:
        try:
            connection = self._writer_connection()
            with connection.transaction():
                tx = _PostgresTransaction(connection)
                yield tx
                tx.flush()
        except psycopg.Error as error:
            raise StoreError(f"transaction: {error}") from error

    # Reads.

    def messages(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        where, params = _by_message(message_id, source)
        rows = self._reader().execute(f"SELECT report FROM messages {where} ORDER BY source", params)  # noqa: S608
        return [DeliveryReport.FromString(report) for (report,) in rows]

    def history(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        where, params = _by_message(message_id, source)
        rows = self._reader().execute(
            f"SELECT report, raw FROM reports {where} ORDER BY txid, ordinal",  # noqa: S608
            params,
        )
        return [with_raw(report, untext(raw)) for report, raw in rows]

    def messages_by(
        self, selector: Selector, value: str, source: int, after: int, limit: int, max_bytes: int
    ) -> MessagePage:
        reader = self._reader()
        where = f"{_COLUMNS[selector]} = %s" + (" AND source = %s" if source else "")
        params: tuple[object, ...] = (text(value), source) if source else (text(value),)
        with reader.transaction():  # one snapshot (REPEATABLE READ) for the page and the counts
            rows = reader.execute(
                f"SELECT id, report FROM messages WHERE {where} AND id > %s ORDER BY id LIMIT %s",  # noqa: S608
                (*params, after, limit + 1),
            ).fetchall()
            counts = dict(
                reader.execute(
                    f"SELECT status, count(*) FROM messages WHERE {where} GROUP BY status",  # noqa: S608
                    params,
                ).fetchall()
            )
        return message_page(rows, counts, limit, max_bytes)

    def changes(self, after: int, limit: int) -> list[Change]:
        txid, ordinal = split(after)
        rows = self._reader().execute(_CHANGES_QUERY, (str(txid), ordinal, limit))
        return [
            Change(
                position(int(txid), ordinal), with_raw(report, untext(raw)), DeliveryReport.FromString(state)
            )
            for txid, ordinal, report, state, raw in rows
        ]

    def awaiting_seen(self, since_seconds: int, after: tuple[int, int], limit: int) -> list[AwaitingSeen]:
        rows = self._reader().execute(
            AWAITING_SEEN_QUERY, (Source.SOURCE_GMS, since_seconds, after[0], after[1], limit)
        )
        return [AwaitingSeen(message_id, seconds, row_id) for message_id, seconds, row_id in rows]

    def latest_cursor(self) -> int:
        # pruned_through only up to the watermark: a prune may have deleted a change of a transaction
        # that ended while an older one is still open, which may yet commit a smaller position.
        reader = self._reader()
        pruned = self.pruned_through()
        row = reader.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        assert row is not None
        final = position(int(row[0]), 0) - 1  # every position at or below it is final
        return max(_last_position(reader, f"WHERE {_BELOW_WATERMARK}"), min(pruned, final))

    def committed_cursor(self) -> int:
        return max(_last_position(self._reader(), ""), self.pruned_through())

    def pruned_through(self) -> int:
        row = self._reader().execute("SELECT pruned_through FROM retention").fetchone()
        return int(row[0]) if row else 0

    def quarantined(
        self, after: int, limit: int, *, include_resolved: bool = True, ids: Sequence[int] = ()
    ) -> list[tuple[int, QuarantinedItem]]:
        where = "id > %s" + ("" if include_resolved else f" AND {OPEN}")
        params: list[object] = [after]
        if ids:
            where += " AND id = ANY(%s)"
            params.append(list(ids))
        query = f"SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE {where} ORDER BY id LIMIT %s"  # noqa: S608
        rows = self._reader().execute(query, (*params, limit))
        return [
            quarantined_item([untext(value) if isinstance(value, str) else value for value in row])
            for row in rows
        ]

    def open_quarantine_count(self) -> int:
        row = (
            self._reader()
            .execute(f"SELECT count(*) FROM quarantine WHERE {OPEN}")  # noqa: S608
            .fetchone()
        )
        return int(row[0]) if row else 0

    def check(self, *, write: bool = False) -> None:
        if write:
            with self.transaction() as tx:
                tx.touch()
        else:
            self._reader().execute("SELECT 1")

    def close(self) -> None:
        self._close_notices()
        with self._lock:
            for connection in [*self._readers, self._writer]:
                connection.close()
            self._readers.clear()

    # Connections.

    def _connect(self) -> Connection:
        """A new connection; after a failed attempt none is tried before its backoff has passed (the
        call fails at once with StoreError), so a database that is down is not asked by every call."""
        self._reconnect.wait()
        try:
            connection = psycopg.connect(
                self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT, application_name="dlrhub"
            )
        except psycopg.Error:
            self._reconnect.failed()
            raise
        self._reconnect.succeeded()
        return connection

    def _open_writer(self) -> Connection:
        connection = self._connect()
        if connection.execute("SHOW synchronous_commit").fetchone() == ("off",):
            connection.execute("SET synchronous_commit = on")  # durable before acknowledged
        return connection

    def _writer_connection(self) -> Connection:
        """The writer's connection, opened again if it broke (the server restarted, say)."""
        if self._writer.broken or self._writer.closed:
            with self._lock:
                self._writer = self._open_writer()
        return self._writer

    def _reader(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None and not (connection.broken or connection.closed):
            return connection
        connection = self._connect()
        connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        connection.read_only = True
        self._local.connection = connection
        with self._lock:
            self._readers = [reader for reader in self._readers if not reader.closed]
            self._readers.append(connection)
        return connection

    # Other processes share the database: notices of commits (store/postgres_listen.py).

    shared = True

    def changed(self) -> None:
        self._notifier.changed()

    def wait_changes(self, timeout: float) -> bool:
        return self._listener.wait(timeout)

    @functools.cached_property
    def _notifier(self) -> Notifier:
        return Notifier(self.url)

    @functools.cached_property
    def _listener(self) -> Listener:
        return Listener(self.url)

    def _close_notices(self) -> None:
        for notices in ("_notifier", "_listener"):
            if notices in self.__dict__:  # made (cached_property)
                self.__dict__.pop(notices).close()


def _by_message(message_id: str, source: int) -> tuple[str, tuple[object, ...]]:
    if source:
        return "WHERE message_id = %s AND source = %s", (text(message_id), source)
    return "WHERE message_id = %s", (text(message_id),)


def _first_line(error: BaseException) -> str:
    """An engine's error message, on one line."""
    return " ".join(str(error).split()) or type(error).__name__


# --- the transaction -------------------------------------------------------------------------------


# Message locks. PostgreSQL's lock table is shared by the whole server and small (64 x max_connections
# by default), so a transaction locks buckets of messages, not messages. A transaction of up to SMALL
# messages takes a shared lock on each message's coarse bucket (one of COARSE) and an exclusive lock
# on its fine bucket (one of FINE: writers of different messages rarely wait for each other); a
# larger one takes the exclusive coarse locks only. Either way a writer holds at most COARSE message
# locks, and two writers of one message always conflict. A request id is locked too (one of FINE
# buckets of its own), so that a retry on another process waits for the first answer and replays it.
# All in one statement, in key order: writers that lock in one order cannot deadlock.
COARSE = 512
FINE = 1 << 20
SMALL = 128
_FINE_BASE = _NAMESPACE + COARSE
_REQUEST_BASE = _FINE_BASE + FINE


def message_buckets(source: int, message_id: str) -> tuple[int, int]:
    """A message's coarse and fine lock keys."""
    hashed = hashlib.blake2b(f"{source}:{message_id}".encode(), digest_size=8).digest()
    fine = int.from_bytes(hashed) % FINE
    return _NAMESPACE + fine % COARSE, _FINE_BASE + fine


def request_bucket(request_id: str) -> int:
    """A request id's lock key."""
    hashed = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return _REQUEST_BASE + int.from_bytes(hashed) % FINE


def lock_modes(keys: Collection[tuple[int, str]], request_ids: Collection[str] = ()) -> dict[int, bool]:
    """The advisory locks that serialise the writers of these messages and requests: key -> shared."""
    buckets = [message_buckets(*key) for key in keys]
    requests = {request_bucket(request_id): False for request_id in request_ids}
    if len(buckets) > SMALL:
        return {coarse: False for coarse, _ in buckets} | requests
    return {coarse: True for coarse, _ in buckets} | {fine: False for _, fine in buckets} | requests


_LOCK = """SELECT CASE WHEN shared THEN pg_advisory_xact_lock_shared(key) ELSE pg_advisory_xact_lock(key) END
    FROM unnest(%b::bigint[], %b::boolean[]) AS lock(key, shared) ORDER BY key"""
_INSERT_REPORTS = """INSERT INTO reports (ordinal, source, message_id, report, state, raw, digest)
    SELECT * FROM unnest(%b::integer[], %b::integer[], %b::text[], %b::bytea[], %b::bytea[],
                         %b::text[], %b::bytea[])"""
_UPSERT_MESSAGES = """INSERT INTO messages
        (source, message_id, bulk_id, reference, status, report, merge, cursor, channel, state_seconds,
         changed_seconds)
    SELECT source, message_id, bulk_id, reference, status, report, merge, cursor, channel, state_seconds,
        changed_seconds
    FROM unnest(%b::integer[], %b::text[], %b::text[], %b::text[], %b::integer[],
                         %b::bytea[], %b::bytea[], %b::bigint[], %b::integer[], %b::bigint[], %b::bigint[])
        WITH ORDINALITY
        AS row(source, message_id, bulk_id, reference, status, report, merge, cursor, channel,
               state_seconds, changed_seconds, n)
    ORDER BY n
    ON CONFLICT (source, message_id) DO UPDATE SET
        bulk_id = excluded.bulk_id, reference = excluded.reference, status = excluded.status,
        report = excluded.report, merge = excluded.merge, cursor = excluded.cursor,
        channel = excluded.channel, state_seconds = excluded.state_seconds,
        changed_seconds = greatest(messages.changed_seconds, excluded.changed_seconds)"""
# Repeats the WHERE terms of migration 3's partial index, which serves it.
AWAITING_SEEN_QUERY = """SELECT message_id, state_seconds, id FROM messages
    WHERE status = 3 AND channel IN (2, 3) AND source = %s AND state_seconds >= %s
        AND (state_seconds, id) > (%s, %s)
    ORDER BY state_seconds, id LIMIT %s"""
_QUARANTINE = f"""INSERT INTO quarantine (received_seconds, received_nanos, request_id, field, reason,
        description, raw, format, whole_payload, digest, default_channel)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (digest) WHERE {OPEN} DO UPDATE SET
        received_count = quarantine.received_count + 1,
        last_received_seconds = excluded.received_seconds,
        last_received_nanos = excluded.received_nanos"""  # noqa: S608
_SAVE_RESPONSES = """INSERT INTO requests (request_id, request_digest, response, created_seconds)
    SELECT * FROM unnest(%b::text[], %b::bytea[], %b::bytea[], %b::bigint[])
    ON CONFLICT (request_id) DO UPDATE SET request_digest = excluded.request_digest,
        response = excluded.response, created_seconds = excluded.created_seconds"""

_TXID = "SELECT pg_current_xact_id()::text"  # takes the transaction's id, if it has none yet
MessageKey = tuple[int, str]


@_store_errors
class _PostgresTransaction:
    """One write transaction: reads answered from what it loaded and wrote, writes kept until
    `flush` (at commit) sends them in bulk."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._txid: int | None = None
        self._locked: dict[int, bool] = {}  # lock key -> shared
        self._states: dict[MessageKey, MessageState | None] = {}  # loaded, then as written
        self._stored: set[bytes] = set()  # digests known to be stored (or written here)
        self._absent: set[bytes] = set()  # digests known not to be stored
        self._reports: list[tuple[object, ...]] = []
        self._messages: dict[MessageKey, tuple[object, ...]] = {}  # in the order first written
        self._quarantined: list[tuple[object, ...]] = []
        self._responses: dict[str, tuple[SavedResponse, int]] = {}

    def prefetch(
        self,
        messages: Collection[tuple[int, str]],
        digests: Collection[bytes],
        request_ids: Collection[str] = (),
    ) -> None:
        wanted = [key for key in messages if key not in self._states]
        asked = [digest for digest in digests if digest not in self._stored and digest not in self._absent]
        connection = self._connection
        found = None
        with connection.pipeline():
            self._lock(wanted, request_ids)
            txid = None if self._txid is not None else connection.execute(_TXID)
            states = self._load(wanted)
            if asked:
                found = connection.execute(
                    "SELECT digest FROM reports WHERE digest = ANY(%b::bytea[])", (asked,), binary=True
                )
        if txid is not None:
            self._keep_txid(txid)
        self._keep_states(wanted, states)
        stored = set() if found is None else {bytes(digest) for (digest,) in found}
        self._stored |= stored
        self._absent |= set(asked) - stored

    def load_state(self, source: int, message_id: str) -> MessageState | None:
        key = (source, message_id)
        if key not in self._states:
            self._lock([key])
            self._keep_states([key], self._load([key]))
        return self._states[key]

    def is_stored(self, digest: bytes) -> bool:
        if digest in self._stored:
            return True
        if digest in self._absent:
            return False
        row = self._connection.execute("SELECT 1 FROM reports WHERE digest = %s", (digest,), binary=True)
        if row.fetchone() is None:
            self._absent.add(digest)
            return False
        self._stored.add(digest)
        return True

    def append(self, report: DeliveryReport, digest: bytes, state: MessageState) -> int:
        key = (report.source, report.message_id)
        if key not in self._states:  # not loaded: lock it (and its stored state is replaced anyway)
            self._lock([key])
        if digest in self._stored:
            raise StoreError("append: a report with this digest is stored already")
        ordinal = len(self._reports)
        if ordinal > MAX_ORDINAL:
            raise StoreError(f"append: a transaction holds at most {MAX_ORDINAL + 1} reports")
        cursor = position(self._transaction_id(), ordinal)
        merged = state.report
        merged_bytes = merged.SerializeToString()
        written = self._messages.get(key)
        changed = report.received_time.seconds
        if written is not None:
            changed = max(changed, int(cast(int, written[8])))
        self._reports.append(
            (
                ordinal,
                report.source,
                text(report.message_id),
                without_raw(report),
                merged_bytes,
                text(report.raw_payload),
                digest,
            )
        )
        self._messages[key] = (
            merged.source,
            text(merged.message_id),
            text(merged.bulk_id),
            text(merged.reference),
            merged.status,
            merged_bytes,
            encode_merge(state),
            cursor,
            *channel_and_seconds(merged),
            changed,
        )
        self._states[key] = state
        self._stored.add(digest)
        self._absent.discard(digest)
        return cursor

    def quarantine(self, item: QuarantinedItem) -> None:
        self._quarantined.append(
            (
                item.received_seconds,
                item.received_nanos,
                text(item.request_id),
                text(item.field),
                text(item.reason),
                text(item.description),
                text(item.raw),
                item.format,
                item.whole_payload,
                item.digest(),
                item.default_channel,
            )
        )

    def resolve_quarantined(self, quarantine_id: int, seconds: int) -> None:
        self.flush()
        self._connection.execute(
            "UPDATE quarantine SET resolved_seconds = %s WHERE id = %s", (seconds, quarantine_id)
        )

    def find_response(self, request_id: str, since_seconds: int) -> SavedResponse | None:
        if request_id in self._responses:
            saved, seconds = self._responses[request_id]
            return saved if seconds >= since_seconds else None
        self._lock((), [request_id])  # a concurrent first call of this id commits its answer first
        row = self._connection.execute(
            "SELECT request_digest, response FROM requests WHERE request_id = %s AND created_seconds >= %s",
            (text(request_id), since_seconds),
        ).fetchone()
        return None if row is None else SavedResponse(bytes(row[0]), bytes(row[1]))

    def save_response(self, request_id: str, saved: SavedResponse, seconds: int) -> None:
        self._responses[request_id] = (saved, seconds)

    def expire_responses(self, before_seconds: int, limit: int) -> int:
        self.flush()
        deleted = self._connection.execute(
            "DELETE FROM requests WHERE request_id IN"
            " (SELECT request_id FROM requests WHERE created_seconds < %s LIMIT %s)",
            (before_seconds, limit),
        )
        return deleted.rowcount

    def stage(self, staged: StagedBody) -> int:
        row = self._connection.execute(
            "INSERT INTO staged (received_seconds, received_nanos, format, default_channel, content_type,"
            " body) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (
                staged.received_seconds,
                staged.received_nanos,
                staged.format,
                staged.default_channel,
                text(staged.content_type),
                staged.body,
            ),
            binary=True,
        ).fetchone()
        assert row is not None
        return int(row[0])

    def unstage(self, staged_id: int) -> None:
        self._connection.execute("DELETE FROM staged WHERE id = %s", (staged_id,))

    def staged(self, after: int, limit: int) -> list[StagedBody]:
        rows = self._connection.execute(
            "SELECT id, received_seconds, received_nanos, format, default_channel, content_type, body"
            " FROM staged WHERE id > %s ORDER BY id LIMIT %s",
            (after, limit),
            binary=True,
        )
        return [
            StagedBody(
                body=bytes(body),
                content_type=untext(content_type),
                format=format,
                default_channel=default_channel,
                received_seconds=seconds,
                received_nanos=nanos,
                id=staged_id,
            )
            for staged_id, seconds, nanos, format, default_channel, content_type, body in rows
        ]

    def dismiss_quarantined(
        self, seconds: int, limit: int, *, ids: Sequence[int] = (), received_before: Timestamp | None = None
    ) -> int:
        self.flush()
        values: tuple[object, ...]
        if ids:
            which, values = "id = ANY(%s)", (list(ids),)
        elif received_before is not None:
            # The last received time, as (seconds, nanos): the first one while it was received once.
            which = (
                "(coalesce(last_received_seconds, received_seconds), CASE WHEN last_received_seconds"
                " IS NULL THEN received_nanos ELSE last_received_nanos END) < (%s, %s)"
            )
            values = (received_before.seconds, received_before.nanos)
        else:
            return 0
        updated = self._connection.execute(
            "UPDATE quarantine SET dismissed_seconds = %s WHERE id IN"  # noqa: S608
            f" (SELECT id FROM quarantine WHERE {OPEN} AND {which} ORDER BY id LIMIT %s)",
            (seconds, *values, limit),
        )
        return updated.rowcount

    def prune_messages(self, before_seconds: int, limit: int) -> Pruned:
        self.flush()
        connection = self._connection
        where = f"{FINAL} AND changed_seconds < %s AND NOT {_UNREADABLE}"
        candidates = connection.execute(
            f"SELECT source, message_id FROM messages WHERE {where} LIMIT %s",  # noqa: S608
            (before_seconds, limit),
        ).fetchall()
        # Locked as a writer locks them, then checked again: a report may have come meanwhile.
        self._lock([(source, message_id) for source, message_id in candidates])
        gone = connection.execute(
            f"DELETE FROM messages WHERE (source, message_id) IN"  # noqa: S608
            f" (SELECT * FROM unnest(%s::integer[], %s::text[])) AND {where} RETURNING source, message_id",
            ([row[0] for row in candidates], [row[1] for row in candidates], before_seconds),
        ).fetchall()
        reports = connection.execute(
            "DELETE FROM reports WHERE (source, message_id) IN"
            " (SELECT * FROM unnest(%s::integer[], %s::text[])) RETURNING txid::text, ordinal",
            ([row[0] for row in gone], [row[1] for row in gone]),
        ).fetchall()
        greatest = max((position(int(txid), ordinal) for txid, ordinal in reports), default=0)
        connection.execute(
            "UPDATE retention SET pruned_through = greatest(pruned_through, %s) WHERE id = 1", (greatest,)
        )
        for key in gone:
            self._states.pop((key[0], key[1]), None)
        return Pruned(messages=len(gone), reports=len(reports))

    def prune_quarantined(self, before_seconds: int, limit: int) -> int:
        self.flush()
        deleted = self._connection.execute(
            "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine"
            " WHERE coalesce(resolved_seconds, dismissed_seconds) < %s LIMIT %s)",
            (before_seconds, limit),
        )
        return deleted.rowcount

    def touch(self) -> None:
        """A durable write that changes nothing (Store.check): the schema version set to itself."""
        self._connection.execute("UPDATE dlrhub_schema SET version = version")

    def flush(self) -> None:
        """Sends the writes kept so far, in bulk (at commit, and before a statement that reads them)."""
        connection = self._connection
        with connection.pipeline():
            if self._reports:
                connection.execute(_INSERT_REPORTS, _columns(self._reports, 7), binary=True)
            if self._messages:
                connection.execute(_UPSERT_MESSAGES, _columns(list(self._messages.values()), 11), binary=True)
            if self._quarantined:
                with connection.cursor() as cursor:
                    cursor.executemany(_QUARANTINE, self._quarantined)
            if self._responses:
                rows = [
                    (text(request_id), saved.request_digest, saved.response, seconds)
                    for request_id, (saved, seconds) in self._responses.items()
                ]
                connection.execute(_SAVE_RESPONSES, _columns(rows, 4), binary=True)
        self._reports.clear()
        self._messages.clear()
        self._quarantined.clear()
        self._responses.clear()

    def _transaction_id(self) -> int:
        if self._txid is None:
            return self._keep_txid(self._connection.execute(_TXID))
        return self._txid

    def _keep_txid(self, found: psycopg.Cursor[Any]) -> int:
        row = found.fetchone()
        assert row is not None
        txid = int(row[0])
        if txid > MAX_TXID:
            raise StoreError(f"transaction id {txid} is past what cursors can number ({MAX_TXID})")
        self._txid = txid
        return txid

    def _lock(self, keys: Collection[MessageKey], request_ids: Collection[str] = ()) -> None:
        """Takes the locks of these messages and requests not held yet (lock_modes), in key order, in
        one statement."""
        wanted = sorted(
            (key, shared)
            for key, shared in lock_modes(keys, request_ids).items()
            if key not in self._locked or (self._locked[key] and not shared)
        )
        if wanted:
            self._connection.execute(_LOCK, ([key for key, _ in wanted], [shared for _, shared in wanted]))
            self._locked.update(wanted)

    def _load(self, keys: Collection[MessageKey]) -> psycopg.Cursor[Any] | None:
        """Asks for the stored states of these messages (read the rows after the pipeline)."""
        if not keys:
            return None
        return self._connection.execute(
            "SELECT source, message_id, report, merge FROM messages WHERE message_id = ANY(%b::text[])",
            (list({text(message_id) for _, message_id in keys}),),
            binary=True,
        )

    def _keep_states(self, keys: Collection[MessageKey], found: psycopg.Cursor[Any] | None) -> None:
        loaded = {} if found is None else {(row[0], row[1]): row for row in found}
        for key in keys:
            row = loaded.get((key[0], text(key[1])))
            self._states[key] = None if row is None else decode_state(bytes(row[2]), bytes(row[3]))


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as columns (the arrays an unnest() insert takes)."""
    return [[row[index] for row in rows] for index in range(width)]
