"""The worker's encoding of notifications: re-stamped copies equal full encodes."""

from simzmq.envelope import unpack_notices
from simzmq.notify import group_topic
from simzmq.im import encode_notices
from simzmq.service import Notice
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN


def newmsg(seq, msg_id=5):
    return m.NewMsg(msg=m.Msg(msg_id=msg_id, seq=seq, sender="ann", to="bob", kind=0, ts_ms=9,
                              cmid=b"c", body=b"x" * 100))


def test_copies_of_one_message_are_encoded_exactly():
    notices = (Notice("bob", b"", newmsg(41)), Notice("ann", b"S" * 16, newmsg(7)),
               Notice("bob", b"", m.ReadNotice(reader="ann", peer="bob", msg_id=5, ts_ms=1)),
               Notice("cat", b"", newmsg(3, msg_id=6)))
    messages = encode_notices(notices)
    # One message per topic group, each entry in the group its user hashes to.
    assert len({topic for topic, _ in messages}) == len(messages)
    entries = {}
    for topic, frame in messages:
        for user, origin, payload in unpack_notices(frame):
            assert group_topic(user) == topic
            entries.setdefault(user, []).append((origin, payload))
    # Each user's notifications in commit order, each exactly as a full encode.
    for user in (b"ann", b"bob", b"cat"):
        assert entries[user] == [(n.origin, BIN.encode(n.msg, 0)) for n in notices if n.user.encode() == user]
