"""Statistics over the samples and the delivery check over the inboxes."""

from __future__ import annotations

import math
from array import array

def percentiles(samples, points=(50, 95, 99)) -> dict:
    """Nearest-rank percentiles and the max, in milliseconds (samples in seconds)."""
    data = sorted(samples)
    if not data:
        return {"n": 0}
    out = {"n": len(data)}
    for p in points:
        rank = max(1, math.ceil(p / 100 * len(data)))
        out[f"p{p}"] = round(data[rank - 1] * 1000, 3)
    out["max"] = round(data[-1] * 1000, 3)
    out["mean"] = round(sum(data) / len(data) * 1000, 3)
    return out


def order_check(found: list[int], acked: set[int], retried: set[int] = frozenset()) -> dict:
    """How one sender's messages sit in one receiver's inbox. ``found`` is the
    sender's message indexes in inbox (seq) order; ``retried`` the ones the
    sender had to send again after a refusal (rate_limited, unavailable), which
    legitimately land after Sends that were accepted meanwhile."""
    seen: set[int] = set()
    doubled = reordered = late_retries = 0
    highest = -1
    for k in found:
        if k in seen:
            doubled += 1
            continue
        seen.add(k)
        if k < highest:
            if k in retried:
                late_retries += 1
            else:
                reordered += 1
        else:
            highest = k
    return {"lost": len(acked - seen), "doubled": doubled, "reordered": reordered, "late_retries": late_retries,
            "unconfirmed": len(seen - acked), "found": len(seen)}



def merge_latency(results, key) -> array:
    out = array("d")
    for r in results:
        out.frombytes(r.get(key, b""))
    return out


def merge_errors(results) -> dict:
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
        for s in r.get("senders", []):
            for k, v in s["errors"].items():
                errors[k] = errors.get(k, 0) + v
    return errors


def check_delivery(results) -> dict:
    """Merge the senders' acknowledgements with the receivers' inboxes."""
    acked: dict[str, set[int]] = {}
    retried: dict[str, set[int]] = {}
    for r in results:
        for s in r.get("senders", []):
            acked[s["sender"]] = set(range(s["count"])) - set(s["failed"])
            retried[s["sender"]] = set(s.get("retried", ()))
    totals = {"checked": 0, "lost": 0, "doubled": 0, "reordered": 0, "late_retries": 0, "unconfirmed": 0,
              "inbox_gaps": 0}
    for r in results:
        for rec in r.get("receivers", []):
            check = rec["check"]
            totals["inbox_gaps"] += check["inbox_gaps"]
            for sender, raw in check["found"].items():
                ks = array("I")
                ks.frombytes(raw)
                c = order_check(list(ks), acked.get(sender, set()), retried.get(sender, set()))
                totals["checked"] += c["found"]
                for key in ("lost", "doubled", "reordered", "late_retries", "unconfirmed"):
                    totals[key] += c[key]
    totals["ok"] = not (totals["lost"] or totals["doubled"] or totals["reordered"] or totals["inbox_gaps"])
    return totals
