"""The exposition text, checked against golden files made from a cgroup recorded in the micro-VM.

tests/unit/data/cgroup-tree holds the files of a real workload's cgroup (256M,
0.5 CPU, 64 pids, 8 MiB written to /dev/vda, 20 MiB allocated) and its run record.
Regenerate the golden files with CGCTL_UPDATE_GOLDEN=1 after a deliberate change,
and read the diff.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cgctl import discovery, metrics, state

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
    monkeypatch.setattr("cgctl.accounting.PROC", str(fake_proc(tmp_path / "proc")))
    yield {"state": tmp_path / "state", "dev_block": dev_block.parent}
    claim.release()


def fake_proc(proc: Path) -> Path:
    """/proc as the exporter reads it for the recorded cgroup, whose first process is 133: that
    process in a net namespace of its own (another inode than pid 1's), with data/net-dev's interfaces."""
    for pid in ("1", "133"):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "net").write_text("")
    (proc / "133" / "net").mkdir()
    shutil.copy(DATA / "net-dev", proc / "133" / "net" / "dev")
    return proc


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
    text = without_self_metrics(collector(recorded, compat).render())
    if os.environ.get("CGCTL_UPDATE_GOLDEN"):
        (DATA / golden).write_text(text)
    assert text == (DATA / golden).read_text()
    # Any prometheus_client registry holding the collector serves the same families and values.
    families = list(text_string_to_metric_families(without_self_metrics(exposition(recorded, compat))))
    assert families == list(text_string_to_metric_families(text))


def test_values_come_from_the_recorded_files(recorded: dict[str, Path]) -> None:
    """As the kernel wrote them: integers verbatim, microseconds once divided into seconds."""
    text = collector(recorded, ("cadvisor",)).render()
    cgroup = TREE / "sys/fs/cgroup/cgctl.slice/web"
    usage = dict(line.split() for line in (cgroup / "cpu.stat").read_text().splitlines())["usage_usec"]
    assert f'cgctl_container_cpu_usage_seconds_total{{container="web"}} {int(usage) / 1e6}' in text
    assert 'cgctl_container_spec_memory_limit_bytes{container="web"} 268435456\n' in text
    assert 'cgctl_container_io_write_bytes_total{container="web",device="vda"} 8388608\n' in text
    assert (
        'container_fs_writes_bytes_total{id="/cgctl.slice/web",image="",name="web",device="/dev/vda"}' in text
    )
    assert 'container_cpu_usage_seconds_total{cpu="total",id="/cgctl.slice/web",image="",name="web"}' in text
    assert 'container_spec_cpu_quota{id="/cgctl.slice/web",image="",name="web"} 50000\n' in text
    # /proc/133/net/dev of the cgroup's first process, lo left out, the long counter glued to "eth0:"
    assert (
        'cgctl_container_network_receive_bytes_total{container="web",interface="eth0"} 12345678901\n' in text
    )
    assert 'interface="lo"' not in text
    assert (
        'container_network_transmit_packets_dropped_total{id="/cgctl.slice/web",image="",name="web",'
        'interface="veth-web0"} 1\n' in text
    )


def test_a_container_in_the_hosts_net_namespace_has_no_network_series(
    recorded: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--network host: pid 133's namespace is pid 1's, whose NICs are not the container's."""
    proc = fake_proc(tmp_path / "host-proc")
    (proc / "133" / "ns" / "net").unlink()
    (proc / "133" / "ns" / "net").symlink_to(proc / "1" / "ns" / "net")
    monkeypatch.setattr("cgctl.accounting.PROC", str(proc))
    text = collector(recorded, ("cadvisor",)).render()
    assert "cgctl_container_memory_usage_bytes{" in text
    assert "network_receive_bytes_total{" not in text and "network_transmit_bytes_total{" not in text


def test_info_carries_identity_and_labels_but_never_the_command(recorded: dict[str, Path]) -> None:
    text = exposition(recorded, ("cadvisor",))
    info = next(line for line in text.splitlines() if line.startswith("cgctl_container_info{"))
    assert 'container="web"' in info and 'cgroup="/cgctl.slice/web"' in info and 'id="496cf249c9cd"' in info
    assert 'label_team="infra"' in info and 'label_app_kubernetes_io_name="web"' in info
    assert "dd if=/dev/zero" not in text and "python3" not in text
    for line in text.splitlines():
        if line.startswith("cgctl_container_") and not line.startswith("cgctl_container_info"):
            labels = line[line.index("{") + 1 : line.index("}")]
            assert {pair.split("=")[0] for pair in labels.split(",")} <= {
                "container",
                "device",
                "interface",
            }, line


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


HOST_ID = "0123456789abcdef" * 4


@pytest.fixture
def host_tree(tmp_path: Path, recorded: dict[str, Path]) -> Path:
    """A cgroup2 mount holding the recorded cgroup's files at a systemd unit, a podman container and
    the web container's own cgroup (whose run record `recorded` claims)."""
    mount = tmp_path / "mount"
    web = TREE / "sys/fs/cgroup/cgctl.slice/web"
    for path in (
        "",
        "system.slice",
        "system.slice/nginx.service",
        "machine.slice",
        f"machine.slice/libpod-{HOST_ID}.scope",
    ):
        shutil.copytree(web, mount / path, dirs_exist_ok=True)
    return mount


def host_collector(
    recorded: dict[str, Path], mount: Path, compat: tuple[metrics.Family, ...] = (), **select: object
) -> metrics.ContainerCollector:
    selection = discovery.select(mount, **select)  # type: ignore[arg-type]
    return metrics.ContainerCollector(
        recorded["state"],
        compat=compat,
        unified=mount,
        sys_dev_block=recorded["dev_block"],
        selection=selection,
    )


def series(text: str, metric: str) -> dict[str, str]:
    """{labels: value} of one metric's samples."""
    return dict(
        line[len(metric) + 1 :].rsplit("} ", 1) for line in text.splitlines() if line.startswith(metric + "{")
    )


def test_hostwide_rows_carry_the_cgroup_and_what_its_path_says(
    recorded: dict[str, Path], host_tree: Path
) -> None:
    text = host_collector(recorded, host_tree, ("cadvisor",)).render()
    usage = series(text, "cgctl_container_memory_usage_bytes")
    current = (TREE / "sys/fs/cgroup/cgctl.slice/web/memory.current").read_text().strip()
    assert usage == {
        'cgroup="/"': current,
        'cgroup="/machine.slice",slice="-.slice",unit="machine.slice"': current,
        f'cgroup="/machine.slice/libpod-{HOST_ID}.scope",id="{HOST_ID[:12]}",runtime="podman"': current,
        'cgroup="/system.slice",slice="-.slice",unit="system.slice"': current,
        'cgroup="/system.slice/nginx.service",slice="system.slice",unit="nginx.service"': current,
    }
    assert (
        series(text, "container_memory_usage_bytes")[
            f'id="/machine.slice/libpod-{HOST_ID}.scope",image="",name="{HOST_ID[:12]}"'
        ]
        == current
    )
    assert 'id="/",image="",name=""' in series(text, "container_memory_usage_bytes")
    assert "cgctl_exporter_cgroups 5\n" in text and "cgctl_exporter_containers 0\n" in text
    assert "cgctl_container_info{" not in text  # the web container's cgroup is not below this mount


def test_hostwide_knows_cgctl_containers_by_their_records(
    recorded: dict[str, Path], host_tree: Path, tmp_path: Path
) -> None:
    own = host_tree / "cgctl.slice" / "api"
    shutil.copytree(TREE / "sys/fs/cgroup/cgctl.slice/web", own)
    claim = state.claim(recorded["state"], "api", {"id": "abc", "cgroup": str(own), "spec": {"labels": {}}})
    try:
        text = host_collector(recorded, host_tree, ("cadvisor",), include=("/cgctl.slice/*",)).render()
    finally:
        claim.release()
    assert list(series(text, "cgctl_container_pids")) == [
        'cgroup="/cgctl.slice/api",container="api",slice="-.slice",unit="cgctl.slice"'
    ]
    assert list(series(text, "container_processes")) == ['id="/cgctl.slice/api",image="",name="api"']
    assert 'cgctl_container_info{cgroup="/cgctl.slice/api",container="api",id="abc"' in text


def test_hostwide_series_vanish_with_their_cgroup(recorded: dict[str, Path], host_tree: Path) -> None:
    collector = host_collector(recorded, host_tree)
    assert 'cgroup="/system.slice/nginx.service"' in collector.render()
    shutil.rmtree(host_tree / "system.slice" / "nginx.service")
    text = collector.render()
    assert "nginx.service" not in text and "cgctl_exporter_cgroups 4\n" in text
    assert collector.errors == {"discover": 0, "read": 0}


def test_hostwide_names_a_container_once_and_the_machine_from_meminfo(
    recorded: dict[str, Path], host_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cAdvisor names a container's own cgroup, not those nested in it; the root cgroup has no
    memory.current, so its memory is the machine's (MemTotal - MemFree), as runc and cAdvisor take it."""
    nested = host_tree / "machine.slice" / f"libpod-{HOST_ID}.scope" / "container"
    shutil.copytree(TREE / "sys/fs/cgroup/cgctl.slice/web", nested)
    (host_tree / "memory.current").unlink()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4000000 kB\nMemFree:         1000000 kB\nCached: 5 kB\n")
    monkeypatch.setattr("cgctl.accounting.MEMINFO", meminfo)
    text = host_collector(recorded, host_tree, ("cadvisor",)).render()
    names = {
        labels: value for labels, value in series(text, "container_processes").items() if "libpod" in labels
    }
    assert list(names) == [
        f'id="/machine.slice/libpod-{HOST_ID}.scope",image="",name="{HOST_ID[:12]}"',
        f'id="/machine.slice/libpod-{HOST_ID}.scope/container",image="",name=""',
    ]
    assert series(text, "cgctl_container_memory_usage_bytes")['cgroup="/"'] == str(3000000 * 1024)
