"""Groups (protocol.md section 7) in the IM service, over a real in-memory
SQLite store, time passed in."""

from __future__ import annotations

import dataclasses

import pytest

from simzmq.service import IMService, RegisterWork, Request
from simzmq.store import open_store
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.messages import GROUP_EVENT_KIND, ErrorCode, GroupOp

T0 = 1_764_000_000_000
TTL_MS = 7 * 24 * 3600 * 1000
G = "#team"


@pytest.fixture
def svc():
    store = open_store("sqlite://:memory:")
    service = IMService(store, TTL_MS, 1 << 20, max_group_members=4)
    for user in ("alice", "bob", "carol", "dave", "erin", "mallory"):
        call(service, user, m.Register(user=user, password="pw"), prepared=RegisterWork("$argon2id$x-" + user, False))
    # bob, carol, dave and erin have written to alice: alice is their contact.
    for user in ("bob", "carol", "dave", "erin"):
        send(service, user, "alice", b"hello")
    yield service
    store.close()


def call(service, key, msg, now=T0, origin=b"o" * 16, prepared=None):
    with service.store.transaction():
        return service.handle(key, origin, msg, now, prepared)


_cmids = iter(range(10**6))


def send(service, sender, to, body=b"hi", cmid=None, now=T0, origin=b"o" * 16, kind=0):
    cmid = cmid or f"c{next(_cmids)}".encode()
    return call(service, sender, m.Send(to=to, cmid=cmid, kind=kind, body=body), now, origin)


def code(outcome):
    assert isinstance(outcome.reply, m.Error), outcome
    return outcome.reply.code


def inbox(service, user):
    msgs, _ = service.store.sync(user, 0, 500, 1 << 30)
    return msgs


def events(service, user, group=G):
    return [BIN.decode_struct(m.GroupEvent, e.body) for e in inbox(service, user)
            if e.to == group and e.kind == GROUP_EVENT_KIND]


def group_conv(service, user, group=G):
    return {c.peer: c for c in call(service, user, m.Convs()).reply.convs}[group]


def create(service, actor="alice", members=("bob", "carol"), title="Team", group=G):
    return call(service, actor, m.GroupCreate(group=group, title=title, members=list(members)))


def test_create_answers_info_and_writes_the_created_event_to_every_member(svc):
    out = create(svc)
    assert out.reply == m.GroupInfo(group=G, title="Team", owner="alice", members=["alice", "bob", "carol"],
                                    version=1)
    for user in ("alice", "bob", "carol"):
        assert events(svc, user) == [m.GroupEvent(op=GroupOp.CREATED, actor="alice",
                                                  users=["alice", "bob", "carol"], title="Team", version=1)]
    # Pushed to every session, the creator's own connection included.
    assert sorted((n.user, n.origin) for n in out.notices) == [("alice", b""), ("bob", b""), ("carol", b"")]
    assert all(n.msg.msg.kind == GROUP_EVENT_KIND for n in out.notices)
    assert events(svc, "dave") == []


def test_a_retried_create_answers_the_current_group_and_others_get_exists(svc):
    create(svc)
    call(svc, "alice", m.GroupTitle(group=G, title="New", cmid=b"t1"))
    again = create(svc)
    assert again.reply.title == "New" and again.reply.version == 2 and again.notices == ()
    assert code(create(svc, actor="bob", members=())) == ErrorCode.EXISTS


def test_only_contacts_may_put_a_user_in(svc):
    # mallory never wrote to alice: nothing is created.
    assert code(create(svc, members=("bob", "mallory"))) == ErrorCode.FORBIDDEN
    assert code(call(svc, "alice", m.GroupGet(group=G))) == ErrorCode.NO_SUCH_USER
    assert code(create(svc, members=("bob", "nobody"))) == ErrorCode.NO_SUCH_USER
    # Writing to alice does not make mallory alice's contact; alice writing
    # to mallory does.
    send(svc, "mallory", "alice")
    assert code(create(svc, actor="mallory", members=("alice",))) == ErrorCode.FORBIDDEN
    send(svc, "alice", "mallory")
    assert create(svc, actor="mallory", members=("alice",)).reply.members == ["mallory", "alice"]


def test_non_members_learn_nothing(svc):
    create(svc)
    for msg in (m.GroupGet(group=G), m.GroupAdd(group=G, users=["dave"], cmid=b"a"),
                m.GroupRemove(group=G, users=["bob"], cmid=b"r"), m.GroupTitle(group=G, title="x", cmid=b"t"),
                m.Send(to=G, cmid=b"s", kind=0, body=b"x")):
        there = call(svc, "dave", msg).reply
        elsewhere = dataclasses.replace(msg, **{"to" if type(msg) is m.Send else "group": "#nothing"})
        nowhere = call(svc, "dave", elsewhere).reply
        assert there.code == nowhere.code == ErrorCode.NO_SUCH_USER
        assert there.reason.replace(G, "#nothing") == nowhere.reason
    assert events(svc, "dave", "#nothing") == [] and events(svc, "alice")[-1].version == 1


def test_group_messages_reach_every_member_in_one_order(svc):
    create(svc)
    first = send(svc, "bob", G, b"one")
    assert isinstance(first.reply, m.SendOk)
    call(svc, "alice", m.GroupAdd(group=G, users=["dave"], cmid=b"a1"))
    send(svc, "carol", G, b"two")
    orders = {u: [e.msg_id for e in inbox(svc, u) if e.to == G] for u in ("alice", "bob", "carol")}
    assert orders["alice"] == orders["bob"] == orders["carol"] and len(orders["alice"]) == 4
    assert [e.body for e in inbox(svc, "dave") if e.to == G][-1] == b"two"
    for user in ("alice", "bob", "carol", "dave"):
        seqs = [e.seq for e in inbox(svc, user)]
        assert seqs == list(range(1, len(seqs) + 1))
    # The sender's copy gives SendOk.seq; its own connection gets no push.
    bob_copy = [e for e in inbox(svc, "bob") if e.body == b"one"][0]
    assert first.reply.seq == bob_copy.seq
    assert {(n.user, n.origin) for n in first.notices} == {("alice", b""), ("bob", b"o" * 16), ("carol", b"")}
    assert not any(n.msg.msg.kind == GROUP_EVENT_KIND for n in first.notices)


def test_send_retry_after_removal_gets_its_first_sendok(svc):
    create(svc)
    first = send(svc, "bob", G, b"x", cmid=b"same")
    call(svc, "alice", m.GroupRemove(group=G, users=["bob"], cmid=b"r1"))
    again = send(svc, "bob", G, b"x", cmid=b"same")
    assert again.reply == first.reply
    assert code(send(svc, "bob", G, b"x", cmid=b"other")) == ErrorCode.NO_SUCH_USER
    assert code(send(svc, "bob", G, b"changed", cmid=b"same")) == ErrorCode.BAD_REQUEST


def test_a_retried_group_message_is_published_again_like_a_one_to_one_one(svc):
    """Its first attempt may have died between its commit and its publish:
    the retry publishes every copy again (gates push each inbox seq once),
    to everyone who got one, whoever has left since."""
    create(svc)
    first = send(svc, "bob", G, b"x", cmid=b"same")
    assert len(first.notices) == 3
    again = send(svc, "bob", G, b"x", cmid=b"same")
    assert again.reply == first.reply
    assert sorted(again.notices) == sorted(first.notices)
    call(svc, "alice", m.GroupRemove(group=G, users=["carol"], cmid=b"r1"))
    call(svc, "alice", m.GroupAdd(group=G, users=["dave"], cmid=b"a1"))
    send(svc, "alice", G, b"later")
    # From another session of bob's: his copy goes to every session but that one.
    later = send(svc, "bob", G, b"x", cmid=b"same", origin=b"p" * 16)
    assert later.reply == first.reply
    assert sorted(later.notices) == sorted(n._replace(origin=b"p" * 16) if n.user == "bob" else n
                                           for n in first.notices)


def test_a_retry_looks_for_its_copies_only_among_each_inboxs_recent_entries(svc):
    """The look-up runs under the locks of the group and every member: it
    reads at most `within` entries per inbox, so a retry long after its
    message publishes only the copies still that recent."""
    create(svc)
    first = send(svc, "bob", G, b"x", cmid=b"old")
    msg_id = first.reply.msg_id
    for i in range(3):
        send(svc, "alice", G, b"newer %d" % i)
    # One more in alice's inbox and in carol's (the sender keeps a copy): 4
    # newer entries there, 3 in bob's.
    send(svc, "carol", "alice", b"and one more for alice")
    store = svc.store
    everyone = {n.user: n.msg.msg.seq for n in first.notices}
    assert store.group_copies(G, msg_id) == everyone
    assert store.group_copies(G, msg_id, within=4) == {"bob": everyone["bob"]}
    assert store.group_copies(G, msg_id, within=3) == {}


def test_changes_are_idempotent_on_their_cmid(svc):
    create(svc)
    add = m.GroupAdd(group=G, users=["dave"], cmid=b"a1")
    assert isinstance(call(svc, "alice", add).reply, m.Ok)
    call(svc, "alice", m.GroupRemove(group=G, users=["dave"], cmid=b"r1"))
    # The repeat returns the first answer and changes nothing.
    assert call(svc, "alice", add) .reply == m.Ok()
    assert "dave" not in call(svc, "alice", m.GroupGet(group=G)).reply.members
    assert code(call(svc, "alice", m.GroupAdd(group=G, users=["erin"], cmid=b"a1"))) == ErrorCode.BAD_REQUEST
    # A request that changes nothing answers Ok and writes nothing.
    version = call(svc, "alice", m.GroupGet(group=G)).reply.version
    assert call(svc, "alice", m.GroupAdd(group=G, users=["bob"], cmid=b"a2")).reply == m.Ok()
    assert call(svc, "alice", m.GroupGet(group=G)).reply.version == version
    # ... and its repeat changes nothing, whatever happened since.
    call(svc, "bob", m.GroupRemove(group=G, users=["bob"], cmid=b"l"))
    assert call(svc, "alice", m.GroupAdd(group=G, users=["bob"], cmid=b"a2")).reply == m.Ok()
    assert "bob" not in call(svc, "alice", m.GroupGet(group=G)).reply.members


def test_leavers_come_back_only_by_the_owner(svc):
    create(svc)
    send(svc, "carol", "bob")  # bob is carol's contact
    call(svc, "bob", m.GroupRemove(group=G, users=["bob"], cmid=b"leave"))
    assert events(svc, "bob")[-1] == m.GroupEvent(op=GroupOp.LEFT, actor="bob", users=["bob"], version=2)
    send(svc, "bob", "carol")
    assert code(call(svc, "carol", m.GroupAdd(group=G, users=["bob"], cmid=b"c1"))) == ErrorCode.FORBIDDEN
    assert call(svc, "alice", m.GroupAdd(group=G, users=["bob"], cmid=b"a1")).reply == m.Ok()
    # A user added again joins anew: last in the list.
    assert call(svc, "bob", m.GroupGet(group=G)).reply.members == ["alice", "carol", "bob"]


def test_only_the_owner_removes_others(svc):
    create(svc)
    assert code(call(svc, "bob", m.GroupRemove(group=G, users=["carol"], cmid=b"x"))) == ErrorCode.FORBIDDEN
    out = call(svc, "alice", m.GroupRemove(group=G, users=["carol"], cmid=b"y"))
    # The removed user gets the event too, and keeps its copies.
    assert {n.user for n in out.notices} == {"alice", "bob", "carol"}
    assert events(svc, "carol")[-1].op == GroupOp.REMOVED
    assert code(call(svc, "carol", m.GroupGet(group=G))) == ErrorCode.NO_SUCH_USER


def test_owner_hand_over_and_closing(svc):
    create(svc)
    out = call(svc, "alice", m.GroupRemove(group=G, users=["alice"], cmid=b"l"))
    assert [e.op for e in events(svc, "bob")][-2:] == [GroupOp.LEFT, GroupOp.OWNER_CHANGED]
    assert events(svc, "bob")[-1] == m.GroupEvent(op=GroupOp.OWNER_CHANGED, actor="alice", users=["bob"],
                                                  version=3)
    # The leaver gets the left event, not the hand-over.
    assert [e.op for e in events(svc, "alice")][-1] == GroupOp.LEFT
    assert {n.user for n in out.notices if n.msg.msg.body == BIN.encode_struct(events(svc, "bob")[-1])} == {
        "bob", "carol"}
    assert call(svc, "bob", m.GroupGet(group=G)).reply.owner == "bob"
    call(svc, "bob", m.GroupRemove(group=G, users=["bob"], cmid=b"l"))
    call(svc, "carol", m.GroupRemove(group=G, users=["carol"], cmid=b"l"))
    # Closed: nobody is in it, and its id stays taken.
    assert code(call(svc, "carol", m.GroupGet(group=G))) == ErrorCode.NO_SUCH_USER
    assert code(create(svc, actor="alice", members=())) == ErrorCode.EXISTS


def test_title_changes(svc):
    create(svc)
    assert call(svc, "bob", m.GroupTitle(group=G, title="Ours", cmid=b"t")).reply == m.Ok()
    assert events(svc, "carol")[-1] == m.GroupEvent(op=GroupOp.TITLE_CHANGED, actor="bob", title="Ours",
                                                    version=2)


def test_member_limit(svc):
    create(svc, members=("bob", "carol", "dave"))
    assert code(call(svc, "alice", m.GroupAdd(group=G, users=["erin"], cmid=b"a"))) == ErrorCode.TOO_LARGE
    assert code(create(svc, group="#big", members=("bob", "carol", "dave", "erin"))) == ErrorCode.TOO_LARGE


def test_groups_per_user_limit(svc):
    """max_groups_per_user (protocol default 1,000) is a setting; past it,
    Error{too_large} and nothing changes."""
    svc.max_groups_per_user = 2
    create(svc, group="#one", members=("bob",))
    create(svc, group="#two", members=("carol",))
    out = create(svc, group="#three", members=())
    assert code(out) == ErrorCode.TOO_LARGE and "alice is in too many groups" in out.reply.reason
    assert code(call(svc, "alice", m.GroupGet(group="#three"))) == ErrorCode.NO_SUCH_USER
    # Nor may a user in as many be put in one more.
    create(svc, actor="bob", group="#bobs", members=())
    call(svc, "carol", m.GroupRemove(group="#two", users=["carol"], cmid=b"l"))
    assert code(call(svc, "alice", m.GroupAdd(group="#two", users=["bob"], cmid=b"a"))) == ErrorCode.TOO_LARGE
    assert call(svc, "alice", m.GroupGet(group="#two")).reply.members == ["alice"]


def test_reads_and_conversations(svc):
    create(svc)
    one = send(svc, "bob", G, b"one").reply
    two = send(svc, "carol", G, b"two").reply
    convs = {c.peer: c for c in call(svc, "alice", m.Convs()).reply.convs}
    # Events are not counted; peer_read is the lowest mark of the others,
    # which start at the event that added them.
    created_id = inbox(svc, "alice")[-3].msg_id
    assert convs[G] == m.Conv(peer=G, last_msg_id=two.msg_id, unread=2, peer_read=created_id)
    out = call(svc, "alice", m.Read(peer=G, msg_id=one.msg_id))
    assert out.reply == m.Ok()
    assert {n.user for n in out.notices} == {"alice", "bob", "carol"}
    assert group_conv(svc, "alice").unread == 1
    call(svc, "carol", m.Read(peer=G, msg_id=two.msg_id))
    assert group_conv(svc, "bob").peer_read == one.msg_id
    # Someone who never got the group's entries cannot mark them.
    assert code(call(svc, "dave", m.Read(peer=G, msg_id=one.msg_id))) == ErrorCode.BAD_REQUEST
    page = svc.store.history("bob", G, 0, 10)
    assert [x.body for x in page[0]][:2] == [b"two", b"one"]
    assert svc.store.history("dave", G, 0, 10) == ([], False)


def test_a_former_members_conv_stays_as_it_was_at_its_removal(svc):
    create(svc)
    one = send(svc, "bob", G, b"one").reply
    call(svc, "carol", m.Read(peer=G, msg_id=one.msg_id))
    assert call(svc, "alice", m.GroupRemove(group=G, users=["carol"], cmid=b"r")).reply == m.Ok()
    carol_at_removal = group_conv(svc, "carol")
    created_id = inbox(svc, "alice")[-3].msg_id
    assert carol_at_removal.peer_read == created_id and carol_at_removal.unread == 0
    # What the others do afterwards moves nothing of carol's Conv.
    two = send(svc, "alice", G, b"two").reply
    call(svc, "alice", m.GroupTitle(group=G, title="Later", cmid=b"t"))
    for user in ("alice", "bob"):
        assert call(svc, user, m.Read(peer=G, msg_id=two.msg_id)).reply == m.Ok()
    assert group_conv(svc, "carol") == carol_at_removal
    # Leaving freezes it too, at the mark of the member left then.
    assert call(svc, "bob", m.GroupRemove(group=G, users=["bob"], cmid=b"l")).reply == m.Ok()
    bob_at_leaving = group_conv(svc, "bob")
    assert bob_at_leaving.peer_read == two.msg_id
    three = send(svc, "alice", G, b"three").reply
    call(svc, "alice", m.Read(peer=G, msg_id=three.msg_id))
    assert group_conv(svc, "bob") == bob_at_leaving
    assert group_conv(svc, "carol") == carol_at_removal
    # Put back by the owner, carol's Conv is live again.
    assert call(svc, "alice", m.GroupAdd(group=G, users=["carol"], cmid=b"a")).reply == m.Ok()
    assert group_conv(svc, "carol").peer_read == three.msg_id
    four = send(svc, "carol", G, b"four").reply
    call(svc, "alice", m.Read(peer=G, msg_id=four.msg_id))
    assert group_conv(svc, "carol").peer_read == four.msg_id
    assert group_conv(svc, "bob") == bob_at_leaving


def test_members_removed_together_keep_their_convs_as_at_the_removal(svc):
    """Each one's peer_read counts the others removed with it: they were
    members until that moment."""
    create(svc, members=("bob", "carol", "dave"))
    one = send(svc, "alice", G, b"one").reply
    two = send(svc, "alice", G, b"two").reply
    for user, mark in (("alice", two), ("bob", two), ("carol", one), ("dave", two)):
        call(svc, user, m.Read(peer=G, msg_id=mark.msg_id))
    before = {user: group_conv(svc, user).peer_read for user in ("bob", "carol")}
    assert before == {"bob": one.msg_id, "carol": two.msg_id}
    assert call(svc, "alice", m.GroupRemove(group=G, users=["bob", "carol"], cmid=b"r")).reply == m.Ok()
    assert {user: group_conv(svc, user).peer_read for user in ("bob", "carol")} == before


def test_a_batch_mixing_group_and_one_to_one_sends_keeps_inboxes_gapless(svc):
    create(svc)
    reqs = [Request("bob", b"o" * 16, m.Send(to="alice", cmid=b"b1", kind=0, body=b"1")),
            Request("bob", b"o" * 16, m.Send(to=G, cmid=b"b2", kind=0, body=b"2")),
            Request("carol", b"o" * 16, m.Send(to="alice", cmid=b"c1", kind=0, body=b"3")),
            Request("alice", b"o" * 16, m.GroupAdd(group=G, users=["dave"], cmid=b"a")),
            Request("dave", b"o" * 16, m.Send(to="alice", cmid=b"d1", kind=0, body=b"4"))]
    with svc.store.transaction():
        outs = svc.handle_batch(reqs, T0)
    assert all(not isinstance(o.reply, m.Error) for o in outs)
    for user in ("alice", "bob", "carol", "dave"):
        msgs = inbox(svc, user)
        assert [x.seq for x in msgs] == list(range(1, len(msgs) + 1))
        assert [x.msg_id for x in msgs] == sorted(x.msg_id for x in msgs)
