"""Push jobs of group messages (issue 15, item 4), through the IM service
into the store's outbox, on SQLite and a real throwaway Postgres: every
member but the sender gets a job of their own, events queue none, and one
member's job is settled, retried or dead-lettered without touching the
others' jobs of the same message."""

from __future__ import annotations

import pytest

from simzmq.push.policy import call_body, plan
from simzmq.service import IMService
from simzmq.store import open_store
from simzmq.wire import messages as m
from tests.pg import fresh_store_url

T0 = 1_700_000_000_000
GROUP = "#crew"
DELAY_MS = 1000

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    s = open_store(fresh_store_url(request, tmp_path, request.param))
    yield s
    s.close()


@pytest.fixture
def service(store):
    with store.transaction():
        for name in ("ann", "bob", "cat", "dan"):
            assert store.create_user(name, f"hash-{name}", T0)
    return IMService(store, 10**9, 1 << 20, push_delay_ms=DELAY_MS)


def do(service, actor, msg, ts=T0):
    with service.store.transaction():
        return service.handle(actor, b"s" * 16, msg, ts).reply


def claim_all(store, token, now_ms):
    with store.transaction():
        return store.claim_push_jobs(token, now_ms, now_ms + 60_000, 100, 100)


def settle_everything(store):
    """Finish every queued job (the contacts' one-to-one messages)."""
    for job in claim_all(store, "setup", T0 + 10**6):
        with store.transaction():
            store.finish_push_jobs(job.user, [job.msg_id])
    assert store.push_stats().queued == 0


def make_group(service, members=("bob", "cat")):
    for member in members:  # each writes to ann first: ann is their contact and may put them in
        assert isinstance(do(service, member, m.Send(to="ann", cmid=b"hi-" + member.encode(), kind=0, body=b"hi")),
                          m.SendOk)
    assert isinstance(do(service, "ann", m.GroupCreate(group=GROUP, title="Crew", members=list(members))),
                      m.GroupInfo)


def test_a_group_message_queues_one_job_per_member_but_the_sender(store, service):
    make_group(service)
    settle_everything(store)
    service.take_push_due()
    sent = do(service, "bob", m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"hello crew"), ts=T0 + 5)
    assert service.take_push_due() == T0 + 5 + DELAY_MS
    jobs = claim_all(store, "t1", T0 + 5 + DELAY_MS)
    assert sorted((j.user, j.msg_id, j.group, j.sender) for j in jobs) == [
        ("ann", sent.msg_id, GROUP, "bob"), ("cat", sent.msg_id, GROUP, "bob")]
    # Each job carries the member's own inbox seq (the group message is not
    # at the same seq in every inbox).
    for job in jobs:
        (copy,) = [x for x in store.sync(job.user, 0, 500, 10**9)[0] if x.msg_id == sent.msg_id]
        assert job.seq == copy.seq
        body = call_body(plan([job], online=False, now_ms=T0 + 10**6).calls[0])
        assert body["group"] == GROUP and body["user"] == job.user and body["preview"] == "hello crew"


def test_a_one_to_one_message_names_no_group(store, service):
    sent = do(service, "ann", m.Send(to="bob", cmid=b"d1", kind=0, body=b"psst"))
    (job,) = claim_all(store, "t1", T0 + DELAY_MS)
    assert (job.user, job.msg_id, job.group) == ("bob", sent.msg_id, "")
    assert call_body(plan([job], online=False, now_ms=T0 + DELAY_MS).calls[0])["group"] == ""


def test_group_events_queue_no_push(store, service):
    make_group(service)  # created: an event to bob and cat
    settle_everything(store)
    service.take_push_due()
    assert isinstance(do(service, "dan", m.Send(to="ann", cmid=b"hi-dan", kind=0, body=b"hi")), m.SendOk)
    settle_everything(store)
    service.take_push_due()
    for msg in (m.GroupTitle(group=GROUP, title="Crew 2", cmid=b"t1"),
                m.GroupAdd(group=GROUP, users=["dan"], cmid=b"a1"),
                m.GroupRemove(group=GROUP, users=["dan"], cmid=b"r1")):
        assert do(service, "ann", msg) == m.Ok()
    assert do(service, "cat", m.GroupRemove(group=GROUP, users=["cat"], cmid=b"leave")) == m.Ok()  # cat leaves
    assert [x.kind for x in store.sync("bob", 0, 500, 10**9)[0] if x.to == GROUP] == [m.GROUP_EVENT_KIND] * 5
    assert store.push_stats().queued == 0 and service.take_push_due() is None


def test_a_retried_or_refused_group_send_queues_nothing_more(store, service):
    make_group(service)
    settle_everything(store)
    send = m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"once")
    first = do(service, "ann", send)
    assert store.push_stats().queued == 2
    assert do(service, "ann", send) == first  # the retry answers the first SendOk
    assert isinstance(do(service, "dan", m.Send(to=GROUP, cmid=b"g2", kind=0, body=b"let me in")), m.Error)
    assert store.push_stats().queued == 2


def test_each_members_job_is_settled_on_its_own(store, service):
    make_group(service)
    settle_everything(store)
    sent = do(service, "ann", m.Send(to=GROUP, cmid=b"g1", kind=0, body=b"hi all"))
    # cat fetches it (a Sync past it raises cat's delivered mark); bob does not.
    cat_seq = store.max_seq("cat")
    with store.transaction():
        store.raise_delivered("cat", cat_seq)
    jobs = {j.user: j for j in claim_all(store, "t1", T0 + DELAY_MS)}
    assert plan([jobs["cat"]], online=False, now_ms=T0 + DELAY_MS).skipped == {sent.msg_id: "fetched"}
    assert len(plan([jobs["bob"]], online=False, now_ms=T0 + DELAY_MS).calls) == 1
    with store.transaction():
        store.finish_push_jobs("cat", [sent.msg_id])
        store.retry_push_job("bob", sent.msg_id, T0 + 5000, 1, "status 503")
        store.release_push_jobs("t1", "bob")
    assert [(j.user, j.attempts) for j in claim_all(store, "t2", T0 + 5000)] == [("bob", 1)]
    with store.transaction():
        store.bury_push_jobs("bob", [sent.msg_id], T0 + 6000, "status 410")
    assert [(d.user, d.msg_id) for d in store.dead_push_jobs(10)] == [("bob", sent.msg_id)]
    with store.transaction():
        assert store.requeue_dead_push_jobs([sent.msg_id], T0 + 7000) == 1
    assert [(j.user, j.msg_id, j.attempts) for j in claim_all(store, "t3", T0 + 7000)] == [("bob", sent.msg_id, 0)]


def test_two_claimants_on_one_postgres_never_hold_one_users_jobs_together(pg_cluster):
    """Two push services (two regions on one store): while one holds a
    user's claim, open or committed, the other gets none of that user's
    jobs, not even one queued meanwhile; the user's next job goes to the
    other only after the first has settled and released."""
    url = pg_cluster.create_database()
    one, two = open_store(url), open_store(url)
    try:
        with one.transaction():
            for name in ("ann", "bob"):
                assert one.create_user(name, f"hash-{name}", T0)
        service = IMService(one, 10**9, 1 << 20, push_delay_ms=DELAY_MS)
        first = do(service, "ann", m.Send(to="bob", cmid=b"c1", kind=0, body=b"one"))
        due, lease = T0 + DELAY_MS, T0 + DELAY_MS + 5000
        with one.transaction():
            assert [j.msg_id for j in one.claim_push_jobs("one", due, lease, 10, 10)] == [first.msg_id]
            with two.transaction():  # the first claim not committed yet: skipped, not waited for
                assert two.claim_push_jobs("two", due, lease, 10, 10) == []
        with two.transaction():
            assert two.claim_push_jobs("two", due, lease, 10, 10) == []
        second = do(service, "ann", m.Send(to="bob", cmid=b"c2", kind=0, body=b"two"), ts=T0 + 10)
        with two.transaction():  # due, but behind the job the first holds
            assert two.claim_push_jobs("two", due + 10, lease, 10, 10) == []
        with one.transaction():
            one.finish_push_jobs("bob", [first.msg_id])
            one.release_push_jobs("one", "bob")
        with two.transaction():
            assert [j.msg_id for j in two.claim_push_jobs("two", due + 10, lease, 10, 10)] == [second.msg_id]
        with one.transaction():
            assert one.claim_push_jobs("one", due + 10, lease, 10, 10) == []
    finally:
        one.close()
        two.close()
