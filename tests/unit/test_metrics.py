"""The exposition text, checked against golden files made from a cgroup recorded in the micro-VM.

tests/unit/data/cgroup-tree holds the files of a real workload's cgroup (256M,
0.5 CPU, 64 pids, 8 MiB written to /dev/vda, 20 MiB allocated) and its run record.
Regenerate the golden files with CGCTL_UPDATE_GOLDEN=1 after a deliberate change,
and read the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cgctl import metrics, state

DATA = Path(__file__).parent / "data"
TREE = DATA / "cgroup-tree"
SCRAPED_AT = 1795857360.0


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """A live run record for the recorded cgroup, a fake /sys/dev/block, and a fixed clock."""
    record = json.loads((TREE / "web.json").read_text().replace("{root}", str(TREE)))
    claim = state.claim(tmp_path / "state", "web", record)
    dev_block = tmp_path / "dev-block" / "254:0"
    dev_block.mkdir(parents=True)
    (dev_block / "uevent").write_text("MAJOR=254\nMINOR=0\nDEVNAME=vda\n")
    monkeypatch.setattr("cgctl.accounting.time.time", lambda: SCRAPED_AT)
    yield {"state": tmp_path / "state", "dev_block": dev_block.parent}
    claim.release()


def collector(paths: dict[str, Path], compat: tuple[metrics.Family, ...] = ()) -> metrics.ContainerCollector:
    return metrics.ContainerCollector(
        paths["state"], compat=compat, unified=TREE / "sys/fs/cgroup", sys_dev_block=paths["dev_block"]
    )


def exposition(paths: dict[str, Path], compat: tuple[metrics.Family, ...] = ()) -> str:
    """The text as any prometheus_client registry holding the collector writes it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(paths, compat))
    return generate_latest(registry).decode()


def without_self_metrics(text: str) -> str:
    """The exporter's own timings change from scrape to scrape; they are checked separately."""
    return "".join(line + "\n" for line in text.splitlines() if "cgctl_exporter_" not in line)


@pytest.mark.parametrize(
    ("compat", "golden"), [((), "metrics-native.prom"), (("cadvisor",), "metrics-cadvisor.prom")]
)
def test_exposition_matches_the_golden_file(
    recorded: dict[str, Path], compat: tuple[metrics.Family, ...], golden: str
) -> None:
    text = without_self_metrics(exposition(recorded, compat))
    if os.environ.get("CGCTL_UPDATE_GOLDEN"):
        (DATA / golden).write_text(text)
    assert text == (DATA / golden).read_text()
    # What the exporter serves, written directly, is the same text prometheus_client writes.
    assert without_self_metrics(collector(recorded, compat).render()) == text


def test_values_come_from_the_recorded_files(recorded: dict[str, Path]) -> None:
    text = exposition(recorded, ("cadvisor",))
    cgroup = TREE / "sys/fs/cgroup/cgctl.slice/web"
    usage = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())["usage_usec"]
    assert f'cgctl_container_cpu_usage_seconds_total{{container="web"}} {int(usage) / 1e6}' in text
    assert 'cgctl_container_spec_memory_limit_bytes{container="web"} 2.68435456e+08' in text
    assert 'cgctl_container_io_write_bytes_total{container="web",device="vda"} 8.388608e+06' in text
    assert (
        'container_fs_writes_bytes_total{device="/dev/vda",id="/cgctl.slice/web",image="",name="web"}' in text
    )
    assert 'container_cpu_usage_seconds_total{cpu="total",id="/cgctl.slice/web",image="",name="web"}' in text
    assert 'container_spec_cpu_quota{id="/cgctl.slice/web",image="",name="web"} 50000.0' in text


def test_info_carries_identity_and_labels_but_never_the_command(recorded: dict[str, Path]) -> None:
    text = exposition(recorded, ("cadvisor",))
    info = next(line for line in text.splitlines() if line.startswith("cgctl_container_info{"))
    assert 'container="web"' in info and 'cgroup="/cgctl.slice/web"' in info and 'id="496cf249c9cd"' in info
    assert 'label_team="infra"' in info and 'label_app_kubernetes_io_name="web"' in info
    assert "dd if=/dev/zero" not in text and "python3" not in text
    for line in text.splitlines():
        if line.startswith("cgctl_container_") and not line.startswith("cgctl_container_info"):
            labels = line[line.index("{") + 1 : line.index("}")]
            assert {pair.split("=")[0] for pair in labels.split(",")} <= {"container", "device"}, line


def test_self_metrics_report_each_part(recorded: dict[str, Path]) -> None:
    text = exposition(recorded)
    assert "cgctl_exporter_containers 1.0" in text
    for part in ("discover", "read"):
        assert f'cgctl_exporter_part_duration_seconds{{part="{part}"}}' in text
        assert f'cgctl_exporter_part_errors_total{{part="{part}"}} 0.0' in text


def test_a_vanished_container_is_skipped(recorded: dict[str, Path], tmp_path: Path) -> None:
    gone = state.claim(recorded["state"], "gone", {"cgroup": str(tmp_path / "no-such-cgroup")})
    try:
        text = exposition(recorded)
    finally:
        gone.release()
    assert "cgctl_exporter_containers 1.0" in text and 'container="gone"' not in text


def test_the_table_follows_prometheus_naming() -> None:
    names = [definition.name for definition in metrics.METRICS]
    assert len(names) == len(set(names))
    for definition in metrics.METRICS:
        assert definition.name.endswith("_total") == (definition.kind == "counter"), definition.name
        assert definition.name.startswith(
            "cgctl_container_" if definition.family == "native" else "container_"
        )
        assert definition.source and definition.help


def test_every_metric_is_documented() -> None:
    documented = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    for definition in metrics.METRICS:
        assert f"`{definition.name}`" in documented, definition.name
