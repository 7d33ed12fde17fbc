"""Thread wake-ups between a Send and its push, counted on a real region.

    .venv/bin/python -m tests.wakeups        (N_SEQ, SENDERS, PER_SENDER in the environment)

A wake-up is a thread going to sleep and being woken again: every one is a
voluntary context switch, which Linux counts per thread in
``/proc/PID/task/TID/status``. The counts of every thread of the gate, both
brokers and the worker are read before and after a window; the same
processes' idle rate (probes, heartbeats, state messages) is measured first,
over 10 s, and subtracted. Two windows:

* sequential: one sender, one receiver on the same gate, N_SEQ Sends one at a
  time, each waited for (SendOk and the receiver's push) before the next — the
  cost of one Send when nothing else is going on;
* loaded: SENDERS senders each firing PER_SENDER Sends at once to their own
  receiver — what batching saves when there is something to batch.

Prints JSON: wake-ups per Send in all, and per thread. docs/benchmarks.md
("Wake-ups between a Send and its push") has the numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from simzmq.client import Client
from tests.region import Region

PROCS = ["gate-1", "broker-primary", "broker-backup", "im-1"]
N_SEQ = int(os.environ.get("N_SEQ", "300"))
SENDERS = int(os.environ.get("SENDERS", "20"))
PER_SENDER = int(os.environ.get("PER_SENDER", "20"))
IDLE_S = 10.0


def thread_status_files(region: Region) -> dict[str, str]:
    """{"process/thread name/tid": status path} for every thread now."""
    files = {}
    for proc in PROCS:
        pid = region.pid(proc)
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            files[f"{proc}/{comm}/{tid}"] = f"/proc/{pid}/task/{tid}/status"
    return files


def voluntary_switches(files: dict[str, str]) -> dict[str, int]:
    counts = {}
    for name, path in files.items():
        try:
            with open(path) as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        counts[name] = int(line.split()[1])
        except OSError:
            pass  # the thread ended
    return counts


async def window(region: Region, body) -> tuple[dict[str, int], float]:
    """Wake-ups per thread name (threads of one name summed) during body()."""
    files = thread_status_files(region)
    before = voluntary_switches(files)
    started = time.monotonic()
    await body()
    await asyncio.sleep(0.3)  # the last pushes' tails
    elapsed = time.monotonic() - started
    after = voluntary_switches(files)
    woken: dict[str, int] = {}
    for name, count in after.items():
        thread = name.rsplit("/", 1)[0]
        woken[thread] = woken.get(thread, 0) + count - before.get(name, 0)
    return woken, elapsed


async def logged_in(region: Region, user: str) -> Client:
    client = Client("127.0.0.1", region.gate_port, region.gate_pk, user, password="pw-" + user, device="d",
                    ping_interval=None)
    for _ in range(20):
        try:
            await client.register()
            break
        except Exception as exc:  # noqa: BLE001 — unavailable under load: try again
            if "exists" in str(exc):
                break
            await asyncio.sleep(0.5)
    await client.login()
    return client


async def next_push(client: Client) -> None:
    while not hasattr(await client.events.get(), "msg"):
        pass


async def measure(data_dir: Path) -> dict:
    with Region(data_dir, workers=1, gates=1) as region:
        region.start()
        while region.health() != 200:
            await asyncio.sleep(0.05)
        clients = {}
        for i in range(SENDERS):
            for role in "sr":
                clients[f"{role}{i}"] = await logged_in(region, f"{role}{i}")
        await asyncio.sleep(2)
        for client in clients.values():
            while not client.events.empty():
                client.events.get_nowait()

        async def idle():
            await asyncio.sleep(IDLE_S)

        async def sequential():
            for i in range(N_SEQ):
                await clients["s0"].send("r0", b"hello %d" % i)
                await next_push(clients["r0"])

        async def loaded():
            async def pair(i):
                sender, receiver = clients[f"s{i}"], clients[f"r{i}"]
                await asyncio.gather(*(sender.send(f"r{i}", b"load %d" % k) for k in range(PER_SENDER)))
                for _ in range(PER_SENDER):
                    await next_push(receiver)
            await asyncio.gather(*(pair(i) for i in range(SENDERS)))

        idle_woken, idle_s = await window(region, idle)
        report = {"idle_wakeups_per_s": round(sum(idle_woken.values()) / idle_s, 1)}
        for name, body, sends in (("sequential", sequential, N_SEQ), ("loaded", loaded, SENDERS * PER_SENDER)):
            woken, elapsed = await window(region, body)
            per_thread = {}
            for thread in sorted(set(woken) | set(idle_woken)):
                extra = woken.get(thread, 0) - idle_woken.get(thread, 0) / idle_s * elapsed
                per_thread[thread] = round(extra / sends, 2)
            report[name] = {"sends": sends, "seconds": round(elapsed, 2),
                            "wakeups_per_send": round(sum(per_thread.values()), 2),
                            "per_thread": {t: v for t, v in per_thread.items() if abs(v) >= 0.05}}
        for client in clients.values():
            await client.close()
        return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(Path(tempfile.mkdtemp()) / "data")), indent=1))
