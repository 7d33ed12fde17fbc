"""How fast this machine is at the two things the region's speed rests on:
running CPython code, and making a write durable (fsync). Every report carries
these figures, so results from different machines, or from one machine on a
busy and a quiet day, can be set side by side.

Both are measured before the scenario, never during it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from simzmq.bench.check import percentiles

# The fixed pure-Python loop: its iterations per timing, and how many timings
# (the fastest counts: a busy machine only ever makes a timing slower).
LOOP_OPS = 200_000
LOOP_REPEATS = 5
# The fsync probe: this many appends of FSYNC_BLOCK bytes, each made durable
# before the next, the way a store commits its write-ahead log.
FSYNC_COUNT = 200
FSYNC_BLOCK = 4096


def python_loop(ops: int) -> int:
    """The fixed workload: ``ops`` iterations of integer arithmetic and a
    dict store, the mix of an interpreter-bound server. Returns a checksum, so
    the work has a result."""
    table: dict[int, int] = {}
    acc = 0
    for i in range(ops):
        acc = (acc * 31 + i) & 0xFFFF
        table[acc & 0xFF] = i
    return acc + len(table)


def python_speed(ops: int = LOOP_OPS, repeats: int = LOOP_REPEATS, clock=time.perf_counter) -> dict:
    """Iterations of python_loop per second, from the fastest of ``repeats``
    timings."""
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        python_loop(ops)
        best = min(best, clock() - t0)
    return {"ops_per_s": round(ops / best) if best > 0 else None, "loop_ops": ops, "repeats": repeats}


def fsync_latency(directory: str | Path, count: int = FSYNC_COUNT, block: int = FSYNC_BLOCK,
                  clock=time.perf_counter) -> dict:
    """``count`` appends of ``block`` bytes to a scratch file in ``directory``
    (so on the data's filesystem), each followed by fsync; the median and p99
    of write+fsync in milliseconds. The file is removed afterwards. Raises
    OSError when the directory cannot take it."""
    fd, path = tempfile.mkstemp(prefix=".simzmq-calibrate-", dir=directory)
    try:
        data = os.urandom(block)
        samples = []
        for _ in range(count):
            t0 = clock()
            os.write(fd, data)
            os.fsync(fd)
            samples.append(clock() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    p = percentiles(samples, points=(50, 99))
    return {"dir": str(directory), "block_bytes": block, "n": p["n"], "p50_ms": p.get("p50"), "p99_ms": p.get("p99")}


def calibrate(data_dir: str | Path | None) -> dict:
    """Both figures; the fsync one only where there is a data directory to
    write in (an error says why not)."""
    out: dict = {"python": python_speed()}
    if data_dir is None:
        out["fsync"] = {"error": "no data directory"}
    else:
        try:
            out["fsync"] = fsync_latency(data_dir)
        except OSError as exc:
            out["fsync"] = {"dir": str(data_dir), "error": str(exc)}
    return out


def format_calibration(cal: dict) -> str:
    """One line: what a reader compares across machines."""
    ops = cal["python"]["ops_per_s"]
    line = f"calibration: CPython {ops / 1e6:.2f} M loop ops/s" if ops else "calibration: CPython -"
    fs = cal["fsync"]
    if "error" in fs:
        return line + f"; fsync not measured ({fs['error']})"
    return (line + f"; write+fsync of {fs['block_bytes'] // 1024} KiB in {fs['dir']}: "
                   f"p50 {fs['p50_ms']:.3f} ms, p99 {fs['p99_ms']:.3f} ms (n={fs['n']})")
