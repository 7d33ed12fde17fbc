"""Groups (protocol.md section 7): what each group request does to the store,
and who hears of it. Part of the IM service (simzmq/service.py), pure like it:
no sockets, no clock, every method inside the caller's transaction.

Order: every transaction locks group rows before user rows, each in id
order (in Postgres row locks until commit; store/postgres.py). A batch takes
all of them first (service.py, _SendBatch.lock_rows: its groups, then its
users with the members of the groups it writes to and the users its group
changes name), so
a handler's own lock_group and user_seqs find them held; a request handled
alone takes its group's row (lock_group), then the user rows of the inboxes
it writes (user_seqs). Only then are msg_ids drawn. So one group's messages
and events are numbered one at a time, and every member's inbox holds them
in msg_id order: all members see the same interleaving.

A non-member learns nothing: to it, a group that exists answers exactly as
one that does not (NOT_A_GROUP below).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from simzmq.store.base import GroupEntry, GroupMember, GroupRow, Store
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN
from simzmq.wire.messages import GROUP_EVENT_KIND, ErrorCode, GroupOp

class Refused(Exception):
    """A request that gets an Error and changes nothing (every handler of
    the IM service raises it; service.py imports it from here)."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def not_a_group(group: str) -> Refused:
    # The same words whether the group does not exist or the caller is not in it.
    return Refused(ErrorCode.NO_SUCH_USER, f"no such user or group: {group}")


def ordered_unique(users: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(users))


def change_digest(msg) -> str:
    """What a GroupAdd/GroupRemove/GroupTitle asks for, to tell its retry
    (same cmid, same request) from a different request with a used cmid."""
    users = tuple(getattr(msg, "users", ()))
    return hashlib.sha256(repr((type(msg).__name__, msg.group, users, getattr(msg, "title", ""))).encode()).hexdigest()


def _message_copies(sender: str, msg: m.Send, msg_id: int, ts_ms: int, seqs: dict[str, int]) -> list:
    """The NewMsg of each copy (by user: its inbox seq) of a group message."""
    return [(user, m.NewMsg(msg=m.Msg(msg_id=msg_id, seq=seq, sender=sender, to=msg.to, kind=msg.kind,
                                      ts_ms=ts_ms, cmid=msg.cmid, body=msg.body)))
            for user, seq in seqs.items()]


class Group:
    """A locked group as the request found it (or a new one, not `stored`
    yet), and the changes it makes."""

    def __init__(self, row: GroupRow, members: list[GroupMember], stored: bool = True):
        self.row = row
        self.members = {mb.user: mb for mb in members}
        self.stored = stored

    @property
    def active(self) -> list[str]:
        """Current members, in join order."""
        return [mb.user for mb in sorted(self.members.values(), key=lambda mb: mb.joined) if mb.active]

    def info(self) -> m.GroupInfo:
        return m.GroupInfo(group=self.row.id, title=self.row.title, owner=self.row.owner,
                           members=self.active, version=self.row.version)


class GroupService:
    """The group requests; IMService mixes this in (self.store is its store)."""

    store: Store
    max_group_members: int
    max_groups_per_user: int
    # IMService.queue_pushes: writes the push jobs of a new message's copies.
    queue_pushes: Callable[[int, Sequence[tuple[int, str, int]]], None]

    def _load_group(self, group: str, member: str) -> Group:
        """The group, locked, if `member` is in it; else refused as unknown."""
        return self._as_member(group, self.store.lock_group(group), member)

    def _as_member(self, group: str, row: GroupRow | None, member: str) -> Group:
        """The locked group of `row` if `member` is in it; else refused as unknown."""
        if row is None:
            raise not_a_group(group)
        found = Group(row, self.store.group_members(group))
        if member not in found.active:
            raise not_a_group(group)
        return found

    def _check_users_exist(self, users: Sequence[str]) -> None:
        existing = self.store.user_seqs(users)
        for user in users:
            if user not in existing:
                raise Refused(ErrorCode.NO_SUCH_USER, f"no such user: {user}")

    def _check_may_join(self, actor: str, group: Group | None, newcomers: Sequence[str],
                        members_after: int) -> None:
        """Who may be put in, and the limits (section 7)."""
        if members_after > self.max_group_members:
            raise Refused(ErrorCode.TOO_LARGE, f"a group has at most {self.max_group_members} members")
        if group is not None and actor != group.row.owner:
            if any(user in group.members for user in newcomers):
                raise Refused(ErrorCode.FORBIDDEN, "only the owner puts back who left or was removed")
        others = [u for u in newcomers if u != actor]
        if set(others) - self.store.written_to(actor, others):
            raise Refused(ErrorCode.FORBIDDEN, "a user may be put in only by its contacts")
        joined = self.store.groups_joined(newcomers)
        for user in newcomers:
            if joined.get(user, 0) >= self.max_groups_per_user:
                raise Refused(ErrorCode.TOO_LARGE, f"{user} is in too many groups")

    def _write_events(self, group: Group, events: Sequence[tuple[GroupOp, str, list, str, list]],
                      now_ms: int) -> list:
        """Store events (op, actor, users, title, recipients) in order, each
        raising the version; save the group's row and members. Returns the
        notices and the msg_id of each event."""
        store = self.store
        everyone = {user for *_, recipients in events for user in recipients}
        seqs = store.user_seqs(everyone)
        msg_ids = store.new_msg_ids(len(events))
        entries, notices = [], []
        version = group.row.version
        for msg_id, (op, actor, users, title, recipients) in zip(msg_ids, events):
            version += 1
            body = BIN.encode_struct(m.GroupEvent(op=int(op), actor=actor, users=list(users), title=title,
                                                  version=version))
            mine = {}
            for user in recipients:
                seqs[user] += 1
                mine[user] = seqs[user]
                notices.append((user, m.NewMsg(msg=m.Msg(msg_id=msg_id, seq=seqs[user], sender=actor,
                                                         to=group.row.id, kind=GROUP_EVENT_KIND, ts_ms=now_ms,
                                                         cmid=b"", body=body))))
            entries.append(GroupEntry(msg_id, actor, group.row.id, GROUP_EVENT_KIND, now_ms, b"", body, mine, False))
        group.row = group.row._replace(version=version)
        store.save_group(group.row, now_ms, new=not group.stored)
        group.stored = True
        store.save_members(group.row.id, list(group.members.values()))
        store.add_group_entries(entries)
        return notices, msg_ids

    def _join(self, group: Group, users: Sequence[str]) -> None:
        joins = group.row.joins
        for user in users:
            joins += 1
            group.members[user] = GroupMember(user, joins, True)
        group.row = group.row._replace(joins=joins)

    # -- requests (key = the actor) --------------------------------------------

    def group_create(self, actor: str, msg: m.GroupCreate, now_ms: int):
        store = self.store
        row = store.lock_group(msg.group)
        if row is not None:
            current = Group(row, store.group_members(msg.group))
            if row.creator == actor and actor in current.active:
                return current.info(), []  # a retried create
            raise Refused(ErrorCode.EXISTS, f"group exists: {msg.group}")
        members = ordered_unique([actor, *msg.members])
        self._check_users_exist(members)
        self._check_may_join(actor, None, members, len(members))
        group = Group(GroupRow(msg.group, msg.title, actor, actor, 0, 0), [], stored=False)
        self._join(group, members)
        notices, (msg_id,) = self._write_events(
            group, [(GroupOp.CREATED, actor, members, msg.title, members)], now_ms)
        store.start_group_marks(msg.group, members, msg_id)
        return group.info(), notices

    def group_get(self, actor: str, msg: m.GroupGet, now_ms: int):
        return self._load_group(msg.group, actor).info(), []

    def _repeat(self, actor: str, msg) -> bool:
        """True for a retry of a recorded change; refuses a different request
        with a used cmid."""
        recorded = self.store.find_group_op(actor, msg.cmid)
        if recorded is None:
            return False
        if recorded != change_digest(msg):
            raise Refused(ErrorCode.BAD_REQUEST, "cmid already used for a different request")
        return True

    def _target(self, actor: str, msg) -> Group | None:
        """The group a change applies to, locked; None for a retry of a
        recorded change. The group is locked before the cmid lookup, so a
        retry racing its first attempt on another worker waits for it and
        finds it; the lookup comes before the membership check, so a retry
        after the actor's removal still gets its first answer."""
        row = self.store.lock_group(msg.group)
        if self._repeat(actor, msg):
            return None
        return self._as_member(msg.group, row, actor)

    def _unchanged(self, actor: str, msg):
        """A change that changes nothing: Ok, no event, no new version; its
        cmid is still recorded, so a repeat changes nothing whatever happened
        since (see docs/protocol-choices.md)."""
        self.store.record_group_op(actor, msg.cmid, change_digest(msg))
        return m.Ok(), []

    def _changed(self, actor: str, msg, group: Group, events: list, now_ms: int):
        notices, msg_ids = self._write_events(group, events, now_ms)
        self.store.record_group_op(actor, msg.cmid, change_digest(msg))
        return notices, msg_ids

    def group_add(self, actor: str, msg: m.GroupAdd, now_ms: int):
        group = self._target(actor, msg)
        if group is None:
            return m.Ok(), []
        users = ordered_unique(msg.users)
        self._check_users_exist(users)
        active = group.active
        newcomers = [u for u in users if u not in active]
        if not newcomers:
            return self._unchanged(actor, msg)
        self._check_may_join(actor, group, newcomers, len(active) + len(newcomers))
        self._join(group, newcomers)
        notices, (msg_id,) = self._changed(
            actor, msg, group, [(GroupOp.ADDED, actor, newcomers, "", group.active)], now_ms)
        self.store.start_group_marks(msg.group, newcomers, msg_id)
        return m.Ok(), notices

    def group_remove(self, actor: str, msg: m.GroupRemove, now_ms: int):
        group = self._target(actor, msg)
        if group is None:
            return m.Ok(), []
        users = ordered_unique(msg.users)
        self._check_users_exist(users)
        before = group.active
        leaving = [u for u in users if u in before]
        if not leaving:
            return self._unchanged(actor, msg)
        owner = group.row.owner
        removed = [u for u in leaving if u != actor]
        if removed and actor != owner:
            raise Refused(ErrorCode.FORBIDDEN, "only the owner removes others")
        events = []
        for user in leaving:
            group.members[user] = group.members[user]._replace(active=False)
        if removed:
            events.append((GroupOp.REMOVED, actor, removed, "", before))
        if actor in leaving:
            events.append((GroupOp.LEFT, actor, [actor], "", [u for u in before if u not in removed]))
        remaining = group.active
        if actor in leaving and actor == owner:
            # The earliest joined becomes owner; with nobody left, the group is closed.
            new_owner = remaining[0] if remaining else ""
            group.row = group.row._replace(owner=new_owner)
            if new_owner:
                events.append((GroupOp.OWNER_CHANGED, actor, [new_owner], "", remaining))
        # Their Conv with the group stays as it was at their removal (section
        # 7): frozen before it is saved, so each one's peer_read counts the
        # others leaving with it, members until now.
        self.store.freeze_group_convs(group.row.id, leaving)
        notices, _ = self._changed(actor, msg, group, events, now_ms)
        return m.Ok(), notices

    def group_title(self, actor: str, msg: m.GroupTitle, now_ms: int):
        group = self._target(actor, msg)
        if group is None:
            return m.Ok(), []
        if msg.title == group.row.title:
            return self._unchanged(actor, msg)
        group.row = group.row._replace(title=msg.title)
        notices, _ = self._changed(
            actor, msg, group, [(GroupOp.TITLE_CHANGED, actor, [], msg.title, group.active)], now_ms)
        return m.Ok(), notices

    def group_send(self, sender: str, msg: m.Send, now_ms: int):
        """A Send to a group: the group's lock, the cmid lookup (a retry
        waits for its first attempt, and after removal still gets its first
        SendOk), then the membership check, then one copy in every member's
        inbox."""
        store = self.store
        row = store.lock_group(msg.to)
        earlier = store.find_send(sender, msg.cmid)
        if earlier is not None:
            if (earlier.to, earlier.kind, bytes(earlier.body)) != (msg.to, msg.kind, bytes(msg.body)):
                raise Refused(ErrorCode.BAD_REQUEST, "cmid already used for a different message")
            # Published again, as a one-to-one retry is (its first attempt
            # may have died between its commit and its publish; gates push
            # each inbox seq once): every copy stored, whoever left since.
            copies = store.group_copies(msg.to, earlier.msg_id)
            return (m.SendOk(msg_id=earlier.msg_id, seq=earlier.sender_seq, ts_ms=earlier.ts_ms),
                    _message_copies(sender, msg, earlier.msg_id, earlier.ts_ms, copies))
        group = self._as_member(msg.to, row, sender)
        members = group.active
        seqs = store.user_seqs(members)
        (msg_id,) = store.new_msg_ids(1)
        mine = {user: seqs[user] + 1 for user in members}
        notices = _message_copies(sender, msg, msg_id, now_ms, mine)
        store.add_group_entries([GroupEntry(msg_id, sender, msg.to, msg.kind, now_ms, bytes(msg.cmid),
                                            bytes(msg.body), mine, True)])
        # Members offline when it is due hear of it by push; the sender never.
        self.queue_pushes(now_ms, [(msg_id, user, seq) for user, seq in mine.items() if user != sender])
        return m.SendOk(msg_id=msg_id, seq=mine[sender], ts_ms=now_ms), notices

    def group_readers(self, group: str) -> list[str]:
        """Who hears of a Read in the group: its current members."""
        row = self.store.lock_group(group)
        return Group(row, self.store.group_members(group)).active if row else []
