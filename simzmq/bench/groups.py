"""`simzmq bench groups`: one group, its members spread over the region's
gates, one or more of them sending to it.

Setup (not measured): the ``users`` members register and log in, member i on
gate i mod gates (every gate of the region's pid files; only the given one
with --port), each in generator process i mod procs. Every member but the
owner (member 0) writes once to the owner, which makes the owner one of its
contacts, who may put it in a group (protocol.md section 7); then the owner
creates the group with all of them.

Measured: members 0 … senders-1 each send ``messages`` 100-byte messages to
the group, keeping ``window`` Sends unacknowledged or paced at a total
offered ``rate``, as in pairs. A message is pushed to every member's
connection but the one that sent it: users - 1 member copies.

* delivered member-messages/s: those pushes, from the first Send to the last
  push;
* region CPU per member copy: the region's CPU in that window over those
  pushes, comparable to pairs' CPU per delivered message (one recipient's
  copy there, one member's here);
* send→push latency to the last member: per message, from its Send to the
  push that reached the last of its users - 1 members (the send time travels
  in the body; all processes share the machine's monotonic clock); messages
  that some member did not get as a push are counted apart;
* send→push of every copy, and send→SendOk.

The check, through Sync, by every member: each sender's acknowledged messages
exactly once and in the order sent, no gap in the member's seqs (as pairs),
and the group's messages in one and the same order for every member: all of
them, in msg_id order.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
from array import array

from simzmq.bench.check import percentiles
from simzmq.bench.load import BODY_HEAD, Receiver
from simzmq.bench.plan import F_SETUP, BenchError, Flow, Options, Plan, user_name
from simzmq.wire import messages as m

CONTACT_BODY = b"bench: so that the owner may put me in the group"
GROUP_TITLE = "simzmq bench"


def group_id(prefix: str) -> str:
    return f"#{prefix}-g"


def members_of(opts: Options) -> list[str]:
    """The members in join order; the first is the owner."""
    return [user_name(opts.prefix, i) for i in range(opts.resolved_users())]


def plan_members(opts: Options, plans: list[Plan]) -> None:
    """Member i in process i mod procs, on gate i mod gates; members
    0 … senders-1 send. Every member checks every sender's messages."""
    members = members_of(opts)
    group = group_id(opts.prefix)
    expected = {members[i]: opts.messages for i in range(opts.senders)}
    for i, member in enumerate(members):
        plan = plans[i % opts.procs]
        plan.users.append(member)
        plan.receivers[member] = dict(expected)
        if opts.gate_ports:
            plan.ports[member] = opts.gate_ports[i % len(opts.gate_ports)]
        if i < opts.senders:
            plan.flows.append(Flow(member, group, opts.messages))


def expected_copies(opts: Options) -> int:
    """Member copies to push: every message to every member but its sender."""
    return opts.senders * opts.messages * (opts.resolved_users() - 1)


# --- the generator side ---------------------------------------------------------------


class Arrivals:
    """Per message of each sender: when its push reached the last of this
    process's members, and how many of them it reached."""

    def __init__(self, counts: dict[str, int]):
        self.sent = {s: array("d", bytes(8 * n)) for s, n in counts.items()}
        self.last = {s: array("d", bytes(8 * n)) for s, n in counts.items()}
        self.copies = {s: array("I", bytes(4 * n)) for s, n in counts.items()}

    def note(self, sender: str, k: int, t_sent: float, now: float) -> None:
        copies = self.copies.get(sender)
        if copies is None or k >= len(copies):
            return
        copies[k] += 1
        self.sent[sender][k] = t_sent
        if now > self.last[sender][k]:
            self.last[sender][k] = now

    def result(self) -> dict:
        return {s: (self.sent[s].tobytes(), self.last[s].tobytes(), self.copies[s].tobytes()) for s in self.sent}


class MemberReceiver(Receiver):
    """A member: counts the pushes of the others' messages to the group (its
    own are not pushed to the connection that sent them), notes when each
    arrived, and at the check reads the group's messages in inbox order."""

    __slots__ = ("arrivals", "group", "order")

    def __init__(self, worker, user: str, expected: dict[str, int], arrivals: Arrivals, group: str):
        super().__init__(worker, user, expected)
        self.total = sum(n for sender, n in expected.items() if sender != user)
        self.done = self.total == 0
        self.arrivals = arrivals
        self.group = group
        self.order = array("Q")  # msg_ids of the group's bench messages, in this inbox's seq order

    def on_push(self, push) -> None:
        if type(push) is m.NewMsg and push.msg.to != self.group:
            self.other_pushes += 1  # the contacts' one-to-one messages, to the owner
            return
        super().on_push(push)

    def counted(self, msg: m.Msg, now: float) -> None:
        _, k, t_sent = BODY_HEAD.unpack_from(msg.body)
        self.arrivals.note(msg.sender, k, t_sent, now)

    def synced(self, msg: m.Msg, bench_message: bool) -> None:
        if bench_message and msg.to == self.group:
            self.order.append(msg.msg_id)


def order_digest(ids: array) -> str:
    return hashlib.sha256(ids.tobytes()).hexdigest()


def orders_of(members: list[MemberReceiver]) -> dict:
    """Each member's order of the group's messages, each distinct one once."""
    lists: dict[str, bytes] = {}
    rows = []
    for r in members:
        digest = order_digest(r.order)
        lists.setdefault(digest, r.order.tobytes())
        rows.append((r.user, digest, all(a < b for a, b in itertools.pairwise(r.order))))
    return {"lists": lists, "members": rows}


async def run_members(worker) -> dict:
    """One generator process's share: its members, their contacts and the
    group's creation (by the process that runs the owner), then the traffic."""
    opts = worker.opts
    group = group_id(opts.prefix)
    members = members_of(opts)
    owner = members[0]
    arrivals = Arrivals({members[i]: opts.messages for i in range(opts.senders)})
    made: list[MemberReceiver] = []

    def make_receiver(w, user, expected):
        r = MemberReceiver(w, user, expected, arrivals, group)
        made.append(r)
        return r

    async def prepare(sessions: dict) -> None:
        await asyncio.gather(*(_write_to_owner(worker, conn, owner) for name, (conn, _) in sessions.items()
                               if name != owner))
        # Everyone's contact is stored before the owner puts them in.
        await worker.barrier("contacts")
        if owner in sessions:
            await _create(worker, sessions[owner][0], group, members)

    result = await worker.traffic(make_receiver, prepare)
    result["group"] = {"arrivals": arrivals.result(), "orders": orders_of(made)}
    return result


async def _write_to_owner(worker, conn, owner: str) -> None:
    await worker.request_retrying(conn, m.Send(to=owner, cmid=secrets.token_bytes(16), kind=0, body=CONTACT_BODY))
    worker.counters[worker.row + F_SETUP] += 1


async def _create(worker, conn, group: str, members: list[str]) -> None:
    from simzmq.client import RequestError
    try:
        info = await worker.request_retrying(conn, m.GroupCreate(group=group, title=GROUP_TITLE, members=members[1:]))
    except RequestError as exc:
        # too_large: more members than the region's max_group_members.
        raise BenchError(f"cannot create the group of {len(members)}: {exc}") from None
    if len(info.members) != len(members):
        raise BenchError(f"the group has {len(info.members)} members, not {len(members)}")
    worker.counters[worker.row + F_SETUP] += 1


# --- the coordinator side (pure) -------------------------------------------------------


def last_member_latency(results: list[dict], copies_each: int) -> tuple[array, int]:
    """Per message, merged over the processes: seconds from its Send to the
    push that reached the last member, for the messages pushed to all
    ``copies_each`` members; and how many were not."""
    merged: dict[str, tuple[array, array, array]] = {}
    for r in results:
        for sender, raw in r["group"]["arrivals"].items():
            sent, last, copies = array("d"), array("d"), array("I")
            for arr, data in zip((sent, last, copies), raw):
                arr.frombytes(data)
            if sender not in merged:
                merged[sender] = (sent, last, copies)
                continue
            m_sent, m_last, m_copies = merged[sender]
            for k, n in enumerate(copies):
                if n:
                    m_sent[k] = sent[k]
                    m_last[k] = max(m_last[k], last[k])
                    m_copies[k] += n
    latencies = array("d")
    short = 0
    for sent, last, copies in merged.values():
        for k, n in enumerate(copies):
            if n >= copies_each:
                latencies.append(last[k] - sent[k])
            else:
                short += 1
    return latencies, short


def order_agreement(results: list[dict]) -> dict:
    """Do all members hold the group's messages in one order? The reference
    is every message any member holds, in msg_id order (the order the store
    numbers a group's messages in); a member ``differs`` if its inbox does not
    hold exactly that, and is ``out_of_msg_id_order`` if its seqs and msg_ids
    disagree."""
    lists: dict[str, bytes] = {}
    rows = []
    for r in results:
        lists.update(r["group"]["orders"]["lists"])
        rows += r["group"]["orders"]["members"]
    every = set()
    for data in lists.values():
        ids = array("Q")
        ids.frombytes(data)
        every.update(ids)
    reference = order_digest(array("Q", sorted(every)))
    return {"members": len(rows), "messages": len(every),
            "differing": sum(1 for _, digest, _ in rows if digest != reference),
            "out_of_msg_id_order": sum(1 for *_, ordered in rows if not ordered)}


def add_to_report(report: dict, opts: Options, results: list[dict]) -> None:
    """What the groups scenario adds to the pairs-shaped report."""
    n = opts.resolved_users()
    latencies, short = last_member_latency(results, n - 1)
    report["group"] = {"id": group_id(opts.prefix), "members": n, "senders": opts.senders,
                       "gates": len(opts.gate_ports) or 1, "expected_copies": expected_copies(opts)}
    report["latency_ms"]["send_to_last_member"] = percentiles(latencies)
    report["counts"]["not_pushed_to_every_member"] = short
    agreement = order_agreement(results)
    check = report["check"]
    check["same_order"] = agreement
    check["ok"] = check["ok"] and not agreement["differing"] and not agreement["out_of_msg_id_order"]


def report_head(r: dict) -> str:
    g = r["group"]
    return (f", a group of {g['members']} members on {g['gates']} gate(s), {g['senders']} sender(s)")


def report_rows(r: dict, fmt_lat) -> list[tuple[str, str]]:
    c, agreement = r["counts"], r["check"]["same_order"]
    return [("send→push to the last member ms", fmt_lat(r["latency_ms"]["send_to_last_member"])),
            ("messages not pushed to every member", f"{c['not_pushed_to_every_member']}"),
            ("same order for every member", (f"{'OK' if not agreement['differing'] else 'FAILED'}: "
                                             f"{agreement['members']} members, {agreement['messages']} messages, "
                                             f"differing {agreement['differing']}, out of msg_id order "
                                             f"{agreement['out_of_msg_id_order']}"))]
