"""Each controller's renderer: limits -> interface file values, checked against a fake host.

A fake /sys/dev/block and fake cgroup files in tmp_path stand in for the kernel
here only; the values' effect is proven in tests/integration.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cgctl.cgroup import cpu, cpuset, io, memory, pids
from cgctl.cgroup.fs import Cgroup
from cgctl.spec import CpuLimits, IoLimits, MemoryLimits, PidsLimits, SpecError

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(autouse=True)
def host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host of 4 CPUs (cgctl may use them all) and 2 GiB of memory, whatever this one has."""
    import psutil

    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1, 2, 3})
    monkeypatch.setattr(psutil, "cpu_count", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=2 * GiB))


def test_memory_settings_in_write_order() -> None:
    limits = MemoryLimits.model_validate(
        {"max": "1G", "high": "768M", "low": "64M", "min": "32M", "swap_max": 0}
    )
    assert memory.settings(limits) == [
        ("memory.min", str(32 * MiB)),
        ("memory.low", str(64 * MiB)),
        ("memory.high", str(768 * MiB)),
        ("memory.max", str(1024 * MiB)),
        ("memory.swap.max", "0"),
        ("memory.oom.group", "1"),
    ]
    assert memory.settings(MemoryLimits(max="max", oom_group=False)) == [
        ("memory.max", "max"),
        ("memory.oom.group", "0"),
    ]


@pytest.mark.parametrize(
    ("cpus", "line"), [("0.5", "50000 100000"), ("2", "200000 100000"), ("0.01", "1000 100000")]
)
def test_cpu_max_uses_a_100ms_period(cpus: str, line: str) -> None:
    assert cpu.settings(CpuLimits.model_validate({"cpus": cpus})) == [("cpu.max", line)]


def test_cpu_weight_and_idle() -> None:
    assert cpu.settings(CpuLimits(weight=300, idle=True)) == [("cpu.weight", "300"), ("cpu.idle", "1")]
    assert cpu.settings(CpuLimits()) == []


def test_pids_settings() -> None:
    assert pids.settings(PidsLimits(max=64)) == [("pids.max", "64")]
    assert pids.settings(PidsLimits()) == []


def test_cpuset_checks_the_cpus_the_parent_offers(tmp_path: Path) -> None:
    (tmp_path / "cpuset.cpus.effective").write_text("0-3\n")
    parent = Cgroup(tmp_path)
    assert cpuset.settings(CpuLimits(cpuset="1,3"), parent) == [("cpuset.cpus", "1,3")]
    with pytest.raises(SpecError, match=r"CPU\(s\) 4,5 are not available \(this host offers 0-3\)"):
        cpuset.settings(CpuLimits(cpuset="2-5"), parent)
    assert cpuset.parse_cpu_list("0-2,7,9-10\n") == {0, 1, 2, 7, 9, 10}


@pytest.fixture
def block_devices(tmp_path: Path) -> Path:
    """A fake /sys/dev/block: disk 8:0 (sda) with partition 8:1, disk 254:0 (vda)."""
    devices = tmp_path / "devices"
    for name, number, parent in (("sda", "8:0", None), ("sda1", "8:1", "sda"), ("vda", "254:0", None)):
        target = devices / (f"{parent}/{name}" if parent else name)
        target.mkdir(parents=True)
        (target / "uevent").write_text(f"MAJOR={number.split(':')[0]}\nDEVNAME={name}\n")
        if parent:
            (target / "partition").write_text("1\n")
    dev_block = tmp_path / "dev-block"
    dev_block.mkdir()
    for name, number in (("sda", "8:0"), ("sda/sda1", "8:1"), ("vda", "254:0")):
        (dev_block / number).symlink_to(devices / name)
    return dev_block


@pytest.fixture
def unified(tmp_path: Path) -> Cgroup:
    (tmp_path / "io.cost.qos").write_text("254:0 enable=1 ctrl=auto rpct=0.00\n8:0 enable=0 ctrl=auto\n")
    return Cgroup(tmp_path)


def test_io_settings_resolve_devices(block_devices: Path, unified: Cgroup) -> None:
    limits = IoLimits.model_validate({"max": ["8:0:wbps=10M,riops=100"], "weight": ["200", "254:0:50"]})
    assert io.settings(limits, unified, block_devices) == [
        ("io.max", f"8:0 wbps={10 * MiB} riops=100"),
        ("io.weight", "default 200"),
        ("io.weight", "254:0 50"),
    ]


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max": ["8:1:wbps=1M"]}, "a partition; IO limits apply to whole disks: use /dev/sda"),
        ({"max": ["9:9:wbps=1M"]}, "no block device 9:9 on this host"),
        ({"max": ["/nonexistent/dev:wbps=1M"]}, "cannot use the device: No such file or directory"),
        ({"weight": ["8:0:100"]}, r"needs the io.cost controller on 8:0: as root, echo '8:0 enable=1'"),
    ],
)
def test_io_settings_refuse_devices_they_cannot_limit(
    block_devices: Path, unified: Cgroup, limits: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        io.settings(IoLimits.model_validate(limits), unified, block_devices)


def test_cpus_above_the_host_are_refused_as_docker_does(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu.settings(CpuLimits.model_validate({"cpus": "4"})) == [("cpu.max", "400000 100000")]
    with pytest.raises(SpecError) as refused:
        cpu.settings(CpuLimits.model_validate({"cpus": "4.5"}))
    assert (refused.value.field, refused.value.value) == (("limits", "cpu", "cpus"), "4.5")
    assert refused.value.reason == (
        "range of CPUs is from 0.01 to 4.00, as there are only 4 CPUs available on this host"
    )
    with pytest.raises(SpecError, match=r"to 2.00, as there are only 2 CPUs available in its cpuset \(0,3\)"):
        cpu.settings(CpuLimits.model_validate({"cpus": "3", "cpuset": "0,3"}))
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {1})
    with pytest.raises(SpecError, match=r"to 1.00, .* only 1 CPUs available to cgctl, of this host's 4"):
        cpu.settings(CpuLimits.model_validate({"cpus": "2"}))


@pytest.mark.parametrize("field", ["max", "high", "low", "min"])
def test_memory_above_the_host_is_refused(field: str) -> None:
    assert memory.settings(MemoryLimits.model_validate({field: "2G", "swap_max": "64G"}))
    with pytest.raises(SpecError) as refused:
        memory.settings(MemoryLimits.model_validate({field: "256G"}))
    assert (refused.value.field, refused.value.value) == (("limits", "memory", field), "256 GiB")
    assert refused.value.reason.startswith(
        f"this host has only 2 GiB of memory ({2 * GiB} bytes), so memory.{field} above it can never apply"
    )
