"""The IM service's rules, over a real in-memory SQLite store, time passed in."""

from __future__ import annotations

import pytest

from simzmq.service import IMService, RegisterWork, Request, StepFailed, token_hash, users_touched
from simzmq.store import open_store
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode

T0 = 1_764_000_000_000
TTL_MS = 7 * 24 * 3600 * 1000


@pytest.fixture
def svc():
    store = open_store("sqlite://:memory:")
    service = IMService(store, TTL_MS, 1 << 20)
    for user in ("alice", "bob", "carol", "dave"):
        call(service, user, m.Register(user=user, password="pw"), prepared=RegisterWork("$argon2id$fake-" + user, False))
    yield service
    store.close()


def call(service, key, msg, now=T0, origin=b"o" * 16, prepared=None):
    with service.store.transaction():
        return service.handle(key, origin, msg, now, prepared)


def send(service, sender, to, body=b"hi", cmid=None, now=T0, origin=b"o" * 16):
    cmid = cmid or f"{sender}-{to}-{body!r}-{now}".encode()[:32]
    return call(service, sender, m.Send(to=to, cmid=cmid, kind=0, body=body), now, origin)


def code(outcome):
    assert isinstance(outcome.reply, m.Error), outcome
    return outcome.reply.code


def test_register_twice_is_exists(svc):
    taken = call(svc, "alice", m.Register(user="alice", password="x"), prepared=RegisterWork(None, False))
    assert code(taken) == ErrorCode.EXISTS
    # A race: the hash was made, but someone else created the user meanwhile.
    raced = call(svc, "alice", m.Register(user="alice", password="x"), prepared=RegisterWork("h", False))
    assert code(raced) == ErrorCode.EXISTS


def test_register_delivered_again_with_the_same_password_is_ok(svc):
    again = call(svc, "alice", m.Register(user="alice", password="pw"), prepared=RegisterWork(None, True))
    assert isinstance(again.reply, m.Ok)
    assert svc.store.get_password_hash("alice") == "$argon2id$fake-alice"


def test_register_key_must_match(svc):
    bad = call(svc, "mallory", m.Register(user="dave", password="x"), prepared=RegisterWork("h", False))
    assert code(bad) == ErrorCode.BAD_REQUEST


def test_password_login_uses_the_verification_result(svc):
    login = m.Login(user="alice", password="pw", token=b"", device="phone")
    assert code(call(svc, "alice", login, prepared=False)) == ErrorCode.AUTH_FAILED
    out = call(svc, "alice", login, prepared=True, origin=b"s" * 16)
    assert isinstance(out.reply, m.LoginOk)
    assert out.reply.session == b"s" * 16 and len(out.reply.token) == 32 and out.reply.max_seq == 0
    # A device login tells every gate, so an older session of that device is kicked.
    assert [type(n.msg) for n in out.notices] == [m.SessionStarted]
    assert out.notices[0].msg.device == "phone"


def test_login_key_must_match_user(svc):
    login = m.Login(user="alice", password="pw", token=b"", device="")
    assert code(call(svc, "bob", login, prepared=True)) == ErrorCode.BAD_REQUEST


def test_token_login_expiry_and_revoke(svc):
    token = call(svc, "alice", m.Login(user="alice", password="pw", token=b"", device=""), prepared=True).reply.token
    by_token = m.Login(user="alice", password="", token=token, device="")
    fresh = call(svc, "alice", by_token, now=T0 + 1000)
    assert isinstance(fresh.reply, m.LoginOk) and fresh.reply.token != token
    # Not bob's token.
    assert code(call(svc, "bob", m.Login(user="bob", password="", token=token, device=""))) == ErrorCode.AUTH_FAILED
    # Expired.
    assert code(call(svc, "alice", by_token, now=T0 + TTL_MS + 1)) == ErrorCode.AUTH_FAILED
    # Revoked.
    call(svc, "alice", m.Revoke(token=fresh.reply.token))
    again = m.Login(user="alice", password="", token=fresh.reply.token, device="")
    assert code(call(svc, "alice", again, now=T0 + 2000)) == ErrorCode.AUTH_FAILED


def test_send_reaches_both_inboxes_and_notifies(svc):
    out = send(svc, "alice", "bob", b"hello", origin=b"A" * 16)
    ok = out.reply
    assert isinstance(ok, m.SendOk) and ok.seq == 1 and ok.ts_ms == T0
    to_bob, to_alice = out.notices
    assert to_bob.user == "bob" and to_bob.origin == b"" and to_bob.msg.msg.seq == 1
    # The sender's other sessions hear of it too, but not the sending connection.
    assert to_alice.user == "alice" and to_alice.origin == b"A" * 16
    assert to_alice.msg.msg.msg_id == ok.msg_id


def test_send_is_idempotent_on_cmid(svc):
    first = send(svc, "alice", "bob", b"once", cmid=b"c1")
    again = send(svc, "alice", "bob", b"once", cmid=b"c1", now=T0 + 5000)
    # A retry answers the first SendOk and publishes the same copies again
    # (gates push each seq once), in case the first publish never happened.
    assert again.reply == first.reply and again.notices == first.notices
    assert code(send(svc, "alice", "bob", b"different", cmid=b"c1")) == ErrorCode.BAD_REQUEST
    assert code(send(svc, "alice", "carol", b"once", cmid=b"c1")) == ErrorCode.BAD_REQUEST
    # The same cmid from another sender is another message.
    assert isinstance(send(svc, "bob", "alice", b"once", cmid=b"c1").reply, m.SendOk)
    batch = call(svc, "bob", m.Sync(since=0, limit=0)).reply
    assert [x.body for x in batch.msgs] == [b"once", b"once"]


def test_send_to_unknown_user_stores_nothing(svc):
    assert code(send(svc, "alice", "nobody")) == ErrorCode.NO_SUCH_USER
    assert call(svc, "alice", m.Sync(since=0, limit=0)).reply.msgs == []


def test_send_to_self_is_stored_once(svc):
    out = send(svc, "alice", "alice", b"note", origin=b"A" * 16)
    assert out.reply.seq == 1 and len(out.notices) == 1 and out.notices[0].origin == b"A" * 16
    assert len(call(svc, "alice", m.Sync(since=0, limit=0)).reply.msgs) == 1


def test_sync_limits_and_more(svc):
    for i in range(7):
        send(svc, "alice", "bob", b"m%d" % i)
    batch = call(svc, "bob", m.Sync(since=2, limit=3)).reply
    assert [x.seq for x in batch.msgs] == [3, 4, 5] and batch.more
    batch = call(svc, "bob", m.Sync(since=5, limit=0)).reply
    assert [x.seq for x in batch.msgs] == [6, 7] and not batch.more
    assert call(svc, "bob", m.Sync(since=7, limit=10)).reply.msgs == []
    assert call(svc, "bob", m.Sync(since=99, limit=10)).reply.msgs == []


def test_read_marks_rise_only_and_notify(svc):
    a = send(svc, "alice", "bob", b"1").reply
    b = send(svc, "alice", "bob", b"2").reply
    out = call(svc, "bob", m.Read(peer="alice", msg_id=b.msg_id), origin=b"B" * 16)
    assert isinstance(out.reply, m.Ok)
    users = sorted((n.user, n.origin) for n in out.notices)
    assert users == [("alice", b""), ("bob", b"B" * 16)]
    assert out.notices[0].msg == m.ReadNotice(reader="bob", peer="alice", msg_id=b.msg_id, ts_ms=T0)
    # Lower or equal: Ok, no one is told.
    lower = call(svc, "bob", m.Read(peer="alice", msg_id=a.msg_id))
    assert isinstance(lower.reply, m.Ok) and lower.notices == ()
    convs = call(svc, "alice", m.Convs()).reply.convs
    assert convs == [m.Conv(peer="bob", last_msg_id=b.msg_id, unread=0, peer_read=b.msg_id)]


def test_read_outside_the_conversation_is_refused(svc):
    sent = send(svc, "alice", "bob").reply
    assert code(call(svc, "carol", m.Read(peer="alice", msg_id=sent.msg_id))) == ErrorCode.BAD_REQUEST
    assert code(call(svc, "carol", m.Read(peer="nobody", msg_id=1))) == ErrorCode.NO_SUCH_USER
    assert code(call(svc, "bob", m.Read(peer="alice", msg_id=sent.msg_id + 100))) == ErrorCode.BAD_REQUEST


def test_convs_unread_and_order(svc):
    send(svc, "alice", "bob", b"1")
    send(svc, "alice", "bob", b"2")
    last = send(svc, "carol", "bob", b"3").reply
    convs = call(svc, "bob", m.Convs()).reply.convs
    assert [(c.peer, c.unread) for c in convs] == [("carol", 1), ("alice", 2)]
    assert convs[0].last_msg_id == last.msg_id


def test_history_needs_a_valid_token_and_sees_only_own_conversations(svc):
    for i in range(5):
        send(svc, "alice", "bob", b"h%d" % i)
    send(svc, "carol", "bob", b"secret")
    token = call(svc, "alice", m.Login(user="alice", password="pw", token=b"", device=""), prepared=True).reply.token
    page = call(svc, "x", m.History(token=token, peer="bob", before=0, limit=3)).reply
    assert [x.body for x in page.msgs] == [b"h4", b"h3", b"h2"] and page.more
    older = call(svc, "x", m.History(token=token, peer="bob", before=page.msgs[-1].msg_id, limit=3)).reply
    assert [x.body for x in older.msgs] == [b"h1", b"h0"] and not older.more
    # alice asking for carol's conversation with bob sees only her own with carol: none.
    assert call(svc, "x", m.History(token=token, peer="carol", before=0, limit=3)).reply.msgs == []
    assert code(call(svc, "x", m.History(token=b"\x00" * 32, peer="bob", before=0, limit=3))) == ErrorCode.AUTH_FAILED


def test_token_hash_is_not_the_token():
    assert token_hash(b"t" * 32) != b"t" * 32 and len(token_hash(b"t" * 32)) == 32


# batches

class CountingStore:
    """The store, counting the calls of each batch step."""

    STEPS = ("find_sends", "user_seqs", "new_msg_ids", "add_messages")

    def __init__(self, store):
        self.store = store
        self.calls = {name: 0 for name in self.STEPS}

    def __getattr__(self, name):
        real = getattr(self.store, name)
        if name not in self.STEPS:
            return real

        def counted(*args):
            self.calls[name] += 1
            return real(*args)
        return counted


def sends(pairs, tag=b""):
    return [Request(a, b"o" * 16, m.Send(to=b, cmid=tag + b"%d" % n, kind=0, body=b"%d" % n))
            for n, (a, b) in enumerate(pairs)]


def batch(service, requests, now=T0, alone=()):
    with service.store.transaction():
        return service.handle_batch(requests, now, alone)


def test_a_batch_of_sends_reads_and_writes_each_thing_once(svc):
    counting = CountingStore(svc.store)
    service = IMService(counting, TTL_MS, 1 << 20)
    pairs = [("alice", "bob"), ("bob", "alice"), ("carol", "alice"), ("alice", "alice")] * 25
    requests = sends(pairs)
    # requests of users with no Send pending do not cut the run
    requests.insert(50, Request("dave", b"", m.Sync(since=0, limit=0)))
    requests.insert(20, Request("nobody", b"", m.Convs()))
    outcomes = batch(service, requests)
    assert sum(isinstance(o.reply, m.SendOk) for o in outcomes) == 100
    assert counting.calls == {"find_sends": 1, "user_seqs": 1, "new_msg_ids": 1, "add_messages": 1}


def test_a_request_of_a_user_with_a_pending_send_sees_it(svc):
    counting = CountingStore(svc.store)
    service = IMService(counting, TTL_MS, 1 << 20)
    requests = sends([("alice", "bob"), ("carol", "alice")])
    requests.insert(1, Request("bob", b"", m.Sync(since=0, limit=0)))
    first, synced, _ = batch(service, requests)
    assert [x.msg_id for x in synced.reply.msgs] == [first.reply.msg_id]
    # two runs, but every user's seq is read (and locked) once, at the start
    assert counting.calls == {"find_sends": 2, "user_seqs": 1, "new_msg_ids": 2, "add_messages": 2}


def test_sends_written_alone_end_as_in_one_run(svc):
    pairs = [("alice", "bob"), ("bob", "carol"), ("alice", "bob"), ("carol", "carol")]
    together = batch(svc, sends(pairs, b"t"))
    counting = CountingStore(svc.store)
    service = IMService(counting, TTL_MS, 1 << 20)
    alone = batch(service, sends(pairs, b"a"), alone={0, 1, 2, 3})
    assert counting.calls["add_messages"] == 4
    # each sender's seqs go on from the first batch's: alice had 2, bob 3, carol 2
    assert [o.reply.seq - t.reply.seq for o, t in zip(alone, together)] == [2, 3, 2, 2]
    assert [o.reply.msg_id - t.reply.msg_id for o, t in zip(alone, together)] == [4] * 4


def test_a_failing_step_names_the_requests_it_served(svc):
    class Broken(CountingStore):
        def __getattr__(self, name):
            if name == "add_messages":
                raise_it = RuntimeError("disk on fire")

                def step(*args):
                    raise raise_it
                return step
            return super().__getattr__(name)

    service = IMService(Broken(svc.store), TTL_MS, 1 << 20)
    requests = sends([("alice", "bob"), ("bob", "alice"), ("carol", "alice")])
    requests.insert(1, Request("dave", b"", m.Sync(since=0, limit=0)))
    with pytest.raises(StepFailed) as failed:
        batch(service, requests)
    assert failed.value.indices == [0, 2, 3] and isinstance(failed.value.cause, RuntimeError)
    with pytest.raises(StepFailed) as failed:
        batch(service, requests, alone={2, 3})
    assert failed.value.indices == [0]


def test_users_touched():
    assert users_touched("a", m.Send(to="b", cmid=b"c", kind=0, body=b"")) == {"a", "b"}
    assert users_touched("a", m.Read(peer="b", msg_id=1)) == {"a", "b"}
    assert users_touched("a", m.Login(user="a", password="", token=b"", device="")) == {"a"}
    assert users_touched("a", m.Sync(since=0, limit=0)) == {"a"}
    assert users_touched("a", m.Revoke(token=b"t")) == frozenset()
    # History names its user by token: it touches anyone
    assert users_touched("a", m.History(token=b"t", peer="b", before=0, limit=1)) is None
