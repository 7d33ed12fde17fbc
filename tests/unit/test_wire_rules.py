"""Request rules of protocol.md section 5."""

import pytest

from simzmq.wire import messages as M
from simzmq.wire.errors import ProtocolError
from simzmq.wire.rules import is_valid_user_id, validate_request

MAX_BODY = 1000
BAD, TOO_LARGE = 1, 6


def code_of(msg, ref=0):
    try:
        validate_request(msg, MAX_BODY, ref)
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
    assert names == {"Login", "Send", "Sync", "Read", "Ping", "Pong", "Logout", "Register", "Convs"}
