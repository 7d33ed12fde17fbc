"""Whole batches through the worker's transaction (im.commit_batch), on SQLite
and a real throwaway Postgres: a batch must end exactly as if each request
had come in a batch of its own, and one failing request spoils nothing."""

from __future__ import annotations

import dataclasses
import random
import sqlite3

import pytest

from simzmq.im import IMWorker, Job, PasswordQueue, commit_batch
from simzmq.service import IMService, RegisterWork, Request, token_hash
from simzmq.store import StoreBusy, open_store
from simzmq.store.sqlite import SQLiteStore
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.messages import ErrorCode

T0 = 1_764_000_000_000
TTL_MS = 3600_000
USERS = ("ann", "bob", "cat", "dan")
BIG = 10**9


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request, tmp_path):
    """Opens fresh stores of the back end; closes them at the end."""
    opened = []

    def make():
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/im{len(opened)}.db"
        else:
            url = request.getfixturevalue("pg_cluster").create_database()
        opened.append(open_store(url))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def new_service(new_store):
    service = IMService(new_store(), TTL_MS, 1 << 20)
    outcomes = run(service, [Request(u, b"", m.Register(user=u, password="pw"), RegisterWork("h-" + u, False))
                             for u in USERS])
    assert all(isinstance(o.reply, m.Ok) for o in outcomes)
    return service


def run(service, requests, now=T0):
    return commit_batch(service.store, service, list(requests), now)[0]


def send(sender, to, cmid, body=b"x", origin=b"o" * 16):
    return Request(sender, origin, m.Send(to=to, cmid=cmid, kind=0, body=body))


def replies(outcomes):
    return [o.reply for o in outcomes]


def state(store):
    """Everything a user can read back."""
    out = {}
    for user in USERS:
        msgs, more = store.sync(user, 0, 500, BIG)
        assert not more
        out[user] = (msgs, store.conversations(user), store.max_seq(user), store.delivered_mark(user))
    return out


def without_tokens(outcomes):
    """Outcomes with LoginOk's random token blanked."""
    return [o._replace(reply=dataclasses.replace(o.reply, token=b"")) if isinstance(o.reply, m.LoginOk) else o
            for o in outcomes]


# (reader, peer, msg_id) of the warmup's messages
WARMUP_READS = [("bob", "ann", 1), ("ann", "bob", 2), ("ann", "cat", 3), ("ann", "bob", 1)]


def mixed_batch(rng, token, msg_ids):
    """Sends (some to unknown users, some reusing a cmid with the same or other
    content, some to oneself) mixed with reads, syncs, logins and the rest."""
    requests = []
    for n in range(120):
        sender = rng.choice(USERS)
        roll = rng.random()
        if roll < 0.6:
            to = rng.choice(USERS + ("ghost",))
            cmid = b"c%d" % rng.randrange(40)  # small pool: cmids come back
            requests.append(send(sender, to, cmid, body=rng.choice([b"x", b"y"])))
        elif roll < 0.65:
            requests.append(Request(sender, b"s" * 16, m.Read(peer=rng.choice(USERS + ("ghost",)),
                                                               msg_id=rng.choice(msg_ids))))
        elif roll < 0.7:
            # a read of a warmup message, or one stored since in that conversation
            reader, peer, least = rng.choice(WARMUP_READS)
            requests.append(Request(reader, b"s" * 16, m.Read(peer=peer, msg_id=least + rng.randrange(3) * 10)))
        elif roll < 0.78:
            requests.append(Request(sender, b"", m.Sync(since=rng.randrange(4), limit=0)))
        elif roll < 0.84:
            requests.append(Request(sender, b"", m.Convs()))
        elif roll < 0.9:
            requests.append(Request("ann", b"l" * 16, m.Login(user="ann", password="", token=token, device="")))
        elif roll < 0.94:
            requests.append(Request(sender, b"l" * 16, m.Login(user=sender, password="pw", token=b"",
                                                               device="d%d" % n)))
        elif roll < 0.97:
            requests.append(Request(sender, b"", m.Catchup(since=0, limit=3)))
        else:
            requests.append(Request(sender, b"", m.History(token=token, peer=rng.choice(USERS), before=0, limit=5)))
    # password Logins come back from the password work with its verdict
    return [r._replace(prepared=True) if isinstance(r.msg, m.Login) and not r.msg.token else r for r in requests]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [1, 2])
def test_a_mixed_batch_ends_as_if_each_request_came_alone(new_store, seed):
    rng = random.Random(seed)
    batched, alone = new_service(new_store), new_service(new_store)
    warmup = [send("ann", "bob", b"w1"), send("bob", "ann", b"w2"), send("cat", "ann", b"c1", b"x")]
    first = run(batched, warmup)
    assert run(alone, warmup) == first
    # a resume token both stores know, so both answer the same
    token = b"t" * 32
    for service in (batched, alone):
        with service.store.transaction():
            service.store.add_token("ann", token_hash(token), "", T0 + TTL_MS)
    # ids of messages stored before and within the batch, and one of none
    msg_ids = list(range(1, 80)) + [10**12]
    requests = mixed_batch(rng, token, msg_ids)
    together = run(batched, requests)
    one_by_one = [run(alone, [r])[0] for r in requests]
    assert without_tokens(together) == without_tokens(one_by_one)
    assert state(batched.store) == state(alone.store)
    kinds = {type(o.reply) for o in together}
    assert {m.SendOk, m.Error, m.Ok, m.Batch, m.ConvList, m.LoginOk} <= kinds


@pytest.mark.timeout(120)
def test_many_senders_keep_every_inbox_gapless_and_in_arrival_order(new_store):
    service = new_service(new_store)
    rng = random.Random(7)
    pairs = [(rng.choice(USERS), rng.choice(USERS)) for _ in range(300)]
    requests = [send(a, b, b"m%d" % n, body=b"%d" % n) for n, (a, b) in enumerate(pairs)]
    assert all(isinstance(r, m.SendOk) for r in replies(run(service, requests)))
    for user, (msgs, convs, max_seq, _) in state(service.store).items():
        assert [x.seq for x in msgs] == list(range(1, len(msgs) + 1)) == list(range(1, max_seq + 1))
        assert [x.msg_id for x in msgs] == sorted(x.msg_id for x in msgs)
        # arrival order: the numbered bodies rise in every inbox
        assert [int(x.body) for x in msgs] == sorted(int(x.body) for x in msgs)
        assert len(msgs) == sum(1 for a, b in pairs if user in (a, b))
        for conv in convs:
            received = [x for x in msgs if x.sender == conv.peer and x.to == user and conv.peer != user]
            assert conv.unread == len(received)


@pytest.mark.timeout(120)
def test_a_cmid_reused_in_the_batch_is_a_retry_of_the_first(new_store):
    service = new_service(new_store)
    out = run(service, [send("ann", "bob", b"c1", b"hi", origin=b"A" * 16),
                        send("ann", "bob", b"c1", b"hi", origin=b"B" * 16),
                        send("ann", "bob", b"c1", b"other"),
                        send("bob", "ann", b"c1", b"hi"),
                        send("ann", "cat", b"c2"), send("ann", "cat", b"c2")])
    first, again, different, bobs, c2, c2_again = out
    assert isinstance(first.reply, m.SendOk) and again.reply == first.reply
    # published again, from the retrying connection
    assert [n.msg for n in again.notices] == [n.msg for n in first.notices]
    assert again.notices[1].origin == b"B" * 16
    assert different.reply.code == ErrorCode.BAD_REQUEST
    assert isinstance(bobs.reply, m.SendOk) and bobs.reply.msg_id != first.reply.msg_id
    assert c2_again.reply == c2.reply
    # and in a later batch: the same answers
    later = run(service, [send("ann", "bob", b"c1", b"hi"), send("ann", "bob", b"c1", b"other")], now=T0 + 5)
    assert later[0].reply == first.reply and later[1].reply.code == ErrorCode.BAD_REQUEST
    assert service.store.max_seq("ann") == 3 and service.store.max_seq("bob") == 2


@pytest.mark.timeout(120)
def test_unknown_users_get_no_such_user_and_leave_no_gap(new_store):
    service = new_service(new_store)
    out = run(service, [send("ann", "bob", b"1"), send("ann", "ghost", b"2"), send("ghost", "ann", b"3"),
                        send("ann", "bob", b"4")])
    assert [type(r) for r in replies(out)] == [m.SendOk, m.Error, m.Error, m.SendOk]
    assert out[1].reply.code == out[2].reply.code == ErrorCode.NO_SUCH_USER
    assert "ghost" in out[1].reply.reason and "ghost" in out[2].reply.reason
    assert [r.seq for r in replies(out) if isinstance(r, m.SendOk)] == [1, 2]


@pytest.mark.timeout(120)
def test_later_requests_see_the_sends_before_them(new_store):
    service = new_service(new_store)
    out = run(service, [
        send("ann", "bob", b"1"),
        Request("bob", b"", m.Sync(since=0, limit=0)),
        Request("bob", b"b" * 16, m.Login(user="bob", password="pw", token=b"", device=""), True),
        send("cat", "bob", b"2"),
        Request("bob", b"", m.Convs()),
        send("dan", "eve", b"3"),
        Request("eve", b"", m.Register(user="eve", password="pw"), RegisterWork("h-eve", False)),
        send("dan", "eve", b"4"),
        Request("eve", b"", m.Sync(since=0, limit=0)),
    ])
    sent = out[0].reply
    assert [x.msg_id for x in out[1].reply.msgs] == [sent.msg_id]
    assert out[2].reply.max_seq == 1
    assert [(c.peer, c.unread) for c in out[4].reply.convs] == [("cat", 1), ("ann", 1)]
    # a Send to a user registered later in the batch fails, one after succeeds
    assert out[5].reply.code == ErrorCode.NO_SUCH_USER and isinstance(out[6].reply, m.Ok)
    assert [x.body for x in out[8].reply.msgs] == [b"x"] and out[8].reply.msgs[0].cmid == b"4"


def _poison(store, name, bad):
    """Make the store step `name` raise whenever bad(args) holds."""
    real = getattr(store, name)

    def step(*args):
        if bad(*args):
            raise RuntimeError(f"{name} refused")
        return real(*args)
    setattr(store, name, step)


@pytest.mark.timeout(120)
def test_one_failing_send_among_good_ones(new_store):
    service = new_service(new_store)
    _poison(service.store, "add_messages", lambda msgs: any(x.body == b"poison" for x in msgs))
    out = run(service, [send("ann", "bob", b"1"), send("bob", "ann", b"2"), send("cat", "bob", b"3", b"poison"),
                        send("ann", "cat", b"4"), Request("dan", b"", m.Sync(since=0, limit=0)),
                        send("ann", "bob", b"5")])
    assert [type(r) for r in replies(out)] == [m.SendOk, m.SendOk, m.Error, m.SendOk, m.Batch, m.SendOk]
    assert out[2].reply.code == ErrorCode.INTERNAL and out[2].notices == ()
    store = service.store
    assert store.find_send("cat", b"3") is None and store.max_seq("cat") == 1
    for user, (msgs, _, max_seq, _) in state(store).items():
        assert [x.seq for x in msgs] == list(range(1, max_seq + 1))
    assert [x.cmid for x in store.sync("bob", 0, 10, BIG)[0]] == [b"1", b"2", b"5"]
    # The same Send again, once the fault is gone, is stored.
    del store.add_messages
    assert isinstance(run(service, [send("cat", "bob", b"3", b"poison")])[0].reply, m.SendOk)


@pytest.mark.timeout(120)
def test_one_failing_request_of_another_kind(new_store):
    service = new_service(new_store)
    _poison(service.store, "add_token", lambda user, token_hash, device, expires: device == "poison")
    _poison(service.store, "conversations",
            lambda user, limit=None: user == "dan" and _busy())
    login = m.Login(user="ann", password="pw", token=b"", device="poison")
    out = run(service, [send("ann", "bob", b"1"), Request("ann", b"", login, True),
                        Request("bob", b"", m.Login(user="bob", password="pw", token=b"", device="ok"), True),
                        Request("dan", b"", m.Convs()), send("bob", "ann", b"2")])
    assert [type(r) for r in replies(out)] == [m.SendOk, m.Error, m.LoginOk, m.Error, m.SendOk]
    assert out[1].reply.code == ErrorCode.INTERNAL
    assert out[3].reply.code == ErrorCode.UNAVAILABLE  # busy: the client may retry
    assert service.store.max_seq("ann") == 2 and service.store.max_seq("bob") == 2


def _busy():
    raise StoreBusy("lock timeout")


def test_a_store_locked_past_its_busy_timeout_answers_the_whole_batch_unavailable(tmp_path):
    """BEGIN fails (another writer holds the database past busy_timeout): the
    worker answers every request of the batch `unavailable`, commits nothing,
    publishes nothing, and goes on serving."""

    store = SQLiteStore(str(tmp_path / "im.db"), busy_timeout_ms=50)
    service = IMService(store, TTL_MS, 1 << 20)
    run(service, [Request("ann", b"", m.Register(user="ann", password="pw"), RegisterWork("h", False))])
    blocker = sqlite3.connect(str(tmp_path / "im.db"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    class Session:
        def __init__(self):
            self.replies = []

        def reply_all(self, replies):
            self.replies += replies

    session = Session()
    request = type("R", (), {"session": session})()
    jobs = [Job(request, b"%08d" % i, "ann", b"", m.Send(to="ann", cmid=b"c%d" % i, kind=0, body=b"x"))
            for i in range(3)]
    jobs.append(Job(request, b"%08d" % 9, "ann", b"", m.Login(user="ann", password="pw", device="d")))
    worker = IMWorker.__new__(IMWorker)
    worker.passwords = PasswordQueue(1)
    published = []
    worker.process(store, service, None, published.append, jobs)
    assert len(session.replies) == 4 and published == []
    assert worker.passwords.queued == 0  # the Login was answered, not left counted in the password queue
    codes = {BIN.decode(body[8:])[1].code for _, body in session.replies}
    assert codes == {ErrorCode.UNAVAILABLE}
    blocker.execute("ROLLBACK")
    # The lock gone, the same batch goes through.
    session.replies.clear()
    worker.process(store, service, None, published.append, jobs[:3])
    assert [type(BIN.decode(body[8:])[1]) for _, body in session.replies] == [m.SendOk] * 3
    blocker.close()
    store.close()
