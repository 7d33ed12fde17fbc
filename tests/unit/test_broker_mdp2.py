"""BrokerCore speaking Majordomo v0.2 (18/MDP) next to 7/MDP, without
sockets: frames in, frames out, time passed in. The frames are written out
as spec 18 (and majortomo, which puts a DEALER's empty frame first) has
them, so these tests check the wire, not just a round trip through mdp.py."""

import logging

import pytest

from simzmq import mdp
from simzmq.broker import BACKEND, DROP_LOG_INTERVAL_S, FRONTEND, BrokerCore

HB = 0.25

# (the frames before a v0.2 worker command, the frames before a v0.2 client command)
DELIMITED = ([b"", b"MDPW02"], [b"", b"MDPC02"])   # as majortomo sends it
BARE = ([b"MDPW02"], [b"MDPC02"])                  # as spec 18 writes it


def core(**kw):
    return BrokerCore(heartbeat_interval=HB, liveness=3, request_timeout=5.0, **kw)


def ready2(c, worker, service=b"echo", framing=DELIMITED, extra=(), now=0.0):
    return c.on_worker(worker, [*framing[0], b"\x01", service, *extra], now)


def request2(c, client, body, service=b"echo", framing=DELIMITED, now=0.0):
    return c.on_client(client, [*framing[1], b"\x01", service, *body], now)


def answer2(c, worker, address, body, final=True, framing=DELIMITED, now=0.0):
    return c.on_worker(worker, [*framing[0], b"\x04" if final else b"\x03", address, b"", *body], now)


def sent_requests2(outs, framing=DELIMITED):
    """[(worker, address, body)] of the v0.2 REQUESTs in outs."""
    head = [*framing[0], b"\x02"]
    sent = []
    for dest, frames in outs:
        assert dest == BACKEND
        assert frames[1:1 + len(head)] == head, frames
        rest = frames[1 + len(head):]
        assert rest[1] == b""
        sent.append((frames[0], rest[0], rest[2:]))
    return sent


def test_v2_round_trip_with_partials_as_majortomo_frames_it():
    c = core()
    assert ready2(c, b"w1") == []
    (sent,) = sent_requests2(request2(c, b"cli", [b"hello", b"world"]))
    worker, address, body = sent
    assert (worker, body) == (b"w1", [b"hello", b"world"])
    # Each PARTIAL goes to the client as a PARTIAL; the request stays in flight.
    for part in (b"p1", b"p2"):
        outs = answer2(c, b"w1", address, [part], final=False)
        assert outs == [(FRONTEND, [b"cli", b"", b"MDPC02", b"\x02", b"echo", part])]
        assert c.in_flight() == 1 and c.replies_total == 0
    outs = answer2(c, b"w1", address, [b"done", b""])
    assert outs == [(FRONTEND, [b"cli", b"", b"MDPC02", b"\x03", b"echo", b"done", b""])]
    assert c.in_flight() == 0 and c.replies_total == 1
    # After the FINAL the request is complete: a late part of it goes nowhere.
    assert answer2(c, b"w1", address, [b"late"], final=False) == []
    assert answer2(c, b"w1", address, [b"late"]) == []
    assert c.malformed_total == 0  # late, not malformed: logged only


def test_v2_bare_framing_is_answered_bare():
    c = core()
    ready2(c, b"w1", framing=BARE)
    (sent,) = sent_requests2(request2(c, b"cli", [b"x"], framing=BARE), BARE)
    outs = answer2(c, b"w1", sent[1], [b"part"], final=False, framing=BARE)
    assert outs == [(FRONTEND, [b"cli", b"MDPC02", b"\x02", b"echo", b"part"])]
    outs = answer2(c, b"w1", sent[1], [b"y"], framing=BARE)
    assert outs == [(FRONTEND, [b"cli", b"MDPC02", b"\x03", b"echo", b"y"])]
    assert c.tick(HB) == [(BACKEND, [b"w1", b"MDPW02", b"\x05"])]


def test_each_client_is_answered_in_the_framing_its_request_came_in():
    c = core()
    ready2(c, b"w1", extra=[b"4"])  # a v0.2 worker with simzmq's credit frame
    outs = request2(c, b"new", [b"a"])
    outs += c.on_client(b"old", mdp.build_client_request(b"echo", [b"b"]), 0.0)
    outs += request2(c, b"bare", [b"c"], framing=BARE)
    sent = sent_requests2(outs)  # the worker gets all three in its own framing
    assert [body for _, _, body in sent] == [[b"a"], [b"b"], [b"c"]]
    # PARTIALs reach only the v0.2 clients: a 7/MDP client waits for its one reply.
    partials = []
    for _, address, _ in sent:
        partials += answer2(c, b"w1", address, [b"part"], final=False)
    assert partials == [(FRONTEND, [b"new", b"", b"MDPC02", b"\x02", b"echo", b"part"]),
                        (FRONTEND, [b"bare", b"MDPC02", b"\x02", b"echo", b"part"])]
    finals = []
    for _, address, _ in sent:
        finals += answer2(c, b"w1", address, [b"end"])
    assert finals == [(FRONTEND, [b"new", b"", b"MDPC02", b"\x03", b"echo", b"end"]),
                      (FRONTEND, [b"old", b"", b"MDPC01", b"echo", b"end"]),
                      (FRONTEND, [b"bare", b"MDPC02", b"\x03", b"echo", b"end"])]


def test_v2_client_through_a_7mdp_worker():
    c = core()
    c.on_worker(b"w1", mdp.build_ready(b"echo"), 0.0)
    ((dest, frames),) = request2(c, b"cli", [b"q"])
    cmd = mdp.parse_broker_message(frames[1:])
    assert (dest, frames[0], cmd.command, cmd.body) == (BACKEND, b"w1", mdp.REQUEST, [b"q"])
    outs = c.on_worker(b"w1", mdp.build_reply(cmd.client, [b"r"]), 0.0)
    assert outs == [(FRONTEND, [b"cli", b"", b"MDPC02", b"\x03", b"echo", b"r"])]


def test_a_partial_does_not_free_credit_the_final_does():
    c = core()
    ready2(c, b"w1")  # no credit frame: one request at a time, as spec 18 has it
    (first,) = sent_requests2(request2(c, b"cli", [b"1"]))
    assert request2(c, b"cli2", [b"2"]) == []
    assert c.queue_depth() == 1
    assert len(answer2(c, b"w1", first[1], [b"p"], final=False)) == 1
    assert c.queue_depth() == 1
    outs = answer2(c, b"w1", first[1], [b"f"])
    assert outs[0][1][0] == b"cli"
    assert [body for _, _, body in sent_requests2(outs[1:])] == [[b"2"]]


def test_worker_lost_after_partials_requeues_to_the_next_worker():
    c = core()
    ready2(c, b"w1")
    (sent,) = sent_requests2(request2(c, b"cli", [b"job"]))
    answer2(c, b"w1", sent[1], [b"half"], final=False)
    c.on_worker(b"w2", mdp.build_ready(b"echo"), 0.0)  # a 7/MDP worker, busy with nothing
    # The v0.2 worker leaves (DISCONNECT is 0x06 in v0.2) before its FINAL.
    outs = c.on_worker(b"w1", [b"", b"MDPW02", b"\x06"], 0.1)
    ((dest, frames),) = outs
    cmd = mdp.parse_broker_message(frames[1:])
    assert (frames[0], cmd.body) == (b"w2", [b"job"])
    assert c.requests_requeued_total == 1 and c.worker_disconnects_total == 1
    # Nothing more is taken from the old worker; the new one completes it.
    assert answer2(c, b"w1", sent[1], [b"stale"]) == [(BACKEND, [b"w1", b"", b"MDPW02", b"\x06"])]
    outs = c.on_worker(b"w2", mdp.build_reply(cmd.client, [b"whole"]), 0.2)
    assert outs == [(FRONTEND, [b"cli", b"", b"MDPC02", b"\x03", b"echo", b"whole"])]


def test_silent_v2_worker_is_heartbeaten_then_expired():
    c = core()
    ready2(c, b"w1")
    sent_requests2(request2(c, b"cli", [b"job"]))
    assert c.tick(HB) == [(BACKEND, [b"w1", b"", b"MDPW02", b"\x05"])]
    c.on_worker(b"w1", [b"", b"MDPW02", b"\x05"], HB)  # its HEARTBEAT keeps it alive
    assert c.workers and c.tick(HB * 3.5)
    assert c.tick(HB * 4.5) == [] and not c.workers
    assert c.worker_expiries_total == 1 and c.queue_depth() == 1


def test_unknown_v2_worker_is_told_to_disconnect_in_its_framing():
    c = core()
    assert c.on_worker(b"w9", [b"", b"MDPW02", b"\x05"], 0.0) == [(BACKEND, [b"w9", b"", b"MDPW02", b"\x06"])]
    assert c.on_worker(b"w9", [b"MDPW02", b"\x05"], 0.0) == [(BACKEND, [b"w9", b"MDPW02", b"\x06"])]
    assert c.on_worker(b"w9", [b"MDPW02", b"\x04", b"a" * 12, b"", b"r"], 0.0) == \
        [(BACKEND, [b"w9", b"MDPW02", b"\x06"])]
    ready2(c, b"w1")
    assert ready2(c, b"w1") == [(BACKEND, [b"w1", b"", b"MDPW02", b"\x06"])]  # READY twice
    assert ready2(c, b"w2", service=b"mmi.x") == [(BACKEND, [b"w2", b"", b"MDPW02", b"\x06"])]
    assert not c.workers
    assert c.disconnect_all() == []
    ready2(c, b"w3", framing=BARE)
    c.on_worker(b"w4", mdp.build_ready(b"echo"), 0.0)
    assert c.disconnect_all() == [(BACKEND, [b"w3", b"MDPW02", b"\x06"]),
                                  (BACKEND, [b"w4", b"", b"MDPW01", b"\x05"])]


def test_majortomo_numbering_is_answered_in_it():
    """majortomo 0.2.0's client numbers its commands as the worker's (REQUEST
    0x02, PARTIAL 0x03, FINAL 0x04) and reads replies without the service
    frame, as majortomo's broker sends them."""
    c = core()
    ready2(c, b"w1")
    (sent,) = sent_requests2(c.on_client(b"mt", [b"", b"MDPC02", b"\x02", b"echo", b"x"], 0.0))
    assert answer2(c, b"w1", sent[1], [b"p"], final=False) == [(FRONTEND, [b"mt", b"", b"MDPC02", b"\x03", b"p"])]
    assert answer2(c, b"w1", sent[1], [b"f"]) == [(FRONTEND, [b"mt", b"", b"MDPC02", b"\x04", b"f"])]
    assert c.on_client(b"mt", [b"MDPC02", b"\x02", b"mmi.service", b"echo"], 0.0) == \
        [(FRONTEND, [b"mt", b"MDPC02", b"\x04", b"200"])]


@pytest.mark.parametrize("framing", [DELIMITED, BARE])
def test_mmi_over_v2(framing):
    c = core()
    ready2(c, b"w1")
    head = framing[1]
    assert request2(c, b"cli", [b"echo"], b"mmi.service", framing) == \
        [(FRONTEND, [b"cli", *head, b"\x03", b"mmi.service", b"200"])]
    assert request2(c, b"cli", [b"nope"], b"mmi.service", framing) == \
        [(FRONTEND, [b"cli", *head, b"\x03", b"mmi.service", b"404"])]
    assert request2(c, b"cli", [], b"mmi.batch", framing) == \
        [(FRONTEND, [b"cli", *head, b"\x03", b"mmi.batch", b"200"])]
    assert request2(c, b"cli", [], b"mmi.other", framing) == \
        [(FRONTEND, [b"cli", *head, b"\x03", b"mmi.other", b"501"])]


def test_v2_client_on_a_keyed_service_is_routed_by_key_to_a_batching_worker():
    c = core()
    c.on_worker(b"w1", mdp.build_ready(b"im", 8, batches=True), 0.0)
    ((dest, frames),) = request2(c, b"cli", [b"ann", b"body"], b"im")
    cmd = mdp.parse_broker_message(frames[1:])
    assert cmd.command == mdp.REQUEST_BATCH and cmd.entries[0][1] == [b"ann", b"body"]
    outs = c.on_worker(b"w1", mdp.build_reply_batch([(cmd.entries[0][0], b"ok")]), 0.0)
    assert outs == [(FRONTEND, [b"cli", b"", b"MDPC02", b"\x03", b"im", b"ok"])]
    # Without a key it is dropped and counted, as for 7/MDP.
    assert request2(c, b"cli", [], b"im") == []
    assert c.malformed_total == 1


def test_a_worker_keeps_the_framing_of_its_ready():
    c = core()
    ready2(c, b"w1")
    (sent,) = sent_requests2(request2(c, b"cli", [b"x"]))
    # A 7/MDP REPLY (or a bare v0.2 FINAL) from a worker that said READY in
    # delimited v0.2 is dropped and counted; the request stays in flight.
    assert c.on_worker(b"w1", mdp.build_reply(sent[1], [b"r"]), 0.0) == []
    assert answer2(c, b"w1", sent[1], [b"r"], framing=BARE) == []
    assert c.malformed_total == 2 and c.in_flight() == 1
    assert len(answer2(c, b"w1", sent[1], [b"r"])) == 1


@pytest.mark.parametrize("frames", [
    [b"", b"MDPC02"],
    [b"", b"MDPC02", b"\x01"],                   # no service
    [b"", b"MDPC02", b"\x03", b"echo", b"x"],    # FINAL (PARTIAL for majortomo) is broker → client only
    [b"", b"MDPC02", b"\x04", b"echo", b"x"],
    [b"", b"MDPC02", b"\x01", b"", b"x"],        # empty service name
    [b"MDPC02"],
    [b"MDPC03", b"\x01", b"echo", b"x"],
    [b"x", b"MDPC01", b"echo", b"x"],            # 7/MDP needs its empty first frame
    [b"MDPC01", b"echo", b"x"],
])
def test_malformed_v2_client_messages_change_nothing(frames):
    c = core()
    ready2(c, b"w1")
    assert c.on_client(b"cli", frames, 0.0) == []
    assert c.malformed_total == 1 and c.requests_total == 0 and c.in_flight() == 0


@pytest.mark.parametrize("frames", [
    [b"", b"MDPW02"],
    [b"", b"MDPW02", b"\x07"],
    [b"", b"MDPW02", b"\x02", b"c", b"", b"x"],           # REQUEST is broker → worker only
    [b"", b"MDPW02", b"\x01"],
    [b"", b"MDPW02", b"\x01", b"echo", b"1", b"batch"],   # batches are 7/MDP only
    [b"", b"MDPW02", b"\x01", b"echo", b"many"],
    [b"", b"MDPW02", b"\x04", b"c"],
    [b"", b"MDPW02", b"\x04", b"c", b"not-empty", b"x"],
    [b"", b"MDPW02", b"\x03", b"", b"", b"x"],
    [b"", b"MDPW02", b"\x05", b"extra"],
    [b"MDPW02", b"\x06", b"extra"],
    [b"", b"MDPW01", b"\x06"],                            # 0x06 is nothing in 7/MDP
])
def test_malformed_v2_worker_messages_change_nothing(frames):
    c = core()
    assert c.on_worker(b"w1", frames, 0.0) == []
    assert not c.workers and c.malformed_total == 1


def test_drops_are_logged_once_per_reason_per_interval_with_the_count(caplog):
    c = core()
    with caplog.at_level(logging.INFO, logger="simzmq.broker"):
        for i in range(5):
            c.on_client(b"cli", [b"", b"MDPC09", b"echo"], 0.1 * i)
        c.on_client(b"cli", [b"", b"MDPC02", b"\x07", b"echo"], 0.5)
        c.on_worker(b"w1", [b"", b"MDPW02", b"\x07"], 0.5)
        c.on_client(b"cli", [b"", b"MDPC09", b"echo"], DROP_LOG_INTERVAL_S + 0.5)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert c.malformed_total == 8
    assert len(lines) == 4, lines
    assert lines[0].startswith("dropped a client message from 636c69: wrong protocol header")
    assert "unknown command" in lines[1] and "client" in lines[1]
    assert lines[2].startswith("dropped a worker message from 7731: unknown command")
    assert lines[3].endswith("(4 more dropped for this reason since the last line)")
