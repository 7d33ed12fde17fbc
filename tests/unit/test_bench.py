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


# --- the groups scenario's pure parts ---------------------------------------------------

from array import array  # noqa: E402

from simzmq.bench import groups  # noqa: E402
from simzmq.bench.plan import BenchError, Options, make_plans, validate  # noqa: E402


def group_opts(**kw) -> Options:
    base = dict(scenario="groups", host="127.0.0.1", port=1, gate_pk=b"k" * 32, prefix="bx", users=5, senders=2,
                messages=3, procs=2, gate_ports=(7001, 7002))
    return Options(**{**base, **kw})


def test_group_plan_spreads_members_over_processes_and_gates():
    opts = group_opts()
    plans = make_plans(opts)
    assert [p.users for p in plans] == [["bx-0", "bx-2", "bx-4"], ["bx-1", "bx-3"]]
    assert {u: port for p in plans for u, port in p.ports.items()} == {
        "bx-0": 7001, "bx-1": 7002, "bx-2": 7001, "bx-3": 7002, "bx-4": 7001}
    # The first `senders` members send to the group; every member checks them all.
    assert [(f.sender, f.to, f.count) for p in plans for f in p.flows] == [("bx-0", "#bx-g", 3), ("bx-1", "#bx-g", 3)]
    assert all(exp == {"bx-0": 3, "bx-1": 3} for p in plans for exp in p.receivers.values())
    assert groups.expected_copies(opts) == 2 * 3 * 4
    # Without the gates' ports, everyone on the bench's own.
    assert all(not p.ports for p in make_plans(group_opts(gate_ports=())))


@pytest.mark.parametrize("kw, says", [({"users": 1, "senders": 1}, "at least 2 members"),
                                      ({"senders": 0}, "--senders"), ({"senders": 6}, "--senders")])
def test_group_options_refused(kw, says):
    with pytest.raises(BenchError, match=says):
        validate(group_opts(**kw))


def arrivals_result(counts, pushes):
    """One process's Arrivals after `pushes` of (sender, k, t_sent, now)."""
    a = groups.Arrivals(counts)
    for sender, k, t_sent, now in pushes:
        a.note(sender, k, t_sent, now)
    return {"group": {"arrivals": a.result()}}


def test_latency_to_the_last_member_merges_processes():
    counts = {"s": 2}
    # Message 0 reaches two members in process one (at 1.2 and 1.5) and one in
    # process two (at 1.4); message 1 only two members of three.
    one = arrivals_result(counts, [("s", 0, 1.0, 1.2), ("s", 0, 1.0, 1.5), ("s", 1, 2.0, 2.1)])
    two = arrivals_result(counts, [("s", 0, 1.0, 1.4), ("s", 1, 2.0, 2.3), ("s", 9, 2.0, 2.3), ("x", 0, 0.0, 1.0)])
    latencies, short = groups.last_member_latency([one, two], copies_each=3)
    assert [round(x, 6) for x in latencies] == [0.5] and short == 1
    latencies, short = groups.last_member_latency([one, two], copies_each=2)
    assert sorted(round(x, 6) for x in latencies) == [0.3, 0.5] and short == 0


def orders_result(rows):
    lists, members = {}, []
    for user, ids in rows:
        arr = array("Q", ids)
        digest = groups.order_digest(arr)
        lists.setdefault(digest, arr.tobytes())
        members.append((user, digest, all(a < b for a, b in zip(ids, ids[1:]))))
    return {"group": {"orders": {"lists": lists, "members": members}}}


def test_order_agreement_finds_a_member_out_of_step():
    same = [orders_result([("a", [3, 5, 8]), ("b", [3, 5, 8])]), orders_result([("c", [3, 5, 8])])]
    assert groups.order_agreement(same) == {"members": 3, "messages": 3, "differing": 0, "out_of_msg_id_order": 0}
    swapped = groups.order_agreement([orders_result([("a", [3, 5, 8]), ("b", [3, 8, 5])])])
    assert (swapped["differing"], swapped["out_of_msg_id_order"]) == (1, 1)
    missing = groups.order_agreement([orders_result([("a", [3, 5, 8])]), orders_result([("b", [3, 8])])])
    assert (missing["differing"], missing["out_of_msg_id_order"]) == (1, 0)


def test_add_to_report_fails_the_check_on_disagreement():
    opts = group_opts(users=3, senders=1, messages=1, gate_ports=())
    one = arrivals_result({"bx-0": 1}, [("bx-0", 0, 1.0, 1.1), ("bx-0", 0, 1.0, 1.2)])
    one["group"].update(orders_result([("bx-0", [7]), ("bx-1", [7]), ("bx-2", [])])["group"])
    report = {"latency_ms": {}, "counts": {}, "check": {"ok": True}}
    groups.add_to_report(report, opts, [one])
    assert report["group"] == {"id": "#bx-g", "members": 3, "senders": 1, "gates": 1, "expected_copies": 2}
    assert report["latency_ms"]["send_to_last_member"]["n"] == 1
    assert report["counts"]["not_pushed_to_every_member"] == 0
    assert report["check"]["same_order"]["differing"] == 1 and report["check"]["ok"] is False


def test_figures_of_a_group_run_per_member_copy():
    report = pairs_report(1000, REGION_CPU)
    report["scenario"] = "groups"
    report["latency_ms"]["send_to_last_member"] = {"n": 10, "p50": 4.0, "p99": 8.0}
    figs = figures(report)
    assert figs["delivered member copies/s"] == 500.0 and figs["region CPU µs/member copy"] == 1900.0
    assert figs["send→last member p50 ms (windowed)"] == 4.0 and figs["send→last member p99 ms (windowed)"] == 8.0


# presencecost: the worker's CPU per presence report and per token Login

from simzmq.bench.presencecost import measure  # noqa: E402


@pytest.mark.parametrize("online", [0, 3])
def test_presencecost_measures_each_kind_of_request(tmp_path, online):
    # measure() checks each request did what its kind stands for (a report
    # that changes nothing, one that changes a state, a successful Login).
    figures = measure(f"sqlite:///{tmp_path}/im.db", online, reps=4)
    assert list(figures) == ["report, no change", "report, state change", "token login"]
    assert all(isinstance(us, float) for us in figures.values())
