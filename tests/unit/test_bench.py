"""The pure parts of `simzmq bench`: calibration figures (their shape and
units, never their speed) and reading the gates' counters."""

from __future__ import annotations

import itertools

import pytest

from simzmq.bench.calibrate import calibrate, format_calibration, fsync_latency, python_loop, python_speed
from simzmq.bench.gatemetrics import event_totals


def fake_clock(step: float):
    """A clock that advances ``step`` seconds at each reading."""
    ticks = itertools.count()
    return lambda: next(ticks) * step


def test_python_loop_is_a_fixed_workload():
    assert python_loop(1000) == python_loop(1000)
    assert python_loop(0) == 0


def test_python_speed_is_ops_per_second_of_the_fastest_timing():
    # Each timing reads the clock twice, 0.5 s apart: 1000 ops in 0.5 s.
    speed = python_speed(ops=1000, repeats=3, clock=fake_clock(0.5))
    assert speed == {"ops_per_s": 2000, "loop_ops": 1000, "repeats": 3}


def test_fsync_latency_in_milliseconds_and_leaves_nothing(tmp_path):
    # Every write+fsync takes 2 ms on this clock.
    got = fsync_latency(tmp_path, count=20, block=512, clock=fake_clock(0.002))
    assert got == {"dir": str(tmp_path), "block_bytes": 512, "n": 20, "p50_ms": 2.0, "p99_ms": 2.0}
    assert list(tmp_path.iterdir()) == []


def test_fsync_latency_real_clock_shape(tmp_path):
    got = fsync_latency(tmp_path, count=10)
    assert got["n"] == 10 and got["block_bytes"] == 4096
    assert 0 <= got["p50_ms"] <= got["p99_ms"]


def test_calibration_without_a_writable_directory_says_why(tmp_path):
    cal = calibrate(tmp_path / "missing")
    assert cal["python"]["ops_per_s"] > 0
    assert "No such file" in cal["fsync"]["error"]
    assert "fsync not measured" in format_calibration(cal)
    assert "no data directory" in format_calibration(calibrate(None))


def test_calibration_line_names_its_units():
    cal = {"python": {"ops_per_s": 12_340_000, "loop_ops": 200_000, "repeats": 5},
           "fsync": {"dir": "/data", "block_bytes": 4096, "n": 200, "p50_ms": 1.5, "p99_ms": 9.25}}
    assert format_calibration(cal) == ("calibration: CPython 12.34 M loop ops/s; write+fsync of 4 KiB in /data: "
                                       "p50 1.500 ms, p99 9.250 ms (n=200)")


METRICS = """\
# HELP simzmq_gate_failovers_total Broker switches.
# TYPE simzmq_gate_failovers_total counter
simzmq_gate_failovers_total 3.0
simzmq_gate_failovers_created 1.7e+09
# TYPE simzmq_gate_kicks_total counter
simzmq_gate_kicks_total{reason="slow"} 2.0
simzmq_gate_kicks_total{reason="abuse \\"x\\""} 5.0
# TYPE simzmq_gate_connections gauge
simzmq_gate_connections 40.0
"""


def test_event_totals_sums_labels_and_ignores_other_metrics():
    assert event_totals(METRICS) == {"simzmq_gate_failovers_total": 3.0, "simzmq_gate_kicks_total": 7.0}


def test_event_totals_refuses_text_that_is_not_metrics():
    with pytest.raises(ValueError):
        event_totals("this is not { the exposition format\n")
