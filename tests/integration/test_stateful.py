"""Hypothesis against a real region (started once for the module).

1. A state machine drives random sequences of valid and invalid requests from
   three users on several connections and checks the protocol's invariants
   against a model: inbox seqs are gapless, a cmid is idempotent, read marks
   never go down, nobody sees anyone else's messages, and every reply and
   push is what the model says.
2. Random and mutated payloads, sealed properly or not, down a real
   connection: the gate answers only with the protocol's errors and kicks,
   and keeps serving.

CI runs a few short examples; a campaign runs many more:

    SIMZMQ_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/integration/test_stateful.py
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, CODECS
from simzmq.wire.messages import ErrorCode, KickCode
from tests.rawclient import Closed, RawClient
from tests.region import Region

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("SIMZMQ_FUZZ_EXAMPLES", "0"))
GATE_TYPES = {cls.TYPE for cls in (m.LoginOk, m.Error, m.SendOk, m.Batch, m.NewMsg, m.Ok, m.ReadNotice,
                                   m.Pong, m.ConvList, m.Kick)}


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    # The limits are not under test here: high enough that random sequences stay within them.
    env = {f"SIMZMQ_GATE_LIMITS_{k}": v for k, v in {
        "REQUESTS_BURST": "1000000", "SENDS_BURST": "1000000", "REGISTERS_PER_USER_BURST": "1000",
        "LOGIN_FREE_FAILURES_PER_USER": "1000000", "MAX_SESSIONS_PER_USER": "1000"}.items()}
    r = Region(tmp_path_factory.mktemp("stateful") / "data", extra_env=env)
    r.start()
    yield r
    r.stop()


class Conn:
    """One device of a user: a RawClient that keeps and checks the pushes it passes."""

    def __init__(self, region, user: str, token: bytes, codec: int, device: str):
        self.user = user
        self.raw = RawClient(region.gate_port, region.gate_pk, codec=codec, timeout=20)
        self.pushes = []
        ok = self.request(m.Login(user=user, password="", token=token, device=device))
        assert isinstance(ok, m.LoginOk), ok
        self.token = ok.token

    def request(self, msg, earlier: int | None = None):
        """The reply to `msg`; a reply to the `earlier` ref on the way is kept in self.earlier."""
        ref = self.raw.send(msg)
        while True:
            got_ref, reply, final = self.raw.recv()
            assert reply.TYPE in GATE_TYPES, reply
            if got_ref == ref:
                assert not final, f"the gate closed on {msg}: {reply}"
                return reply
            if earlier is not None and got_ref == earlier:
                self.earlier = reply
                continue
            assert got_ref == 0, f"a reply to ref {got_ref} while waiting for {ref}"
            assert not isinstance(reply, m.Kick), reply
            self.pushes.append(reply)

    def close(self):
        self.raw.close()


_example = itertools.count()
_cmids = itertools.count()


class Protocol(RuleBasedStateMachine):
    """The model: per user the inbox (a list: seq = index + 1), the SendOk of
    every (sender, cmid), and per (reader, peer) the read mark."""

    region: Region = None  # set by the test

    @initialize()
    def start(self):
        n = next(_example)
        self.users = [f"s{n}u{i}x{os.getpid()}" for i in range(3)]
        setup = RawClient(self.region.gate_port, self.region.gate_pk, timeout=20)
        tokens = {}
        for u in self.users:
            assert setup.registered(u, "pw")
            c = RawClient(self.region.gate_port, self.region.gate_pk, timeout=20)
            ok = c.served(m.Login(user=u, password="pw", token=b"", device="setup"))
            assert isinstance(ok, m.LoginOk)
            tokens[u] = ok.token
            c.close()
        setup.close()
        self.tokens = tokens
        self.conns: list[Conn] = [Conn(self.region, u, tokens[u], 1 + i % 2, f"d{i}")
                                  for i, u in enumerate(self.users)]
        self.inbox = {u: [] for u in self.users}
        self.sent = {}  # (sender, cmid) -> (to, kind, body, SendOk)
        self.marks = {}  # (reader, peer) -> msg_id
        self.seen_peer_read = {}  # (user, peer) -> highest peer_read seen in Convs
        self.last_msg_id = 0
        self.devices = itertools.count(10)

    def teardown(self):
        for c in getattr(self, "conns", []):
            c.close()

    # -- helpers --------------------------------------------------------------------

    def conn(self, i: int) -> Conn:
        return self.conns[i % len(self.conns)]

    def user(self, i: int) -> str:
        return self.users[i % len(self.users)]

    def conversation(self, a: str, b: str) -> list:
        return [x for x in self.inbox[a] if {x.sender, x.to} == {a, b}]

    # -- rules ----------------------------------------------------------------------

    # Kinds 250-255 belong to the protocol (1.1): a client's Send with one is
    # refused (bad_send, "protocol_kind").
    @rule(i=st.integers(0, 9), to=st.integers(0, 2), kind=st.integers(0, m.PROTOCOL_KINDS.start - 1),
          body=st.binary(max_size=64))
    def send(self, i, to, kind, body):
        c, recipient = self.conn(i), self.user(to)
        cmid = b"c%d" % next(_cmids)
        ok = c.request(m.Send(to=recipient, cmid=cmid, kind=kind, body=body))
        assert isinstance(ok, m.SendOk), ok
        assert ok.msg_id > self.last_msg_id, "msg_id went down"
        self.last_msg_id = ok.msg_id
        msg = m.Msg(msg_id=ok.msg_id, seq=0, sender=c.user, to=recipient, kind=kind, ts_ms=ok.ts_ms, cmid=cmid,
                    body=body)
        for owner in {c.user, recipient}:
            self.inbox[owner].append(msg)
        assert ok.seq == len(self.inbox[c.user]), "the sender's seq is not the next in its inbox"
        self.sent[(c.user, cmid)] = (recipient, kind, body, ok)

    @rule(i=st.integers(0, 9), pick=st.integers(0, 10**6), same=st.booleans())
    def resend(self, i, pick, same):
        """A Send again with a cmid already used, from any of the sender's devices."""
        if not self.sent:
            return
        (sender, cmid), (to, kind, body, first) = sorted(self.sent.items())[pick % len(self.sent)]
        devices = [c for c in self.conns if c.user == sender]
        c = devices[i % len(devices)]
        before = {u: len(v) for u, v in self.inbox.items()}
        if same:
            again = c.request(m.Send(to=to, cmid=cmid, kind=kind, body=body))
            assert again == first, "a retried Send did not get the first SendOk"
        else:
            again = c.request(m.Send(to=to, cmid=cmid, kind=kind, body=body + b"!"))
            assert isinstance(again, m.Error) and again.code == ErrorCode.BAD_REQUEST
        self._check_counts(c, before)

    @rule(i=st.integers(0, 9),
          kind=st.sampled_from(["nobody", "empty_cmid", "long_cmid", "bad_to", "no_group", "long_to",
                                "protocol_kind"]))
    def bad_send(self, i, kind):
        c = self.conn(i)
        before = {u: len(v) for u, v in self.inbox.items()}
        to, cmid, code = self.users[0], b"x%d" % next(_cmids), ErrorCode.BAD_REQUEST
        msg_kind = 0
        if kind == "nobody":
            to, code = "nobody" + self.users[0], ErrorCode.NO_SUCH_USER
        elif kind == "empty_cmid":
            cmid = b""
        elif kind == "long_cmid":
            cmid, code = b"c" * 33, ErrorCode.TOO_LARGE
        elif kind == "bad_to":
            to = "a/b"
        elif kind == "no_group":
            to, code = "#nogroup", ErrorCode.NO_SUCH_USER
        elif kind == "protocol_kind":
            msg_kind = m.PROTOCOL_KINDS.start
        else:
            to, code = "a" * 65, ErrorCode.TOO_LARGE
        reply = c.request(m.Send(to=to, cmid=cmid, kind=msg_kind, body=b"never stored"))
        assert isinstance(reply, m.Error) and reply.code == code, (kind, reply)
        self._check_counts(c, before)

    def _check_counts(self, c: Conn, before: dict):
        """Nothing was stored: the user's inbox ends where the model's does."""
        assert {u: len(v) for u, v in self.inbox.items()} == before
        batch = c.request(m.Sync(since=len(self.inbox[c.user]), limit=0))
        assert batch.msgs == [] and not batch.more

    @rule(i=st.integers(0, 9), since=st.integers(0, 40), limit=st.sampled_from([0, 1, 2, 5, 501, 2**32 - 1]))
    def sync(self, i, since, limit):
        c = self.conn(i)
        batch = c.request(m.Sync(since=since, limit=limit))
        assert isinstance(batch, m.Batch), batch
        mine = self.inbox[c.user]
        n = 500 if limit == 0 or limit > 500 else limit
        expected = mine[since:since + n]
        assert [x.seq for x in batch.msgs] == list(range(since + 1, since + 1 + len(expected))), "seqs with a gap"
        for got, want in zip(batch.msgs, expected):
            assert (got.msg_id, got.sender, got.to, got.kind, got.cmid, bytes(got.body)) == \
                (want.msg_id, want.sender, want.to, want.kind, want.cmid, want.body)
            assert c.user in (got.sender, got.to), "a message of someone else's"
        assert len(batch.msgs) == len(expected)
        assert batch.more == (since + len(expected) < len(mine))

    @rule(i=st.integers(0, 9), peer=st.integers(0, 2), pick=st.integers(0, 10**6), foreign=st.booleans())
    def read(self, i, peer, pick, foreign):
        c, p = self.conn(i), self.user(peer)
        if p == c.user:
            return  # the conversation with oneself is left out of the model
        ours = self.conversation(c.user, p)
        if foreign or not ours:
            # A msg_id from a conversation c.user is not part of, or none at all.
            others = [x.msg_id for u in self.users for x in self.inbox[u]
                      if c.user not in (x.sender, x.to) or p not in (x.sender, x.to)]
            msg_id = others[pick % len(others)] if others else self.last_msg_id + 1000
            reply = c.request(m.Read(peer=p, msg_id=msg_id))
            assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST, reply
            return
        msg_id = ours[pick % len(ours)].msg_id
        reply = c.request(m.Read(peer=p, msg_id=msg_id))
        assert isinstance(reply, m.Ok), reply
        self.marks[(c.user, p)] = max(self.marks.get((c.user, p), 0), msg_id)

    @rule(i=st.integers(0, 9))
    def convs(self, i):
        c = self.conn(i)
        listed = {x.peer: x for x in c.request(m.Convs()).convs}
        for p in self.users:
            if p == c.user:
                continue
            conv = self.conversation(c.user, p)
            if not conv:
                assert p not in listed
                continue
            got = listed[p]
            assert got.last_msg_id == max(x.msg_id for x in conv)
            mark = self.marks.get((c.user, p), 0)
            assert got.unread == sum(1 for x in conv if x.sender == p and x.msg_id > mark)
            assert got.peer_read == self.marks.get((p, c.user), 0)
            assert got.peer_read >= self.seen_peer_read.get((c.user, p), 0), "a read mark went down"
            self.seen_peer_read[(c.user, p)] = got.peer_read
        assert set(listed) <= set(self.users), "a conversation with a stranger"

    @rule(i=st.integers(0, 9), codec=st.sampled_from([1, 2]))
    def another_device(self, i, codec):
        if len(self.conns) >= 6:
            return
        u = self.user(i)
        self.conns.append(Conn(self.region, u, self.tokens[u], codec, f"d{next(self.devices)}"))

    @rule(i=st.integers(0, 9), codec=st.sampled_from([1, 2]))
    def reconnect(self, i, codec):
        """A device goes away and comes back with its resume token."""
        k = i % len(self.conns)
        old = self.conns[k]
        old.close()
        self.conns[k] = Conn(self.region, old.user, old.token, codec, f"d{next(self.devices)}")

    @rule(i=st.integers(0, 9), garbage=st.binary(max_size=40),
          mtype=st.integers(0, 255).filter(lambda t: t != m.Logout.TYPE))
    def garbage_request(self, i, garbage, mtype):
        """Any body under any type: an Error at worst, and the connection stays."""
        c = self.conn(i)
        c.raw.ref += 1
        ref = c.raw.ref
        c.raw.send_plaintext(bytes([mtype]) + struct.pack(">I", ref) + garbage)
        c.earlier = None
        pong = c.request(m.Ping(ts_ms=ref), earlier=ref)
        assert pong == m.Pong(ts_ms=ref)
        reply = c.earlier
        if mtype not in (m.Pong.TYPE,):  # a Pong is not answered; everything else is
            assert reply is not None
        if isinstance(reply, m.Error):
            assert reply.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.NO_SUCH_USER), reply

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def pushes_are_the_users_own(self):
        for c in getattr(self, "conns", []):
            for push in c.pushes:
                if isinstance(push, m.NewMsg):
                    x = push.msg
                    assert c.user in (x.sender, x.to), "a push of someone else's message"
                    want = self.inbox[c.user][x.seq - 1]
                    assert (want.msg_id, want.body) == (x.msg_id, bytes(x.body)), "a push at the wrong seq"
                elif isinstance(push, m.ReadNotice):
                    assert c.user in (push.reader, push.peer)
                else:
                    assert isinstance(push, m.Error) and push.code == ErrorCode.BAD_REQUEST, push
            c.pushes.clear()


def test_protocol_invariants_hold_for_random_sequences(region):
    Protocol.region = region
    run = Protocol.TestCase
    run.settings = settings(max_examples=EXAMPLES or 4, stateful_step_count=30, deadline=None,
                            suppress_health_check=list(HealthCheck))
    run().runTest()


# --- payloads down a real connection ----------------------------------------------------------


@st.composite
def hostile_frames(draw):
    """(how to send it, bytes): a plaintext to seal, or raw bytes as the ciphertext."""
    kind = draw(st.sampled_from(["plain", "plain", "mutated", "mutated", "short", "cipher", "flip"]))
    if kind == "plain":
        mtype = draw(st.integers(0, 255))
        return "seal", bytes([mtype]) + struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + \
            draw(st.binary(max_size=60))
    if kind == "mutated":
        msg = draw(st.sampled_from([m.Send(to="x", cmid=b"c", kind=0, body=b"hello"), m.Sync(since=1, limit=2),
                                    m.Read(peer="x", msg_id=1), m.Login(user="x", password="p"),
                                    m.Register(user="x", password="p"), m.Ping(ts_ms=3), m.Convs()]))
        codec = CODECS[draw(st.sampled_from([1, 2]))]
        data = bytearray(codec.encode(msg, 77))
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return "seal", bytes(data[:draw(st.integers(5, len(data)))])
    if kind == "short":
        return "seal", draw(st.binary(max_size=4))
    if kind == "cipher":
        return "raw", draw(st.binary(max_size=80))
    return "flip", draw(st.integers(0, 10**6))


def test_hostile_payloads_get_protocol_answers_and_the_gate_keeps_serving(region):
    c = RawClient(region.gate_port, region.gate_pk)
    assert isinstance(c.served(m.Register(user="fuzzer", password="pw")), m.Ok)
    c.close()
    state = {"conn": None, "token": b""}

    def connection(codec):
        if state["conn"] is None:
            c = RawClient(region.gate_port, region.gate_pk, codec=codec, timeout=20)
            # By token; by password again after a fuzzed Logout revoked it.
            ok = c.served(m.Login(user="fuzzer", password="" if state["token"] else "pw", token=state["token"],
                                   device=""))
            assert isinstance(ok, m.LoginOk), ok
            state["conn"], state["token"] = c, ok.token
        return state["conn"]

    @settings(max_examples=EXAMPLES or 40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=st.lists(hostile_frames(), min_size=1, max_size=6), codec=st.sampled_from([1, 2]))
    def check(frames, codec):
        for how, data in frames:
            c = connection(codec)
            if how == "seal":
                c.send_plaintext(data)
            elif how == "raw":
                c.send_frame(data)
            else:
                frame = bytearray(c.tx.seal(BIN.encode(m.Ping(ts_ms=1), 1)))
                frame[data % len(frame)] ^= 1 << (data % 8)
                c.send_frame(bytes(frame))
            sentinel = c.ref = c.ref + 1
            try:
                c.send_plaintext(c.codec.encode(m.Ping(ts_ms=sentinel), sentinel))
                while True:
                    ref, reply, final = c.recv()
                    assert reply.TYPE in GATE_TYPES, reply
                    if isinstance(reply, m.Error):
                        # Any of the protocol's codes but internal, which would be a bug.
                        assert reply.code in set(ErrorCode) - {ErrorCode.INTERNAL}, reply
                    if isinstance(reply, m.Ok) and final:
                        # A fuzzed Logout: it is answered, the token revoked, the connection closed.
                        assert how == "seal" and data[0] == m.Logout.TYPE
                        assert c.closed_without_data()
                        state["token"] = b""
                        raise Closed()
                    if isinstance(reply, m.Kick):
                        # Only a payload under 5 bytes earns a Kick, and it is the last word.
                        assert how == "seal" and len(data) < 5 and final
                        assert reply.code == KickCode.PROTOCOL_VIOLATION
                        assert c.closed_without_data()
                        raise Closed()
                    if ref == sentinel and isinstance(reply, m.Pong):
                        break
            except (Closed, ConnectionResetError, BrokenPipeError):
                # Closed: with a Kick or a Logout's Ok (above), or without a
                # word for a frame that breaks the channel.
                assert how in ("raw", "flip") or len(data) < 5 or data[0] == m.Logout.TYPE
                c.close()
                state["conn"] = None
        # Whatever happened, a fresh client is served.
        fresh = RawClient(region.gate_port, region.gate_pk)
        assert isinstance(fresh.request(m.Ping(ts_ms=5)), m.Pong)
        fresh.close()

    check()
