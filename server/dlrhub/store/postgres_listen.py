"""PostgreSQL's notices between the processes sharing a database: NOTIFY after a commit, LISTEN for them.

A notice only wakes a follower sooner (feed/follower.py): what changed is read from the store, which
also polls, so a notice lost (a connection dropped and made again) costs latency, never a change.

- Notifier: `changed()` after a commit asks for one NOTIFY, sent by a thread of its own on an
  autocommit connection of its own, after the commit and outside its transaction (a NOTIFY inside the
  write transaction serialises commits on the notification queue: it halved commits in a
  measurement). At most one is in flight; asking again meanwhile sends one more after it.
- Listener: `wait(timeout)` on a connection of its own that LISTENs; a dropped connection raises
  StoreError, and the next `wait` connects again and returns True at once (a notice may have been
  missed meanwhile).
"""

from __future__ import annotations

import logging
import threading

import psycopg

from dlrhub.store.base import StoreError

log = logging.getLogger(__name__)

CHANNEL = "dlrhub_changes"
# Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5


def _reason(error: psycopg.Error) -> str:
    """The first line of a driver error (its detail lines may quote the statement)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Notifier:
    """Coalesced NOTIFYs after commits (see the module's text)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._wanted = threading.Event()
        self._closed = False
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def changed(self) -> None:
        """Asks for a NOTIFY (never waits for it)."""
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dlrhub-notifier", daemon=True)
                self._thread.start()
        self._wanted.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wanted.set()
        if thread is not None:
            thread.join(CONNECT_TIMEOUT * 2)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                break
            try:
                if self._connection is None or self._connection.closed:
                    self._connection = psycopg.connect(
                        self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                    )
                self._connection.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            except psycopg.Error as error:
                # The followers poll as well: this notice is only late. The next commit tries again.
                log.warning("cannot notify the other processes of a commit", extra={"reason": _reason(error)})
                self._drop()
        self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Listener:
    """Waits for NOTIFYs of other processes' commits (see the module's text). One thread calls it."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None

    def wait(self, timeout: float) -> bool:
        """True once a notice arrives (or on connecting: one may have been missed), False after
        `timeout` seconds. Raises StoreError when it cannot connect or the connection drops."""
        try:
            if self._connection is None:
                self._connection = psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                )
                self._connection.execute(f"LISTEN {CHANNEL}")
                return True
            notices = self._connection.notifies(timeout=timeout, stop_after=1)
            return any(True for _ in notices)
        except psycopg.Error as error:
            self.close()
            raise StoreError(f"cannot listen for other processes' commits: {_reason(error)}") from error

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
