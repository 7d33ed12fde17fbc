"""The worker's encoding of notifications: re-stamped copies equal full encodes."""

from simzmq.envelope import unpack_notice
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
    encoded = [(topic, unpack_notice(frame)) for topic, frame in encode_notices(notices)]
    assert [(t, o) for t, (o, _) in encoded] == [(b"bob\0", b""), (b"ann\0", b"S" * 16), (b"bob\0", b""),
                                                 (b"cat\0", b"")]
    assert [p for _, (_, p) in encoded] == [BIN.encode(n.msg, 0) for n in notices]
