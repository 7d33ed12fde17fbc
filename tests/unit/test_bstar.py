import pytest

from simzmq.bstar import BinaryStar, DualActive, DualPassive, Event, State, step

P, B, A, S = State.PRIMARY, State.BACKUP, State.ACTIVE, State.PASSIVE
E = Event
FATAL_ACTIVE, FATAL_PASSIVE = "dual-active", "dual-passive"

# (state, event) -> (new state, accept) for a peer that is still alive.
# Every state × event pair is listed, from bstar.c.
PEER_ALIVE = {
    (P, E.PEER_PRIMARY): (P, False),
    (P, E.PEER_BACKUP): (A, False),
    (P, E.PEER_ACTIVE): (S, False),
    (P, E.PEER_PASSIVE): (P, False),
    (P, E.CLIENT_REQUEST): (P, False),
    (B, E.PEER_PRIMARY): (B, False),
    (B, E.PEER_BACKUP): (B, False),
    (B, E.PEER_ACTIVE): (S, False),
    (B, E.PEER_PASSIVE): (B, False),
    (B, E.CLIENT_REQUEST): (B, False),
    (A, E.PEER_PRIMARY): (A, False),
    (A, E.PEER_BACKUP): (A, False),
    (A, E.PEER_ACTIVE): FATAL_ACTIVE,
    (A, E.PEER_PASSIVE): (A, False),
    (A, E.CLIENT_REQUEST): (A, True),
    (S, E.PEER_PRIMARY): (A, False),
    (S, E.PEER_BACKUP): (A, False),
    (S, E.PEER_ACTIVE): (S, False),
    (S, E.PEER_PASSIVE): FATAL_PASSIVE,
    (S, E.CLIENT_REQUEST): (S, False),
}

# Only client requests look at the peer expiry; once it has passed:
PEER_EXPIRED_CLIENT_REQUEST = {
    P: (A, True),   # a primary whose backup is gone serves
    B: (B, False),  # a backup that never saw the primary active never does
    A: (A, True),
    S: (A, True),   # failover
}


def test_table_covers_every_pair():
    assert set(PEER_ALIVE) == {(s, e) for s in State for e in Event}


@pytest.mark.parametrize(("state", "event"), sorted(PEER_ALIVE, key=lambda p: (p[0].value, p[1].value)))
def test_step_with_peer_alive(state, event):
    expected = PEER_ALIVE[(state, event)]
    now, peer_expiry = 10.0, 12.0
    if expected == FATAL_ACTIVE:
        with pytest.raises(DualActive):
            step(state, event, now, peer_expiry)
    elif expected == FATAL_PASSIVE:
        with pytest.raises(DualPassive):
            step(state, event, now, peer_expiry)
    else:
        assert step(state, event, now, peer_expiry) == expected


@pytest.mark.parametrize("state", list(State))
def test_client_request_with_peer_expired(state):
    assert step(state, E.CLIENT_REQUEST, 12.0, 12.0) == PEER_EXPIRED_CLIENT_REQUEST[state]


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", [E.PEER_PRIMARY, E.PEER_BACKUP, E.PEER_PASSIVE])
def test_peer_events_ignore_expiry(state, event):
    if (state, event) == (S, E.PEER_PASSIVE):
        pytest.skip("fatal either way")
    assert step(state, event, 100.0, 0.0) == PEER_ALIVE[(state, event)]


def test_primary_and_backup_start_up_together():
    primary = BinaryStar(primary=True, now=0.0, peer_timeout=2.0)
    backup = BinaryStar(primary=False, now=0.0, peer_timeout=2.0)
    backup.on_peer_state(primary.state, 0.1)      # backup sees PRIMARY: waits
    assert backup.state is B
    primary.on_peer_state(backup.state, 0.2)      # primary sees BACKUP: active
    assert primary.state is A and primary.accepting
    backup.on_peer_state(primary.state, 1.1)      # backup sees ACTIVE: passive
    assert backup.state is S and not backup.accepting
    primary.on_peer_state(backup.state, 1.2)
    assert primary.state is A


def test_failover_needs_client_request_and_silent_peer():
    backup = BinaryStar(primary=False, now=0.0, peer_timeout=2.0)
    backup.on_peer_state(A, 1.0)
    assert backup.state is S
    # The primary dies at t=1. Without client requests nothing happens.
    assert backup.state is S
    # A request while the peer may still be alive is refused.
    assert backup.on_client_request(2.5) is False
    assert backup.state is S
    # Once the peer has been silent for the timeout, a request flips it.
    assert backup.peer_alive(2.9)
    assert not backup.peer_alive(3.0)
    assert backup.on_client_request(3.0) is True
    assert backup.state is A
    # The primary comes back: it sees the backup active and goes passive.
    primary = BinaryStar(primary=True, now=10.0, peer_timeout=2.0)
    assert primary.on_client_request(10.5) is False   # peer not yet expired at start
    primary.on_peer_state(backup.state, 10.6)
    assert primary.state is S
    backup.on_peer_state(primary.state, 10.7)
    assert backup.state is A


def test_lone_primary_becomes_active_only_on_request_after_timeout():
    primary = BinaryStar(primary=True, now=0.0, peer_timeout=2.0)
    assert primary.state is P
    assert primary.on_client_request(1.0) is False
    assert primary.state is P
    assert primary.on_client_request(2.0) is True
    assert primary.state is A


def test_lone_backup_never_serves():
    backup = BinaryStar(primary=False, now=0.0, peer_timeout=2.0)
    assert backup.on_client_request(1000.0) is False
    assert backup.state is B


def test_dual_active_stops_the_backup_only():
    # The backup went active while the primary was serving (it missed the
    # primary's state messages): the backup stops, the primary serves on.
    backup = BinaryStar(primary=False, now=0.0, peer_timeout=2.0)
    backup.on_peer_state(A, 0.1)
    assert backup.on_client_request(5.0) is True and backup.state is A
    with pytest.raises(DualActive):
        backup.on_peer_state(A, 5.1)
    primary = BinaryStar(primary=True, now=0.0, peer_timeout=2.0)
    primary.on_peer_state(B, 0.1)
    assert primary.state is A
    assert primary.on_peer_state(A, 5.1) is A
    assert primary.on_client_request(5.2) is True
    # the backup, restarted, comes back passive
    restarted = BinaryStar(primary=False, now=6.0, peer_timeout=2.0)
    assert restarted.on_peer_state(A, 6.1) is S


def test_dual_passive_raises_from_class():
    server = BinaryStar(primary=False, now=0.0, peer_timeout=2.0)
    server.on_peer_state(A, 0.1)
    with pytest.raises(DualPassive):
        server.on_peer_state(S, 0.2)
