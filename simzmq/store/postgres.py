"""The Postgres back end (psycopg 3): the path to several machines.

`synchronous_commit=on`: a commit returns once its WAL is flushed, so SendOk
survives a power loss of the database server; group commit keeps that to one
flush per batch.

Ordering: several workers may write at once. Every transaction locks rows
in one order: group rows, then user rows, each in id order. A batch takes
them all before it writes anything else (IMService.handle_batch,
_SendBatch.lock_rows), in two statements, SELECT ... ORDER BY id FOR UPDATE:
lock_groups, the rows of the groups its group requests and group Sends and
Reads touch, then user_seqs, the rows of every user it will touch (the
senders and recipients of its Sends, readers and peers of its Reads, the
users of its Syncs and Logins, the members of the groups it writes to and
the users its group changes name). Only then does it draw msg_ids: within every inbox seq
order and msg_id order agree, two workers' batches wait for each other
instead of deadlocking, and a cmid retried through another worker (after a
failover) is looked up only once the batch that stored it has committed.

Round trips: each step of a batch is one (the user rows, the cmid lookup,
the msg_ids, and each executemany, which psycopg pipelines).

A deadlock or serialization failure that still happens (a Register racing
another for the same new id, an operator's own transaction), and a unique
violation of a key two transactions raced to insert (_RACED_KEYS), surface
as StoreBusy; the worker runs the same batch again whole (im.commit_batch,
simzmq_im_busy_retries_total), and only after several tries gives the
requests it cannot place Error{unavailable}.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Sequence

import psycopg
from psycopg import errors as pg_errors

from .base import StoreBusy, StoreError, clamp_id
from .sql import (FROZEN_CONVS_SCHEMA, GROUPS_SCHEMA, LAST_SEEN_MOVE, PRESENCE_SCHEMA, PRESENCE_SPAN_INDEX,
                  SQLStore)

log = logging.getLogger("simzmq.store")

# Taken while migrating, so workers starting together migrate once.
MIGRATION_LOCK_KEY = 0x73696D7A6D71  # "simzmq"


def presence_lock_key(user: str) -> int:
    """The advisory lock key (a signed 64-bit int) of a user's presence, the
    same in every worker; two users rarely share one (they then wait for
    each other, nothing worse)."""
    digest = hashlib.blake2b(b"presence\0" + user.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


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

# Appends are batched in Python now (SQLStore.add_messages).
_SCHEMA_V2 = "DROP FUNCTION simzmq_append(text, text, bytea, smallint, bytea, bigint);"

# Groups: the unique (sender, cmid) constraint becomes a partial index.
_SCHEMA_V3 = "ALTER TABLE messages DROP CONSTRAINT messages_sender_cmid_key;\n" + ";\n".join(GROUPS_SCHEMA)

# The push outbox (simzmq/push/): one row per user to wake of a message (a
# group message has one per member), written in the message's transaction;
# the dead-letter table keeps given-up ones.
_SCHEMA_V4 = """
CREATE TABLE push_outbox (
    user_id     text COLLATE "C" NOT NULL,
    msg_id      bigint NOT NULL,
    seq         bigint NOT NULL,
    created_ms  bigint NOT NULL,
    due_ms      bigint NOT NULL,
    attempts    integer NOT NULL,
    lease_until bigint NOT NULL,
    lease_token text NOT NULL,
    last_error  text NOT NULL,
    PRIMARY KEY (user_id, msg_id)
);
CREATE INDEX push_outbox_due ON push_outbox (due_ms, msg_id);
CREATE INDEX push_outbox_lease ON push_outbox (lease_token);
CREATE TABLE push_dead (
    user_id     text COLLATE "C" NOT NULL,
    msg_id      bigint NOT NULL,
    seq         bigint NOT NULL,
    created_ms  bigint NOT NULL,
    attempts    integer NOT NULL,
    died_ms     bigint NOT NULL,
    last_error  text NOT NULL,
    PRIMARY KEY (user_id, msg_id)
);
CREATE INDEX push_dead_msg ON push_dead (msg_id);
"""

# Presence (section 7): last_seen_ms, the gates' leases and local states.
_SCHEMA_V5 = ";\n".join(PRESENCE_SCHEMA)

# A former member's Conv with a group stays as at its removal (section 7).
_SCHEMA_V6 = ";\n".join(FROZEN_CONVS_SCHEMA)

# last_seen_ms leaves the users row for a table of its own (LAST_SEEN_MOVE).
_SCHEMA_V7 = (
    'CREATE TABLE last_seen (user_id text COLLATE "C" PRIMARY KEY, last_seen_ms bigint NOT NULL);\n'
    + ";\n".join(LAST_SEEN_MOVE)
)

_SCHEMA_V8 = ";\n".join(statement.format(byte_order=' COLLATE "C"') for statement in PRESENCE_SPAN_INDEX)

MIGRATIONS = [_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5, _SCHEMA_V6, _SCHEMA_V7, _SCHEMA_V8]

# SQLSTATEs of transient conflicts: deadlock, serialization failure, lock
# timeout, cancelled statement (statement_timeout).
_BUSY_ERRORS = (
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
    pg_errors.LockNotAvailable,
    pg_errors.QueryCanceled,
)

# Unique keys two transactions may both insert, each having looked first and
# found nothing (the other's row not yet committed): the idempotency keys of
# Sends and group changes, and a new group's id. The later insert is a
# transient conflict too: run again, its lookup finds the earlier one's row
# (a retry gets the first attempt's answer, a create finds the group).
_RACED_KEYS = frozenset({"messages_sender_cmid", "group_ops_pkey", "groups_pkey"})


def _is_busy(exc: psycopg.Error) -> bool:
    return isinstance(exc, _BUSY_ERRORS) or (
        isinstance(exc, pg_errors.UniqueViolation) and exc.diag.constraint_name in _RACED_KEYS)


@lru_cache(maxsize=None)
def _formatted(sql: str) -> str:
    """A statement written with `?` placeholders, in psycopg's `%s` style.
    The shared statements are a fixed set, so each is rewritten once."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresStore(SQLStore):
    _NO_LIMIT = None
    _FOR_UPDATE = " FOR UPDATE"
    _BYTE_ORDER = ' COLLATE "C"'
    _LOCK_ROWS = " ORDER BY id FOR UPDATE"
    # Users whose oldest job another claim has locked are skipped, not waited for.
    _SKIP_LOCKED = " FOR UPDATE OF o SKIP LOCKED"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        # autocommit: transaction() says where transactions
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
        if version < len(MIGRATIONS):
            log.info("store %s: schema version %d -> %d", self.describe(), version, len(MIGRATIONS))

    # transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise StoreError("a transaction is already open")
        try:
            with self.conn.transaction():
                yield
        except psycopg.Error as exc:
            if _is_busy(exc):
                raise StoreBusy(str(exc)) from exc
            raise

    def close(self) -> None:
        self.conn.close()

    def describe(self) -> str:
        info = self.conn.info
        where = info.host if info.host.startswith("/") else f"{info.host}:{info.port}"
        return f"postgres {info.user}@{where}/{info.dbname} (synchronous_commit=on)"

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        try:
            return self.conn.execute(_formatted(sql), params)
        except psycopg.Error as exc:
            if _is_busy(exc):
                raise StoreBusy(str(exc)) from exc
            raise

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.executemany(_formatted(sql), rows)
        except psycopg.Error as exc:
            if _is_busy(exc):
                raise StoreBusy(str(exc)) from exc
            raise

    # presence (the rest is in SQLStore)

    def lock_presence(self, users: Sequence[str]) -> None:
        # A transaction-scoped advisory lock per user, apart from the row
        # locks (a user without presence rows has none to lock, and Sends
        # do not wait for it), taken in key order so that two transactions
        # locking some of the same users never wait for each other in a
        # cycle.
        keys = sorted({presence_lock_key(user) for user in users})
        if keys:
            self._executemany("SELECT pg_advisory_xact_lock(?)", [(k,) for k in keys])

    # inbox (the rest is in SQLStore)

    def new_msg_ids(self, count: int) -> list[int]:
        rows = self._execute(
            "SELECT nextval('messages_msg_id_seq') FROM generate_series(1, ?)", (count,)
        ).fetchall()
        return sorted(row[0] for row in rows)

    def raise_delivered(self, user: str, since: int) -> None:
        since = clamp_id(since)
        self._execute(
            "UPDATE users SET delivered = LEAST(?, max_seq)"
            " WHERE id = ? AND delivered < LEAST(?, max_seq)",
            (since, user, since),
        )
