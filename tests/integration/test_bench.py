"""`simzmq bench` against a real region: every scenario, tiny, with --json.

The numbers are not checked (this machine's speed is nobody's contract); what
is checked is that the counts add up and that the Sync check, which the tests
at the bottom show can fail, finds nothing lost, doubled or reordered.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from array import array

import pytest

from simzmq.bench import check_delivery, order_check, percentiles
from tests.region import ROOT, region_fixture


region = region_fixture("bench")


def bench(region, *args, expect_rc=0) -> dict:
    """Run the command as a user would; the gate port comes from the region's
    pid files, not from a flag."""
    proc = subprocess.run([sys.executable, "-m", "simzmq", "bench", *args, "--data", str(region.data_dir),
                           "--json", "--no-progress"],
                          cwd=str(ROOT), env=region.env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == expect_rc, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout)


def assert_clean(report, messages):
    check = report["check"]
    assert check["ok"] is True
    assert (check["lost"], check["doubled"], check["reordered"], check["inbox_gaps"]) == (0, 0, 0, 0)
    assert check["checked"] == messages
    assert report["errors"] == {}
    assert report["ok"] is True


def assert_server_measured(report):
    procs = {p["name"]: p for p in report["server"]["processes"]}
    assert {"broker-primary", "broker-backup", "im-1", "gate-1"} <= set(procs)
    for p in procs.values():
        assert not p.get("gone")
        assert p["cpu_s"] >= 0 and p["rss_after_kb"] > 0
    assert report["server"]["total"]["rss_after_kb"] == sum(p["rss_after_kb"] for p in procs.values())


def assert_calibrated(report, region):
    cal = report["calibration"]
    assert cal["python"]["ops_per_s"] > 0
    fsync = cal["fsync"]
    assert fsync["dir"] == str(region.data_dir) and fsync["n"] == 200 and fsync["block_bytes"] == 4096
    assert 0 <= fsync["p50_ms"] <= fsync["p99_ms"]


@pytest.mark.timeout(60)
def test_pairs_window_two_procs(region):
    r = bench(region, "pairs", "--users", "4", "--messages", "20", "--window", "4", "--procs", "2")
    assert r["params"]["mode"] == "window"
    c = r["counts"]
    assert c["messages"] == c["acked"] == 40
    assert c["delivered_pushes"] + c["pushes_missing"] == 40
    assert c["duplicate_pushes"] == 0
    assert r["latency_ms"]["send_to_push"]["n"] == c["delivered_pushes"]
    assert r["latency_ms"]["send_to_ack"]["n"] == 40
    lat = r["latency_ms"]["send_to_push"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["rates"]["delivered_per_s"] > 0
    assert_clean(r, 40)
    assert_server_measured(r)
    assert r["gate_metrics_from"] == ["gate-1"] and isinstance(r["gate_events"], dict)
    assert r["generator"]["procs"] == 2
    assert r["machine"]["cpus"] >= 1
    assert_calibrated(r, region)


@pytest.mark.timeout(60)
def test_pairs_fixed_rate_msgpack(region):
    r = bench(region, "pairs", "--users", "2", "--messages", "10", "--rate", "100", "--codec", "msgpack")
    assert r["params"]["mode"] == "rate" and r["rates"]["offered_per_s"] == 100
    assert r["counts"]["acked"] == 10
    # Ten Sends at 100/s take about 0.1 s: the pacer spread them out.
    assert r["window_s"] >= 0.09
    assert r["generator"]["pace_lag_ms"]["n"] == 10
    assert_clean(r, 10)


@pytest.mark.timeout(60)
def test_fanin(region):
    r = bench(region, "fanin", "--users", "5", "--messages", "10", "--procs", "2")
    assert r["counts"]["messages"] == r["counts"]["acked"] == 40
    assert_clean(r, 40)


@pytest.mark.timeout(60)
def test_backlog(region):
    r = bench(region, "backlog", "--users", "3", "--backlog", "120")
    c = r["counts"]
    assert c["backlog"] == c["acked"] == c["synced"] == 120
    t = r["timing_ms"]
    assert t["total_s"] >= t["sync_s"] > 0
    assert_clean(r, 120)
    assert_server_measured(r)


# The groups scenario spreads the members over every gate of the region.
groups_region = region_fixture("benchgroups", name="groups_region", gates=2, workers=2)


@pytest.mark.timeout(120)
def test_groups_members_on_two_gates(groups_region):
    r = bench(groups_region, "groups", "--users", "6", "--senders", "2", "--messages", "8", "--procs", "2")
    assert r["group"] == {"id": r["group"]["id"], "members": 6, "senders": 2, "gates": 2, "expected_copies": 80}
    c = r["counts"]
    assert c["messages"] == c["acked"] == 16
    # Every message to the 5 members besides its sender.
    assert c["delivered_pushes"] + c["pushes_missing"] == 80 and c["duplicate_pushes"] == 0
    assert r["latency_ms"]["send_to_push"]["n"] == c["delivered_pushes"]
    last = r["latency_ms"]["send_to_last_member"]
    assert last["n"] + c["not_pushed_to_every_member"] == 16
    assert r["check"]["same_order"] == {"members": 6, "messages": 16, "differing": 0, "out_of_msg_id_order": 0}
    assert_clean(r, 16 * 6)  # each member's copy of each message, the senders' own included
    assert_server_measured(r)
    assert {p["name"] for p in r["server"]["processes"]} >= {"gate-2", "im-2"}
    assert_calibrated(r, groups_region)


@pytest.mark.timeout(120)
def test_groups_text_report_at_a_fixed_rate(groups_region):
    proc = subprocess.run([sys.executable, "-m", "simzmq", "bench", "groups", "--users", "3", "--messages", "5",
                           "--rate", "50", "--data", str(groups_region.data_dir), "--no-progress"],
                          cwd=str(ROOT), env=groups_region.env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("simzmq bench groups: users 3, procs 1, codec bin, a group of 3 members on 2 gate(s), "
                               "1 sender(s), messages 5 per sender, offered rate 50/s")
    assert lines[1].startswith("  calibration: CPython ")
    for row in ("delivered member copies/s", "send→push to the last member ms", "Sync check", "CPU µs/copy"):
        assert row in proc.stdout, row
    assert re.search(r"same order for every member +OK: 3 members, 5 messages, differing 0", proc.stdout)
    assert lines[-1] == "  result: OK"


@pytest.mark.timeout(60)
def test_connect(region):
    r = bench(region, "connect", "--users", "3", "--connections", "12", "--procs", "2", "--settle", "0.2")
    c = r["counts"]
    assert c["password_logins"] == 3
    assert c["token_logins"] == c["connections"] == 12
    assert c["alive_after_idle"] == 12
    assert r["latency_ms"]["token_login"]["n"] == 12
    assert r["latency_ms"]["password_login"]["n"] == 3
    mem = r["memory"]
    assert mem["bytes_per_conn"] is not None
    assert {p["name"] for p in mem["processes"]} >= {"gate-1", "im-1"}
    assert r["errors"] == {} and r["ok"] is True
    assert_server_measured(r)


@pytest.mark.timeout(60)
def test_text_report_has_the_calibration_line(region):
    proc = subprocess.run([sys.executable, "-m", "simzmq", "bench", "pairs", "--users", "2", "--messages", "5",
                           "--data", str(region.data_dir), "--no-progress"],
                          cwd=str(ROOT), env=region.env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("simzmq bench pairs:")
    assert lines[1].startswith("  calibration: CPython ") and "loop ops/s" in lines[1]
    assert f"write+fsync of 4 KiB in {region.data_dir}: p50 " in lines[1]
    assert lines[-1] == "  result: OK"


@pytest.mark.timeout(30)
def test_bad_arguments_are_refused(region):
    proc = subprocess.run([sys.executable, "-m", "simzmq", "bench", "pairs", "--users", "3",
                           "--data", str(region.data_dir), "--no-progress"],
                          cwd=str(ROOT), env=region.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "even number of users" in proc.stderr


# --- the checker itself: it must be able to say no -----------------------------------


@pytest.mark.timeout(10)
def test_order_check_finds_loss_doubles_and_reordering():
    assert order_check([0, 1, 2, 3], {0, 1, 2, 3}) == {"lost": 0, "doubled": 0, "reordered": 0,
                                                         "late_retries": 0, "unconfirmed": 0, "found": 4}
    assert order_check([0, 2, 3], {0, 1, 2, 3})["lost"] == 1
    assert order_check([0, 1, 1, 2, 3], {0, 1, 2, 3})["doubled"] == 1
    assert order_check([0, 2, 1, 3], {0, 1, 2, 3})["reordered"] == 1
    # Sent again after a refusal, it may land after later Sends: explained, not a fault.
    explained = order_check([0, 2, 1, 3], {0, 1, 2, 3}, retried={1})
    assert (explained["reordered"], explained["late_retries"]) == (0, 1)
    # A Send that failed at the sender but was stored anyway is reported, not lost.
    assert order_check([0, 1, 2], {0, 1})["unconfirmed"] == 1


def _result(sender, count, failed, receiver, found):
    return {"senders": [{"sender": sender, "count": count, "failed": failed}],
            "receivers": [{"user": receiver, "check": {"inbox_gaps": 0,
                                                       "found": {sender: array("I", found).tobytes()}}}]}


@pytest.mark.timeout(10)
def test_check_delivery_merges_across_processes():
    assert check_delivery([_result("a", 3, [], "b", [0, 1, 2])])["ok"] is True
    bad = check_delivery([_result("a", 3, [], "b", [0, 2, 2])])
    assert bad["ok"] is False and bad["lost"] == 1 and bad["doubled"] == 1
    assert check_delivery([_result("a", 3, [], "b", [1, 0, 2])])["ok"] is False
    # A message whose Send failed is not expected.
    assert check_delivery([_result("a", 3, [1], "b", [0, 2])])["ok"] is True


@pytest.mark.timeout(10)
def test_percentiles_nearest_rank():
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert (p["n"], p["p50"], p["p95"], p["p99"], p["max"]) == (100, 50.0, 95.0, 99.0, 100.0)
    assert percentiles([]) == {"n": 0}


# --- the A/B runner: two regions, started from checkouts, interleaved ----------------


def ab(*args, tmp_path, timeout=240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMZMQ_")}
    return subprocess.run([sys.executable, "-m", "simzmq.bench.ab", *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_ab_runs_a_revision_against_this_checkout(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no revision to export")
    work = tmp_path / "work"
    proc = ab("--a", "HEAD", "--b", str(ROOT), "--runs", "1", "--work", str(work), "--no-progress", "--json",
              "connect", "--users", "2", "--connections", "4", "--settle", "0.1", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    r = json.loads(proc.stdout)
    assert r["order"] == ["A", "B"] and [run["side"] for run in r["per_run"]] == ["A", "B"]
    assert r["sides"]["A"].startswith("HEAD = ") and str(ROOT) in r["sides"]["B"]
    # Side A ran from the exported revision, B from this checkout.
    assert (work / f"src-{r['sides']['A'].split()[2]}" / "simzmq" / "cli.py").is_file()
    assert r["calibration"]["fsync"]["dir"] == str(work) and r["calibration"]["python"]["ops_per_s"] > 0
    for run in r["per_run"]:
        assert run["ok"] is True and run["report"]["counts"]["token_logins"] == 4
        assert run["figures"]["region CPU µs/token login"] is not None
    figures = {row["figure"]: row for row in r["summary"]}
    assert {"gate CPU µs/token login", "broker CPU µs/token login", "worker CPU µs/token login",
            "token logins/s", "token login p50 ms"} <= set(figures)
    row = figures["token logins/s"]
    assert len(row["a"]) == len(row["b"]) == 1 and row["ratio_b_a"] is not None


@pytest.mark.timeout(300)
def test_ab_text_output_same_checkout_pairs_at_a_fixed_rate(tmp_path):
    proc = ab("--a", str(ROOT), "--b", str(ROOT), "--runs", "1", "--no-progress",
              "pairs", "--users", "2", "--messages", "10", "--rate", "100", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = proc.stdout
    assert "interleaved (A B)" in out and "  calibration: CPython " in out
    for figure in ("delivered msgs/s", "send→push p50 ms (at 100/s)", "send→push p99 ms (at 100/s)",
                   "gate CPU µs/msg", "broker CPU µs/msg", "worker CPU µs/msg"):
        assert f"  {figure} " in out
    assert "run 1 (A): OK" in out and "run 2 (B): OK" in out


@pytest.mark.timeout(60)
def test_ab_refuses_bad_sides_and_options(tmp_path):
    proc = ab("--a", str(tmp_path / "nothing"), "--b", str(ROOT), "pairs", tmp_path=tmp_path)
    assert proc.returncode != 0 and "neither a checkout" in proc.stderr
    proc = ab("--a", str(ROOT), "--b", str(ROOT), "pairs", "--port", "1", tmp_path=tmp_path)
    assert proc.returncode != 0 and "--port: the A/B runner sets this itself" in proc.stderr


@pytest.mark.timeout(120)
def test_logins(region):
    r = bench(region, "logins", "--users", "6")
    assert r["scenario"] == "logins" and r["ok"] is True
    assert r["setup"]["done"] == 6 and r["logins"]["done"] == 6 and r["logins"]["failed"] == []
    assert r["params"]["password_threads"] >= 1 and r["check_ms"] > 0
    assert r["capacity_per_s"] > 0 and r["logins_per_s"] > 0
    assert r["worker_check_ms"] is None or r["worker_check_ms"] > 0
