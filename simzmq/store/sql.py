"""The queries the SQLite and Postgres back ends share, written once.

Statements are written with SQLite's `?` placeholders and run through
`self._execute(sql, params)`, which each back end binds once: SQLite's is the
connection's own execute, so its hot path pays nothing for the sharing;
Postgres's rewrites each statement text to `%s` on first use and reuses the
rewrite. No statement here may hold a literal `?` (e.g. inside a string).

Batched statements take a list of keys as a VALUES list or IN list whose
length is rounded up to a power of two (the last key repeated), so a handful
of statement texts serve every batch size and stay prepared.

What differs between the dialects stays in the back end: the schema,
transactions, how user rows are locked and msg_ids drawn, and
raise_delivered (MIN in SQLite, LEAST in Postgres).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

from simzmq.wire.messages import GROUP_EVENT_KIND
from simzmq.wire.rules import is_group

from .base import (
    ID_CEILING,
    Appended,
    GroupEntry,
    GroupMember,
    GroupRow,
    Conv,
    DeadJob,
    DuplicateSend,
    HistoryMsg,
    Msg,
    NewMessage,
    PushJob,
    RECENT_COPIES,
    PushJobRow,
    PushStats,
    SentRecord,
    Store,
    UnknownUser,
    clamp_history_limit,
    clamp_id,
    clamp_sync_limit,
    msg_wire_size,
)

# Unread count after a read mark: own messages to oneself never count, and
# in a conversation with someone else only the peer's messages past the mark.
_RAISE_READ_MARK_SELF = (
    "UPDATE conversations SET read_mark = ?, unread = 0"
    " WHERE user_id = ? AND peer = ? AND read_mark < ? AND last_msg_id >= ?"
)
_RAISE_READ_MARK = (
    "UPDATE conversations SET read_mark = ?,"
    " unread = (SELECT count(*) FROM messages WHERE sender = ? AND recipient = ? AND msg_id > ?)"
    " WHERE user_id = ? AND peer = ? AND read_mark < ? AND last_msg_id >= ?"
)

# A history entry's seq is the one in the asking user's inbox (first param).
_HISTORY_COLUMNS = (
    "SELECT msg_id, CASE WHEN sender = ? THEN sender_seq ELSE recipient_seq END AS seq,"
    " sender, recipient, kind, ts_ms, cmid, body FROM messages"
)
_HISTORY_DIRECTION = (
    f"{_HISTORY_COLUMNS} WHERE sender = ? AND recipient = ? AND msg_id < ?"
    " ORDER BY msg_id DESC LIMIT ?"
)
# Each direction is one range of the (sender, recipient, msg_id) index;
# merging the two newest-first runs avoids a full sort. The subqueries keep
# their own ORDER BY and LIMIT, which SQLite allows only inside FROM (and
# Postgres before 16 only with an alias).
_HISTORY_PAIR = (
    f"SELECT * FROM ({_HISTORY_DIRECTION}) AS sent"
    f" UNION ALL SELECT * FROM ({_HISTORY_DIRECTION}) AS received"
    " ORDER BY msg_id DESC LIMIT ?"
)

_INSERT_MESSAGES = (
    "INSERT INTO messages (msg_id, sender, recipient, kind, ts_ms, cmid, body, sender_seq, recipient_seq)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# excluded.unread is how many of the batch's messages the user has not read:
# the new msg_ids are above any read mark, and messages to oneself or from
# oneself never count.
_UPSERT_CONVERSATIONS = (
    "INSERT INTO conversations (user_id, peer, last_msg_id, read_mark, unread) VALUES (?, ?, ?, 0, ?)"
    " ON CONFLICT (user_id, peer) DO UPDATE SET last_msg_id = excluded.last_msg_id,"
    " unread = conversations.unread + excluded.unread"
)


_INSERT_PUSH_JOBS = (
    "INSERT INTO push_outbox (msg_id, user_id, seq, created_ms, due_ms, attempts, lease_until, lease_token,"
    " last_error) VALUES (?, ?, ?, ?, ?, 0, 0, '', '')"
)
# A user is claimable when their oldest job is due and not leased; their
# other jobs wait behind it (one user's pushes go out in order), so the claim
# leases all of them. {lock} is how the back end keeps two claims apart.
_CLAIM_PUSH_JOBS = (
    "UPDATE push_outbox SET lease_until = ?, lease_token = ? WHERE user_id IN ("
    "SELECT o.user_id FROM push_outbox o WHERE o.due_ms <= ? AND o.lease_until <= ?"
    " AND NOT EXISTS (SELECT 1 FROM push_outbox p WHERE p.user_id = o.user_id AND p.msg_id < o.msg_id)"
    " ORDER BY o.due_ms, o.msg_id LIMIT ?{lock})"
)
# The first `per_user` of each claimed user's jobs (the rest stay leased
# until the claimant releases the user: memory stays bounded).
_CLAIMED_PUSH_JOBS = (
    "SELECT o.msg_id, o.user_id, o.seq, o.created_ms, o.due_ms, o.attempts, m.sender, m.kind, m.ts_ms, m.body,"
    " u.delivered, m.recipient FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY msg_id) AS n"
    " FROM push_outbox WHERE lease_token = ?) AS o"
    " JOIN messages m ON m.msg_id = o.msg_id JOIN users u ON u.id = o.user_id"
    " WHERE o.n <= ? ORDER BY o.user_id, o.msg_id"
)
_CLAIMED_UNREAD = (
    "SELECT user_id, SUM(unread) FROM conversations WHERE user_id IN"
    " (SELECT DISTINCT user_id FROM push_outbox WHERE lease_token = ?) GROUP BY user_id"
)


@lru_cache(maxsize=None)
def _in_list(count: int) -> str:
    return "(" + ", ".join(["?"] * count) + ")"

# Schema of groups (section 7), the same text in both back ends (each runs
# it as a migration step). Group events are messages with an empty cmid, so
# the idempotency index of Send covers non-empty cmids only; lookups repeat
# its predicate so both planners use it. Group messages and events have the
# group as recipient; messages_group serves unread recounts.
GROUPS_SCHEMA = (
    "CREATE UNIQUE INDEX messages_sender_cmid ON messages (sender, cmid) WHERE length(cmid) > 0",
    "CREATE INDEX messages_group ON messages (recipient, msg_id) WHERE substr(recipient, 1, 1) = '#'",
    # owner is '' once the group is closed (its id stays taken).
    "CREATE TABLE groups (id text PRIMARY KEY, title text NOT NULL, owner text NOT NULL,"
    " creator text NOT NULL, version bigint NOT NULL, joins bigint NOT NULL, created_ms bigint NOT NULL)",
    # joined: the group's join counter when the user last joined (members are
    # listed in this order); active 0 marks one who left or was removed.
    "CREATE TABLE group_members (group_id text NOT NULL, user_id text NOT NULL, joined bigint NOT NULL,"
    " active smallint NOT NULL, PRIMARY KEY (group_id, user_id))",
    "CREATE INDEX group_members_user ON group_members (user_id, active)",
    # The idempotency records of GroupAdd, GroupRemove and GroupTitle: what
    # the first request was (digest), so a different one with its cmid is refused.
    "CREATE TABLE group_ops (actor text NOT NULL, cmid text NOT NULL, digest text NOT NULL,"
    " PRIMARY KEY (actor, cmid))",
)

# Schema of presence (section 7, simzmq/presence.py), the same text in both
# back ends: when each user was last online or away; each gate's lease (its
# last report's number, and until when its states hold without another);
# each user's local state on each gate with sessions of theirs.
PRESENCE_SCHEMA = (
    "ALTER TABLE users ADD COLUMN last_seen_ms bigint NOT NULL DEFAULT 0",
    "CREATE TABLE presence_gates (gate text PRIMARY KEY, n bigint NOT NULL, expires_ms bigint NOT NULL)",
    "CREATE TABLE presence (user_id text NOT NULL, gate text NOT NULL, state smallint NOT NULL,"
    " PRIMARY KEY (user_id, gate))",
    "CREATE INDEX presence_gate ON presence (gate)",
)

# A snapshot part of a gate's presence reads the gate's rows within its span
# of names (gate_presence low/high): an index on both, names in byte order
# ({byte_order}: the back end's), so a part reads its own rows and not
# every row of the gate. It serves the gate-only look-ups too.
PRESENCE_SPAN_INDEX = (
    "CREATE INDEX presence_gate_user ON presence (gate, user_id{byte_order})",
    "DROP INDEX presence_gate",
)

# last_seen_ms moves out of the users row into a table of its own (each back
# end creates it, keyed by user_id as its other per-user tables are, then
# runs these): written only under the user's presence lock, so a presence
# report never waits for a user row that a batch locked (Postgres: the
# batch may then wait for that user's presence lock, and the two would
# deadlock). No row: 0, never seen.
LAST_SEEN_MOVE = (
    "INSERT INTO last_seen (user_id, last_seen_ms) SELECT id, last_seen_ms FROM users WHERE last_seen_ms > 0",
    "ALTER TABLE users DROP COLUMN last_seen_ms",
)

# A group conversation's peer_read, for the conversation row `c` (a user's
# with a group): the lowest read mark of the group's other current members,
# 0 with none. The one way it is computed: live for a member, and once, in
# the transaction of its removal (before it), for a former member
# (frozen_peer_read).
_GROUP_PEER_READ = (
    "SELECT COALESCE(MIN(o.read_mark), 0) FROM group_members g"
    " JOIN conversations o ON o.user_id = g.user_id AND o.peer = g.group_id"
    " WHERE g.group_id = c.peer AND g.active = 1 AND g.user_id <> c.user_id"
)

# A former member's Conv with a group stays as it was at its removal
# (section 7): frozen_peer_read holds the peer_read it had then, and is NULL
# while the user is a member. The same text in both back ends (each runs it
# as a migration step); users who were already former members when it runs
# keep the peer_read of that moment.
FROZEN_CONVS_SCHEMA = (
    "ALTER TABLE conversations ADD COLUMN frozen_peer_read bigint",
    f"UPDATE conversations AS c SET frozen_peer_read = ({_GROUP_PEER_READ})"
    " WHERE EXISTS (SELECT 1 FROM group_members f"
    " WHERE f.group_id = c.peer AND f.user_id = c.user_id AND f.active = 0)",
)

_GROUP_UNREAD = (
    "SELECT count(*) FROM messages WHERE recipient = ? AND substr(recipient, 1, 1) = '#'"
    " AND msg_id > ? AND msg_id <= ? AND sender <> ? AND kind <> ?"
)


def _padded(keys: list) -> list:
    """keys, its length rounded up to a power of two by repeating the last."""
    width = 1 << (len(keys) - 1).bit_length()
    return keys + keys[-1:] * (width - len(keys))


@lru_cache(maxsize=None)
def _find_sends_sql(count: int) -> str:
    values = ", ".join(["(?, ?)"] * count)
    return (
        "SELECT m.sender, m.cmid, m.msg_id, m.sender_seq, m.ts_ms, m.recipient, m.kind, m.body,"
        f" m.recipient_seq FROM (VALUES {values}) AS k"
        " JOIN messages m ON m.sender = k.column1 AND m.cmid = k.column2 AND length(m.cmid) > 0"
    )


@lru_cache(maxsize=None)
def _written_to_sql(count: int) -> str:
    # One statement for all the ids; for each, one probe of the (sender,
    # recipient, msg_id) index that stops at the first row. The padding's
    # repeats come back more than once.
    values = ", ".join(["(?)"] * count)
    return (
        f"SELECT k.column1 FROM (VALUES {values}) AS k"
        " WHERE EXISTS (SELECT 1 FROM messages m WHERE m.sender = k.column1 AND m.recipient = ?)"
    )


@lru_cache(maxsize=None)
def _user_seqs_sql(count: int, lock_rows: str) -> str:
    return f"SELECT id, max_seq FROM users WHERE id IN ({', '.join(['?'] * count)}){lock_rows}"


class SQLStore(Store):
    """The methods whose SQL is the same in both back ends."""

    # Runs one statement written with `?` placeholders; returns a DB-API cursor.
    _execute: Callable[[str, Sequence[Any]], Any]
    # Runs one statement once per row of parameters.
    _executemany: Callable[[str, Sequence[Sequence[Any]]], Any]
    # The LIMIT parameter that means no limit: SQLite takes a negative one and
    # refuses NULL, Postgres the other way round.
    _NO_LIMIT: int | None
    # What user_seqs and lock_groups append to lock the rows they read, in id
    # order ("" where the write transaction is exclusive anyway).
    _LOCK_ROWS: str
    # What the push claim appends to its choice of users so that two claims
    # at once take different ones ("" where the write transaction is
    # exclusive anyway).
    _SKIP_LOCKED: str

    # What a read of one row appends to lock it.
    _FOR_UPDATE: str

    # What a user id is followed by to compare in byte order (code point
    # order, as Python sorts the names of a presence snapshot's parts),
    # whatever the database's collation.
    _BYTE_ORDER: str

    @staticmethod
    def _fill_batch(rows, limit: int, max_bytes: int) -> tuple[list[Msg], bool]:
        """Take rows (seq order, at most limit + 1 of them) into a Batch.

        Each row is (msg_id, seq, sender, to, kind, ts_ms, cmid, body).
        """
        msgs: list[Msg] = []
        used = 0
        for row in rows:
            if len(msgs) == limit:
                return msgs, True
            size = msg_wire_size(row[2], row[3], row[6], row[7])
            if msgs and used + size > max_bytes:
                return msgs, True
            used += size
            msgs.append(Msg(row[0], row[1], row[2], row[3], row[4], row[5], bytes(row[6]), bytes(row[7])))
        return msgs, False

    # users and credentials

    def create_user(self, user: str, pw_hash: str, now_ms: int) -> bool:
        cur = self._execute(
            "INSERT INTO users (id, pw_hash, created_ms, max_seq, delivered) VALUES (?, ?, ?, 0, 0)"
            " ON CONFLICT (id) DO NOTHING",
            (user, pw_hash, now_ms),
        )
        return cur.rowcount == 1

    def get_password_hash(self, user: str) -> str | None:
        row = self._execute("SELECT pw_hash FROM users WHERE id = ?", (user,)).fetchone()
        return row[0] if row else None

    def user_exists(self, user: str) -> bool:
        return self._execute("SELECT 1 FROM users WHERE id = ?", (user,)).fetchone() is not None

    def add_token(self, user: str, token_hash: bytes, device: str, expires_ms: int) -> None:
        self._execute(
            "INSERT INTO tokens (token_hash, user_id, device, expires_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (token_hash) DO UPDATE SET user_id = excluded.user_id,"
            " device = excluded.device, expires_ms = excluded.expires_ms",
            (bytes(token_hash), user, device, expires_ms),
        )

    def check_token(self, user: str, token_hash: bytes, now_ms: int) -> bool:
        row = self._execute(
            "SELECT 1 FROM tokens WHERE token_hash = ? AND user_id = ? AND expires_ms > ?",
            (bytes(token_hash), user, now_ms),
        ).fetchone()
        return row is not None

    def token_user(self, token_hash: bytes, now_ms: int) -> str | None:
        row = self._execute(
            "SELECT user_id FROM tokens WHERE token_hash = ? AND expires_ms > ?",
            (bytes(token_hash), now_ms),
        ).fetchone()
        return row[0] if row else None

    def revoke_token(self, token_hash: bytes) -> None:
        self._execute("DELETE FROM tokens WHERE token_hash = ?", (bytes(token_hash),))

    def purge_expired(self, now_ms: int) -> int:
        return self._execute("DELETE FROM tokens WHERE expires_ms <= ?", (now_ms,)).rowcount

    # inbox

    def max_seq(self, user: str) -> int:
        row = self._execute("SELECT max_seq FROM users WHERE id = ?", (user,)).fetchone()
        return row[0] if row else 0

    def delivered_mark(self, user: str) -> int:
        row = self._execute("SELECT delivered FROM users WHERE id = ?", (user,)).fetchone()
        return row[0] if row else 0

    def find_send(self, sender: str, cmid: bytes) -> SentRecord | None:
        return self.find_sends([(sender, bytes(cmid))]).get((sender, bytes(cmid)))

    def find_sends(self, keys: Iterable[tuple[str, bytes]]) -> dict[tuple[str, bytes], SentRecord]:
        keys = list(keys)
        if not keys:
            return {}
        keys = _padded(keys)
        params = [x for sender, cmid in keys for x in (sender, bytes(cmid))]
        rows = self._execute(_find_sends_sql(len(keys)), params).fetchall()
        return {
            (r[0], bytes(r[1])): SentRecord(r[2], r[3], r[4], r[5], r[6], bytes(r[7]), r[8]) for r in rows
        }

    def user_seqs(self, users: Iterable[str]) -> dict[str, int]:
        users = sorted(set(users))
        if not users:
            return {}
        users = _padded(users)
        return dict(self._execute(_user_seqs_sql(len(users), self._LOCK_ROWS), users).fetchall())

    def add_messages(self, msgs: Sequence[NewMessage]) -> None:
        if not msgs:
            return
        self._executemany(_INSERT_MESSAGES, msgs)  # a NewMessage is the row, column for column
        inbox = []
        tops: dict[str, int] = {}
        convs: dict[tuple[str, str], list[int]] = {}
        for msg in msgs:
            inbox.append((msg.sender, msg.sender_seq, msg.msg_id))
            tops[msg.sender] = msg.sender_seq
            mine = convs.setdefault((msg.sender, msg.to), [0, 0])
            mine[0] = msg.msg_id
            if msg.to != msg.sender:
                inbox.append((msg.to, msg.recipient_seq, msg.msg_id))
                tops[msg.to] = msg.recipient_seq
                theirs = convs.setdefault((msg.to, msg.sender), [0, 0])
                theirs[0] = msg.msg_id
                theirs[1] += 1
        self._executemany("INSERT INTO inbox (user_id, seq, msg_id) VALUES (?, ?, ?)", inbox)
        # In id order, the order user_seqs locked them in.
        self._executemany(
            "UPDATE users SET max_seq = ? WHERE id = ?", [(tops[user], user) for user in sorted(tops)]
        )
        self._executemany(_UPSERT_CONVERSATIONS, [(*pair, last, unread) for pair, (last, unread) in convs.items()])

    def append_message(
        self, sender: str, to: str, cmid: bytes, kind: int, body: bytes, ts_ms: int
    ) -> Appended:
        cmid = bytes(cmid)
        if self.find_sends([(sender, cmid)]):
            raise DuplicateSend((sender, cmid))
        seqs = self.user_seqs((sender, to))
        for user in (to, sender):
            if user not in seqs:
                raise UnknownUser(user)
        (msg_id,) = self.new_msg_ids(1)
        recipient_seq = seqs[to] + 1
        sender_seq = recipient_seq if sender == to else seqs[sender] + 1
        self.add_messages([NewMessage(msg_id, sender, to, kind, ts_ms, cmid, bytes(body), sender_seq, recipient_seq)])
        return Appended(msg_id, ts_ms, sender_seq, recipient_seq)

    def sync(self, user: str, since: int, limit: int, max_bytes: int) -> tuple[list[Msg], bool]:
        limit = clamp_sync_limit(limit)
        since = clamp_id(since)
        cur = self._execute(
            "SELECT m.msg_id, i.seq, m.sender, m.recipient, m.kind, m.ts_ms, m.cmid, m.body"
            " FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
            " WHERE i.user_id = ? AND i.seq > ? ORDER BY i.seq LIMIT ?",
            (user, since, limit + 1),
        )
        try:
            return self._fill_batch(cur, limit, max_bytes)
        finally:
            cur.close()

    # conversations

    def conversation_of(self, user: str, peer: str, msg_id: int) -> bool:
        msg_id = clamp_id(msg_id)
        if is_group(peer):
            # A group's entry that reached the user: its conversation with
            # the group exists and goes that far (a former member's stops at
            # its removal).
            row = self._execute(
                "SELECT 1 FROM messages m JOIN conversations c ON c.user_id = ? AND c.peer = m.recipient"
                " WHERE m.msg_id = ? AND m.recipient = ? AND c.last_msg_id >= m.msg_id",
                (user, msg_id, peer),
            ).fetchone()
            return row is not None
        row = self._execute(
            "SELECT 1 FROM messages WHERE msg_id = ?"
            " AND ((sender = ? AND recipient = ?) OR (sender = ? AND recipient = ?))",
            (msg_id, user, peer, peer, user),
        ).fetchone()
        return row is not None

    def raise_read_mark(self, user: str, peer: str, msg_id: int) -> bool:
        msg_id = clamp_id(msg_id)
        if is_group(peer):
            cur = self._execute(
                "UPDATE conversations SET read_mark = ?,"
                f" unread = ({_GROUP_UNREAD.replace('msg_id <= ?', 'msg_id <= conversations.last_msg_id')})"
                " WHERE user_id = ? AND peer = ? AND read_mark < ? AND last_msg_id >= ?",
                (msg_id, peer, msg_id, user, GROUP_EVENT_KIND, user, peer, msg_id, msg_id),
            )
        elif user == peer:
            cur = self._execute(_RAISE_READ_MARK_SELF, (msg_id, user, peer, msg_id, msg_id))
        else:
            cur = self._execute(
                _RAISE_READ_MARK, (msg_id, peer, user, msg_id, user, peer, msg_id, msg_id)
            )
        return cur.rowcount == 1

    def peer_read_mark(self, user: str, peer: str) -> int:
        row = self._execute(
            "SELECT read_mark FROM conversations WHERE user_id = ? AND peer = ?", (peer, user)
        ).fetchone()
        return row[0] if row else 0

    def conversations(self, user: str, limit: int | None = None) -> list[Conv]:
        rows = self._execute(
            "SELECT c.peer, c.last_msg_id, c.unread,"
            " CASE WHEN substr(c.peer, 1, 1) = '#'"
            f" THEN COALESCE(c.frozen_peer_read, ({_GROUP_PEER_READ}))"
            " ELSE COALESCE(p.read_mark, 0) END"
            " FROM conversations c"
            " LEFT JOIN conversations p ON p.user_id = c.peer AND p.peer = c.user_id"
            " WHERE c.user_id = ? ORDER BY c.last_msg_id DESC LIMIT ?",
            (user, self._NO_LIMIT if limit is None else limit),
        ).fetchall()
        return [Conv(*row) for row in rows]

    def history(
        self, user: str, peer: str, before: int, limit: int
    ) -> tuple[list[HistoryMsg], bool]:
        limit = clamp_history_limit(limit)
        bound = clamp_id(before) if before > 0 else ID_CEILING
        if is_group(peer):
            # The user's own copies: its inbox, newest first (seq order is
            # msg_id order in every inbox).
            rows = self._execute(
                "SELECT m.msg_id, i.seq, m.sender, m.recipient, m.kind, m.ts_ms, m.cmid, m.body"
                " FROM inbox i JOIN messages m ON m.msg_id = i.msg_id"
                " WHERE i.user_id = ? AND m.recipient = ? AND m.msg_id < ? ORDER BY i.seq DESC LIMIT ?",
                (user, peer, bound, limit + 1),
            ).fetchall()
        elif user == peer:
            rows = self._execute(_HISTORY_DIRECTION, (user, user, user, bound, limit + 1)).fetchall()
        else:
            rows = self._execute(
                _HISTORY_PAIR,
                (user, user, peer, bound, limit + 1, user, peer, user, bound, limit + 1, limit + 1),
            ).fetchall()
        more = len(rows) > limit
        return [
            Msg(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bytes(r[7])) for r in rows[:limit]
        ], more

    # the push outbox

    def add_push_jobs(self, jobs: Sequence[PushJobRow]) -> None:
        if jobs:
            self._executemany(_INSERT_PUSH_JOBS, jobs)  # a PushJobRow is the row's first columns

    def claim_push_jobs(self, token: str, now_ms: int, lease_until_ms: int, max_users: int,
                        per_user: int) -> list[PushJob]:
        self._execute(_CLAIM_PUSH_JOBS.format(lock=self._SKIP_LOCKED),
                      (lease_until_ms, token, now_ms, now_ms, max_users))
        unread = dict(self._execute(_CLAIMED_UNREAD, (token,)).fetchall())
        # A group message's job names its group (the message's recipient);
        # a one-to-one message's names none ("").
        return [PushJob(*r[:9], bytes(r[9]), r[10], int(unread.get(r[1]) or 0), r[11] if is_group(r[11]) else "")
                for r in self._execute(_CLAIMED_PUSH_JOBS, (token, per_user)).fetchall()]

    def _by_ids(self, sql: str, msg_ids: Sequence[int], before: Sequence = ()) -> Any:
        ids = _padded(sorted(set(msg_ids)))
        return self._execute(sql + _in_list(len(ids)), (*before, *ids))

    def finish_push_jobs(self, user: str, msg_ids: Sequence[int]) -> None:
        if msg_ids:
            self._by_ids("DELETE FROM push_outbox WHERE user_id = ? AND msg_id IN ", msg_ids, (user,))

    def retry_push_job(self, user: str, msg_id: int, due_ms: int, attempts: int, error: str) -> None:
        self._execute("UPDATE push_outbox SET due_ms = ?, attempts = ?, last_error = ?, lease_until = 0,"
                      " lease_token = '' WHERE user_id = ? AND msg_id = ?",
                      (due_ms, attempts, error[:200], user, msg_id))

    def release_push_jobs(self, token: str, user: str) -> None:
        self._execute("UPDATE push_outbox SET lease_until = 0, lease_token = '' WHERE lease_token = ? AND user_id = ?",
                      (token, user))

    def bury_push_jobs(self, user: str, msg_ids: Sequence[int], now_ms: int, error: str) -> None:
        if not msg_ids:
            return
        # attempts + 1: the call that failed for good counts.
        self._by_ids("INSERT INTO push_dead (msg_id, user_id, seq, created_ms, attempts, died_ms, last_error)"
                     " SELECT msg_id, user_id, seq, created_ms, attempts + 1, ?, ? FROM push_outbox"
                     " WHERE user_id = ? AND msg_id IN ", msg_ids, (now_ms, error[:200], user))
        self.finish_push_jobs(user, msg_ids)

    def dead_push_jobs(self, limit: int) -> list[DeadJob]:
        rows = self._execute("SELECT msg_id, user_id, seq, created_ms, attempts, died_ms, last_error FROM push_dead"
                             " ORDER BY msg_id, user_id LIMIT ?", (limit,)).fetchall()
        return [DeadJob(*r) for r in rows]

    def requeue_dead_push_jobs(self, msg_ids: Sequence[int] | None, now_ms: int) -> int:
        select = ("SELECT msg_id, user_id, seq, created_ms, ?, 0, 0, '', '' FROM push_dead")
        insert = ("INSERT INTO push_outbox (msg_id, user_id, seq, created_ms, due_ms, attempts, lease_until,"
                  " lease_token, last_error) ")
        if msg_ids is None:
            self._execute(insert + select, (now_ms,))
            return self._execute("DELETE FROM push_dead", ()).rowcount
        if not msg_ids:
            return 0
        self._by_ids(insert + select + " WHERE msg_id IN ", msg_ids, (now_ms,))
        return self._by_ids("DELETE FROM push_dead WHERE msg_id IN ", msg_ids).rowcount

    def push_stats(self) -> PushStats:
        queued, oldest = self._execute("SELECT count(*), MIN(created_ms) FROM push_outbox", ()).fetchone()
        (dead,) = self._execute("SELECT count(*) FROM push_dead", ()).fetchone()
        return PushStats(queued, oldest, dead)

    # presence (section 7)

    def presence_of(self, users: Iterable[str], now_ms: int | None) -> dict[str, list[int]]:
        users = _padded(sorted(set(users))) if users else []
        if not users:
            return {}
        if now_ms is None:
            rows = self._execute(
                "SELECT user_id, state FROM presence WHERE user_id IN " + _in_list(len(users)), users).fetchall()
        else:
            rows = self._execute(
                "SELECT p.user_id, p.state FROM presence p JOIN presence_gates g ON g.gate = p.gate"
                " WHERE g.expires_ms > ? AND p.user_id IN " + _in_list(len(users)),
                [now_ms, *users],
            ).fetchall()
        found: dict[str, list[int]] = {}
        for user, state in rows:
            found.setdefault(user, []).append(state)
        return found

    def gate_presence(self, gate: str, users: Iterable[str] | None = None,
                      low: str | None = None, high: str | None = None) -> dict[str, int]:
        sql, args = "SELECT user_id, state FROM presence WHERE gate = ?", [gate]
        if low is not None:
            sql, args = sql + f" AND user_id{self._BYTE_ORDER} >= ?", [*args, low]
        if high is not None:
            sql, args = sql + f" AND user_id{self._BYTE_ORDER} < ?", [*args, high]
        if users is not None:
            users = sorted(set(users))
            if not users:
                return {}
            users = _padded(users)
            sql, args = sql + " AND user_id IN " + _in_list(len(users)), [*args, *users]
        return dict(self._execute(sql, args).fetchall())

    def renew_presence_gate(self, gate: str, n: int, expires_ms: int) -> bool:
        row = self._execute(f"SELECT n FROM presence_gates WHERE gate = ?{self._FOR_UPDATE}", (gate,)).fetchone()
        if row is not None and row[0] >= n:
            return False
        self._execute(
            "INSERT INTO presence_gates (gate, n, expires_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (gate) DO UPDATE SET n = excluded.n, expires_ms = excluded.expires_ms",
            (gate, n, expires_ms),
        )
        return True

    def save_presence(self, gate: str, states: dict[str, int]) -> None:
        gone = [(user, gate) for user, state in states.items() if not state]
        kept = [(user, gate, state) for user, state in states.items() if state]
        if gone:
            self._executemany("DELETE FROM presence WHERE user_id = ? AND gate = ?", gone)
        if kept:
            self._executemany(
                "INSERT INTO presence (user_id, gate, state) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id, gate) DO UPDATE SET state = excluded.state",
                kept,
            )

    def expired_presence_gates(self, now_ms: int) -> list[str]:
        return [g for (g,) in self._execute(
            "SELECT gate FROM presence_gates WHERE expires_ms <= ? ORDER BY gate", (now_ms,)).fetchall()]

    def drop_presence_gates(self, gates: Sequence[str], expired_at: int | None = None) -> None:
        lapsed = "" if expired_at is None else " AND expires_ms <= ?"
        for gate in gates:
            dropped = self._execute("DELETE FROM presence_gates WHERE gate = ?" + lapsed,
                                    (gate,) if expired_at is None else (gate, expired_at)).rowcount
            if expired_at is not None and not dropped:
                continue  # renewed (or dropped) by another worker meanwhile
            self._execute("DELETE FROM presence WHERE gate = ?", (gate,))

    def last_seen(self, users: Iterable[str]) -> dict[str, int]:
        users = _padded(sorted(set(users))) if users else []
        if not users:
            return {}
        return dict(self._execute(
            "SELECT u.id, COALESCE(s.last_seen_ms, 0) FROM users u LEFT JOIN last_seen s ON s.user_id = u.id"
            " WHERE u.id IN " + _in_list(len(users)), users).fetchall())

    def set_last_seen(self, users: Iterable[str], ms: int) -> None:
        # Reads the users rows (to leave out ids of no user) without locking them.
        self._executemany(
            "INSERT INTO last_seen (user_id, last_seen_ms) SELECT id, ? FROM users WHERE id = ?"
            " ON CONFLICT (user_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
            [(ms, u) for u in sorted(set(users))])

    # groups (section 7)

    def lock_groups(self, groups: Iterable[str]) -> dict[str, GroupRow]:
        groups = sorted(set(groups))
        if not groups:
            return {}
        groups = _padded(groups)
        rows = self._execute(
            "SELECT id, title, owner, creator, version, joins FROM groups WHERE id IN " + _in_list(len(groups))
            + self._LOCK_ROWS, groups,
        ).fetchall()
        return {row[0]: GroupRow(*row) for row in rows}

    def lock_group(self, group: str) -> GroupRow | None:
        return self.lock_groups([group]).get(group)

    def group_members(self, group: str) -> list[GroupMember]:
        rows = self._execute(
            "SELECT user_id, joined, active FROM group_members WHERE group_id = ? ORDER BY joined", (group,)
        ).fetchall()
        return [GroupMember(r[0], r[1], bool(r[2])) for r in rows]

    def save_group(self, row: GroupRow, now_ms: int, new: bool) -> None:
        if new:
            self._execute(
                "INSERT INTO groups (id, title, owner, creator, version, joins, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, now_ms))
        else:
            self._execute("UPDATE groups SET title = ?, owner = ?, version = ?, joins = ? WHERE id = ?",
                          (row.title, row.owner, row.version, row.joins, row.id))

    def save_members(self, group: str, members: Sequence[GroupMember]) -> None:
        self._executemany(
            "INSERT INTO group_members (group_id, user_id, joined, active) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (group_id, user_id) DO UPDATE SET joined = excluded.joined, active = excluded.active",
            [(group, mb.user, mb.joined, int(mb.active)) for mb in members],
        )

    def groups_joined(self, users: Iterable[str]) -> dict[str, int]:
        users = sorted(set(users))
        if not users:
            return {}
        users = _padded(users)
        rows = self._execute(
            "SELECT user_id, count(*) FROM group_members WHERE user_id IN " + _in_list(len(users)) +
            " AND active = 1 GROUP BY user_id",
            users,
        ).fetchall()
        return dict(rows)

    def written_to(self, actor: str, users: Iterable[str]) -> set[str]:
        users = sorted(set(users))
        if not users:
            return set()
        users = _padded(users)
        return {u for (u,) in self._execute(_written_to_sql(len(users)), [*users, actor]).fetchall()}

    def find_group_op(self, actor: str, cmid: bytes) -> str | None:
        row = self._execute(
            "SELECT digest FROM group_ops WHERE actor = ? AND cmid = ?", (actor, bytes(cmid).hex())
        ).fetchone()
        return row[0] if row else None

    def record_group_op(self, actor: str, cmid: bytes, digest: str) -> None:
        self._execute(
            "INSERT INTO group_ops (actor, cmid, digest) VALUES (?, ?, ?)", (actor, bytes(cmid).hex(), digest)
        )

    def add_group_entries(self, entries: Sequence[GroupEntry]) -> None:
        if not entries:
            return
        self._executemany(
            _INSERT_MESSAGES,
            [(e.msg_id, e.sender, e.group, e.kind, e.ts_ms, bytes(e.cmid), bytes(e.body),
              e.seqs.get(e.sender, 0), 0) for e in entries],
        )
        inbox = []
        tops: dict[str, int] = {}
        convs: dict[tuple[str, str], list[int]] = {}
        for e in entries:
            for user, seq in e.seqs.items():
                inbox.append((user, seq, e.msg_id))
                tops[user] = max(tops.get(user, 0), seq)
                conv = convs.setdefault((user, e.group), [0, 0])
                conv[0] = e.msg_id
                conv[1] += int(e.counted and user != e.sender)
        self._executemany("INSERT INTO inbox (user_id, seq, msg_id) VALUES (?, ?, ?)", inbox)
        self._executemany(
            "UPDATE users SET max_seq = ? WHERE id = ?", [(tops[user], user) for user in sorted(tops)]
        )
        self._executemany(_UPSERT_CONVERSATIONS, [(*pair, last, unread) for pair, (last, unread) in convs.items()])

    def group_copies(self, group: str, msg_id: int, within: int = RECENT_COPIES) -> dict[str, int]:
        # In every inbox seq order and msg_id order agree: a user's copy, if
        # any, is the newest entry at or below msg_id, found by a scan back
        # from the inbox's end, over at most `within` entries.
        return dict(self._execute(
            "SELECT g.user_id, i.seq FROM group_members g JOIN users u ON u.id = g.user_id"
            " JOIN inbox i ON i.user_id = g.user_id AND i.seq = ("
            "SELECT j.seq FROM inbox j WHERE j.user_id = g.user_id AND j.seq > u.max_seq - ? AND j.msg_id <= ?"
            " ORDER BY j.seq DESC LIMIT 1)"
            " WHERE g.group_id = ? AND i.msg_id = ? ORDER BY g.joined",
            (within, msg_id, group, msg_id)).fetchall())

    def start_group_marks(self, group: str, users: Iterable[str], msg_id: int) -> None:
        self._executemany(
            "UPDATE conversations SET read_mark = ?, unread = 0, frozen_peer_read = NULL"
            " WHERE user_id = ? AND peer = ?",
            [(msg_id, user, group) for user in sorted(set(users))],
        )

    def freeze_group_convs(self, group: str, users: Iterable[str]) -> None:
        self._executemany(
            f"UPDATE conversations AS c SET frozen_peer_read = ({_GROUP_PEER_READ})"
            " WHERE c.user_id = ? AND c.peer = ?",
            [(user, group) for user in sorted(set(users))],
        )
