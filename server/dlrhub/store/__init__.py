"""Storage behind a small interface (base.py); SQLite is the embedded default, PostgreSQL the shared one."""

from dlrhub.store.base import (
    Change,
    ChangeFilter,
    CursorFormat,
    MessagePage,
    QuarantinedItem,
    SavedResponse,
    Selector,
    Store,
    StoreError,
    Transaction,
)
from dlrhub.store.engine import database_name, open_store
from dlrhub.store.postgres import PostgresStore
from dlrhub.store.sqlite import SqliteStore

__all__ = [
    "Change",
    "ChangeFilter",
    "CursorFormat",
    "MessagePage",
    "PostgresStore",
    "QuarantinedItem",
    "SavedResponse",
    "Selector",
    "SqliteStore",
    "Store",
    "StoreError",
    "Transaction",
    "database_name",
    "open_store",
]
