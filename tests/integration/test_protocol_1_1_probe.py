"""Protocol 1.1 against a real region: the SetPresence probe answers Ok (the
gate serves section 7); the presence and typing requests need a Login and
refuse bad values with the right code, in either codec, and the connection
stays. Groups are tested in test_groups.py, presence and typing in
test_presence.py."""

from __future__ import annotations

import pytest

from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode
from tests.rawclient import RawClient
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(120)

CMID = b"c" * 16
# Each section 7 request before Login: not_logged_in.
REQUESTS = [
    m.SetPresence(state=2),
    m.Watch(users=["bob"]),
    m.Typing(peer="bob", typing=True),
    m.GroupCreate(group="#team", title="Team", members=["bob"]),
    m.GroupAdd(group="#team", users=["bob"], cmid=CMID),
    m.GroupRemove(group="#team", users=["bob"], cmid=CMID),
    m.GroupGet(group="#team"),
    m.GroupTitle(group="#team", title="T", cmid=CMID),
    m.Send(to="#team", cmid=CMID, kind=0, body=b"hi"),
    m.Read(peer="#team", msg_id=1),
]
# After Login: what each answers.
LOGGED_IN = [
    (m.SetPresence(state=2), m.Ok),  # the probe of section 7: 1.1
    (m.SetPresence(state=9), ErrorCode.BAD_REQUEST),
    (m.SetPresence(state=0), ErrorCode.BAD_REQUEST),
    (m.Watch(users=["bob"]), m.PresenceList),
    (m.Watch(users=[f"u{i}" for i in range(300)]), ErrorCode.TOO_LARGE),
    (m.Watch(users=["not an id"]), ErrorCode.BAD_REQUEST),
    (m.Typing(peer="bob", typing=True), m.Ok),
    (m.Typing(peer="#nogroup", typing=False), m.Ok),
    (m.Typing(peer="", typing=True), ErrorCode.BAD_REQUEST),
    (m.Watch(users=[]), m.PresenceList),
]


region = region_fixture("probe")


@pytest.fixture(scope="module")
def bob(region):
    c = RawClient(region.gate_port, region.gate_pk)
    assert isinstance(c.served(m.Register(user="bob", password="pw-bob")), m.Ok)
    assert isinstance(c.served(m.Login(user="bob", password="pw-bob", token=b"", device="")), m.LoginOk)
    return c


@pytest.mark.parametrize("codec", [1, 2])
def test_section_7_requests_need_a_login(region, bob, codec):
    c = RawClient(region.gate_port, region.gate_pk, codec=codec)
    for msg in REQUESTS:
        reply = c.request(msg)
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.NOT_LOGGED_IN, (msg, reply)
    assert isinstance(c.request(m.Ping(ts_ms=7)), m.Pong)
    c.close()


@pytest.mark.parametrize("codec", [1, 2])
def test_the_probe_says_1_1_and_bad_values_are_refused(region, bob, codec):
    c = RawClient(region.gate_port, region.gate_pk, codec=codec)
    c.served(m.Register(user="alice", password="pw-alice"))  # Ok, or exists on the second run
    assert isinstance(c.served(m.Login(user="alice", password="pw-alice", token=b"", device="")), m.LoginOk)
    for msg, want in LOGGED_IN:
        reply = c.request(msg)
        if isinstance(want, ErrorCode):
            assert isinstance(reply, m.Error) and reply.code == want, (msg, reply)
        else:
            assert isinstance(reply, want), (msg, reply)
    # bob never wrote to alice: she sees state 0 for him.
    assert c.request(m.Watch(users=["bob"])).states == [m.Presence(user="bob")]
    assert isinstance(c.request(m.Ping(ts_ms=7)), m.Pong)
    assert c.request(m.Sync(since=0, limit=0)).msgs == []
    assert bob.request(m.Sync(since=0, limit=0)).msgs == []
    c.close()


def test_protocol_kinds_are_refused(bob):
    # Kinds 250-255 belong to the protocol from 1.1 on.
    reply = bob.request(m.Send(to="bob", cmid=b"k" * 16, kind=255, body=b"x"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
