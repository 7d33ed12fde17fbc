"""The gate's broker link as pure logic: frames in, frames out, time passed in."""

from simzmq import mdp
from simzmq.envelope import pack_notice, pack_notices, pack_reply, pack_stamp, request_budget_ms, unpack_request
from simzmq.linkcore import ASK_BATCH, PROBE, LinkCore
from simzmq.notify import group_topic

TIMEOUT, PROBE_S, FAILOVER = 5.0, 0.1, 0.6
E1, E2 = b"E" * 8, b"F" * 8


def link(brokers=2, now=0.0):
    return LinkCore(brokers, TIMEOUT, PROBE_S, FAILOVER, now)


def ask(core, key=b"ann", payload=b"p", now=0.0, into=None):
    into = [] if into is None else into
    core.request(key, b"", payload, into.append, now)
    return into


def corrs(messages):
    """[(key, corr)] of the requests in messages, plain or batched."""
    found = []
    for frames in messages:
        batched, service, rest = mdp.parse_client_message(frames)
        assert service == b"im"
        for i in range(0, len(rest), 2):
            found.append((rest[i], unpack_request(rest[i + 1])[0]))
    return found


def answer_batches(core, now=0.0):
    core.on_reply(mdp.build_client_request(mdp.MMI_BATCH, [mdp.MMI_FOUND]), now)


def test_one_turn_is_one_batch_once_the_broker_announced_batches():
    core = link()
    # Before the broker said it takes batches: plain 7/MDP requests.
    assert core.request(b"ann", b"", b"1", print, 0.0) is True
    assert core.request(b"bob", b"", b"2", print, 0.0) is False   # same turn
    plain = core.outgoing(0.0)
    assert [frames[1] for frames in plain] == [mdp.C_CLIENT, mdp.C_CLIENT]
    assert core.probes(0.0) == [PROBE, ASK_BATCH]
    answer_batches(core)
    assert core.probes(1.0) == [PROBE]
    for i in range(3):
        ask(core, b"u%d" % i)
    messages = core.outgoing(0.0)
    assert len(messages) == 1 and messages[0][1] == mdp.C_BATCH
    assert [key for key, _ in corrs(messages)] == [b"u0", b"u1", b"u2"]
    assert core.outgoing(0.0) == []


def test_replies_plain_or_packed_answer_each_request_once():
    core = link()
    got = []
    for payload in (b"a", b"b", b"c"):
        ask(core, payload=payload, into=got)
    sent = corrs(core.outgoing(0.0))
    packed = mdp.build_client_reply_batch(b"im", [pack_reply(sent[0][1], b"r0"), pack_reply(sent[2][1], b"r2")])
    answers = core.on_reply(packed, 1.0)
    assert [a.payload for a in answers] == [b"r0", b"r2"]
    assert [a.waited for a in answers] == [1.0, 1.0]
    plain = mdp.build_client_reply(b"im", [pack_reply(sent[1][1], b"r1")])
    assert [a.payload for a in core.on_reply(plain, 1.0)] == [b"r1"]
    # A second answer (a resend's twin) is not handed out again.
    assert core.on_reply(plain, 1.1) == []
    assert core.pending == {}


def test_failover_resends_exactly_what_is_unanswered_in_order():
    core = link()
    core.on_reply(mdp.build_client_reply(mdp.MMI_SERVICE, [b"200"]), 0.0)
    for key in (b"a", b"b", b"c"):
        ask(core, key)
    sent = corrs(core.outgoing(0.0))
    core.on_reply(mdp.build_client_reply(b"im", [pack_reply(sent[1][1], b"ok")]), 0.1)
    t = 0.1
    while not run_ticks(core, t).switched:
        t += PROBE_S / 2
        assert t < 2
    assert 0.7 <= t <= 0.8 and core.current == 1 and core.failovers == 1
    assert corrs(core.outgoing(0.0)) == [sent[0], sent[2]]
    # The new broker was probed at once, batches asked for too: until it
    # answers, requests go plain.
    assert core.batches is False and core.last_probe == t


def run_ticks(core, t):
    """One turn of the shell's tick: the core's tick, then its probes."""
    tick = core.tick(t)
    core.probes(t)
    return tick


def test_no_failover_is_counted_before_any_broker_answered():
    core = link()
    t, switches = 0.0, 0
    while t < 3.0:
        switches += run_ticks(core, t).switched
        t += PROBE_S / 2
    assert switches >= 4 and core.failovers == 0 and not core.reachable(t)
    core.on_reply(mdp.build_client_reply(mdp.MMI_SERVICE, [b"200"]), t)
    assert core.reachable(t)


def test_a_fresh_link_finds_the_serving_broker_quickly():
    """The first broker is silent (passive or dead): the link is on the
    other one within failover_after and a tick, not a request timeout."""
    core = link()
    t = 0.0
    while not run_ticks(core, t).switched:
        t += PROBE_S / 2
    assert t <= FAILOVER + PROBE_S and core.current == 1


def test_a_link_started_late_asks_its_broker_before_judging_it():
    """The gate's loop was busy for 2 s after the link was made: the first
    broker is probed first and gets its whole failover_after to answer."""
    core = link(now=0.0)
    core.tick_due = 2.0  # the shell's start()
    for t in (2.0, 2.05, 2.1, 2.5):
        assert run_ticks(core, t).switched is False
    core.on_reply(mdp.build_client_reply(mdp.MMI_SERVICE, [b"200"]), 2.55)
    assert run_ticks(core, 2.6).switched is False and core.reachable(2.6)


def test_one_late_tick_is_excused_but_not_a_busy_loop():
    core = link()
    core.on_reply(mdp.build_client_reply(mdp.MMI_SERVICE, [b"200"]), 0.0)
    run_ticks(core, 0.0)
    # The loop stalls: every tick runs far too late.
    assert core.tick(1.0).switched is False        # one stall: the answers may be unread
    assert core.tick(1.5).switched is True         # still late: the broker is silent


def test_deadlines_answer_none():
    core = link(brokers=1)
    got = ask(core)
    core.outgoing(0.0)
    assert core.tick(TIMEOUT - 0.1).answers == []
    answers = core.tick(TIMEOUT).answers
    assert [a.payload for a in answers] == [None] and core.pending == {}
    answers[0].callback(answers[0].payload)
    assert got == [None]


def test_malformed_replies_raise_but_count_as_life():
    core = link()
    for frames in ([b"", b"XX", b"im", b"x"], [b"", mdp.C_CLIENT, b"im", b"a" * 8, b"b" * 8]):
        try:
            core.on_reply(frames, 2.0)
        except ValueError:
            pass
        else:
            raise AssertionError(frames)
    assert core.reachable(2.0)


def test_a_malformed_entry_loses_only_itself():
    core = link(brokers=1)
    got = []
    for payload in (b"a", b"b", b"c"):
        ask(core, payload=payload, into=got)
    sent = corrs(core.outgoing(0.0))
    packed = mdp.build_client_reply_batch(b"im", [pack_reply(sent[0][1], b"r0"), b"xx",
                                                  pack_reply(sent[2][1], b"r2")])
    answers = core.on_reply(packed, 1.0)
    assert [a.payload for a in answers] == [b"r0", b"r2"]
    assert core.malformed_entries == 1
    # The request whose answer was garbled is still pending and times out.
    assert list(core.pending) == [sent[1][1]]
    assert [a.payload for a in core.tick(TIMEOUT).answers] == [None]
    plain_short = mdp.build_client_reply(b"im", [b"short"])
    assert core.on_reply(plain_short, TIMEOUT) == [] and core.malformed_entries == 2


def test_subscriptions_by_user_and_group():
    core = link()
    assert core.subscribe("ann") == [b"ann\0", group_topic(b"ann")]
    assert core.subscribe("ann") == []
    assert core.unsubscribe("ann") == []
    assert core.unsubscribe("ann") == [b"ann\0", group_topic(b"ann")]
    assert core.unsubscribe("ann") == []
    assert core.subscriptions() == []


def two_users_in_one_group():
    users = {}
    for i in range(100):
        name = "u%d" % i
        users.setdefault(group_topic(name.encode()), []).append(name)
    return next(names[:3] for names in users.values() if len(names) >= 3)


def test_group_notifications_deliver_only_users_online_here_and_gaps_resync_them():
    core = link()
    ann, bob, stranger = two_users_in_one_group()
    core.subscribe(ann)
    core.subscribe(bob)
    group = group_topic(ann.encode())
    packed = pack_notices([(ann.encode(), b"o", b"p1"), (stranger.encode(), b"", b"p2"), (bob.encode(), b"", b"p3")])
    first = core.on_notification([group, pack_stamp(E1, 7), packed])
    assert first.deliveries == [(ann.encode() + b"\0", b"o", b"p1"), (bob.encode() + b"\0", b"", b"p3")]
    assert first.resync == []
    assert core.on_notification([group, pack_stamp(E1, 8), packed]).resync == []
    # Seq 9 never arrived: everyone of the group online here is caught up.
    assert sorted(core.on_notification([group, pack_stamp(E1, 10), packed]).resync) == sorted([ann, bob])
    # A new epoch (the broker restarted) too.
    assert sorted(core.on_notification([group, pack_stamp(E2, 11), packed]).resync) == sorted([ann, bob])


def test_per_user_notifications_still_work():
    core = link()
    core.subscribe("ann")
    n = core.on_notification([b"ann\0", pack_stamp(E1, 1), pack_notice(b"", b"p")])
    assert n == ([(b"ann\0", b"", b"p")], [])
    assert core.on_notification([b"ann\0", pack_stamp(E1, 3), pack_notice(b"", b"p")]).resync == ["ann"]


def test_switching_forgets_the_stamps():
    core = link()
    core.subscribe("ann")
    core.on_notification([b"ann\0", pack_stamp(E1, 5), pack_notice(b"", b"p")])
    t = 0.0
    while not run_ticks(core, t).switched:
        t += PROBE_S / 2
    # The other broker's counters are its own: the first one is the baseline.
    assert core.on_notification([b"ann\0", pack_stamp(E2, 1), pack_notice(b"", b"p")]).resync == []


def test_notifications_after_unsubscribing_are_dropped_and_forgotten():
    core = link()
    group = group_topic(b"ann")
    core.subscribe("ann")
    core.on_notification([group, pack_stamp(E1, 1), pack_notices([(b"ann", b"", b"p")])])
    core.unsubscribe("ann")
    late = core.on_notification([group, pack_stamp(E1, 2), pack_notices([(b"ann", b"", b"p")])])
    assert late == ([], []) and core.stamps == {}
    # Back online much later: the first notification is the new baseline.
    core.subscribe("ann")
    again = core.on_notification([group, pack_stamp(E1, 40), pack_notices([(b"ann", b"", b"p")])])
    assert again == ([(b"ann\0", b"", b"p")], [])


def test_a_broker_without_batches_gets_plain_requests_and_is_asked_once():
    core = link()
    assert core.probes(0.0) == [PROBE, ASK_BATCH]
    core.on_reply(mdp.build_client_reply(mdp.MMI_BATCH, [mdp.MMI_NOT_IMPLEMENTED]), 0.01)
    assert core.probes(1.0) == [PROBE]
    ask(core, b"a")
    ask(core, b"b")
    assert [frames[1] for frames in core.outgoing(0.0)] == [mdp.C_CLIENT, mdp.C_CLIENT]


def test_each_request_carries_the_time_the_gate_still_waits_for_it():
    core = link()
    answer_batches(core)
    payload = bytes([1]) + bytes(4) + b"body"  # a bin payload, ref 0
    core.request(b"ann", b"O" * 16, payload, print, 0.0)
    (frames,) = core.outgoing(1.5)
    _, _, rest = mdp.parse_client_message(frames)
    corr, origin, sent = unpack_request(rest[1])
    assert origin == b"O" * 16 and request_budget_ms(sent) == 3500  # TIMEOUT 5 s, asked at 0
    assert sent[:1] + sent[5:] == bytes([1]) + b"body"  # nothing else changed
    # A resend after a failover carries what is left then.
    core.probes(0.0)
    t = 0.0
    while not core.tick(t).switched:  # silent past failover_after: the other broker
        t += PROBE_S / 2
    assert 0 < t < 2.0
    (frames,) = core.outgoing(2.0)  # plain now: the new broker has not answered mmi.batch
    _, _, rest = mdp.parse_client_message(frames)
    assert request_budget_ms(unpack_request(rest[1])[2]) == 3000
