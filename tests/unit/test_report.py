"""The run report's network totals: what accounting.network_totals read before the teardown, or null."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cgctl.cgroup import fs
from cgctl.runtime.report import final_report
from cgctl.spec import WorkloadSpec


@pytest.mark.parametrize(
    "network",
    [None, {"rx_bytes": 2084000, "rx_packets": 2000, "tx_bytes": 42, "tx_packets": 1}],
    ids=["unknown", "read before the teardown"],
)
def test_the_report_carries_the_network_totals_it_was_given(
    tmp_path: Path, network: dict[str, int] | None
) -> None:
    (tmp_path / "cpu.stat").write_text("usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    spec = WorkloadSpec.model_validate({"command": ["true"]})
    report = final_report("web", fs.Cgroup(tmp_path), 0, 1.0, {}, spec, network)
    assert json.loads(report.model_dump_json())["network"] == network
