"""Storage behind a small interface (base.py); SQLite is the embedded default."""

from dlrhub.store.base import (
    AwaitingSeen,
    Change,
    ChangeFilter,
    MessagePage,
    QuarantinedItem,
    SavedResponse,
    Selector,
    Store,
    StoreError,
    Transaction,
)
from dlrhub.store.sqlite import SqliteStore

__all__ = [
    "AwaitingSeen",
    "Change",
    "ChangeFilter",
    "MessagePage",
    "QuarantinedItem",
    "SavedResponse",
    "Selector",
    "SqliteStore",
    "Store",
    "StoreError",
    "Transaction",
]
