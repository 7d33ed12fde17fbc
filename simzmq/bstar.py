"""Binary Star: the primary/backup failover state machine (zguide chapter 4).

Pure: time comes in as ``now`` (seconds, monotonic); nothing here reads a
clock or touches a socket. The transitions follow the reactor version,
``bstar.c``, which is the authority:

* a server becomes ACTIVE only when it sees a client request **and** cannot
  see its peer (the peer's state messages stopped arriving for longer than
  the peer expiry), or when the peer tells it that it is the one waiting;
* once ACTIVE, the only way out is death;
* two ACTIVE or two PASSIVE servers are a fatal configuration error and the
  server stops (:class:`DualActive`, :class:`DualPassive`) — with one
  departure from bstar.c: when both are ACTIVE, only the backup stops and the
  primary keeps serving (:meth:`BinaryStar.on_peer_state`).

The states a server publishes to its peer are the peer's events: a server in
state PRIMARY is seen by its peer as event PEER_PRIMARY, and so on.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    PRIMARY = "primary"   # primary, waiting for its peer
    BACKUP = "backup"     # backup, waiting for its peer
    ACTIVE = "active"     # serving clients
    PASSIVE = "passive"   # standing by, not serving


class Event(enum.Enum):
    PEER_PRIMARY = "primary"
    PEER_BACKUP = "backup"
    PEER_ACTIVE = "active"
    PEER_PASSIVE = "passive"
    CLIENT_REQUEST = "client_request"


PEER_EVENT = {
    State.PRIMARY: Event.PEER_PRIMARY,
    State.BACKUP: Event.PEER_BACKUP,
    State.ACTIVE: Event.PEER_ACTIVE,
    State.PASSIVE: Event.PEER_PASSIVE,
}


class BStarError(RuntimeError):
    """The pair is misconfigured or split; the server must stop."""


class DualActive(BStarError):
    """This server is ACTIVE and so says its peer: split brain."""


class DualPassive(BStarError):
    """This server is PASSIVE and so is its peer: nobody would serve."""


def step(state: State, event: Event, now: float, peer_expiry: float) -> tuple[State, bool]:
    """One transition: ``(new_state, accept_request)``.

    ``accept_request`` only means something for CLIENT_REQUEST: whether this
    server serves the request (True) or drops it so the client fails over
    (False). For peer events it is always False. ``peer_expiry`` is the time
    after which the peer counts as gone.
    """
    if event is Event.CLIENT_REQUEST:
        if state is State.ACTIVE:
            return state, True
        if state is State.PRIMARY or state is State.PASSIVE:
            # Only a client request may turn a server active, and only when
            # the peer has been silent long enough that it cannot be serving
            # (after a failover the backup may be active while we restart).
            if now >= peer_expiry:
                return State.ACTIVE, True
            return state, False
        # A lone backup never takes over: it must first have seen the
        # primary active, otherwise both could start serving.
        return state, False

    if state is State.PRIMARY:
        if event is Event.PEER_BACKUP:
            return State.ACTIVE, False
        if event is Event.PEER_ACTIVE:
            return State.PASSIVE, False
        return state, False
    if state is State.BACKUP:
        if event is Event.PEER_ACTIVE:
            return State.PASSIVE, False
        return state, False
    if state is State.ACTIVE:
        if event is Event.PEER_ACTIVE:
            raise DualActive("both servers of the pair are active")
        return state, False
    # PASSIVE
    if event is Event.PEER_PRIMARY or event is Event.PEER_BACKUP:
        # The peer restarted; it will go passive once it sees us active.
        return State.ACTIVE, False
    if event is Event.PEER_PASSIVE:
        raise DualPassive("both servers of the pair are passive")
    return state, False


class BinaryStar:
    """One server's Binary Star state, with the peer expiry kept for it.

    ``peer_timeout`` is how long the peer may stay silent before it counts as
    gone; bstar.c uses two of its state heartbeats.
    """

    def __init__(self, primary: bool, now: float, peer_timeout: float) -> None:
        self.primary = primary
        self.state = State.PRIMARY if primary else State.BACKUP
        self.peer_timeout = peer_timeout
        # As in bstar.c the peer counts as alive for one timeout after start,
        # so a restarting primary does not jump to active while the backup
        # is serving.
        self.peer_expiry = now + peer_timeout
        self.peer_state: State | None = None
        self.peer_seen: float | None = None

    @property
    def accepting(self) -> bool:
        return self.state is State.ACTIVE

    def on_peer_state(self, peer_state: State, now: float) -> State:
        """The peer published its state; returns our (maybe new) state.

        Raises :class:`DualActive` / :class:`DualPassive`; a primary does not
        raise DualActive but stays ACTIVE. Two active servers mean the
        backup missed the primary's state messages for a peer timeout (a
        starved machine or a slow network delays them) and took over on a
        client request. bstar.c stops both, which leaves the region with no
        broker until both are restarted; here the backup stops alone, and
        restarted it sees the primary active and goes passive. Both serving
        for those moments loses nothing: the brokers hold no messages, the
        store is one, and Sends are idempotent on their cmid.
        """
        self.peer_state = peer_state
        self.peer_seen = now
        self.peer_expiry = now + self.peer_timeout
        try:
            self.state, _ = step(self.state, PEER_EVENT[peer_state], now, self.peer_expiry)
        except DualActive:
            if not self.primary:
                raise
        return self.state

    def on_client_request(self, now: float) -> bool:
        """A client request arrived: serve it (True) or drop it (False)."""
        if self.state is State.ACTIVE:  # the common case, kept cheap
            return True
        self.state, accept = step(self.state, Event.CLIENT_REQUEST, now, self.peer_expiry)
        return accept

    def peer_alive(self, now: float) -> bool:
        return now < self.peer_expiry
