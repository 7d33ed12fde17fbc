"""Request rules of protocol.md sections 5 and 7."""

import pytest
from hypothesis import given, settings

from simzmq.wire import messages as M
from simzmq.wire.codec import CODECS
from simzmq.wire.errors import ProtocolError
from simzmq.wire.rules import is_group, is_valid_group_id, is_valid_user_id, validate_request
from tests.strategies import SECTION_7_CLASSES, VALID_1_1_REQUEST, instances

MAX_BODY = 1000
BAD, TOO_LARGE = 1, 6


def code_of(msg, ref=0, **options):
    try:
        validate_request(msg, MAX_BODY, ref, **options)
    except ProtocolError as exc:
        assert exc.ref == ref
        return exc.code
    return None


@pytest.mark.parametrize("user", ["a", "A.b-c_9", "x" * 64, "0"])
def test_valid_user_ids(user):
    assert is_valid_user_id(user)


@pytest.mark.parametrize("user", ["", "#group", "a b", "é", "x" * 65, "a\n", None, b"ab"])
def test_invalid_user_ids(user):
    assert not is_valid_user_id(user)


@pytest.mark.parametrize(
    "msg, expected",
    [
        (M.Login(user="alice", password="pw"), None),
        (M.Login(user="alice", token=b"t" * 64, device="d" * 64), None),
        (M.Login(user="alice"), BAD),
        (M.Login(user="alice", password="pw", token=b"t"), BAD),
        (M.Login(user="", password="pw"), BAD),
        (M.Login(user="a!", password="pw"), BAD),
        (M.Login(user="a" * 65, password="pw"), TOO_LARGE),
        (M.Login(user="alice", password="p" * 257), TOO_LARGE),
        (M.Login(user="alice", password="é" * 129), TOO_LARGE),
        (M.Login(user="alice", token=b"t" * 65), TOO_LARGE),
        (M.Login(user="alice", password="pw", device="d" * 65), TOO_LARGE),
        (M.Register(user="bob", password="p" * 256), None),
        (M.Register(user="bob", password=""), BAD),
        (M.Register(user="bob", password="p" * 257), TOO_LARGE),
        (M.Register(user="#team", password="pw"), BAD),
        (M.Send(to="bob", cmid=b"c", body=b"x" * MAX_BODY), None),
        (M.Send(to="bob", cmid=b"c" * 32), None),
        (M.Send(to="bob", cmid=b""), BAD),
        (M.Send(to="bob", cmid=b"c" * 33), TOO_LARGE),
        (M.Send(to="bob", cmid=b"c", body=b"x" * (MAX_BODY + 1)), TOO_LARGE),
        (M.Send(to="", cmid=b"c"), BAD),
        (M.Send(to="b" * 65, cmid=b"c"), TOO_LARGE),
        (M.Sync(since=2**53 - 1, limit=2**32 - 1), None),
        (M.Sync(since=2**53), BAD),
        (M.Read(peer="bob", msg_id=5), None),
        (M.Read(peer="bob", msg_id=2**53), BAD),
        (M.Read(peer="bo b", msg_id=5), BAD),
        (M.Ping(ts_ms=1), None),
        (M.Ping(ts_ms=2**60), BAD),
        (M.Pong(ts_ms=1), None),
        (M.Logout(), None),
        (M.Convs(), None),
    ],
    ids=repr,
)
def test_rules(msg, expected):
    assert code_of(msg, ref=42) == expected


@pytest.mark.parametrize("cls", [c for t, c in M.MESSAGES.items() if t not in M.CLIENT_REQUESTS])
def test_gate_only_and_internal_types_are_bad_request(cls):
    assert code_of(cls(), ref=3) == BAD


def test_non_message_is_bad_request():
    assert code_of(M.Msg()) == BAD
    assert code_of("Login") == BAD


def test_client_requests():
    names = {M.MESSAGES[t].__name__ for t in M.CLIENT_REQUESTS}
    assert names == {"Login", "Send", "Sync", "Read", "Ping", "Pong", "Logout", "Register", "Convs",
                     "GroupCreate", "GroupAdd", "GroupRemove", "GroupGet", "GroupTitle", "Watch",
                     "SetPresence", "Typing"}


# --- section 7 (protocol 1.1) --------------------------------------------------------

V11 = {"protocol_1_1": True}


@pytest.mark.parametrize("group", ["#a", "#team", "#" + "x" * 63, "#A.b-c_9"])
def test_valid_group_ids(group):
    assert is_valid_group_id(group) and not is_valid_user_id(group)


@pytest.mark.parametrize("group", ["", "#", "team", "##a", "#a b", "#é", "#" + "x" * 64, "#a\n", None])
def test_invalid_group_ids(group):
    assert not is_valid_group_id(group)


@pytest.mark.parametrize("cls", [c for c in SECTION_7_CLASSES if c.TYPE in M.CLIENT_REQUESTS],
                         ids=lambda c: c.__name__)
def test_a_gate_without_1_1_answers_every_request_bad_request(cls):
    assert code_of(cls(), ref=9) == BAD


def test_a_gate_without_1_1_answers_bad_request_whatever_the_fields():
    """The probe of section 7, and fields that would be too_large with 1.1: the answer of a 1.0 gate."""
    assert code_of(M.SetPresence(state=2), ref=9) == BAD
    assert code_of(M.Watch(users=[str(i) for i in range(300)]), ref=9) == BAD


@settings(max_examples=300, deadline=None)
@given(VALID_1_1_REQUEST)
def test_well_formed_1_1_requests_pass_and_round_trip(msg):
    assert code_of(msg, ref=5, **V11) is None
    for codec in CODECS.values():
        assert codec.decode(codec.encode(msg, 5)) == (5, msg)
    if msg.TYPE in M.PROTOCOL_1_1_TYPES:
        assert code_of(msg, ref=5) == BAD


GOOD_CMID = b"c" * 16
MEMBERS = [f"u{i}" for i in range(256)]


@pytest.mark.parametrize(
    "msg, expected",
    [
        (M.GroupCreate(group="#team", title="Team ☕", members=["bob", "carol"]), None),
        (M.GroupCreate(group="#team", title="", members=[]), None),
        (M.GroupCreate(group="#t", title="t" * 256, members=MEMBERS), None),
        (M.GroupCreate(group="#t", title="é" * 128, members=["bob"]), None),
        (M.GroupCreate(group="#t", title="\u200f\u200d\U0001f468\u200d\U0001f469", members=[]), None),
        (M.GroupCreate(group="team", members=["bob"]), BAD),
        (M.GroupCreate(group="#", members=["bob"]), BAD),
        (M.GroupCreate(group="#" + "x" * 64, members=["bob"]), TOO_LARGE),
        (M.GroupCreate(group="#t", title="t" * 257), BAD),
        (M.GroupCreate(group="#t", title="é" * 129), BAD),
        (M.GroupCreate(group="#t", title="a\nb"), BAD),
        (M.GroupCreate(group="#t", title="a\x7fb"), BAD),
        (M.GroupCreate(group="#t", title="a\x85b"), BAD),
        (M.GroupCreate(group="#t", title="evil\u202egnp.exe"), BAD),
        (M.GroupCreate(group="#t", title="\u2066x\u2069"), BAD),
        (M.GroupCreate(group="#t", members=MEMBERS + ["x"]), TOO_LARGE),
        (M.GroupCreate(group="#t", members=["bob", "#other"]), BAD),
        (M.GroupCreate(group="#t", members=["bob", ""]), BAD),
        (M.GroupCreate(group="#t", members=["b" * 65]), TOO_LARGE),
        (M.GroupAdd(group="#t", users=["dave"], cmid=GOOD_CMID), None),
        (M.GroupAdd(group="#t", users=[], cmid=b"c" * 32), None),
        (M.GroupAdd(group="#t", users=["dave"], cmid=b""), BAD),
        (M.GroupAdd(group="#t", users=["dave"], cmid=b"c" * 33), TOO_LARGE),
        (M.GroupAdd(group="#t", users=MEMBERS + ["x"], cmid=GOOD_CMID), TOO_LARGE),
        (M.GroupAdd(group="dave", users=["dave"], cmid=GOOD_CMID), BAD),
        (M.GroupRemove(group="#t", users=["alice"], cmid=b"\x01"), None),
        (M.GroupRemove(group="#t", users=["a b"], cmid=GOOD_CMID), BAD),
        (M.GroupRemove(group="#t", users=["alice"], cmid=b""), BAD),
        (M.GroupGet(group="#t"), None),
        (M.GroupGet(group="t"), BAD),
        (M.GroupTitle(group="#t", title="", cmid=b"\xff" * 32), None),
        (M.GroupTitle(group="#t", title="x\ty", cmid=GOOD_CMID), BAD),
        (M.GroupTitle(group="#t", title="x" * 257, cmid=GOOD_CMID), BAD),
        (M.GroupTitle(group="#t", title="x", cmid=b""), BAD),
        (M.Watch(users=[]), None),
        (M.Watch(users=["bob", "#team", "nobody"]), None),
        (M.Watch(users=MEMBERS), None),
        (M.Watch(users=MEMBERS + MEMBERS), None),  # each id counted once
        (M.Watch(users=MEMBERS + ["x"]), TOO_LARGE),
        (M.Watch(users=["bo b"]), BAD),
        (M.Watch(users=["b" * 65]), TOO_LARGE),
        (M.SetPresence(state=1), None),
        (M.SetPresence(state=2), None),
        (M.SetPresence(state=3), None),
        (M.SetPresence(state=0), BAD),
        (M.SetPresence(state=4), BAD),
        (M.SetPresence(state=255), BAD),
        (M.Typing(peer="bob", typing=True), None),
        (M.Typing(peer="#team", typing=False), None),
        (M.Typing(peer="", typing=True), BAD),
        (M.Typing(peer="#", typing=True), BAD),
        (M.Send(to="#team", cmid=GOOD_CMID, kind=249), None),
        (M.Send(to="#team", cmid=GOOD_CMID, kind=250), BAD),
        (M.Send(to="bob", cmid=GOOD_CMID, kind=255), BAD),
        (M.Send(to="#", cmid=GOOD_CMID), BAD),
        (M.Read(peer="#team", msg_id=5), None),
        (M.Read(peer="#team", msg_id=2**53), BAD),
    ],
    ids=repr,
)
def test_rules_1_1(msg, expected):
    assert code_of(msg, ref=42, **V11) == expected


def test_max_group_members_is_the_gates():
    msg = M.GroupAdd(group="#t", users=["a", "b", "c"], cmid=GOOD_CMID)
    assert code_of(msg, **V11, max_group_members=3) is None
    assert code_of(msg, **V11, max_group_members=2) == TOO_LARGE
    # Watch has its own limit, whatever max_group_members is.
    assert code_of(M.Watch(users=["a", "b", "c"]), **V11, max_group_members=2) is None


@pytest.mark.parametrize(
    "msg",
    [M.Send(to="#team", cmid=GOOD_CMID), M.Read(peer="#team", msg_id=1)],
    ids=repr,
)
def test_groups_are_peers_only_with_1_1(msg):
    assert code_of(msg, **V11) is None
    assert code_of(msg) == BAD


def test_protocol_kinds_are_the_applications_in_1_0():
    assert code_of(M.Send(to="bob", cmid=GOOD_CMID, kind=255)) is None


@pytest.mark.parametrize("cls", [c for c in SECTION_7_CLASSES if c.TYPE not in M.CLIENT_REQUESTS],
                         ids=lambda c: c.__name__)
def test_1_1_gate_messages_are_not_requests(cls):
    assert code_of(cls(), **V11) == BAD


@settings(max_examples=300, deadline=None)
@given(instances(M.GroupCreate))
def test_any_group_create_only_raises_protocol_errors(msg):
    assert code_of(msg, **V11) in (None, BAD, TOO_LARGE)


def test_is_group_is_the_one_test_of_a_peer_everywhere():
    from simzmq import client, gate_fanout, service
    from simzmq.store import sql
    assert is_group("#team") and not is_group("alice")
    assert all(is_valid_user_id(u) and not is_group(u) for u in ("a", "a.b-c_1"))
    assert client.is_group_id is service.is_group is sql.is_group is gate_fanout.is_group is is_group
