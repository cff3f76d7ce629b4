"""The Grafana dashboard and the alert rules in deploy/ name only metrics the gateway exports,
and the dashboard shows every one of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.metrics import Metrics

DEPLOY = Path(__file__).parent.parent / "deploy"
NAME = re.compile(r"hangon_[a-z_]+")


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Family name to the sample names it exports (``_total``, ``_bucket``, ...)."""
    return {
        family.name: {family.name + suffix for suffix in SUFFIXES[family.type]}
        for family in Metrics().registry.collect()
    }


def test_dashboard_shows_every_metric_and_nothing_else() -> None:
    """Every panel query names exported samples, and every metric family has a panel."""
    dashboard = json.loads((DEPLOY / "grafana" / "hangon.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    samples = set().union(*exported().values())
    assert used <= samples, used - samples
    shown = {family for family, names in exported().items() if names & used}
    assert shown == set(exported())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_alert_rules_name_exported_metrics() -> None:
    """Every metric an alert rule queries is one the gateway exports."""
    text = (DEPLOY / "prometheus" / "hangon-alerts.yml").read_text()
    used = set(NAME.findall(text))
    assert used and used <= set().union(*exported().values()), used
