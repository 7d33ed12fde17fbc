"""The SQLite back end: one file, WAL, shared by any number of worker processes.

sqlite-utils creates and migrates the schema; the request path runs fixed SQL
strings straight on the connection, so the sqlite3 module's statement cache
keeps them prepared.

Durability: `synchronous=FULL` (the default) makes every commit survive a
power loss; group commit keeps that to one fsync per batch. `NORMAL` survives
the crash of any process but may lose the last commits on power loss.

Checkpoints are off the commit path: the writer's connection never
checkpoints (`wal_autocheckpoint = 0`); a background thread with its own
connection runs `PRAGMA wal_checkpoint(PASSIVE)` every CHECKPOINT_INTERVAL_S,
or sooner once the WAL has grown by CHECKPOINT_WAL_BYTES. PASSIVE never waits
for the write lock, so it never delays a commit; once it has copied the whole
WAL back, the next commit starts the WAL over from its beginning.

Writers serialize on `BEGIN IMMEDIATE`; `busy_timeout` makes a second worker
process wait for the lock instead of failing at once. Because the write
transaction is exclusive, allocating seqs and msg_ids inside it keeps every
inbox gapless and seq order equal to msg_id order.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import sqlite_utils

from .base import StoreBusy, StoreError, clamp_id
from .sql import FROZEN_CONVS_SCHEMA, GROUPS_SCHEMA, LAST_SEEN_MOVE, PRESENCE_SCHEMA, PRESENCE_SPAN_INDEX, SQLStore

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# Long enough to ride out another worker's group commit (one fsync plus a
# batch of a few hundred requests), short enough to surface a stuck writer.
DEFAULT_BUSY_TIMEOUT_MS = 10_000
# The background checkpoint runs at least this often,
CHECKPOINT_INTERVAL_S = 1.0
# and sooner when the WAL file has grown this much since the last one (what
# SQLite's own auto-checkpoint would let it grow: 1000 pages of 4 KiB).
CHECKPOINT_WAL_BYTES = 4 << 20
CHECKPOINT_POLL_S = 0.1
# A WAL file that grew past this is cut back to it when it starts over.
WAL_SIZE_LIMIT_BYTES = 64 << 20

log = logging.getLogger("simzmq.store")


def _create_v1(db: sqlite_utils.Database) -> None:
    db["users"].create(
        {"id": str, "pw_hash": str, "created_ms": int, "max_seq": int, "delivered": int},
        pk="id",
        not_null={"pw_hash", "created_ms", "max_seq", "delivered"},
        defaults={"max_seq": 0, "delivered": 0},
    )
    db["tokens"].create(
        {"token_hash": bytes, "user_id": str, "device": str, "expires_ms": int},
        pk="token_hash",
        not_null={"user_id", "device", "expires_ms"},
    )
    db["tokens"].create_index(["expires_ms"])
    # msg_id is the rowid: allocated max + 1 inside the exclusive write
    # transaction, so ids rise in commit order. The seqs are kept on the row
    # so a Send retry is answered from one lookup.
    db["messages"].create(
        {
            "msg_id": int,
            "sender": str,
            "recipient": str,
            "kind": int,
            "ts_ms": int,
            "cmid": bytes,
            "body": bytes,
            "sender_seq": int,
            "recipient_seq": int,
        },
        pk="msg_id",
        not_null={"sender", "recipient", "kind", "ts_ms", "cmid", "body", "sender_seq", "recipient_seq"},
    )
    # The idempotency record of Send.
    db["messages"].create_index(["sender", "cmid"], unique=True)
    # History pages and unread recounts walk one direction of a conversation.
    db["messages"].create_index(["sender", "recipient", "msg_id"])
    # inbox and conversations are looked up only by their composite keys, so
    # they are clustered on them (WITHOUT ROWID): one b-tree write per row
    # instead of a table plus an index.
    inbox_sql = db.create_table_sql(
        "inbox",
        {"user_id": str, "seq": int, "msg_id": int},
        pk=("user_id", "seq"),
        not_null={"msg_id"},
    )
    db.execute(inbox_sql.rstrip().rstrip(";") + " WITHOUT ROWID")
    conv_sql = db.create_table_sql(
        "conversations",
        {"user_id": str, "peer": str, "last_msg_id": int, "read_mark": int, "unread": int},
        pk=("user_id", "peer"),
        not_null={"last_msg_id", "read_mark", "unread"},
        defaults={"read_mark": 0, "unread": 0},
    )
    db.execute(conv_sql.rstrip().rstrip(";") + " WITHOUT ROWID")


def _groups_v2(db: sqlite_utils.Database) -> None:
    # The unique (sender, cmid) index becomes partial (GROUPS_SCHEMA).
    db.execute("DROP INDEX idx_messages_sender_cmid")
    for statement in GROUPS_SCHEMA:
        db.execute(statement)


def _push_v3(db: sqlite_utils.Database) -> None:
    # The push outbox (simzmq/push/): one row per user to wake of a message
    # (a group message has one per member), written in the message's
    # transaction; the dead-letter table keeps given-up ones.
    db.execute(
        "CREATE TABLE push_outbox (user_id TEXT NOT NULL, msg_id INTEGER NOT NULL, seq INTEGER NOT NULL,"
        " created_ms INTEGER NOT NULL, due_ms INTEGER NOT NULL, attempts INTEGER NOT NULL,"
        " lease_until INTEGER NOT NULL, lease_token TEXT NOT NULL, last_error TEXT NOT NULL,"
        " PRIMARY KEY (user_id, msg_id)) WITHOUT ROWID")
    db.execute("CREATE INDEX push_outbox_due ON push_outbox (due_ms, msg_id)")
    db.execute("CREATE INDEX push_outbox_lease ON push_outbox (lease_token)")
    db.execute(
        "CREATE TABLE push_dead (user_id TEXT NOT NULL, msg_id INTEGER NOT NULL, seq INTEGER NOT NULL,"
        " created_ms INTEGER NOT NULL, attempts INTEGER NOT NULL, died_ms INTEGER NOT NULL,"
        " last_error TEXT NOT NULL, PRIMARY KEY (user_id, msg_id)) WITHOUT ROWID")
    db.execute("CREATE INDEX push_dead_msg ON push_dead (msg_id)")


def _presence_v4(db: sqlite_utils.Database) -> None:
    # Presence (section 7): last_seen_ms, the gates' leases and local states.
    for statement in PRESENCE_SCHEMA:
        db.execute(statement)


def _frozen_convs_v5(db: sqlite_utils.Database) -> None:
    # A former member's Conv with a group stays as at its removal (section 7).
    for statement in FROZEN_CONVS_SCHEMA:
        db.execute(statement)


def _last_seen_v6(db: sqlite_utils.Database) -> None:
    # last_seen_ms leaves the users row for a table of its own (LAST_SEEN_MOVE).
    db.execute("CREATE TABLE last_seen (user_id TEXT PRIMARY KEY, last_seen_ms INTEGER NOT NULL) WITHOUT ROWID")
    for statement in LAST_SEEN_MOVE:
        db.execute(statement)


def _presence_span_v7(db: sqlite_utils.Database) -> None:
    # Snapshot parts read their span of a gate's rows (PRESENCE_SPAN_INDEX).
    for statement in PRESENCE_SPAN_INDEX:
        db.execute(statement.format(byte_order=""))


# PRAGMA user_version N means MIGRATIONS[:N] have run.
MIGRATIONS = [_create_v1, _groups_v2, _push_v3, _presence_v4, _frozen_convs_v5, _last_seen_v6, _presence_span_v7]


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


# SQLite's own wal_autocheckpoint default, in pages.
SQLITE_DEFAULT_AUTOCHECKPOINT_PAGES = 1000


class Checkpointer:
    """A thread that checkpoints the WAL of `path` through its own connection."""

    def __init__(self, path: str, synchronous: str, on_failure=None):
        self.path = path
        self.synchronous = synchronous
        self.checkpoints = 0  # how many have run, for tests and curiosity
        # Called (from this thread) if the thread cannot go on, so the writer
        # checkpoints again itself rather than let the WAL grow without end.
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _wal_size(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def _run(self) -> None:
        try:
            self._checkpoint_until_stopped()
        except Exception:
            log.exception("the WAL checkpoint thread of %s stopped; commits checkpoint again", self.path)
            if self.on_failure is not None:
                self.on_failure()

    def _checkpoint_until_stopped(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # The checkpoint syncs the database file as the writer would have.
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            last_size = 0
            last_at = time.monotonic()
            while not self._stop.wait(CHECKPOINT_POLL_S):
                size = self._wal_size()
                now = time.monotonic()
                grown = size - last_size >= CHECKPOINT_WAL_BYTES
                if not grown and (now - last_at < CHECKPOINT_INTERVAL_S or size == 0):
                    continue
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("checkpoint of %s failed: %s", self.path, exc)
                self.checkpoints += 1
                last_size = self._wal_size()
                last_at = now
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class SQLiteStore(SQLStore):
    _NO_LIMIT = -1
    _FOR_UPDATE = ""
    _BYTE_ORDER = ""  # text compares with memcmp (BINARY) unless told otherwise
    _LOCK_ROWS = ""
    _SKIP_LOCKED = ""

    def __init__(
        self,
        path: str,
        synchronous: str = "FULL",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"sqlite synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        self.path = path
        self.synchronous = mode
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
        # isolation_level=None: the module never opens transactions behind our
        # back; transaction() issues BEGIN and COMMIT itself.
        self.conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if path != ":memory:":
            self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {mode}")
        # Keep the hot index pages (users, recent inbox and message ids) in
        # memory: 32 MiB per worker.
        self.conn.execute("PRAGMA cache_size = -32768")
        # The shared queries are written in sqlite3's own placeholder style.
        self._execute = self.conn.execute
        self._executemany = self.conn.executemany
        self.db = sqlite_utils.Database(self.conn, execute_plugins=False)
        self._migrate()
        self.checkpointer = None
        self._checkpointer_failed = threading.Event()
        if path != ":memory:":
            # No commit of ours ever checkpoints: the checkpointer does.
            self.conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
            self.checkpointer = Checkpointer(path, mode, on_failure=self._checkpointer_failed.set)

    def _migrate(self) -> None:
        (version,) = self.conn.execute("PRAGMA user_version").fetchone()
        if version >= len(MIGRATIONS):
            return
        # Several workers may open a fresh file at once: the write lock makes
        # exactly one of them run each migration.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self.conn.execute("PRAGMA user_version").fetchone()
            for step in range(version, len(MIGRATIONS)):
                MIGRATIONS[step](self.db)
                self.conn.execute(f"PRAGMA user_version = {step + 1}")
            self.conn.execute("COMMIT")
            if version < len(MIGRATIONS):
                log.info("store %s: schema version %d -> %d", self.describe(), version, len(MIGRATIONS))
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.conn.in_transaction:
            raise StoreError("a transaction is already open")
        if self._checkpointer_failed.is_set():
            # The checkpoint thread is gone: commits checkpoint again (SQLite's
            # default), on this thread, which owns the connection.
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_DEFAULT_AUTOCHECKPOINT_PAGES}")
            self._checkpointer_failed.clear()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise StoreBusy(str(exc)) from exc
            raise
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if _is_busy(exc):
                raise StoreBusy(str(exc)) from exc
            raise

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self.conn.close()

    def describe(self) -> str:
        return f"sqlite {self.path} (WAL, synchronous={self.synchronous})"

    # presence (the rest is in SQLStore)

    def lock_presence(self, users: Sequence[str]) -> None:
        pass  # BEGIN IMMEDIATE: one write transaction at a time holds the whole database

    # inbox (the rest is in SQLStore)

    def new_msg_ids(self, count: int) -> list[int]:
        # The write transaction is exclusive, so max + 1 ... is ours.
        (top,) = self.conn.execute("SELECT COALESCE(MAX(msg_id), 0) FROM messages").fetchone()
        return list(range(top + 1, top + 1 + count))

    def raise_delivered(self, user: str, since: int) -> None:
        since = clamp_id(since)
        self.conn.execute(
            "UPDATE users SET delivered = MIN(?, max_seq) WHERE id = ? AND delivered < MIN(?, max_seq)",
            (since, user, since),
        )
