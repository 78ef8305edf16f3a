"""NOTIFY after commits and LISTEN for them (store/postgres_listen.py), on a real PostgreSQL."""

from __future__ import annotations

import time

import psycopg
import pytest

from dlrhub.store.base import StoreError
from dlrhub.store.postgres_listen import CHANNEL, Listener, Notifier
from tests.helpers import TIMEOUT


def _notified(listener: Listener) -> bool:
    """Whether a notice arrives within TIMEOUT (polled in short waits)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if listener.wait(0.1):
            return True
    return False


def test_a_commit_notice_reaches_a_listener_on_another_connection(postgres_db: str) -> None:
    listener, notifier = Listener(postgres_db), Notifier(postgres_db)
    try:
        assert listener.wait(0.1)  # connecting: a notice may have been missed before
        assert not listener.wait(0.1)  # nothing since
        notifier.changed()
        assert _notified(listener)
        notifier.changed()
        notifier.changed()
        assert _notified(listener)
    finally:
        notifier.close()
        listener.close()


def test_a_dropped_listener_says_so_then_connects_again(postgres_db: str) -> None:
    listener, notifier = Listener(postgres_db), Notifier(postgres_db)
    try:
        assert listener.wait(0.1)
        with psycopg.connect(postgres_db, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE %s",
                (f"LISTEN {CHANNEL}%",),
            )
        with pytest.raises(StoreError, match="cannot listen for other processes' commits: ") as raised:
            _notified(listener)
        assert "closed the connection" in str(raised.value)
        assert listener.wait(0.1)  # connected again: told to read, a notice may have been lost
        notifier.changed()
        assert _notified(listener)
    finally:
        notifier.close()
        listener.close()
