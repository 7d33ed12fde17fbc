"""The gates' event counters, read from their /metrics."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# Gate counters worth a look after a run: each one that moved means the run
# met failovers, lost pushes, timeouts or the gate's limits.
GATE_EVENTS = ("simzmq_gate_failovers_total", "simzmq_gate_catchups_total", "simzmq_gate_push_holes_total",
               "simzmq_gate_notification_gaps_total", "simzmq_gate_backend_timeouts_total",
               "simzmq_gate_rate_limited_total", "simzmq_gate_kicks_total", "simzmq_gate_backpressure_total")


def gate_events(host: str, ports: dict[str, int]) -> dict[str, float]:
    """The GATE_EVENTS counters, summed over labels and gates, from /metrics."""
    totals: dict[str, float] = {}
    for port in ports.values():
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode("utf-8", "replace")
            counts = event_totals(text)
        except (OSError, ValueError):
            continue  # a gate that does not answer (or garbles) is left out of the sum
        for name, value in counts.items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def event_totals(text: str) -> dict[str, float]:
    """The GATE_EVENTS counters in one Prometheus text exposition, summed over
    their labels. Raises ValueError on text that is not the exposition format."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in GATE_EVENTS:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def events_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    out = {}
    for name in GATE_EVENTS:
        if name in after:
            d = int(after[name] - before.get(name, 0.0))
            if d:
                out[name.removeprefix("simzmq_gate_").removesuffix("_total")] = d
    return out
