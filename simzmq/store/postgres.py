"""The Postgres back end (psycopg 3): the path to several machines.

`synchronous_commit=on`: a commit returns once its WAL is flushed, so SendOk
survives a power loss of the database server; group commit keeps that to one
flush per batch.

Ordering: several workers may write at once. An append first locks the
sender's and recipient's user rows (sorted by id, so two opposite sends
cannot deadlock each other), and only then allocates seqs and the msg_id,
so within a conversation seq order and msg_id order agree in both inboxes.
The whole append is one server-side function: one round trip per message.

Locks are held until the batch commits, so two workers' batches can still
deadlock on user rows; Postgres then aborts one statement, which surfaces as
StoreBusy after the request's savepoint has been rolled back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg import errors as pg_errors

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

# Taken while migrating, so workers starting together migrate once.
MIGRATION_LOCK_KEY = 0x73696D7A6D71  # "simzmq"

APPEND_OK = 0
APPEND_UNKNOWN_USER = 1
APPEND_DUPLICATE = 2

_SCHEMA_V1 = """
CREATE TABLE users (
    id          text COLLATE "C" PRIMARY KEY,
    pw_hash     text   NOT NULL,
    created_ms  bigint NOT NULL,
    max_seq     bigint NOT NULL DEFAULT 0,
    delivered   bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);  -- room for HOT updates of max_seq
CREATE TABLE tokens (
    token_hash  bytea PRIMARY KEY,
    user_id     text COLLATE "C" NOT NULL,
    device      text   NOT NULL,
    expires_ms  bigint NOT NULL
);
CREATE INDEX tokens_expires ON tokens (expires_ms);
CREATE SEQUENCE messages_msg_id_seq;
CREATE TABLE messages (
    msg_id        bigint PRIMARY KEY,
    sender        text COLLATE "C" NOT NULL,
    recipient     text COLLATE "C" NOT NULL,
    kind          smallint NOT NULL,
    ts_ms         bigint NOT NULL,
    cmid          bytea  NOT NULL,
    body          bytea  NOT NULL,
    sender_seq    bigint NOT NULL,
    recipient_seq bigint NOT NULL,
    UNIQUE (sender, cmid)
);
CREATE INDEX messages_conversation ON messages (sender, recipient, msg_id);
CREATE TABLE inbox (
    user_id text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    msg_id  bigint NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE TABLE conversations (
    user_id     text COLLATE "C" NOT NULL,
    peer        text COLLATE "C" NOT NULL,
    last_msg_id bigint  NOT NULL,
    read_mark   bigint  NOT NULL DEFAULT 0,
    unread      integer NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, peer)
) WITH (fillfactor = 70);  -- every message updates two rows in place

-- Returns status 0 (stored), 1 (a user does not exist) or 2 ((sender, cmid)
-- is already stored). The failures write nothing and raise nothing, so the
-- caller's transaction stays usable.
CREATE FUNCTION simzmq_append(
    p_sender text, p_to text, p_cmid bytea, p_kind smallint, p_body bytea, p_ts bigint,
    OUT status smallint, OUT new_msg_id bigint, OUT s_seq bigint, OUT r_seq bigint
) LANGUAGE plpgsql AS $fn$
DECLARE
    first_seq bigint;
    second_seq bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM messages WHERE sender = p_sender AND cmid = p_cmid) THEN
        status := 2;
        RETURN;
    END IF;
    -- Each UPDATE locks its user row; taking them in id order means two
    -- opposite sends cannot deadlock. Both are locked before the msg_id is
    -- drawn, so seq order and msg_id order agree in both inboxes.
    IF p_sender = p_to THEN
        UPDATE users SET max_seq = max_seq + 1 WHERE id = p_to RETURNING max_seq INTO r_seq;
        IF NOT FOUND THEN
            status := 1;
            RETURN;
        END IF;
        s_seq := r_seq;
    ELSE
        UPDATE users SET max_seq = max_seq + 1 WHERE id = LEAST(p_sender, p_to) RETURNING max_seq INTO first_seq;
        IF NOT FOUND THEN
            status := 1;
            RETURN;
        END IF;
        UPDATE users SET max_seq = max_seq + 1 WHERE id = GREATEST(p_sender, p_to) RETURNING max_seq INTO second_seq;
        IF NOT FOUND THEN
            UPDATE users SET max_seq = max_seq - 1 WHERE id = LEAST(p_sender, p_to);
            status := 1;
            RETURN;
        END IF;
        IF p_sender < p_to THEN
            s_seq := first_seq;
            r_seq := second_seq;
        ELSE
            s_seq := second_seq;
            r_seq := first_seq;
        END IF;
    END IF;
    new_msg_id := nextval('messages_msg_id_seq');
    INSERT INTO messages (msg_id, sender, recipient, kind, ts_ms, cmid, body, sender_seq, recipient_seq)
        VALUES (new_msg_id, p_sender, p_to, p_kind, p_ts, p_cmid, p_body, s_seq, r_seq);
    IF p_sender = p_to THEN
        INSERT INTO inbox (user_id, seq, msg_id) VALUES (p_sender, s_seq, new_msg_id);
        -- Messages to oneself are one's own: they never count as unread.
        INSERT INTO conversations (user_id, peer, last_msg_id, read_mark, unread)
            VALUES (p_sender, p_sender, new_msg_id, 0, 0)
            ON CONFLICT (user_id, peer) DO UPDATE SET last_msg_id = EXCLUDED.last_msg_id;
    ELSE
        INSERT INTO inbox (user_id, seq, msg_id)
            VALUES (p_sender, s_seq, new_msg_id), (p_to, r_seq, new_msg_id);
        -- The new msg_id is above any read mark: unread for the recipient only.
        INSERT INTO conversations AS c (user_id, peer, last_msg_id, read_mark, unread)
            VALUES (p_sender, p_to, new_msg_id, 0, 0), (p_to, p_sender, new_msg_id, 0, 1)
            ON CONFLICT (user_id, peer) DO UPDATE
            SET last_msg_id = EXCLUDED.last_msg_id, unread = c.unread + EXCLUDED.unread;
    END IF;
    status := 0;
END
$fn$;
"""

MIGRATIONS = [_SCHEMA_V1]

# SQLSTATEs of transient conflicts: deadlock, serialization failure, lock
# timeout, cancelled statement (statement_timeout).
_BUSY_ERRORS = (
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
    pg_errors.LockNotAvailable,
    pg_errors.QueryCanceled,
)


class PostgresStore(Store):
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        # autocommit: transaction() and savepoint() say where transactions
        # begin and end; outside them each read stands alone.
        self.conn = psycopg.connect(dsn, autocommit=True)
        # Prepare the fixed statements from their first use.
        self.conn.prepare_threshold = 0
        self.conn.execute("SET synchronous_commit = on")
        self._migrate()

    def _migrate(self) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
            )
            row = self.conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
            else:
                version = row[0]
            for step in range(version, len(MIGRATIONS)):
                self.conn.execute(MIGRATIONS[step], prepare=False)
                self.conn.execute("UPDATE schema_version SET version = %s", (step + 1,))

    # transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise StoreError("a transaction is already open")
        try:
            with self.conn.transaction():
                yield
        except _BUSY_ERRORS as exc:
            raise StoreBusy(str(exc)) from exc

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        try:
            with self.conn.transaction():
                yield
        except _BUSY_ERRORS as exc:
            raise StoreBusy(str(exc)) from exc

    def close(self) -> None:
        self.conn.close()

    def describe(self) -> str:
        info = self.conn.info
        where = info.host if info.host.startswith("/") else f"{info.host}:{info.port}"
        return f"postgres {info.user}@{where}/{info.dbname} (synchronous_commit=on)"

    # users and credentials

    def create_user(self, user: str, pw_hash: str, now_ms: int) -> bool:
        cur = self.conn.execute(
            "INSERT INTO users (id, pw_hash, created_ms) VALUES (%s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING",
            (user, pw_hash, now_ms),
        )
        return cur.rowcount == 1

    def get_password_hash(self, user: str) -> str | None:
        row = self.conn.execute("SELECT pw_hash FROM users WHERE id = %s", (user,)).fetchone()
        return row[0] if row else None

    def user_exists(self, user: str) -> bool:
        return self.conn.execute("SELECT 1 FROM users WHERE id = %s", (user,)).fetchone() is not None

    def add_token(self, user: str, token_hash: bytes, device: str, expires_ms: int) -> None:
        self.conn.execute(
            "INSERT INTO tokens (token_hash, user_id, device, expires_ms) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (token_hash) DO UPDATE SET user_id = EXCLUDED.user_id,"
            " device = EXCLUDED.device, expires_ms = EXCLUDED.expires_ms",
            (bytes(token_hash), user, device, expires_ms),
        )

    def check_token(self, user: str, token_hash: bytes, now_ms: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM tokens WHERE token_hash = %s AND user_id = %s AND expires_ms > %s",
            (bytes(token_hash), user, now_ms),
        ).fetchone()
        return row is not None

    def token_user(self, token_hash: bytes, now_ms: int) -> str | None:
        row = self.conn.execute(
            "SELECT user_id FROM tokens WHERE token_hash = %s AND expires_ms > %s",
            (bytes(token_hash), now_ms),
        ).fetchone()
        return row[0] if row else None

    def revoke_token(self, token_hash: bytes) -> None:
        self.conn.execute("DELETE FROM tokens WHERE token_hash = %s", (bytes(token_hash),))

    def purge_expired(self, now_ms: int) -> int:
        return self.conn.execute("DELETE FROM tokens WHERE expires_ms <= %s", (now_ms,)).rowcount

    # inbox

    def max_seq(self, user: str) -> int:
        row = self.conn.execute("SELECT max_seq FROM users WHERE id = %s", (user,)).fetchone()
        return row[0] if row else 0

    def delivered_mark(self, user: str) -> int:
        row = self.conn.execute("SELECT delivered FROM users WHERE id = %s", (user,)).fetchone()
        return row[0] if row else 0

    def find_send(self, sender: str, cmid: bytes) -> SentRecord | None:
        row = self.conn.execute(
            "SELECT msg_id, sender_seq, ts_ms, recipient, kind, body, recipient_seq FROM messages"
            " WHERE sender = %s AND cmid = %s",
            (sender, bytes(cmid)),
        ).fetchone()
        return SentRecord(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), row[6]) if row else None

    def append_message(
        self, sender: str, to: str, cmid: bytes, kind: int, body: bytes, ts_ms: int
    ) -> Appended:
        cmid = bytes(cmid)
        status, msg_id, sender_seq, recipient_seq = self.conn.execute(
            "SELECT * FROM simzmq_append(%s, %s, %s, %s::smallint, %s, %s)",
            (sender, to, cmid, kind, bytes(body), ts_ms),
        ).fetchone()
        if status == APPEND_UNKNOWN_USER:
            raise UnknownUser(to if sender != to and self.user_exists(sender) else sender)
        if status == APPEND_DUPLICATE:
            raise DuplicateSend((sender, cmid))
        return Appended(msg_id, ts_ms, sender_seq, recipient_seq)

    def sync(self, user: str, since: int, limit: int, max_bytes: int) -> tuple[list[Msg], bool]:
        limit = clamp_sync_limit(limit)
        since = clamp_id(since)
        cur = self.conn.execute(
            "SELECT m.msg_id, i.seq, m.sender, m.recipient, m.kind, m.ts_ms, m.cmid, m.body"
            " FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
            " WHERE i.user_id = %s AND i.seq > %s ORDER BY i.seq LIMIT %s",
            (user, since, limit + 1),
        )
        return self._fill_batch(cur, limit, max_bytes)

    def raise_delivered(self, user: str, since: int) -> None:
        since = clamp_id(since)
        self.conn.execute(
            "UPDATE users SET delivered = LEAST(%s, max_seq)"
            " WHERE id = %s AND delivered < LEAST(%s, max_seq)",
            (since, user, since),
        )

    # conversations

    def conversation_of(self, user: str, peer: str, msg_id: int) -> bool:
        msg_id = clamp_id(msg_id)
        row = self.conn.execute(
            "SELECT 1 FROM messages WHERE msg_id = %s"
            " AND ((sender = %s AND recipient = %s) OR (sender = %s AND recipient = %s))",
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
                "(SELECT count(*) FROM messages WHERE sender = %s AND recipient = %s AND msg_id > %s)"
            )
            params = (msg_id, peer, user, msg_id, user, peer, msg_id, msg_id)
        cur = self.conn.execute(
            f"UPDATE conversations SET read_mark = %s, unread = {unread_sql}"
            " WHERE user_id = %s AND peer = %s AND read_mark < %s AND last_msg_id >= %s",
            params,
        )
        return cur.rowcount == 1

    def peer_read_mark(self, user: str, peer: str) -> int:
        row = self.conn.execute(
            "SELECT read_mark FROM conversations WHERE user_id = %s AND peer = %s", (peer, user)
        ).fetchone()
        return row[0] if row else 0

    def conversations(self, user: str, limit: int | None = None) -> list[Conv]:
        rows = self.conn.execute(
            "SELECT c.peer, c.last_msg_id, c.unread, COALESCE(p.read_mark, 0)"
            " FROM conversations c"
            " LEFT JOIN conversations p ON p.user_id = c.peer AND p.peer = c.user_id"
            " WHERE c.user_id = %s ORDER BY c.last_msg_id DESC LIMIT %s",
            (user, limit),
        ).fetchall()
        return [Conv(*row) for row in rows]

    def history(
        self, user: str, peer: str, before: int, limit: int
    ) -> tuple[list[HistoryMsg], bool]:
        limit = clamp_history_limit(limit)
        bound = clamp_id(before) if before > 0 else ID_CEILING
        columns = (
            "SELECT msg_id, CASE WHEN sender = %s THEN sender_seq ELSE recipient_seq END AS seq,"
            " sender, recipient, kind, ts_ms, cmid, body FROM messages"
        )
        if user == peer:
            rows = self.conn.execute(
                f"{columns} WHERE sender = %s AND recipient = %s AND msg_id < %s"
                " ORDER BY msg_id DESC LIMIT %s",
                (user, user, user, bound, limit + 1),
            ).fetchall()
        else:
            rows = self.conn.execute(
                f"({columns} WHERE sender = %s AND recipient = %s AND msg_id < %s"
                " ORDER BY msg_id DESC LIMIT %s)"
                f" UNION ALL ({columns} WHERE sender = %s AND recipient = %s AND msg_id < %s"
                " ORDER BY msg_id DESC LIMIT %s)"
                " ORDER BY msg_id DESC LIMIT %s",
                (user, user, peer, bound, limit + 1, user, peer, user, bound, limit + 1, limit + 1),
            ).fetchall()
        more = len(rows) > limit
        return [
            Msg(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bytes(r[7])) for r in rows[:limit]
        ], more
