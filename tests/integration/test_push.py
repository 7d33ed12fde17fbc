"""The push service end to end: a real region (`simzmq up --webhook`) calling
a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simzmq.client import Client, new_group_id
from simzmq.push import webhook
from simzmq.store import open_store
from tests.region import ROOT, Region, free_ports

pytestmark = pytest.mark.timeout(300)

SECRET = "test-secret"
DELAY_MS = 4000  # a user who logs in within this gets no call


class Receiver:
    """A webhook receiver: records every call; `answer(body)` says what to do
    (a status, or "hang" to answer nothing for a long time)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_ports(1)[0]
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        self.answer = lambda body: 200
        self.server = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                call = {"body": body, "raw": raw, "delivery": self.headers.get(webhook.DELIVERY_HEADER),
                        "signature": self.headers.get(webhook.SIGNATURE_HEADER), "at": time.monotonic()}
                what = receiver.answer(body)
                if what == "hang":
                    time.sleep(30)
                    what = 200
                call["status"] = what
                with receiver.lock:
                    receiver.calls.append(call)
                self.send_response(what)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def for_user(self, user: str, ok_only: bool = True) -> list[dict]:
        with self.lock:
            return [c for c in self.calls if c["body"]["user"] == user and (c["status"] == 200 or not ok_only)]


def push_env(receiver: Receiver, **more) -> dict:
    # A loaded machine must not make a broker take its peer for dead, nor a
    # gate give up on a Register whose password hashing waits for a core.
    env = {"SIMZMQ_BROKER_HEARTBEAT_MS": "1000", "SIMZMQ_GATE_REQUEST_TIMEOUT_S": "20",
           "SIMZMQ_PUSH_DELAY_MS": str(DELAY_MS), "SIMZMQ_PUSH_PRESENCE_INTERVAL_S": "1",
           "SIMZMQ_PUSH_BACKOFF_MIN_MS": "200", "SIMZMQ_PUSH_BACKOFF_MAX_MS": "1000",
           "SIMZMQ_PUSH_TIMEOUT_S": "2", "SIMZMQ_PUSH_LEASE_S": "5", "SIMZMQ_PUSH_SCAN_INTERVAL_MS": "200"}
    env.update({f"SIMZMQ_PUSH_{k.upper()}": str(v) for k, v in more.items()})
    return env


def start_region(path: Path, receiver: Receiver, **more) -> Region:
    r = Region(path, extra_env=push_env(receiver, **more))
    r.argv += ["--webhook", receiver.url, "--webhook-secret", SECRET, "--open-registration"]
    return r.start(timeout=60)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def region(tmp_path_factory, receiver):
    r = start_region(tmp_path_factory.mktemp("push") / "data", receiver)
    yield r
    r.stop()


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


_counter = [0]


def fresh(prefix: str) -> str:
    _counter[0] += 1
    return f"{prefix}{_counter[0]}-{os.getpid()}"


async def client(region, name, register=True) -> Client:
    c = Client("127.0.0.1", region.gate_port, region.gate_pk, name, password="pw-" + name)
    if register:
        await c.register()
    await c.login()
    return c


async def offline_user(region, name) -> None:
    c = await client(region, name)
    await c.close()


async def message_to_offline(region, bob: str, text: bytes, alice: str | None = None):
    """Register `bob` (and leave him offline); a new user sends him `text`."""
    await offline_user(region, bob)
    a = await client(region, alice or fresh("alice"))
    ok = await a.send(bob, text)
    await a.close()
    return ok


def wait_for(predicate, timeout=60.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def region_store(region):
    """The region's store, opened here (Postgres when the suite runs on it)."""
    return open_store(region.store or f"sqlite:///{region.data_dir / 'im.db'}")


def outbox_holds(region, msg_ids) -> bool:
    store = region_store(region)
    try:
        rows = store._execute("SELECT msg_id FROM push_outbox", ()).fetchall()
    finally:
        store.close()
    return bool({r[0] for r in rows} & set(msg_ids))


def test_an_offline_recipient_gets_exactly_one_signed_call(region, receiver):
    alice, bob = fresh("alice"), fresh("bob")

    ok = run(message_to_offline(region, bob, "hello bob, ".encode() + "é".encode() * 200, alice))
    (call,) = wait_for(lambda: receiver.for_user(bob), what="the call")
    assert call["signature"] == webhook.signature(SECRET, call["raw"])
    assert call["delivery"] == f"{bob}:{ok.msg_id}"
    assert call["body"] == {"user": bob, "msg_id": ok.msg_id, "seq": 1, "sender": alice, "kind": 0,
                            "ts_ms": ok.ts_ms, "preview": ("hello bob, " + "é" * 200)[:100], "unread": 1,
                            "group": ""}
    wait_for(lambda: not outbox_holds(region, [ok.msg_id]), what="the job to leave the outbox")
    time.sleep(1.0)
    assert len(receiver.for_user(bob, ok_only=False)) == 1


def test_an_online_recipient_gets_no_call(region, receiver):
    alice, bob = fresh("alice"), fresh("bob")

    async def go():
        b = await client(region, bob)
        a = await client(region, alice)
        ok = await a.send(bob, b"are you there?")
        await a.close()
        await asyncio.to_thread(wait_for, lambda: not outbox_holds(region, [ok.msg_id]), 60, "the decision")
        await b.close()
    run(go())
    time.sleep(0.5)
    assert receiver.for_user(bob, ok_only=False) == []


def test_a_recipient_who_fetches_before_the_job_is_due_gets_no_call(region, receiver):
    bob = fresh("bob")

    async def go():
        ok = await message_to_offline(region, bob, b"catch this")
        b = await client(region, bob, register=False)
        await b.sync()  # fetches it (login may have, too)
        assert b.inbox.max_contiguous == 1
        await b.sync()  # Sync(since=1) says it has it: the delivered mark
        await b.close()  # offline again before the job is due
        return ok
    ok = run(go())
    wait_for(lambda: not outbox_holds(region, [ok.msg_id]), what="the decision")
    time.sleep(0.5)
    assert receiver.for_user(bob, ok_only=False) == []


def test_a_group_message_wakes_offline_members_only_and_group_events_wake_nobody(region, receiver):
    """alice and carl stay online; bob and dave are offline. Every group
    event (created, title, added, removed) reaches bob or dave: none makes a
    call. The group message makes exactly one: to bob, naming the group."""
    alice, bob, carl, dave = fresh("alice"), fresh("bob"), fresh("carl"), fresh("dave")
    group = new_group_id()

    async def go():
        a = await client(region, alice)
        c = await client(region, carl)
        contacts = []
        for name in (bob, dave):
            x = await client(region, name)
            contacts.append((await x.send(alice, b"hi")).msg_id)  # alice is their contact
            await x.close()
        contacts.append((await c.send(alice, b"hi")).msg_id)
        await a.group_create(group, "Crew", [bob, carl])
        await a.group_title(group, "Crew at 8")
        await a.group_add(group, [dave])
        await a.group_remove(group, [dave])
        ok = await a.send(group, b"dinner at 8?")
        # Online until every job (alice's from the contacts' messages, the
        # group message's) has been decided.
        await asyncio.to_thread(wait_for, lambda: not outbox_holds(region, contacts + [ok.msg_id]), 60,
                                "the decisions")
        await a.close()
        await c.close()
        return ok
    ok = run(go())
    (call,) = wait_for(lambda: receiver.for_user(bob), what="bob's call")
    assert call["signature"] == webhook.signature(SECRET, call["raw"])
    assert call["delivery"] == f"{bob}:{ok.msg_id}"
    # bob's inbox: his own "hi", then created, title, added, removed, the message.
    assert call["body"] == {"user": bob, "msg_id": ok.msg_id, "seq": 6, "sender": alice, "kind": 0,
                            "ts_ms": ok.ts_ms, "preview": "dinner at 8?", "unread": 1, "group": group}
    time.sleep(1.0)
    assert len(receiver.for_user(bob, ok_only=False)) == 1
    for name in (alice, carl, dave):
        assert receiver.for_user(name, ok_only=False) == [], name


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples; -1 while the process does not answer yet."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return -1
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_receiver_that_is_down_for_a_while_gets_the_call_when_it_recovers(region, receiver):
    bob = fresh("bob")
    failures = metric(region.push_metrics_port, "simzmq_push_failures_total")
    receiver.stop()
    try:
        ok = run(message_to_offline(region, bob, b"wake up"))
        wait_for(lambda: metric(region.push_metrics_port, "simzmq_push_failures_total") >= failures + 2,
                 what="two failed attempts")
    finally:
        receiver.start()
    (call,) = wait_for(lambda: receiver.for_user(bob), what="the call after recovery")
    assert call["body"]["msg_id"] == ok.msg_id


def test_a_hanging_webhook_does_not_delay_messaging(region, receiver):
    """While every call to the webhook hangs, messages keep being acknowledged
    (latencies are printed for the report, not asserted)."""
    alice, bob, carl, dan = fresh("alice"), fresh("bob"), fresh("carl"), fresh("dan")
    hung = threading.Event()
    receiver.answer = lambda body: (hung.set(), "hang")[1] if body["user"] == bob else 200
    try:
        async def go():
            await offline_user(region, bob)
            a = await client(region, alice)
            c = await client(region, carl)
            d = await client(region, dan)
            for i in range(40):
                await a.send(bob, b"to the offline one %d" % i)
            await asyncio.to_thread(hung.wait, 60)
            latencies = []
            for i in range(100):
                started = time.monotonic()
                await c.send(dan, b"meanwhile %d" % i)
                latencies.append(time.monotonic() - started)
            for x in (a, c, d):
                await x.close()
            return sorted(latencies)
        latencies = run(go())
        print(f"\nSend -> SendOk while the webhook hangs: median {latencies[50] * 1000:.1f} ms, "
              f"p90 {latencies[90] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms (100 sends)")
        assert len(latencies) == 100
    finally:
        receiver.answer = lambda body: 200


def test_kill_9_mid_backlog_loses_no_job(region, receiver):
    users = [fresh("k") for _ in range(10)]
    sender = fresh("ks")
    slow = lambda body: (time.sleep(0.02), 200)[1]  # noqa: E731
    receiver.answer = slow
    try:
        async def go():
            for u in users:
                await offline_user(region, u)
            s = await client(region, sender)
            sent = [(await s.send(users[i % 10], b"backlog %d" % i)).msg_id for i in range(200)]
            await s.close()
            return sent
        sent = run(go())
        mine = lambda: [c for u in users for c in receiver.for_user(u)]  # noqa: E731
        wait_for(lambda: len(mine()) >= 10, what="the backlog to start draining")
        before = region.pid("push-1")
        os.kill(before, signal.SIGKILL)
        wait_for(lambda: (region.data_dir / "run" / "push-1.pid").exists() and region.pid("push-1") != before,
                 what="the restart")
        wait_for(lambda: {c["body"]["msg_id"] for c in mine()} >= set(sent), timeout=120, what="every job")
        deliveries = [c["delivery"] for c in mine()]
        print(f"\n{len(sent)} jobs, {len(deliveries)} calls answered 200 "
              f"({len(deliveries) - len(set(deliveries))} repeats a deduplicating receiver drops)")
        assert set(deliveries) == {f"{users[i % 10]}:{m}" for i, m in enumerate(sent)}
        # each user's calls came in order (the repeats aside)
        for u in users:
            ids = [c["body"]["msg_id"] for c in receiver.for_user(u)]
            firsts = [x for i, x in enumerate(ids) if x not in ids[:i]]
            assert firsts == sorted(firsts)
    finally:
        receiver.answer = lambda body: 200


def simzmq(*args, env=None) -> str:
    out = subprocess.run([sys.executable, "-m", "simzmq", *args], capture_output=True, text=True, cwd=str(ROOT),
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_receiver_failing_forever_dead_letters_the_job(tmp_path):
    receiver = Receiver().start()
    receiver.answer = lambda body: 500
    r = start_region(tmp_path / "data", receiver, max_age_s=8)
    try:
        bob = fresh("bob")
        ok = run(message_to_offline(r, bob, b"nobody home"))
        env = dict(r.env)
        listed = wait_for(lambda: str(ok.msg_id) in simzmq("push", "dead", "--data", str(r.data_dir), env=env)
                          and simzmq("push", "dead", "--data", str(r.data_dir), env=env), what="the dead letter")
        assert f"user {bob}" in listed and "status 500" in listed
        assert len(receiver.for_user(bob, ok_only=False)) >= 2
        wait_for(lambda: metric(r.push_metrics_port, "simzmq_push_dead_total") >= 1, what="the dead metric")
        receiver.answer = lambda body: 200
        assert "queued 1 push job again" in simzmq("push", "retry", "--all", "--data", str(r.data_dir), env=env)
        (call,) = wait_for(lambda: receiver.for_user(bob), what="the call after retry")
        assert call["body"]["msg_id"] == ok.msg_id
        assert "no dead push jobs" in simzmq("push", "dead", "--data", str(r.data_dir), env=env)
    finally:
        r.stop()
        receiver.stop()
    log = r.read_log()
    assert "push service push-1: calls POST" in log and "push service push-1 stopped" in log


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_ten_thousand_queued_jobs_drain_with_bounded_memory(tmp_path):
    """The jobs are written straight into the store (as IM workers would)
    with 16 KiB bodies: 160 MiB if the service held them all at once. It
    holds at most concurrency x jobs_per_user (2.5 MiB of bodies); SQLite's
    page cache (32 MiB) is most of what it grows by."""
    from simzmq.service import IMService, Request
    from simzmq.wire import messages as m
    receiver = Receiver().start()
    r = start_region(tmp_path / "data", receiver, concurrency=16, jobs_per_user=10)
    try:
        pid = r.pid("push-1")
        wait_for(lambda: metric(r.push_metrics_port, "simzmq_push_queued_jobs") == 0, what="metrics")
        baseline = rss_kb(pid, "VmRSS")
        store = region_store(r)
        try:
            service = IMService(store, 3600_000, 1 << 20, push_delay_ms=0)
            names = [f"bulk{i}" for i in range(100)]
            with store.transaction():
                for name in names:
                    store.create_user(name, "not-a-hash", 0)
                store.create_user("bulk-sender", "not-a-hash", 0)
            body = b"x" * 16384
            for chunk in range(20):
                requests = [Request("bulk-sender", b"", m.Send(to=names[i % 100], cmid=b"%d" % i, kind=0, body=body))
                            for i in range(chunk * 500, chunk * 500 + 500)]
                with store.transaction():
                    service.handle_batch(requests, int(time.time() * 1000))
        finally:
            store.close()
        started = time.monotonic()
        wait_for(lambda: sum(len(receiver.for_user(n)) for n in names) >= 10_000, timeout=600, what="the drain")
        took = time.monotonic() - started
        assert {c["body"]["msg_id"] for n in names for c in receiver.for_user(n)} == set(range(1, 10_001))
        peak = rss_kb(pid, "VmHWM")
        print(f"\n10000 jobs drained in {took:.1f} s; push-1 RSS {baseline / 1024:.1f} MiB before, "
              f"peak {peak / 1024:.1f} MiB")
        assert r.pid("push-1") == pid  # the same process did it all
        assert peak - baseline < 64 * 1024
    finally:
        r.stop()
        receiver.stop()


def test_webhook_echo_checks_signatures_and_prints_each_call(tmp_path):
    import urllib.error
    import urllib.request
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "simzmq", "webhook-echo", "--port", str(port), "--secret", SECRET],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        body = webhook.encode_body({"user": "bob", "msg_id": 1})

        def post(headers):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/hook", data=body, method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return None
        signed = webhook.headers(SECRET, body, "bob:1")
        assert wait_for(lambda: post(signed), what="webhook-echo to listen") == 200
        assert post(signed) == 200
        assert post(webhook.headers("wrong", body, "bob:1")) == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["delivery"], x["signature_ok"], x["repeat"]) for x in lines] == [
        ("bob:1", True, False), ("bob:1", True, True), ("bob:1", False, True)]
    assert lines[0]["body"] == {"user": "bob", "msg_id": 1}
    assert f"listening on http://127.0.0.1:{port}/" in err and "webhook-echo stopped" in err
    assert proc.returncode == 0


def test_two_instances_share_the_outbox_and_send_each_job_once(tmp_path):
    receiver = Receiver().start()
    receiver.answer = lambda body: (time.sleep(0.01), 200)[1]
    r = start_region(tmp_path / "data", receiver, instances=2, delay_ms=500, metrics_port=0)
    try:
        assert r.pid("push-1") != r.pid("push-2")
        users = [fresh("two") for _ in range(8)]

        async def go():
            for u in users:
                await offline_user(r, u)
            s = await client(r, fresh("sender"))
            sent = [(await s.send(users[i % 8], b"%d" % i)).msg_id for i in range(120)]
            await s.close()
            return sent
        sent = run(go())
        calls = wait_for(lambda: len(receiver.calls) >= 120 and list(receiver.calls), what="every call")
        time.sleep(1.0)
        assert sorted(c["body"]["msg_id"] for c in receiver.calls) == sorted(sent)  # each once
        for u in users:
            ids = [c["body"]["msg_id"] for c in calls if c["body"]["user"] == u]
            assert ids == sorted(ids)
    finally:
        r.stop()
        receiver.stop()
    log = r.read_log()
    assert "push service push-1: calls POST" in log and "push service push-2: calls POST" in log


def test_coalescing_sends_one_call_with_the_newest_message_and_the_unread_total(tmp_path):
    receiver = Receiver().start()
    # A window far longer than five Sends take, so they all fall in it.
    r = start_region(tmp_path / "data", receiver, delay_ms=500, coalesce_ms=8000)
    try:
        bob = fresh("bob")

        async def go():
            await offline_user(r, bob)
            a = await client(r, fresh("alice"))
            sent = [await a.send(bob, b"part %d" % i) for i in range(5)]
            await a.close()
            return sent
        sent = run(go())
        (call,) = wait_for(lambda: receiver.for_user(bob), what="the call")
        assert call["body"]["msg_id"] == sent[-1].msg_id and call["body"]["preview"] == "part 4"
        assert call["body"]["unread"] == 5
        wait_for(lambda: not outbox_holds(r, [s.msg_id for s in sent]), what="the jobs to be settled")
        assert len(receiver.for_user(bob, ok_only=False)) == 1
    finally:
        r.stop()
        receiver.stop()


def test_two_regions_on_one_store_push_only_users_online_in_neither(tmp_path, pg_cluster):
    """Regions a and b share one Postgres (so one outbox, which both push
    services claim from) and are federated. bob is online in b only: a's
    messages to him make no call, whichever push service decides. Once he is
    offline, one call."""
    from simzmq import keys as keys_mod
    from simzmq.federation import exchange_keys
    from tests.integration.test_regions import notify_outs

    dsn = pg_cluster.create_database()
    receiver = Receiver().start()
    # Reports every 3 s, so a gate counts as gone only after 9 s of silence:
    # this test is about who is online where, not about a gate going silent.
    a, b = (Region(tmp_path / name, store=dsn, extra_env=dict(push_env(receiver, presence_interval_s=3),
                                                              SIMZMQ_REGION_NAME=name))
            for name in ("a", "b"))
    a.env["SIMZMQ_REGION_PEERS"] = ",".join("b@" + ep for ep in notify_outs(b))
    b.env["SIMZMQ_REGION_PEERS"] = ",".join("a@" + ep for ep in notify_outs(a))
    for r in (a, b):
        r.argv += ["--webhook", receiver.url, "--webhook-secret", SECRET, "--open-registration"]
        r.data_dir.mkdir(parents=True)
        keys_mod.ensure_bus_keys(r.data_dir)
    exchange_keys(a.data_dir, "a", b.data_dir, "b")
    started = []
    try:
        for r in (a, b):
            r.start(timeout=120)
            started.append(r)
        alice, bob = fresh("alice"), fresh("bob")

        async def go():
            bob_in_b = await client(b, bob)
            # a's push service hears b's gates through b's brokers (the peer
            # link): until it has heard bob there, it would call for him.
            await asyncio.to_thread(wait_for, lambda: metric(a.push_metrics_port, "simzmq_push_online_users") >= 1,
                                    60, "a's push service to hear bob online in b")
            alice_in_a = await client(a, alice)
            online = [(await alice_in_a.send(bob, b"you are in b, %d" % i)).msg_id for i in range(3)]
            await asyncio.to_thread(wait_for, lambda: not outbox_holds(a, online), 60, "the decisions")
            await bob_in_b.close()
            offline = await alice_in_a.send(bob, b"and now you are gone")
            await alice_in_a.close()
            return online, offline
        online, offline = run(go())
        calls = wait_for(lambda: receiver.for_user(bob), what="the call")
        time.sleep(0.5)  # a second call, if any, comes with the first
        calls = receiver.for_user(bob)

        def why() -> str:
            said = [line for r in (a, b) for line in r.read_log().splitlines()
                    if "simzmq.push" in line and "config /" not in line]
            return (f"calls for {[c['body']['msg_id'] for c in calls]}; online {online}, offline {offline.msg_id}\n"
                    + "\n".join(said))
        assert len(calls) == 1, why()
        (call,) = calls
        assert call["body"]["msg_id"] == offline.msg_id, why()
        assert call["signature"] == webhook.signature(SECRET, call["raw"])
        wait_for(lambda: not outbox_holds(a, [offline.msg_id]), what="the job to be settled")
        time.sleep(1.0)
        assert len(receiver.for_user(bob, ok_only=False)) == 1
    finally:
        for r in reversed(started):
            r.stop()
        receiver.stop()
    for r in (a, b):
        assert "presence of region" in r.read_log()


@pytest.mark.parametrize("flags,expected", [
    (["--webhook", "htp://127.0.0.1:9000/hook", "--webhook-secret", "s"],
     "(from --webhook): must be an http:// or https:// URL"),
    (["--webhook", "ftp://127.0.0.1/hook", "--webhook-secret", "s"], "must be an http:// or https:// URL"),
    (["--webhook", "127.0.0.1:9000/hook", "--webhook-secret", "s"], "must be an http:// or https:// URL"),
    (["--webhook", "http://127.0.0.1:90o0/hook", "--webhook-secret", "s"], "port is a number"),
    (["--webhook", "http://push.example.com/hook", "--webhook-secret", "s"], "must be https://"),
    (["--webhook", "http://127.0.0.1:9000/hook"], "push.secret must be set"),
])
def test_up_refuses_a_wrong_webhook_in_one_line_and_starts_nothing(tmp_path, flags, expected):
    out = subprocess.run([sys.executable, "-m", "simzmq", "up", "--data", str(tmp_path / "data"), *flags],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert not (tmp_path / "data" / "run").exists()
