from simzmq.pushlog import MAX_ABOVE, PushLog


def test_in_order_pushes_advance_the_watermark():
    log = PushLog()
    assert all(log.first_time(s, 0.0) for s in (1, 2, 3))
    assert log.watermark == 3 and not log.above and log.hole_open_for(5.0) == 0


def test_duplicates_are_refused_below_and_above_the_watermark():
    log = PushLog()
    assert log.first_time(1, 0.0) and not log.first_time(1, 0.0)
    assert log.first_time(3, 0.0) and not log.first_time(3, 0.0)
    assert log.watermark == 1 and log.above == {3}


def test_out_of_order_arrival_closes_the_hole():
    log = PushLog()
    log.first_time(2, 1.0)
    log.first_time(3, 1.5)
    assert log.watermark == 0 and log.hole_open_for(2.0) == 1.0
    log.first_time(1, 2.0)
    assert log.watermark == 3 and not log.above and log.hole_open_for(9.0) == 0


def test_raise_watermark_drops_what_it_covers():
    log = PushLog()
    log.first_time(5, 0.0)
    log.first_time(7, 0.0)
    log.raise_watermark(4)
    assert log.watermark == 5 and log.above == {7}
    log.raise_watermark(9)
    assert log.watermark == 9 and not log.above and log.hole_since is None
    log.raise_watermark(3)  # never goes down
    assert log.watermark == 9
    assert not log.first_time(9, 0.0) and log.first_time(10, 0.0)


def test_a_hole_behind_too_many_pushes_counts_as_lost_at_once():
    log = PushLog()
    for s in range(2, MAX_ABOVE + 3):
        log.first_time(s, 0.0)
    assert log.hole_open_for(0.0) == float("inf")
