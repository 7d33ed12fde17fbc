from simzmq.notify import NotifyStamper


def test_seq_counts_per_topic_from_one():
    st = NotifyStamper(epoch=b"E" * 8)
    a1 = st.stamp([b"ann\0", b"o", b"p1"])
    b1 = st.stamp([b"bob\0", b"", b"p2"])
    a2 = st.stamp([b"ann\0", b"", b"p3"])
    assert a1 == [b"ann\0", b"E" * 8, (1).to_bytes(8, "big"), b"o", b"p1"]
    assert b1[2] == (1).to_bytes(8, "big") and a2[2] == (2).to_bytes(8, "big")


def test_malformed_notifications_are_refused():
    st = NotifyStamper()
    assert st.stamp([b"ann\0", b"p"]) is None
    assert st.stamp([b"ann", b"", b"p"]) is None          # no terminator
    assert st.stamp([b"", b"", b"p"]) is None
    assert st.stamp([b"x" * 70 + b"\0", b"", b"p"]) is None
    assert st.seqs == {}


def test_last_unsubscribe_forgets_the_counter():
    st = NotifyStamper()
    st.stamp([b"ann\0", b"", b"p"])
    st.subscription(b"\x01ann\0")   # a subscribe changes nothing
    assert st.seqs == {b"ann\0": 1}
    st.subscription(b"\x00ann\0")
    assert st.seqs == {}
    assert st.stamp([b"ann\0", b"", b"p"])[2] == (1).to_bytes(8, "big")


def test_epochs_differ_between_brokers():
    assert NotifyStamper().epoch != NotifyStamper().epoch
