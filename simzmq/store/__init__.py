"""Storage: one interface (base.Store), an SQLite and a Postgres back end.

`open_store` takes

* a URL: `sqlite:///abs/path/im.db` (also `sqlite:////abs/path/im.db`),
  `sqlite:relative/im.db`, `sqlite://:memory:`, a plain file path, or a
  `postgresql://` / `postgres://` DSN; SQLite URLs may carry
  `?synchronous=NORMAL&busy_timeout_ms=5000`;
* or a mapping shaped like the `[im]` section of conf/simzmq.toml:
  `store` ("sqlite" or a DSN), `sqlite_path` (relative to `data_dir` when
  that key is given), `sqlite_synchronous`, `sqlite_busy_timeout_ms`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .base import (
    Appended,
    Conv,
    DeadJob,
    DuplicateSend,
    HistoryMsg,
    Msg,
    NewMessage,
    PushJob,
    PushJobRow,
    PushStats,
    SentRecord,
    Store,
    StoreBusy,
    StoreError,
    UnknownUser,
    msg_wire_size,
)

__all__ = [
    "Appended",
    "Conv",
    "DeadJob",
    "DuplicateSend",
    "HistoryMsg",
    "Msg",
    "NewMessage",
    "PushJob",
    "PushJobRow",
    "PushStats",
    "SentRecord",
    "Store",
    "StoreBusy",
    "StoreError",
    "UnknownUser",
    "msg_wire_size",
    "open_store",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def _open_sqlite_url(url: str, synchronous: str | None, busy_timeout_ms: int | None) -> Store:
    from .sqlite import DEFAULT_BUSY_TIMEOUT_MS, SQLiteStore

    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.netloc == ":memory:" or parts.path in ("", ":memory:", "/:memory:"):
        path = ":memory:"
    else:
        path = parts.path
        if path.startswith("//"):  # sqlite:////abs/path, SQLAlchemy's spelling
            path = "/" + path.lstrip("/")
        if parts.netloc:  # sqlite://host/... names no host we could use
            raise ValueError(f"sqlite URL with a host: {url!r}; use sqlite:///absolute/path")
    if synchronous is None:
        synchronous = query.get("synchronous", "FULL")
    if busy_timeout_ms is None:
        busy_timeout_ms = int(query.get("busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS))
    return SQLiteStore(path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms)


def open_store(
    url_or_config: str | os.PathLike | Mapping[str, Any],
    *,
    synchronous: str | None = None,
    busy_timeout_ms: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Store:
    if isinstance(url_or_config, Mapping):
        conf = url_or_config
        target = str(conf.get("store", "sqlite"))
        if synchronous is None and conf.get("sqlite_synchronous") is not None:
            synchronous = str(conf["sqlite_synchronous"])
        if busy_timeout_ms is None and conf.get("sqlite_busy_timeout_ms") is not None:
            busy_timeout_ms = int(conf["sqlite_busy_timeout_ms"])
        if data_dir is None and conf.get("data_dir") is not None:
            data_dir = conf["data_dir"]
        if target == "sqlite":
            path = str(conf.get("sqlite_path", "im.db"))
            if data_dir is not None and path != ":memory:":
                path = os.path.join(os.fspath(data_dir), path)
            from .sqlite import DEFAULT_BUSY_TIMEOUT_MS, SQLiteStore

            return SQLiteStore(
                path,
                synchronous=synchronous or "FULL",
                busy_timeout_ms=DEFAULT_BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms,
            )
        url_or_config = target

    url = os.fspath(url_or_config)
    scheme = urlsplit(url).scheme.lower() if "://" in url or url.startswith("sqlite:") else ""
    if scheme in POSTGRES_SCHEMES:
        from .postgres import PostgresStore

        return PostgresStore(url)
    if scheme == "sqlite":
        return _open_sqlite_url(url, synchronous, busy_timeout_ms)
    if scheme:
        raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r}")
    # A plain path names an SQLite file (relative to data_dir when given).
    from .sqlite import DEFAULT_BUSY_TIMEOUT_MS, SQLiteStore

    if data_dir is not None and url != ":memory:":
        url = os.path.join(os.fspath(data_dir), url)
    return SQLiteStore(
        url,
        synchronous=synchronous or "FULL",
        busy_timeout_ms=DEFAULT_BUSY_TIMEOUT_MS if busy_timeout_ms is None else busy_timeout_ms,
    )
