"""exporters/: the alert rules and scrape config pass promtool, and the rules fire when they should.

That every dashboard and rule expression returns data from a real Prometheus
scraping real workloads is proven in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

EXPORTERS = Path(__file__).parents[2] / "exporters"


@pytest.mark.parametrize(
    "check",
    [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
)
def test_promtool(check: list[str]) -> None:
    done = subprocess.run(["promtool", *check], cwd=EXPORTERS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_panels_all_query_native_metrics_by_container() -> None:
    dashboard = json.loads((EXPORTERS / "grafana-dashboard.json").read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["container"]["includeAll"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(panels) >= 8
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "cgctl_container_" in target["expr"] and '{container=~"$container"}' in target["expr"]
