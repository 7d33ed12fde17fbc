"""BrokerCore routing, without sockets: frames in, frames out, time passed in."""

import pytest

from simzmq import mdp
from simzmq.broker import BACKEND, FRONTEND, BrokerCore, rendezvous_score

HB = 0.25
LIVENESS = 3


def core(**kw):
    return BrokerCore(heartbeat_interval=HB, liveness=LIVENESS, request_timeout=5.0, **kw)


def ready(c, worker, service=b"im", credit=None, now=0.0):
    return c.on_worker(worker, mdp.build_ready(service, credit), now)


def request(c, client, body, service=b"im", now=0.0):
    return c.on_client(client, mdp.build_client_request(service, body), now)


def requests_sent(outs):
    """[(worker, address, body)] of the REQUESTs in outs."""
    sent = []
    for dest, frames in outs:
        if dest == BACKEND and frames[3:4] == [mdp.REQUEST]:
            cmd = mdp.parse_broker_message(frames[1:])
            sent.append((frames[0], cmd.client, cmd.body))
    return sent


def replies(outs):
    """[(client, service, body)] of the replies to clients in outs."""
    result = []
    for dest, frames in outs:
        assert dest == FRONTEND
        service, body = mdp.parse_client_reply(frames[1:])
        result.append((frames[0], service, body))
    return result


def reply(c, worker, address, body, now=0.0):
    return c.on_worker(worker, mdp.build_reply(address, body), now)


def keys_of(sent):
    return [body[0] for _, _, body in sent]


def test_round_trip_plain_worker():
    c = core()
    assert ready(c, b"w1", b"echo") == []
    sent = requests_sent(request(c, b"gate", [b"hello"], b"echo"))
    assert [(w, body) for w, _, body in sent] == [(b"w1", [b"hello"])]
    outs = reply(c, b"w1", sent[0][1], [b"world"])
    assert replies(outs) == [(b"gate", b"echo", [b"world"])]


def test_plain_worker_gets_one_request_at_a_time():
    c = core()
    ready(c, b"w1", b"echo")
    first = requests_sent(request(c, b"gate", [b"1"], b"echo"))
    assert requests_sent(request(c, b"gate", [b"2"], b"echo")) == []
    assert c.queue_depth() == 1
    outs = reply(c, b"w1", first[0][1], [b"r1"])
    assert replies(outs[:1]) == [(b"gate", b"echo", [b"r1"])]
    assert [body for _, _, body in requests_sent(outs[1:])] == [[b"2"]]


def test_credit_limits_in_flight_and_backlog_is_fifo():
    c = core()
    ready(c, b"w1", credit=3)
    sent = []
    for i in range(6):
        sent += requests_sent(request(c, b"gate", [b"k%d" % i, b"x"]))
    assert keys_of(sent) == [b"k0", b"k1", b"k2"]
    assert c.queue_depth() == 3
    # Freeing one credit sends exactly the oldest waiting request.
    more = requests_sent(reply(c, b"w1", sent[1][1], [b"r"]))
    assert keys_of(more) == [b"k3"]
    more = requests_sent(reply(c, b"w1", sent[0][1], [b"r"]))
    assert keys_of(more) == [b"k4"]


def test_rendezvous_picks_highest_score():
    c = core()
    workers = [b"wa", b"wb", b"wc"]
    for w in workers:
        ready(c, w, credit=100)
    for i in range(40):
        key = b"user%d" % i
        expected = max(workers, key=lambda w: rendezvous_score(key, w))
        (worker, _, _), = requests_sent(request(c, b"gate", [key]))
        assert worker == expected


def test_two_workers_share_keys():
    c = core()
    ready(c, b"wa", credit=100)
    ready(c, b"wb", credit=100)
    seen = {w for i in range(50) for w, _, _ in requests_sent(request(c, b"g", [b"u%d" % i]))}
    assert seen == {b"wa", b"wb"}


def test_key_sticks_to_worker_while_outstanding_even_when_a_better_worker_joins():
    c = core()
    ready(c, b"w1", credit=10)
    # Find a key that a second worker would win.
    key = next(b"u%d" % i for i in range(1000)
               if rendezvous_score(b"u%d" % i, b"w2") > rendezvous_score(b"u%d" % i, b"w1"))
    (first,) = requests_sent(request(c, b"g", [key, b"1"]))
    assert first[0] == b"w1"
    ready(c, b"w2", credit=10)
    (second,) = requests_sent(request(c, b"g", [key, b"2"]))
    assert second[0] == b"w1"  # still outstanding at w1: stays there
    reply(c, b"w1", first[1], [b"r"])
    reply(c, b"w1", second[1], [b"r"])
    (third,) = requests_sent(request(c, b"g", [key, b"3"]))
    assert third[0] == b"w2"   # nothing outstanding: rendezvous decides again


def test_per_key_order_holds_through_backlog():
    c = core()
    ready(c, b"w1", credit=2)
    sent = []
    for i in range(5):
        sent += requests_sent(request(c, b"g", [b"ann", b"%d" % i]))
    assert [b[1] for _, _, b in sent] == [b"0", b"1"]
    order = [b[1] for _, _, b in sent]
    queue = list(sent)
    while queue:
        _, address, _ = queue.pop(0)
        new = requests_sent(reply(c, b"w1", address, [b"r"]))
        order += [b[1] for _, _, b in new]
        queue += new
    assert order == [b"0", b"1", b"2", b"3", b"4"]


def test_expired_worker_requests_requeued_in_order_ahead_of_newer():
    c = core()
    ready(c, b"w1", credit=2, now=0.0)
    sent = []
    for i in range(4):
        sent += requests_sent(request(c, b"g", [b"ann", b"%d" % i], now=0.1))
    assert len(sent) == 2  # 0 and 1 in flight, 2 and 3 in w1's backlog
    ready(c, b"w2", credit=10, now=0.2)
    # w2 stays alive, w1 goes silent.
    c.on_worker(b"w2", mdp.build_heartbeat(), 0.6)
    outs = c.tick(0.1 + HB * LIVENESS + 0.01)
    assert b"w1" not in c.workers
    redelivered = requests_sent(outs)
    assert {w for w, _, _ in redelivered} == {b"w2"}
    assert [b[1] for _, _, b in redelivered] == [b"0", b"1", b"2", b"3"]
    assert c.worker_expiries_total == 1
    # A newer request for the same key goes after them, to the same worker.
    (newer,) = requests_sent(request(c, b"g", [b"ann", b"4"], now=0.9))
    assert newer[0] == b"w2"


def test_requeue_waits_for_credit_when_the_other_worker_is_busy():
    c = core()
    ready(c, b"w1", credit=3)
    ready(c, b"w2", credit=1)
    # Keys pinned to w1 and w2.
    def key_for(worker):
        return next(b"u%d" % i for i in range(1000)
                    if max((b"w1", b"w2"), key=lambda w: rendezvous_score(b"u%d" % i, w)) == worker)
    k1, k2 = key_for(b"w1"), key_for(b"w2")
    (busy,) = requests_sent(request(c, b"g", [k2, b"x"]))
    held = requests_sent(request(c, b"g", [k1, b"a"])) + requests_sent(request(c, b"g", [k1, b"b"]))
    assert [w for w, _, _ in held] == [b"w1", b"w1"]
    outs = c.on_worker(b"w1", mdp.build_disconnect(), 0.1)
    assert requests_sent(outs) == []          # w2 has no credit left
    assert c.queue_depth() == 2
    outs = reply(c, b"w2", busy[1], [b"r"], now=0.2)
    assert [b[1] for _, _, b in requests_sent(outs)] == [b"a"]
    assert c.worker_disconnects_total == 1


def test_reply_from_expired_worker_is_dropped_and_disconnected():
    c = core()
    ready(c, b"w1")
    (sent,) = requests_sent(request(c, b"g", [b"ann"]))
    c.on_worker(b"w1", mdp.build_disconnect(), 0.1)
    outs = reply(c, b"w1", sent[1], [b"late"], now=0.2)
    assert outs == [(BACKEND, [b"w1", b"", mdp.W_WORKER, mdp.DISCONNECT])]


def test_duplicate_or_unknown_reply_is_dropped():
    c = core()
    ready(c, b"w1")
    (sent,) = requests_sent(request(c, b"g", [b"ann"]))
    assert len(reply(c, b"w1", sent[1], [b"r"])) == 1
    assert reply(c, b"w1", sent[1], [b"again"]) == []
    assert reply(c, b"w1", b"short", [b"x"]) == []


def test_no_worker_waits_then_times_out():
    c = core()
    assert request(c, b"g", [b"ann"], now=0.0) == []
    assert c.queue_depth() == 1
    assert requests_sent(c.tick(4.9)) == []
    assert c.queue_depth() == 1
    c.tick(5.0)
    assert c.queue_depth() == 0
    assert c.requests_timed_out_total == 1
    assert requests_sent(ready(c, b"w1", now=5.1)) == []


def test_waiting_requests_go_to_the_first_worker_in_order():
    c = core()
    for i in range(3):
        request(c, b"g", [b"ann", b"%d" % i], now=0.0)
    request(c, b"g", [b"x"], service=b"echo", now=0.0)
    sent = requests_sent(ready(c, b"w1", credit=10, now=1.0))
    assert [b[1] for _, _, b in sent] == [b"0", b"1", b"2"]
    assert [b for _, _, b in requests_sent(ready(c, b"e1", b"echo", now=1.0))] == [[b"x"]]


def test_unkeyed_service_round_robins():
    c = core()
    ready(c, b"e1", b"echo")
    ready(c, b"e2", b"echo")
    workers = [w for i in range(2) for w, _, _ in requests_sent(request(c, b"g", [b"%d" % i], b"echo"))]
    assert sorted(workers) == [b"e1", b"e2"]


def test_heartbeats_and_expiry():
    c = core()
    ready(c, b"w1", now=0.0)
    outs = c.tick(HB)
    assert outs == [(BACKEND, [b"w1", b"", mdp.W_WORKER, mdp.HEARTBEAT])]
    c.on_worker(b"w1", mdp.build_heartbeat(), 0.5)
    c.tick(0.5 + HB * LIVENESS - 0.01)
    assert b"w1" in c.workers
    c.tick(0.5 + HB * LIVENESS)
    assert b"w1" not in c.workers


def test_busy_worker_expires_too():
    c = core()
    ready(c, b"w1", now=0.0)
    request(c, b"g", [b"ann"], now=0.0)
    c.tick(HB * LIVENESS)
    assert b"w1" not in c.workers
    assert c.queue_depth() == 1  # back to waiting for a worker


def test_heartbeat_from_unknown_worker_gets_disconnect():
    c = core()
    assert c.on_worker(b"ghost", mdp.build_heartbeat(), 0.0) == [
        (BACKEND, [b"ghost", b"", mdp.W_WORKER, mdp.DISCONNECT])]


def test_second_ready_disconnects_and_requeues():
    c = core()
    ready(c, b"w1")
    request(c, b"g", [b"ann"])
    outs = ready(c, b"w1")
    assert (BACKEND, [b"w1", b"", mdp.W_WORKER, mdp.DISCONNECT]) in outs
    assert b"w1" not in c.workers
    assert c.queue_depth() == 1


def test_worker_may_not_offer_mmi():
    c = core()
    outs = ready(c, b"w1", b"mmi.service")
    assert outs == [(BACKEND, [b"w1", b"", mdp.W_WORKER, mdp.DISCONNECT])]
    assert not c.workers


@pytest.mark.parametrize(("service", "body", "code"), [
    (b"mmi.service", [b"im"], b"200"),
    (b"mmi.service", [b"nobody"], b"404"),
    (b"mmi.other", [b"im"], b"501"),
])
def test_mmi(service, body, code):
    c = core()
    ready(c, b"w1")
    outs = request(c, b"gate", body, service)
    assert replies(outs) == [(b"gate", service, [code])]


def test_mmi_service_404_after_worker_leaves():
    c = core()
    ready(c, b"w1")
    c.on_worker(b"w1", mdp.build_disconnect(), 0.0)
    assert replies(request(c, b"gate", [b"im"], b"mmi.service")) == [(b"gate", b"mmi.service", [b"404"])]


@pytest.mark.parametrize("frames", [
    [],
    [b"", b"MDPC01"],
    [b"", b"MDPW01", b"im", b"k"],
    [b"", b"MDPC01", b"im"],          # keyed service without a key
    [b"", b"MDPC01", b"mmi.service"],
])
def test_malformed_client_input_ignored(frames):
    c = core()
    ready(c, b"w1")
    assert c.on_client(b"gate", frames, 0.0) == []
    assert c.queue_depth() == 0 and c.in_flight() == 0


@pytest.mark.parametrize("frames", [
    [],
    [b"", b"MDPW01", b"\x07"],
    [b"", b"MDPW01", mdp.READY, b"im", b"lots"],
    [b"", b"MDPC01", mdp.READY, b"im"],
    [b"", b"MDPW01", mdp.REPLY, b"addr"],
])
def test_malformed_worker_input_ignored(frames):
    c = core()
    assert c.on_worker(b"w1", frames, 0.0) == []
    assert not c.workers
    assert c.malformed_total == 1


def test_queue_bound_drops_excess():
    c = core(max_queued=2)
    for i in range(3):
        request(c, b"g", [b"k%d" % i])
    assert c.queue_depth() == 2
    assert c.requests_dropped_total == 1


def test_idle_services_are_forgotten():
    c = core()
    request(c, b"g", [b"x"], service=b"made-up")
    c.tick(10.0)
    assert b"made-up" not in c.services


def test_disconnect_all():
    c = core()
    ready(c, b"w1")
    ready(c, b"w2", b"echo")
    assert sorted(f[0] for _, f in c.disconnect_all()) == [b"w1", b"w2"]


# --- random operation sequences keep the routing invariants ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WORKERS = [b"w1", b"w2", b"w3"]
KEYS = [b"ann", b"bob", b"cy", b"dee"]
ops = st.lists(st.one_of(
    st.tuples(st.just("ready"), st.sampled_from(WORKERS), st.integers(1, 3)),
    st.tuples(st.just("request"), st.sampled_from(KEYS), st.just(0)),
    st.tuples(st.just("reply"), st.sampled_from(WORKERS), st.integers(0, 5)),
    st.tuples(st.just("disconnect"), st.sampled_from(WORKERS), st.just(0)),
    st.tuples(st.just("tick"), st.just(b""), st.integers(0, 2)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(operations):
    c = core()
    now = 0.0
    held = {w: [] for w in WORKERS}   # addresses each simulated worker holds, in arrival order
    sent_seq = 0
    first_dispatch = {}                # key -> seqs in the order first sent to a worker

    def absorb(outs):
        for dest, frames in outs:
            if dest == BACKEND and frames[3] == mdp.REQUEST:
                cmd = mdp.parse_broker_message(frames[1:])
                held[frames[0]].append(cmd.client)
                key, seq = cmd.body
                seqs = first_dispatch.setdefault(key, [])
                if int(seq) not in seqs:
                    seqs.append(int(seq))

    for op, arg, n in operations:
        if op == "ready":
            if arg not in c.workers:
                held[arg] = []
                absorb(ready(c, arg, credit=n, now=now))
        elif op == "request":
            absorb(request(c, b"gate", [arg, b"%d" % sent_seq], now=now))
            sent_seq += 1
        elif op == "reply":
            if held[arg] and arg in c.workers:
                address = held[arg].pop(min(n, len(held[arg]) - 1))
                absorb(c.on_worker(arg, mdp.build_reply(address, [b"done"]), now))
        elif op == "disconnect":
            held[arg] = []
            absorb(c.on_worker(arg, mdp.build_disconnect(), now))
        else:
            now += n * 0.5
            for w in c.workers:
                c.on_worker(w, mdp.build_heartbeat(), now)
            absorb(c.tick(now))

        # Every key's pending requests sit at one worker, oldest first.
        for service in c.services.values():
            owner = {}
            for worker in service.workers.values():
                pending = list(worker.in_flight.values()) + list(worker.backlog)
                for request_ in pending:
                    assert owner.setdefault(request_.key, worker.identity) == worker.identity
                by_key = {}
                for request_ in pending:
                    by_key.setdefault(request_.key, []).append(request_.rid)
                for rids in by_key.values():
                    assert rids == sorted(rids)
                assert len(worker.in_flight) <= worker.credit
            for binding_key, (worker, count) in service.bindings.items():
                assert worker.identity in service.workers
                assert count == sum(1 for r in list(worker.in_flight.values()) + list(worker.backlog)
                                    if r.key == binding_key)
        # Requests are conserved: answered, pending somewhere, or timed out.
        pending_total = c.queue_depth() + c.in_flight()
        assert c.replies_total + pending_total + c.requests_timed_out_total + c.requests_dropped_total == sent_seq
    # Requests of one key are first handed out in the order they arrived.
    for seqs in first_dispatch.values():
        assert seqs == sorted(seqs)


# --- the batch extension ------------------------------------------------------


def batch_ready(c, worker, credit=256, now=0.0):
    return c.on_worker(worker, mdp.build_ready(b"im", credit, batches=True), now)


def batch_request(c, client, entries, now=0.0):
    return c.on_client(client, mdp.build_client_batch(b"im", entries), now)


def batches_sent(outs):
    """{worker: [(address, key, body)]} of the REQUEST_BATCHes in outs, and
    their count."""
    sent, count = {}, 0
    for dest, frames in outs:
        if dest == BACKEND and frames[3:4] == [mdp.REQUEST_BATCH]:
            count += 1
            cmd = mdp.parse_broker_message(frames[1:])
            sent.setdefault(frames[0], []).extend((client, body[0], body[1]) for client, body in cmd.entries)
    return sent, count


def key_to(c, worker_ids, wanted):
    """A key whose rendezvous winner among worker_ids is wanted."""
    for i in range(1000):
        key = b"user%d" % i
        if max(worker_ids, key=lambda w: (rendezvous_score(key, w), w)) == wanted:
            return key
    raise AssertionError("no key found")


def test_mmi_batch_is_announced():
    c = core()
    outs = c.on_client(b"gate", mdp.build_client_request(mdp.MMI_BATCH, []), 0.0)
    assert replies(outs) == [(b"gate", mdp.MMI_BATCH, [mdp.MMI_FOUND])]


def test_batch_is_split_by_key_one_message_per_worker_in_order():
    c = core()
    batch_ready(c, b"w1")
    batch_ready(c, b"w2")
    k1, k2 = key_to(c, [b"w1", b"w2"], b"w1"), key_to(c, [b"w1", b"w2"], b"w2")
    entries = [(k1, b"a1"), (k2, b"b1"), (k1, b"a2"), (k2, b"b2"), (k1, b"a3")]
    sent, count = batches_sent(batch_request(c, b"gate", entries))
    assert count == 2
    assert [(k, b) for _, k, b in sent[b"w1"]] == [(k1, b"a1"), (k1, b"a2"), (k1, b"a3")]
    assert [(k, b) for _, k, b in sent[b"w2"]] == [(k2, b"b1"), (k2, b"b2")]
    # Each entry has its own address (request id): answered one by one, or
    # several at once, the gate gets the replies packed, per call.
    w1 = sent[b"w1"]
    outs = c.on_worker(b"w1", mdp.build_reply_batch([(w1[0][0], b"r1"), (w1[1][0], b"r2")]), 0.0)
    assert outs == [(FRONTEND, [b"gate", b"", mdp.C_BATCH, b"im", b"r1", b"r2"])]
    assert c.replies_total == 2 and c.in_flight() == 3


def test_batch_entries_use_credit_and_key_order():
    c = core()
    batch_ready(c, b"w1", credit=2)
    sent, _ = batches_sent(batch_request(c, b"gate", [(b"k", b"1"), (b"k", b"2"), (b"k", b"3")]))
    assert [b for _, _, b in sent[b"w1"]] == [b"1", b"2"]
    assert c.queue_depth() == 1
    # A second batch with the same key waits behind the first.
    assert batches_sent(batch_request(c, b"gate", [(b"k", b"4")]))[1] == 0
    outs = c.on_worker(b"w1", mdp.build_reply_batch([(sent[b"w1"][0][0], b"r1")]), 0.0)
    assert [b for _, _, b in batches_sent(outs)[0][b"w1"]] == [b"3"]


def test_partial_answer_then_worker_death_resends_exactly_the_rest():
    c = core()
    batch_ready(c, b"w1")
    sent, _ = batches_sent(batch_request(c, b"gate", [(b"k", b"1"), (b"k", b"2"), (b"k", b"3")]))
    first = sent[b"w1"][0][0]
    c.on_worker(b"w1", mdp.build_reply_batch([(first, b"r1")]), 0.0)
    batch_ready(c, b"w2")
    outs = c.on_worker(b"w1", mdp.build_disconnect(), 0.1)
    again, count = batches_sent(outs)
    assert count == 1 and [b for _, _, b in again[b"w2"]] == [b"2", b"3"]
    # A late answer from the dead worker is not taken.
    assert c.on_worker(b"w1", mdp.build_reply_batch([(sent[b"w1"][1][0], b"late")]), 0.2) \
        == [(BACKEND, [b"w1", b"", mdp.W_WORKER, mdp.DISCONNECT])]


def test_plain_worker_and_plain_gate_see_no_batches():
    c = core()
    ready(c, b"plain", credit=10)
    outs = batch_request(c, b"gate", [(b"k1", b"1"), (b"k2", b"2")])
    sent = requests_sent(outs)
    assert [body for _, _, body in sent] == [[b"k1", b"1"], [b"k2", b"2"]]
    # The batch's entries are answered packed to the gate that sent a batch...
    outs = reply(c, b"plain", sent[0][1], [b"r1"]) + reply(c, b"plain", sent[1][1], [b"r2"])
    assert [frames[2] for _, frames in outs] == [mdp.C_BATCH, mdp.C_BATCH]
    # ...and a plain request from a plain client goes to a batch worker packed
    # but is answered plain.
    c = core()
    batch_ready(c, b"w1")
    sent, _ = batches_sent(request(c, b"client", [b"k", b"x"]))
    outs = c.on_worker(b"w1", mdp.build_reply_batch([(sent[b"w1"][0][0], b"r")]), 0.0)
    assert replies(outs) == [(b"client", b"im", [b"r"])]


@pytest.mark.parametrize("frames", [
    [b"", mdp.C_BATCH, b"im", b"k"],                 # a key without its body
    [b"", mdp.C_BATCH, b"echo", b"k", b"v"],         # not a keyed service
    [b"", mdp.C_BATCH, b"im"],
])
def test_malformed_batches_change_nothing(frames):
    c = core()
    batch_ready(c, b"w1")
    assert c.on_client(b"gate", frames, 0.0) == []
    assert c.malformed_total == 1 and c.requests_total == 0 and c.in_flight() == 0
