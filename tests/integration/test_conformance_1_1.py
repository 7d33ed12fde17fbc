"""Conformance of a region to protocol 1.1 (shared/protocol.md section 7:
groups, presence, typing), checked the way an independent client sees it:
from the protocol text, over the wire, with members on two gates. Each test's
docstring quotes the rule it checks."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, GroupOp
from tests.conformance import World, cmid, decode_group_event, events_of, group_id, is_event, writes
from tests.region import region_fixture

pytestmark = pytest.mark.timeout(300)

MAX_MEMBERS = 5

region = region_fixture("conformance", gates=2, extra_env={"SIMZMQ_GATE_MAX_GROUP_MEMBERS": str(MAX_MEMBERS)})


@pytest.fixture
def w(region):
    world = World(region)
    yield world
    world.close()


def group_with(owner, *members, title: str = "team") -> m.GroupInfo:
    """A group created by `owner` with `members`, each of whom first writes to
    the owner (so that the owner may put them in)."""
    for x in members:
        writes(x, owner)
    info = owner.ask(m.GroupCreate(group=group_id(), title=title, members=[x.user for x in members]))
    assert type(info) is m.GroupInfo, info
    return info


def group_msgs(conn, group: str) -> list[m.Msg]:
    return [x for x in conn.inbox() if x.to == group]


def assert_gapless(msgs: list[m.Msg]) -> None:
    assert [x.seq for x in msgs] == list(range(1, len(msgs) + 1))


def no_such(reply: m.Error, group: str) -> tuple[int, str]:
    """An error with the group id taken out of its reason: what must not differ
    between a group one is not in and a group that does not exist."""
    return reply.code, reply.reason.replace(group, "<group>")


# --- probe and contacts ------------------------------------------------------


def test_set_presence_online_is_the_1_1_probe(w):
    """"A client learns that a gate has section 7 by sending SetPresence{2}
    after Login: Ok means 1.1." "SetPresence{state} sets it to 2, 3, or 1
    (appear offline); another value gets Error{bad_request}; it answers Ok." """
    for gate in (1, 2):
        a = w.user(gate)
        a.ok(m.SetPresence(state=2))
        for state in (3, 1, 2):
            a.ok(m.SetPresence(state=state))
        for state in (0, 4, 255):
            a.error(m.SetPresence(state=state), ErrorCode.BAD_REQUEST)


def test_only_one_to_one_sends_make_contacts(w):
    """"A user's contacts are the users it has sent a one-to-one message to. [...]
    Sharing a group or receiving a message makes no one a contact." (seen
    through "each user put in must have the actor among its contacts (else
    Error{forbidden})")"""
    a, b, c = w.user(1), w.user(2), w.user(1)
    # a writes to b: b is a's contact (b may put a in), but b receiving it makes
    # a no contact of b (a may not put b in).
    writes(a, b)
    a.error(m.GroupCreate(group=group_id(), title="t", members=[b.user]), ErrorCode.FORBIDDEN)
    assert type(b.ask(m.GroupCreate(group=group_id(), title="t", members=[a.user]))) is m.GroupInfo
    # b writes to a: now a is b's contact, and a may put b in.
    writes(b, a)
    writes(c, a)
    info = a.ask(m.GroupCreate(group=group_id(), title="t", members=[b.user, c.user]))
    assert type(info) is m.GroupInfo, info
    # b and c share a group and each sends group messages: neither is the other's contact.
    b.post(info.group, b"from b")
    c.post(info.group, b"from c")
    b.error(m.GroupCreate(group=group_id(), title="t", members=[c.user]), ErrorCode.FORBIDDEN)
    c.error(m.GroupCreate(group=group_id(), title="t", members=[b.user]), ErrorCode.FORBIDDEN)
    # A one-to-one message from c to b makes b c's contact: b may put c in.
    writes(c, b)
    assert type(b.ask(m.GroupCreate(group=group_id(), title="t", members=[c.user]))) is m.GroupInfo


# --- group create ------------------------------------------------------------


def test_group_create_answers_group_info_and_writes_created_event(w):
    """"GroupCreate answers GroupInfo." "Members are listed in the order they
    joined: at create the creator first, then the listed users in the order
    listed". The created event (op 1) goes to every member: "`to` = the group,
    `sender` = the actor, `kind` = 255, an empty `cmid`, and as `body` the bin
    encoding [...] of GroupEvent{op, actor, users, title, version}", users =
    all members, title = the title; its version is the group's version."""
    o, a, b = w.user(1), w.user(2), w.user(1)
    for x in (a, b):
        writes(x, o)
    g = group_id()
    info = o.ask(m.GroupCreate(group=g, title="Ünïcode title", members=[b.user, a.user]))
    assert type(info) is m.GroupInfo, info
    assert (info.group, info.title, info.owner) == (g, "Ünïcode title", o.user)
    assert info.members == [o.user, b.user, a.user]
    assert o.info(g) == info == a.info(g) == b.info(g)
    for x in (o, a, b):
        entries = group_msgs(x, g)
        assert len(entries) == 1
        e = entries[0]
        assert (e.sender, e.to, e.kind, e.cmid) == (o.user, g, 255, b"")
        ev = decode_group_event(e.body)
        assert ev == m.GroupEvent(op=GroupOp.CREATED, actor=o.user, users=info.members, title="Ünïcode title",
                                  version=info.version)
    assert info.version >= 1


def test_group_event_bodies_are_bin_whatever_the_codec(w):
    """"as `body` the **bin** encoding (section 4, whatever the connection's
    codec) of GroupEvent{op, actor, users, title, version}"."""
    o, a = w.user(1, codec=2), w.user(2, codec=2)
    info = group_with(o, a, title="msgpack")
    for x in (o, a):
        (e,) = group_msgs(x, info.group)
        assert decode_group_event(e.body) == m.GroupEvent(
            op=GroupOp.CREATED, actor=o.user, users=[o.user, a.user], title="msgpack", version=info.version)


def test_group_create_retry_and_taken_ids(w):
    """"A create for an id that the caller created, while it is still a member,
    answers the current GroupInfo (a retried create); any other taken id gets
    Error{exists}. A closed group's id stays taken." """
    o, a, b = w.user(1), w.user(2), w.user(2)
    info = group_with(o, a, b)
    g = info.group
    o.ok(m.GroupTitle(group=g, title="renamed", cmid=cmid()))
    current = o.info(g)
    # The retry answers the group as it is now, even with other arguments, and changes nothing.
    assert o.ask(m.GroupCreate(group=g, title="team", members=[a.user, b.user])) == current
    assert o.ask(m.GroupCreate(group=g, title="other", members=[])) == current
    assert o.info(g) == current
    assert len(events_of(o.inbox(), g)) == 2
    # A member that did not create it, and a stranger, get exists.
    a.error(m.GroupCreate(group=g, title="team", members=[]), ErrorCode.EXISTS)
    stranger = w.user(1)
    stranger.error(m.GroupCreate(group=g, title="team", members=[]), ErrorCode.EXISTS)
    # The creator, once it has left, gets exists too.
    o.ok(m.GroupRemove(group=g, users=[o.user], cmid=cmid()))
    o.error(m.GroupCreate(group=g, title="team", members=[]), ErrorCode.EXISTS)
    # Closed (the last member left): the id stays taken, for everyone.
    a.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    b.ok(m.GroupRemove(group=g, users=[b.user], cmid=cmid()))
    for x in (o, a, b, stranger):
        x.error(m.GroupCreate(group=g, title="again", members=[]), ErrorCode.EXISTS)


def test_group_id_syntax(w):
    """"A group id is `#` followed by 1–63 characters of [A-Za-z0-9_.-],
    case-sensitive" (a field value the rules forbid gets Error{bad_request})."""
    o = w.user(1)
    for bad in ("nohash", "#", "#with space", "#bäd", "##x", "#a/b", "#tab\t"):
        o.error(m.GroupCreate(group=bad, title="t", members=[]), ErrorCode.BAD_REQUEST)
        o.error(m.GroupGet(group=bad), ErrorCode.BAD_REQUEST)
    base = group_id()[:40]
    longest = "#" + (group_id()[1:] * 3)[:63]
    for good in (base + "_.-", base.lower() + "x", base.upper() + "x", longest, "#" + group_id()[1:2]):
        info = o.ask(m.GroupCreate(group=good, title=good, members=[]))
        assert type(info) is m.GroupInfo and info.group == good, info
    # Case-sensitive: the upper- and lower-case ids are two groups.
    assert o.info(base.lower() + "x").title == base.lower() + "x"
    assert o.info(base.upper() + "x").title == base.upper() + "x"


def check_bad_titles(w, bad_titles, code):
    o, a = w.user(1), w.user(2)
    for title in bad_titles:
        g = group_id()
        o.error(m.GroupCreate(group=g, title=title, members=[]), code)
        o.error(m.GroupGet(group=g), ErrorCode.NO_SUCH_USER)
    info = group_with(o, a, title="é" * 128)  # exactly 256 bytes
    assert info.title == "é" * 128
    for title in bad_titles:
        o.error(m.GroupTitle(group=info.group, title=title, cmid=cmid()), code)
    assert o.info(info.group) == info


def test_group_title_without_control_or_bidi_override_characters(w):
    """"a title (at most 256 bytes of UTF-8, without control or
    bidirectional-override characters, else Error{bad_request})"; "Nothing in
    a request that gets an Error takes effect"."""
    check_bad_titles(w, ("bell\x07", "new\nline", "tab\t", "del\x7f", "c1\u0085", "rlo\u202e", "lro\u202d",
                         "rli\u2067"), ErrorCode.BAD_REQUEST)


def test_group_title_at_most_256_bytes(w):
    """"a title (at most 256 bytes of UTF-8, [...] else Error{bad_request})":
    section 7 names bad_request for a longer title (not section 3's too_large
    for a field over its length limit)."""
    check_bad_titles(w, ("x" * 257, "é" * 128 + "x"), ErrorCode.BAD_REQUEST)


# --- who may do what ---------------------------------------------------------


def test_unknown_users_in_lists(w):
    """"an unknown user in them gets Error{no_such_user}"; "Every request is
    all or nothing"."""
    o, a, b = w.user(1), w.user(2), w.user(1)
    writes(a, o)
    writes(b, o)
    g = group_id()
    o.error(m.GroupCreate(group=g, title="t", members=[a.user, "nobody-" + g[1:]]), ErrorCode.NO_SUCH_USER)
    o.error(m.GroupGet(group=g), ErrorCode.NO_SUCH_USER)
    a.error(m.GroupGet(group=g), ErrorCode.NO_SUCH_USER)
    info = o.ask(m.GroupCreate(group=g, title="t", members=[a.user]))
    assert type(info) is m.GroupInfo and info.members == [o.user, a.user]
    o.error(m.GroupAdd(group=g, users=[b.user, "nobody-" + g[1:]], cmid=cmid()), ErrorCode.NO_SUCH_USER)
    o.error(m.GroupRemove(group=g, users=[a.user, "nobody-" + g[1:]], cmid=cmid()), ErrorCode.NO_SUCH_USER)
    assert o.info(g) == info
    assert len(events_of(o.inbox(), g)) == 1
    assert group_msgs(b, g) == []


def test_only_users_who_have_the_actor_as_contact_may_be_put_in(w):
    """"GroupCreate, GroupAdd: each user put in must have the actor among its
    contacts (else Error{forbidden}, and nothing changes)" — the actor, who
    need not be the owner."""
    o, a, b, c = w.user(1), w.user(2), w.user(1), w.user(2)
    writes(a, o)
    # b wrote to a, not to o; c wrote to no one.
    writes(b, a)
    g = group_id()
    o.error(m.GroupCreate(group=g, title="t", members=[a.user, b.user]), ErrorCode.FORBIDDEN)
    o.error(m.GroupGet(group=g), ErrorCode.NO_SUCH_USER)
    info = o.ask(m.GroupCreate(group=g, title="t", members=[a.user]))
    assert type(info) is m.GroupInfo
    # The owner may not add b (b has not written to o), even along with someone it may add.
    writes(c, o)
    o.error(m.GroupAdd(group=g, users=[c.user, b.user], cmid=cmid()), ErrorCode.FORBIDDEN)
    assert o.info(g) == info
    assert len(events_of(o.inbox(), g)) == 1
    assert group_msgs(b, g) == [] and group_msgs(c, g) == []
    # A member (not the owner) adds its own contact b.
    a.ok(m.GroupAdd(group=g, users=[b.user], cmid=cmid()))
    after = o.info(g)
    assert after.members == [o.user, a.user, b.user] and after.owner == o.user
    ev = events_of(b.inbox(), g)
    assert [(e.op, e.actor, e.users) for e in ev] == [(GroupOp.ADDED, a.user, [b.user])]


def test_requests_that_change_nothing_write_nothing(w):
    """"ids already in (add) or not in (remove) are ignored, and a request that
    changes nothing answers as if it had, writing nothing." """
    o, a, outsider = w.user(1), w.user(2), w.user(1)
    writes(outsider, o)
    info = group_with(o, a)
    g = info.group
    o.ok(m.GroupAdd(group=g, users=[a.user], cmid=cmid()))
    o.ok(m.GroupAdd(group=g, users=[o.user, a.user], cmid=cmid()))
    o.ok(m.GroupRemove(group=g, users=[outsider.user], cmid=cmid()))
    o.ok(m.GroupTitle(group=g, title=info.title, cmid=cmid()))
    assert o.info(g) == info
    for x in (o, a):
        assert len(events_of(x.inbox(), g)) == 1
    assert group_msgs(outsider, g) == []


def test_group_changes_are_idempotent_on_cmid(w):
    """"GroupAdd, GroupRemove, GroupTitle answer Ok and are idempotent on
    (actor, cmid) like Send (cmid 1–32 bytes): a repeat returns the first
    answer and changes nothing, whatever happened since." """
    o, a, b = w.user(1), w.user(2), w.user(1)
    writes(b, o)
    info = group_with(o, a)
    g = info.group
    add_b, remove_b, title1 = (m.GroupAdd(group=g, users=[b.user], cmid=cmid()),
                               m.GroupRemove(group=g, users=[b.user], cmid=cmid()),
                               m.GroupTitle(group=g, title="first", cmid=cmid()))
    o.ok(add_b)
    o.ok(add_b)
    assert o.info(g).members == [o.user, a.user, b.user]
    o.ok(remove_b)
    o.ok(add_b)  # the repeat does not put b back
    assert o.info(g).members == [o.user, a.user]
    o.ok(m.GroupAdd(group=g, users=[b.user], cmid=cmid()))
    o.ok(remove_b)  # nor does this one remove it again
    assert o.info(g).members == [o.user, a.user, b.user]
    o.ok(title1)
    o.ok(m.GroupTitle(group=g, title="second", cmid=cmid()))
    o.ok(title1)
    now = o.info(g)
    assert now.title == "second"
    ops = [e.op for e in events_of(o.inbox(), g)]
    assert ops == [GroupOp.CREATED, GroupOp.ADDED, GroupOp.REMOVED, GroupOp.ADDED, GroupOp.TITLE_CHANGED,
                   GroupOp.TITLE_CHANGED]
    assert now.version == info.version + 5
    # A member's title change, repeated after it left, still gets its first answer.
    title_a = m.GroupTitle(group=g, title="by a", cmid=cmid())
    a.ok(title_a)
    a.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    a.ok(title_a)
    assert o.info(g).title == "by a"
    # The cmid is the actor's: another member may use the same bytes for its own change.
    b.ok(m.GroupTitle(group=g, title="by b", cmid=title_a.cmid))
    assert o.info(g).title == "by b"


def test_group_change_cmid_length(w):
    """"cmid 1–32 bytes" for GroupAdd, GroupRemove, GroupTitle: an empty cmid
    is a forbidden value (Error{bad_request}), a longer one is over its length
    limit (Error{too_large}); nothing takes effect."""
    o, a = w.user(1), w.user(2)
    info = group_with(o, a)
    g = info.group
    for bad, code in ((b"", ErrorCode.BAD_REQUEST), (b"x" * 33, ErrorCode.TOO_LARGE)):
        o.error(m.GroupTitle(group=g, title="x", cmid=bad), code)
        o.error(m.GroupRemove(group=g, users=[a.user], cmid=bad), code)
        o.error(m.GroupAdd(group=g, users=[a.user], cmid=bad), code)
    o.ok(m.GroupTitle(group=g, title="x", cmid=b"y" * 32))
    assert o.info(g).version == info.version + 1


def test_remove_rules(w):
    """"GroupRemove: the owner removes anyone; any member removes itself
    (leaves)." Anything else is not allowed (Error{forbidden}) and changes
    nothing; "To a user who is not a member, these and GroupRemove answer as for
    a group that does not exist (Error{no_such_user})"."""
    o, a, b = w.user(1), w.user(2), w.user(1)
    info = group_with(o, a, b)
    g = info.group
    a.error(m.GroupRemove(group=g, users=[b.user], cmid=cmid()), ErrorCode.FORBIDDEN)
    a.error(m.GroupRemove(group=g, users=[a.user, b.user], cmid=cmid()), ErrorCode.FORBIDDEN)
    a.error(m.GroupRemove(group=g, users=[o.user], cmid=cmid()), ErrorCode.FORBIDDEN)
    assert o.info(g) == info
    o.ok(m.GroupRemove(group=g, users=[b.user], cmid=cmid()))
    b.error(m.GroupRemove(group=g, users=[b.user], cmid=cmid()), ErrorCode.NO_SUCH_USER)
    a.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    after = o.info(g)
    assert after.members == [o.user] and after.version == info.version + 2
    evs = events_of(o.inbox(), g)
    assert [(e.op, e.actor, e.users, e.title) for e in evs[1:]] == [
        (GroupOp.REMOVED, o.user, [b.user], ""), (GroupOp.LEFT, a.user, [a.user], "")]


def test_leavers_come_back_only_by_the_owner(w):
    """"a user who left or was removed is put back only by the owner" (else
    Error{forbidden}); "a user added again joins anew" (last in the list)."""
    o, a, b, c = w.user(1), w.user(2), w.user(1), w.user(2)
    info = group_with(o, a, b, c)
    g = info.group
    # a and b have the member c among their contacts.
    writes(a, c)
    writes(b, c)
    a.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    o.ok(m.GroupRemove(group=g, users=[b.user], cmid=cmid()))
    c.error(m.GroupAdd(group=g, users=[a.user], cmid=cmid()), ErrorCode.FORBIDDEN)
    c.error(m.GroupAdd(group=g, users=[b.user], cmid=cmid()), ErrorCode.FORBIDDEN)
    a.error(m.GroupAdd(group=g, users=[a.user], cmid=cmid()), ErrorCode.NO_SUCH_USER)
    assert o.info(g).members == [o.user, c.user]
    o.ok(m.GroupAdd(group=g, users=[b.user, a.user], cmid=cmid()))
    assert o.info(g).members == [o.user, c.user, b.user, a.user]


def test_owner_leaving_hands_over_to_the_earliest_joined(w):
    """"When the owner leaves, the member who joined earliest becomes owner."
    "When the owner leaves, two events are written: 4 (version v+1, which the
    leaver also gets) and 6 (v+2, actor the leaver, which it does not)." """
    o, a, b = w.user(1), w.user(2), w.user(1)
    info = group_with(o, a, b)
    g = info.group
    # a leaves and is added back: it joined anew, after b.
    a.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    o.ok(m.GroupAdd(group=g, users=[a.user], cmid=cmid()))
    v = o.info(g).version
    o.ok(m.GroupRemove(group=g, users=[o.user], cmid=cmid()))
    now = b.info(g)
    assert now.owner == b.user and now.members == [b.user, a.user] and now.version == v + 2
    tail = [(e.op, e.actor, e.users, e.version) for e in events_of(b.inbox(), g)][-2:]
    assert tail == [(GroupOp.LEFT, o.user, [o.user], v + 1), (GroupOp.OWNER_CHANGED, o.user, [b.user], v + 2)]
    assert events_of(a.inbox(), g)[-2:] == events_of(b.inbox(), g)[-2:]
    last = events_of(o.inbox(), g)[-1]
    assert (last.op, last.version) == (GroupOp.LEFT, v + 1)
    # The new owner may now remove others, and put the old owner back.
    b.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    writes(o, b)
    b.ok(m.GroupAdd(group=g, users=[o.user], cmid=cmid()))
    assert b.info(g).members == [b.user, o.user]


def test_last_member_leaving_closes_the_group(w):
    """"When the last member leaves, the group is closed." "A closed group's
    id stays taken." "A former member keeps its own copies: Sync, Read and
    /v1/history work on them, and its Conv stays as it was at its removal." """
    o, a = w.user(1), w.user(2)
    info = group_with(o, a)
    g = info.group
    sent = a.post(g, b"last words")
    a.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    o.ok(m.GroupRemove(group=g, users=[o.user], cmid=cmid()))
    for x in (o, a):
        x.error(m.GroupGet(group=g), ErrorCode.NO_SUCH_USER)
        x.error(m.GroupCreate(group=g, title="t", members=[]), ErrorCode.EXISTS)
        x.error(m.Send(to=g, cmid=cmid(), kind=0, body=b"x"), ErrorCode.NO_SUCH_USER)
    copies = group_msgs(o, g)
    assert [x.msg_id for x in copies if not is_event(x)] == [sent.msg_id]
    assert [e.op for e in events_of(copies, g)] == [GroupOp.CREATED, GroupOp.LEFT, GroupOp.LEFT]
    o.ok(m.Read(peer=g, msg_id=sent.msg_id))
    assert o.convs()[g].unread == 0
    status, page = history(w, o, g)
    assert status == 200 and sent.msg_id in [x["msg_id"] for x in page["messages"]]


# --- versions and events -----------------------------------------------------


def test_versions_rise_by_one_per_event_and_events_reach_every_member_in_one_order(w):
    """"a version that rises by one with every group event"; "Every change is
    written, in the same step, as an entry in the inbox of every member after
    it and of every user it removed"; "every inbox holds them in msg_id order:
    all members see the same interleaving of messages and events" (members on
    two gates)."""
    o, a, b, c = w.user(1), w.user(2), w.user(1), w.user(2)
    for x in (b, c):
        writes(x, a)
    info = group_with(o, a)
    g = info.group
    a.ok(m.GroupAdd(group=g, users=[b.user, c.user], cmid=cmid()))
    b.post(g, b"m1")
    c.ok(m.GroupTitle(group=g, title="t2", cmid=cmid()))
    o.ok(m.GroupRemove(group=g, users=[c.user], cmid=cmid()))
    a.post(g, b"m2")
    b.ok(m.GroupRemove(group=g, users=[b.user], cmid=cmid()))
    final = o.info(g)
    assert final.version == info.version + 4
    views = {x.user: group_msgs(x, g) for x in (o, a, b, c)}
    full = views[o.user]
    evs = events_of(full, g)
    assert [e.version for e in evs] == list(range(info.version, info.version + 5))
    assert [(e.op, e.actor) for e in evs] == [(GroupOp.CREATED, o.user), (GroupOp.ADDED, a.user),
                                              (GroupOp.TITLE_CHANGED, c.user), (GroupOp.REMOVED, o.user),
                                              (GroupOp.LEFT, b.user)]
    ids = [x.msg_id for x in full]
    assert ids == sorted(ids)
    # Everyone holds the same entries, each from when it joined until it left or was removed.
    by_id = {x.msg_id: i for i, x in enumerate(full)}
    added_at = next(x for x in full if is_event(x) and decode_group_event(x.body).op == GroupOp.ADDED)
    removed_c = next(x for x in full if is_event(x) and decode_group_event(x.body).op == GroupOp.REMOVED)
    left_b = next(x for x in full if is_event(x) and decode_group_event(x.body).op == GroupOp.LEFT)
    assert [x.msg_id for x in views[a.user]] == ids
    assert [x.msg_id for x in views[c.user]] == ids[by_id[added_at.msg_id]:by_id[removed_c.msg_id] + 1]
    assert [x.msg_id for x in views[b.user]] == ids[by_id[added_at.msg_id]:by_id[left_b.msg_id] + 1]
    for view in views.values():
        for x in view:
            twin = full[by_id[x.msg_id]]
            assert (x.sender, x.to, x.kind, x.ts_ms, x.cmid, x.body) == (
                twin.sender, twin.to, twin.kind, twin.ts_ms, twin.cmid, twin.body)
    for x in (o, a, b, c):
        assert_gapless(x.inbox())


def test_events_are_pushed_to_every_online_session_the_actors_included(w):
    """"Events are pushed as NewMsg to online sessions, the actor's own
    connection included, and synced like any message; they are [...] never
    counted as unread." """
    o, a, b = w.user(1), w.user(2), w.user(1)
    writes(b, o)
    o2 = w.session(o.user, gate=2)
    info = group_with(o, a)
    g = info.group
    o.ok(m.GroupAdd(group=g, users=[b.user], cmid=cmid()))
    for x in (o, o2, a, b):
        push, _ = x.until(lambda p: type(p) is m.NewMsg and p.msg.to == g
                          and decode_group_event(p.msg.body).op == GroupOp.ADDED)
        ev = decode_group_event(push.msg.body)
        assert (ev.actor, ev.users, ev.version) == (o.user, [b.user], info.version + 1)
        assert push.msg == next(e for e in x.inbox() if e.msg_id == push.msg.msg_id)
    for x in (o, a, b):
        assert x.convs()[g].unread == 0


def test_group_messages_reach_every_member_once_in_one_order(w):
    """"Send to a group appends the message once to the inbox of every member
    (the sender's copy gives SendOk.seq); Msg.to is the group." "every inbox
    holds them in msg_id order" with gapless seqs ("numbered seq = 1, 2, 3…
    with no gaps"), pushed to the members' sessions on both gates."""
    o, a, b = w.user(1), w.user(2), w.user(2)
    info = group_with(o, a, b)
    g = info.group
    a2 = w.session(a.user, gate=1)
    sent = []
    for i in range(4):
        for sender in (o, a, b):
            ok = sender.post(g, f"{sender.user}:{i}".encode())
            sent.append((sender.user, ok))
    views = {x.user: [e for e in group_msgs(x, g) if not is_event(e)] for x in (o, a, b)}
    order = [x.msg_id for x in views[o.user]]
    assert order == sorted(order) and len(order) == 12
    assert [x.msg_id for x in views[a.user]] == order == [x.msg_id for x in views[b.user]]
    for user, ok in sent:
        copy = next(x for x in views[user] if x.msg_id == ok.msg_id)
        assert (copy.seq, copy.ts_ms, copy.sender, copy.to) == (ok.seq, ok.ts_ms, user, g)
    for x in (o, a, b):
        assert_gapless(x.inbox())
    # Pushes: a's other session (on the other gate) sees every message, its own included.
    got = []
    while len(got) < 12:
        push, _ = a2.until(lambda p: type(p) is m.NewMsg and p.msg.to == g and not is_event(p.msg))
        got.append(push.msg.msg_id)
    assert sorted(got) == order


def test_group_send_rules(w):
    """"Kinds 250–255 belong to the protocol from 1.1 on: a Send with such a
    kind gets Error{bad_request}". "The cmid lookup comes before the membership
    check, so a retry after removal still gets its first SendOk." Send to a
    group: members only."""
    o, a, outsider = w.user(1), w.user(2), w.user(1)
    info = group_with(o, a)
    g = info.group
    for kind in (250, 255):
        a.error(m.Send(to=g, cmid=cmid(), kind=kind, body=b"x"), ErrorCode.BAD_REQUEST)
        a.error(m.Send(to=o.user, cmid=cmid(), kind=kind, body=b"x"), ErrorCode.BAD_REQUEST)
    assert type(a.ask(m.Send(to=g, cmid=cmid(), kind=249, body=b"x"))) is m.SendOk
    first = m.Send(to=g, cmid=cmid(), kind=0, body=b"before removal")
    ok = a.ask(first)
    o.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    assert a.ask(first) == ok
    a.error(m.Send(to=g, cmid=cmid(), kind=0, body=b"after removal"), ErrorCode.NO_SUCH_USER)
    outsider.error(m.Send(to=g, cmid=cmid(), kind=0, body=b"x"), ErrorCode.NO_SUCH_USER)
    assert [x.body for x in group_msgs(o, g) if not is_event(x)] == [b"x", b"before removal"]


# --- reading -----------------------------------------------------------------


def test_read_in_a_group_notifies_the_other_members_and_the_readers_other_sessions(w):
    """"Read with peer = a group raises the reader's mark in the group and sends
    ReadNotice{reader, peer = group, msg_id, ts_ms} to the other members'
    sessions and the reader's other sessions; a gate may send a member at most
    one such notice per reader per second (the latest)." A Read's msg_id "must
    belong to the conversation", else Error{bad_request}."""
    o, a, b = w.user(1), w.user(2), w.user(1)
    info = group_with(o, a, b)
    g = info.group
    a2 = w.session(a.user, gate=1)
    m1, m2 = o.post(g, b"1"), o.post(g, b"2")
    one_to_one = o.post(a.user, b"private")
    a.error(m.Read(peer=g, msg_id=one_to_one.msg_id), ErrorCode.BAD_REQUEST)
    a.error(m.Read(peer=g, msg_id=m2.msg_id + 10**6), ErrorCode.BAD_REQUEST)
    a.ok(m.Read(peer=g, msg_id=m1.msg_id))
    a.ok(m.Read(peer=g, msg_id=m2.msg_id))
    a.ok(m.Read(peer=g, msg_id=m1.msg_id))  # does not lower the mark, notifies no one
    for x in (o, b, a2):
        notice, before = x.until(lambda p: type(p) is m.ReadNotice and p.msg_id == m2.msg_id)
        assert (notice.reader, notice.peer) == (a.user, g)
        earlier = [p.msg_id for p in before if type(p) is m.ReadNotice]
        assert earlier in ([], [m1.msg_id])
    # The reader's own connection gets no notice of its own Reads, and the Read that
    # did not raise the mark notifies no one: the next notice anyone gets is b's.
    b.ok(m.Read(peer=g, msg_id=m2.msg_id))
    for x in (a, o):
        notice, before = x.until(lambda p: type(p) is m.ReadNotice and p.reader == b.user)
        assert (notice.peer, notice.msg_id) == (g, m2.msg_id)
        assert [p for p in before if type(p) is m.ReadNotice] == []


def test_convs_for_a_group(w):
    """"In Convs a group is a conversation (peer = the group): unread counts
    messages not sent by the reader above its mark (events not counted);
    peer_read is the lowest mark of the other current members, a member's mark
    starting at the msg_id of the event that added it." """
    o, a, b = w.user(1), w.user(2), w.user(1)
    writes(b, o)
    info = group_with(o, a)
    g = info.group
    created = group_msgs(o, g)[0].msg_id
    m1, m2 = o.post(g, b"1"), o.post(g, b"2")
    a_conv = a.convs()[g]
    assert (a_conv.unread, a_conv.last_msg_id) == (2, m2.msg_id)
    o_conv = o.convs()[g]
    assert (o_conv.unread, o_conv.peer_read, o_conv.last_msg_id) == (0, created, m2.msg_id)
    a.ok(m.Read(peer=g, msg_id=m1.msg_id))
    assert a.convs()[g].unread == 1
    assert o.convs()[g].peer_read == m1.msg_id
    # b joins: its mark starts at the event that added it, above a's.
    o.ok(m.GroupAdd(group=g, users=[b.user], cmid=cmid()))
    added = group_msgs(b, g)[0].msg_id
    assert o.convs()[g].peer_read == m1.msg_id
    assert a.convs()[g].unread == 1  # the event is not counted
    assert b.convs()[g].unread == 0
    a.ok(m.Read(peer=g, msg_id=added))
    assert o.convs()[g].peer_read == added
    # a's peer_read: the lower of o's mark and b's.
    o.ok(m.Read(peer=g, msg_id=m2.msg_id))
    assert a.convs()[g].peer_read == m2.msg_id
    m3 = o.post(g, b"3")
    assert (a.convs()[g].unread, b.convs()[g].unread, o.convs()[g].unread) == (1, 1, 0)
    a.ok(m.Read(peer=g, msg_id=m3.msg_id))
    assert o.convs()[g].peer_read == added  # b has not read beyond its join
    # b removed: no longer among the "other current members".
    o.ok(m.GroupRemove(group=g, users=[b.user], cmid=cmid()))
    assert o.convs()[g].peer_read == m3.msg_id


def test_a_former_members_conv_stays_as_it_was(w):
    """"A former member keeps its own copies [...] and its Conv stays as it was
    at its removal." """
    o, a = w.user(1), w.user(2)
    info = group_with(o, a)
    g = info.group
    o.post(g, b"1")
    o.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    at_removal = a.convs()[g]
    o.post(g, b"2")
    o.ok(m.GroupTitle(group=g, title="later", cmid=cmid()))
    o.ok(m.Read(peer=g, msg_id=group_msgs(o, g)[-1].msg_id))
    assert a.convs()[g] == at_removal
    assert at_removal.unread == 1


def history(w, conn, peer: str, gate: int = 1, query: str = ""):
    """(status, JSON body) of `GET /v1/history/{peer}` on a gate with `conn`'s token."""
    path = "/v1/history/" + urllib.parse.quote(peer, safe="") + query
    req = urllib.request.Request(f"http://127.0.0.1:{w.http_port(gate)}{path}",
                                 headers={"Authorization": "Bearer " + conn.token.hex()})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, body


def test_history_of_a_group_is_the_callers_own_copies(w):
    """"/v1/history/%23group gives the caller's own copies, so a member sees the
    group from when it joined"; section 6: newest first, each message with
    msg_id, sender, to, kind, ts_ms and body (base64)."""
    o, a, b = w.user(1), w.user(2), w.user(1)
    writes(b, o)
    info = group_with(o, a)
    g = info.group
    early = o.post(g, b"before b")
    o.ok(m.GroupAdd(group=g, users=[b.user], cmid=cmid()))
    late = a.post(g, b"after b")
    for conn, gate in ((o, 1), (b, 2), (b, 1)):
        status, page = history(w, conn, g, gate=gate)
        assert status == 200, page
        own = group_msgs(conn, g)
        assert [x["msg_id"] for x in page["messages"]] == [x.msg_id for x in reversed(own)]
        top = page["messages"][0]
        assert (top["msg_id"], top["sender"], top["to"], top["kind"], base64.b64decode(top["body"])) == (
            late.msg_id, a.user, g, 0, b"after b")
    status, page = history(w, b, g)
    assert early.msg_id not in [x["msg_id"] for x in page["messages"]]
    status, page = history(w, o, g, query=f"?before={late.msg_id}&limit=1")
    assert status == 200 and [x["msg_id"] for x in page["messages"]] != [late.msg_id]
    assert len(page["messages"]) == 1 and page["more"] is True


def test_non_members_learn_nothing(w):
    """"To a user who is not a member, these and GroupRemove answer as for a
    group that does not exist (Error{no_such_user})" — exactly the same
    answers, for a stranger and for a former member."""
    o, a, stranger = w.user(1), w.user(2), w.user(2)
    writes(stranger, o)
    writes(stranger, a)
    info = group_with(o, a)
    g = info.group
    o.ok(m.GroupRemove(group=g, users=[a.user], cmid=cmid()))
    secret = o.post(g, b"secret")  # after a left: in o's inbox only
    missing = group_id()

    def answers(conn, group):
        out = []
        for req in (m.GroupGet(group=group),
                    m.GroupAdd(group=group, users=[stranger.user], cmid=cmid()),
                    m.GroupAdd(group=group, users=[conn.user], cmid=cmid()),
                    m.GroupRemove(group=group, users=[conn.user], cmid=cmid()),
                    m.GroupRemove(group=group, users=[o.user], cmid=cmid()),
                    m.GroupTitle(group=group, title="x", cmid=cmid()),
                    m.Send(to=group, cmid=cmid(), kind=0, body=b"x"),
                    m.Read(peer=group, msg_id=secret.msg_id)):
            reply = conn.ask(req)
            assert type(reply) is m.Error, f"{req} answered {reply}"
            out.append(no_such(reply, group))
        return out

    expected = answers(stranger, missing)
    assert expected[0][0] == ErrorCode.NO_SUCH_USER
    assert answers(stranger, g) == expected
    assert answers(a, g) == answers(a, missing)
    assert o.info(g) == m.GroupInfo(group=g, title=info.title, owner=o.user, members=[o.user],
                                    version=info.version + 1)
    assert g not in stranger.convs()
    assert all(x.to != g for x in stranger.inbox())
    assert history(w, stranger, g) == _normalized_history(history(w, stranger, missing), missing, g)


def _normalized_history(answer, missing, group):
    status, body = answer
    if isinstance(body, str):
        return status, body.replace(missing, group)
    return status, body


def test_max_group_members(w):
    """"its members (users, the owner among them, at most max_group_members
    [...]; past either, Error{too_large})"; "lists in GroupCreate, GroupAdd and
    GroupRemove hold at most max_group_members ids" (the region runs with
    max_group_members = 5)."""
    o = w.user(1)
    others = [w.user(1 + i % 2) for i in range(MAX_MEMBERS)]
    for x in others:
        writes(x, o)
    names = [x.user for x in others]
    g = group_id()
    # Creator + 5 listed = 6 members.
    o.error(m.GroupCreate(group=g, title="t", members=names), ErrorCode.TOO_LARGE)
    o.error(m.GroupGet(group=g), ErrorCode.NO_SUCH_USER)
    info = o.ask(m.GroupCreate(group=g, title="t", members=names[:MAX_MEMBERS - 1]))
    assert type(info) is m.GroupInfo and len(info.members) == MAX_MEMBERS
    o.error(m.GroupAdd(group=g, users=[names[-1]], cmid=cmid()), ErrorCode.TOO_LARGE)
    assert o.info(g) == info
    assert group_msgs(others[-1], g) == []
    # Lists longer than max_group_members, whatever is in them.
    six = names + [o.user]
    o.error(m.GroupAdd(group=g, users=six, cmid=cmid()), ErrorCode.TOO_LARGE)
    o.error(m.GroupRemove(group=g, users=six, cmid=cmid()), ErrorCode.TOO_LARGE)
    o.error(m.GroupCreate(group=group_id(), title="t", members=six), ErrorCode.TOO_LARGE)
    assert o.info(g) == info
    # Room again after one leaves.
    others[0].ok(m.GroupRemove(group=g, users=[names[0]], cmid=cmid()))
    o.ok(m.GroupAdd(group=g, users=[names[-1]], cmid=cmid()))
    assert o.info(g).members == [o.user] + names[1:]


# --- presence ----------------------------------------------------------------


def eventually_state(watcher, user: str, state: int, within: float = 60.0) -> m.Presence:
    """`user`'s presence as `watcher` sees it, once it is `state`: presence
    travels between processes, so an answer right after a change may still
    be the state before it."""
    deadline = time.monotonic() + within
    while True:
        got = watcher.watch([user])[user]
        if got.state == state or time.monotonic() > deadline:
            assert got.state == state, f"{user} seen as {got}, expected state {state}"
            return got
        time.sleep(0.2)


def test_presence_is_visible_to_self_and_contacts_only(w):
    """"A user's presence is visible to itself and to its contacts. To anyone
    else, and for an id that does not exist or is a group, it is state 0 with
    last_seen_ms 0." "Each session is in state 2 after Login"."""
    a, b, c = w.user(1), w.user(2), w.user(1)
    writes(a, b)  # b is a's contact; a is not b's
    writes(c, a)
    info = group_with(a, c)
    seen = eventually_state(b, a.user, m.PresenceState.ONLINE)
    assert seen.last_seen_ms > 0
    assert eventually_state(a, a.user, m.PresenceState.ONLINE).last_seen_ms > 0
    # c shares a group with a and wrote to it, but a never wrote to c.
    for watcher in (c, a):
        other = b.user if watcher is a else a.user
        states = watcher.watch([other, "nobody-" + info.group[1:], info.group])
        for user in (other, "nobody-" + info.group[1:], info.group):
            assert (states[user].state, states[user].last_seen_ms) == (0, 0), (watcher.user, states[user])


def test_presence_states_combine_over_sessions(w):
    """"A user is online while one of its sessions is in state 2, away while
    none is in 2 and one is in 3, and offline otherwise." PresenceNotice is
    pushed "on each change of a watched user's visible state" (watcher on the
    other gate)."""
    a, b = w.user(1), w.user(2)
    writes(a, b)
    a2 = w.session(a.user, gate=2)
    eventually_state(b, a.user, m.PresenceState.ONLINE)
    steps = [(a, 3, None), (a2, 3, m.PresenceState.AWAY), (a, 1, None), (a2, 1, m.PresenceState.OFFLINE),
             (a, 3, m.PresenceState.AWAY), (a2, 2, m.PresenceState.ONLINE)]
    now = m.PresenceState.ONLINE
    for conn, state, change in steps:
        conn.ok(m.SetPresence(state=state))
        if change is None:
            assert b.watch([a.user])[a.user].state == now, (conn, state)
            continue
        notice, before = b.until(lambda p: type(p) is m.PresenceNotice and p.state.user == a.user
                                 and p.state.state == change)
        assert notice.state.last_seen_ms > 0
        # No notice of a state a was never in meanwhile.
        assert {p.state.state for p in before if type(p) is m.PresenceNotice and p.state.user == a.user} <= {now}
        now = change
        eventually_state(b, a.user, now)


def test_presence_notice_on_logout_and_login(w):
    """"then pushes PresenceNotice to this connection on each change of a
    watched user's visible state"; "Each session is in state 2 after Login";
    a user with no session is offline."""
    a, b = w.user(1), w.user(2)
    writes(a, b)
    eventually_state(b, a.user, m.PresenceState.ONLINE)
    a.close()
    notice, _ = b.until(lambda p: type(p) is m.PresenceNotice and p.state.user == a.user
                        and p.state.state == m.PresenceState.OFFLINE)
    assert notice.state.last_seen_ms > 0
    w.session(a.user, gate=1)
    notice, _ = b.until(lambda p: type(p) is m.PresenceNotice and p.state.user == a.user
                        and p.state.state != m.PresenceState.OFFLINE)
    assert notice.state.state == m.PresenceState.ONLINE


def test_last_seen_ms(w):
    """"last_seen_ms is when it was last online or away (0 if never); it is
    stored, and sessions in state 1 do not advance it." """
    a, b = w.user(1), w.user(2)
    writes(a, b)
    eventually_state(b, a.user, m.PresenceState.ONLINE)
    sent = a.post(b.user, b"going now")
    a.close()
    gone = eventually_state(b, a.user, m.PresenceState.OFFLINE)
    assert a.login_ms <= gone.last_seen_ms
    assert sent.ts_ms <= gone.last_seen_ms <= w.server_ms()
    # A session that appears offline does not advance it, however active.
    a2 = w.session(a.user, gate=2)
    eventually_state(b, a.user, m.PresenceState.ONLINE)
    a2.ok(m.SetPresence(state=1))
    hidden = eventually_state(b, a.user, m.PresenceState.OFFLINE)
    assert hidden.last_seen_ms >= a2.login_ms >= gone.last_seen_ms
    time.sleep(0.05)  # so that an advance would show in milliseconds
    a2.post(b.user, b"still here")
    a2.ok(m.SetPresence(state=1))
    a2.close()
    time.sleep(0.05)
    assert b.watch([a.user])[a.user] == hidden


def test_watch_limits(w):
    """"Watch{users} (at most 256 ids a request and 1,024 per connection, each
    id counted once, else Error{too_large}) registers the ids, then answers
    PresenceList with each one's state". "Watching adds up over requests;
    Watch{[]} stops all of it." """
    a = w.user(1)
    ids = [f"nobody{i}-{a.user}" for i in range(1100)]
    a.error(m.Watch(users=ids[:257]), ErrorCode.TOO_LARGE)
    for i in range(4):
        states = a.watch(ids[i * 256:(i + 1) * 256])
        assert set(states) == set(ids[i * 256:(i + 1) * 256])
        assert all((p.state, p.last_seen_ms) == (0, 0) for p in states.values())
    # Ids already watched count once, in a request and over requests.
    assert set(a.watch(ids[:200] + ids[:56])) == set(ids[:200])
    a.error(m.Watch(users=[ids[1024]]), ErrorCode.TOO_LARGE)
    a.error(m.Watch(users=ids[1000:1030]), ErrorCode.TOO_LARGE)
    assert a.ask(m.Watch(users=[])) == m.PresenceList(states=[])
    assert set(a.watch(ids[1024:1100])) == set(ids[1024:1100])
    # The limit is per connection: another session of the same user starts at zero.
    a2 = w.session(a.user, gate=2)
    assert len(a2.watch(ids[:256])) == 256


def test_watch_empty_stops_notices(w):
    """"Watch{[]} stops all of it"; notices go only for watched users."""
    a, b, c = w.user(1), w.user(1), w.user(2)
    writes(a, c)
    writes(b, c)
    eventually_state(c, a.user, m.PresenceState.ONLINE)
    eventually_state(c, b.user, m.PresenceState.ONLINE)
    a.ok(m.SetPresence(state=3))
    c.until(lambda p: type(p) is m.PresenceNotice and p.state.user == a.user and p.state.state == 3)
    assert c.ask(m.Watch(users=[])) == m.PresenceList(states=[])
    a.ok(m.SetPresence(state=2))
    c.watch([b.user])
    b.ok(m.SetPresence(state=3))
    _, before = c.until(lambda p: type(p) is m.PresenceNotice and p.state.user == b.user and p.state.state == 3)
    assert [p for p in before if type(p) is m.PresenceNotice and p.state.user == a.user] == []


def test_visibility_is_checked_for_each_answer_and_notice(w):
    """"The check is made for each answer and each notice": a watcher that
    becomes a contact sees the real state from then on; before, its notices
    (if any) carry state 0."""
    a, c = w.user(1), w.user(2)
    seen = c.watch([a.user])[a.user]
    assert (seen.state, seen.last_seen_ms) == (0, 0)
    a.ok(m.SetPresence(state=3))
    writes(a, c)
    eventually_state(c, a.user, m.PresenceState.AWAY)
    a.ok(m.SetPresence(state=2))
    notice, before = c.until(lambda p: type(p) is m.PresenceNotice and p.state.user == a.user
                             and p.state.state == 2)
    assert all(p.state.state in (0, 3) for p in before if type(p) is m.PresenceNotice)
    assert all(p.state.last_seen_ms == 0 for p in before if type(p) is m.PresenceNotice and p.state.state == 0)


# --- typing ------------------------------------------------------------------


def typing_from(user: str, peer: str):
    return lambda p: type(p) is m.TypingNotice and p.user == user and p.peer == peer


def pushes_before_next_message(sender, to) -> list:
    """`sender` sends `to` a message; the pushes `to` got before it. What the
    sender's earlier Typing caused comes before: its requests go to one
    worker, in order, whose notifications of `to` keep that order (any
    number of workers and gates), whereas another user's may be applied by
    another worker, before or after."""
    sent = sender.post(to.user, b"after the typing")
    _, before = to.until(lambda p: type(p) is m.NewMsg and p.msg.msg_id == sent.msg_id)
    return before


def test_typing_answers_ok_for_any_well_formed_peer(w):
    """"Typing{peer, typing} answers Ok for any well-formed peer." """
    a, b = w.user(1), w.user(2)
    info = group_with(b, w.user(1))
    for peer in (b.user, a.user, "nobody-" + a.user, info.group, group_id()):
        for flag in (True, False):
            a.ok(m.Typing(peer=peer, typing=flag))
    for bad in ("", "bad id", "#", "#bad id", "é"):
        a.error(m.Typing(peer=bad, typing=True), ErrorCode.BAD_REQUEST)


def test_typing_reaches_a_peer_that_has_the_sender_as_contact(w):
    """"The gate sends TypingNotice{user, peer, typing} only: for a user peer
    that has the sender among its contacts, to that user's online sessions,
    with peer = that user"; "never to the sender's own sessions"."""
    a, b = w.user(1), w.user(2)
    writes(b, a)  # a is b's contact
    writes(a, a)  # a is its own contact
    b2 = w.session(b.user, gate=1)
    a2 = w.session(a.user, gate=2)
    a.ok(m.Typing(peer=b.user, typing=True))
    a.ok(m.Typing(peer=a.user, typing=True))
    for x in (b, b2):
        notice, _ = x.until(typing_from(a.user, b.user))
        assert notice.typing is True
    assert [p for p in pushes_before_next_message(a, a2) if type(p) is m.TypingNotice] == []
    # Nothing reached a's other session before a notice from b (whose contact a is).
    writes(a, b)
    b.ok(m.Typing(peer=a.user, typing=True))
    _, before = a2.until(typing_from(b.user, a.user))
    assert [p for p in before if type(p) is m.TypingNotice] == []


def test_typing_does_not_reach_a_peer_without_the_sender_as_contact(w):
    """TypingNotice goes "for a user peer that has the sender among its
    contacts" only: not to one the sender wrote to, nor to itself."""
    a, b = w.user(1), w.user(2)
    writes(a, b)  # b is a's contact; a is not b's
    a.ok(m.Typing(peer=b.user, typing=True))
    a.ok(m.Typing(peer=a.user, typing=True))
    assert [p for p in pushes_before_next_message(a, b) if type(p) is m.TypingNotice] == []


def test_no_typing_from_a_session_that_appears_offline(w):
    """"nothing from a session in state 1"."""
    a, b, c = w.user(1), w.user(2), w.user(2)
    writes(b, a)
    writes(c, a)
    a.ok(m.SetPresence(state=1))
    a.ok(m.Typing(peer=b.user, typing=True))
    assert [p for p in pushes_before_next_message(a, b) if type(p) is m.TypingNotice] == []
    # Back in state 3 (away), its typing is sent again (to c: the notice to b may
    # still be within its one per second).
    a.ok(m.SetPresence(state=3))
    a.ok(m.Typing(peer=c.user, typing=True))
    notice, _ = c.until(typing_from(a.user, c.user))
    assert notice.typing is True


def test_typing_in_a_group_reaches_the_other_members(w):
    """"for a group the sender is a member of, to the other members' online
    sessions, with peer = the group; never to the sender's own sessions"; a
    non-member's Typing reaches no one."""
    o, a, b, c = w.user(1), w.user(2), w.user(1), w.user(2)
    info = group_with(o, a, b, c)
    g = info.group
    o2 = w.session(o.user, gate=2)
    outsider = w.user(2)
    outsider.ok(m.Typing(peer=g, typing=True))
    o.ok(m.Typing(peer=g, typing=True))
    for x in (a, b):
        notice, before = x.until(typing_from(o.user, g))
        assert notice.typing is True
        assert [p for p in before if type(p) is m.TypingNotice] == []
    a.ok(m.Typing(peer=g, typing=True))
    _, before = o2.until(typing_from(a.user, g))
    assert [p for p in before if type(p) is m.TypingNotice] == []
    # A member that left no longer gets the group's typing, nor sends it.
    b.ok(m.GroupRemove(group=g, users=[b.user], cmid=cmid()))
    b.ok(m.Typing(peer=g, typing=True))
    c.ok(m.Typing(peer=g, typing=True))
    for x in (o, a):
        _, before = x.until(typing_from(c.user, g))
        assert [p for p in before if type(p) is m.TypingNotice and p.user in (b.user, x.user)] == []


def test_typing_notices_at_most_one_per_second_per_sender_and_peer(w):
    """"A gate may drop notices (more than one per second per sender and peer
    [...])": two Typings sent back to back give one notice."""
    a, b = w.user(1), w.user(2)
    writes(b, a)
    a.ok(m.Typing(peer=b.user, typing=True))
    a.ok(m.Typing(peer=b.user, typing=True))
    assert len([p for p in pushes_before_next_message(a, b) if type(p) is m.TypingNotice]) == 1


def test_becoming_a_contact_is_a_change_of_the_visible_state(w):
    """Watch "pushes PresenceNotice to this connection on each change of a
    watched user's visible state": when the watched user first writes to the
    watcher, its visible state goes from 0 to its real one."""
    a, c = w.user(1), w.user(2)
    assert c.watch([a.user])[a.user].state == 0
    writes(a, c)
    notice, _ = c.until(lambda p: type(p) is m.PresenceNotice and p.state.user == a.user)
    assert notice.state.state == m.PresenceState.ONLINE and notice.state.last_seen_ms > 0


# A region of its own, whose gate 2 is killed.
dying = region_fixture("conformance-dying", name="dying", gates=2, extra_env={"SIMZMQ_GATE_IDLE_TIMEOUT_S": "3"})


def test_a_user_whose_gate_dies_goes_offline(dying):
    """"A user whose gate dies is offline within idle_timeout" (here 3 s; the
    test waits for the notice, it does not time it)."""
    w = World(dying)
    try:
        a, b = w.user(2), w.user(1)
        writes(a, b)
        eventually_state(b, a.user, m.PresenceState.ONLINE)
        os.kill(dying.pid("gate-2"), signal.SIGKILL)

        def told(p):
            return type(p) is m.PresenceNotice and p.state.user == a.user and p.state.state != m.PresenceState.ONLINE
        deadline = time.monotonic() + 60
        while not any(told(p) for p in b.pushes):
            assert time.monotonic() < deadline, "no notice that a is offline"
            assert type(b.ask(m.Ping(ts_ms=1))) is m.Pong  # b's own connection must not go idle
            time.sleep(0.3)
        notice = next(p for p in b.pushes if told(p))
        assert notice.state.state == m.PresenceState.OFFLINE and notice.state.last_seen_ms > 0
    finally:
        w.close()
