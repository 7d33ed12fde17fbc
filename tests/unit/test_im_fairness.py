"""The IM worker's intake rules, with time passed in: fair batches per user,
and the password queue's admission against deadlines."""

import math

from simzmq.im import REPLY_MARGIN_S, Job, PasswordQueue, fair_batch


def job(user, size, tag):
    return Job(None, tag, user, b"", None, size=size)


def test_one_users_megabytes_do_not_fill_a_batch():
    jobs = [job("big", 60_000, i) for i in range(10)] + [job("ann", 100, "a1"), job("bob", 100, "b1")]
    now, later = fair_batch(jobs, 200_000)
    assert [j.corr for j in now] == [0, 1, 2, "a1", "b1"]
    assert [j.corr for j in later] == list(range(3, 10))


def test_a_put_off_user_stays_in_order_and_always_gets_one():
    jobs = [job("big", 500_000, 1), job("big", 10, 2), job("ann", 10, "a")]
    now, later = fair_batch(jobs, 1000)
    assert [j.corr for j in now] == [1, "a"]  # one request always goes, however large
    assert [j.corr for j in later] == [2]     # nothing of the user's overtakes what was put off
    again, rest = fair_batch(later + [job("big", 10, 3)], 1000)
    assert [j.corr for j in again] == [2, 3] and rest == []


def test_password_queue_refuses_what_cannot_finish_before_its_deadline():
    q = PasswordQueue(threads=2, cost_s=0.1)
    now = 100.0
    admitted = 0
    while q.admit(now, now + 1.0):
        q.queued += 1
        admitted += 1
    # Two threads at 0.1 s a check: about 2 × 1 s / 0.1 s checks fit in the deadline.
    assert 16 <= admitted <= 20
    assert q.admit(now, math.inf)  # no deadline (an older gate): always queued
    assert not q.worth_starting(now, now + 0.1)
    assert q.worth_starting(now, now + 0.1 + REPLY_MARGIN_S + 0.01)


def test_password_queue_measures_a_moving_average():
    q = PasswordQueue(threads=1)
    assert q.finish_after() == 0.0  # nothing measured yet: nothing refused
    q.measured(0.1)
    assert q.cost_s == 0.1
    q.measured(0.2)
    assert 0.1 < q.cost_s < 0.2
