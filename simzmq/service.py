"""The IM service: what each request does to the store, and who hears of it.

No sockets, no clock: the worker shell (simzmq/im.py) passes the time in and
sends what this returns. Every method runs inside the caller's transaction, so
a reply and its notifications only leave after the commit.

A batch (handle_batch) is applied in arrival order per user. Its Sends are
gathered and written together: one cmid lookup, one read of the users' seqs
and one executemany per table for the whole run (see store/base.py). A Send
run is written before any other request that touches one of its users, so
every request sees what came before it. Handlers refuse (Error) before they
write anything, so an Error needs no rollback. A store step that raises
spoils the transaction: it surfaces as StepFailed naming the requests the
step served, and the caller runs the batch again without them (see
simzmq/im.py).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Container, Sequence
from typing import NamedTuple

from simzmq import presence as pr
from simzmq.groups import GroupService, Refused
from simzmq.limits import LimitsConfig
from simzmq.push.policy import BadReport, parse_report
from simzmq.store.base import NewMessage, PushJobRow, SentRecord, Store, clamp_history_limit, clamp_sync_limit
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode
from simzmq.wire.rules import MAX_GROUP_MEMBERS, is_group

TOKEN_BYTES = 32
# Room a Batch or ConvList needs besides its items: type, ref, list count,
# `more`, and the secretstream overhead the gate adds.
FRAME_OVERHEAD = 64


class Notice(NamedTuple):
    """A notification for every session of `user` except `origin`."""
    user: str
    origin: bytes
    msg: object


class Outcome(NamedTuple):
    reply: object
    notices: tuple = ()


class RegisterWork(NamedTuple):
    """The password work for a Register, done off the loop: the new hash, or,
    when the user already existed then, whether the password matches theirs."""
    pw_hash: str | None
    same_password: bool


class Request(NamedTuple):
    """One request of a batch: from the user `key`, over the session `origin`."""
    key: str
    origin: bytes
    msg: object
    prepared: object = None  # the password work's result (see IMService.handle)


class StepFailed(Exception):
    """A store step of a batch raised; the transaction is spoilt. `indices`
    are the positions (in the batch) of the requests that step served."""

    def __init__(self, indices: Sequence[int], cause: BaseException):
        super().__init__(f"requests {list(indices)}: {cause!r}")
        self.indices = list(indices)
        self.cause = cause


def token_hash(token: bytes) -> bytes:
    # Tokens are 32 random bytes, so a fast hash suffices: nothing to brute-force.
    return hashlib.sha256(token).digest()


def error(code: ErrorCode, reason: str) -> Outcome:
    return Outcome(m.Error(code=int(code), reason=reason[:256]))


def users_touched(key: str, msg) -> frozenset | None:
    """The users whose stored state `msg` from `key` reads or writes; None
    when that is not known before it runs (History names its user by token).
    A Send run touching none of them may be written after it."""
    kind = type(msg)
    if kind in (m.Send, m.Read) and is_group(msg.to if kind is m.Send else msg.peer):
        return None  # every member's
    if kind is m.Send:
        return frozenset((key, msg.to))
    if kind is m.Read:
        return frozenset((key, msg.peer))
    if kind in (m.Register, m.Login):
        return frozenset((key, msg.user))
    if kind in (m.Sync, m.Catchup, m.Convs):
        return frozenset((key,))
    if kind in (m.Revoke, m.PresenceReport, m.Watch, m.Typing):
        # Tokens; presence rows; reads of contacts and members only (a
        # contact made by a Send of the same batch counts from the next one).
        return frozenset()
    return None


def group_of(msg) -> tuple[str, bool] | None:
    """The group whose row `msg` locks, if any, and whether it writes to
    the members' inboxes (and so locks their user rows too)."""
    kind = type(msg)
    if kind is m.Send:
        return (msg.to, True) if is_group(msg.to) else None
    if kind is m.Read:
        return (msg.peer, False) if is_group(msg.peer) else None
    if kind in (m.GroupCreate, m.GroupAdd, m.GroupRemove, m.GroupTitle):
        return msg.group, True
    if kind is m.GroupGet:
        return msg.group, False
    return None


def group_users(key: str, msg) -> Sequence[str]:
    """The users a group change from `key` names, whose rows it locks
    besides its group's members."""
    kind = type(msg)
    if kind is m.GroupCreate:
        return [key, *msg.members]
    if kind in (m.GroupAdd, m.GroupRemove):
        return msg.users
    return ()


def _step(indices, fn, *args):
    """Run one store step of a batch; its failure names the requests it served."""
    try:
        return fn(*args)
    except Exception as exc:
        raise StepFailed(indices, exc) from exc


class _SendBatch:
    """What one transaction has learnt of Sends and seqs, so each cmid and
    each user's seq is read once however many runs the batch has."""

    def __init__(self, store: Store):
        self.store = store
        self.sent: dict[tuple[str, bytes], SentRecord | None] = {}  # None: looked up, not stored
        self.seqs: dict[str, int] = {}  # max_seq of the existing users looked up

    def lock_rows(self, requests: Sequence[Request]) -> None:
        """Lock (on Postgres) the rows the batch will write, before anything
        else and in the one order of every transaction (store/postgres.py):
        the rows of the groups it touches, then the seq rows of every user it
        will write (the members of the groups it writes to included), each
        set at once and in id order. Two workers' batches then wait for each other instead of
        deadlocking, and a cmid retried through another worker is looked up
        only once the batch that stored it has committed."""
        everyone = range(len(requests))
        users = set()
        for req in requests:
            users.update(users_touched(req.key, req.msg) or (), group_users(req.key, req.msg))
        groups: dict[str, bool] = {}  # group -> whether its members' rows are locked too
        for req in requests:
            if found := group_of(req.msg):
                groups[found[0]] = groups.get(found[0], False) or found[1]
        if groups:
            for group in _step(everyone, self.store.lock_groups, groups):
                if groups[group]:
                    users.update(mb.user for mb in _step(everyone, self.store.group_members, group) if mb.active)
        if users:
            self.seqs.update(_step(everyone, self.store.user_seqs, sorted(users)))

    def look_up(self, run: list[int], keys: list[tuple[str, bytes]], users: set[str]) -> None:
        new_keys = [k for k in set(keys) if k not in self.sent]
        if new_keys:
            found = _step(run, self.store.find_sends, new_keys)
            for k in new_keys:
                self.sent[k] = found.get(k)
        new_users = [u for u in users if u not in self.seqs]
        if new_users:
            self.seqs.update(_step(run, self.store.user_seqs, new_users))


class IMService(GroupService):
    def __init__(self, store: Store, token_ttl_ms: int, max_frame: int, max_group_members: int = MAX_GROUP_MEMBERS,
                 push_delay_ms: int | None = None,
                 max_groups_per_user: int = LimitsConfig.max_groups_per_user):
        self.store = store
        self.max_group_members = max_group_members
        self.max_groups_per_user = max_groups_per_user
        self.token_ttl_ms = token_ttl_ms
        self.max_items_bytes = max_frame - FRAME_OVERHEAD
        # With the push service on: each new message to someone else queues a
        # push job, due push_delay_ms after it (docs/push.md), in its own
        # transaction. push_due_ms is the earliest due time queued since the
        # shell last took it (to wake the push service after the commit).
        self.push_delay_ms = push_delay_ms
        self.push_due_ms: int | None = None

    def handle(self, key: str, origin: bytes, msg, now_ms: int, prepared=None) -> Outcome:
        """One request from the user `key`. `prepared` is the result of the
        password work the shell ran off the loop: for a password Login whether
        it matched, for Register the new Argon2id hash."""
        if type(msg) is m.Send and not is_group(msg.to):
            return self.handle_batch([Request(key, origin, msg, prepared)], now_ms)[0]
        try:
            handler = self._handlers[type(msg)]
        except KeyError:
            return error(ErrorCode.BAD_REQUEST, f"not a request: {type(msg).__name__}")
        try:
            return handler(self, key, origin, msg, now_ms, prepared)
        except Refused as exc:
            return error(exc.code, exc.reason)

    def handle_batch(self, requests: Sequence[Request], now_ms: int,
                     alone: Container[int] = ()) -> list[Outcome]:
        """The outcome of each request, in order. A Send whose position is in
        `alone` is written on its own, so a failing write names it alone.
        Raises StepFailed when a store step raises."""
        outcomes: list = [None] * len(requests)
        batch = _SendBatch(self.store)
        batch.lock_rows(requests)
        run: list[int] = []
        run_users: set[str] = set()
        for i, req in enumerate(requests):
            one_to_one = type(req.msg) is m.Send and not is_group(req.msg.to)
            if one_to_one and i not in alone:
                run.append(i)
                run_users.update((req.key, req.msg.to))
                continue
            touched = users_touched(req.key, req.msg)
            if run and (touched is None or not run_users.isdisjoint(touched)):
                self._write_sends(batch, requests, run, outcomes, now_ms)
                run, run_users = [], set()
            if one_to_one:
                self._write_sends(batch, requests, [i], outcomes, now_ms)
            else:
                outcomes[i] = _step([i], self.handle, req.key, req.origin, req.msg, now_ms, req.prepared)
                if touched is None:
                    # It may have written inboxes (a group's) and cmids:
                    # what the batch learnt of seqs and Sends is stale.
                    batch = _SendBatch(self.store)
        if run:
            self._write_sends(batch, requests, run, outcomes, now_ms)
        return outcomes

    def _write_sends(self, batch: _SendBatch, requests: Sequence[Request], run: list[int],
                     outcomes: list, now_ms: int) -> None:
        """Decide and write the Sends at positions `run` (in arrival order)."""
        keys = [(requests[i].key, bytes(requests[i].msg.cmid)) for i in run]
        batch.look_up(run, keys, {u for i in run for u in (requests[i].key, requests[i].msg.to)})
        planned: dict[tuple[str, bytes], tuple] = {}  # (sender, cmid) -> content, for the run's new ones
        fresh: list[int] = []
        retries: list[int] = []
        for i, send_key in zip(run, keys):
            sender, msg = requests[i].key, requests[i].msg
            content = (msg.to, msg.kind, bytes(msg.body))
            earlier = batch.sent.get(send_key)
            seen = (earlier.to, earlier.kind, bytes(earlier.body)) if earlier else planned.get(send_key)
            if seen is not None:
                # The same cmid again, from an earlier batch or earlier in
                # this one: a retry if it is the same message.
                if seen != content:
                    outcomes[i] = error(ErrorCode.BAD_REQUEST, "cmid already used for a different message")
                else:
                    retries.append(i)
                continue
            missing = [u for u in (msg.to, sender) if u not in batch.seqs]
            if missing:
                outcomes[i] = error(ErrorCode.NO_SUCH_USER, f"no such user: {missing[0]}")
                continue
            planned[send_key] = content
            fresh.append(i)
        if fresh:
            stored = []
            for i, msg_id in zip(fresh, _step(run, self.store.new_msg_ids, len(fresh))):
                sender, msg = requests[i].key, requests[i].msg
                recipient_seq = batch.seqs[msg.to] = batch.seqs[msg.to] + 1
                if msg.to == sender:
                    sender_seq = recipient_seq
                else:
                    sender_seq = batch.seqs[sender] = batch.seqs[sender] + 1
                new = NewMessage(msg_id, sender, msg.to, msg.kind, now_ms, bytes(msg.cmid), bytes(msg.body),
                                 sender_seq, recipient_seq)
                stored.append(new)
                batch.sent[(sender, new.cmid)] = SentRecord(msg_id, sender_seq, now_ms, msg.to, msg.kind,
                                                            new.body, recipient_seq)
            _step(run, self.store.add_messages, stored)
            _step(run, self.queue_pushes, now_ms,
                  [(n.msg_id, n.to, n.recipient_seq) for n in stored if n.to != n.sender])
        # Every new one, and every retry: answer the stored SendOk and publish
        # the copies (again, for a retry, because its first attempt may have
        # died between its commit and its publish; gates push each inbox seq
        # once, so nobody sees it twice).
        for i in sorted(fresh + retries):
            sender, origin, msg = requests[i][:3]
            rec = batch.sent[(sender, bytes(msg.cmid))]
            outcomes[i] = self._sent(sender, origin, msg, rec.msg_id, rec.ts_ms, rec.sender_seq, rec.recipient_seq)

    def queue_pushes(self, now_ms: int, copies: Sequence[tuple[int, str, int]]) -> None:
        """The one way push jobs are written: one for each copy (msg_id, user,
        inbox seq) of a message stored now, due push_delay_ms later, in the
        current transaction; nothing while the push service is off. Callers
        pass the copies of the recipients to wake: a one-to-one message's
        recipient, a group message's members but its sender, never a group
        event's (GroupService._write_events queues none: events wake no
        phone)."""
        if self.push_delay_ms is None or not copies:
            return
        due = now_ms + self.push_delay_ms
        self.store.add_push_jobs([PushJobRow(msg_id, user, seq, now_ms, due) for msg_id, user, seq in copies])
        self.push_due_ms = due if self.push_due_ms is None else min(due, self.push_due_ms)

    def take_push_due(self) -> int | None:
        """The earliest due time of the push jobs queued since the last call
        (None: none). Asked after the commit; a rolled-back batch only makes
        a spurious wake-up."""
        due, self.push_due_ms = self.push_due_ms, None
        return due

    # -- accounts -----------------------------------------------------------

    def _register(self, key, origin, msg: m.Register, now_ms, work: RegisterWork) -> Outcome:
        if key != msg.user or not isinstance(work, RegisterWork):
            raise Refused(ErrorCode.BAD_REQUEST, "routing key does not match the user")
        # A repeated Register with the same password is the same request
        # delivered again (requests are redelivered when a worker dies): Ok.
        if work.same_password:
            return Outcome(m.Ok())
        if work.pw_hash is None or not self.store.create_user(msg.user, work.pw_hash, now_ms):
            return error(ErrorCode.EXISTS, f"user exists: {msg.user}")
        return Outcome(m.Ok())

    def _login(self, key, origin, msg: m.Login, now_ms, prepared) -> Outcome:
        if key != msg.user:
            raise Refused(ErrorCode.BAD_REQUEST, "routing key does not match the user")
        if msg.token:
            ok = self.store.check_token(msg.user, token_hash(msg.token), now_ms)
        else:
            ok = prepared is True
        if not ok:
            return error(ErrorCode.AUTH_FAILED, "wrong user, password or token")
        token = secrets.token_bytes(TOKEN_BYTES)
        self.store.add_token(msg.user, token_hash(token), msg.device, now_ms + self.token_ttl_ms)
        reply = m.LoginOk(user=msg.user, session=origin, token=token,
                          max_seq=self.store.max_seq(msg.user), server_ms=now_ms)
        notices = ()
        if msg.device:
            # Other gates kick the older session of this user and device.
            notices = (Notice(msg.user, origin, m.SessionStarted(user=msg.user, device=msg.device,
                                                                  session=origin)),)
        return Outcome(reply, notices)

    def _revoke(self, key, origin, msg: m.Revoke, now_ms, prepared) -> Outcome:
        self.store.revoke_token(token_hash(msg.token))
        return Outcome(m.Ok())

    # -- messages -----------------------------------------------------------

    @staticmethod
    def _sent(sender, origin, msg: m.Send, msg_id, ts_ms, sender_seq, recipient_seq) -> Outcome:
        reply = m.SendOk(msg_id=msg_id, seq=sender_seq, ts_ms=ts_ms)

        def copy_for(seq):
            return m.NewMsg(msg=m.Msg(msg_id=msg_id, seq=seq, sender=sender, to=msg.to,
                                      kind=msg.kind, ts_ms=ts_ms, cmid=msg.cmid, body=msg.body))
        if msg.to == sender:
            return Outcome(reply, (Notice(sender, origin, copy_for(sender_seq)),))
        return Outcome(reply, (Notice(msg.to, b"", copy_for(recipient_seq)),
                               Notice(sender, origin, copy_for(sender_seq))))

    def _sync(self, user, origin, msg: m.Sync, now_ms, prepared) -> Outcome:
        msgs, more = self.store.sync(user, msg.since, clamp_sync_limit(msg.limit), self.max_items_bytes)
        self.store.raise_delivered(user, msg.since)
        return Outcome(m.Batch(msgs=msgs, more=more))

    def _catchup(self, user, origin, msg: m.Catchup, now_ms, prepared) -> Outcome:
        msgs, more = self.store.sync(user, msg.since, clamp_sync_limit(msg.limit), self.max_items_bytes)
        return Outcome(m.Batch(msgs=msgs, more=more))

    def _read(self, reader, origin, msg: m.Read, now_ms, prepared) -> Outcome:
        store = self.store
        if is_group(msg.peer):
            return self._group_read(reader, origin, msg, now_ms)
        if msg.peer != reader and not store.user_exists(msg.peer):
            raise Refused(ErrorCode.NO_SUCH_USER, f"no such user: {msg.peer}")
        if not store.conversation_of(reader, msg.peer, msg.msg_id):
            raise Refused(ErrorCode.BAD_REQUEST, "msg_id is not in this conversation")
        if not store.raise_read_mark(reader, msg.peer, msg.msg_id):
            return Outcome(m.Ok())
        notice = m.ReadNotice(reader=reader, peer=msg.peer, msg_id=msg.msg_id, ts_ms=now_ms)
        if msg.peer == reader:
            return Outcome(m.Ok(), (Notice(reader, origin, notice),))
        return Outcome(m.Ok(), (Notice(msg.peer, b"", notice), Notice(reader, origin, notice)))

    # -- groups (simzmq/groups.py decides) ----------------------------------------

    def _group_read(self, reader, origin, msg: m.Read, now_ms) -> Outcome:
        # A group that does not exist, or whose entry never reached the
        # reader: the same answer (msg_id not in this conversation).
        if not self.store.conversation_of(reader, msg.peer, msg.msg_id):
            raise Refused(ErrorCode.BAD_REQUEST, "msg_id is not in this conversation")
        if not self.store.raise_read_mark(reader, msg.peer, msg.msg_id):
            return Outcome(m.Ok())
        notice = m.ReadNotice(reader=reader, peer=msg.peer, msg_id=msg.msg_id, ts_ms=now_ms)
        others = [user for user in self.group_readers(msg.peer) if user != reader]
        return Outcome(m.Ok(), tuple(Notice(user, b"", notice) for user in others)
                       + (Notice(reader, origin, notice),))

    def _group_request(self, actor, origin, msg, now_ms, prepared) -> Outcome:
        """GroupCreate, GroupAdd, GroupRemove, GroupTitle, GroupGet, and a
        Send to a group. Events reach every session of their recipients, the
        actor's own connection included; a group message every member's
        sessions but the one that sent it.

        Offline pushes: group_send queues a push job for each member but
        the sender (queue_pushes), like a one-to-one message's; an event
        never queues one."""
        if type(msg) is m.Send:
            if not is_group(msg.to):
                raise Refused(ErrorCode.BAD_REQUEST, "not a group")
            reply, copies = self.group_send(actor, msg, now_ms)
            return Outcome(reply, tuple(Notice(user, origin if user == actor else b"", copy)
                                        for user, copy in copies))
        reply, events = self._group_handlers[type(msg)](self, actor, msg, now_ms)
        return Outcome(reply, tuple(Notice(user, b"", event) for user, event in events))

    _group_handlers = {
        m.GroupCreate: GroupService.group_create,
        m.GroupAdd: GroupService.group_add,
        m.GroupRemove: GroupService.group_remove,
        m.GroupTitle: GroupService.group_title,
        m.GroupGet: GroupService.group_get,
    }

    def _convs(self, user, origin, msg: m.Convs, now_ms, prepared) -> Outcome:
        convs = self.store.conversations(user)
        room = self.max_items_bytes
        kept = []
        for conv in convs:
            room -= 4 + len(conv.peer.encode()) + 20
            if room < 0:
                break
            kept.append(conv)
        return Outcome(m.ConvList(convs=kept))

    def _history(self, key, origin, msg: m.History, now_ms, prepared) -> Outcome:
        user = self.store.token_user(token_hash(msg.token), now_ms)
        if user is None:
            raise Refused(ErrorCode.AUTH_FAILED, "invalid or expired token")
        msgs, more = self.store.history(user, msg.peer, msg.before, clamp_history_limit(msg.limit))
        return Outcome(m.HistoryPage(msgs=msgs, more=more))

    # -- presence and typing (simzmq/presence.py) -----------------------------------

    def _states(self, users, now_ms: int | None) -> dict[str, int]:
        """Each user's state from the gates whose lease holds at now_ms (None: every gate stored)."""
        found = self.store.presence_of(users, now_ms)
        return {u: pr.combine(found.get(u, ())) for u in users}

    def _presence_report(self, gate, origin, msg: m.PresenceReport, now_ms, prepared) -> Outcome:
        """A gate's report: store its users' local states under its lease,
        forget the gates whose lease ran out, and tell the watchers (through
        each user's topic) of every user whose state this changed."""
        try:
            report = parse_report(bytes(msg.report))
            states, covered, ttl_ms = pr.local_report(report)
        except (BadReport, pr.BadLocalReport) as exc:
            raise Refused(ErrorCode.BAD_REQUEST, f"bad presence report: {exc}") from None
        gate = report["gate"]
        store = self.store
        if not store.renew_presence_gate(gate, report["n"], now_ms + ttl_ms):
            return Outcome(m.Ok())  # a late copy: a later report was applied
        # A snapshot part is compared with the gate's rows in its span, any
        # other report only with the rows of the users it names.
        current = (store.gate_presence(gate, states) if covered is None
                   else store.gate_presence(gate, low=covered.low, high=covered.high))
        changes = pr.local_changes(current, states, covered)
        expired = [g for g in store.expired_presence_gates(now_ms) if g != gate]
        affected = sorted(set(changes).union(*(store.gate_presence(g) for g in expired)))
        # From here to the commit no other worker changes these users'
        # states, so before and after are the states the watchers were told
        # and will be told: each change is published by one worker, once.
        store.lock_presence(affected)
        # Before: as the watchers were last told, the expired gates included
        # (every gate whose lease ran out is among them, so: every gate).
        before = self._states(affected, None)
        store.drop_presence_gates(expired, expired_at=now_ms)
        if report["op"] == "bye":
            store.drop_presence_gates([gate])
        else:
            store.save_presence(gate, changes)
        if not affected:
            return Outcome(m.Ok())
        changed = pr.changed_users(before, self._states(affected, now_ms))
        unseen = [u for u, (old, new) in changed.items() if pr.seen(old) and not pr.seen(new)]
        # Not in the users row (store.lock_presence): a batch holding that
        # row may be waiting for the presence lock this transaction holds.
        store.set_last_seen(unseen, now_ms)
        last_seen = store.last_seen([u for u, (_, new) in changed.items() if not pr.seen(new)])
        return Outcome(m.Ok(), tuple(
            Notice(user, b"", m.PresenceNotice(state=m.Presence(
                user=user, state=new, last_seen_ms=pr.shown_last_seen(new, last_seen.get(user, 0), now_ms))))
            for user, (_, new) in sorted(changed.items()) if user in last_seen or pr.seen(new)))

    def _watch(self, viewer, origin, msg: m.Watch, now_ms, prepared) -> Outcome:
        """The states of `msg.users` as `viewer` may see them: each one's
        own, and that of users who have written to it; 0 for anyone else,
        for ids of no user and for groups."""
        ids = list(dict.fromkeys(msg.users))  # each once, in the order asked
        allowed = self.store.written_to(viewer, [u for u in ids if u != viewer and not is_group(u)])
        if viewer in ids:
            allowed.add(viewer)
        last_seen = self.store.last_seen(allowed)  # the ones that exist
        states = self._states(list(last_seen), now_ms)
        return Outcome(m.PresenceList(states=[
            m.Presence(user=u, state=states[u], last_seen_ms=pr.shown_last_seen(states[u], last_seen[u], now_ms))
            if u in last_seen else m.Presence(user=u) for u in ids]))

    def _typing(self, sender, origin, msg: m.Typing, now_ms, prepared) -> Outcome:
        """Typing notices, never stored: to a user who has written to the
        sender, or to the other current members of a group the sender is in."""
        notice = m.TypingNotice(user=sender, peer=msg.peer, typing=msg.typing)
        if is_group(msg.peer):
            members = [mb.user for mb in self.store.group_members(msg.peer) if mb.active]
            if sender not in members:
                return Outcome(m.Ok())
            return Outcome(m.Ok(), tuple(Notice(u, b"", notice) for u in members if u != sender))
        if msg.peer == sender or not self.store.written_to(sender, [msg.peer]):
            return Outcome(m.Ok())
        return Outcome(m.Ok(), (Notice(msg.peer, b"", notice),))

    _handlers = {
        m.Register: _register,
        m.Login: _login,
        m.Revoke: _revoke,
        m.Sync: _sync,
        m.Catchup: _catchup,
        m.Read: _read,
        m.Convs: _convs,
        m.History: _history,
        m.PresenceReport: _presence_report,
        m.Watch: _watch,
        m.Typing: _typing,
        m.Send: _group_request,  # one-to-one Sends go through handle_batch
        m.GroupCreate: _group_request,
        m.GroupAdd: _group_request,
        m.GroupRemove: _group_request,
        m.GroupTitle: _group_request,
        m.GroupGet: _group_request,
    }
