"""The push decisions (simzmq/push/policy.py), with time and randomness given."""

import json

import pytest

from simzmq.push import webhook
from simzmq.push.policy import (
    BadReport, Dead, Heard, Presence, PushTiming, Retry, Verdict, after_failure, backoff_ms, call_body,
    delivery_id, parse_report, plan, preview, verdict)
from simzmq.store.base import PushJob

T0 = 1_700_000_000_000
TIMING = PushTiming(max_age_ms=3_600_000, backoff_min_ms=1000, backoff_max_ms=60_000)


def job(msg_id, seq=None, due=T0, created=None, delivered=0, kind=0, body=b"hi", attempts=0, user="bob"):
    created = due if created is None else created
    return PushJob(msg_id, user, seq if seq is not None else msg_id, created, due, attempts, "ann", kind,
                   created, body, delivered, 3)


@pytest.mark.parametrize("status,expected", [
    (200, Verdict.DONE), (204, Verdict.DONE), (299, Verdict.DONE),
    (None, Verdict.RETRY), (429, Verdict.RETRY), (408, Verdict.RETRY), (500, Verdict.RETRY), (503, Verdict.RETRY),
    (400, Verdict.DEAD), (401, Verdict.DEAD), (404, Verdict.DEAD), (410, Verdict.DEAD), (301, Verdict.DEAD),
])
def test_verdict_by_status(status, expected):
    assert verdict(status) is expected


def test_backoff_doubles_with_jitter_up_to_the_cap():
    assert [backoff_ms(n, 0.0, TIMING) for n in (1, 2, 3, 4)] == [500, 1000, 2000, 4000]
    assert [backoff_ms(n, 0.999999, TIMING) for n in (1, 2, 3)] == [999, 1999, 3999]
    assert backoff_ms(20, 0.0, TIMING) == 30_000 and backoff_ms(20, 0.999999, TIMING) == 59_999
    assert backoff_ms(10**6, 0.5, TIMING) == 45_000  # no overflow however many attempts


def test_after_failure_retries_until_max_age_then_dies():
    assert after_failure(T0, 1, 503, None, T0 + 10, 0.0, TIMING) == Retry(T0 + 510)
    assert after_failure(T0, 1, None, "Timeout during request", T0 + 10, 0.0, TIMING) == Retry(T0 + 510)
    late = after_failure(T0, 30, 500, None, T0 + 3_590_000, 0.0, TIMING)
    assert isinstance(late, Dead) and "max_age" in late.reason
    assert after_failure(T0, 1, 404, None, T0, 0.0, TIMING) == Dead("status 404")


def test_plan_one_call_per_due_job_in_order():
    jobs = [job(1), job(2, due=T0 + 5), job(3, due=T0 + 100), job(4, due=T0)]
    p = plan(jobs, online=False, now_ms=T0 + 10)
    # job 4 is due but waits behind job 3, which is not
    assert [c.covers for c in p.calls] == [(1,), (2,)] and p.skipped == {}


def test_plan_skips_online_users_and_fetched_messages():
    jobs = [job(1, seq=1, delivered=1), job(2, seq=2, delivered=1)]
    assert plan(jobs, online=True, now_ms=T0) == ({1: "online", 2: "online"}, [])
    p = plan(jobs, online=False, now_ms=T0)
    assert p.skipped == {1: "fetched"} and [c.covers for c in p.calls] == [(2,)]
    assert plan([], online=False, now_ms=T0) == ({}, [])


def test_plan_coalesces_one_window_into_one_call_with_the_newest():
    jobs = [job(1, created=T0, due=T0 + 500), job(2, created=T0 + 200, due=T0 + 700),
            job(3, created=T0 + 300, due=T0 + 800, delivered=0), job(4, created=T0 + 900, due=T0 + 1400)]
    assert plan(jobs, online=False, now_ms=T0 + 499, coalesce_ms=300) == ({}, [])
    p = plan(jobs, online=False, now_ms=T0 + 500, coalesce_ms=300)
    (call,) = p.calls
    assert call.job.msg_id == 3 and call.covers == (1, 2, 3) and call.head.msg_id == 1


def test_call_body_and_preview():
    long = ("é" * 150).encode()
    assert preview(0, long) == "é" * 100
    assert preview(1, b"binary") == ""
    assert preview(0, b"\xff ok") == "\ufffd ok"
    p = plan([job(7, body=long)], online=False, now_ms=T0)
    body = call_body(p.calls[0])
    assert body == {"user": "bob", "msg_id": 7, "seq": 7, "sender": "ann", "kind": 0, "ts_ms": T0,
                    "preview": "é" * 100, "unread": 3, "group": ""}
    assert delivery_id(p.calls[0]) == "bob:7"


def test_signature_is_hmac_sha256_of_the_body():
    body = webhook.encode_body({"user": "bob"})
    # the value any HMAC-SHA256 implementation computes for key "s3cret" over these bytes
    import hashlib
    import hmac
    assert webhook.signature("s3cret", body) == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert webhook.signature_ok("s3cret", body, webhook.signature("s3cret", body))
    assert not webhook.signature_ok("other", body, webhook.signature("s3cret", body))
    assert not webhook.signature_ok("s3cret", body, None)


def test_webhook_urls():
    assert webhook.url_problem("http://127.0.0.1:9000/hook") is None
    assert webhook.url_problem("https://push.example.com/hook") is None
    assert "https" in webhook.url_problem("http://push.example.com/hook")
    assert webhook.url_problem("ftp://x/") is not None and webhook.url_problem("nonsense") is not None
    assert webhook.url_problem("http//127.0.0.1:9000/hook") is not None  # a typo'd scheme
    for bad_port in ("http://127.0.0.1:90o0/hook", "http://127.0.0.1:99999/hook", "http://127.0.0.1:0/hook"):
        assert "port" in webhook.url_problem(bad_port)
    assert "without spaces" in webhook.url_problem("http://127.0.0.1:9000/my hook")


_numbers = {}


def report(**kw):
    """A report numbered as its gate would number it."""
    _numbers[kw["gate"]] = kw.setdefault("n", _numbers.get(kw["gate"], 0) + 1)
    return parse_report(json.dumps(kw).encode())


def test_presence_from_reports_and_snapshots():
    p = Presence(expire_s=15, warm_s=6, now=0)
    assert not p.warm(5) and p.warm(6)
    p.report(report(gate="g1", op="start", user="bob", session="a"), 1)
    p.report(report(gate="g2", op="start", user="bob", session="b"), 1)
    assert p.online("bob") and not p.online("ann")
    p.report(report(gate="g1", op="end", user="bob", session="a"), 2)
    assert p.online("bob")  # still on g2
    p.report(report(gate="g2", op="end", user="bob", session="b"), 2)
    p.report(report(gate="g2", op="end", user="bob", session="b"), 2)  # a repeat changes nothing
    assert not p.online("bob")
    # a snapshot replaces what was known of that gate
    p.report(report(gate="g1", op="snapshot", users={"ann": ["x"], "cat": []}), 3)
    assert p.online("ann") and not p.online("cat") and p.count() == 1
    p.report(report(gate="g1", op="snapshot+", users={"eve": ["z"]}), 3)  # a big gate's next part
    assert p.online("ann") and p.online("eve")
    p.report(report(gate="g1", op="snapshot", users={"ann": ["x"]}), 3)
    assert not p.online("eve")
    # a gate that falls silent is taken for dead
    p.report(report(gate="g2", op="snapshot", users={"dan": ["y"]}), 10)
    assert p.expire(18.5) == ["g1"]
    assert not p.online("ann") and p.online("dan")
    p.report(report(gate="g2", op="bye"), 19)
    assert not p.online("dan") and p.count() == 0


def test_presence_ignores_copies_and_overtaken_reports():
    p = Presence(expire_s=15, warm_s=6, now=0)
    start = report(gate="g", op="start", user="bob", session="a", n=1)
    end = report(gate="g", op="end", user="bob", session="a", n=2)
    p.report(start, 1)
    p.report(end, 1)
    p.report(start, 1)  # the copy through the other broker, late
    assert not p.online("bob")
    p.report(report(gate="g", op="start", user="bob", session="b", n=3), 2)
    p.report(report(gate="g", op="snapshot", users={}, n=3), 2)  # the same number again: a copy
    assert p.online("bob")


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b'{"gate": "g", "op": "dance", "n": 1}', b'{"op": "start", "n": 1}',
    b'{"gate": "g", "op": "start", "user": "bob", "n": 1}',
    b'{"gate": "g", "op": "snapshot", "users": {"a": "x"}, "n": 1}',
    b'{"gate": "g", "op": "bye"}', b'{"gate": "g", "op": "bye", "n": 0}', b'{"gate": "g", "op": "bye", "n": true}',
    b"\xff\xfe",
])
def test_bad_presence_reports_are_refused(payload):
    with pytest.raises(BadReport):
        parse_report(payload)


def test_a_peer_region_is_said_silent_once_and_heard_again_once():
    heard = Heard(["b", "c"], 3.0, now=100.0)
    assert heard.fallen_silent(103.0) == []
    assert heard.hear("c", 102.0) is False
    # b never heard since the start: silent after 3 s, said once
    assert heard.fallen_silent(103.5) == ["b"]
    assert heard.fallen_silent(104.0) == []
    assert heard.fallen_silent(105.5) == ["c"]
    assert heard.hear("b", 106.0) is True
    assert heard.hear("b", 106.5) is False
    assert heard.fallen_silent(109.0) == []
    assert heard.fallen_silent(109.6) == ["b"]
