"""The group_writes limit (docs/security.md, "Groups"): which requests count,
per user, refused and then kicked like any other flood; driven through the
session rules with a fake clock, transport and back end."""

from __future__ import annotations

import dataclasses

import pytest

from simzmq import gate as gate_mod
from simzmq.gate_session import writes_to_group
from simzmq.limits import GROUP_WRITES, LIMIT_NAMES, Limiter, LimitsConfig, Verdict
from simzmq.wire import messages as m
from simzmq.wire.messages import ErrorCode, KickCode
from tests.unit.test_fuzz_gate import GATE_CFG, GATE_SK, FakeBackend, FakeLoop
from tests.unit.test_gate_session import logged_in, send

GROUP = "#g1"


def group_gate(per_s=1.0, burst=3, abuse_factor=2.0):
    loop = FakeLoop()
    limits = dataclasses.replace(GATE_CFG.limits, requests_per_s=1000.0, requests_burst=1000, sends_per_s=1000.0,
                                 sends_burst=1000, max_pending_requests=1000, group_writes_per_s=per_s,
                                 group_writes_burst=burst, abuse_factor=abuse_factor)
    gate = gate_mod.Gate("t", dataclasses.replace(GATE_CFG, limits=limits), GATE_SK, [],
                         clock=lambda: loop.now, loop=loop)
    gate.backend = FakeBackend()
    return gate, loop


@pytest.mark.parametrize("msg, counts", [
    (m.Send(to=GROUP, cmid=b"c", body=b"x"), True),
    (m.GroupCreate(group=GROUP, title="t", members=["bob"]), True),
    (m.GroupAdd(group=GROUP, users=["bob"], cmid=b"c"), True),
    (m.GroupRemove(group=GROUP, users=["bob"], cmid=b"c"), True),
    (m.GroupTitle(group=GROUP, title="t", cmid=b"c"), True),
    (m.Send(to="bob", cmid=b"c", body=b"x"), False),
    (m.GroupGet(group=GROUP), False),
    (m.Read(peer=GROUP, msg_id=1), False),
    (m.Sync(), False),
])
def test_what_writes_to_a_group(msg, counts):
    assert writes_to_group(msg) is counts


def test_config_keys_and_limit_name():
    cfg = LimitsConfig.from_mapping({"group_writes_per_s": 3, "group_writes_burst": 7})
    assert (cfg.group_writes_per_s, cfg.group_writes_burst) == (3.0, 7)
    assert GROUP_WRITES == "group_writes" and GROUP_WRITES in LIMIT_NAMES
    with pytest.raises(ValueError):
        LimitsConfig.from_mapping({"group_writes_burst": -1})


def test_limiter_per_user_burst_refill_and_abuse():
    limiter = Limiter(LimitsConfig(group_writes_per_s=1.0, group_writes_burst=2, abuse_factor=2.0))
    assert [limiter.group_write("alice", 0.0) for _ in range(3)] == [Verdict.ALLOW, Verdict.ALLOW, Verdict.LIMIT]
    assert limiter.group_write("bob", 0.0) == Verdict.ALLOW  # per user
    assert limiter.group_write("alice", 1.0) == Verdict.ALLOW  # a second refills one
    # Strikes past abuse_factor x burst (4) more: abuse.
    verdicts = [limiter.group_write("alice", 1.0) for _ in range(5)]
    assert verdicts[:4] == [Verdict.LIMIT] * 4 and verdicts[4] == Verdict.ABUSE
    # Forgotten once full again.
    assert limiter.prune(100.0)["group_writes"] == 0


def test_group_sends_and_changes_share_the_budget_one_to_one_sends_do_not():
    gate, loop = group_gate(per_s=1.0, burst=3)
    c = logged_in(gate)
    requests = [m.Send(to=GROUP, cmid=b"s1", body=b"x"), m.GroupAdd(group=GROUP, users=["bob"], cmid=b"a1"),
                m.GroupTitle(group=GROUP, title="t", cmid=b"t1")]
    for ref, msg in enumerate(requests, 1):
        c.forwarded(gate, msg, ref=ref)
    before = len(gate.backend.pending)
    ref, reply, _ = send(c, m.Send(to=GROUP, cmid=b"s2", body=b"x"), 10)
    assert ref == 10 and reply.code == ErrorCode.RATE_LIMITED
    assert send(c, m.GroupRemove(group=GROUP, users=["bob"], cmid=b"r1"), 11)[1].code == ErrorCode.RATE_LIMITED
    assert len(gate.backend.pending) == before  # nothing over the limit reaches the back end
    # Reads and one-to-one Sends go on.
    c.forwarded(gate, m.Send(to="bob", cmid=b"o1", body=b"x"), ref=12)
    c.forwarded(gate, m.GroupGet(group=GROUP), ref=13)
    loop.advance(1.0)
    c.forwarded(gate, m.Send(to=GROUP, cmid=b"s3", body=b"x"), ref=14)
    assert gate.limiter.group_writes.entries["alice"].tokens < 1


def test_a_flood_far_over_the_limit_is_kicked_for_abuse():
    gate, _ = group_gate(per_s=1.0, burst=2, abuse_factor=2.0)
    c = logged_in(gate)
    for ref in range(1, 3):
        c.forwarded(gate, m.Send(to=GROUP, cmid=b"s%d" % ref, body=b"x"), ref=ref)
    codes = []
    for ref in range(3, 20):
        out = send(c, m.Send(to=GROUP, cmid=b"s%d" % ref, body=b"x"), ref)
        codes.append(out[1])
        if c.transport.closed:
            break
    assert all(r.code == ErrorCode.RATE_LIMITED for r in codes[:-1])
    assert isinstance(codes[-1], m.Kick) and codes[-1].code == KickCode.ABUSE
