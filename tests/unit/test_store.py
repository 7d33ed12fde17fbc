"""The store's contract, run against SQLite and a real throwaway Postgres."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sqlite3
import time

import pytest

from simzmq.service import IMService, Request
from simzmq.store import (  # noqa: E402
    Conv,
    DuplicateSend,
    Msg,
    NewMessage,
    SentRecord,
    StoreError,
    UnknownUser,
    msg_wire_size,
    open_store,
)
from simzmq.wire import messages as m
from tests.pg import fresh_store_url

T0 = 1_700_000_000_000
BIG = 10**9


class Boom(Exception):
    pass


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    return fresh_store_url(request, tmp_path, request.param)


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def users(store, *names):
    with store.transaction():
        for name in names:
            assert store.create_user(name, f"hash-{name}", T0)


def send(store, sender, to, cmid, body=b"x", kind=0, ts=T0):
    with store.transaction():
        return store.append_message(sender, to, cmid, kind, body, ts)


def inbox(store, user):
    msgs, more = store.sync(user, 0, 500, BIG)
    assert not more
    return msgs


# users and tokens

@pytest.mark.timeout(60)
def test_users(store):
    with store.transaction():
        assert store.create_user("ann", "h1", T0)
        assert not store.create_user("ann", "h2", T0)
        assert store.create_user("Ann", "h3", T0)  # ids are case-sensitive
    assert store.get_password_hash("ann") == "h1"
    assert store.get_password_hash("Ann") == "h3"
    assert store.get_password_hash("bob") is None
    assert store.user_exists("ann") and not store.user_exists("ANN")
    assert store.max_seq("ann") == 0


@pytest.mark.timeout(60)
def test_tokens_expire_and_revoke(store):
    users(store, "ann", "bob")
    with store.transaction():
        store.add_token("ann", b"t1" * 16, "phone", T0 + 1000)
        store.add_token("ann", b"t2" * 16, "laptop", T0 + 5000)
    assert store.check_token("ann", b"t1" * 16, T0)
    assert not store.check_token("bob", b"t1" * 16, T0)
    assert not store.check_token("ann", b"t1" * 16, T0 + 1000)  # expired at expires_ms
    assert not store.check_token("ann", b"nope", T0)
    assert store.token_user(b"t2" * 16, T0) == "ann"
    assert store.token_user(b"t1" * 16, T0 + 2000) is None
    with store.transaction():
        store.revoke_token(b"t2" * 16)
    assert store.token_user(b"t2" * 16, T0) is None
    assert not store.check_token("ann", b"t2" * 16, T0)
    with store.transaction():
        store.add_token("bob", b"t3" * 16, "", T0 + 9000)
        assert store.purge_expired(T0 + 2000) == 1
        assert store.purge_expired(T0 + 2000) == 0
    assert store.check_token("bob", b"t3" * 16, T0 + 2000)


# inbox

@pytest.mark.timeout(60)
def test_append_fills_both_inboxes_gaplessly(store):
    users(store, "ann", "bob", "cat")
    sent = []
    with store.transaction():
        for i in range(10):
            sender, to = [("ann", "bob"), ("bob", "ann"), ("cat", "ann")][i % 3]
            sent.append((sender, to, store.append_message(sender, to, b"c%d" % i, 0, b"m%d" % i, T0 + i)))
    for user in ("ann", "bob", "cat"):
        msgs = inbox(store, user)
        assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1))
        assert store.max_seq(user) == len(msgs)
        ids = [m.msg_id for m in msgs]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len(inbox(store, "ann")) == 10
    assert len(inbox(store, "bob")) == 7
    assert len(inbox(store, "cat")) == 3
    for sender, to, app in sent:
        s_copy = [m for m in inbox(store, sender) if m.msg_id == app.msg_id]
        r_copy = [m for m in inbox(store, to) if m.msg_id == app.msg_id]
        assert s_copy[0].seq == app.sender_seq and r_copy[0].seq == app.recipient_seq
        for m in (s_copy[0], r_copy[0]):
            assert (m.sender, m.to, m.kind, m.ts_ms) == (sender, to, 0, app.ts_ms)
        assert (s_copy[0].cmid, s_copy[0].body) == (r_copy[0].cmid, r_copy[0].body)
    first = inbox(store, "bob")[0]
    assert first == Msg(sent[0][2].msg_id, 1, "ann", "bob", 0, T0, b"c0", b"m0")


@pytest.mark.timeout(60)
def test_self_send_is_stored_once(store):
    users(store, "ann")
    app = send(store, "ann", "ann", b"n1", b"note")
    assert app.sender_seq == app.recipient_seq == 1
    assert store.max_seq("ann") == 1
    assert [m.body for m in inbox(store, "ann")] == [b"note"]
    assert store.conversations("ann") == [Conv("ann", app.msg_id, 0, 0)]
    assert [m.msg_id for m in store.history("ann", "ann", 0, 10)[0]] == [app.msg_id]


@pytest.mark.timeout(60)
def test_unknown_user_writes_nothing(store):
    users(store, "ann")
    with store.transaction():
        with pytest.raises(UnknownUser):
            store.append_message("ann", "ghost", b"c1", 0, b"x", T0)
        with pytest.raises(UnknownUser):
            store.append_message("ghost", "ann", b"c2", 0, b"x", T0)
    assert store.max_seq("ann") == 0
    assert inbox(store, "ann") == []
    assert store.conversations("ann") == []


@pytest.mark.timeout(60)
def test_idempotency_record(store):
    users(store, "ann", "bob")
    app = send(store, "ann", "bob", b"cmid-1", b"hello", kind=3, ts=T0 + 7)
    rec = store.find_send("ann", b"cmid-1")
    assert rec == (app.msg_id, app.sender_seq, T0 + 7, "bob", 3, b"hello", app.recipient_seq)
    assert rec.to == "bob" and rec.sender_seq == app.sender_seq
    assert store.find_send("bob", b"cmid-1") is None
    assert store.find_send("ann", b"cmid-2") is None
    with store.transaction():
        with pytest.raises(DuplicateSend):
            store.append_message("ann", "bob", b"cmid-1", 3, b"hello", T0 + 9)
        # the transaction stays usable and the cmid is per sender
        store.append_message("bob", "ann", b"cmid-1", 0, b"other", T0 + 9)
    assert store.max_seq("ann") == 2 and store.max_seq("bob") == 2
    assert [m.body for m in inbox(store, "ann")] == [b"hello", b"other"]


@pytest.mark.timeout(60)
def test_duplicate_without_savepoint_leaves_no_gap(store):
    users(store, "ann", "bob")
    send(store, "ann", "bob", b"c1")
    with store.transaction():
        with pytest.raises(DuplicateSend):
            store.append_message("ann", "bob", b"c1", 0, b"x", T0)
        store.append_message("ann", "bob", b"c2", 0, b"y", T0)
    assert [m.seq for m in inbox(store, "bob")] == [1, 2]
    assert [m.seq for m in inbox(store, "ann")] == [1, 2]


@pytest.mark.timeout(120)
def test_sync_limits(store):
    users(store, "ann", "bob")
    with store.transaction():
        for i in range(12):
            store.append_message("ann", "bob", b"c%02d" % i, 0, bytes(100), T0 + i)
    msgs, more = store.sync("bob", 0, 5, BIG)
    assert [m.seq for m in msgs] == [1, 2, 3, 4, 5] and more
    msgs, more = store.sync("bob", 5, 7, BIG)
    assert [m.seq for m in msgs] == list(range(6, 13)) and not more
    msgs, more = store.sync("bob", 10, 5, BIG)
    assert [m.seq for m in msgs] == [11, 12] and not more
    assert store.sync("bob", 12, 5, BIG) == ([], False)
    assert store.sync("bob", 99, 5, BIG) == ([], False)
    size = msg_wire_size("ann", "bob", b"c00", bytes(100))
    assert size == 8 + 8 + 4 + 3 + 4 + 3 + 1 + 8 + 4 + 3 + 4 + 100
    msgs, more = store.sync("bob", 0, 500, 3 * size)
    assert len(msgs) == 3 and more
    msgs, more = store.sync("bob", 0, 500, 3 * size - 1)
    assert len(msgs) == 2 and more
    # at least one while any remain, even if it alone is too large
    msgs, more = store.sync("bob", 0, 500, 10)
    assert [m.seq for m in msgs] == [1] and more
    msgs, more = store.sync("bob", 11, 500, 10)
    assert [m.seq for m in msgs] == [12] and not more


@pytest.mark.timeout(120)
def test_sync_limit_zero_means_500(store):
    users(store, "ann", "bob")
    with store.transaction():
        for i in range(502):
            store.append_message("ann", "bob", b"c%d" % i, 0, b"", T0)
    for limit in (0, 501, 10**6):
        msgs, more = store.sync("bob", 0, limit, BIG)
        assert len(msgs) == 500 and more


@pytest.mark.timeout(60)
def test_delivered_mark_only_rises(store):
    users(store, "ann", "bob")
    for i in range(5):
        send(store, "ann", "bob", b"c%d" % i)
    with store.transaction():
        store.raise_delivered("bob", 3)
    assert store.delivered_mark("bob") == 3
    with store.transaction():
        store.raise_delivered("bob", 1)
    assert store.delivered_mark("bob") == 3
    with store.transaction():
        store.raise_delivered("bob", 99)  # never past the inbox
    assert store.delivered_mark("bob") == 5
    assert store.delivered_mark("ann") == 0


# conversations

@pytest.mark.timeout(60)
def test_read_marks_and_unread(store):
    users(store, "ann", "bob", "cat")
    a1 = send(store, "ann", "bob", b"1")
    a2 = send(store, "ann", "bob", b"2")
    b1 = send(store, "bob", "ann", b"3")
    a3 = send(store, "ann", "bob", b"4")
    c1 = send(store, "cat", "ann", b"5")
    assert store.conversation_of("bob", "ann", a1.msg_id)
    assert store.conversation_of("ann", "bob", b1.msg_id)
    assert not store.conversation_of("bob", "ann", c1.msg_id)
    assert not store.conversation_of("bob", "cat", c1.msg_id)
    assert not store.conversation_of("bob", "ann", 10**12)
    convs = {c.peer: c for c in store.conversations("bob")}
    assert convs["ann"] == Conv("ann", a3.msg_id, 3, 0)
    with store.transaction():
        assert store.raise_read_mark("bob", "ann", a2.msg_id)
        assert not store.raise_read_mark("bob", "ann", a1.msg_id)  # lower: no
        assert not store.raise_read_mark("bob", "ann", a2.msg_id)  # same: no
    assert store.peer_read_mark("ann", "bob") == a2.msg_id
    assert store.peer_read_mark("bob", "ann") == 0
    assert store.conversations("bob") == [Conv("ann", a3.msg_id, 1, 0)]
    # reading up to one's own message also counts the peer's older ones read
    with store.transaction():
        assert store.raise_read_mark("ann", "bob", b1.msg_id)
    assert {c.peer: c for c in store.conversations("ann")}["bob"] == Conv("bob", a3.msg_id, 0, a2.msg_id)
    assert {c.peer: c for c in store.conversations("bob")}["ann"] == Conv("ann", a3.msg_id, 1, b1.msg_id)
    # new messages above the mark count again
    send(store, "ann", "bob", b"6")
    assert store.conversations("bob")[0].unread == 2
    with store.transaction():
        assert store.raise_read_mark("bob", "ann", store.conversations("bob")[0].last_msg_id)
    assert store.conversations("bob")[0].unread == 0


@pytest.mark.timeout(60)
def test_conversations_newest_first(store):
    users(store, "ann", "bob", "cat", "dan")
    send(store, "bob", "ann", b"1")
    send(store, "ann", "cat", b"2")
    last = send(store, "dan", "ann", b"3")
    newest = send(store, "ann", "bob", b"4")
    convs = store.conversations("ann")
    assert [c.peer for c in convs] == ["bob", "dan", "cat"]
    assert convs[0] == Conv("bob", newest.msg_id, 1, 0)
    assert convs[1] == Conv("dan", last.msg_id, 1, 0)
    assert convs[2].unread == 0
    assert [c.peer for c in store.conversations("ann", limit=2)] == ["bob", "dan"]
    assert store.conversations("nobody") == []


@pytest.mark.timeout(60)
def test_history_paging(store):
    users(store, "ann", "bob", "cat")
    ids = []
    with store.transaction():
        for i in range(25):
            sender, to = ("ann", "bob") if i % 2 else ("bob", "ann")
            ids.append(store.append_message(sender, to, b"h%d" % i, 0, b"b%d" % i, T0 + i).msg_id)
            store.append_message("cat", "ann", b"x%d" % i, 0, b"noise", T0 + i)
    page, more = store.history("ann", "bob", 0, 10)
    assert [m.msg_id for m in page] == ids[::-1][:10] and more
    page2, more = store.history("ann", "bob", page[-1].msg_id, 10)
    assert [m.msg_id for m in page2] == ids[::-1][10:20] and more
    page3, more = store.history("ann", "bob", page2[-1].msg_id, 10)
    assert [m.msg_id for m in page3] == ids[::-1][20:] and not more
    # seq is the asking user's; both sides see the same messages
    ann_seq = {m.msg_id: m.seq for m in inbox(store, "ann")}
    assert all(m.seq == ann_seq[m.msg_id] for m in page + page2 + page3)
    bob_page, _ = store.history("bob", "ann", 0, 100)
    bob_seq = {m.msg_id: m.seq for m in inbox(store, "bob")}
    assert [m.msg_id for m in bob_page] == ids[::-1]
    assert all(m.seq == bob_seq[m.msg_id] for m in bob_page)
    assert bob_page[-1] == Msg(ids[0], 1, "bob", "ann", 0, T0, b"h0", b"b0")
    # limit is at most 100 (0 means 100); exactly 25 with limit 25: no more
    assert store.history("ann", "bob", 0, 25)[1] is False
    assert len(store.history("ann", "cat", 0, 0)[0]) == 25
    assert store.history("ann", "bob", ids[0], 10) == ([], False)
    assert store.history("bob", "cat", 0, 10) == ([], False)


# transactions

@pytest.mark.timeout(60)
def test_transaction_rollback_on_exception(store):
    users(store, "ann", "bob")
    with pytest.raises(Boom):
        with store.transaction():
            store.append_message("ann", "bob", b"c1", 0, b"x", T0)
            store.create_user("cat", "h", T0)
            raise Boom
    assert store.max_seq("ann") == 0 and store.max_seq("bob") == 0
    assert not store.user_exists("cat")
    assert store.find_send("ann", b"c1") is None
    assert store.conversations("ann") == []
    # and the store goes on working
    assert send(store, "ann", "bob", b"c1").sender_seq == 1


@pytest.mark.timeout(60)
def test_nested_transaction_is_refused(store):
    with store.transaction():
        with pytest.raises(StoreError):
            with store.transaction():
                pass


@pytest.mark.timeout(60)
def test_reopen_keeps_data(store_url):
    s = open_store(store_url)
    users(s, "ann", "bob")
    send(s, "ann", "bob", b"c1", b"kept")
    s.close()
    s = open_store(store_url)
    try:
        assert [m.body for m in inbox(s, "bob")] == [b"kept"]
        assert send(s, "bob", "ann", b"c2").sender_seq == 2
    finally:
        s.close()


# concurrency

PER_WRITER = 200
BATCH = 20


def _writer(url, sender, to, tag):
    """A worker's life: batches of Sends, each batch in one transaction."""
    s = open_store(url)
    service = IMService(s, 1000, 1 << 20)
    try:
        for start in range(0, PER_WRITER, BATCH):
            batch = [Request(sender, b"", m.Send(to=to, cmid=b"%s-%d" % (tag, i), kind=0, body=b"m"))
                     for i in range(start, start + BATCH)]
            with s.transaction():
                outcomes = service.handle_batch(batch, T0 + start)
            assert all(isinstance(o.reply, m.SendOk) for o in outcomes)
    finally:
        s.close()


def sync_all(s, user):
    """Every entry of the user's inbox, page by page."""
    msgs = []
    since = 0
    while True:
        page, more = s.sync(user, since, 500, BIG)
        msgs += page
        since = page[-1].seq if page else since
        if not more:
            return msgs


@pytest.mark.timeout(180)
def test_concurrent_writers_keep_inboxes_gapless_and_ordered(store_url):
    s = open_store(store_url)
    try:
        users(s, "ann", "bob", "cat")
        ctx = multiprocessing.get_context("fork")
        procs = [
            ctx.Process(target=_writer, args=(store_url, "ann", "bob", b"a")),
            ctx.Process(target=_writer, args=(store_url, "bob", "ann", b"b")),
            ctx.Process(target=_writer, args=(store_url, "cat", "ann", b"c")),
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(150)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        expected = {"ann": 3 * PER_WRITER, "bob": 2 * PER_WRITER, "cat": PER_WRITER}
        for user, count in expected.items():
            msgs = sync_all(s, user)
            assert [m.seq for m in msgs] == list(range(1, count + 1))
            assert s.max_seq(user) == count
            # within every conversation, seq order == msg_id order
            ids = [m.msg_id for m in msgs]
            assert ids == sorted(ids)
    finally:
        s.close()


# opening

@pytest.mark.timeout(60)
def test_open_store_spellings(tmp_path):
    for url, path in [
        (f"sqlite:///{tmp_path}/a.db", f"{tmp_path}/a.db"),
        (f"sqlite:////{tmp_path}/b.db", f"{tmp_path}/b.db"),
        (f"{tmp_path}/c.db", f"{tmp_path}/c.db"),
        (f"sqlite:///{tmp_path}/sub/d.db?synchronous=normal", f"{tmp_path}/sub/d.db"),
    ]:
        s = open_store(url)
        try:
            assert s.path == path and os.path.exists(path)
            assert s.describe().startswith(f"sqlite {path} ")
        finally:
            s.close()
    s = open_store(f"sqlite:///{tmp_path}/sub/d.db?synchronous=normal")
    try:
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()
    s = open_store({"store": "sqlite", "sqlite_path": "e.db", "data_dir": str(tmp_path)})
    try:
        assert s.path == f"{tmp_path}/e.db"
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL by default
    finally:
        s.close()
    with pytest.raises(ValueError):
        open_store(f"sqlite:///{tmp_path}/f.db", synchronous="SOMETIMES")
    with pytest.raises(ValueError):
        open_store("mysql://localhost/im")


@pytest.mark.timeout(60)
def test_huge_wire_values_match_nothing(store):
    users(store, "ann", "bob")
    app = send(store, "ann", "bob", b"c1")
    top = 2**64 - 1
    assert store.sync("bob", top, 10, BIG) == ([], False)
    assert not store.conversation_of("bob", "ann", top)
    with store.transaction():
        assert not store.raise_read_mark("bob", "ann", top)
        store.raise_delivered("bob", top)
    assert store.delivered_mark("bob") == 1
    assert [m.msg_id for m in store.history("bob", "ann", top, 10)[0]] == [app.msg_id]


# the batch steps

@pytest.mark.timeout(60)
def test_batch_steps_write_every_table_once_per_call(store):
    users(store, "ann", "bob", "cat")
    old = send(store, "ann", "bob", b"old", b"before")
    with store.transaction():
        # one lookup for many keys: stored, missing, repeated
        keys = [("ann", b"old"), ("ann", b"new"), ("bob", b"old"), ("ann", b"old")]
        found = store.find_sends(keys)
        assert found == {("ann", b"old"): SentRecord(old.msg_id, 1, T0, "bob", 0, b"before", 1)}
        assert store.find_sends([]) == {}
        # one read for many users; those missing are left out
        assert store.user_seqs(["bob", "ann", "ghost", "cat", "ann"]) == {"ann": 1, "bob": 1, "cat": 0}
        assert store.user_seqs([]) == {}
        ids = store.new_msg_ids(4)
        assert ids == sorted(ids) and len(set(ids)) == 4 and ids[0] > old.msg_id
        store.add_messages([
            NewMessage(ids[0], "ann", "bob", 0, T0 + 1, b"a1", b"1", 2, 2),
            NewMessage(ids[1], "cat", "bob", 1, T0 + 1, b"c1", b"2", 1, 3),
            NewMessage(ids[2], "ann", "ann", 0, T0 + 1, b"a2", b"3", 3, 3),
            NewMessage(ids[3], "ann", "bob", 0, T0 + 1, b"a3", b"4", 4, 4),
        ])
    assert [(x.seq, x.body) for x in inbox(store, "ann")] == [(1, b"before"), (2, b"1"), (3, b"3"), (4, b"4")]
    assert [(x.seq, x.body) for x in inbox(store, "bob")] == [(1, b"before"), (2, b"1"), (3, b"2"), (4, b"4")]
    assert [(x.seq, x.sender) for x in inbox(store, "cat")] == [(1, "cat")]
    assert (store.max_seq("ann"), store.max_seq("bob"), store.max_seq("cat")) == (4, 4, 1)
    # each conversation once: its last message, and the unread count grown by
    # the messages the user received in it
    assert store.conversations("bob") == [Conv("ann", ids[3], 3, 0), Conv("cat", ids[1], 1, 0)]
    assert store.conversations("ann") == [Conv("bob", ids[3], 0, 0), Conv("ann", ids[2], 0, 0)]
    assert store.conversations("cat") == [Conv("bob", ids[1], 0, 0)]
    assert store.find_send("cat", b"c1") == SentRecord(ids[1], 1, T0 + 1, "bob", 1, b"2", 3)


@pytest.mark.timeout(60)
def test_a_failed_batch_write_leaves_nothing(store):
    users(store, "ann", "bob")
    send(store, "ann", "bob", b"c1")
    with pytest.raises(Exception):
        with store.transaction():
            ids = store.new_msg_ids(2)
            # the second reuses (ann, c1): the unique idempotency key refuses it
            store.add_messages([NewMessage(ids[0], "ann", "bob", 0, T0, b"c2", b"x", 2, 2),
                                NewMessage(ids[1], "ann", "bob", 0, T0, b"c1", b"y", 3, 3)])
    assert store.max_seq("ann") == 1 and store.max_seq("bob") == 1
    assert store.find_send("ann", b"c2") is None
    assert store.conversations("bob")[0].unread == 1
    assert send(store, "ann", "bob", b"c2").sender_seq == 2


# checkpoints (SQLite)

def _wait_for(predicate, timeout_s=30.0):
    """Poll until predicate() holds; the test fails if it never does."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _write_pages(store, batches, start=0):
    # bodies of 3 KiB: each message takes most of a page
    for b in range(start, start + batches):
        with store.transaction():
            for i in range(50):
                store.append_message("ann", "bob", b"c%d-%d" % (b, i), 0, bytes(3000), T0)


@pytest.mark.timeout(120)
def test_commits_never_checkpoint(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/im.db")
    try:
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        users(store, "ann", "bob")
        store.checkpointer.stop()  # what is left is the commit path alone
        size = os.path.getsize(store.path)
        _write_pages(store, 30)  # well past SQLite's own 1000-page auto-checkpoint
        assert os.path.getsize(store.path + "-wal") > 1000 * 4096
        # nothing reached the database file: no commit checkpointed
        assert os.path.getsize(store.path) == size
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_commits_checkpoint_again_if_the_checkpoint_thread_dies(tmp_path, monkeypatch):
    from simzmq.store import sqlite as sqlite_store

    def broken(self):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite_store.Checkpointer, "_checkpoint_until_stopped", broken)
    store = open_store(f"sqlite:///{tmp_path}/im.db")
    try:
        store.checkpointer._thread.join(10)
        users(store, "ann", "bob")
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 0
        size = os.path.getsize(store.path)
        _write_pages(store, 30)
        assert os.path.getsize(store.path) > size  # commits copied the WAL back
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_the_checkpoint_thread_copies_the_wal_back(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/im.db")
    try:
        users(store, "ann", "bob")
        size = os.path.getsize(store.path)
        _write_pages(store, 10)
        # Two more checkpoints: the second began after the last commit.
        ran = store.checkpointer.checkpoints
        _wait_for(lambda: store.checkpointer.checkpoints >= ran + 2)
        assert os.path.getsize(store.path) > size
        # Everything is copied back, so the WAL starts over: a later write
        # does not grow the file.
        wal_size = os.path.getsize(store.path + "-wal")
        _write_pages(store, 1, start=10)
        assert os.path.getsize(store.path + "-wal") <= wal_size
        thread = store.checkpointer._thread
    finally:
        store.close()
    assert not thread.is_alive()
    again = open_store(f"sqlite:///{tmp_path}/im.db")
    try:
        assert again.max_seq("bob") == 550
        assert [x.seq for x in again.sync("bob", 500, 500, BIG)[0]] == list(range(501, 551))
    finally:
        again.close()


# the push outbox

def _pushed(store, delay_ms=1000):
    """A service that queues push jobs, for the outbox tests."""
    return IMService(store, 3600_000, 65536, push_delay_ms=delay_ms)


def _send_via(service, sender, to, cmid, body=b"hello", ts=T0):
    with service.store.transaction():
        out = service.handle(sender, b"s", m.Send(to=to, cmid=cmid, kind=0, body=body), ts)
    assert isinstance(out.reply, m.SendOk), out.reply
    return out.reply


@pytest.mark.timeout(60)
def test_push_jobs_are_written_with_their_message(store):
    users(store, "ann", "bob")
    service = _pushed(store)
    first = _send_via(service, "ann", "bob", b"c1")
    _send_via(service, "ann", "ann", b"c2")  # to oneself: nobody to wake
    assert service.take_push_due() == T0 + 1000
    assert service.take_push_due() is None
    assert store.push_stats() == (1, T0, 0)
    assert store.claim_push_jobs("t0", T0 + 999, T0 + 60_000, 10, 10) == []  # not due yet
    jobs = store.claim_push_jobs("t1", T0 + 1000, T0 + 60_000, 10, 10)
    assert [(j.msg_id, j.user, j.seq, j.sender, j.body, j.delivered, j.unread) for j in jobs] == [
        (first.msg_id, "bob", 1, "ann", b"hello", 0, 1)]
    # leased: nobody else gets it until the lease ends
    assert store.claim_push_jobs("t2", T0 + 1000, T0 + 60_000, 10, 10) == []
    assert [j.msg_id for j in store.claim_push_jobs("t3", T0 + 60_000, T0 + 90_000, 10, 10)] == [first.msg_id]
    with store.transaction():
        store.finish_push_jobs("bob", [first.msg_id])
    assert store.push_stats() == (0, None, 0)


@pytest.mark.timeout(60)
def test_a_failed_message_write_queues_no_push(store):
    users(store, "ann", "bob")
    service = _pushed(store)
    with pytest.raises(Boom):
        with store.transaction():
            service.handle("ann", b"s", m.Send(to="bob", cmid=b"c1", kind=0, body=b"x"), T0)
            raise Boom()
    assert store.push_stats().queued == 0


@pytest.mark.timeout(60)
def test_push_claims_keep_one_user_in_order_and_to_one_claimant(store):
    users(store, "ann", "bob", "cat")
    service = _pushed(store, delay_ms=0)
    b1 = _send_via(service, "ann", "bob", b"1")
    c1 = _send_via(service, "ann", "cat", b"2")
    b2 = _send_via(service, "cat", "bob", b"3", ts=T0 + 5)
    with store.transaction():
        first = store.claim_push_jobs("a", T0, T0 + 100, 1, 10)
    # one user, and all of their jobs with them (b2 is not due yet but queued behind b1)
    assert [(j.user, j.msg_id) for j in first] == [("bob", b1.msg_id), ("bob", b2.msg_id)]
    assert first[0].unread == 2
    with store.transaction():
        second = store.claim_push_jobs("b", T0 + 10, T0 + 100, 10, 10)
    assert [(j.user, j.msg_id) for j in second] == [("cat", c1.msg_id)]
    # bob's first job retries later: his second waits behind it, even when due
    with store.transaction():
        store.retry_push_job("bob", b1.msg_id, T0 + 50, 1, "status 500")
        store.release_push_jobs("a", "bob")
    assert store.claim_push_jobs("c", T0 + 20, T0 + 100, 10, 10) == []
    with store.transaction():
        again = store.claim_push_jobs("d", T0 + 50, T0 + 100, 10, 1)  # one job per user at most
    assert [(j.msg_id, j.attempts) for j in again] == [(b1.msg_id, 1)]
    with store.transaction():
        store.finish_push_jobs("bob", [b1.msg_id])
        store.release_push_jobs("d", "bob")
    assert [j.msg_id for j in store.claim_push_jobs("e", T0 + 50, T0 + 100, 10, 10)] == [b2.msg_id]


@pytest.mark.timeout(60)
def test_dead_push_jobs_are_listed_and_requeued(store):
    users(store, "ann", "bob")
    service = _pushed(store, delay_ms=0)
    ids = [_send_via(service, "ann", "bob", b"%d" % i).msg_id for i in range(3)]
    with store.transaction():
        store.claim_push_jobs("a", T0, T0 + 100, 10, 10)
        store.bury_push_jobs("bob", ids[:2], T0 + 7, "status 500")
    assert store.push_stats() == (1, T0, 2)
    dead = store.dead_push_jobs(10)
    assert [(d.msg_id, d.user, d.died_ms, d.last_error) for d in dead] == [
        (ids[0], "bob", T0 + 7, "status 500"), (ids[1], "bob", T0 + 7, "status 500")]
    with store.transaction():
        assert store.requeue_dead_push_jobs([ids[1]], T0 + 8) == 1
    assert [d.msg_id for d in store.dead_push_jobs(10)] == [ids[0]]
    with store.transaction():
        assert store.requeue_dead_push_jobs(None, T0 + 9) == 1
    assert store.push_stats() == (3, T0, 0)
    with store.transaction():
        jobs = store.claim_push_jobs("b", T0 + 200, T0 + 300, 10, 10)
    assert [(j.msg_id, j.attempts) for j in jobs] == [(i, 0) for i in ids]


def _claimer(url, token, out):
    store = open_store(url)
    got = []
    try:
        for n in range(40):
            with store.transaction():
                jobs = store.claim_push_jobs(f"{token}-{n}", T0, T0 + 10**9, 3, 100)
                for j in jobs:
                    store.finish_push_jobs(j.user, [j.msg_id])
            got += [j.msg_id for j in jobs]
    finally:
        store.close()
    out.put(got)


@pytest.mark.timeout(120)
def test_concurrent_claimants_never_share_a_job(store_url, store):
    names = [f"u{i}" for i in range(20)]
    users(store, "ann", *names)
    service = _pushed(store, delay_ms=0)
    for i in range(100):
        _send_via(service, "ann", names[i % 20], b"%d" % i)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(store_url, t, out)) for t in ("a", "b", "c")]
    for p in procs:
        p.start()
    got = [x for _ in procs for x in out.get(timeout=100)]
    for p in procs:
        p.join()
    assert len(got) == 100 and len(set(got)) == 100

# groups (protocol.md section 7)

GROUP = "#crew"


def _group_service(store):
    return IMService(store, 10**9, 1 << 20)


def _make_group(store, owner, members):
    service = _group_service(store)
    for member in members:  # each member writes to the owner: the owner is its contact
        send(store, member, owner, f"hi-{member}".encode())
    with store.transaction():
        out = service.handle(owner, b"o" * 16, m.GroupCreate(group=GROUP, title="Crew", members=list(members)), T0)
    assert isinstance(out.reply, m.GroupInfo)
    return service


def _handle(store, service, actor, msg):
    with store.transaction():
        return service.handle(actor, b"o" * 16, msg, T0)


def _group_conv(store, user):
    return {c.peer: c for c in store.conversations(user)}[GROUP]


def test_group_events_have_empty_cmids_and_sends_stay_unique(store):
    users(store, "ann", "bob")
    service = _make_group(store, "ann", ["bob"])
    for i in range(3):
        with store.transaction():
            out = service.handle("ann", b"o" * 16, m.GroupTitle(group=GROUP, title=f"t{i}", cmid=b"t%d" % i), T0)
        assert out.reply == m.Ok()
    events = [x for x in inbox(store, "bob") if x.to == GROUP]
    assert [x.cmid for x in events] == [b""] * 4 and [x.kind for x in events] == [m.GROUP_EVENT_KIND] * 4
    send(store, "ann", "bob", b"c1", b"x")
    with pytest.raises(DuplicateSend):
        send(store, "ann", "bob", b"c1", b"x")
    assert store.find_send("ann", b"") is None


def test_group_membership_marks_and_history(store):
    users(store, "ann", "bob", "cat")
    do = functools.partial(_handle, store, _make_group(store, "ann", ["bob", "cat"]))

    sent = do("bob", m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"one")).reply
    assert do("cat", m.Read(peer=GROUP, msg_id=sent.msg_id)).reply == m.Ok()
    do("ann", m.GroupRemove(group=GROUP, users=["cat"], cmid=b"r1"))
    later = do("bob", m.Send(to=GROUP, cmid=b"g2", kind=0, body=b"two")).reply
    assert [g.user for g in store.group_members(GROUP)] == ["ann", "bob", "cat"]
    assert [g.active for g in store.group_members(GROUP)] == [True, True, False]
    assert store.groups_joined(["ann", "cat"]) == {"ann": 1}
    ann = _group_conv(store, "ann")
    assert ann.unread == 2 and ann.last_msg_id == later.msg_id
    # cat keeps its copies up to its removal, and sees no later ones.
    cat_page, _ = store.history("cat", GROUP, 0, 10)
    assert [x.body for x in cat_page if x.kind == 0] == [b"one"]
    assert [x.body for x in store.history("ann", GROUP, 0, 10)[0] if x.kind == 0] == [b"two", b"one"]
    assert not store.conversation_of("cat", GROUP, later.msg_id)
    assert store.written_to("ann", ["bob", "cat", "nobody"]) == {"bob", "cat"}
    assert store.find_group_op("ann", b"r1") is not None and store.find_group_op("bob", b"r1") is None


def test_a_former_members_group_conv_stays_as_at_its_removal(store):
    users(store, "ann", "bob", "cat")
    do = functools.partial(_handle, store, _make_group(store, "ann", ["bob", "cat"]))
    conv = functools.partial(_group_conv, store)

    one = do("bob", m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"one")).reply
    do("cat", m.Read(peer=GROUP, msg_id=one.msg_id))
    created = [x.msg_id for x in inbox(store, "ann") if x.to == GROUP][0]
    do("ann", m.GroupRemove(group=GROUP, users=["cat"], cmid=b"r1"))
    at_removal = conv("cat")
    # ann's and bob's marks are where the event that added them left them.
    assert at_removal.peer_read == created and at_removal.unread == 0
    two = do("ann", m.Send(to=GROUP, cmid=b"g2", kind=0, body=b"two")).reply
    do("ann", m.Read(peer=GROUP, msg_id=two.msg_id))
    do("bob", m.Read(peer=GROUP, msg_id=two.msg_id))
    assert conv("cat") == at_removal
    # bob's own mark counts for ann while bob is in, and stops with bob's leaving.
    assert conv("ann").peer_read == two.msg_id
    do("bob", m.GroupRemove(group=GROUP, users=["bob"], cmid=b"r2"))
    bob_left = conv("bob")
    assert bob_left.peer_read == two.msg_id
    three = do("ann", m.Send(to=GROUP, cmid=b"g3", kind=0, body=b"three")).reply
    do("ann", m.Read(peer=GROUP, msg_id=three.msg_id))
    assert conv("bob") == bob_left and conv("cat") == at_removal
    # Put back, cat's Conv is live again: ann's mark, then ann's next one.
    added = do("ann", m.GroupAdd(group=GROUP, users=["cat"], cmid=b"a1"))
    assert added.reply == m.Ok()
    assert conv("cat").peer_read == three.msg_id and conv("cat").unread == 0
    four = do("cat", m.Send(to=GROUP, cmid=b"g4", kind=0, body=b"four")).reply
    do("ann", m.Read(peer=GROUP, msg_id=four.msg_id))
    assert conv("cat").peer_read == four.msg_id


def test_a_rolled_back_removal_leaves_the_conv_live(store):
    users(store, "ann", "bob")
    service = _make_group(store, "ann", ["bob"])
    with pytest.raises(Boom):
        with store.transaction():
            service.handle("ann", b"o" * 16, m.GroupRemove(group=GROUP, users=["bob"], cmid=b"r1"), T0)
            raise Boom()
    assert [g.active for g in store.group_members(GROUP)] == [True, True]
    with store.transaction():
        sent = service.handle("ann", b"o" * 16, m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"x"), T0).reply
        service.handle("ann", b"o" * 16, m.Read(peer=GROUP, msg_id=sent.msg_id), T0)
    assert _group_conv(store, "bob").peer_read == sent.msg_id


# contacts (section 7): who has written to whom, as a Watch answer asks it

def _count_statements(store) -> list[int]:
    """From now on, [n]: the statements `store` has run (both back ends run
    each through _execute or _executemany)."""
    count = [0]
    for name in ("_execute", "_executemany"):
        def counted(*args, _real=getattr(store, name)):
            count[0] += 1
            return _real(*args)
        setattr(store, name, counted)
    return count


def test_written_to_answers_a_whole_watch_in_one_query(store):
    names = [f"u{i:03d}" for i in range(300)]
    users(store, "ann", *names)
    writers = set(names[::3])  # have written to ann: ann's contacts
    with store.transaction():
        for user in sorted(writers):
            store.append_message(user, "ann", b"to-ann", 0, b"hi", T0)
        store.append_message("ann", names[1], b"from-ann", 0, b"hi", T0)  # the other way: no contact of ann
    service = _make_group(store, "ann", [names[0], names[2]])  # names[2] writes to ann here too
    writers.add(names[2])
    _handle(store, service, names[0], m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"to the group"))
    _handle(store, service, "ann", m.Send(to=GROUP, cmid=b"g2", kind=0, body=b"to the group"))
    count = _count_statements(store)

    assert store.written_to("ann", []) == set() and count == [0]
    assert store.written_to("ann", [names[0]]) == {names[0]} and count == [1]
    assert store.written_to("ann", [names[1]]) == set()  # ann wrote to it, not it to ann
    assert store.written_to(names[1], ["ann"]) == {"ann"}
    assert store.written_to("ann", ["nobody", "", "U000", names[0] + " "]) == set()
    # A group is nobody's contact, whoever wrote in it.
    assert store.written_to("ann", [GROUP]) == set() and store.written_to(names[0], [GROUP, "ann"]) == set()
    assert store.written_to("ann", [names[3], names[3], "nobody", names[3], names[4], "nobody"]) == {names[3]}
    # Self: only once one has written to oneself.
    assert store.written_to("ann", ["ann"]) == set()
    with store.transaction():
        store.append_message("ann", "ann", b"note", 0, b"to self", T0)
    assert store.written_to("ann", ["ann", names[6]]) == {"ann", names[6]}

    # A Watch's most: 256 ids, of every kind, each in one statement.
    watched = names[:250] + ["ann", GROUP, "nobody", "ghost", "#other", "u999"]
    assert len(set(watched)) == 256
    before = count[0]
    assert store.written_to("ann", watched) == (writers | {"ann"}) & set(watched)
    assert count[0] == before + 1
    before = count[0]
    assert store.written_to("ann", (names[250:] + names[:6]) * 4) == writers & set(names[250:] + names[:6])
    assert count[0] == before + 1


def _group_writer(url, sender, body_prefix, peer):
    s = open_store(url)
    service = _group_service(s)
    try:
        for i in range(PER_WRITER):
            to = GROUP if i % 2 else peer
            with s.transaction():
                out = service.handle_batch([Request(sender, b"o" * 16, m.Send(
                    to=to, cmid=body_prefix + b"%d" % i, kind=0, body=body_prefix + b"%d" % i))], T0 + i)
            assert isinstance(out[0].reply, m.SendOk), out
    finally:
        s.close()


@pytest.mark.timeout(180)
def test_concurrent_group_writers_give_every_member_one_order(store_url):
    s = open_store(store_url)
    try:
        users(s, "ann", "bob", "cat")
        _make_group(s, "ann", ["bob", "cat"])
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_group_writer, args=(store_url, "ann", b"a", "bob")),
                 ctx.Process(target=_group_writer, args=(store_url, "bob", b"b", "cat")),
                 ctx.Process(target=_group_writer, args=(store_url, "cat", b"c", "ann"))]
        for p in procs:
            p.start()
        for p in procs:
            p.join(150)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        orders = []
        for user in ("ann", "bob", "cat"):
            msgs = sync_all(s, user)
            assert [x.seq for x in msgs] == list(range(1, len(msgs) + 1))
            assert [x.msg_id for x in msgs] == sorted(x.msg_id for x in msgs)
            orders.append([x.msg_id for x in msgs if x.to == GROUP])
        assert orders[0] == orders[1] == orders[2] and len(orders[0]) == 1 + 3 * (PER_WRITER // 2)
    finally:
        s.close()


def test_sqlite_schema_1_gains_groups_and_keeps_its_messages(tmp_path):
    import sqlite3

    import sqlite_utils

    from simzmq.store import sqlite as sqlite_store

    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path, isolation_level=None)
    sqlite_store.MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    s = open_store(path)
    try:
        users(s, "ann", "bob")
        send(s, "ann", "bob", b"c1", b"x")
        with pytest.raises(DuplicateSend):
            send(s, "ann", "bob", b"c1", b"y")
        _make_group(s, "ann", ["bob"])
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(sqlite_store.MIGRATIONS)
    finally:
        s.close()


# A group of ann, bob and cat that cat has left, written straight into a
# store whose schema stops before frozen_peer_read; the marks of ann, bob
# and cat in it are 7, 5 and 3.
_GROUP_BEFORE_FROZEN_CONVS = (
    "INSERT INTO users (id, pw_hash, created_ms, max_seq, delivered)"
    " VALUES ('ann', 'h', 0, 0, 0), ('bob', 'h', 0, 0, 0), ('cat', 'h', 0, 0, 0)",
    "INSERT INTO groups (id, title, owner, creator, version, joins, created_ms)"
    " VALUES ('#crew', 'Crew', 'ann', 'ann', 2, 3, 0)",
    "INSERT INTO group_members (group_id, user_id, joined, active)"
    " VALUES ('#crew', 'ann', 1, 1), ('#crew', 'bob', 2, 1), ('#crew', 'cat', 3, 0)",
    "INSERT INTO conversations (user_id, peer, last_msg_id, read_mark, unread)"
    " VALUES ('ann', '#crew', 10, 7, 0), ('bob', '#crew', 10, 5, 0), ('cat', '#crew', 9, 3, 1)",
)


def _write_schema_before(store_url, sqlite_step, postgres_step, statements):
    """A store whose schema stops before the migration `sqlite_step` /
    `postgres_step` (of its back end), holding the rows `statements` write."""
    if store_url.startswith("sqlite:"):
        import sqlite_utils

        from simzmq.store import sqlite as sqlite_store

        step = sqlite_store.MIGRATIONS.index(sqlite_step)
        conn = sqlite3.connect("/" + store_url.split("sqlite:", 1)[1].lstrip("/"), isolation_level=None)
        try:
            for migration in sqlite_store.MIGRATIONS[:step]:
                migration(sqlite_utils.Database(conn))
            conn.execute(f"PRAGMA user_version = {step}")
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
        return
    import psycopg

    from simzmq.store import postgres as postgres_store

    step = postgres_store.MIGRATIONS.index(postgres_step)
    with psycopg.connect(store_url, autocommit=True) as conn:
        for migration in postgres_store.MIGRATIONS[:step]:
            conn.execute(migration, prepare=False)
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (step,))
        for statement in statements:
            conn.execute(statement)


def test_the_frozen_convs_step_freezes_who_had_left_and_keeps_members_live(store_url):
    from simzmq.store import postgres as postgres_store, sqlite as sqlite_store

    _write_schema_before(store_url, sqlite_store._frozen_convs_v5, postgres_store._SCHEMA_V6,
                         _GROUP_BEFORE_FROZEN_CONVS)
    s = open_store(store_url)
    try:
        conv = functools.partial(_group_conv, s)
        assert conv("cat") == Conv(GROUP, 9, 1, 5)
        assert (conv("ann").peer_read, conv("bob").peer_read) == (5, 7)
        with s.transaction():
            assert s.raise_read_mark("bob", GROUP, 10)
        assert conv("ann").peer_read == 10
        assert conv("cat") == Conv(GROUP, 9, 1, 5)
    finally:
        s.close()


def test_the_last_seen_step_keeps_each_users_last_seen(store_url, caplog):
    from simzmq.store import postgres as postgres_store, sqlite as sqlite_store

    _write_schema_before(store_url, sqlite_store._last_seen_v6, postgres_store._SCHEMA_V7, (
        "INSERT INTO users (id, pw_hash, created_ms, max_seq, delivered, last_seen_ms)"
        " VALUES ('ann', 'h', 0, 0, 0, 5), ('bob', 'h', 0, 0, 0, 0)",))
    with caplog.at_level("INFO", logger="simzmq.store"):
        s = open_store(store_url)
    # The upgrade says so, once, in the worker's log.
    if store_url.startswith("postgres"):
        before, steps = postgres_store.MIGRATIONS.index(postgres_store._SCHEMA_V7), len(postgres_store.MIGRATIONS)
    else:
        before, steps = sqlite_store.MIGRATIONS.index(sqlite_store._last_seen_v6), len(sqlite_store.MIGRATIONS)
    assert [r.getMessage().split(": ")[-1] for r in caplog.records if "schema" in r.getMessage()] == [
        f"schema version {before} -> {steps}"]
    try:
        assert s.last_seen(["ann", "bob", "cat"]) == {"ann": 5, "bob": 0}
        with s.transaction():
            s.set_last_seen(["bob", "cat"], 9)
        assert s.last_seen(["ann", "bob", "cat"]) == {"ann": 5, "bob": 9}
        users(s, "cat")
        assert s.last_seen(["cat"]) == {"cat": 0}
    finally:
        s.close()


def test_a_snapshot_part_reads_its_span_of_the_gates_rows_through_an_index(store, store_url):
    """A big gate's snapshot comes in parts of a span of names each
    (gate_presence low/high): each part's read is an index range over its
    span, not a scan of every row of the gate."""
    with store.transaction():
        for gate in ("g1", "g2"):
            store.save_presence(gate, {f"user{i:05d}": 2 for i in range(3000)})
    postgres = store_url.startswith("postgres")
    if postgres:
        store._execute("ANALYZE presence")
    seen = []
    run = store._execute

    def recording(sql, args=()):
        seen.append((sql, list(args)))
        return run(sql, args)
    store._execute = recording
    try:
        with store.transaction():
            part = store.gate_presence("g1", low="user01000", high="user02000")
    finally:
        store._execute = run
    assert len(part) == 1000 and min(part) == "user01000" and max(part) == "user01999"
    ((sql, args),) = seen
    with store.transaction():
        plan = " ".join(str(row) for row in store._execute(
            ("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + sql, args).fetchall())
    assert "presence_gate_user" in plan, plan
    if postgres:
        assert "Index Cond" in plan and "user_id" in plan.split("Index Cond", 1)[1], plan
    else:
        assert "user_id>?" in plan.replace(" ", "") and "user_id<?" in plan.replace(" ", ""), plan
