"""The region's processes and the machine, measured from outside."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import psutil


def read_pid_files(data_dir: str | Path | None) -> dict[str, int]:
    """``{name: pid}`` from ``DATA/run/*.pid`` (broker-primary, im-1, gate-1…)."""
    if data_dir is None:
        return {}
    pids = {}
    for path in sorted((Path(data_dir) / "run").glob("*.pid")):
        try:
            pids[path.stem] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return pids


def proc_sample(pid: int) -> tuple[float, int] | None:
    """``(cpu_seconds, rss_bytes)`` of a live process, None if it is gone."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cpu = proc.cpu_times()
            rss = proc.memory_info().rss
    except psutil.Error:
        return None
    return cpu.user + cpu.system, rss


MACHINE = ""  # the key of the whole machine's CPU sample in sample_all()


def machine_cpu() -> tuple[float, float] | None:
    """``(busy_cpu_seconds, all_cpu_seconds)`` of the whole machine since boot."""
    try:
        t = psutil.cpu_times()
    except (psutil.Error, OSError):
        return None
    # Time the CPUs spent on nothing: idle, and waiting for I/O where the
    # system counts it; the rest (user, system, interrupts, guests...) is busy.
    idle = t.idle + getattr(t, "iowait", 0.0)
    # guest and guest_nice are already part of user and nice.
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - idle, total


def sample_all(pids: dict[str, int]) -> dict[str, tuple | None]:
    out: dict[str, tuple | None] = {name: proc_sample(pid) for name, pid in pids.items()}
    out[MACHINE] = machine_cpu()
    return out


def machine_report(before: dict, after: dict, region_cpu_s: float, generator_cpu_s: float) -> dict | None:
    """How busy the machine was in the window, and how much of that was
    neither the region nor the generator (a shared machine's noise)."""
    b, a = before.get(MACHINE), after.get(MACHINE)
    if not b or not a or a[1] <= b[1]:
        return None
    busy, total = a[0] - b[0], a[1] - b[1]
    cpus = os.cpu_count() or 1
    wall = total / cpus
    return {"busy_pct_of_all_cpus": round(100 * busy / total, 1),
            "other_cpu_s": round(max(0.0, busy - region_cpu_s - generator_cpu_s), 2),
            "other_pct_of_one_cpu": round(100 * max(0.0, busy - region_cpu_s - generator_cpu_s) / wall, 1)}


def _option_of(pid: int, flag: str) -> int | None:
    """The integer value of ``flag`` on a process's command line, if any."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            try:
                return int(argv[i + 1])
            except ValueError:
                return None
    return None


def gate_port_from_pid(data_dir: str | Path | None) -> int | None:
    """The client port of gate-1 as `simzmq up` started it (its --port), if
    the region runs on this machine."""
    return gate_client_ports(data_dir).get("gate-1")


def gate_client_ports(data_dir: str | Path | None) -> dict[str, int]:
    """``{gate name: client port}`` from the gates' command lines (their --port)."""
    return _gate_ports(data_dir, "--port")


def gate_http_ports(data_dir: str | Path | None) -> dict[str, int]:
    """``{gate name: HTTP port}`` from the gates' command lines (their --http-port)."""
    return _gate_ports(data_dir, "--http-port")


def _gate_ports(data_dir: str | Path | None, flag: str) -> dict[str, int]:
    ports = {}
    for name, pid in read_pid_files(data_dir).items():
        if name.startswith("gate-"):
            port = _option_of(pid, flag)
            if port is not None:
                ports[name] = port
    return ports


def listening_ports(pid: int) -> list[int]:
    """The TCP ports a local process listens on (an IM worker's only one is
    its /metrics), whatever configuration or --port-base it was started with."""
    import psutil
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    return sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN})


def server_report(pids: dict[str, int], before: dict, after: dict, wall_s: float, per: int = 0) -> dict:
    """CPU seconds and RSS per region process over a window; with ``per``
    (messages, logins…), also CPU microseconds per item, which a busy machine
    disturbs far less than the rates."""
    rows = []
    total_cpu = total_rss = total_rss_before = 0.0
    for name in sorted(pids):
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            rows.append({"name": name, "pid": pids[name], "gone": True})
            continue
        cpu = a[0] - b[0]
        rows.append({"name": name, "pid": pids[name], "cpu_s": round(cpu, 3),
                     "cpu_pct": round(100 * cpu / wall_s, 1) if wall_s > 0 else None,
                     "cpu_us_per_item": round(1e6 * cpu / per, 1) if per else None,
                     "rss_before_kb": b[1] // 1024, "rss_after_kb": a[1] // 1024,
                     "rss_delta_kb": (a[1] - b[1]) // 1024})
        total_cpu += cpu
        total_rss += a[1]
        total_rss_before += b[1]
    return {"processes": rows,
            "total": {"cpu_s": round(total_cpu, 3),
                      "cpu_pct": round(100 * total_cpu / wall_s, 1) if wall_s > 0 else None,
                      "cpu_us_per_item": round(1e6 * total_cpu / per, 1) if per else None,
                      "rss_before_kb": int(total_rss_before // 1024), "rss_after_kb": int(total_rss // 1024)}}



def machine_info() -> dict:
    """What the numbers were measured on."""
    return {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "mem_total_mb": psutil.virtual_memory().total >> 20,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _cpu_model() -> str:
    # psutil does not name the CPU; Linux says it in /proc/cpuinfo.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
