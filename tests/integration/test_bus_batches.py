"""Batches through a real broker and a real IM worker (threads of this
process, real sockets on 127.0.0.1, a real SQLite store): one bad request in
a batch gets its own Error and the others succeed; the replies come back
packed; the notifications come per topic group, after the commit."""

import dataclasses
import threading
import time

import pytest
import zmq

from simzmq import mdp
from simzmq.envelope import pack_request, unpack_notices, unpack_reply, unpack_stamp
from simzmq.im import IMWorker
from simzmq.notify import group_topic
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from tests.brokerthread import BrokerThread
from tests.configs import defaults, with_brokers

CREDIT = 256


@pytest.fixture
def bus(tmp_path):
    ctx = zmq.Context()
    broker = BrokerThread(context=ctx, heartbeat_ms=100)
    cfg = defaults(tmp_path)
    cfg = dataclasses.replace(cfg, im=dataclasses.replace(cfg.im, credit=CREDIT, pwhash_nice=0))
    # The worker's backup broker is an ipc path of this test's that nothing
    # binds (a free TCP port could be another test's broker by then).
    nowhere = f"ipc://{tmp_path}/no-backup-broker"
    cfg = with_brokers(cfg, {"backend": broker.ep["backend"], "notify_in": broker.ep["notify_in"]},
                       {"backend": nowhere, "notify_in": nowhere}, heartbeat_ms=100, liveness=5)
    worker = IMWorker("im-test", cfg, metrics_port=None)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield ctx, broker
    worker.stop()
    thread.join(5)
    broker.stop()
    ctx.destroy(linger=0)


class Gate:
    """What a gate does on the bus, by hand: batches on a DEALER, a SUB."""

    def __init__(self, ctx, broker):
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(broker.ep["frontend"])
        self.sub = ctx.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.connect(broker.ep["notify_out"])
        self.next = 1

    def batch(self, entries):
        """Send (key, message or raw payload) entries as one batch; the corrs."""
        corrs, frames = [], []
        for key, msg in entries:
            corr = self.next.to_bytes(8, "big")
            self.next += 1
            payload = msg if isinstance(msg, bytes) else BIN.encode(msg, 0)
            frames.append((key, pack_request(corr, b"", payload)))
            corrs.append(corr)
        self.dealer.send_multipart(mdp.build_client_batch(b"im", frames))
        return corrs

    def replies(self, count, timeout=10.0):
        """{corr: decoded reply} and the number of messages they came in."""
        got, messages = {}, 0
        end = time.monotonic() + timeout
        while len(got) < count:
            assert self.dealer.poll(max(1, int((end - time.monotonic()) * 1000))), f"only {len(got)} replies"
            batched, service, rest = mdp.parse_client_message(self.dealer.recv_multipart())
            assert service == b"im"
            messages += 1
            for body in rest:
                corr, payload = unpack_reply(body)
                got[corr] = BIN.decode(payload)[1]
        return got, messages


def wait_for_worker(gate):
    end = time.monotonic() + 10
    while time.monotonic() < end:
        gate.dealer.send_multipart(mdp.build_client_request(mdp.MMI_SERVICE, [b"im"]))
        assert gate.dealer.poll(5000)
        if mdp.parse_client_reply(gate.dealer.recv_multipart())[1] == [b"200"]:
            return
        time.sleep(0.05)
    raise TimeoutError("no im worker")


@pytest.mark.timeout(60)
def test_one_bad_request_in_a_batch_gets_its_own_error(bus):
    ctx, broker = bus
    gate = Gate(ctx, broker)
    wait_for_worker(gate)
    users = ["ann", "bob"]
    corrs = gate.batch([(u.encode(), m.Register(user=u, password="pw-" + u)) for u in users])
    got, _ = gate.replies(2)
    assert all(isinstance(got[c], m.Ok) for c in corrs), got
    # bob is online on this gate: its group topic (and its own, unused here).
    gate.sub.setsockopt(zmq.SUBSCRIBE, group_topic(b"bob"))
    time.sleep(0.3)  # the subscription reaches the worker's PUB
    entries = [
        (b"ann", m.Send(to="bob", cmid=b"c1", body=b"first")),
        (b"ann", m.Send(to="nobody", cmid=b"c2", body=b"lost")),   # no such user
        (b"ann", b"\xfe\x00\x00\x00\x00junk"),                       # undecodable
        (b"ann", m.Send(to="bob", cmid=b"c3", body=b"second")),
    ]
    corrs = gate.batch(entries)
    got, _ = gate.replies(4)
    first, nobody, junk, second = (got[c] for c in corrs)
    assert isinstance(first, m.SendOk) and isinstance(second, m.SendOk), got
    assert second.seq == first.seq + 1                     # in order, after the bad ones
    assert isinstance(nobody, m.Error) and nobody.code == m.ErrorCode.NO_SUCH_USER
    assert isinstance(junk, m.Error) and junk.code == m.ErrorCode.BAD_REQUEST
    # bob's notifications: packed entries in his group, in commit order,
    # after the commit (the SendOks above were only sent after it).
    pushed = []
    end = time.monotonic() + 10
    while len(pushed) < 2 and time.monotonic() < end:
        if gate.sub.poll(200):
            topic, stamp, packed = gate.sub.recv_multipart()
            assert topic == group_topic(b"bob")
            unpack_stamp(stamp)
            pushed += [BIN.decode(p)[1] for user, _, p in unpack_notices(packed) if user == b"bob"]
    assert [n.msg.body for n in pushed] == [b"first", b"second"]
    assert [n.msg.msg_id for n in pushed] == [first.msg_id, second.msg_id]
    # A retried batch (a gate's failover resend) is answered from the store.
    again = gate.batch([(b"ann", m.Send(to="bob", cmid=b"c1", body=b"first"))])
    retried, _ = gate.replies(1)
    assert retried[again[0]].msg_id == first.msg_id and retried[again[0]].seq == first.seq


@pytest.mark.timeout(60)
def test_unreadable_requests_are_answered_so_the_worker_keeps_its_credit(bus):
    """More unreadable entries than the worker's credit, then a good request:
    each unreadable one is answered (with an empty body), so the broker gets
    the credit back and the good request is served."""
    ctx, broker = bus
    gate = Gate(ctx, broker)
    wait_for_worker(gate)
    too_short = [(b"ann", pack) for pack in [b"x"] * (CREDIT + 44)]
    gate.dealer.send_multipart(mdp.build_client_batch(b"im", too_short))
    good = gate.batch([(b"ann", m.Register(user="ann", password="pw-ann"))])
    empty, answer = 0, None
    end = time.monotonic() + 20
    while answer is None:
        assert gate.dealer.poll(max(1, int((end - time.monotonic()) * 1000))), f"{empty} empty answers"
        _, service, rest = mdp.parse_client_message(gate.dealer.recv_multipart())
        for body in rest:
            if body == b"":
                empty += 1
            else:
                corr, payload = unpack_reply(body)
                assert corr == good[0]
                answer = BIN.decode(payload)[1]
    assert empty == len(too_short)
    assert isinstance(answer, m.Ok)
