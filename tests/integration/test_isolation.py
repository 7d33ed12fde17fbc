"""No request lets one user read or change another's inbox, read marks or
conversations: every request type of the protocol and the HTTP history
endpoint, tried by carol against alice and bob's conversation.
"""

from __future__ import annotations

import os

import pytest

from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, KickCode
from tests.rawclient import RawClient
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(60)


class Tracked(RawClient):
    """A RawClient that keeps the pushes it skips over."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pushes = []

    def skipped(self, msg):
        self.pushes.append(msg)

    def settle(self):
        """Everything the gate sent before now has been read (a Ping is answered after it)."""
        assert isinstance(self.request(m.Ping(ts_ms=7)), m.Pong)


region = region_fixture("isolation")


SUFFIX = f"x{os.getpid()}"
A, B, C = "alice" + SUFFIX, "bob" + SUFFIX, "carol" + SUFFIX


def login(region, name, device="", token=None) -> Tracked:
    c = Tracked(region.gate_port, region.gate_pk)
    msg = m.Login(user=name, password="" if token else "pw-" + name, token=token or b"", device=device)
    ok = c.request(msg)
    assert isinstance(ok, m.LoginOk), ok
    c.name, c.token = name, ok.token
    return c


@pytest.fixture(scope="module")
def world(region):
    """alice and bob talk and read; carol is the attacker, with an account of her own."""
    setup = RawClient(region.gate_port, region.gate_pk)
    for name in (A, B, C):
        assert setup.registered(name, "pw-" + name)
    alice, bob, carol = login(region, A, "phone"), login(region, B, "phone"), login(region, C, "phone")
    private = []
    for i in range(3):
        private.append(alice.request(m.Send(to=B, cmid=b"cmid-%d" % i, kind=0, body=b"secret a%d" % i)))
        private.append(bob.request(m.Send(to=A, cmid=b"cmid-%d" % i, kind=0, body=b"secret b%d" % i)))
    assert all(isinstance(x, m.SendOk) for x in private)
    assert isinstance(bob.request(m.Read(peer=A, msg_id=private[0].msg_id)), m.Ok)
    alice.settle()
    bob.settle()
    return {"alice": alice, "bob": bob, "carol": carol, "private": [x.msg_id for x in private]}


def inbox(c: Tracked) -> list:
    out, since = [], 0
    while True:
        batch = c.request(m.Sync(since=since, limit=0))
        out += batch.msgs
        if not batch.more:
            return out
        since = batch.msgs[-1].seq


def convs(c: Tracked) -> dict:
    return {x.peer: (x.last_msg_id, x.unread, x.peer_read) for x in c.request(m.Convs()).convs}


def snapshot(world) -> dict:
    """What alice and bob hold: inboxes, conversations and read marks."""
    return {who: (inbox(world[who]), convs(world[who])) for who in ("alice", "bob")}


def assert_nothing_of_theirs(msgs, me: str):
    for x in msgs:
        assert me in (x.sender, x.to), f"{me} sees a message between {x.sender} and {x.to}"


def carol_sees_nothing(world):
    carol = world["carol"]
    carol.settle()
    assert_nothing_of_theirs(inbox(carol), C)
    for push in carol.pushes:
        if isinstance(push, m.NewMsg):
            assert C in (push.msg.sender, push.msg.to)
        elif isinstance(push, m.ReadNotice):
            assert C in (push.reader, push.peer), push
        else:
            assert not isinstance(push, m.Kick), push
    assert set(convs(carol)) <= {A, B, C}
    for peer, (last, unread, peer_read) in convs(carol).items():
        assert last not in world["private"] and peer_read not in world["private"]


# --- one test per request type ---------------------------------------------------------------


def test_login_only_with_ones_own_credentials(region, world):
    c = Tracked(region.gate_port, region.gate_pk)
    for msg in (m.Login(user=A, password="pw-" + C, token=b"", device=""),       # carol's password
                m.Login(user=A, password="", token=world["carol"].token, device=""),  # carol's token
                m.Login(user=B, password="", token=world["alice"].token, device="")):  # alice's token, bob's name
        reply = c.request(msg)
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED
    # Logged in as carol, a second Login (as alice, with alice's own token even) is refused.
    assert isinstance(c.served(m.Login(user=C, password="pw-" + C, token=b"", device="")), m.LoginOk)
    reply = c.served(m.Login(user=A, password="", token=world["alice"].token, device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    assert_nothing_of_theirs(inbox(c), C)  # still carol
    carol_sees_nothing(world)


def test_login_with_the_same_device_name_kicks_only_the_same_user(region, world):
    before = snapshot(world)
    extra = login(region, C, "phone")  # replaces carol's phone, not alice's or bob's
    _, kick, _ = world["carol"].recv()
    assert isinstance(kick, m.Kick) and kick.code == KickCode.REPLACED
    world["carol"] = extra
    for who in ("alice", "bob"):
        world[who].settle()
        assert not any(isinstance(p, m.Kick) for p in world[who].pushes)
    assert snapshot(world) == before


def test_register_cannot_take_over_an_account(region, world):
    c = Tracked(region.gate_port, region.gate_pk)
    reply = c.served(m.Register(user=A, password="carols-now"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.EXISTS
    reply = c.served(m.Login(user=A, password="carols-now", token=b"", device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED
    assert isinstance(c.served(m.Login(user=A, password="pw-" + A, token=b"", device="")), m.LoginOk)


def test_send_cannot_forge_the_sender_or_reuse_anothers_cmid(region, world):
    carol = world["carol"]
    before = snapshot(world)
    # alice's cmid, even with alice's very message: a new message of carol's,
    # never alice's SendOk (idempotency is per sender).
    ok = carol.request(m.Send(to=B, cmid=b"cmid-0", kind=0, body=b"secret a0"))
    assert isinstance(ok, m.SendOk) and ok.msg_id not in world["private"]
    after = snapshot(world)
    assert after["alice"] == before["alice"]
    new = [x for x in after["bob"][0] if x not in before["bob"][0]]
    assert len(new) == 1 and new[0].sender == C and new[0].msg_id == ok.msg_id
    assert after["bob"][0][:len(before["bob"][0])] == before["bob"][0]
    carol_sees_nothing(world)


def test_sync_returns_only_ones_own_inbox(region, world):
    carol = world["carol"]
    for since, limit in ((0, 0), (0, 1), (2**53 - 1, 0), (1, 500)):
        assert_nothing_of_theirs(carol.request(m.Sync(since=since, limit=limit)).msgs, C)
    carol_sees_nothing(world)


@pytest.mark.parametrize("peer", ["alice", "bob", "carol"])
def test_read_cannot_touch_anothers_read_marks(region, world, peer):
    carol = world["carol"]
    name = {"alice": A, "bob": B, "carol": C}[peer]
    before = snapshot(world)
    for msg_id in world["private"]:
        reply = carol.request(m.Read(peer=name, msg_id=msg_id))
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
    assert snapshot(world) == before
    for who in ("alice", "bob"):
        world[who].settle()
        assert not [p for p in world[who].pushes if isinstance(p, m.ReadNotice) and p.reader == C]
    carol_sees_nothing(world)


def test_convs_lists_only_ones_own_conversations(region, world):
    carol = world["carol"]
    assert A not in convs(carol) or convs(carol)[A][0] not in world["private"]
    alice_view = convs(world["alice"])
    assert B in alice_view
    carol_sees_nothing(world)


def test_ping_and_pong_carry_nothing_but_the_time(region, world):
    carol = world["carol"]
    ref = carol.send(m.Pong(ts_ms=5))  # a Pong from a client is not answered
    reply = carol.request(m.Ping(ts_ms=123))
    assert reply == m.Pong(ts_ms=123) and ref
    carol_sees_nothing(world)


def test_logout_revokes_only_ones_own_token(region, world):
    spare = login(region, C, "laptop")
    token = spare.token
    ok = spare.request(m.Logout())
    assert isinstance(ok, m.Ok)
    c = Tracked(region.gate_port, region.gate_pk)
    reply = c.served(m.Login(user=C, password="", token=token, device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED
    # alice's and bob's tokens still work.
    for who, name in (("alice", A), ("bob", B)):
        again = login(region, name, token=world[who].token)
        again.close()


def test_history_over_http_is_only_ones_own(region, world):
    carol = world["carol"]
    for peer in (A, B, C):
        status, body = region.http_get(f"/v1/history/{peer}", {"Authorization": "Bearer " + carol.token.hex()})
        assert status == 200
        for x in body["messages"]:
            assert C in (x["sender"], x["to"]) and x["msg_id"] not in world["private"]
    # alice reads her own conversation with bob.
    status, body = region.http_get(f"/v1/history/{B}", {"Authorization": "Bearer " + world["alice"].token.hex()})
    assert status == 200 and {x["msg_id"] for x in body["messages"]} >= set(world["private"])
    # No token, a forged one, a revoked one, or a path trick: nothing.
    assert region.http_get(f"/v1/history/{B}")[0] == 401
    assert region.http_get(f"/v1/history/{B}", {"Authorization": "Bearer " + os.urandom(32).hex()})[0] == 401
    spare = login(region, C, "tablet")
    revoked = spare.token
    assert isinstance(spare.request(m.Logout()), m.Ok)
    assert region.http_get(f"/v1/history/{B}", {"Authorization": "Bearer " + revoked.hex()})[0] == 401
    for path in (f"/v1/history/..%2F{B}", f"/v1/history/{A}%2F{B}", f"/v1/history/{A}/{B}"):
        status, _ = region.http_get(path, {"Authorization": "Bearer " + carol.token.hex()})
        assert status in (400, 404)


def test_before_login_nothing_is_reachable(region, world):
    c = Tracked(region.gate_port, region.gate_pk)
    for msg in (m.Send(to=A, cmid=b"x", kind=0, body=b"x"), m.Sync(since=0, limit=0),
                m.Read(peer=A, msg_id=world["private"][0]), m.Convs()):
        reply = c.request(msg)
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.NOT_LOGGED_IN
    # A failed Login leaves the connection logged out.
    reply = c.served(m.Login(user=A, password="guess", token=b"", device=""))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.AUTH_FAILED
    reply = c.request(m.Sync(since=0, limit=0))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.NOT_LOGGED_IN


def test_their_traffic_never_reaches_carol(region, world):
    """Live: alice and bob keep talking and reading while carol is online."""
    alice, bob = world["alice"], world["bob"]
    sent = alice.request(m.Send(to=B, cmid=os.urandom(16), kind=0, body=b"later"))
    assert isinstance(bob.request(m.Read(peer=A, msg_id=sent.msg_id)), m.Ok)
    world["private"].append(sent.msg_id)
    carol_sees_nothing(world)
