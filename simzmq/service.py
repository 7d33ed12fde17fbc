"""The IM service: what each request does to the store, and who hears of it.

No sockets, no clock: the worker shell (simzmq/im.py) passes the time in and
sends what this returns. Every method runs inside the caller's transaction, so
a reply and its notifications only leave after the commit.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import NamedTuple

from simzmq.store.base import Store, UnknownUser, clamp_history_limit, clamp_sync_limit
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode

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


class Refused(Exception):
    """A request that gets an Error and changes nothing."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def token_hash(token: bytes) -> bytes:
    # Tokens are 32 random bytes, so a fast hash suffices: nothing to brute-force.
    return hashlib.sha256(token).digest()


def error(code: ErrorCode, reason: str) -> Outcome:
    return Outcome(m.Error(code=int(code), reason=reason[:256]))


class IMService:
    def __init__(self, store: Store, token_ttl_ms: int, max_frame: int):
        self.store = store
        self.token_ttl_ms = token_ttl_ms
        self.max_items_bytes = max_frame - FRAME_OVERHEAD

    def handle(self, key: str, origin: bytes, msg, now_ms: int, prepared=None) -> Outcome:
        """One request from the user `key`. `prepared` is the result of the
        password work the shell ran off the loop: for a password Login whether
        it matched, for Register the new Argon2id hash."""
        try:
            handler = self._handlers[type(msg)]
        except KeyError:
            return error(ErrorCode.BAD_REQUEST, f"not a request: {type(msg).__name__}")
        try:
            return handler(self, key, origin, msg, now_ms, prepared)
        except Refused as exc:
            return error(exc.code, exc.reason)

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

    def _send(self, sender, origin, msg: m.Send, now_ms, prepared) -> Outcome:
        store = self.store
        earlier = store.find_send(sender, msg.cmid)
        if earlier is not None:
            if (earlier.to, earlier.kind, bytes(earlier.body)) != (msg.to, msg.kind, msg.body):
                raise Refused(ErrorCode.BAD_REQUEST, "cmid already used for a different message")
            # A retry: answer the first SendOk and publish again, because the
            # first attempt may have died between its commit and its publish.
            # Gates push each inbox seq once, so nobody sees it twice.
            return self._sent(sender, origin, msg, earlier.msg_id, earlier.ts_ms,
                              earlier.sender_seq, earlier.recipient_seq)
        try:
            done = store.append_message(sender, msg.to, msg.cmid, msg.kind, msg.body, now_ms)
        except UnknownUser:
            raise Refused(ErrorCode.NO_SUCH_USER, f"no such user: {msg.to}") from None
        return self._sent(sender, origin, msg, done.msg_id, done.ts_ms, done.sender_seq, done.recipient_seq)

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

    _handlers = {
        m.Register: _register,
        m.Login: _login,
        m.Revoke: _revoke,
        m.Send: _send,
        m.Sync: _sync,
        m.Catchup: _catchup,
        m.Read: _read,
        m.Convs: _convs,
        m.History: _history,
    }
