"""Hostile clients against a real region: every limit of [gate.limits] is hit
and answered as docs/security.md says, nothing over a limit is stored, and
the client who stays within the limits is served throughout.

Each test speaks from its own loopback source address (127.0.0.N), so the
per-address limits of one test do not leak into the next.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import struct
import threading
import time

import pytest

from simzmq.wire import messages as m
from simzmq.wire.codec import CODECS
from simzmq.wire.frames import encode_frame
from simzmq.wire.handshake import ClientHandshake
from simzmq.wire.messages import ErrorCode, KickCode
from tests.rawclient import Closed, RawClient
from tests.region import Region, parse_metrics, region_fixture

LIMITS = {
    "TRUSTED_ADDRESSES": "",
    "REQUESTS_PER_S": "20", "REQUESTS_BURST": "100", "ABUSE_FACTOR": "2",
    "SENDS_PER_S": "1", "SENDS_BURST": "5",
    "REGISTERS_PER_ADDRESS_PER_MIN": "1", "REGISTERS_PER_ADDRESS_BURST": "4",
    "REGISTERS_PER_USER_BURST": "2",
    "LOGIN_FREE_FAILURES_PER_USER": "3", "LOGIN_FREE_FAILURES_PER_ADDRESS": "6",
    "LOGIN_DELAY_BASE_S": "1", "LOGIN_DELAY_MAX_S": "4", "LOGIN_FORGET_S": "600",
    "HISTORY_PER_S": "0.2", "HISTORY_BURST": "3",
    "MAX_CONNECTIONS": "40", "MAX_CONNECTIONS_PER_ADDRESS": "5", "MAX_SESSIONS_PER_USER": "3",
    "MAX_PENDING_REQUESTS": "4",
    "CONNECTS_PER_ADDRESS_PER_S": "4", "CONNECTS_PER_ADDRESS_BURST": "12", "ABUSE_BAN_S": "2",
    "LOG_LINES_PER_LIMIT": "3", "LOG_INTERVAL_S": "3600",
}


region = region_fixture("limits", extra_env={**{f"SIMZMQ_GATE_LIMITS_{k}": v for k, v in LIMITS.items()},
                                              "SIMZMQ_GATE_MAX_OUTBOUND_BYTES": str(256 * 1024)})


_source = [10]


def new_source() -> str:
    """A loopback address of its own for each test."""
    _source[0] += 1
    return f"127.0.0.{_source[0]}"


_names = [0]


def fresh(prefix: str) -> str:
    _names[0] += 1
    return f"{prefix}{_names[0]}x{os.getpid()}"


def connect(region, source: str, codec: int = 1, rcvbuf: int | None = None, timeout: float = 15.0) -> RawClient:
    """A RawClient whose connection comes from `source`."""
    c = RawClient.__new__(RawClient)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", region.gate_port))
    c.sock, c.ref, c.ready = sock, 0, None
    hs = ClientHandshake(region.gate_pk, codecs=(codec,))
    c.send_frame(hs.hello())
    hs.receive_welcome(c.read_frame())
    c.rx, c.tx, c.codec = hs.receiver, hs.sender, CODECS[hs.codec_id]
    _, c.ready = c.codec.decode(c.rx.open(c.read_frame())[0])
    c.send_frame(c.tx.header)
    return c


def refused(region, source: str) -> bool:
    """Whether the gate closes a new connection from `source` before the handshake."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", region.gate_port))
    try:
        # A served connection waits for HELLO (handshake_timeout_s); a refused
        # one is closed at once.
        sock.settimeout(1.0)
        try:
            return sock.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
    finally:
        sock.close()


def user(region, source: str, name: str | None = None, device: str = "", register: bool = True) -> RawClient:
    name = name or fresh("u")
    c = connect(region, source)
    if register:
        # A Register the gate gave up on (unavailable) may have taken effect
        # all the same, and its repeats then meet this region's small
        # per-user Register limit: the Login below tells.
        made = c.served(m.Register(user=name, password="pw-" + name))
        assert isinstance(made, m.Ok) or is_error(made, ErrorCode.RATE_LIMITED), made
    ok = c.served(m.Login(user=name, password="pw-" + name, token=b"", device=device))
    assert isinstance(ok, m.LoginOk), ok
    c.name, c.token = name, ok.token
    return c


def metrics(region) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", region.http_port, timeout=60)  # a busy gate answers late
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        text = resp.read().decode()
    finally:
        conn.close()
    return parse_metrics(text)


def limited_count(region, limit: str) -> float:
    return metrics(region).get(f'simzmq_gate_rate_limited_total{{limit="{limit}"}}', 0.0)


def is_error(msg, code) -> bool:
    return isinstance(msg, m.Error) and msg.code == code


def read_all(c: RawClient, n: int) -> list:
    return [c.recv()[1] for _ in range(n)]


def inbox_size(c: RawClient) -> int:
    batch = c.request(m.Sync(since=0, limit=0))
    return max((x.seq for x in batch.msgs), default=0)


def poll(predicate, timeout: float = 15.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def until_closed(c: RawClient) -> list:
    """Everything the gate still sends, up to its close."""
    got = []
    try:
        while True:
            got.append(c.recv())
    except (Closed, ConnectionResetError):
        return got


@pytest.mark.timeout(60)
def test_requests_per_connection_then_abuse_kick(region):
    src = new_source()
    c = connect(region, src)
    before = limited_count(region, "requests")
    # 100 in a burst are fine; the next ones are refused, the connection stays.
    for i in range(110):
        c.send(m.Ping(ts_ms=i))
    replies = read_all(c, 110)
    pongs = [r for r in replies if isinstance(r, m.Pong)]
    limited = [r for r in replies if is_error(r, ErrorCode.RATE_LIMITED)]
    assert len(pongs) >= 100 and len(pongs) + len(limited) == 110 and limited
    assert limited_count(region, "requests") >= before + len(limited)
    time.sleep(1.0)  # 20 tokens a second: room again
    assert isinstance(c.request(m.Ping(ts_ms=1)), m.Pong)
    # Far over the limit (more than 2 bursts of refusals): Kick{abuse}, closed.
    for i in range(400):
        try:
            c.send(m.Ping(ts_ms=i))
        except (BrokenPipeError, ConnectionResetError):
            break
    got = until_closed(c)
    ref, last, final = got[-1]
    assert isinstance(last, m.Kick) and last.code == KickCode.ABUSE and final
    # The address is banned for abuse_ban_s: it cannot just start again.
    banned_before = limited_count(region, "address_banned")
    assert refused(region, src)
    assert limited_count(region, "address_banned") > banned_before
    assert poll(lambda: f"banning {src} for 2 s: kicked for abuse" in region.read_log())
    # Everyone else is still served.
    other = connect(region, new_source())
    assert isinstance(other.request(m.Ping(ts_ms=2)), m.Pong)
    # And the ban ends.
    assert poll(lambda: not refused(region, src), timeout=10, step=0.5)
    assert isinstance(connect(region, src).request(m.Ping(ts_ms=3)), m.Pong)


def two_devices_and_a_peer(region) -> tuple[RawClient, RawClient, RawClient]:
    """A user logged in on two connections, and another user to send to."""
    src = new_source()
    a1 = user(region, src, device="one")
    a2 = user(region, src, name=a1.name, device="two", register=False)
    return a1, a2, user(region, src)


@pytest.mark.timeout(60)
def test_sends_per_user_across_connections_store_nothing_over_the_limit(region):
    a1, a2, bob = two_devices_and_a_peer(region)
    replies = []
    for i in range(7):
        conn = (a1, a2)[i % 2]
        replies.append(conn.request(m.Send(to=bob.name, cmid=os.urandom(16), kind=0, body=b"m%d" % i)))
    oks = [r for r in replies if isinstance(r, m.SendOk)]
    assert len(oks) == 5, replies  # the burst, shared by both of the user's connections
    assert all(is_error(r, ErrorCode.RATE_LIMITED) for r in replies[5:])
    # Nothing of the refused ones was stored, and both connections stay.
    assert inbox_size(bob) == 5
    assert isinstance(a1.request(m.Ping(ts_ms=1)), m.Pong)
    assert isinstance(a2.request(m.Ping(ts_ms=1)), m.Pong)
    # Another user's Sends are not affected.
    assert isinstance(bob.request(m.Send(to=a1.name, cmid=os.urandom(16), kind=0, body=b"hi")), m.SendOk)


@pytest.fixture(scope="module")
def bytes_region(tmp_path_factory):
    """Byte budgets small enough to reach with a few Sends (the other limits'
    tests send big bodies)."""
    limits = {"TRUSTED_ADDRESSES": "", "SEND_BYTES_PER_CONNECTION_PER_S": "100",
              "SEND_BYTES_PER_CONNECTION_BURST": "6000", "SEND_BYTES_PER_USER_PER_S": "100",
              "SEND_BYTES_PER_USER_BURST": "10000"}
    r = Region(tmp_path_factory.mktemp("bytes") / "data",
               extra_env={f"SIMZMQ_GATE_LIMITS_{k}": v for k, v in limits.items()})
    r.start()
    yield r
    r.stop()


@pytest.mark.timeout(90)
def test_send_bytes_per_connection_and_per_user_store_nothing_over_the_budget(bytes_region):
    region = bytes_region
    a1, a2, bob = two_devices_and_a_peer(region)
    before = metrics(region)

    def send(conn):
        return conn.request(m.Send(to=bob.name, cmid=os.urandom(16), kind=0, body=b"x" * 2500))

    # Two of these fit a connection's 6000 bytes; the third does not.
    first = [send(a1) for _ in range(3)]
    assert [type(r) for r in first[:2]] == [m.SendOk, m.SendOk], first
    assert is_error(first[2], ErrorCode.RATE_LIMITED) and "retry in" in first[2].reason
    # The user's 10000 bytes are shared by both connections: one more fits.
    second = [send(a2) for _ in range(2)]
    assert isinstance(second[0], m.SendOk) and is_error(second[1], ErrorCode.RATE_LIMITED), second
    # Nothing refused was stored; the connections stay; others are not affected.
    assert inbox_size(bob) == 3
    assert isinstance(a1.request(m.Ping(ts_ms=1)), m.Pong)
    assert isinstance(bob.request(m.Send(to=a1.name, cmid=os.urandom(16), kind=0, body=b"hi")), m.SendOk)
    after = metrics(region)

    def grew(key):
        return after.get(key, 0.0) - before.get(key, 0.0)
    assert grew('simzmq_gate_rate_limited_total{limit="send_bytes_connection"}') >= 1
    assert grew('simzmq_gate_rate_limited_total{limit="send_bytes_user"}') >= 1
    assert grew("simzmq_gate_send_bytes_total") >= 3 * 2500


@pytest.mark.timeout(60)
def test_registers_per_address_and_per_user(region):
    src = new_source()
    c = connect(region, src)
    names = [fresh("r") for _ in range(5)]
    replies = [c.request(m.Register(user=n, password="pw")) for n in names]
    assert [type(r).__name__ for r in replies[:4]] == ["Ok"] * 4
    assert is_error(replies[4], ErrorCode.RATE_LIMITED)
    # Not created: nobody can log in as it.
    other = connect(region, new_source())
    assert is_error(other.request(m.Login(user=names[4], password="pw", token=b"", device="")),
                    ErrorCode.AUTH_FAILED)
    # Per user id: asking for the same id again and again from anywhere.
    taken = names[0]
    codes = [other.request(m.Register(user=taken, password="x")) for _ in range(3)]
    assert is_error(codes[0], ErrorCode.EXISTS) and is_error(codes[1], ErrorCode.RATE_LIMITED)
    assert isinstance(c.request(m.Ping(ts_ms=1)), m.Pong)


@pytest.mark.timeout(60)
def test_failed_logins_per_user_grow_a_delay_but_token_resumes_pass(region):
    src = new_source()
    victim = user(region, src)
    token = victim.token
    attacker = connect(region, new_source())
    replies = [attacker.request(m.Login(user=victim.name, password="guess%d" % i, token=b"", device=""))
               for i in range(4)]
    assert all(is_error(r, ErrorCode.AUTH_FAILED) for r in replies[:3])
    assert is_error(replies[3], ErrorCode.RATE_LIMITED) and "retry in" in replies[3].reason
    # Even the right password waits, from any address...
    c = connect(region, new_source())
    assert is_error(c.request(m.Login(user=victim.name, password="pw-" + victim.name, token=b"", device="")),
                    ErrorCode.RATE_LIMITED)
    # ...but the victim's resume token is not held up.
    resumed = c.request(m.Login(user=victim.name, password="", token=token, device=""))
    assert isinstance(resumed, m.LoginOk)
    # After the delay (1 s after the third failure) the password works again,
    # and a success starts the count afresh.
    time.sleep(1.2)
    c2 = connect(region, new_source())
    assert isinstance(c2.request(m.Login(user=victim.name, password="pw-" + victim.name, token=b"", device="")),
                      m.LoginOk)
    assert limited_count(region, "login_user") >= 2


@pytest.mark.timeout(60)
def test_failed_logins_per_address(region):
    src = new_source()
    victims = [user(region, new_source()).name for _ in range(2)]
    c = connect(region, src)
    codes = []
    for i in range(7):  # six free failures, spread over users so no user limit is hit
        r = c.request(m.Login(user=victims[i % 2] if i < 4 else fresh("nobody"), password="bad", token=b"",
                              device=""))
        codes.append(r.code)
    assert codes[:6] == [ErrorCode.AUTH_FAILED] * 6 and codes[6] == ErrorCode.RATE_LIMITED
    # Token guesses from that address wait too.
    r = c.request(m.Login(user=victims[0], password="", token=os.urandom(32), device=""))
    assert is_error(r, ErrorCode.RATE_LIMITED)
    # Another address is not affected.
    other = connect(region, new_source())
    assert is_error(other.request(m.Login(user=victims[0], password="bad", token=b"", device="")),
                    ErrorCode.AUTH_FAILED)
    assert limited_count(region, "login_address") >= 2


@pytest.mark.timeout(60)
def test_connections_per_address(region):
    src = new_source()
    held = [connect(region, src) for _ in range(5)]
    assert refused(region, src)
    assert not refused(region, new_source())
    held.pop().close()
    assert poll(lambda: not refused(region, src))
    for c in held:
        assert isinstance(c.request(m.Ping(ts_ms=1)), m.Pong)
        c.close()


@pytest.mark.timeout(60)
def test_new_connections_per_address_per_second(region):
    src = new_source()
    before = limited_count(region, "address_connects")
    # A burst of 12, each closed at once (it is the rate, not the count held).
    for _ in range(12):
        connect(region, src).close()
    assert refused(region, src)
    assert limited_count(region, "address_connects") > before
    assert not refused(region, new_source())
    assert poll(lambda: not refused(region, src), step=0.5)  # 4 a second come back


@pytest.mark.timeout(60)
def test_connections_per_gate(region):
    held = []
    try:
        refused_at = None
        for i in range(45):  # max_connections = 40, from addresses of five each
            src = f"127.0.1.{i // 5 + 1}"
            try:
                c = connect(region, src, timeout=3)
                assert isinstance(c.request(m.Ping(ts_ms=1)), m.Pong)
                held.append(c)
            except (Closed, ConnectionResetError, socket.timeout, OSError):
                refused_at = i
                break
        assert refused_at is not None and len(held) <= 40
        assert limited_count(region, "connections") >= 1
    finally:
        for c in held:
            c.close()
    assert poll(lambda: not refused(region, new_source()))


@pytest.mark.timeout(60)
def test_sessions_per_user(region):
    src = new_source()
    first = user(region, src, device="d0")
    name = first.name
    others = [user(region, src, name=name, device=f"d{i}", register=False) for i in (1, 2)]
    c = connect(region, new_source())
    r = c.request(m.Login(user=name, password="", token=first.token, device="d3"))
    assert is_error(r, ErrorCode.RATE_LIMITED) and "sessions" in r.reason
    # The same device may always log in again: it replaces the old session.
    again = c.request(m.Login(user=name, password="", token=first.token, device="d2"))
    assert isinstance(again, m.LoginOk)
    _, kick, final = others[1].recv()
    assert isinstance(kick, m.Kick) and kick.code == KickCode.REPLACED and final
    # Logging out frees a place.
    assert isinstance(others[0].request(m.Logout()), m.Ok)
    c4 = connect(region, new_source())
    assert isinstance(c4.request(m.Login(user=name, password="", token=first.token, device="d4")), m.LoginOk)


@pytest.mark.timeout(60)
def test_pending_requests_backpressure_loses_nothing(region):
    c = user(region, new_source())
    key = 'simzmq_gate_backpressure_total{why="pending"}'
    before = metrics(region).get(key, 0.0)
    # Reads, which the worker answers (Syncs are read one at a time anyway;
    # this region allows 5 Sends), all in one go: each is answered.
    refs = [c.send(m.Read(peer=c.name, msg_id=1)) for _ in range(40)]
    got = {}
    while len(got) < 40:
        ref, msg, _ = c.recv()
        got[ref] = msg
    assert set(got) == set(refs)
    assert all(isinstance(x, m.Ok) or is_error(x, ErrorCode.BAD_REQUEST) for x in got.values()), got
    assert metrics(region).get(key, 0.0) > before


@pytest.mark.timeout(90)
def test_slow_consumer_is_kicked_and_its_memory_released(region):
    src = new_source()
    sender = user(region, src)
    reader = user(region, src)
    big = b"x" * 60000
    for _ in range(5):
        assert isinstance(sender.request(m.Send(to=reader.name, cmid=os.urandom(16), kind=0, body=big)), m.SendOk)
    slow = connect(region, src, rcvbuf=32 * 1024, timeout=30)
    assert isinstance(slow.request(m.Login(user=reader.name, password="", token=reader.token, device="")),
                      m.LoginOk)
    kicks_before = metrics(region).get('simzmq_gate_kicks_total{reason="slow_consumer"}', 0.0)
    # 60 Syncs of 300 kB each, and not a byte read: far more than the kernel
    # buffers and max_outbound_bytes (256 KiB) hold.
    for _ in range(60):
        slow.send(m.Sync(since=0, limit=0))
    assert poll(lambda: metrics(region).get('simzmq_gate_kicks_total{reason="slow_consumer"}', 0.0)
                > kicks_before, timeout=30)
    # The gate let go: the connection ends (the Kick if it fit, then EOF) and
    # what was queued for it is gone.
    got = until_closed(slow)
    assert all(isinstance(msg, (m.Batch, m.Kick)) for _, msg, _ in got)
    kicks = [(msg, final) for _, msg, final in got if isinstance(msg, m.Kick)]
    assert all(k.code == KickCode.SLOW_CONSUMER and final for k, final in kicks)
    assert poll(lambda: metrics(region).get("simzmq_gate_outbound_bytes", 1e9) < 64 * 1024)
    # Everyone else carries on.
    assert isinstance(sender.request(m.Ping(ts_ms=1)), m.Pong)
    assert isinstance(reader.request(m.Ping(ts_ms=1)), m.Pong)


def history(region, source: str, token: bytes, peer: str):
    conn = http.client.HTTPConnection("127.0.0.1", region.http_port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", f"/v1/history/{peer}", headers={"Authorization": "Bearer " + token.hex()})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_history_per_address(region):
    src = new_source()
    a = user(region, src)
    statuses = [history(region, src, a.token, "peer")[0] for _ in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    assert history(region, new_source(), a.token, "peer")[0] == 200
    assert limited_count(region, "history") >= 2


@pytest.mark.timeout(30)
def test_limit_logging_is_itself_limited(region):
    """By now, dozens of requests were rate limited; the log holds at most
    log_lines_per_limit (3) such lines per kind, the rest are counted."""
    text = region.read_log()
    lines = re.findall(r"rate limited \S+ \(.*?\): requests limit", text)
    assert 1 <= len(lines) <= 3
    assert metrics(region).get('simzmq_gate_log_lines_suppressed_total{kind="limit"}', 0.0) > 0


# --- idle -------------------------------------------------------------------------------


idle_region = region_fixture("idle", name="idle_region", extra_env={"SIMZMQ_GATE_IDLE_TIMEOUT_S": "2"})


@pytest.mark.timeout(60)
def test_silent_logged_in_connection_is_kicked_idle(idle_region):
    silent = RawClient(idle_region.gate_port, idle_region.gate_pk)
    assert silent.ready.idle_timeout_s == 2
    assert isinstance(silent.served(m.Register(user="quiet", password="pw")), m.Ok)
    assert isinstance(silent.served(m.Login(user="quiet", password="pw", token=b"", device="")), m.LoginOk)
    chatty = RawClient(idle_region.gate_port, idle_region.gate_pk)
    stop = threading.Event()

    def keep_pinging():
        while not stop.wait(0.4):
            chatty.request(m.Ping(ts_ms=1))
    pinger = threading.Thread(target=keep_pinging, daemon=True)
    pinger.start()
    ref, msg, final = silent.recv()  # nothing else is coming but the Kick
    assert ref == 0 and isinstance(msg, m.Kick) and msg.code == KickCode.IDLE and final
    assert silent.closed_without_data()
    stop.set()
    pinger.join()
    # The one that pinged all along was never kicked.
    assert isinstance(chatty.request(m.Ping(ts_ms=2)), m.Pong)


# --- a crowd that floods and never reads ----------------------------------------------------

CROWD = 1000
CROWD_USERS = 10
OUTBOUND_BUDGET = 32 * 1024 * 1024
# What the gate may grow by while the crowd floods (MB). Inbound, each
# connection holds at most two reads of READ_CHUNK (16 KiB): 32 MB for a
# thousand. Outbound, the gate-wide budget: 32 MB. The rest is the allocator's
# churn of the flood (a quarter of a million refused requests, half a million
# pushes), measured at 40-90 MB on top. With the limits switched off (bursts
# and pending requests of a million) the same flood grew the gate by 330 MB
# and it was still climbing: this bound is what the limits buy.
RSS_GROWTH_BOUND_MB = 200


# Ten users with a hundred devices each; the limits are the defaults but
# smaller, so a flooder is over them within a few hundred frames and the
# test stays short (the defaults behave the same, scaled up).
crowd_region = region_fixture("crowd", name="crowd_region", extra_env={
    "SIMZMQ_GATE_LIMITS_MAX_SESSIONS_PER_USER": "100",
    "SIMZMQ_GATE_LIMITS_REQUESTS_BURST": "50", "SIMZMQ_GATE_LIMITS_REQUESTS_PER_S": "10",
    "SIMZMQ_GATE_LIMITS_SENDS_BURST": "50", "SIMZMQ_GATE_LIMITS_SENDS_PER_S": "10",
    "SIMZMQ_GATE_LIMITS_MAX_OUTBOUND_TOTAL_BYTES": str(OUTBOUND_BUDGET),
    "SIMZMQ_GATE_MAX_OUTBOUND_BYTES": str(256 * 1024),
    # The setup asks again when a Register times out under load.
    "SIMZMQ_GATE_LIMITS_REGISTERS_PER_USER_BURST": "1000"})


def health(region) -> dict:
    """/v1/health with patience: under the flood the gate answers late, but answers."""
    conn = http.client.HTTPConnection("127.0.0.1", region.http_port, timeout=60)
    try:
        conn.request("GET", "/v1/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(900)
def test_thousand_clients_flood_and_never_read(crowd_region):
    region = crowd_region
    gate_pid = region.pid("gate-1")
    tokens = {}
    for i in range(CROWD_USERS):
        name = f"crowd{i}"
        c = RawClient(region.gate_port, region.gate_pk, timeout=60)
        assert isinstance(c.served(m.Register(user=name, password="pw")), m.Ok)
        tokens[name] = c.served(m.Login(user=name, password="pw", token=b"", device="setup")).token
        c.close()
    names = sorted(tokens)
    crowd = [RawClient(region.gate_port, region.gate_pk, timeout=60) for _ in range(CROWD)]
    for i, c in enumerate(crowd):
        c.name, c.device = names[i % CROWD_USERS], f"dev{i}"
    # Pipelined: every Login out, then every reply in; the ones a loaded back
    # end did not answer in time (unavailable) log in again.
    waiting, deadline = crowd, time.monotonic() + 120
    while waiting and time.monotonic() < deadline:
        for c in waiting:
            c.send(m.Login(user=c.name, password="", token=tokens[c.name], device=c.device))
        replies = [(c, c.recv()[1]) for c in waiting]
        assert all(isinstance(r, m.LoginOk) or is_error(r, ErrorCode.UNAVAILABLE) for _, r in replies), \
            [r for _, r in replies if not isinstance(r, m.LoginOk)][:3]
        waiting = [c for c, r in replies if not isinstance(r, m.LoginOk)]
    assert not waiting, f"{len(waiting)} of the crowd could not log in"
    time.sleep(1.0)
    baseline = rss_kb(gate_pid)

    # The witness: a user of its own, doing round trips all along.
    good = RawClient(region.gate_port, region.gate_pk, timeout=60)
    assert isinstance(good.served(m.Register(user="witness", password="pw")), m.Ok)
    assert isinstance(good.served(m.Login(user="witness", password="pw", token=b"", device="")), m.LoginOk)
    stop = threading.Event()
    served, failures, retried, asked = [], [], [], []

    def witness():
        """Sends and Pings as a client should: a Send that gets unavailable or
        rate_limited is sent again with the same cmid, a moment later."""
        i = 0
        while not stop.is_set():
            i += 1
            send = m.Send(to="witness", cmid=os.urandom(16), kind=0, body=b"still here %d" % i)
            try:
                for _ in range(20):
                    asked.append(1)
                    r = good.request(send)
                    if not (isinstance(r, m.Error) and r.code in (ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED)):
                        break
                    retried.append(r.code)
                    stop.wait(0.2)  # and backs off before asking again
                asked.append(1)
                pong = good.request(m.Ping(ts_ms=i))
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))
                return
            if isinstance(r, m.SendOk) and isinstance(pong, m.Pong):
                served.append(r.seq)
            else:
                failures.append((repr(r), repr(pong)))
            # Two requests a round: under the region's requests_per_s (10)
            # however fast the gate answers, as a client should be.
            stop.wait(0.25)

    peak = [baseline]

    def sample():
        while not stop.wait(0.1):
            peak[0] = max(peak[0], rss_kb(gate_pid))

    threads = [threading.Thread(target=witness, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()

    # The flood: per client 250 Pings and 50 Sends of 1 KiB to a user with a
    # hundred online devices (so pushes pile up too), written as fast as the
    # socket takes them; not one byte is ever read.
    body = b"f" * 1024
    pending = {}
    for i, c in enumerate(crowd):
        frames = []
        for k in range(300):
            if k % 6 == 5:
                msg = m.Send(to=names[(i + k) % CROWD_USERS], cmid=os.urandom(16), kind=0, body=body)
            else:
                msg = m.Ping(ts_ms=k)
            frames.append(encode_frame(c.tx.seal(c.codec.encode(msg, 10 + k))))
        pending[c] = memoryview(b"".join(frames))
        c.sock.setblocking(False)
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for c, data in list(pending.items()):
            try:
                sent = c.sock.send(data)
            except BlockingIOError:
                continue
            except OSError:  # kicked and closed
                del pending[c]
                continue
            if sent == len(data):
                del pending[c]
            else:
                pending[c] = data[sent:]
        time.sleep(0.05)

    # Let the gate work through all of it: until it stops counting requests.
    def handled() -> float:
        return sum(v for k, v in metrics(region).items()
                   if k.startswith(("simzmq_gate_requests_total", "simzmq_gate_rate_limited_total")))
    last = [-1.0]

    def drained():
        now_ = handled() - len(asked)  # the witness's own requests aside
        done, last[0] = abs(now_ - last[0]) <= 2, now_
        return done
    assert poll(drained, timeout=400, step=1.0), f"still busy; gate RSS peak {peak[0] // 1024} MB"
    stop.set()
    for t in threads:
        t.join(30)
    after = rss_kb(gate_pid)
    growth_mb = (peak[0] - baseline) / 1024
    lag = metrics(region)
    lag_total = lag["simzmq_gate_loop_lag_seconds_count"]
    lag_slow = lag_total - lag['simzmq_gate_loop_lag_seconds_bucket{le="0.5"}']
    print(f"gate RSS: baseline {baseline // 1024} MB, peak {peak[0] // 1024} MB, after {after // 1024} MB, "
          f"witness round trips {len(served)}, retries {len(retried)}, "
          f"loop lag > 0.5 s: {lag_slow:.0f} of {lag_total:.0f} ticks")
    assert not failures, failures[:3]
    # Every Send of the witness was stored once, in order: seqs 1, 2, 3...
    assert len(served) >= 5 and served == list(range(1, len(served) + 1))
    assert growth_mb < RSS_GROWTH_BOUND_MB, f"gate RSS grew by {growth_mb:.0f} MB under the flood"
    # The flooders hang up; the gate lets go of all of them.
    for c in crowd:
        c.close()
    assert poll(lambda: health(region)["connections"] <= 1, timeout=120)
    fresh_client = RawClient(region.gate_port, region.gate_pk)
    assert isinstance(fresh_client.request(m.Ping(ts_ms=1)), m.Pong)


# --- a client that asks and does not read ----------------------------------------------------

pause_region = region_fixture("pause", name="pause_region", extra_env={
    "SIMZMQ_GATE_LIMITS_TRUSTED_ADDRESSES": "", "SIMZMQ_GATE_LIMITS_MAX_PENDING_REQUESTS": "4",
    "SIMZMQ_GATE_LIMITS_PAUSE_READING_BYTES": str(64 * 1024), "SIMZMQ_GATE_IDLE_TIMEOUT_S": "6"})


BEHIND = 'simzmq_gate_backpressure_total{why="behind"}'


def syncs_answered(region) -> float:
    return metrics(region).get('simzmq_gate_requests_total{type="Sync",outcome="ok"}', 0.0)


def paused_not_answered_then_served(region, client, witness) -> None:
    """`client` (RawClient or RawWebSocket, logged in as a deaf_reader user)
    asks for its 100 kB inbox 190 times and reads nothing: 19 MB, far beyond
    what the kernel's buffers hold, so without the pause the back end would
    answer them all. Then it reads: every answer, complete and in order."""
    paused_before = metrics(region).get(BEHIND, 0.0)
    answered_before = syncs_answered(region)
    refs = [client.send(m.Sync(since=0, limit=0)) for _ in range(190)]
    assert poll(lambda: metrics(region).get(BEHIND, 0.0) > paused_before)
    time.sleep(1.0)
    answered_while_deaf = syncs_answered(region) - answered_before
    assert answered_while_deaf < 100, answered_while_deaf
    # The others are served meanwhile.
    assert isinstance(witness.request(m.Ping(ts_ms=1)), m.Pong)
    # Paused, not dropped, and not kicked.
    got = [client.recv() for _ in refs]
    assert [ref for ref, _, _ in got] == refs
    for _, batch, final in got:
        assert isinstance(batch, m.Batch) and not final
        assert [x.body[:5] for x in batch.msgs] == [b"%05d" % i for i in range(20)]


def deaf_reader(region, src):
    """A user with 100 kB in its inbox, and a second connection of it that
    reads next to nothing (a 32 KiB receive buffer, not read)."""
    sender = user(region, src)
    reader = user(region, src)
    for i in range(20):
        sent = sender.request(m.Send(to=reader.name, cmid=b"c%d" % i, kind=0, body=b"%05d" % i * 1000))
        assert isinstance(sent, m.SendOk)
    deaf = connect(region, src, rcvbuf=32 * 1024, timeout=30)
    assert isinstance(deaf.request(m.Login(user=reader.name, password="", token=reader.token, device="deaf")),
                      m.LoginOk)
    deaf.name, deaf.token = reader.name, reader.token
    return sender, deaf


@pytest.mark.timeout(90)
def test_a_client_behind_in_reading_is_paused_not_answered_then_served(pause_region):
    sender, deaf = deaf_reader(pause_region, new_source())
    paused_not_answered_then_served(pause_region, deaf, sender)
    assert isinstance(deaf.request(m.Ping(ts_ms=2)), m.Pong)


@pytest.mark.timeout(90)
def test_a_client_that_stays_behind_is_kicked_as_a_slow_consumer(pause_region):
    region = pause_region
    sender, deaf = deaf_reader(region, new_source())
    kicks = 'simzmq_gate_kicks_total{reason="slow_consumer"}'
    before = metrics(region).get(kicks, 0.0)
    for _ in range(190):
        deaf.send(m.Sync(since=0, limit=0))
    # Paused, it sends nothing the gate reads: after idle_timeout_s it goes,
    # as the slow consumer it is (not as idle), and its queue with it.
    assert poll(lambda: metrics(region).get(kicks, 0.0) > before, timeout=30)
    got = until_closed(deaf)
    assert all(isinstance(msg, (m.Batch, m.Kick)) for _, msg, _ in got)
    assert [msg.code for _, msg, _ in got if isinstance(msg, m.Kick)] in ([], [KickCode.SLOW_CONSUMER])
    # (The sender, silent as long, went as idle; a new connection is served.)
    assert isinstance(connect(region, new_source()).request(m.Ping(ts_ms=1)), m.Pong)


@pytest.mark.timeout(90)
def test_a_paused_client_that_resets_leaves_the_gate_serving(pause_region):
    # Regression: a write that failed while the reader was paused behind left
    # its backlog counted, and the reader spun on it with the loop blocked.
    region = pause_region
    _, deaf = deaf_reader(region, new_source())
    before = metrics(region).get(BEHIND, 0.0)
    for _ in range(190):
        deaf.send(m.Sync(since=0, limit=0))
    assert poll(lambda: metrics(region).get(BEHIND, 0.0) > before)
    # Reset, not close: the gate's write in flight fails.
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deaf.sock.close()
    time.sleep(0.5)
    for _ in range(5):
        assert metrics(region)  # /metrics answers (it waits 5 s at most)
        assert isinstance(connect(region, new_source()).request(m.Ping(ts_ms=1)), m.Pong)
        time.sleep(0.2)


class RawWebSocket:
    """A blocking WebSocket client of the gate's /ws that reads only when
    told to (Tornado's client reads in the background, so it cannot stand
    for a client that does not read). Each binary message is one frame
    payload of the protocol."""

    def __init__(self, region, source: str, rcvbuf: int | None = None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", region.http_port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._read_from(sock, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock = sock
        hs = ClientHandshake(region.gate_pk, codecs=(1,))
        self.send_payload(hs.hello())
        hs.receive_welcome(self.recv_payload())
        self.rx, self.tx, self.codec = hs.receiver, hs.sender, CODECS[hs.codec_id]
        _, self.ready = self.codec.decode(self.rx.open(self.recv_payload())[0])
        self.send_payload(self.tx.header)
        self.ref = 0

    @staticmethod
    def _read_from(sock, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise Closed()
            buf += chunk
        return buf

    def send_payload(self, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = bytes([0x82, 0x80 | n])
        elif n < 65536:
            header = bytes([0x82, 0x80 | 126]) + struct.pack(">H", n)
        else:
            header = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + masked)

    def recv_payload(self) -> bytes:
        while True:
            b0, b1 = self._read_from(self.sock, 2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", self._read_from(self.sock, 2))
            elif n == 127:
                (n,) = struct.unpack(">Q", self._read_from(self.sock, 8))
            payload = self._read_from(self.sock, n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise Closed()
            if opcode == 0x2:
                return payload

    def send(self, msg) -> int:
        self.ref += 1
        self.send_payload(self.tx.seal(self.codec.encode(msg, self.ref)))
        return self.ref

    def recv(self):
        plaintext, final = self.rx.open(self.recv_payload())
        ref, msg = self.codec.decode(plaintext)
        return ref, msg, final


@pytest.mark.timeout(90)
def test_a_websocket_client_behind_in_reading_is_paused_then_served(pause_region):
    # The WebSocket transport waits the same way as TCP: paused, not answered,
    # not dropped, and the gate keeps serving the others meanwhile.
    region = pause_region
    src = new_source()
    sender, tcp = deaf_reader(region, src)
    tcp.close()
    ws = RawWebSocket(region, src, rcvbuf=32 * 1024)
    ws.send(m.Login(user=tcp.name, password="", token=tcp.token, device="ws"))
    _, ok, _ = ws.recv()
    assert isinstance(ok, m.LoginOk), ok
    paused_not_answered_then_served(region, ws, sender)
