"""The gate's request handling, fuzzed in memory: real Gate and
ClientConnection (gate_session) objects, a fake transport, a fake back end that answers
however the test likes, a fake clock.

Whatever clients send and the back end answers, the gate never raises, only
ever writes well-formed frames of the types a gate sends, answers each
request at most once, writes nothing after it closed or after a frame that
broke the channel, forwards session requests only under the logged-in user's
id, and pushes a user's notifications to that user's sessions only.

    SIMZMQ_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/unit/test_fuzz_gate.py
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from simzmq import gate as gate_mod
from simzmq import gate_session
from simzmq.limits import LimitsConfig
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS
from simzmq.wire.errors import ProtocolError
from simzmq.wire.handshake import ClientHandshake, public_key
from simzmq.wire.messages import ErrorCode, KickCode
from tests.configs import defaults

GATE_SK = bytes(range(7, 39))
GATE_PK = public_key(GATE_SK)
USERS = ("alice", "bob", "carol")

# What a gate may send a client.
GATE_TYPES = {cls.TYPE for cls in (m.LoginOk, m.Error, m.SendOk, m.Batch, m.NewMsg, m.Ok, m.ReadNotice,
                                   m.Ping, m.Pong, m.ConvList, m.Kick, m.Ready, m.GroupInfo, m.PresenceList,
                                   m.PresenceNotice, m.TypingNotice)}
PUSH_TYPES = {m.NewMsg.TYPE, m.ReadNotice.TYPE, m.Kick.TYPE, m.Ready.TYPE, m.PresenceNotice.TYPE,
              m.TypingNotice.TYPE}


def fuzz_settings(ci_examples: int, steps: int):
    n = int(os.environ.get("SIMZMQ_FUZZ_EXAMPLES", "0")) or ci_examples
    return settings(max_examples=n, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class FakeLoop:
    def __init__(self):
        self.now = 1000.0
        self.timers = []
        self.seq = itertools.count()

    def call_later(self, delay, callback, *args):
        handle = FakeHandle(lambda: callback(*args))
        heapq.heappush(self.timers, (self.now + delay, next(self.seq), handle))
        return handle

    def advance(self, dt):
        self.now += dt
        while self.timers and self.timers[0][0] <= self.now:
            _, _, handle = heapq.heappop(self.timers)
            if not handle.cancelled:
                handle.callback()


class FakeHandle:
    def __init__(self, callback):
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeBackend:
    def __init__(self):
        self.pending = []  # (key, origin, decoded msg, callback)
        self.subscribed = {}

    def request(self, key, origin, payload, callback):
        _, msg = BIN.decode(payload)
        self.pending.append((key.decode(), origin, msg, callback))

    def subscribe(self, user):
        self.subscribed[user] = self.subscribed.get(user, 0) + 1

    def unsubscribe(self, user):
        self.subscribed[user] -= 1
        if not self.subscribed[user]:
            del self.subscribed[user]


class FakeTransport:
    def __init__(self):
        self.frames = []
        self.closed = False
        self.max_frame = 293
        self.queued_bytes = 0
        self.full = False

    def set_max_frame(self, n):
        self.max_frame = n

    def queued(self):
        return self.queued_bytes

    def write_payloads(self, payloads):
        assert not self.closed, "the gate wrote after closing"
        if self.full:
            raise gate_session.SlowConsumer()
        self.frames.extend(payloads)

    def close(self):
        self.closed = True

    def pause_changed(self):
        pass


GATE_CFG = dataclasses.replace(
    defaults().gate, max_frame=1048576, max_body=65536, handshake_timeout_s=10, idle_timeout_s=90,
    request_timeout_s=5, push_hole_timeout_ms=1000, allow_register=True, max_outbound_bytes=4194304,
    limits=LimitsConfig.from_mapping({
        "requests_per_s": 5.0, "requests_burst": 8, "sends_per_s": 2.0, "sends_burst": 4,
        "abuse_factor": 2.0, "max_sessions_per_user": 2, "max_pending_requests": 4,
        "login_free_failures_per_user": 2, "login_free_failures_per_address": 4,
        "trusted_addresses": [], "max_outbound_total_bytes": 1000, "slow_consumer_min_bytes": 100}))


def make_gate():
    loop = FakeLoop()
    gate = gate_mod.Gate("fuzz", GATE_CFG, GATE_SK, [], clock=lambda: loop.now, loop=loop)
    gate.backend = FakeBackend()
    return gate, loop


class Client:
    """The far end of one connection: a real client handshake and channel."""

    def __init__(self, gate, index, codec_id):
        self.transport = FakeTransport()
        self.conn = gate_session.ClientConnection(gate, self.transport, f"client{index}", f"10.0.0.{index}")
        gate.connections.add(self.conn)
        self.hs = ClientHandshake(GATE_PK, codecs=(codec_id,))
        self.read_upto = 0
        self.received = []  # (ref, msg, final)
        self.tx = self.rx = self.codec = None
        self.sent_refs = collections.Counter()  # ref -> requests sent with it
        self.answered = collections.Counter()
        self.broke_channel_at = None  # frames written when we sent a bad frame
        self.final_seen = False
        self.logged_in_as = None
        self.conn.payload_received(self.hs.hello())
        self.read()
        self.hs_done = False

    def finish_handshake(self):
        self.conn.payload_received(self.hs.sender.header)
        self.hs_done = True

    def forwarded(self, gate, msg, ref: int = 1):
        """Send `msg`; what the gate forwarded for it: (key, origin, msg, callback)."""
        self.sent_refs[ref] += 1
        self.conn.payload_received(self.tx.seal(self.codec.encode(msg, ref)))
        return gate.backend.pending.pop()

    def read(self):
        """Decrypt everything new the gate wrote and check each frame."""
        frames = self.transport.frames
        while self.read_upto < len(frames):
            frame = frames[self.read_upto]
            self.read_upto += 1
            assert not self.final_seen, "a frame after TAG_FINAL"
            if self.rx is None:
                self.hs.receive_welcome(frame)
                self.rx, self.tx, self.codec = self.hs.receiver, self.hs.sender, CODECS[self.hs.codec_id]
                continue
            plaintext, final = self.rx.open(frame)
            ref, msg = self.codec.decode(plaintext)  # a gate only writes what decodes
            assert msg.TYPE in GATE_TYPES, f"the gate sent a {type(msg).__name__}"
            if ref == 0:
                assert msg.TYPE in PUSH_TYPES or isinstance(msg, m.Error), msg
            else:
                self.answered[ref] += 1
                assert self.answered[ref] <= self.sent_refs[ref], f"more replies to ref {ref} than requests"
            if isinstance(msg, m.Error):
                assert msg.code in ErrorCode.__members__.values() and len(msg.reason.encode()) <= 256
            if isinstance(msg, m.Kick):
                assert final and msg.code in KickCode.__members__.values()
            if isinstance(msg, m.LoginOk):
                self.logged_in_as = msg.user
            self.received.append((ref, msg, final))
            self.final_seen = final


# --- strategies -------------------------------------------------------------------------

_user = st.one_of(st.sampled_from(USERS), st.text(max_size=5))
REQUESTS = st.one_of(
    st.builds(m.Login, user=_user, password=st.sampled_from(["", "pw", "wrong"]),
              token=st.sampled_from([b"", b"t" * 32]), device=st.sampled_from(["", "phone", "laptop"])),
    st.builds(m.Register, user=_user, password=st.sampled_from(["", "pw"])),
    st.builds(m.Send, to=_user, cmid=st.binary(max_size=34), kind=st.integers(0, 255),
              body=st.binary(max_size=20)),
    st.builds(m.Sync, since=st.integers(0, 2**64 - 1), limit=st.integers(0, 2**32 - 1)),
    st.builds(m.Read, peer=_user, msg_id=st.integers(0, 2**64 - 1)),
    st.builds(m.Ping, ts_ms=st.integers(0, 2**64 - 1)),
    st.builds(m.Pong, ts_ms=st.integers(0, 2**53)),
    st.builds(m.Convs), st.builds(m.Logout),
    st.builds(m.Kick, code=st.integers(0, 10)), st.builds(m.Revoke), st.builds(m.History),
    st.builds(m.NewMsg),
    st.builds(m.Watch, users=st.lists(_user, max_size=4)),
    st.builds(m.SetPresence, state=st.integers(0, 4)),
    st.builds(m.Typing, peer=_user, typing=st.booleans()),
)


def reply_for(msg, origin, choice):
    """An answer the im service might give (or not) to `msg`."""
    if choice == "none":
        return None
    if choice == "garbage":
        return b"\x00garbage"
    if choice == "error":
        return BIN.encode(m.Error(code=int(ErrorCode.AUTH_FAILED if isinstance(msg, m.Login)
                                           else ErrorCode.NO_SUCH_USER), reason="no"), 0)
    if choice == "unknown":
        return BIN.encode(m.Error(code=999, reason="from a newer worker"), 0)
    if isinstance(msg, m.Login):
        return BIN.encode(m.LoginOk(user=msg.user, session=origin, token=b"k" * 32, max_seq=3), 0)
    if isinstance(msg, m.Send):
        return BIN.encode(m.SendOk(msg_id=9, seq=4, ts_ms=1), 0)
    if isinstance(msg, m.Sync):
        return BIN.encode(m.Batch(msgs=[m.Msg(msg_id=1, seq=1, sender="x", to="y")], more=False), 0)
    if isinstance(msg, m.Convs):
        return BIN.encode(m.ConvList(convs=[m.Conv(peer="x")]), 0)
    if isinstance(msg, m.Watch):
        return BIN.encode(m.PresenceList(states=[m.Presence(user=u, state=2) for u in msg.users]), 0)
    return BIN.encode(m.Ok(), 0)


class GateMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.gate, self.loop = make_gate()
        self.clients = []
        self.next_ref = itertools.count(1)

    # -- clients ----------------------------------------------------------

    @precondition(lambda self: len(self.clients) < 4)
    @rule(codec=st.sampled_from([1, 2]), finish=st.booleans())
    def connect(self, codec, finish):
        c = Client(self.gate, len(self.clients) + 1, codec)
        if finish:
            c.finish_handshake()
        self.clients.append(c)

    def _open(self, i):
        live = [c for c in self.clients if not c.transport.closed]
        if not live:
            return None
        c = live[i % len(live)]
        if not c.hs_done:
            c.finish_handshake()
        return None if c.transport.closed else c

    @rule(i=st.integers(0, 3), msg=REQUESTS, codec_of_other=st.booleans())
    def request(self, i, msg, codec_of_other):
        c = self._open(i)
        if c is None:
            return
        ref = next(self.next_ref)
        c.sent_refs[ref] += 1
        codec = c.codec
        if codec_of_other:  # the other codec's bytes: malformed for this one, mostly
            codec = CODECS[3 - c.hs.codec_id]
        try:
            plaintext = codec.encode(msg, ref)
        except ProtocolError:
            return
        c.conn.payload_received(c.tx.seal(plaintext))
        c.read()

    @rule(i=st.integers(0, 3), body=st.binary(max_size=40), mtype=st.integers(0, 255),
          ref=st.integers(0, 2**32 - 1))
    def raw_plaintext(self, i, body, mtype, ref):
        c = self._open(i)
        if c is None:
            return
        c.sent_refs[ref] += 1
        plaintext = (bytes([mtype]) + struct.pack(">I", ref) + body)[:len(body) + 5]
        c.conn.payload_received(c.tx.seal(plaintext))
        c.read()

    @rule(i=st.integers(0, 3), n=st.integers(0, 4))
    def short_payload(self, i, n):
        c = self._open(i)
        if c is None:
            return
        c.conn.payload_received(c.tx.seal(b"\x0c\x00\x00\x00"[:n]))
        c.read()
        assert c.transport.closed
        if not c.transport.full:
            assert isinstance(c.received[-1][1], m.Kick)
            assert c.received[-1][1].code == KickCode.PROTOCOL_VIOLATION

    @rule(i=st.integers(0, 3), junk=st.binary(max_size=60), flip=st.booleans())
    def bad_ciphertext(self, i, junk, flip):
        c = self._open(i)
        if c is None:
            return
        frame = junk
        if flip:
            good = bytearray(c.tx.seal(BIN.encode(m.Ping(ts_ms=1), 1)))
            good[len(good) // 2] ^= 0x40
            frame = bytes(good)
        before = len(c.transport.frames)
        c.conn.payload_received(frame)
        assert c.transport.closed and len(c.transport.frames) == before, "answered a frame that broke the channel"
        c.tx = None

    @rule(i=st.integers(0, 3))
    def client_final(self, i):
        c = self._open(i)
        if c is None:
            return
        ref = next(self.next_ref)
        c.sent_refs[ref] += 1
        c.conn.payload_received(c.tx.seal(BIN.encode(m.Ping(ts_ms=5), ref) if c.codec is BIN
                                          else c.codec.encode(m.Ping(ts_ms=5), ref), final=True))
        c.read()
        assert c.transport.closed

    @rule(i=st.integers(0, 3))
    def hang_up(self, i):
        c = self._open(i)
        if c is None:
            return
        c.transport.closed = True
        c.conn.connection_lost()
        self.gate.connections.discard(c.conn)

    @rule(i=st.integers(0, 3), full=st.booleans(), queued=st.integers(0, 2000))
    def consumer_speed(self, i, full, queued):
        c = self._open(i)
        if c is None:
            return
        c.transport.full = full
        c.transport.queued_bytes = queued

    # -- the back end ---------------------------------------------------------

    @precondition(lambda self: self.gate.backend.pending)
    @rule(pick=st.integers(0, 100), choice=st.sampled_from(["ok", "ok", "ok", "error", "none", "garbage",
                                                            "unknown"]))
    def backend_answers(self, pick, choice):
        pending = self.gate.backend.pending
        key, origin, msg, callback = pending.pop(pick % len(pending))
        callback(reply_for(msg, origin, choice))
        for c in self.clients:
            if not c.transport.closed or c.read_upto < len(c.transport.frames):
                c.read()

    @rule(user=st.sampled_from(USERS), seq=st.integers(1, 8), other=st.sampled_from(USERS))
    def notification(self, user, seq, other):
        push = m.NewMsg(msg=m.Msg(msg_id=seq, seq=seq, sender=user, to=other, body=b"for " + user.encode()))
        self.gate.fanout.on_notification(user.encode() + b"\0", b"", BIN.encode(push, 0))
        for c in self.clients:
            if c.read_upto < len(c.transport.frames):
                c.read()

    @rule(dt=st.sampled_from([0.01, 0.5, 3.0, 30.0, 100.0]))
    def time_passes(self, dt):
        self.loop.advance(dt)
        self.gate.sweep()
        for c in self.clients:
            if c.read_upto < len(c.transport.frames):
                c.read()

    # -- invariants -------------------------------------------------------------

    @invariant()
    def forwarded_only_as_the_logged_in_user(self):
        sessions = {conn.session: conn for conn in self.gate.connections}
        for key, origin, msg, _ in self.gate.backend.pending:
            if isinstance(msg, (m.Login, m.Register)):
                assert key == msg.user
            else:
                conn = sessions.get(origin)
                if conn is not None and not conn._lost:
                    assert key == conn.user, f"{type(msg).__name__} forwarded as {key}, session of {conn.user}"

    @invariant()
    def pushes_go_to_their_user_only(self):
        for c in self.clients:
            for ref, msg, _ in c.received:
                if isinstance(msg, m.NewMsg):
                    assert c.logged_in_as is not None
                    assert msg.msg.body == b"for " + c.logged_in_as.encode()

    @invariant()
    def gate_books_balance(self):
        gate = self.gate
        live = [conn for conn in gate.connections if not conn._lost]
        for user, mine in gate.fanout.sessions.items():
            for conn in mine.values():
                assert conn.user == user and not conn._lost
            assert len(mine) <= gate.limiter.cfg.max_sessions_per_user
        assert sum(len(s) for s in gate.fanout.sessions.values()) == sum(1 for c in live if c.user is not None)
        # One subscription per user with sessions here, one per user watched here.
        wanted = collections.Counter(list(gate.fanout.sessions)) + collections.Counter(list(gate.presence.watchers))
        assert dict(wanted) == gate.backend.subscribed
        sessions = {conn for mine in gate.fanout.sessions.values() for conn in mine.values()}
        assert set(gate.presence.watching) <= sessions
        assert {conn for mine in gate.presence.states.values() for conn in mine} == sessions
        for conn in live:
            assert conn.pending >= 0
            assert conn.large_replies_pending >= 0
            assert conn.paused == (conn.pending >= gate.limiter.cfg.max_pending_requests
                                   or conn.large_replies_pending > 0)
        pending_logins = sum(1 for c in gate.connections if c.login_pending)
        assert pending_logins <= sum(gate.fanout.logins_pending.values())


TestGateMachine = GateMachine.TestCase
TestGateMachine.settings = fuzz_settings(150, 40)


def test_login_throttled_after_failures_without_reaching_the_back_end():
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    for i in range(1, 4):
        c.sent_refs[i] += 1
        c.conn.payload_received(c.tx.seal(BIN.encode(m.Login(user="alice", password="bad"), i)))
        if gate.backend.pending:
            _, origin, msg, cb = gate.backend.pending.pop()
            cb(reply_for(msg, origin, "error"))
        c.read()
    codes = [msg.code for _, msg, _ in c.received if isinstance(msg, m.Error)]
    assert codes == [ErrorCode.AUTH_FAILED, ErrorCode.AUTH_FAILED, ErrorCode.RATE_LIMITED]
    loop.advance(1.5)
    c.sent_refs[4] += 1
    c.conn.payload_received(c.tx.seal(BIN.encode(m.Login(user="alice", password="pw"), 4)))
    assert len(gate.backend.pending) == 1  # tried again once the delay is over


def test_backpressure_flag_follows_pending_requests():
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    c.conn.payload_received(c.tx.seal(BIN.encode(m.Login(user="alice", password="pw"), 1)))
    _, origin, msg, cb = gate.backend.pending.pop()
    cb(reply_for(msg, origin, "ok"))
    for ref in range(2, 6):
        c.conn.payload_received(c.tx.seal(BIN.encode(m.Read(peer="bob", msg_id=ref), ref)))
    assert c.conn.pending == 4 and c.conn.paused
    _, origin, msg, cb = gate.backend.pending.pop(0)
    cb(reply_for(msg, origin, "ok"))
    assert not c.conn.paused


def test_slow_consumer_is_kicked_and_closed():
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    c.transport.full = True
    c.conn.payload_received(c.tx.seal(BIN.encode(m.Ping(ts_ms=1), 1)))
    assert c.transport.closed and c.conn.state == gate_session.CLOSED


def test_kick_that_cannot_be_written_still_closes():
    """Found by the machine above: a Kick (TAG_FINAL) refused by a full
    transport made the gate seal a second final frame, which raised."""
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    c.transport.full = True
    c.conn.payload_received(c.tx.seal(b""))  # short payload: Kick{protocol_violation}
    assert c.transport.closed and c.conn.state == gate_session.CLOSED
    c.conn.kick(KickCode.SHUTDOWN, "again")  # nothing more, no exception


@pytest.mark.parametrize("reply", [m.Error(code=999, reason="from a newer worker"), m.HistoryPage(),
                                   m.SessionStarted(user="x"), m.Revoke(token=b"t"), m.Kick(code=1)])
def test_back_end_reply_outside_the_protocol_becomes_internal(reply):
    """Found by the machine above: an error code the protocol does not have
    (from a newer or broken worker) went through to the client as it was."""
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    _, _, _, callback = c.forwarded(gate, m.Register(user="alice", password="pw"))
    callback(BIN.encode(reply, 0))
    c.read()
    ref, got, _ = c.received[-1]
    assert ref == 1 and got.code == ErrorCode.INTERNAL


@pytest.mark.parametrize("payload", [BIN.encode(m.HistoryPage(msgs=[m.Msg(sender="x", to="y")]), 0),
                                     BIN.encode(m.Kick(code=0), 0), BIN.encode(m.Revoke(token=b"t"), 0),
                                     bytes([m.NewMsg.TYPE]) + b"\x00\x00\x00\x00garbage"])
def test_only_messages_and_read_notices_are_pushed(payload):
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    _, origin, msg, callback = c.forwarded(gate, m.Login(user="alice", password="pw"))
    callback(reply_for(msg, origin, "ok"))
    before = len(c.transport.frames)
    gate.fanout.on_notification(b"alice\0", b"", payload)
    assert len(c.transport.frames) == before and not c.transport.closed


def test_a_push_that_does_not_decode_is_dropped_for_a_msgpack_client():
    gate, loop = make_gate()
    c = Client(gate, 1, 2)
    c.finish_handshake()
    _, origin, msg, callback = c.forwarded(gate, m.Login(user="alice", password="pw"))
    callback(reply_for(msg, origin, "ok"))
    c.read()
    before = len(c.transport.frames)
    broken = BIN.encode(m.NewMsg(msg=m.Msg(msg_id=1, seq=7, sender="x", to="alice")), 0)[:25]
    gate.fanout.on_notification(b"alice\0", b"", broken)  # the seq reads; the rest does not decode
    assert len(c.transport.frames) == before and not c.transport.closed


def test_a_write_that_spends_the_budget_may_kick_the_writer():
    """Found by the machine above: a Kick queued behind a backlog passed the
    gate-wide budget, the budget check kicked the same connection in the
    middle of that write, and the write then sealed a second final frame."""
    gate, loop = make_gate()
    c = Client(gate, 1, 1)
    c.finish_handshake()
    c.transport.queued_bytes = 965
    gate.sweep()  # under the budget (1000): nothing happens, the estimate is 965
    c.transport.queued_bytes = 1001
    loop.advance(100.0)  # the idle Kick is the write that passes the budget
    assert c.transport.closed and c.conn.state == gate_session.CLOSED
    c.read()
    assert isinstance(c.received[-1][1], m.Kick) and c.received[-1][2]


def test_outbound_budget_kicks_the_biggest_queue():
    gate, loop = make_gate()
    small, big = Client(gate, 1, 1), Client(gate, 2, 1)
    for c in (small, big):
        c.finish_handshake()
    small.transport.queued_bytes, big.transport.queued_bytes = 90, 5000
    gate.sweep()
    big.read()
    assert big.transport.closed and isinstance(big.received[-1][1], m.Kick)
    assert big.received[-1][1].code == KickCode.SLOW_CONSUMER
    assert not small.transport.closed


@pytest.mark.parametrize("codec", [1, 2])
def test_flood_is_limited_then_kicked_for_abuse(codec):
    gate, loop = make_gate()
    c = Client(gate, 1, codec)
    c.finish_handshake()
    for ref in range(1, 200):
        if c.transport.closed:
            break
        c.sent_refs[ref] += 1
        c.conn.payload_received(c.tx.seal(c.codec.encode(m.Ping(ts_ms=ref), ref)))
    c.read()
    kinds = [type(msg).__name__ for _, msg, _ in c.received]
    # burst 8 answered, then rate_limited until 2 x 8 refusals, then the kick.
    assert kinds == ["Ready"] + ["Pong"] * 8 + ["Error"] * 16 + ["Kick"]
    assert c.received[-1][1].code == KickCode.ABUSE
