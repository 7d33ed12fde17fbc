from simzmq.envelope import unpack_stamp
from simzmq.notify import NotifyStamper


def test_seq_counts_per_topic_from_one():
    st = NotifyStamper(epoch=b"E" * 8)
    a1 = st.stamp([b"ann\0", b"\x01op1"])
    b1 = st.stamp([b"bob\0", b"\x00p2"])
    a2 = st.stamp([b"ann\0", b"\x00p3"])
    assert a1 == [b"ann\0", b"E" * 8 + (1).to_bytes(8, "big"), b"\x01op1"]
    assert unpack_stamp(b1[1]) == (b"E" * 8, 1) and unpack_stamp(a2[1]) == (b"E" * 8, 2)


def test_malformed_notifications_are_refused():
    st = NotifyStamper()
    assert st.stamp([b"ann\0"]) is None
    assert st.stamp([b"ann\0", b"\x00", b"p"]) is None
    assert st.stamp([b"ann", b"\x00p"]) is None          # no terminator
    assert st.stamp([b"", b"\x00p"]) is None
    assert st.stamp([b"x" * 70 + b"\0", b"\x00p"]) is None
    assert st.seqs == {}


def test_last_unsubscribe_forgets_the_counter():
    st = NotifyStamper()
    st.stamp([b"ann\0", b"\x00p"])
    st.subscription(b"\x01ann\0")   # a subscribe changes nothing
    assert st.seqs == {b"ann\0": 1}
    st.subscription(b"\x00ann\0")
    assert st.seqs == {}
    assert unpack_stamp(st.stamp([b"ann\0", b"\x00p"])[1])[1] == 1


def test_epochs_differ_between_brokers():
    assert NotifyStamper().epoch != NotifyStamper().epoch
