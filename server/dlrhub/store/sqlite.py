"""The embedded SQLite store: WAL, synchronous=FULL, versioned schema.

Tables (sqlite-utils builds them; migrations are numbered and recorded in
PRAGMA user_version, so a newer release opens an older file):
- messages: the merged state of each (source, message_id), with the state's channel and time
  (`state_seconds`: its event time, else its received time) for Store.awaiting_seen;
- reports: the append-only history of distinct reports; its INTEGER PRIMARY
  KEY AUTOINCREMENT `cursor` is the Stream position (never reused), and its
  `digest` (the report's identity, dlrhub.merge.digest) is unique;
- quarantine: rejected items with their reason;
- requests: answers of Ingest calls that carried a request_id, with a digest
  of the request, until they expire;
- staged: bodies fetched by the poller, kept raw until their reports commit.
- retention: one row, the greatest cursor pruned (Store.pruned_through).

One connection writes (the committer's thread); each reader thread has its
own connection. WAL lets readers run beside the writer and see only committed
data. synchronous=FULL makes every commit durable before it returns.

One server per file: the store holds an exclusive lock on `<db>.lock` while it
is open (a second server on the file would miss the first one's changes on its
live feed), and acknowledges a commit only if the path still names the file it
opened (not deleted or replaced under it).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from google.protobuf.timestamp_pb2 import Timestamp

from deliveryreport.v1.delivery_report_pb2 import DeliveryReport, Source
from dlrhub.merge import MessageState, merge, merge_key
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

log = logging.getLogger(__name__)
_BUSY_TIMEOUT_MS = 10_000
# Reports read at a time by migration 4 (its progress is logged after each).
MIGRATION_CHUNK = 100_000
# The messages table's column for each selector of messages_by.
_COLUMNS = {Selector.BULK_ID: "bulk_id", Selector.REFERENCE: "reference"}


def _migration_1(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            source INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            bulk_id TEXT NOT NULL,
            reference TEXT NOT NULL,
            status INTEGER NOT NULL,
            report BLOB NOT NULL,
            merge BLOB NOT NULL,
            cursor INTEGER NOT NULL,
            UNIQUE (source, message_id)
        )"""
    )
    db.execute(
        """CREATE TABLE reports (
            cursor INTEGER PRIMARY KEY AUTOINCREMENT,
            source INTEGER NOT NULL,
            message_id TEXT NOT NULL,
            report BLOB NOT NULL,
            state BLOB NOT NULL,
            raw TEXT NOT NULL
        )"""
    )
    db.table("quarantine").create(
        {
            "id": int,
            "received_seconds": int,
            "request_id": str,
            "field": str,
            "reason": str,
            "description": str,
            "raw": str,
        },
        pk="id",
        not_null={"received_seconds", "request_id", "field", "reason", "description", "raw"},
    )
    db.table("requests").create(
        {"request_id": str, "response": bytes, "created_seconds": int}, pk="request_id"
    )
    db.table("messages").create_index(["message_id"], if_not_exists=True)
    db.table("messages").create_index(["bulk_id", "id"], if_not_exists=True)
    db.table("messages").create_index(["reference", "id"], if_not_exists=True)
    db.table("reports").create_index(["source", "message_id", "cursor"], if_not_exists=True)


def _migration_2(db: sqlite_utils.Database) -> None:
    """Quarantined items remember their format and kind, and when a re-normalisation resolved them."""
    quarantine = db.table("quarantine")
    quarantine.add_column("format", int, not_null_default=0)
    quarantine.add_column("whole_payload", int, not_null_default=0)
    quarantine.add_column("resolved_seconds", int)
    quarantine.create_index(["resolved_seconds", "id"], if_not_exists=True)


def _migration_3(db: sqlite_utils.Database) -> None:
    """Quarantined items keep the fraction of the second they were received in (0 for older rows)."""
    db.table("quarantine").add_column("received_nanos", int, not_null_default=0)


def _migration_4(db: sqlite_utils.Database) -> None:
    """Reports get their identity, and messages the order-independent merge with bounded bookkeeping.

    Every report gets its digest (unique: the safety net against storing a report twice), and every
    message's state and bookkeeping are rebuilt by merging its history again: the old bookkeeping
    kept every key seen, and ordered reports without event time by their received time. One index,
    (message_id, cursor), serves the history with and without a source.
    """
    connection = db.conn
    connection.execute("ALTER TABLE reports ADD COLUMN digest BLOB")
    connection.execute("DROP INDEX idx_reports_source_message_id_cursor")
    db.table("reports").create_index(["message_id", "cursor"])
    total = connection.execute("SELECT count(*) FROM reports").fetchone()[0]
    if total:
        log.info("migrating to schema 4: %d reports to identify and merge again", total)
    # The pass reads and updates rows in message order, all over the file: with SQLite's default
    # 2 MiB of cache, dirty pages spill to the WAL again and again (1M reports: 108 s, not 75 s).
    cache_size = connection.execute("PRAGMA cache_size").fetchone()[0]
    connection.execute("PRAGMA cache_size = -262144")  # KiB: 256 MiB, for the migration only
    try:
        _rebuild_messages(connection, total)
    finally:
        connection.execute(f"PRAGMA cache_size = {int(cache_size)}")
    db.table("reports").create_index(["digest"], unique=True)


def _rebuild_messages(connection: sqlite3.Connection, total: int) -> None:
    """Migration 4's pass over the history: every report's digest, every message's state again."""
    rebuild = _Rebuild(connection)
    after: tuple[str, int] = ("", 0)
    done = 0
    while rows := connection.execute(
        "SELECT message_id, cursor, report, raw FROM reports"
        " WHERE (message_id, cursor) > (?, ?) ORDER BY message_id, cursor LIMIT ?",
        (*after, MIGRATION_CHUNK),
    ).fetchall():
        for message_id, cursor, report, raw in rows:
            rebuild.add(message_id, cursor, with_raw(report, raw))
        rebuild.flush()
        after = (rows[-1][0], rows[-1][1])
        done += len(rows)
        log.info("migrating to schema 4: %d of %d reports", done, total)
    rebuild.end_message()
    rebuild.flush()


class _Rebuild:
    """Migration 4's pass over the history, one message id after another (in cursor order)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._message_id: str | None = None
        self._states: dict[int, MessageState] = {}  # of the current message id, by source
        self._digests: set[bytes] = set()  # of the current message id
        self._digest_rows: list[tuple[bytes, int]] = []
        self._message_rows: list[tuple[object, ...]] = []

    def add(self, message_id: str, cursor: int, report: DeliveryReport) -> None:
        if message_id != self._message_id:
            self.end_message()
            self._message_id = message_id
        key = merge_key(report)
        if key.digest in self._digests:
            # Stored twice by an older rule: it keeps its place in the history without a digest
            # (the unique key does not refuse it), and is merged once.
            log.warning("report %d is a copy of an earlier report of message %r", cursor, message_id)
            return
        self._digests.add(key.digest)
        self._digest_rows.append((key.digest, cursor))
        self._states[report.source] = merge(self._states.get(report.source), report, key)

    def end_message(self) -> None:
        for source, state in self._states.items():
            merged = state.report
            self._message_rows.append(
                (
                    merged.SerializeToString(),
                    encode_merge(state),
                    merged.status,
                    merged.bulk_id,
                    merged.reference,
                    source,
                    self._message_id,
                )
            )
        self._states.clear()
        self._digests.clear()

    def flush(self) -> None:
        self._connection.executemany("UPDATE reports SET digest = ? WHERE cursor = ?", self._digest_rows)
        self._connection.executemany(
            "UPDATE messages SET report = ?, merge = ?, status = ?, bulk_id = ?, reference = ?"
            " WHERE source = ? AND message_id = ?",
            self._message_rows,
        )
        self._digest_rows.clear()
        self._message_rows.clear()


def _migration_5(db: sqlite_utils.Database) -> None:
    """Saved answers keep a digest of their request, so that a reused request id is told from a retry.

    Answers saved before cannot tell: they are dropped. A retry of such a request is applied again,
    and its reports are answered as duplicates: nothing is lost or stored twice.
    """
    db.execute("DELETE FROM requests")
    db.table("requests").add_column("request_digest", bytes, not_null_default=b"")
    db.table("requests").create_index(["created_seconds"])


def _migration_6(db: sqlite_utils.Database) -> None:
    """An open quarantined item is kept once: the same item received again is counted on its row.

    Each item gets its digest (QuarantinedItem.digest), unique among open items. Open items already
    kept more than once become one row: the oldest, with the count and the last received time of
    all of them.
    """
    quarantine = db.table("quarantine")
    quarantine.add_column("digest", bytes)
    quarantine.add_column("received_count", int, not_null_default=1)
    quarantine.add_column("last_received_seconds", int)
    quarantine.add_column("last_received_nanos", int, not_null_default=0)
    connection = db.conn
    first_of: dict[bytes, int] = {}  # open items: the id of the first row of each digest
    rows = connection.execute(
        "SELECT id, format, whole_payload, field, reason, raw, resolved_seconds, received_seconds,"
        " received_nanos FROM quarantine ORDER BY id"
    ).fetchall()
    for quarantine_id, format, whole, field, reason, raw, resolved, seconds, nanos in rows:
        item = QuarantinedItem(raw, field, reason, "", seconds, format=format, whole_payload=bool(whole))
        digest = item.digest()
        first = first_of.get(digest) if resolved is None else None
        if first is None:
            connection.execute("UPDATE quarantine SET digest = ? WHERE id = ?", (digest, quarantine_id))
            if resolved is None:
                first_of[digest] = quarantine_id
            continue
        connection.execute(
            "UPDATE quarantine SET received_count = received_count + 1, last_received_seconds = ?,"
            " last_received_nanos = ? WHERE id = ?",
            (seconds, nanos, first),
        )
        connection.execute("DELETE FROM quarantine WHERE id = ?", (quarantine_id,))
    connection.execute(
        "CREATE UNIQUE INDEX idx_quarantine_open_digest ON quarantine (digest) WHERE resolved_seconds IS NULL"
    )


def _migration_7(db: sqlite_utils.Database) -> None:
    """Fetched bodies are staged (kept raw until their reports commit), and a quarantined item keeps
    the channel of the endpoint it came to (0: none said, SMS)."""
    db.execute(
        """CREATE TABLE staged (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            received_seconds INTEGER NOT NULL,
            received_nanos INTEGER NOT NULL,
            format INTEGER NOT NULL,
            default_channel INTEGER NOT NULL,
            content_type TEXT NOT NULL,
            body BLOB NOT NULL
        )"""
    )
    db.table("quarantine").add_column("default_channel", int, not_null_default=0)


def _migration_8(db: sqlite_utils.Database) -> None:
    """Messages keep their state's channel and time, for the GMS seen fetcher (Store.awaiting_seen).

    Every message's columns are filled from its state. A partial index holds only the messages that
    fetcher asks about: DELIVERED (3) on Viber (2) or WhatsApp (3), the values of the contract's
    enums (SEEN_CHANNELS), which never change.
    """
    connection = db.conn
    connection.execute("ALTER TABLE messages ADD COLUMN channel INTEGER NOT NULL DEFAULT 0")
    connection.execute("ALTER TABLE messages ADD COLUMN state_seconds INTEGER NOT NULL DEFAULT 0")
    after = 0
    while rows := connection.execute(
        "SELECT id, report FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, MIGRATION_CHUNK)
    ).fetchall():
        connection.executemany(
            "UPDATE messages SET channel = ?, state_seconds = ? WHERE id = ?",
            [(*channel_and_seconds(DeliveryReport.FromString(report)), row_id) for row_id, report in rows],
        )
        after = rows[-1][0]
    connection.execute(
        "CREATE INDEX idx_messages_awaiting_seen ON messages (source, state_seconds, id)"
        " WHERE status = 3 AND channel IN (2, 3)"
    )


# Repeats the WHERE terms of migration 8's partial index word for word: SQLite uses it so.
AWAITING_SEEN_QUERY = (
    "SELECT message_id, state_seconds, id FROM messages"
    " WHERE status = 3 AND channel IN (2, 3) AND source = ? AND state_seconds >= ?"
    " AND (state_seconds, id) > (?, ?) ORDER BY state_seconds, id LIMIT ?"
)


def _migration_9(db: sqlite_utils.Database) -> None:
    """Retention: messages know when they last changed, quarantined items can be dismissed, and the
    store remembers the greatest cursor it pruned.

    `changed_seconds` is the received time of a message's latest stored report (the one its `cursor`
    names), read from that report for the rows already stored; a partial index finds the final
    messages by it. An open item is now one neither resolved nor dismissed: the unique index of open
    digests follows.
    """
    connection = db.conn
    connection.execute("ALTER TABLE messages ADD COLUMN changed_seconds INTEGER NOT NULL DEFAULT 0")
    after = 0
    while rows := connection.execute(
        "SELECT m.id, r.report FROM messages m JOIN reports r ON r.cursor = m.cursor"
        " WHERE m.id > ? ORDER BY m.id LIMIT ?",
        (after, MIGRATION_CHUNK),
    ).fetchall():
        connection.executemany(
            "UPDATE messages SET changed_seconds = ? WHERE id = ?",
            [(DeliveryReport.FromString(report).received_time.seconds, row_id) for row_id, report in rows],
        )
        after = rows[-1][0]
    connection.execute(f"CREATE INDEX idx_messages_final_changed ON messages (changed_seconds) WHERE {FINAL}")
    connection.execute("ALTER TABLE quarantine ADD COLUMN dismissed_seconds INTEGER")
    connection.execute("DROP INDEX idx_quarantine_open_digest")
    connection.execute(f"CREATE UNIQUE INDEX idx_quarantine_open_digest ON quarantine (digest) WHERE {OPEN}")
    connection.execute(
        "CREATE TABLE retention (id INTEGER PRIMARY KEY CHECK (id = 1), pruned_through INTEGER NOT NULL)"
    )
    connection.execute("INSERT INTO retention (id, pruned_through) VALUES (1, 0)")


# Append only: a release never edits a migration that has shipped.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def migrate(connection: sqlite3.Connection) -> int:
    """Brings the schema up to SCHEMA_VERSION; returns the version found."""
    found: int = connection.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {found}, newer than this release ({SCHEMA_VERSION})"
        )
    db = sqlite_utils.Database(connection)
    for version in range(found, SCHEMA_VERSION):
        connection.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            connection.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    return found


_store_errors = store_errors(sqlite3.Error)


# Served by the (message_id, cursor) index, with a source or without.
HISTORY_QUERY = (
    "SELECT report, raw FROM reports WHERE message_id = ? AND (? = 0 OR source = ?) ORDER BY cursor"
)


def _execute(connection: sqlite3.Connection, statement: str) -> None:
    """One statement of a transaction's frame (BEGIN, COMMIT, ROLLBACK); raises StoreError."""
    try:
        connection.execute(statement)
    except sqlite3.Error as error:
        raise StoreError(f"{statement}: {error}") from error


@_store_errors
class SqliteStore:
    """The Store interface over one SQLite file."""

    # Plain decimal numbers, as every release has given out.
    cursor_format = CursorFormat()

    def __init__(self, path: Path | str) -> None:
        """Opens (creating and migrating) the database; raises StoreError saying why it cannot."""
        self.path = Path(path)
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise StoreError(f"cannot open {self.path}: {self.path.parent} is not a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot open {self.path}: {_reason(error)}") from error
        self._lock_file = _hold_lock(self.path)
        try:
            self._writer = _connect(self.path)
        except sqlite3.Error as error:
            os.close(self._lock_file)
            raise StoreError(f"cannot open {self.path}: {_reason(error)}") from error
        try:
            if self._writer.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode")
            migrate(self._writer)
            # The file opened: a commit is acknowledged only while the path still names it.
            self._identity = _file_identity(self.path)
        except BaseException as error:
            self._writer.close()
            os.close(self._lock_file)
            if isinstance(error, OSError | sqlite3.Error | StoreError):
                raise StoreError(f"cannot open {self.path}: {_reason(error)}") from error
            raise
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # Writes.

    @contextmanager
    def transaction(self) -> Iterator[_SqliteTransaction]:
        connection = self._writer
        _execute(connection, "BEGIN IMMEDIATE")
        try:
            yield _SqliteTransaction(connection)
            _execute(connection, "COMMIT")
            self._check_identity()  # committed to a file deleted or replaced: not durable, not acknowledged
        except BaseException:
            if connection.in_transaction:  # also when COMMIT itself failed
                _execute(connection, "ROLLBACK")
            raise

    # Reads.

    def messages(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        rows = self._reader().execute(
            "SELECT report FROM messages WHERE message_id = ? AND (? = 0 OR source = ?) ORDER BY source",
            (message_id, source, source),
        )
        return [DeliveryReport.FromString(report) for (report,) in rows]

    def history(self, message_id: str, source: int = 0) -> list[DeliveryReport]:
        rows = self._reader().execute(HISTORY_QUERY, (message_id, source, source))
        return [with_raw(report, raw) for report, raw in rows]

    def messages_by(
        self, selector: Selector, value: str, source: int, after: int, limit: int, max_bytes: int
    ) -> MessagePage:
        reader = self._reader()
        where = f"{_COLUMNS[selector]} = ? AND (? = 0 OR source = ?)"
        reader.execute("BEGIN")  # one snapshot for the page and the counts
        try:
            rows = reader.execute(
                f"SELECT id, report FROM messages WHERE {where} AND id > ? ORDER BY id LIMIT ?",  # noqa: S608
                (value, source, source, after, limit + 1),
            ).fetchall()
            counts = dict(
                reader.execute(
                    f"SELECT status, count(*) FROM messages WHERE {where} GROUP BY status",  # noqa: S608
                    (value, source, source),
                ).fetchall()
            )
        finally:
            reader.execute("COMMIT")
        return message_page(rows, counts, limit, max_bytes)

    def changes(self, after: int, limit: int) -> list[Change]:
        rows = self._reader().execute(
            "SELECT cursor, report, state, raw FROM reports WHERE cursor > ? ORDER BY cursor LIMIT ?",
            (after, limit),
        )
        return [
            Change(cursor, with_raw(report, raw), DeliveryReport.FromString(state))
            for cursor, report, state, raw in rows
        ]

    def awaiting_seen(self, since_seconds: int, after: tuple[int, int], limit: int) -> list[AwaitingSeen]:
        rows = self._reader().execute(
            AWAITING_SEEN_QUERY, (Source.SOURCE_GMS, since_seconds, after[0], after[1], limit)
        )
        return [AwaitingSeen(message_id, seconds, row_id) for message_id, seconds, row_id in rows]

    def latest_cursor(self) -> int:
        row = (
            self._reader()
            .execute(
                "SELECT max(coalesce((SELECT max(cursor) FROM reports), 0), pruned_through) FROM retention"
            )
            .fetchone()
        )
        return int(row[0])

    def pruned_through(self) -> int:
        return int(self._reader().execute("SELECT pruned_through FROM retention").fetchone()[0])

    def committed_cursor(self) -> int:
        return self.latest_cursor()  # one writer: every commit is visible to `changes` at once

    # One process per file (the lock file): its committer publishes every change itself.
    shared = False

    def changed(self) -> None:
        pass

    def wait_changes(self, timeout: float) -> bool:
        time.sleep(timeout)  # nobody else writes this file
        return False

    def quarantined(
        self, after: int, limit: int, *, include_resolved: bool = True, ids: Sequence[int] = ()
    ) -> list[tuple[int, QuarantinedItem]]:
        where = "id > ?" + ("" if include_resolved else f" AND {OPEN}")
        if ids:
            where += f" AND id IN ({','.join('?' * len(ids))})"
        query = f"SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE {where} ORDER BY id LIMIT ?"  # noqa: S608
        return [quarantined_item(row) for row in self._reader().execute(query, (after, *ids, limit))]

    def open_quarantine_count(self) -> int:
        row = (
            self._reader()
            .execute(f"SELECT count(*) FROM quarantine WHERE {OPEN}")  # noqa: S608
            .fetchone()
        )
        return int(row[0])

    def check(self, *, write: bool = False) -> None:
        self._check_identity()
        if write:
            with self.transaction():
                # The schema version set to itself: a page written and synced, nothing changed.
                version = self._writer.execute("PRAGMA user_version").fetchone()[0]
                self._writer.execute(f"PRAGMA user_version = {int(version)}")
        else:
            self.latest_cursor()

    def close(self) -> None:
        with self._lock:
            for connection in [*self._readers, self._writer]:
                connection.close()
            self._readers.clear()
            if self._lock_file >= 0:
                os.close(self._lock_file)  # another server may open the file now
                self._lock_file = -1

    def _check_identity(self) -> None:
        """Raises StoreError unless the path still names the file opened: deleted (with its directory,
        say) or replaced under the running server, what is committed to it would be lost."""
        try:
            identity = _file_identity(self.path)
        except FileNotFoundError:
            raise StoreError(
                f"{self.path} was deleted under the running server: nothing more is acknowledged;"
                " restart to open the database again"
            ) from None
        except OSError as error:
            raise StoreError(f"cannot check {self.path}: {error.strerror}") from error
        if identity != self._identity:
            raise StoreError(
                f"{self.path} was replaced by another file under the running server: nothing more is"
                " acknowledged; restart to open it"
            )

    def _reader(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = _connect(self.path)
            connection.execute("PRAGMA query_only = ON")
            self._local.connection = connection
            with self._lock:
                self._readers.append(connection)
        return connection


def _hold_lock(db: Path) -> int:
    """An exclusive lock on `<db>.lock` (holding this process's id), kept until its descriptor closes.

    One server per database file: the live feed comes from the server's own commits (feed/hub.py),
    so a second server on the file would miss the first one's changes. Raises StoreError naming the
    process that holds the lock. The kernel releases the lock when the process ends, however it ends.
    """
    path = db.with_name(db.name + ".lock")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise StoreError(f"cannot open {db}: cannot create {path}: {error.strerror}") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(descriptor, 20, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise StoreError(
            f"{db} is in use by another dlrhub (pid {holder}): one server per database file"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def _reason(error: BaseException) -> str:
    """Why opening failed, without Python's decoration."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)


def _file_identity(path: Path) -> tuple[int, int]:
    """What tells one file from another at the same path: its device and inode."""
    status = path.stat()
    return status.st_dev, status.st_ino


@_store_errors
class _SqliteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def prefetch(
        self,
        messages: Collection[tuple[int, str]],
        digests: Collection[bytes],
        request_ids: Collection[str] = (),
    ) -> None:
        pass  # a local file answers each lookup in microseconds

    def load_state(self, source: int, message_id: str) -> MessageState | None:
        row = self._connection.execute(
            "SELECT report, merge FROM messages WHERE source = ? AND message_id = ?", (source, message_id)
        ).fetchone()
        return None if row is None else decode_state(row[0], row[1])

    def is_stored(self, digest: bytes) -> bool:
        return (
            self._connection.execute("SELECT 1 FROM reports WHERE digest = ?", (digest,)).fetchone()
            is not None
        )

    def append(self, report: DeliveryReport, digest: bytes, state: MessageState) -> int:
        merged = state.report
        merged_bytes = merged.SerializeToString()
        # A digest stored already breaks the unique key: StoreError (_store_errors).
        cursor: int = self._connection.execute(
            "INSERT INTO reports (source, message_id, report, state, raw, digest)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING cursor",
            (
                report.source,
                report.message_id,
                without_raw(report),  # its text is kept verbatim in its own column
                merged_bytes,
                report.raw_payload,
                digest,
            ),
        ).fetchone()[0]
        self._connection.execute(
            """INSERT INTO messages (source, message_id, bulk_id, reference, status, report, merge, cursor,
                 channel, state_seconds, changed_seconds)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (source, message_id) DO UPDATE SET
                 bulk_id = excluded.bulk_id, reference = excluded.reference, status = excluded.status,
                 report = excluded.report, merge = excluded.merge, cursor = excluded.cursor,
                 channel = excluded.channel, state_seconds = excluded.state_seconds,
                 changed_seconds = max(changed_seconds, excluded.changed_seconds)""",
            (
                merged.source,
                merged.message_id,
                merged.bulk_id,
                merged.reference,
                merged.status,
                merged_bytes,
                encode_merge(state),
                cursor,
                *channel_and_seconds(merged),
                report.received_time.seconds,
            ),
        )
        return cursor

    def quarantine(self, item: QuarantinedItem) -> None:
        self._connection.execute(
            "INSERT INTO quarantine (received_seconds, received_nanos, request_id, field, reason,"  # noqa: S608
            " description, raw, format, whole_payload, digest, default_channel)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            f" ON CONFLICT (digest) WHERE {OPEN} DO UPDATE SET"
            " received_count = received_count + 1, last_received_seconds = excluded.received_seconds,"
            " last_received_nanos = excluded.received_nanos",
            (
                item.received_seconds,
                item.received_nanos,
                item.request_id,
                item.field,
                item.reason,
                item.description,
                item.raw,
                item.format,
                item.whole_payload,
                item.digest(),
                item.default_channel,
            ),
        )

    def resolve_quarantined(self, quarantine_id: int, seconds: int) -> None:
        self._connection.execute(
            "UPDATE quarantine SET resolved_seconds = ? WHERE id = ?", (seconds, quarantine_id)
        )

    def stage(self, staged: StagedBody) -> int:
        staged_id: int = self._connection.execute(
            "INSERT INTO staged (received_seconds, received_nanos, format, default_channel, content_type,"
            " body) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (
                staged.received_seconds,
                staged.received_nanos,
                staged.format,
                staged.default_channel,
                staged.content_type,
                staged.body,
            ),
        ).fetchone()[0]
        return staged_id

    def unstage(self, staged_id: int) -> None:
        self._connection.execute("DELETE FROM staged WHERE id = ?", (staged_id,))

    def staged(self, after: int, limit: int) -> list[StagedBody]:
        rows = self._connection.execute(
            "SELECT id, received_seconds, received_nanos, format, default_channel, content_type, body"
            " FROM staged WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        )
        return [
            StagedBody(
                body=bytes(body),
                content_type=content_type,
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
        if ids:
            which, values = f"id IN ({','.join('?' * len(ids))})", tuple(ids)
        elif received_before is not None:
            # The last received time, as (seconds, nanos): the first one while it was received once.
            which = (
                "(coalesce(last_received_seconds, received_seconds),"
                " iif(last_received_seconds IS NULL, received_nanos, last_received_nanos)) < (?, ?)"
            )
            values = (received_before.seconds, received_before.nanos)
        else:
            return 0
        cursor = self._connection.execute(
            "UPDATE quarantine SET dismissed_seconds = ? WHERE id IN"  # noqa: S608
            f" (SELECT id FROM quarantine WHERE {OPEN} AND {which} ORDER BY id LIMIT ?)",
            (seconds, *values, limit),
        )
        return cursor.rowcount

    def prune_messages(self, before_seconds: int, limit: int) -> Pruned:
        connection = self._connection
        messages = connection.execute(
            f"SELECT id, source, message_id FROM messages WHERE {FINAL} AND changed_seconds < ?"  # noqa: S608
            " LIMIT ?",
            (before_seconds, limit),
        ).fetchall()
        reports, greatest = 0, 0
        for _, source, message_id in messages:
            cursors = connection.execute(
                "DELETE FROM reports WHERE message_id = ? AND source = ? RETURNING cursor",
                (message_id, source),
            ).fetchall()
            reports += len(cursors)
            greatest = max([greatest, *(cursor for (cursor,) in cursors)])
        connection.executemany("DELETE FROM messages WHERE id = ?", [(row[0],) for row in messages])
        connection.execute(
            "UPDATE retention SET pruned_through = max(pruned_through, ?) WHERE id = 1", (greatest,)
        )
        return Pruned(messages=len(messages), reports=reports)

    def prune_quarantined(self, before_seconds: int, limit: int) -> int:
        cursor = self._connection.execute(
            "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine"
            " WHERE coalesce(resolved_seconds, dismissed_seconds) < ? LIMIT ?)",
            (before_seconds, limit),
        )
        return cursor.rowcount

    def find_response(self, request_id: str, since_seconds: int) -> SavedResponse | None:
        row = self._connection.execute(
            "SELECT request_digest, response FROM requests WHERE request_id = ? AND created_seconds >= ?",
            (request_id, since_seconds),
        ).fetchone()
        return None if row is None else SavedResponse(bytes(row[0]), bytes(row[1]))

    def save_response(self, request_id: str, saved: SavedResponse, seconds: int) -> None:
        self._connection.execute(
            "INSERT OR REPLACE INTO requests (request_id, request_digest, response, created_seconds)"
            " VALUES (?, ?, ?, ?)",
            (request_id, saved.request_digest, saved.response, seconds),
        )

    def expire_responses(self, before_seconds: int, limit: int) -> int:
        cursor = self._connection.execute(
            "DELETE FROM requests WHERE request_id IN"
            " (SELECT request_id FROM requests WHERE created_seconds < ? LIMIT ?)",
            (before_seconds, limit),
        )
        return cursor.rowcount
