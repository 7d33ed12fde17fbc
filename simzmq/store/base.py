"""The storage interface shared by the SQLite and Postgres back ends.

The IM worker is the only writer. It opens one write transaction per batch of
requests (group commit) and writes the batch's messages with a few set-wide
statements: find_sends looks up every cmid at once, user_seqs reads (and in
Postgres locks) every user involved, new_msg_ids draws the ids, and
add_messages writes messages, inboxes, seqs and conversations with one
executemany each. The caller allocates the seqs (max_seq + 1, ... in arrival
order); the transaction is exclusive for those users, so inboxes stay gapless
and seq order equals msg_id order.

Every method runs inside the caller's current transaction; none of them
commits on its own. Time is always passed in (`now_ms`, `ts_ms`): the store
never reads a clock.

Idempotency records are the messages themselves: the pair (sender, cmid) is
unique in the messages table, and messages are never deleted, so a Send's cmid
is remembered forever (protocol.md asks for at least `token_ttl`).
`purge_expired` therefore only removes expired resume tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, NamedTuple, Sequence

# The wire's record types, so the worker encodes what the store returns as is.
from simzmq.wire.messages import Conv, Msg

# A history entry is a Msg whose seq is the seq in the asking user's inbox.
HistoryMsg = Msg

# Stored msg_ids and seqs stay below 2**53 (protocol.md), but the wire carries
# u64: bigger values from a client are clamped to this, which matches nothing
# and still fits a signed 64-bit column.
ID_CEILING = 2**62

# protocol.md: Sync's limit of 0, or anything above this, means this.
SYNC_LIMIT_MAX = 500
# protocol.md section 6: a history page holds at most this many messages.
HISTORY_LIMIT_MAX = 100



# Inbox entries a retried group Send looks back through per member for its
# copies, to publish them again (Store.group_copies).
RECENT_COPIES = 1024

class SentRecord(NamedTuple):
    """What a Send stored, for answering its retry with the first SendOk."""

    msg_id: int
    sender_seq: int
    ts_ms: int
    to: str
    kind: int
    body: bytes
    recipient_seq: int  # == sender_seq when the sender wrote to itself


class Appended(NamedTuple):
    msg_id: int
    ts_ms: int
    sender_seq: int
    recipient_seq: int  # == sender_seq when the sender wrote to itself


class NewMessage(NamedTuple):
    """A message to store; the fields are the columns of the messages table."""

    msg_id: int
    sender: str
    to: str
    kind: int
    ts_ms: int
    cmid: bytes
    body: bytes
    sender_seq: int
    recipient_seq: int  # == sender_seq when the sender wrote to itself


class PushJobRow(NamedTuple):
    """A push job as the IM worker writes it, in the message's transaction:
    `user` should hear of message `msg_id` (their inbox seq `seq`) once
    `due_ms` has passed, unless they are online or have fetched it by then.
    A job is (user, msg_id): a group message has one per member to wake."""

    msg_id: int
    user: str
    seq: int
    created_ms: int
    due_ms: int


class PushJob(NamedTuple):
    """A claimed push job with what its call needs from the store."""

    msg_id: int
    user: str
    seq: int
    created_ms: int
    due_ms: int
    attempts: int
    sender: str
    kind: int
    ts_ms: int
    body: bytes
    delivered: int  # the user's delivered mark now
    unread: int     # the user's unread total now
    group: str = ""  # the group of a group message; "" for a one-to-one message


class DeadJob(NamedTuple):
    """A push job given up on (in the dead-letter table)."""

    msg_id: int
    user: str
    seq: int
    created_ms: int
    attempts: int
    died_ms: int
    last_error: str


class PushStats(NamedTuple):
    queued: int
    oldest_created_ms: int | None
    dead: int

class GroupRow(NamedTuple):
    """A group (section 7); owner is '' once it is closed."""

    id: str
    title: str
    owner: str
    creator: str
    version: int
    joins: int  # the join counter: a member's `joined` is its value when it joined


class GroupMember(NamedTuple):
    user: str
    joined: int
    active: bool  # False: left or removed (only the owner puts it back)


class GroupEntry(NamedTuple):
    """A group message or event to store: one messages row, and one inbox
    entry per user in `seqs` (user -> its new seq, allocated by the caller
    from user_seqs). `counted`: whether it counts as unread (messages do,
    events do not)."""

    msg_id: int
    sender: str
    group: str
    kind: int
    ts_ms: int
    cmid: bytes
    body: bytes
    seqs: dict
    counted: bool


class StoreError(Exception):
    """Base of the errors a store raises on purpose."""


class UnknownUser(StoreError):
    """The sender or recipient of a message does not exist."""


class DuplicateSend(StoreError):
    """(sender, cmid) is already stored; look it up with find_send."""


class StoreBusy(StoreError):
    """A transient conflict (lock timeout, deadlock, serialization failure).

    The step had no effect once its transaction is rolled back; the request
    may be retried, or answered with `unavailable`.
    """


def msg_wire_size(sender: str, to: str, cmid: bytes, body: bytes) -> int:
    """Bytes a Msg takes in the bin codec, to fill a Batch up to max_frame."""
    return (
        8 + 8
        + 4 + len(sender.encode())
        + 4 + len(to.encode())
        + 1 + 8
        + 4 + len(cmid)
        + 4 + len(body)
    )


def clamp_id(value: int) -> int:
    return value if value < ID_CEILING else ID_CEILING


def clamp_sync_limit(limit: int) -> int:
    if limit <= 0 or limit > SYNC_LIMIT_MAX:
        return SYNC_LIMIT_MAX
    return limit


def clamp_history_limit(limit: int) -> int:
    if limit <= 0 or limit > HISTORY_LIMIT_MAX:
        return HISTORY_LIMIT_MAX
    return limit


class Store:
    """The interface; see sql.py, sqlite.py and postgres.py."""

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: commit on normal exit, roll back on exception."""
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the data lives and how durable commits are, for logs (no secrets)."""
        raise NotImplementedError

    # users and credentials

    def create_user(self, user: str, pw_hash: str, now_ms: int) -> bool:
        """False if the id is taken."""
        raise NotImplementedError

    def get_password_hash(self, user: str) -> str | None:
        raise NotImplementedError

    def user_exists(self, user: str) -> bool:
        raise NotImplementedError

    def add_token(self, user: str, token_hash: bytes, device: str, expires_ms: int) -> None:
        raise NotImplementedError

    def check_token(self, user: str, token_hash: bytes, now_ms: int) -> bool:
        raise NotImplementedError

    def token_user(self, token_hash: bytes, now_ms: int) -> str | None:
        raise NotImplementedError

    def revoke_token(self, token_hash: bytes) -> None:
        raise NotImplementedError

    def purge_expired(self, now_ms: int) -> int:
        """Delete expired tokens; returns how many. Messages (and with them the
        idempotency records) are kept."""
        raise NotImplementedError

    # inbox

    def max_seq(self, user: str) -> int:
        raise NotImplementedError

    def delivered_mark(self, user: str) -> int:
        raise NotImplementedError

    def find_send(self, sender: str, cmid: bytes) -> SentRecord | None:
        raise NotImplementedError

    def find_sends(self, keys: Iterable[tuple[str, bytes]]) -> dict[tuple[str, bytes], SentRecord]:
        """The stored Sends among the (sender, cmid) keys, in one query."""
        raise NotImplementedError

    def user_seqs(self, users: Iterable[str]) -> dict[str, int]:
        """max_seq of each of `users` that exists, in one query. In Postgres
        this also locks their rows (in id order) until the transaction ends,
        so seqs allocated from it are this transaction's alone."""
        raise NotImplementedError

    def new_msg_ids(self, count: int) -> list[int]:
        """`count` rising msg_ids above every stored one (after user_seqs)."""
        raise NotImplementedError

    def add_messages(self, msgs: Sequence[NewMessage]) -> None:
        """Store messages whose ids come from new_msg_ids and whose seqs
        follow on user_seqs in order: both inboxes, each user's max_seq and
        each conversation (last message, unread count) once per call."""
        raise NotImplementedError

    def append_message(
        self, sender: str, to: str, cmid: bytes, kind: int, body: bytes, ts_ms: int
    ) -> Appended:
        """Store one message in both inboxes. Raises UnknownUser, DuplicateSend."""
        raise NotImplementedError

    def sync(
        self, user: str, since: int, limit: int, max_bytes: int
    ) -> tuple[list[Msg], bool]:
        raise NotImplementedError

    def raise_delivered(self, user: str, since: int) -> None:
        """Raise the delivered mark to `since` (capped at max_seq); never lowers it."""
        raise NotImplementedError

    # groups (section 7)

    def lock_groups(self, groups: Iterable[str]) -> dict[str, GroupRow]:
        """The rows of those of `groups` that exist, locked (Postgres) until
        the transaction ends, in id order. Taken before any user row (the one
        lock order, store/postgres.py), so group changes and group messages of
        one group are serialized and numbered in one order."""
        raise NotImplementedError

    def lock_group(self, group: str) -> GroupRow | None:
        """lock_groups of one group: its row, or None."""
        raise NotImplementedError

    def group_members(self, group: str) -> list[GroupMember]:
        """Everyone who ever joined, in join order (the latest join)."""
        raise NotImplementedError

    def save_group(self, row: GroupRow, now_ms: int, new: bool) -> None:
        """Update the group's row, or create it (`new`): a create never
        overwrites a group another transaction made meanwhile (on Postgres
        it raises StoreBusy, and the batch, run again, finds that group)."""
        raise NotImplementedError

    def save_members(self, group: str, members: Sequence[GroupMember]) -> None:
        """Create or update these members' rows."""
        raise NotImplementedError

    def groups_joined(self, users: Iterable[str]) -> dict[str, int]:
        """How many groups each of `users` is in now (absent: none)."""
        raise NotImplementedError

    def group_copies(self, group: str, msg_id: int, within: int = RECENT_COPIES) -> dict[str, int]:
        """The inbox seq of each copy of the group message `msg_id` among the
        last `within` entries of its inbox, by the user (a member then, maybe
        not now) whose inbox holds it. Bounded, as it runs under the locks of
        the group and every member: a retry long after its message finds
        fewer copies (or none), and whoever missed the push then has since
        caught up by the next push's hole or its next Sync."""
        raise NotImplementedError

    def written_to(self, actor: str, users: Iterable[str]) -> set[str]:
        """Those of `users` who have sent `actor` a one-to-one message (whose
        contacts, section 7, hold `actor`). One query however many users: a
        Watch asks of up to 256 at once."""
        raise NotImplementedError

    # presence (section 7, simzmq/presence.py)

    def presence_of(self, users: Iterable[str], now_ms: int | None) -> dict[str, list[int]]:
        """The local states of each of `users` on the gates whose lease holds
        at `now_ms` (None: on every gate stored; absent: on none)."""
        raise NotImplementedError

    def gate_presence(self, gate: str, users: Iterable[str] | None = None,
                      low: str | None = None, high: str | None = None) -> dict[str, int]:
        """The local states stored for `gate`, by user: of all its users, or
        only of `users` (a report about some users reads only their rows,
        not everyone online on the gate), and only of names from `low`
        (included) up to `high` (excluded) when given, compared by code
        point (a snapshot part reads only the rows of its span)."""
        raise NotImplementedError

    def renew_presence_gate(self, gate: str, n: int, expires_ms: int) -> bool:
        """Record `gate`'s report number `n` and extend its lease; False
        (nothing changed) if a report numbered `n` or later was applied."""
        raise NotImplementedError

    def save_presence(self, gate: str, states: dict[str, int]) -> None:
        """Set users' local states on `gate` (0: they have none there)."""
        raise NotImplementedError

    def expired_presence_gates(self, now_ms: int) -> list[str]:
        raise NotImplementedError

    def drop_presence_gates(self, gates: Sequence[str], expired_at: int | None = None) -> None:
        """Forget these gates and their states. With `expired_at`, only
        those whose lease ran out by then (one that another worker renewed
        meanwhile stays)."""
        raise NotImplementedError

    def lock_presence(self, users: Sequence[str]) -> None:
        """Until the transaction ends, hold back every other transaction that
        locks any of `users` here: the presence changes of one user are then
        computed and written one transaction at a time. A batch takes it
        after the user rows it locks (lock_groups, user_seqs), so whoever
        holds it must never wait for a user row: nothing written under it
        (the presence rows, last_seen) lives in one."""
        raise NotImplementedError

    def last_seen(self, users: Iterable[str]) -> dict[str, int]:
        """last_seen_ms of each of `users` that exists (0: never seen); the
        ids of no user are left out."""
        raise NotImplementedError

    def set_last_seen(self, users: Iterable[str], ms: int) -> None:
        """Set last_seen_ms of those of `users` that exist, whose presence
        the transaction has locked (lock_presence); locks no user row."""
        raise NotImplementedError

    def find_group_op(self, actor: str, cmid: bytes) -> str | None:
        """The digest of the group change recorded for (actor, cmid)."""
        raise NotImplementedError

    def record_group_op(self, actor: str, cmid: bytes, digest: str) -> None:
        raise NotImplementedError

    def add_group_entries(self, entries: Sequence[GroupEntry]) -> None:
        """Store group messages and events: their rows, every inbox copy,
        each user's max_seq and each member's conversation with the group."""
        raise NotImplementedError

    def start_group_marks(self, group: str, users: Iterable[str], msg_id: int) -> None:
        """Set the read mark of `users` in the group to `msg_id` (the event
        that added them), nothing unread before it; their Conv with the
        group is live again."""
        raise NotImplementedError

    def freeze_group_convs(self, group: str, users: Iterable[str]) -> None:
        """Keep the Conv with the group of `users`, who are leaving it or
        being removed (their member rows not yet saved inactive), as it is
        now: its peer_read stays the lowest mark of the other members of this
        moment, those leaving with it included (section 7)."""
        raise NotImplementedError

    # conversations

    def conversation_of(self, user: str, peer: str, msg_id: int) -> bool:
        raise NotImplementedError

    def raise_read_mark(self, user: str, peer: str, msg_id: int) -> bool:
        raise NotImplementedError

    def peer_read_mark(self, user: str, peer: str) -> int:
        raise NotImplementedError

    def conversations(self, user: str, limit: int | None = None) -> list[Conv]:
        raise NotImplementedError

    def history(
        self, user: str, peer: str, before: int, limit: int
    ) -> tuple[list[HistoryMsg], bool]:
        raise NotImplementedError

    # the push outbox (simzmq/push/): jobs are written with their message,
    # claimed under a lease by one push service instance at a time, and
    # removed once done or moved to the dead-letter table.

    def add_push_jobs(self, jobs: Sequence[PushJobRow]) -> None:
        """Queue push jobs (one executemany)."""
        raise NotImplementedError

    def claim_push_jobs(self, token: str, now_ms: int, lease_until_ms: int, max_users: int,
                        per_user: int) -> list[PushJob]:
        """Lease the queued jobs of up to `max_users` users whose oldest job
        is due and not leased, and return the first `per_user` of each in
        (user, msg_id) order. A user's jobs are claimed together, and never
        while another lease on their oldest job runs, so one instance at a
        time works on a user, in order. `token` must be new for each claim."""
        raise NotImplementedError

    def finish_push_jobs(self, user: str, msg_ids: Sequence[int]) -> None:
        """Done (sent or not needed): remove `user`'s jobs of these messages from the outbox."""
        raise NotImplementedError

    def retry_push_job(self, user: str, msg_id: int, due_ms: int, attempts: int, error: str) -> None:
        """Try `user`'s job of `msg_id` again at due_ms; the lease ends."""
        raise NotImplementedError

    def release_push_jobs(self, token: str, user: str) -> None:
        """End the lease of claim `token` on what is left of `user`'s jobs."""
        raise NotImplementedError

    def bury_push_jobs(self, user: str, msg_ids: Sequence[int], now_ms: int, error: str) -> None:
        """Move `user`'s jobs of these messages from the outbox to the dead-letter table."""
        raise NotImplementedError

    def dead_push_jobs(self, limit: int) -> list[DeadJob]:
        """The dead-letter table, oldest first."""
        raise NotImplementedError

    def requeue_dead_push_jobs(self, msg_ids: Sequence[int] | None, now_ms: int) -> int:
        """Move the dead jobs of these messages (every member's, for a group
        message; all when msg_ids is None) back to the outbox, due now with
        no attempts; returns how many."""
        raise NotImplementedError

    def push_stats(self) -> PushStats:
        raise NotImplementedError
