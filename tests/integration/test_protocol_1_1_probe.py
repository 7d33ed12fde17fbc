"""Protocol 1.1 against a real region whose gate serves groups but not yet
presence and typing: those requests get the answer of a 1.0 gate,
Error{bad_request} with its ref, in either codec, before and after Login (so
the SetPresence probe still says 1.0); the connection stays and nothing is
stored. Groups themselves are tested in test_groups.py."""

from __future__ import annotations

import pytest

from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode
from tests.rawclient import RawClient
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(120)

CMID = b"c" * 16
REQUESTS = [
    m.SetPresence(state=2),  # the probe of section 7
    m.SetPresence(state=9),
    m.Watch(users=["bob"]),
    m.Watch(users=[f"u{i}" for i in range(300)]),  # would be too_large on a 1.1 gate
    m.Typing(peer="bob", typing=True),
]
GROUP_REQUESTS = [
    m.GroupCreate(group="#team", title="Team", members=["bob"]),
    m.GroupAdd(group="#team", users=["bob"], cmid=CMID),
    m.GroupRemove(group="#team", users=["bob"], cmid=CMID),
    m.GroupGet(group="#team"),
    m.GroupTitle(group="#team", title="T", cmid=CMID),
    m.Send(to="#team", cmid=CMID, kind=0, body=b"hi"),
    m.Read(peer="#team", msg_id=1),
]


region = region_fixture("probe")


@pytest.fixture(scope="module")
def bob(region):
    c = RawClient(region.gate_port, region.gate_pk)
    assert isinstance(c.served(m.Register(user="bob", password="pw-bob")), m.Ok)
    assert isinstance(c.served(m.Login(user="bob", password="pw-bob", token=b"", device="")), m.LoginOk)
    return c


@pytest.mark.parametrize("codec", [1, 2])
@pytest.mark.parametrize("logged_in", [False, True])
def test_1_1_requests_get_bad_request_and_the_connection_stays(region, bob, codec, logged_in):
    c = RawClient(region.gate_port, region.gate_pk, codec=codec)
    if logged_in:
        c.served(m.Register(user="alice", password="pw-alice"))  # Ok, or exists on the second run
        assert isinstance(c.served(m.Login(user="alice", password="pw-alice", token=b"", device="")), m.LoginOk)
    for msg in REQUESTS:
        reply = c.request(msg)
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST, (msg, reply)
    assert isinstance(c.request(m.Ping(ts_ms=7)), m.Pong)
    if logged_in:
        assert c.request(m.Sync(since=0, limit=0)).msgs == []
    assert bob.request(m.Sync(since=0, limit=0)).msgs == []
    c.close()


@pytest.mark.parametrize("codec", [1, 2])
def test_group_requests_need_a_login_and_protocol_kinds_are_refused(region, bob, codec):
    c = RawClient(region.gate_port, region.gate_pk, codec=codec)
    for msg in GROUP_REQUESTS:
        reply = c.request(msg)
        assert isinstance(reply, m.Error) and reply.code == ErrorCode.NOT_LOGGED_IN, (msg, reply)
    c.close()
    # Kinds 250-255 belong to the protocol from 1.1 on.
    reply = bob.request(m.Send(to="bob", cmid=b"k" * 16, kind=255, body=b"x"))
    assert isinstance(reply, m.Error) and reply.code == ErrorCode.BAD_REQUEST
