"""The SQLite back end: one file, WAL, shared by any number of worker processes.

sqlite-utils creates and migrates the schema; the request path runs fixed SQL
strings straight on the connection, so the sqlite3 module's statement cache
keeps them prepared.

Durability: `synchronous=FULL` (the default) makes every commit survive a
power loss; group commit keeps that to one fsync per batch. `NORMAL` survives
the crash of any process but may lose the last commits on power loss.

Writers serialize on `BEGIN IMMEDIATE`; `busy_timeout` makes a second worker
process wait for the lock instead of failing at once. Because the write
transaction is exclusive, allocating seqs and msg_ids inside it keeps every
inbox gapless and seq order equal to msg_id order.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator

import sqlite_utils

from .base import (
    Appended,
    Conv,
    DuplicateSend,
    HistoryMsg,
    Msg,
    SentRecord,
    Store,
    StoreBusy,
    StoreError,
    UnknownUser,
    ID_CEILING,
    clamp_history_limit,
    clamp_id,
    clamp_sync_limit,
)

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# Long enough to ride out another worker's group commit (one fsync plus a
# batch of a few hundred requests), short enough to surface a stuck writer.
DEFAULT_BUSY_TIMEOUT_MS = 10_000


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


# PRAGMA user_version N means MIGRATIONS[:N] have run.
MIGRATIONS = [_create_v1]


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SQLiteStore(Store):
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
        # back; transaction() and savepoint() issue BEGIN/SAVEPOINT themselves.
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
        self.db = sqlite_utils.Database(self.conn, execute_plugins=False)
        self._migrate()
        self._savepoint_depth = 0

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
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.conn.in_transaction:
            raise StoreError("a transaction is already open")
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

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self._savepoint_depth += 1
        name = f"request_{self._savepoint_depth}"
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            # An error that already ended the whole transaction leaves no
            # savepoint to roll back to; the original exception matters more.
            if self.conn.in_transaction:
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
            raise
        else:
            self.conn.execute(f"RELEASE {name}")
        finally:
            self._savepoint_depth -= 1

    def close(self) -> None:
        self.conn.close()

    def describe(self) -> str:
        return f"sqlite {self.path} (WAL, synchronous={self.synchronous})"

    # users and credentials

    def create_user(self, user: str, pw_hash: str, now_ms: int) -> bool:
        cur = self.conn.execute(
            "INSERT INTO users (id, pw_hash, created_ms, max_seq, delivered) VALUES (?, ?, ?, 0, 0)"
            " ON CONFLICT (id) DO NOTHING",
            (user, pw_hash, now_ms),
        )
        return cur.rowcount == 1

    def get_password_hash(self, user: str) -> str | None:
        row = self.conn.execute("SELECT pw_hash FROM users WHERE id = ?", (user,)).fetchone()
        return row[0] if row else None

    def user_exists(self, user: str) -> bool:
        return self.conn.execute("SELECT 1 FROM users WHERE id = ?", (user,)).fetchone() is not None

    def add_token(self, user: str, token_hash: bytes, device: str, expires_ms: int) -> None:
        self.conn.execute(
            "INSERT INTO tokens (token_hash, user_id, device, expires_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (token_hash) DO UPDATE SET user_id = excluded.user_id,"
            " device = excluded.device, expires_ms = excluded.expires_ms",
            (bytes(token_hash), user, device, expires_ms),
        )

    def check_token(self, user: str, token_hash: bytes, now_ms: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM tokens WHERE token_hash = ? AND user_id = ? AND expires_ms > ?",
            (bytes(token_hash), user, now_ms),
        ).fetchone()
        return row is not None

    def token_user(self, token_hash: bytes, now_ms: int) -> str | None:
        row = self.conn.execute(
            "SELECT user_id FROM tokens WHERE token_hash = ? AND expires_ms > ?",
            (bytes(token_hash), now_ms),
        ).fetchone()
        return row[0] if row else None

    def revoke_token(self, token_hash: bytes) -> None:
        self.conn.execute("DELETE FROM tokens WHERE token_hash = ?", (bytes(token_hash),))

    def purge_expired(self, now_ms: int) -> int:
        return self.conn.execute("DELETE FROM tokens WHERE expires_ms <= ?", (now_ms,)).rowcount

    # inbox

    def max_seq(self, user: str) -> int:
        row = self.conn.execute("SELECT max_seq FROM users WHERE id = ?", (user,)).fetchone()
        return row[0] if row else 0

    def delivered_mark(self, user: str) -> int:
        row = self.conn.execute("SELECT delivered FROM users WHERE id = ?", (user,)).fetchone()
        return row[0] if row else 0

    def find_send(self, sender: str, cmid: bytes) -> SentRecord | None:
        row = self.conn.execute(
            "SELECT msg_id, sender_seq, ts_ms, recipient, kind, body, recipient_seq FROM messages"
            " WHERE sender = ? AND cmid = ?",
            (sender, bytes(cmid)),
        ).fetchone()
        return SentRecord(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), row[6]) if row else None

    def _next_seq(self, user: str) -> int | None:
        rows = self.conn.execute(
            "UPDATE users SET max_seq = max_seq + 1 WHERE id = ? RETURNING max_seq", (user,)
        ).fetchall()
        return rows[0][0] if rows else None

    def _undo_seq(self, user: str) -> None:
        self.conn.execute("UPDATE users SET max_seq = max_seq - 1 WHERE id = ?", (user,))

    def append_message(
        self, sender: str, to: str, cmid: bytes, kind: int, body: bytes, ts_ms: int
    ) -> Appended:
        cmid = bytes(cmid)
        body = bytes(body)
        # The recipient first: it is the one that may not exist, and a failure
        # before any write needs no undo.
        recipient_seq = self._next_seq(to)
        if recipient_seq is None:
            raise UnknownUser(to)
        if sender == to:
            sender_seq = recipient_seq
        else:
            sender_seq = self._next_seq(sender)
            if sender_seq is None:
                self._undo_seq(to)
                raise UnknownUser(sender)
        try:
            rows = self.conn.execute(
                "INSERT INTO messages (sender, recipient, kind, ts_ms, cmid, body, sender_seq, recipient_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING msg_id",
                (sender, to, kind, ts_ms, cmid, body, sender_seq, recipient_seq),
            ).fetchall()
        except sqlite3.IntegrityError as exc:
            # Leave the inboxes as they were, so a caller without a savepoint
            # is not left with a gap.
            self._undo_seq(to)
            if sender != to:
                self._undo_seq(sender)
            raise DuplicateSend((sender, cmid)) from exc
        msg_id = rows[0][0]
        if sender == to:
            self.conn.execute(
                "INSERT INTO inbox (user_id, seq, msg_id) VALUES (?, ?, ?)", (sender, sender_seq, msg_id)
            )
            # Messages to oneself are one's own: they never count as unread.
            self.conn.execute(
                "INSERT INTO conversations (user_id, peer, last_msg_id, read_mark, unread)"
                " VALUES (?, ?, ?, 0, 0)"
                " ON CONFLICT (user_id, peer) DO UPDATE SET last_msg_id = excluded.last_msg_id",
                (sender, sender, msg_id),
            )
        else:
            self.conn.execute(
                "INSERT INTO inbox (user_id, seq, msg_id) VALUES (?, ?, ?), (?, ?, ?)",
                (sender, sender_seq, msg_id, to, recipient_seq, msg_id),
            )
            # The new msg_id is above any read mark, so it is unread for the
            # recipient and not for the sender.
            self.conn.execute(
                "INSERT INTO conversations (user_id, peer, last_msg_id, read_mark, unread)"
                " VALUES (?, ?, ?, 0, 0), (?, ?, ?, 0, 1)"
                " ON CONFLICT (user_id, peer) DO UPDATE SET last_msg_id = excluded.last_msg_id,"
                " unread = unread + excluded.unread",
                (sender, to, msg_id, to, sender, msg_id),
            )
        return Appended(msg_id, ts_ms, sender_seq, recipient_seq)

    def sync(self, user: str, since: int, limit: int, max_bytes: int) -> tuple[list[Msg], bool]:
        limit = clamp_sync_limit(limit)
        since = clamp_id(since)
        cur = self.conn.execute(
            "SELECT m.msg_id, i.seq, m.sender, m.recipient, m.kind, m.ts_ms, m.cmid, m.body"
            " FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
            " WHERE i.user_id = ? AND i.seq > ? ORDER BY i.seq LIMIT ?",
            (user, since, limit + 1),
        )
        try:
            return self._fill_batch(cur, limit, max_bytes)
        finally:
            cur.close()

    def raise_delivered(self, user: str, since: int) -> None:
        since = clamp_id(since)
        self.conn.execute(
            "UPDATE users SET delivered = MIN(?, max_seq) WHERE id = ? AND delivered < MIN(?, max_seq)",
            (since, user, since),
        )

    # conversations

    def conversation_of(self, user: str, peer: str, msg_id: int) -> bool:
        msg_id = clamp_id(msg_id)
        row = self.conn.execute(
            "SELECT 1 FROM messages WHERE msg_id = ?"
            " AND ((sender = ? AND recipient = ?) OR (sender = ? AND recipient = ?))",
            (msg_id, user, peer, peer, user),
        ).fetchone()
        return row is not None

    def raise_read_mark(self, user: str, peer: str, msg_id: int) -> bool:
        msg_id = clamp_id(msg_id)
        if user == peer:
            unread_sql = "0"
            params: tuple = (msg_id, user, peer, msg_id, msg_id)
        else:
            unread_sql = (
                "(SELECT count(*) FROM messages WHERE sender = ? AND recipient = ? AND msg_id > ?)"
            )
            params = (msg_id, peer, user, msg_id, user, peer, msg_id, msg_id)
        cur = self.conn.execute(
            f"UPDATE conversations SET read_mark = ?, unread = {unread_sql}"
            " WHERE user_id = ? AND peer = ? AND read_mark < ? AND last_msg_id >= ?",
            params,
        )
        return cur.rowcount == 1

    def peer_read_mark(self, user: str, peer: str) -> int:
        row = self.conn.execute(
            "SELECT read_mark FROM conversations WHERE user_id = ? AND peer = ?", (peer, user)
        ).fetchone()
        return row[0] if row else 0

    def conversations(self, user: str, limit: int | None = None) -> list[Conv]:
        rows = self.conn.execute(
            "SELECT c.peer, c.last_msg_id, c.unread, COALESCE(p.read_mark, 0)"
            " FROM conversations c LEFT JOIN conversations p ON p.user_id = c.peer AND p.peer = c.user_id"
            " WHERE c.user_id = ? ORDER BY c.last_msg_id DESC LIMIT ?",
            (user, -1 if limit is None else limit),
        ).fetchall()
        return [Conv(*row) for row in rows]

    def history(
        self, user: str, peer: str, before: int, limit: int
    ) -> tuple[list[HistoryMsg], bool]:
        limit = clamp_history_limit(limit)
        bound = clamp_id(before) if before > 0 else ID_CEILING
        columns = (
            "SELECT msg_id, CASE WHEN sender = ? THEN sender_seq ELSE recipient_seq END AS seq,"
            " sender, recipient, kind, ts_ms, cmid, body FROM messages"
        )
        if user == peer:
            rows = self.conn.execute(
                f"{columns} WHERE sender = ? AND recipient = ? AND msg_id < ?"
                " ORDER BY msg_id DESC LIMIT ?",
                (user, user, user, bound, limit + 1),
            ).fetchall()
        else:
            # Each direction is one range of the (sender, recipient, msg_id)
            # index; merging the two newest-first runs avoids a full sort.
            rows = self.conn.execute(
                f"SELECT * FROM ({columns} WHERE sender = ? AND recipient = ? AND msg_id < ?"
                " ORDER BY msg_id DESC LIMIT ?)"
                f" UNION ALL SELECT * FROM ({columns} WHERE sender = ? AND recipient = ? AND msg_id < ?"
                " ORDER BY msg_id DESC LIMIT ?)"
                " ORDER BY msg_id DESC LIMIT ?",
                (user, user, peer, bound, limit + 1, user, peer, user, bound, limit + 1, limit + 1),
            ).fetchall()
        more = len(rows) > limit
        return [
            Msg(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bytes(r[7])) for r in rows[:limit]
        ], more
