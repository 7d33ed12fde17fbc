"""The gate's fan-out: who is online here, and what each user is pushed.

Per online user: their sessions (one subscription to the bus while there is
at least one), which inbox seqs were already pushed (each goes out once,
PushLog), and whether a catch-up from the store is under way. Notifications
from the bus come in through on_notification(); a resync (the bus link lost
notifications) or a hole in a user's seqs that stays open starts a catch-up.
The time and timers come from the `gate` host, like for the sessions.

Presence and typing (simzmq/presence.py decides): the gate reports each
change of a user's local state, pushes PresenceNotice to the connections
watching a user that may see it, asks the workers again for the states a
connection watches when notices may have been lost (a resync) or a watched
user has just made the watcher its contact (its first one-to-one message
to it passes here), and passes TypingNotice to the user's sessions. The
states asked again on a resync go a few requests at a time
(simzmq/watchresync.py): after a failover every watching connection asks.

Group read receipts (protocol section 7, "Reading"): a member is sent at
most one ReadNotice per reader and group a second, the latest
(simzmq/readthin.py decides; a timer sends what it held when the second
ends). The reader's own other sessions get every one of its notices: they
are at most max_sessions_per_user, not members x reads, and they show the
reader's own unread counts, which should follow its reading at once.
One-to-one ReadNotices are not thinned either.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from prometheus_client import Counter, Gauge

from simzmq import presence as pr
from simzmq.pushlog import PushLog
from simzmq.readthin import ReadThinner
from simzmq.watchresync import WatchResync
from simzmq.wire import messages as m
from simzmq.wire.codec import BIN, bin_newmsg_seq
from simzmq.wire.errors import ProtocolError
from simzmq.wire.messages import KickCode
from simzmq.wire.rules import is_group

log = logging.getLogger("simzmq.gate")

SESSIONS = Gauge("simzmq_gate_sessions", "Logged-in client connections")
PRESENCE_QUERIES = Counter("simzmq_gate_presence_queries_total",
                           "Watch requests the gate sent itself to ask the workers again for states a connection "
                           "watches, by why",
                           ["why"])
WATCHED = Gauge("simzmq_gate_watched_users", "Users watched by at least one connection on this gate")
CATCHUPS = Counter("simzmq_gate_catchups_total", "Catch-ups of an online user from the store")
# What the bus may push to a client.
PUSHED = frozenset((m.NewMsg.TYPE, m.ReadNotice.TYPE, m.TypingNotice.TYPE))
HOLES = Counter("simzmq_gate_push_holes_total", "Lost pushes noticed by a hole in a user's seqs")
READS_THINNED = Counter("simzmq_gate_read_notices_thinned_total",
                        "Group ReadNotices not pushed to a member: a later one of the same reader in the same "
                        "group went instead (at most one a second), or it was below one already pushed")


# Catch-ups from the store under way at once, per gate: after a failover the
# gate catches up every online user, and tens of thousands of Catchup requests
# at once would queue the clients' own requests behind them at the broker.
CATCHUPS_IN_FLIGHT = 64


class Fanout:
    def __init__(self, gate):
        self.gate = gate
        self.sessions: dict[str, dict[bytes, object]] = {}  # user -> session id -> ClientConnection
        self.pushlogs: dict[str, PushLog] = {}
        self.catching_up: dict[str, bool] = {}  # user -> go again when the one under way ends
        # Catch-ups waiting for a place (at most CATCHUPS_IN_FLIGHT under way):
        # after a failover every online user is caught up. An OrderedDict, so
        # the next in turn is found at once (a dict scans past the ones taken).
        self.catchups_waiting: OrderedDict[str, None] = OrderedDict()
        # Logins under way per user: they count towards max_sessions_per_user.
        self.logins_pending: dict[str, int] = {}
        self._hole_timer = None
        self.read_thinner = ReadThinner()
        self._read_timer = None
        self.watch_resync = WatchResync()

    def count(self) -> int:
        return sum(len(s) for s in self.sessions.values())

    # -- sessions ---------------------------------------------------------------

    def sessions_full(self, user: str, device: str) -> bool:
        """Whether a Login for `user` would be one session too many here. A
        Login that replaces a session of the same device does not add one."""
        mine = self.sessions.get(user, {})
        if device and any(c.device == device for c in mine.values()):
            return False
        return self.gate.limiter.sessions_full(len(mine) + self.logins_pending.get(user, 0))

    def login_started(self, user: str) -> None:
        self.logins_pending[user] = self.logins_pending.get(user, 0) + 1

    def login_ended(self, user: str) -> None:
        n = self.logins_pending.get(user, 0) - 1
        if n > 0:
            self.logins_pending[user] = n
        else:
            self.logins_pending.pop(user, None)

    def session_started(self, conn, max_seq: int) -> None:
        mine = self.sessions.setdefault(conn.user, {})
        if not mine:
            self.gate.backend.subscribe(conn.user)
            self.pushlogs[conn.user] = PushLog()
        # The client syncs up to max_seq itself; pushes start above it.
        self.pushlogs[conn.user].raise_watermark(max_seq)
        mine[conn.session] = conn
        SESSIONS.inc()
        self.gate.presence.set_session(conn, conn.user, pr.ONLINE)
        self._report_session("start", conn)
        # After adding this one: the user stays online (and subscribed) while
        # the sessions it replaces end.
        if conn.device:
            for other in list(mine.values()):
                if other is not conn and other.device == conn.device:
                    other.kick(KickCode.REPLACED, "logged in elsewhere with the same device")

    def session_ended(self, conn) -> None:
        mine = self.sessions.get(conn.user)
        if mine is None or mine.pop(conn.session, None) is None:
            return
        SESSIONS.dec()
        self.unwatch(conn, None)
        self.gate.presence.set_session(conn, conn.user, pr.NONE)
        self._report_session("end", conn)
        if not mine:
            del self.sessions[conn.user]
            self.pushlogs.pop(conn.user, None)
            self.gate.backend.unsubscribe(conn.user)

    # -- presence ------------------------------------------------------------------

    def _report_session(self, op: str, conn) -> None:
        # No reporter before the gate has started (tests drive a gate that never does).
        if self.gate.reporter is not None:
            self.gate.reporter.session(op, conn.user, conn.session, self.gate.presence.local(conn.user))

    def set_presence(self, conn, state: int) -> None:
        changed = self.gate.presence.set_session(conn, conn.user, state)
        if changed is not None and self.gate.reporter is not None:
            self.gate.reporter.state(conn.user, changed)

    def watch(self, conn, users: list[str]) -> list[str]:
        """Watch `users` on `conn` (subscribing to those new on this gate);
        returns the ids new to `conn`, for unwatch() if the answer fails."""
        added, first = self.gate.presence.watch(conn, users)
        for user in first:
            self.gate.backend.subscribe(user)
        WATCHED.set(len(self.gate.presence.watchers))
        return added

    def unwatch(self, conn, users: list[str] | None) -> None:
        for user in self.gate.presence.unwatch(conn, users):
            self.gate.backend.unsubscribe(user)
        WATCHED.set(len(self.gate.presence.watchers))

    def presence_answered(self, conn, states) -> list:
        """The states of a worker's answer that `conn` still watches."""
        return self.gate.presence.answered(conn, states)

    def ask_presence(self, conn, users: list[str], why: str) -> None:
        """Ask the workers for the states of `users` as `conn` may see them,
        and push each to it as a PresenceNotice."""
        per_request = self.gate.presence.max_per_request
        for start in range(0, len(users), per_request):
            self._ask_watch(conn, users[start:start + per_request], why)

    def _ask_watch(self, conn, users: list[str], why: str, then=None) -> None:
        """One Watch request for `users` (at most max_per_request) of
        `conn`; `then()` runs once it is answered or timed out."""
        PRESENCE_QUERIES.labels(why).inc()

        def answered(reply_payload):
            try:
                self._push_presence(conn, reply_payload)
            finally:
                if then is not None:
                    then()
        self.gate.backend.request(conn.user.encode(), conn.session, BIN.encode(m.Watch(users=users), 0), answered)

    def _push_presence(self, conn, reply_payload) -> None:
        if reply_payload is None:
            return
        try:
            _, reply = BIN.decode(reply_payload)
        except ProtocolError as exc:
            self._undecodable(conn.user, exc)
            return
        if not isinstance(reply, m.PresenceList):
            return  # unavailable: a later resync or Watch asks again
        for state in self.presence_answered(conn, reply.states):
            notice = m.PresenceNotice(state=state)
            conn.push(BIN.encode(notice, 0), m.PresenceNotice.TYPE, lambda n=notice: n)

    def _resync_watches(self, watchers: dict) -> None:
        """Ask again for the states `watchers` (conn -> users) watch, paced."""
        pacer = self.watch_resync
        started = False
        for conn, users in watchers.items():
            started |= pacer.add(conn, users)
        if started:
            log.info("presence resync: asking again for what %d connections watch, at most %d requests in flight",
                     pacer.connections, pacer.max_in_flight)
        self._next_watches()

    def _next_watches(self) -> None:
        pacer = self.watch_resync
        presence = self.gate.presence
        for conn, users in pacer.take(presence.max_per_request, lambda conn: presence.watching.get(conn, {})):
            self._ask_watch(conn, users, "resync", self._watch_answered)
        if pacer.finished():
            log.info("presence resync done: %d Watch requests for %d connections, %d connections closed meanwhile",
                     pacer.requests, pacer.connections, pacer.skipped)

    def _watch_answered(self) -> None:
        self.watch_resync.done()
        self._next_watches()

    def _became_contact(self, user: str, decoded) -> None:
        """`user` got a NewMsg: if it is a one-to-one message from someone a
        connection of `user` watches unseen, that someone has just made
        `user` its contact, and may be seen now."""
        presence = self.gate.presence
        hidden = {conn: presence.hidden_from(conn) for conn in self.sessions.get(user, {}).values()}
        hidden = {conn: ids for conn, ids in hidden.items() if ids}
        if not hidden:
            return
        try:
            msg = decoded().msg
        except ProtocolError:
            return
        if msg.to != user or msg.sender == user:
            return
        for conn, ids in hidden.items():
            if msg.sender in ids:
                self.ask_presence(conn, [msg.sender], "contact")

    # -- notifications from the bus ---------------------------------------------

    def _undecodable(self, user: str, exc) -> None:
        self.gate.log_throttled("backend", "undecodable notification for %s: %s", user, exc, level=logging.WARNING)

    def on_notification(self, topic: bytes, origin: bytes, payload: bytes) -> None:
        user = topic[:-1].decode("utf-8", "replace")
        if len(payload) < 5:
            return
        mtype = payload[0]
        if mtype == m.PresenceNotice.TYPE:
            # For whoever watches `user` here and may see it (users watched
            # are subscribed to, online here or not).
            self._push_all(self.gate.presence.notice_targets(user), payload, mtype, b"")
            return
        mine = self.sessions.get(user)
        if not mine:
            return
        if mtype == m.SessionStarted.TYPE:
            try:
                _, started = BIN.decode(payload)
            except ProtocolError as exc:
                self._undecodable(user, exc)
                return
            if started.device:
                for conn in list(mine.values()):
                    if conn.session != started.session and conn.device == started.device:
                        conn.kick(KickCode.REPLACED, "logged in elsewhere with the same device")
            return
        if mtype not in PUSHED:
            # Only these are pushed: nothing internal reaches a client.
            self.gate.log_throttled("backend", "not pushing a notification of type %d to %s", mtype, user,
                                    level=logging.WARNING)
            return
        if mtype == m.ReadNotice.TYPE and not self._read_notice_goes_now(user, payload):
            return
        if mtype == m.NewMsg.TYPE:
            try:
                seq = bin_newmsg_seq(payload)  # read at its offset: bin clients get the payload as it is
            except ProtocolError as exc:
                self._undecodable(user, exc)
                return
            if not self.pushlogs[user].first_time(seq, self.gate.now()):
                return
        decoded = self._push_all(list(mine.values()), payload, mtype, origin)
        if mtype == m.NewMsg.TYPE and self.gate.presence.watching:
            self._became_contact(user, decoded)

    def _read_notice_goes_now(self, user: str, payload: bytes) -> bool:
        """Whether a ReadNotice for `user` goes to its sessions now; a group
        one to a member other than its reader may be held for a while
        (flush_reads sends it) or dropped for a later one."""
        try:
            _, notice = BIN.decode(payload)
        except ProtocolError as exc:
            self._undecodable(user, exc)
            return False
        if not is_group(notice.peer) or notice.reader == user:
            return True
        now = self.gate.now()
        goes, thinned = self.read_thinner.offer((user, notice.peer, notice.reader), notice.msg_id, payload, now)
        READS_THINNED.inc(thinned)
        if self._read_timer is None:
            self._arm_read_timer(now)
        return goes is not None

    def flush_reads(self) -> None:
        """Send the group ReadNotices held whose second has ended."""
        self._read_timer = None
        now = self.gate.now()
        for (user, _, _), payload in self.read_thinner.due(now):
            mine = self.sessions.get(user)
            if mine:
                self._push_all(list(mine.values()), payload, m.ReadNotice.TYPE, b"")
        self._arm_read_timer(now)

    def _arm_read_timer(self, now: float) -> None:
        # One timer, at the earliest moment something held may go or a key
        # be forgotten; it runs while the thinner tracks anything.
        due = self.read_thinner.next_due()
        if due is not None:
            self._read_timer = self.gate.call_later(max(0.0, due - now), self.flush_reads)

    @staticmethod
    def _push_all(conns, payload: bytes, mtype: int, origin: bytes):
        """Push to `conns` but the one `origin` names; returns the decoder
        of the payload (for clients of another codec: decoded once, on first
        need)."""
        cache = []

        def decoded():
            if not cache:
                cache.append(BIN.decode(payload)[1])
            return cache[0]
        for conn in conns:
            if conn.session != origin:
                conn.push(payload, mtype, decoded)
        return decoded

    # -- catching up from the store ----------------------------------------------

    def resync(self, user: str | None) -> None:
        """Catch `user` (None: every online user) up from the store: push
        every message above what this gate pushed to them. Presence notices
        to them may have been lost too: the states their watchers watch are
        asked again and pushed."""
        for u in ([user] if user is not None else list(self.sessions)):
            if u in self.sessions:
                self._catch_up(u)
        self._resync_watches(self.gate.presence.watchers_of(None if user is None else [user]))

    def _catch_up(self, user: str) -> None:
        if user in self.catching_up:
            self.catching_up[user] = True  # go again when the one under way ends
            return
        if len(self.catching_up) >= CATCHUPS_IN_FLIGHT:
            self.catchups_waiting[user] = None  # in turn, once a place is free
            return
        self.catchups_waiting.pop(user, None)
        self.catching_up[user] = False
        log_ = self.pushlogs[user]
        CATCHUPS.inc()
        gate = self.gate

        def done(reply_payload):
            again = self.catching_up.pop(user, False)
            try:
                answered(reply_payload, again)
            finally:
                self._next_catch_ups()

        def answered(reply_payload, again):
            if user not in self.sessions:
                return
            batch = None
            if reply_payload is not None:
                try:
                    _, batch = BIN.decode(reply_payload)
                except ProtocolError as exc:
                    self._undecodable(user, exc)
            if not isinstance(batch, m.Batch):
                # Unavailable or refused: try once more, later.
                gate.call_later(gate.cfg.request_timeout_s / 5, self.resync, user)
                return
            now = gate.now()
            for msg in batch.msgs:
                # A push may kick the user's last session (a slow consumer),
                # which ends the user here: then there is no one left to push to.
                conns = self.sessions.get(user)
                if not conns:
                    return
                if log_.first_time(msg.seq, now):
                    push = m.NewMsg(msg=msg)
                    payload = BIN.encode(push, 0)
                    for conn in list(conns.values()):
                        conn.push(payload, m.NewMsg.TYPE, lambda: push)
            if batch.more or again:
                self._catch_up(user)

        gate.backend.request(user.encode(), b"", BIN.encode(m.Catchup(since=log_.watermark, limit=0), 0), done)

    def _next_catch_ups(self) -> None:
        """Start the waiting catch-ups there is room for (of users still here)."""
        while self.catchups_waiting and len(self.catching_up) < CATCHUPS_IN_FLIGHT:
            user = next(iter(self.catchups_waiting))
            del self.catchups_waiting[user]
            if user in self.sessions:
                self._catch_up(user)

    def check_holes(self) -> None:
        """A hole in a user's pushes that stays open means a push was lost
        (its worker died between commit and publish, say): catch up. Runs
        every half push_hole_timeout_ms until stop()."""
        now = self.gate.now()
        limit = self.gate.cfg.push_hole_timeout_ms / 1000
        for user, log_ in self.pushlogs.items():
            if log_.hole_open_for(now) > limit and user not in self.catching_up:
                HOLES.inc()
                log_.hole_since = now  # once per timeout, not on every check
                self._catch_up(user)
        self._hole_timer = self.gate.call_later(limit / 2, self.check_holes)

    def stop(self) -> None:
        for timer in (self._hole_timer, self._read_timer):
            if timer is not None:
                timer.cancel()
