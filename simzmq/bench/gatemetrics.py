"""The gates' event counters, read from their /metrics."""

from __future__ import annotations

# Gate counters worth a look after a run: each one that moved means the run
# met failovers, lost pushes, timeouts or the gate's limits.
GATE_EVENTS = ("simzmq_gate_failovers_total", "simzmq_gate_catchups_total", "simzmq_gate_push_holes_total",
               "simzmq_gate_notification_gaps_total", "simzmq_gate_backend_timeouts_total",
               "simzmq_gate_rate_limited_total", "simzmq_gate_kicks_total", "simzmq_gate_backpressure_total")


def gate_events(host: str, ports: dict[str, int]) -> dict[str, float]:
    """The GATE_EVENTS counters, summed over labels and gates, from /metrics."""
    import urllib.request
    totals: dict[str, float] = {}
    for port in ports.values():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        for line in text.splitlines():
            if not line.startswith("simzmq_gate_"):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in GATE_EVENTS:
                try:
                    totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    continue
    return totals


def events_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    out = {}
    for name in GATE_EVENTS:
        if name in after:
            d = int(after[name] - before.get(name, 0.0))
            if d:
                out[name.removeprefix("simzmq_gate_").removesuffix("_total")] = d
    return out
