"""Which engine a `--db` / DLRHUB_DB value names, and opening it.

- a `postgresql://` or `postgres://` URL: PostgreSQL, the URL given to libpq as it is (so `sslmode`,
  `host=/run/postgresql` in the query, PGPASSWORD and ~/.pgpass work as with any libpq program);
- a file path: SQLite;
- a value naming no file (empty, `.`, `/`) is refused;
- anything else that looks like a URL (`scheme://...`, `scheme:...`) or a libpq `key=value` string is
  refused, rather than taken for a file name (a folder named `postgresql:` was made from such a URL).
"""

from __future__ import annotations

import re
from pathlib import Path

from dlrhub.store.base import Store, StoreError
from dlrhub.store.postgres import PostgresStore, describe
from dlrhub.store.sqlite import SqliteStore

POSTGRES_SCHEMES = ("postgresql", "postgres")
# `scheme:` at the start (RFC 3986's letters), before any slash: a URL, not a path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_KEYWORD = re.compile(r"\s*[A-Za-z_]+\s*=")


def _postgres_url(db: str | Path) -> str | None:
    """The PostgreSQL URL `db` is, None for a file path; StoreError for what is neither."""
    if isinstance(db, Path):
        return None
    if not Path(db).name:  # "", ".", "/": a directory, not a file
        raise StoreError(
            f"the database {db!r} names no file: give a file path (data/dlrhub.db) or a postgresql:// URL"
        )
    scheme = _SCHEME.match(db)
    if scheme is not None:
        name = scheme.group(1)
        if name in POSTGRES_SCHEMES and db[scheme.end() :].startswith("//"):
            return db
        raise StoreError(
            f"the database {name}:... is not a file path or a postgresql:// URL (for a file whose"
            f" name has a colon, write ./{name}:...)"
        )
    if _KEYWORD.match(db):
        raise StoreError(
            "the database is a libpq key=value string: give a postgresql:// URL (host, port and"
            " other settings go in its query: postgresql:///dlrhub?host=/run/postgresql)"
        )
    return None


def open_store(db: str | Path) -> Store:
    """The store `db` names (a file path or a postgresql:// URL), opened (created and migrated).
    Raises StoreError saying why it cannot, naming the database without any password."""
    url = _postgres_url(db)
    if url is None:
        return SqliteStore(Path(db))
    return PostgresStore(url)


def database_name(db: str | Path) -> str:
    """`db` for logs: the path, or the PostgreSQL database named without its password."""
    try:
        url = _postgres_url(db)
    except StoreError:
        return "an unsupported database"
    return str(db) if url is None else describe(url)


def is_shared(db: str | Path) -> bool:
    """Whether the database `db` names may be written by several processes at once (PostgreSQL),
    told without opening it. Raises StoreError for what names no supported database."""
    return _postgres_url(db) is not None
