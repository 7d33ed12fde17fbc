"""The pure parts of `simzmq bench`: calibration figures (their shape and
units, never their speed) and reading the gates' counters."""

from __future__ import annotations

import itertools

import pytest

from simzmq.bench.ab import figures, summarize
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


# --- the A/B runner's arithmetic -------------------------------------------------------

def pairs_report(delivered: int, cpu: dict[str, float], rate=None, p50=1.0, p99=2.0) -> dict:
    return {"scenario": "pairs", "ok": True, "params": {"rate": rate},
            "counts": {"delivered_pushes": delivered}, "rates": {"delivered_per_s": delivered / 2},
            "latency_ms": {"send_to_push": {"n": delivered, "p50": p50, "p99": p99}},
            "server": {"processes": [{"name": name, "cpu_s": v} for name, v in cpu.items()]}}


REGION_CPU = {"broker-primary": 0.3, "broker-backup": 0.1, "gate-1": 0.5, "im-1": 0.8, "im-2": 0.2}


def test_figures_per_role_cpu_per_delivered_message():
    figs = figures(pairs_report(1000, REGION_CPU, rate=500))
    assert figs == {"delivered msgs/s": 500.0,
                    "send→push p50 ms (at 500/s)": 1.0, "send→push p99 ms (at 500/s)": 2.0,
                    "gate CPU µs/msg": 500.0, "broker CPU µs/msg": 400.0, "worker CPU µs/msg": 1000.0,
                    "region CPU µs/msg": 1900.0}


def test_figures_per_token_login_and_without_pid_files():
    connect = {"scenario": "connect", "counts": {"token_logins": 200}, "rates": {"token_logins_per_s": 100.0},
               "latency_ms": {"token_login": {"n": 200, "p50": 3.0, "p99": 9.0}},
               "server": {"processes": [{"name": "gate-1", "cpu_s": 0.1}, {"name": "im-1", "pid": 9, "gone": True}]}}
    figs = figures(connect)
    assert figs["gate CPU µs/token login"] == 500.0 and figs["worker CPU µs/token login"] == 0.0
    assert figs["token logins/s"] == 100.0 and figs["token login p99 ms"] == 9.0
    connect["server"]["processes"] = []
    assert figures(connect)["region CPU µs/token login"] is None


def test_summary_medians_and_ratio_of_interleaved_runs():
    runs = [("A", {"x": 10.0, "y": None}), ("B", {"x": 30.0, "y": 1.0}),
            ("A", {"x": 12.0, "y": None}), ("B", {"x": 20.0, "y": 3.0}),
            ("A", {"x": 50.0, "y": None}), ("B", {"x": 24.0, "y": 2.0})]
    x, y = summarize(runs)
    assert x == {"figure": "x", "a": [10.0, 12.0, 50.0], "b": [30.0, 20.0, 24.0], "median_a": 12.0, "median_b": 24.0,
                 "ratio_b_a": 2.0}
    assert y["median_a"] is None and y["median_b"] == 2.0 and y["ratio_b_a"] is None
