"""simzmq.limits: buckets, throttles, counters and the gate's policy, with
time passed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simzmq import config
from simzmq.limits import (
    ADDRESS_MEMO,
    AddressSet,
    address_key,
    BucketTable,
    FailureThrottle,
    Limiter,
    LimitsConfig,
    LogThrottle,
    TokenBucket,
    Verdict,
    pick_slow_consumers,
)

ALLOW, LIMIT, ABUSE = Verdict.ALLOW, Verdict.LIMIT, Verdict.ABUSE


# --- token bucket -------------------------------------------------------------------


def test_burst_then_limited_then_refilled():
    b = TokenBucket(rate=2, burst=3, now=0)
    assert [b.check(0) for _ in range(4)] == [ALLOW, ALLOW, ALLOW, LIMIT]
    assert b.retry_after(0) == pytest.approx(0.5)
    assert b.check(0.49) == LIMIT
    # 2 tokens a second, and the refusals cost none.
    assert [b.check(1.0) for _ in range(3)] == [ALLOW, ALLOW, LIMIT]


def test_tokens_never_exceed_the_burst():
    b = TokenBucket(rate=100, burst=2, now=0)
    assert [b.check(1000) for _ in range(3)] == [ALLOW, ALLOW, LIMIT]


def test_far_over_the_limit_is_abuse():
    b = TokenBucket(rate=1, burst=5, now=0, abuse_after=20)
    verdicts = [b.check(0) for _ in range(5 + 21)]
    assert verdicts[:5] == [ALLOW] * 5
    assert verdicts[5:25] == [LIMIT] * 20
    assert verdicts[25] == ABUSE


def test_a_client_that_backs_off_is_forgiven():
    b = TokenBucket(rate=10, burst=5, now=0, abuse_after=20)
    for _ in range(5 + 20):
        assert b.check(0) != ABUSE
    # 20 strikes drain at 10/s: two quiet seconds later all is forgiven.
    assert b.check(2.0) == ALLOW
    assert b.strikes == 0
    # ...and one retrying at the rate never becomes abuse.
    t = 2.0
    for _ in range(1000):
        t += 0.1
        assert b.check(t) == ALLOW


def test_idle_means_full_and_forgiven():
    b = TokenBucket(rate=1, burst=2, now=0, abuse_after=10)
    assert b.idle(0)
    b.check(0)
    b.check(0)
    b.check(0)
    assert not b.idle(1.0)
    assert b.idle(3.0)


def test_time_going_backwards_changes_nothing():
    b = TokenBucket(rate=1, burst=1, now=10)
    assert b.check(10) == ALLOW
    assert b.check(5) == LIMIT
    assert b.check(11) == ALLOW


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(0.1, 100), burst=st.integers(1, 50),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=300))
def test_never_more_than_burst_plus_rate_times_time(rate, burst, gaps):
    b = TokenBucket(rate, burst, now=0)
    t, allowed_at = 0.0, []
    for gap in gaps:
        t += gap
        if b.check(t) == ALLOW:
            allowed_at.append(t)
    # In every window [allowed_at[i], allowed_at[j]] at most burst + rate*width pass.
    for i in range(len(allowed_at)):
        for j in range(i, len(allowed_at)):
            assert j - i + 1 <= burst + rate * (allowed_at[j] - allowed_at[i]) + 1e-6


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 50), burst=st.integers(1, 20), n=st.integers(1, 400))
def test_a_patient_client_is_always_served(rate, burst, n):
    """Requests spaced 1/rate apart are all allowed, however many."""
    b = TokenBucket(rate, burst, now=0, abuse_after=4 * burst)
    assert all(b.check(i / rate) == ALLOW for i in range(n))


# --- tables -----------------------------------------------------------------------------


def test_bucket_table_keys_are_independent_and_pruned():
    t = BucketTable(rate=1, burst=2)
    assert [t.check("a", 0) for _ in range(3)] == [ALLOW, ALLOW, LIMIT]
    assert t.check("b", 0) == ALLOW
    assert len(t) == 2
    assert t.retry_after("a", 0) == pytest.approx(1.0)
    assert t.prune(0.5) == 0
    assert t.prune(10) == 2 and len(t) == 0


def test_bucket_table_is_bounded_and_forgets_the_least_recently_used():
    t = BucketTable(rate=0.001, burst=1, max_entries=3)
    for key in ("a", "b", "c"):
        t.check(key, 0)
    t.check("a", 0)  # a is used again: b is now the oldest
    t.check("d", 0)
    assert len(t) == 3 and "b" not in t and "a" in t and "d" in t


def test_failure_throttle_grows_and_is_capped():
    f = FailureThrottle(free=3, base_delay_s=1, max_delay_s=10, forget_s=1000)
    for i in range(2):
        f.failed("u", 0)
        assert f.wait("u", 0) == 0
    f.failed("u", 0)  # the third: from now on, a delay
    assert f.wait("u", 0) == 1
    assert f.wait("u", 0.5) == 0.5
    assert f.wait("u", 1) == 0
    delays = []
    for t in range(1, 8):
        f.failed("u", 100 * t)
        delays.append(f.wait("u", 100 * t))
    assert delays == [2, 4, 8, 10, 10, 10, 10]


def test_failure_throttle_forgets_one_per_interval_and_on_success():
    f = FailureThrottle(free=2, base_delay_s=1, max_delay_s=100, forget_s=60)
    for _ in range(5):
        f.failed("u", 0)
    assert f.failures("u", 0) == 5 and f.wait("u", 0) == 8
    assert f.failures("u", 60) == 4
    assert f.failures("u", 5 * 60) == 0 and f.wait("u", 300) == 0
    assert f.prune(300) == 1 and len(f) == 0
    for _ in range(5):
        f.failed("u", 0)
    f.succeeded("u")
    assert f.wait("u", 0) == 0


def test_failure_throttle_huge_counts_do_not_overflow():
    f = FailureThrottle(free=0, base_delay_s=1, max_delay_s=300, forget_s=0)
    for _ in range(5000):
        f.failed("u", 0)
    assert f.wait("u", 0) == 300


def test_counts_and_log_throttle():
    log = LogThrottle(lines=2, interval_s=10)
    assert [log.allow("k", t) for t in (0, 1, 2, 3)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    assert log.allow("other", 3) == (True, 0)
    assert log.allow("k", 10) == (True, 2)  # two left out in the last interval
    assert log.allow("k", 11) == (True, 0)


def test_pick_slow_consumers():
    queued = {"a": 100, "b": 5000, "c": 3000, "d": 10}
    assert pick_slow_consumers(queued, total_limit=10000, min_bytes=50) == []
    assert pick_slow_consumers(queued, total_limit=5000, min_bytes=50) == ["b"]
    assert pick_slow_consumers(queued, total_limit=100, min_bytes=50) == ["b", "c", "a"]
    # Never one that keeps up, even when that leaves the total over.
    assert pick_slow_consumers({"a": 40, "b": 40}, total_limit=10, min_bytes=50) == []


@pytest.mark.parametrize("address, inside", [
    ("127.0.0.1", True), ("127.0.0.2", False), ("10.1.2.3", True), ("::1", True),
    ("::ffff:10.9.9.9", True), ("fe80::1%eth0", False), ("2001:db8::5", True), ("not an ip", False), ("", False)])
def test_address_set(address, inside):
    s = AddressSet(["127.0.0.1", "::1", "10.0.0.0/8", "2001:db8::/32", " "])
    assert (address in s) == inside


def test_empty_address_set_holds_nothing():
    assert "127.0.0.1" not in AddressSet([])


# --- configuration -----------------------------------------------------------------------


def test_config_file_defaults_are_the_dataclass_defaults():
    """conf/simzmq.toml documents every limit; its values are the defaults."""
    assert config.load(env={}).gate.limits == LimitsConfig()


def test_config_from_environment():
    env = {"SIMZMQ_GATE_LIMITS_TRUSTED_ADDRESSES": "", "SIMZMQ_GATE_LIMITS_REQUESTS_PER_S": "2.5",
           "SIMZMQ_GATE_LIMITS_MAX_SESSIONS_PER_USER": "3"}
    cfg = config.load(env=env).gate.limits
    assert cfg.trusted_addresses == () and cfg.requests_per_s == 2.5 and cfg.max_sessions_per_user == 3


@pytest.mark.parametrize("values, message", [
    ({"nonsense": 1}, "unknown"),
    ({"requests_burst": 1.5}, "integer"),
    ({"requests_per_s": "fast"}, "number"),
    ({"max_connections": True}, "integer"),
    ({"sends_per_s": -1}, "negative"),
    ({"trusted_addresses": ["300.1.1.1"]}, "does not appear"),
])
def test_bad_config_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        LimitsConfig.from_mapping(values)


def test_config_accepts_ints_for_floats_and_a_comma_list():
    cfg = LimitsConfig.from_mapping({"requests_per_s": 7, "trusted_addresses": "10.0.0.1, 10.0.0.2"})
    assert cfg.requests_per_s == 7.0 and isinstance(cfg.requests_per_s, float)
    assert cfg.trusted_addresses == ("10.0.0.1", " 10.0.0.2")
    assert "10.0.0.2" in Limiter(cfg).trusted


# --- the policy -------------------------------------------------------------------------------


def limiter(**kw) -> Limiter:
    kw.setdefault("trusted_addresses", ())
    return Limiter(LimitsConfig(**kw))


def test_connections_per_gate_and_per_address():
    lim = limiter(max_connections=3, max_connections_per_address=2, trusted_addresses=("10.0.0.9",))
    assert lim.admit("10.0.0.1", 0) is None
    assert lim.admit("10.0.0.1", 0) is None
    assert lim.admit("10.0.0.1", 0) == "address_connections"
    assert lim.admit("10.0.0.9", 0) is None
    assert lim.admit("10.0.0.2", 0) == "connections"
    lim.release("10.0.0.1")
    assert lim.admit("10.0.0.1", 0) is None
    for _ in range(3):
        lim.release("10.0.0.1")
    lim.release("10.0.0.9")
    assert lim.connections == 0 and len(lim.per_address) == 0


def test_trusted_address_skips_only_per_address_connection_cap():
    lim = limiter(max_connections=2, max_connections_per_address=1, trusted_addresses=("127.0.0.1",))
    assert lim.admit("127.0.0.1", 0) is None and lim.admit("127.0.0.1", 0) is None
    assert lim.admit("127.0.0.1", 0) == "connections"


def test_new_connections_per_address_are_rate_limited_before_any_handshake():
    lim = limiter(connects_per_address_per_s=2, connects_per_address_burst=3, trusted_addresses=("10.0.0.9",))
    assert [lim.admit("10.0.0.1", 0) for _ in range(4)] == [None, None, None, "address_connects"]
    assert lim.admit("10.0.0.2", 0) is None  # another address has its own bucket
    assert lim.admit("10.0.0.1", 0.5) is None  # one back after 1/rate
    assert lim.admit("10.0.0.1", 0.5) == "address_connects"
    assert all(lim.admit("10.0.0.9", 0) is None for _ in range(10))  # trusted: no rate
    # A refused connection is not counted as held.
    assert lim.per_address.get("10.0.0.1") == 4


def test_a_client_far_behind_in_reading_is_paused():
    lim = limiter(pause_reading_bytes=1000)
    assert not lim.behind(0) and not lim.behind(1000)
    assert lim.behind(1001)


def test_connection_bucket_kicks_after_abuse_factor_bursts():
    lim = limiter(requests_per_s=1, requests_burst=10, abuse_factor=3)
    b = lim.connection_bucket(0)
    verdicts = [b.check(0) for _ in range(10 + 30 + 1)]
    assert verdicts.count(ALLOW) == 10 and verdicts.count(LIMIT) == 30 and verdicts[-1] == ABUSE


def test_sends_are_per_user():
    lim = limiter(sends_per_s=1, sends_burst=2)
    conn = lim.connection_byte_bucket(0)
    assert [lim.send("ann", 10, conn, 0) for _ in range(3)] == [(ALLOW, ""), (ALLOW, ""), (LIMIT, "sends")]
    assert lim.send("bob", 10, lim.connection_byte_bucket(0), 0) == (ALLOW, "")


def test_a_bucket_charges_the_cost_and_strikes_count_it():
    b = TokenBucket(100, 1000, 0, abuse_after=500)
    assert b.check(0, 600) == ALLOW and b.check(0, 400) == ALLOW
    assert b.check(0, 1) == LIMIT
    assert b.retry_after(0, 300) == pytest.approx(3.0)
    assert b.check(1.0, 100) == ALLOW  # refilled 100 in a second
    assert b.check(1.0, 600) == ABUSE  # 1 + 600 strikes > 500


def test_send_bytes_are_budgeted_per_connection_and_per_user():
    lim = limiter(sends_per_s=1000, sends_burst=1000, send_bytes_per_connection_per_s=1000,
                  send_bytes_per_connection_burst=3000, send_bytes_per_user_per_s=1500,
                  send_bytes_per_user_burst=5000)
    one, two = lim.connection_byte_bucket(0), lim.connection_byte_bucket(0)
    assert [lim.send("ann", 1000, one, 0)[1] for _ in range(4)] == ["", "", "", "send_bytes_connection"]
    # The user's own budget (5000) runs out over two connections.
    assert [lim.send("ann", 1000, two, 0)[1] for _ in range(3)] == ["", "", "send_bytes_user"]
    assert lim.send("bob", 1000, lim.connection_byte_bucket(0), 0) == (ALLOW, "")
    # Refused for bytes is never abuse, however far over.
    assert all(lim.send("ann", 1000, one, 0) == (LIMIT, "send_bytes_connection") for _ in range(100))
    assert lim.send_retry_after("ann", 1000, one, 0) == pytest.approx(1.0)
    assert lim.send("ann", 1000, one, 1.0) == (ALLOW, "")


def test_a_send_larger_than_the_byte_burst_needs_a_full_bucket():
    lim = limiter(send_bytes_per_connection_per_s=100, send_bytes_per_connection_burst=1000)
    conn = lim.connection_byte_bucket(0)
    assert lim.send("ann", 5000, conn, 0) == (ALLOW, "")
    assert lim.send("ann", 1, conn, 0) == (LIMIT, "send_bytes_connection")
    assert lim.send_retry_after("ann", 5000, conn, 0) == pytest.approx(10.0)
    assert lim.send("ann", 5000, conn, 10.0) == (ALLOW, "")


def test_default_byte_budgets_are_above_a_person_and_fit_the_largest_body():
    cfg = LimitsConfig()
    assert cfg.send_bytes_per_connection_per_s >= 65536 and cfg.send_bytes_per_user_per_s >= 65536
    assert cfg.send_bytes_per_connection_burst >= 16 * 65536 and cfg.send_bytes_per_user_burst >= 16 * 65536


def test_registers_per_address_then_per_user():
    lim = limiter(registers_per_address_per_min=60, registers_per_address_burst=2,
                  registers_per_user_per_min=60, registers_per_user_burst=1)
    assert lim.register("a", "10.0.0.1", 0) == (ALLOW, "register_user")
    assert lim.register("a", "10.0.0.1", 0) == (LIMIT, "register_user")
    assert lim.register("b", "10.0.0.1", 0) == (LIMIT, "register_address")
    assert lim.register("b", "10.0.0.2", 0) == (ALLOW, "register_user")
    assert lim.register("c", "10.0.0.1", 1.0) == (ALLOW, "register_user")


def test_login_failures_throttle_password_logins_per_user_not_token_resumes():
    lim = limiter(login_free_failures_per_user=2, login_free_failures_per_address=100,
                  login_delay_base_s=1, login_delay_max_s=60, login_forget_s=600)
    for i in range(2):
        lim.login_failed("victim", f"10.0.0.{i}", True, 0)
    wait, limit = lim.login_wait("victim", "10.0.0.7", True, 0)
    assert wait == 1 and limit == "login_user"
    # The victim's token resume is not held up, and other users are not.
    assert lim.login_wait("victim", "10.0.0.7", False, 0) == (0.0, "")
    assert lim.login_wait("other", "10.0.0.7", True, 0) == (0.0, "")
    # Failed token logins do not count per user.
    for _ in range(10):
        lim.login_failed("other", "10.0.0.8", False, 0)
    assert lim.login_wait("other", "10.0.0.9", True, 0) == (0.0, "")


def test_login_failures_per_address_and_success_does_not_launder_them():
    lim = limiter(login_free_failures_per_user=100, login_free_failures_per_address=3,
                  login_delay_base_s=2, login_delay_max_s=60, login_forget_s=600)
    for user in ("a", "b", "c"):
        lim.login_failed(user, "10.0.0.1", True, 0)
    assert lim.login_wait("d", "10.0.0.1", True, 0) == (2, "login_address")
    assert lim.login_wait("d", "10.0.0.1", False, 0) == (2, "login_address")
    lim.login_succeeded("d")
    assert lim.login_wait("e", "10.0.0.1", True, 1) == (1, "login_address")
    assert lim.login_wait("e", "10.0.0.2", True, 0) == (0.0, "")


def test_password_checks_one_at_a_time_per_user_and_per_free_failure_per_address():
    lim = limiter(login_free_failures_per_user=5, login_free_failures_per_address=3,
                  login_delay_base_s=1, login_delay_max_s=60, login_forget_s=600)
    # One check of a user at a time: the next waits for its answer.
    assert lim.login_wait("victim", "10.0.0.1", True, 0) == (0.0, "")
    lim.login_started("victim", "10.0.0.1", True)
    assert lim.login_wait("victim", "10.0.0.2", True, 0) == (1.0, "login_user")
    # Token resumes and other users are not held up by it.
    assert lim.login_wait("victim", "10.0.0.2", False, 0) == (0.0, "")
    assert lim.login_wait("other", "10.0.0.2", True, 0) == (0.0, "")
    lim.login_ended("victim", "10.0.0.1", True)
    assert lim.login_wait("victim", "10.0.0.2", True, 0) == (0.0, "")
    # An address: as many at once as it has free failures left, at least one.
    for user in ("a", "b", "c"):
        assert lim.login_wait(user, "10.0.0.3", True, 0) == (0.0, "")
        lim.login_started(user, "10.0.0.3", True)
    assert lim.login_wait("d", "10.0.0.3", True, 0) == (1.0, "login_address")
    assert lim.login_wait("d", "10.0.0.3", False, 0) == (0.0, "")
    for user in ("a", "b"):
        lim.login_ended(user, "10.0.0.3", True)
        lim.login_failed(user, "10.0.0.3", True, 0)
    assert lim.login_wait("d", "10.0.0.3", True, 0) == (1.0, "login_address")  # c's still running
    lim.login_ended("c", "10.0.0.3", True)
    lim.login_failed("c", "10.0.0.3", True, 0)
    assert lim.login_wait("d", "10.0.0.3", True, 0) == (1.0, "login_address")  # the delay now
    assert lim.login_wait("d", "10.0.0.3", True, 1) == (0.0, "")
    lim.login_started("d", "10.0.0.3", True)
    assert lim.login_wait("e", "10.0.0.3", True, 1) == (1.0, "login_address")
    lim.login_ended("d", "10.0.0.3", True)
    assert len(lim.password_checks) == 0


def test_trusted_addresses_skip_per_address_login_and_register_limits():
    lim = limiter(login_free_failures_per_address=1, registers_per_address_burst=1,
                  login_free_failures_per_user=100, trusted_addresses=("127.0.0.0/8",))
    for _ in range(5):
        lim.login_failed("u", "127.0.0.1", True, 0)
    assert lim.login_wait("u2", "127.0.0.1", True, 0) == (0.0, "")
    assert all(lim.register(f"u{i}", "127.0.0.1", 0)[0] == ALLOW for i in range(5))


def test_history_per_address():
    lim = limiter(history_per_s=1, history_burst=2, trusted_addresses=("127.0.0.1",))
    assert [lim.history("10.0.0.1", 0) for _ in range(3)] == [ALLOW, ALLOW, LIMIT]
    assert all(lim.history("127.0.0.1", 0) == ALLOW for _ in range(10))


def test_sessions_and_pending():
    lim = limiter(max_sessions_per_user=2, max_pending_requests=3)
    assert not lim.sessions_full(1) and lim.sessions_full(2)
    assert not lim.reading_paused(2) and lim.reading_paused(3)


def test_prune_reports_table_sizes():
    lim = limiter()
    lim.send("a", 100, lim.connection_byte_bucket(0), 0)
    lim.login_failed("a", "10.0.0.1", True, 0)
    lim.admit("10.0.0.1", 0)
    sizes = lim.prune(1)
    assert sizes["sends"] == 0 and sizes["send_bytes"] == 0  # refilled already: nothing to remember
    assert sizes["login_user"] == 1 and sizes["login_address"] == 1 and sizes["address_connections"] == 1
    assert lim.prune(10 * 3600)["login_user"] == 0


def test_defaults_are_finite_and_sane():
    cfg = LimitsConfig()
    assert cfg.requests_burst >= 100  # a client pipelining 100 Sends is not refused
    assert cfg.abuse_factor > 1
    assert math.isfinite(cfg.login_delay_max_s)


def test_abuse_bans_the_address_for_a_growing_while():
    lim = limiter(abuse_ban_s=10, abuse_ban_max_s=600, trusted_addresses=("10.0.0.9",))
    assert lim.abused("10.0.0.1", 0) == 10
    assert lim.admit("10.0.0.1", 1) == "address_banned"
    assert lim.admit("10.0.0.2", 1) is None  # only that address
    assert lim.admit("10.0.0.1", 10.5) is None
    assert lim.abused("10.0.0.1", 11) == 20
    assert lim.admit("10.0.0.1", 25) == "address_banned"  # 20 s the second time
    assert lim.admit("10.0.0.1", 31.5) is None
    assert lim.abused("10.0.0.9", 0) == 0  # trusted: never banned
    assert lim.admit("10.0.0.9", 1) is None


def test_abuse_bans_can_be_turned_off():
    lim = limiter(abuse_ban_s=0)
    lim.abused("10.0.0.1", 0)
    assert lim.admit("10.0.0.1", 0) is None


def test_address_set_answers_the_same_from_its_memo():
    trusted = AddressSet(["10.0.0.0/8", "::1"])
    for _ in range(2):  # parsed, then remembered
        assert "10.1.2.3" in trusted and "::1" in trusted and "::ffff:10.0.0.1" in trusted
        assert "11.0.0.1" not in trusted and "nonsense" not in trusted
    for i in range(ADDRESS_MEMO + 10):  # a full memo forgets, answers unchanged
        assert (f"10.0.{i // 256 % 256}.{i % 256}" in trusted) is True
    assert trusted._contains.cache_info().currsize <= ADDRESS_MEMO


def test_per_address_limits_count_ipv6_by_its_slash_64():
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key("10.0.0.1") == "10.0.0.1"
    assert address_key("not an address") == "not an address"
    lim = limiter(max_connections_per_address=2, abuse_ban_s=10)
    assert lim.admit("2001:db8:1:2::1", 0) is None
    assert lim.admit("2001:db8:1:2::ffff", 0) is None  # another address, the same /64
    assert lim.admit("2001:db8:1:2:1:2:3:4", 0) == "address_connections"
    assert lim.admit("2001:db8:1:3::1", 0) is None  # the next /64 is someone else
    lim.release("2001:db8:1:2::1")
    assert lim.admit("2001:db8:1:2::77", 0) is None
    # A ban holds for the whole /64; an IPv4-mapped address is its IPv4 one.
    lim.abused("2001:db8:9:9::1", 0)
    assert lim.admit("2001:db8:9:9::2", 1) == "address_banned"
    lim.abused("::ffff:10.0.0.5", 0)
    assert lim.admit("10.0.0.5", 1) == "address_banned"


def test_a_ban_ceiling_below_the_ban_is_refused_at_start():
    with pytest.raises(ValueError, match="abuse_ban_max_s"):
        LimitsConfig.from_mapping({"abuse_ban_s": 10.0, "abuse_ban_max_s": 0.0})
    assert LimitsConfig.from_mapping({"abuse_ban_s": 0.0, "abuse_ban_max_s": 0.0}).abuse_ban_s == 0


def test_max_groups_per_user_is_a_setting_of_at_least_one():
    assert LimitsConfig().max_groups_per_user == 1000  # protocol.md section 7's default
    assert LimitsConfig.from_mapping({"max_groups_per_user": 3}).max_groups_per_user == 3
    with pytest.raises(ValueError, match="max_groups_per_user"):
        LimitsConfig.from_mapping({"max_groups_per_user": 0})
