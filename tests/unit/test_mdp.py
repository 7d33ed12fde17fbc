import pytest
from hypothesis import given
from hypothesis import strategies as st

from simzmq import mdp


def test_client_request_round_trip():
    frames = mdp.build_client_request(b"im", [b"ann", b"corr"])
    assert frames == [b"", b"MDPC01", b"im", b"ann", b"corr"]
    assert mdp.parse_client_request(frames) == (b"im", [b"ann", b"corr"])


def test_client_reply_round_trip_with_empty_body():
    frames = mdp.build_client_reply(b"echo", [])
    assert mdp.parse_client_reply(frames) == (b"echo", [])


@pytest.mark.parametrize("frames", [
    [],
    [b""],
    [b"", b"MDPC01"],
    [b"x", b"MDPC01", b"im"],
    [b"", b"MDPC02", b"im"],
    [b"", b"MDPW01", b"im"],
    [b"", b"MDPC01", b""],
    [b"", b"MDPC01", b"s" * 256],
])
def test_malformed_client_messages(frames):
    with pytest.raises(mdp.MDPError):
        mdp.parse_client_request(frames)


def test_ready_plain_and_with_credit():
    plain = mdp.parse_worker_message(mdp.build_ready(b"echo"))
    assert (plain.command, plain.service, plain.credit) == (mdp.READY, b"echo", 1)
    credited = mdp.parse_worker_message(mdp.build_ready(b"im", 256))
    assert (credited.command, credited.service, credited.credit) == (mdp.READY, b"im", 256)
    assert mdp.build_ready(b"im", 256)[-1] == b"256"


@pytest.mark.parametrize("credit", [b"", b"0", b"-1", b"abc", b"1.5", b"99999999", b"65537", b" 1"])
def test_bad_credit(credit):
    with pytest.raises(mdp.MDPError):
        mdp.parse_worker_message([b"", b"MDPW01", mdp.READY, b"im", credit])


def test_reply_and_request_round_trip():
    reply = mdp.parse_worker_message(mdp.build_reply(b"client-1", [b"a", b""]))
    assert (reply.command, reply.client, reply.body) == (mdp.REPLY, b"client-1", [b"a", b""])
    request = mdp.parse_broker_message(mdp.build_request(b"client-1", [b"k", b"v"]))
    assert (request.command, request.client, request.body) == (mdp.REQUEST, b"client-1", [b"k", b"v"])


def test_heartbeat_and_disconnect_both_ways():
    for build, command in ((mdp.build_heartbeat, mdp.HEARTBEAT), (mdp.build_disconnect, mdp.DISCONNECT)):
        assert mdp.parse_worker_message(build()).command == command
        assert mdp.parse_broker_message(build()).command == command


@pytest.mark.parametrize("frames", [
    [b"", b"MDPW01"],
    [b"", b"MDPW01", b"\x09"],
    [b"", b"MDPW01", mdp.REQUEST, b"c", b"", b"body"],  # REQUEST is broker → worker only
    [b"", b"MDPW01", mdp.READY],
    [b"", b"MDPW01", mdp.READY, b""],
    [b"", b"MDPW01", mdp.READY, b"im", b"1", b"batch", b"extra"],
    [b"", b"MDPW01", mdp.REPLY_BATCH],
    [b"", b"MDPW01", mdp.REPLY_BATCH, b"c"],
    [b"", b"MDPW01", mdp.REPLY_BATCH, b"", b"body"],
    [b"", b"MDPW01", mdp.REQUEST_BATCH, b"c", b"k", b"body"],  # broker → worker only
    [b"", b"MDPW01", mdp.REPLY, b"c"],
    [b"", b"MDPW01", mdp.REPLY, b"c", b"not-empty", b"body"],
    [b"", b"MDPW01", mdp.REPLY, b"", b"", b"body"],
    [b"", b"MDPW01", mdp.HEARTBEAT, b"extra"],
    [b"", b"MDPC01", mdp.HEARTBEAT],
    [b"junk", b"MDPW01", mdp.HEARTBEAT],
])
def test_malformed_worker_messages(frames):
    with pytest.raises(mdp.MDPError):
        mdp.parse_worker_message(frames)


def test_worker_cannot_be_sent_ready():
    with pytest.raises(mdp.MDPError):
        mdp.parse_broker_message(mdp.build_ready(b"im"))


@given(st.lists(st.binary(max_size=12), max_size=8))
def test_parsers_raise_only_mdp_error(frames):
    for parse in (mdp.parse_client_request, mdp.parse_worker_message, mdp.parse_broker_message,
                  mdp.parse_client_to_broker):
        try:
            parse(frames)
        except mdp.MDPError:
            pass


# --- the worker session's pure bookkeeping ---------------------------------

from simzmq.mdpworker import WorkerProtocol  # noqa: E402


def test_worker_heartbeats_only_when_quiet():
    p = WorkerProtocol(heartbeat_interval=0.25, liveness=3, now=0.0)
    assert not p.heartbeat_due(0.2)
    assert p.heartbeat_due(0.25)
    p.sent(0.3)  # a reply went out
    assert not p.heartbeat_due(0.5)
    assert p.heartbeat_due(0.55)


def test_worker_reconnects_after_broker_silence():
    p = WorkerProtocol(heartbeat_interval=0.25, liveness=3, now=0.0)
    p.heard(0.5)
    assert not p.broker_silent(1.24)
    assert p.broker_silent(1.25)
    p.reset(2.0)
    assert not p.broker_silent(2.5)


def test_worker_disconnect_means_reconnect_at_next_tick():
    p = WorkerProtocol(heartbeat_interval=0.25, liveness=3, now=0.0)
    p.disconnected()
    p.heard(0.1)  # a late heartbeat does not cancel it
    assert p.broker_silent(0.1)
    p.reset(0.2)
    assert not p.reconnect_requested and not p.broker_silent(0.3)


def test_batch_announcements():
    assert mdp.parse_worker_message(mdp.build_ready(b"im", 256)).batches is False
    ready = mdp.parse_worker_message(mdp.build_ready(b"im", 256, batches=True))
    assert (ready.service, ready.credit, ready.batches) == (b"im", 256, True)
    # Feature words it does not know are ignored, not refused.
    ready = mdp.parse_worker_message([b"", b"MDPW01", mdp.READY, b"im", b"5", b"zstd batch"])
    assert (ready.credit, ready.batches) == (5, True)
    assert mdp.parse_worker_message([b"", b"MDPW01", mdp.READY, b"im", b"5", b"zstd"]).batches is False


def test_batch_round_trips():
    request = mdp.parse_broker_message(mdp.build_request_batch([(b"c1", b"k1", b"v1"), (b"c2", b"k2", b"v2")]))
    assert request.command == mdp.REQUEST_BATCH
    assert request.entries == [(b"c1", [b"k1", b"v1"]), (b"c2", [b"k2", b"v2"])]
    reply = mdp.parse_worker_message(mdp.build_reply_batch([(b"c1", b"r1"), (b"c2", b"")]))
    assert (reply.command, reply.entries) == (mdp.REPLY_BATCH, [(b"c1", b"r1"), (b"c2", b"")])
    frames = mdp.build_client_batch(b"im", [(b"k1", b"v1"), (b"k2", b"v2")])
    assert mdp.parse_client_message(frames) == (True, b"im", [b"k1", b"v1", b"k2", b"v2"])
    assert mdp.parse_client_message(mdp.build_client_reply_batch(b"im", [b"a", b"b"])) == (True, b"im", [b"a", b"b"])
    assert mdp.parse_client_message(mdp.build_client_request(b"im", [b"k", b"v"])) == (False, b"im", [b"k", b"v"])


@pytest.mark.parametrize("frames", [
    [b"", mdp.C_BATCH, b"im"],               # no entries
    [b"", mdp.C_BATCH],
    [b"x", mdp.C_BATCH, b"im", b"k", b"v"],
    [b"", b"MDPC01C", b"im", b"k", b"v"],
])
def test_malformed_client_batches(frames):
    with pytest.raises(mdp.MDPError):
        mdp.parse_client_message(frames)


def test_request_batch_entries_are_whole():
    with pytest.raises(mdp.MDPError):
        mdp.parse_broker_message([b"", b"MDPW01", mdp.REQUEST_BATCH, b"c", b"k"])


# --- 18/MDP (Majordomo v0.2), as the broker reads it ------------------------


def test_client_to_broker_tells_the_framings_apart():
    assert mdp.parse_client_to_broker([b"", b"MDPC01", b"echo", b"x"]) == (mdp.MDP1, False, b"echo", [b"x"])
    assert mdp.parse_client_to_broker([b"", b"MDPC02", b"\x01", b"echo", b"x"]) == (mdp.MDP2, False, b"echo", [b"x"])
    assert mdp.parse_client_to_broker([b"MDPC02", b"\x01", b"echo"]) == (mdp.MDP2_BARE, False, b"echo", [])
    # majortomo 0.2.0 sends REQUEST as 0x02 (spec 18's PARTIAL, which no client sends).
    majortomo = mdp.parse_client_to_broker([b"", b"MDPC02", b"\x02", b"echo", b"x"])
    assert majortomo == (mdp.Framing(True, True, True), False, b"echo", [b"x"])
    batch = mdp.parse_client_to_broker(mdp.build_client_batch(b"im", [(b"k", b"v")]))
    assert batch == (mdp.MDP1, True, b"im", [b"k", b"v"])


def test_v2_worker_commands_map_onto_the_broker_s():
    ready = mdp.parse_worker_message([b"", b"MDPW02", mdp.W2_READY, b"echo"])
    assert (ready.command, ready.service, ready.credit, ready.framing) == (mdp.READY, b"echo", 1, mdp.MDP2)
    assert mdp.parse_worker_message([b"MDPW02", mdp.W2_READY, b"echo", b"7"]).credit == 7
    partial = mdp.parse_worker_message([b"MDPW02", mdp.W2_PARTIAL, b"c", b"", b"a", b"b"])
    assert (partial.command, partial.client, partial.body, partial.final) == (mdp.REPLY, b"c", [b"a", b"b"], False)
    final = mdp.parse_worker_message([b"", b"MDPW02", mdp.W2_FINAL, b"c", b""])
    assert (final.command, final.body, final.final) == (mdp.REPLY, [], True)
    assert mdp.parse_worker_message([b"", b"MDPW02", mdp.W2_HEARTBEAT]).command == mdp.HEARTBEAT
    assert mdp.parse_worker_message([b"MDPW02", mdp.W2_DISCONNECT]).command == mdp.DISCONNECT


def test_broker_heads_in_each_framing():
    assert mdp.worker_command_head(mdp.MDP1, mdp.REQUEST) == (b"", b"MDPW01", b"\x02")
    assert mdp.worker_command_head(mdp.MDP2, mdp.HEARTBEAT) == (b"", b"MDPW02", b"\x05")
    assert mdp.worker_command_head(mdp.MDP2_BARE, mdp.DISCONNECT) == (b"MDPW02", b"\x06")
    assert mdp.client_reply_head(mdp.MDP1, b"s", False) == (b"", b"MDPC01", b"s")  # 7/MDP has no parts
    assert mdp.client_reply_head(mdp.MDP2, b"s", False) == (b"", b"MDPC02", b"\x02", b"s")
    assert mdp.client_reply_head(mdp.MDP2_BARE, b"s") == (b"MDPC02", b"\x03", b"s")
    # majortomo's numbering (the worker's), and no service frame, as its broker answers.
    majortomo = mdp.MDP2._replace(majortomo=True)
    assert mdp.client_reply_head(majortomo, b"s", False) == (b"", b"MDPC02", b"\x03")
    assert mdp.client_reply_head(majortomo, b"s") == (b"", b"MDPC02", b"\x04")


@pytest.mark.parametrize("frames, reason", [
    ([b""], mdp.TOO_FEW_FRAMES),
    ([b"x", b"MDPC01", b"im"], mdp.NO_DELIMITER),
    ([b"MDPC01", b"im", b"body"], mdp.NO_DELIMITER),
    ([b"", b"MDPC07", b"im"], mdp.WRONG_HEADER),
    ([b"", b"MDPC02", b"\x09", b"im"], mdp.UNKNOWN_COMMAND),
    ([b"", b"MDPC02", b"\x01", b""], mdp.BAD_SERVICE),
    ([b"", b"MDPC01B", b"im"], mdp.BAD_BATCH),
])
def test_client_errors_name_their_reason(frames, reason):
    with pytest.raises(mdp.MDPError) as info:
        mdp.parse_client_to_broker(frames)
    assert info.value.reason == reason
