"""The parent: start the generator processes, drive the phases, measure, and
merge what they measured into one report."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import secrets
import signal
import time
from dataclasses import asdict

from simzmq.bench import groups
from simzmq.bench.check import check_delivery, merge_errors, merge_latency, percentiles
from simzmq.bench.gatemetrics import events_delta, gate_events
from simzmq.bench.load import _child_entry
from simzmq.bench.plan import (F_ACKED, F_DELIVERED, F_LOGINS, F_SETUP, F_SYNCED, N_FIELDS, BenchError, Options,
                               make_plans, validate)
from simzmq.bench.procstats import (MACHINE, gate_http_ports, machine_report, read_pid_files, sample_all,
                                    server_report)
from simzmq.bench.progress import Progress
from simzmq.cli import raise_fd_limit

PROGRESS_INTERVAL_S = 0.25


class Coordinator:
    def __init__(self, opts: Options, progress: Progress):
        self.opts = opts
        self.progress = progress
        self.plans = make_plans(opts)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.mp = multiprocessing.get_context(method)
        self.counters = self.mp.RawArray("q", N_FIELDS * len(self.plans))
        self.children = []
        self.pipes = []
        self.results: dict[int, dict] = {}

    def start(self) -> None:
        for plan in self.plans:
            parent_end, child_end = self.mp.Pipe()
            p = self.mp.Process(target=_child_entry, args=(self.opts, plan, child_end, self.counters),
                                name=f"simzmq-bench-{plan.index}", daemon=True)
            p.start()
            child_end.close()
            self.children.append(p)
            self.pipes.append(parent_end)

    def total(self, fields: tuple[int, ...]) -> int:
        c = self.counters
        return sum(c[i * N_FIELDS + f] for i in range(len(self.plans)) for f in fields)

    def wait_phase(self, name: str, label: str, counter: int | tuple[int, ...], total: int) -> dict[int, dict]:
        """Wait until every child reports `name` done; returns their infos."""
        infos: dict[int, dict] = {}
        counter = counter if isinstance(counter, tuple) else (counter,)
        with self.progress.phase(label, total, self.total(counter)) as advance:
            while len(infos) < len(self.plans):
                ready = multiprocessing.connection.wait(self.pipes, timeout=PROGRESS_INTERVAL_S)
                for pipe in ready:
                    try:
                        msg = pipe.recv()
                    except EOFError:
                        continue
                    self._handle(msg, name, infos)
                for p in self.children:
                    if not p.is_alive() and p.exitcode not in (0, None) and len(infos) < len(self.plans):
                        self._drain_errors()
                        raise BenchError(f"bench process {p.name} exited with {p.exitcode}")
                advance(self.total(counter))
            advance(self.total(counter))
        return infos

    def _handle(self, msg, name, infos) -> None:
        kind = msg[0]
        if kind == "error":
            raise BenchError(f"bench process {msg[1]} failed:\n{msg[2]}")
        if kind == "result":
            self.results[msg[1]] = msg[2]
        elif kind == "ready":
            if msg[2] != name:
                raise BenchError(f"bench process {msg[1]} reached {msg[2]!r}, expected {name!r}")
            infos[msg[1]] = msg[3]

    def _drain_errors(self) -> None:
        for pipe in self.pipes:
            try:
                while pipe.poll():
                    msg = pipe.recv()
                    if msg[0] == "error":
                        raise BenchError(f"bench process {msg[1]} failed:\n{msg[2]}")
            except (EOFError, OSError):
                continue

    def go(self, name: str, lead_s: float = 0.05) -> float:
        t0 = time.monotonic() + lead_s
        for pipe in self.pipes:
            pipe.send(("go", name, t0))
        return t0

    def finish(self) -> None:
        """The children's last go: they exit once their results are read."""
        self._end(("go", "exit", 0.0), grace_s=10, kill_wait_s=5)

    def abort(self) -> None:
        self._end(("abort",), grace_s=3, kill_wait_s=3)

    def _end(self, last_word: tuple, grace_s: float, kill_wait_s: float) -> None:
        """Tell every child ``last_word``; terminate those still alive after ``grace_s``."""
        for pipe in self.pipes:
            try:
                pipe.send(last_word)
            except OSError:
                pass
        for p in self.children:
            p.join(grace_s)
            if p.is_alive():
                p.terminate()
                p.join(kill_wait_s)


def run(opts: Options, progress: bool = True) -> dict:
    """Run one scenario against a running region; returns the report."""
    if not opts.prefix:
        opts.prefix = "b" + secrets.token_hex(4)
    validate(opts)
    raise_fd_limit()
    pids = read_pid_files(opts.data_dir)
    coord = Coordinator(opts, Progress(progress))
    t_start = time.monotonic()
    coord.start()
    # A terminated bench stops its processes too (they would hold connections).
    old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        report = _drive(opts, coord, pids)
    except BaseException:
        coord.abort()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    coord.finish()
    report["elapsed_s"] = round(time.monotonic() - t_start, 3)
    return report


def _terminated(signum, frame):
    raise BenchError("terminated")


def _params(opts: Options) -> dict:
    d = asdict(opts)
    d.pop("gate_pk")
    d["users"] = opts.resolved_users()
    d["gate_key"] = opts.gate_pk.hex()
    d["mode"] = "rate" if opts.rate is not None else "window"
    return d


def _drive(opts: Options, coord: Coordinator, pids: dict) -> dict:
    sc = opts.scenario
    n_users = opts.resolved_users()
    plans = coord.plans
    report: dict = {"scenario": sc, "params": _params(opts), "server_pids": pids}
    # Setup steps: a registration and (but for connect) a password login per
    # user, for backlog the Sends that fill the inbox, for groups each
    # member's message to the owner and then the group's creation.
    if sc == "groups":
        coord.wait_phase("contacts", "setup", F_SETUP, 3 * n_users - 1)
        coord.go("create", 0.0)
        setup = coord.wait_phase("setup", "create", F_SETUP, 1)
    else:
        setup_total = n_users if sc == "connect" else 2 * n_users
        setup = coord.wait_phase("setup", "setup", (F_SETUP, F_ACKED) if sc == "backlog" else F_SETUP,
                                 setup_total + (opts.backlog if sc == "backlog" else 0))
    report["setup_s"] = round(max(i["setup_s"] for i in setup.values()), 3)
    http_ports = gate_http_ports(opts.data_dir)
    events_before = gate_events(opts.host, http_ports)
    before = sample_all(pids)
    t0 = coord.go("run" if sc != "connect" else "password")

    if sc in ("pairs", "fanin", "groups"):
        total = groups.expected_copies(opts) if sc == "groups" else sum(f.count for p in plans for f in p.flows)
        infos = coord.wait_phase("run", "run", F_DELIVERED, total)
        after = sample_all(pids)
        events_after = gate_events(opts.host, http_ports)
        load_before, load_after = before, after
        t_end = max(i["t_last_push"] for i in infos.values())
        window = max(1e-9, t_end - t0)
        wall = time.monotonic() - t0
        coord.go("check", 0.0)
        # Entries read by the Sync check (for groups: every member's copies).
        synced = opts.senders * opts.messages * n_users if sc == "groups" else total
        coord.wait_phase("exit", "check", F_SYNCED, synced)
        results = [coord.results[i] for i in sorted(coord.results)]
        push = merge_latency(results, "push_latency")
        ack = merge_latency(results, "ack_latency")
        lag = merge_latency(results, "pace_lag")
        sent = sum(s["count"] for r in results for s in r["senders"])
        acked = sum(s["acked"] for r in results for s in r["senders"])
        delivered = sum(rec["pushes"] for r in results for rec in r["receivers"])
        report.update({
            "window_s": round(window, 3),
            "counts": {"messages": sent, "acked": acked, "delivered_pushes": delivered,
                       "duplicate_pushes": sum(rec["dup_pushes"] for r in results for rec in r["receivers"]),
                       "pushes_missing": sum(rec["expected"] for r in results for rec in r["receivers"]) - delivered,
                       "retries": sum(s["retries"] for r in results for s in r["senders"])},
            "rates": {"delivered_per_s": round(delivered / window, 1), "acked_per_s": round(acked / window, 1),
                      "offered_per_s": opts.rate},
            "latency_ms": {"send_to_push": percentiles(push), "send_to_ack": percentiles(ack)},
            "check": check_delivery(results),
            "server": server_report(pids, before, after, wall, per=delivered),
            "generator": {"cpu_s": round(sum(r["cpu_s"] for r in results), 3), "procs": opts.procs,
                          "cpu_pct": round(100 * sum(r["cpu_s"] for r in results) / wall, 1)},
        })
        if lag:
            report["generator"]["pace_lag_ms"] = percentiles(lag)
        if sc == "groups":
            groups.add_to_report(report, opts, results)
    elif sc == "backlog":
        coord.wait_phase("run", "sync", F_SYNCED, opts.backlog)
        after = sample_all(pids)
        events_after = gate_events(opts.host, http_ports)
        load_before, load_after = before, after
        wall = time.monotonic() - t0
        coord.go("exit", 0.0)
        coord.wait_phase("exit", "finish", F_SYNCED, opts.backlog)
        results = [coord.results[i] for i in sorted(coord.results)]
        timing = results[0]["timing"]
        fill_s = max(r["fill_s"] for r in results)
        acked = sum(s["acked"] for r in results for s in r["senders"])
        check = check_delivery(results)
        report.update({
            "window_s": round(timing["total_s"], 3),
            "counts": {"backlog": opts.backlog, "acked": acked, "synced": results[0]["receivers"][0]["check"]["entries"],
                       "sync_requests": results[0]["receivers"][0]["check"]["sync_requests"],
                       "retries": sum(s["retries"] for r in results for s in r["senders"])},
            "timing_ms": {k: round(v * 1000, 3) for k, v in timing.items() if k.endswith("_s")},
            "rates": {"synced_per_s": round(opts.backlog / timing["sync_s"], 1) if timing["sync_s"] else None,
                      "fill_acked_per_s (setup)": round(acked / fill_s, 1) if fill_s else None},
            "check": check,
            "server": server_report(pids, before, after, wall, per=opts.backlog),
            "generator": {"cpu_s": round(sum(r["cpu_s"] for r in results), 3), "procs": opts.procs},
        })
    else:  # connect
        coord.wait_phase("password", "password", F_LOGINS, n_users)
        mid = sample_all(pids)
        wall_pw = time.monotonic() - t0
        t1 = coord.go("token")
        coord.wait_phase("token", "token", F_LOGINS, n_users + opts.connections)
        after = sample_all(pids)
        events_after = gate_events(opts.host, http_ports)
        load_before, load_after = mid, after
        wall_tk = time.monotonic() - t1
        time.sleep(opts.settle_s)
        idle = sample_all(pids)
        coord.go("idle", 0.0)
        coord.wait_phase("exit", "close", F_LOGINS, n_users + opts.connections)
        results = [coord.results[i] for i in sorted(coord.results)]
        pw = [t for r in results for t in r["password"]]
        tk = [t for r in results for t in r["token"]]
        pw_window = max((t[2] for t in pw), default=t0) - t0
        tk_window = max((t[2] for t in tk), default=t1) - t1
        opened = len(tk)
        rss_mid = sum(v[1] for k, v in mid.items() if v and k != MACHINE)
        rss_idle = sum(v[1] for k, v in idle.items() if v and mid.get(k) and k != MACHINE)
        per_proc = []
        for name in sorted(pids):
            if mid.get(name) and idle.get(name):
                per_proc.append({"name": name, "rss_before_kb": mid[name][1] // 1024,
                                 "rss_idle_kb": idle[name][1] // 1024,
                                 "bytes_per_conn": round((idle[name][1] - mid[name][1]) / opened) if opened else None})
        report.update({
            "window_s": round(tk_window, 3),
            "counts": {"users": n_users, "connections": opts.connections, "password_logins": len(pw),
                       "token_logins": opened,
                       "alive_after_idle": sum(r["alive_after_idle"] for r in results)},
            "rates": {"password_logins_per_s": round(len(pw) / pw_window, 1) if pw_window > 0 else None,
                      "token_logins_per_s": round(opened / tk_window, 1) if tk_window > 0 else None},
            "latency_ms": {"password_login": percentiles([t[1] for t in pw]),
                           "token_handshake": percentiles([t[0] for t in tk]),
                           "token_login": percentiles([t[1] for t in tk])},
            "memory": {"settle_s": opts.settle_s, "rss_before_kb": rss_mid // 1024, "rss_idle_kb": rss_idle // 1024,
                       "bytes_per_conn": round((rss_idle - rss_mid) / opened) if opened else None,
                       "processes": per_proc},
            "server": server_report(pids, mid, after, wall_tk, per=opened),
            "server_password_phase": server_report(pids, before, mid, wall_pw, per=len(pw)),
            "generator": {"cpu_s": round(sum(r["cpu_s"] for r in results), 3), "procs": opts.procs},
        })
    report["errors"] = merge_errors(results)
    report["gate_events"] = events_delta(events_before, events_after)
    report["gate_metrics_from"] = sorted(http_ports) if events_before else []
    report["machine_load"] = machine_report(load_before, load_after, report["server"]["total"]["cpu_s"],
                                            report["generator"]["cpu_s"])
    report["ok"] = _ok(report)
    return report


def _ok(report: dict) -> bool:
    if "check" in report and not report["check"]["ok"]:
        return False
    if report["scenario"] == "connect":
        c = report["counts"]
        return c["token_logins"] == c["connections"] and c["password_logins"] == c["users"]
    if report["scenario"] in ("pairs", "fanin", "backlog", "groups"):
        return report["counts"]["acked"] == report["counts"].get("messages", report["counts"].get("backlog"))
    return True
