"""docs/grafana/simzmq.json is importable as is and asks only for metrics, and
labels of them, that the processes declare: renaming a metric in the code
without the dashboard fails here."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "simzmq.json"
METRIC_KINDS = {"Counter", "Gauge", "Histogram", "Summary"}
# A custom collector's families (the broker's) declare the same kinds.
FAMILY_KINDS = {"CounterMetricFamily": "Counter", "GaugeMetricFamily": "Gauge"}
# Labels Prometheus adds (or histograms carry) whatever the code declares.
SCRAPE_LABELS = {"instance", "job", "le", "quantile"}
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def declared_metrics() -> dict[str, tuple[str, set[str]]]:
    """``{name as declared: (kind, label names)}`` for every metric in simzmq/."""
    found = {}
    for path in (ROOT / "simzmq").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            family = kind in FAMILY_KINDS
            kind = FAMILY_KINDS.get(kind, kind)
            if kind not in METRIC_KINDS or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            labels_node = next((k.value for k in node.keywords if k.arg == ("labels" if family else "labelnames")),
                               None if family or len(node.args) < 3 else node.args[2])
            labels = {e.value for e in labels_node.elts} if isinstance(labels_node, (ast.List, ast.Tuple)) else set()
            found[node.args[0].value] = (kind, labels)
    return found


def exposed_names(declared) -> dict[str, set[str]]:
    """``{series name as scraped: label names}``: prometheus_client adds
    ``_total`` to counters and ``_bucket``/``_sum``/``_count`` to histograms."""
    names = {}
    for name, (kind, labels) in declared.items():
        if kind == "Counter":
            names[name.removesuffix("_total") + "_total"] = labels
        elif kind in ("Histogram", "Summary"):
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = labels
        else:
            names[name] = labels
    return names


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard):
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target["legendFormat"]


def test_it_is_a_dashboard_with_a_prometheus_input():
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}.items() <= \
        dashboard["__inputs"][0].items()
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_the_declared_metrics_are_found():
    declared = declared_metrics()
    # A few from each process: if the scan finds none, the check below means nothing.
    for name in ("simzmq_gate_connections", "simzmq_broker_active", "simzmq_im_commit_seconds",
                 "simzmq_gate_backend_seconds"):
        assert name in declared
    assert declared["simzmq_gate_requests_total"] == ("Counter", {"type", "outcome"})


@pytest.mark.parametrize("title,expr,legend", list(queries(load())))
def test_every_query_uses_declared_metrics_and_labels(title, expr, legend):
    exposed = exposed_names(declared_metrics())
    # Grafana's own variables are not PromQL; take them out before reading.
    plain = re.sub(r"\$__\w+", "5m", expr)
    used = set(re.findall(r"\bsimzmq_[a-z0-9_]+", plain))
    assert used, f"{title}: no simzmq metric in {expr}"
    for name in used:
        assert name in exposed, f"{title}: {name} is not a metric any process serves"
    labels_available = set().union(*(exposed[n] for n in used)) | SCRAPE_LABELS
    # Matchers right after a metric name: name{label="…", label!="…"}.
    for name, matchers in re.findall(r"\b(simzmq_[a-z0-9_]+)\{([^}]*)\}", plain):
        for label in re.findall(rf"({NAME})\s*(?:=~|!~|!=|=)", matchers):
            assert label in exposed[name] | SCRAPE_LABELS, f"{title}: {name} has no label {label}"
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", plain):
        for label in re.findall(NAME, group):
            assert label in labels_available, f"{title}: no metric in the query has the label {label}"
    for legend_label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
        assert legend_label in labels_available, f"{title}: legend names {legend_label}, not a label here"
