"""The report as text."""

from __future__ import annotations

from simzmq.bench import groups
from simzmq.bench.calibrate import format_calibration


def _fmt_lat(d: dict) -> str:
    if not d.get("n"):
        return "-"
    return f"p50 {d['p50']:.3f}  p95 {d['p95']:.3f}  p99 {d['p99']:.3f}  max {d['max']:.3f}  (n={d['n']})"


def format_report(r: dict) -> str:
    p = r["params"]
    lines = []
    head = f"simzmq bench {r['scenario']}: users {p['users']}, procs {p['procs']}, codec {p['codec']}"
    if r["scenario"] == "groups":
        head += groups.report_head(r)
    if r["scenario"] in ("pairs", "fanin", "groups"):
        head += f", messages {p['messages']} per sender, " + (
            f"offered rate {p['rate']:g}/s" if p["rate"] else f"window {p['window']}")
    elif r["scenario"] == "backlog":
        head += f", backlog {p['backlog']}"
    else:
        head += f", connections {p['connections']}, concurrency {p['concurrency']} per process"
    lines.append(head)
    if "calibration" in r:
        lines.append("  " + format_calibration(r["calibration"]))
    lines.append(f"  setup (registration, first logins{', inbox fill' if r['scenario'] == 'backlog' else ''}; "
                 f"not measured): {r['setup_s']:.2f} s")
    rows: list[tuple[str, str]] = []
    c = r["counts"]
    if r["scenario"] in ("pairs", "fanin", "groups"):
        copies = "member copies" if r["scenario"] == "groups" else "msgs"
        rows += [("measured window", f"{r['window_s']:.3f} s (first Send to last push)"),
                 ("messages sent / acked", f"{c['messages']} / {c['acked']}  (retries {c['retries']})"),
                 ("delivered (NewMsg pushes)", (f"{c['delivered_pushes']}  (duplicates {c['duplicate_pushes']}, "
                                               f"not pushed {c['pushes_missing']})")),
                 (f"delivered {copies}/s", f"{r['rates']['delivered_per_s']:.0f}"),
                 ("send→push latency ms", _fmt_lat(r["latency_ms"]["send_to_push"])),
                 ("send→SendOk latency ms", _fmt_lat(r["latency_ms"]["send_to_ack"]))]
        if r["scenario"] == "groups":
            rows += groups.report_rows(r, _fmt_lat)
        if "pace_lag_ms" in r["generator"]:
            rows.append(("generator pacing lag ms", _fmt_lat(r["generator"]["pace_lag_ms"])))
    elif r["scenario"] == "backlog":
        t = r["timing_ms"]
        rows += [("backlog acked / synced", f"{c['acked']} / {c['synced']} in {c['sync_requests']} Syncs"),
                 ("reconnect: handshake", f"{t['handshake_s']:.1f} ms"),
                 ("reconnect: token login", f"{t['login_s']:.1f} ms"),
                 ("Sync of the whole backlog", f"{t['sync_s']:.1f} ms  ({r['rates']['synced_per_s']:.0f} msgs/s)"),
                 ("total, connect to synced", f"{t['total_s']:.1f} ms"),
                 ("fill rate (setup)", f"{r['rates']['fill_acked_per_s (setup)']:.0f} acked msgs/s")]
    else:
        mem = r["memory"]
        rows += [("password logins", (f"{c['password_logins']}  {r['rates']['password_logins_per_s']}/s  "
                                     f"latency {_fmt_lat(r['latency_ms']['password_login'])}")),
                 ("token logins", (f"{c['token_logins']} of {c['connections']}  "
                                  f"{r['rates']['token_logins_per_s']}/s  in {r['window_s']:.3f} s")),
                 ("  handshake ms", _fmt_lat(r["latency_ms"]["token_handshake"])),
                 ("  login ms", _fmt_lat(r["latency_ms"]["token_login"])),
                 ("still connected after idle", f"{c['alive_after_idle']}"),
                 ("memory per idle connection", (f"{mem['bytes_per_conn']} bytes (all region processes, "
                                               f"after {mem['settle_s']:g} s idle)"))]
        for proc in mem["processes"]:
            rows.append((f"  {proc['name']}", (f"{proc['bytes_per_conn']} bytes/conn  "
                                              f"(RSS {proc['rss_before_kb']} → {proc['rss_idle_kb']} KiB)")))
    if "check" in r:
        ch = r["check"]
        rows.append(("Sync check", (f"{'OK' if ch['ok'] else 'FAILED'}: {ch['checked']} checked, lost {ch['lost']}, "
                                   f"doubled {ch['doubled']}, reordered {ch['reordered']}, late retries {ch['late_retries']}, "
                                   f"inbox gaps {ch['inbox_gaps']}, unconfirmed {ch['unconfirmed']}")))
    if r.get("gate_events"):
        rows.append(("gate events in the window", ", ".join(f"{k} {v}" for k, v in sorted(r["gate_events"].items()))))
        if "failovers" in r["gate_events"]:
            rows.append(("", ("the gate switched brokers during the run: resent requests and catch-ups are in "
                             "these numbers")))
    if r["errors"]:
        rows.append(("errors", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))))
        if "rate_limited" in r["errors"] or "abuse" in str(r["errors"]):
            rows.append(("", ("the gate's limits (gate.limits.*) refused part of this load: a run that "
                             "measures capacity raises them (docs/benchmarks.md)")))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    srv = r["server"]
    if srv["processes"]:
        unit = {"pairs": "msg", "fanin": "msg", "backlog": "msg", "connect": "login", "groups": "copy"}[r["scenario"]]
        lines.append("  region processes (measured window):")
        lines.append(f"    {'process':<16} {'pid':>7} {'CPU s':>8} {'CPU %':>7} {'CPU µs/' + unit:>13} "
                     f"{'RSS before':>11} {'RSS after':>11}")
        for proc in srv["processes"]:
            if proc.get("gone"):
                lines.append(f"    {proc['name']:<16} {proc['pid']:>7}  (not running)")
                continue
            lines.append(f"    {proc['name']:<16} {proc['pid']:>7} {proc['cpu_s']:>8.2f} {proc['cpu_pct']:>7.1f} "
                         f"{proc['cpu_us_per_item'] or 0:>13.1f} "
                         f"{proc['rss_before_kb']:>8} KiB {proc['rss_after_kb']:>7} KiB")
        t = srv["total"]
        lines.append(f"    {'total':<16} {'':>7} {t['cpu_s']:>8.2f} {t['cpu_pct'] or 0:>7.1f} "
                     f"{t['cpu_us_per_item'] or 0:>13.1f} "
                     f"{t['rss_before_kb']:>8} KiB {t['rss_after_kb']:>7} KiB")
    else:
        lines.append("  region processes: no pid files (pass --data DIR of the region to measure CPU and RSS)")
    load = r.get("machine_load")
    if load:
        lines.append(f"  machine: {load['busy_pct_of_all_cpus']:.0f}% of all CPUs busy in the window; "
                     f"other processes used {load['other_cpu_s']:.2f} CPU s ({load['other_pct_of_one_cpu']:.0f}% of a CPU)")
    g = r["generator"]
    lines.append(f"  generator: {g['procs']} process(es), {g['cpu_s']:.2f} CPU s in the measured window"
                 + (f" ({g['cpu_pct']:.0f}% of a CPU)" if "cpu_pct" in g else ""))
    lines.append(f"  result: {'OK' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)
