"""The accounting snapshot's reader and the numbers derived from it, on fake cgroup files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgctl.accounting import Container, network_totals, parse_net_dev, read_snapshot, totals, usage

MiB = 1 << 20
FILES = {
    "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 40\nnr_throttled 20\n"
    "throttled_usec 1900000\nnr_bursts 0\nburst_usec 0\n",
    "cpu.max": "50000 100000\n",
    "memory.current": f"{100 * MiB}\n",
    "memory.max": "max\n",
    "memory.stat": f"anon {60 * MiB}\nfile {40 * MiB}\ninactive_file {30 * MiB}\n",
    "memory.events": "low 0\nhigh 5\nmax 2\noom 1\noom_kill 2\noom_group_kill 1\n",
    "pids.current": "3\n",
    "pids.max": "64\n",
    "pids.events": "max 2\n",
    "cpu.pressure": "some avg10=1.50 avg60=0.40 avg300=0.10 total=123456\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "io.stat": "254:0 rbytes=4096 wbytes=8388608 rios=1 wios=128 dbytes=0 dios=0\n",
}


def container(tmp_path: Path, files: dict[str, str] = FILES) -> Container:
    group = tmp_path / "web"
    group.mkdir(exist_ok=True)
    for name, text in files.items():
        (group / name).write_text(text)
    return Container(name="web", id="abc", cgroup=group, started_at=1.0)


def test_snapshot_addresses_values_by_file_and_key(tmp_path: Path) -> None:
    snap = read_snapshot(container(tmp_path), sys_dev_block=tmp_path / "no-sysfs")
    assert snap is not None
    assert snap.value("cpu.stat", "usage_usec") == 2500000
    assert snap.value("memory.current") == 100 * MiB
    assert snap.value("memory.max") is None  # max: no limit, no value
    assert (snap.value("cpu.max", "quota"), snap.value("cpu.max", "period")) == (50000, 100000)
    assert snap.value("cpu.pressure", "some.avg10") == 1.5 and snap.value("cpu.pressure", "full.total") == 0
    assert snap.value("memory.peak") is None  # this kernel "lacks" the file: tolerated
    assert snap.devices == {
        "254:0": {"rbytes": 4096, "wbytes": 8 * MiB, "rios": 1, "wios": 128, "dbytes": 0, "dios": 0}
    }


def test_working_set_and_oom_kills(tmp_path: Path) -> None:
    snap = read_snapshot(container(tmp_path))
    assert snap is not None
    assert snap.working_set() == 70 * MiB
    assert snap.oom_kills() == 1  # oom_kill 2 with one group kill: one process, counted twice by the kernel


def test_a_vanished_container_reads_as_none(tmp_path: Path) -> None:
    assert read_snapshot(Container(name="gone", id="", cgroup=tmp_path / "gone", started_at=0.0)) is None


def test_usage_over_an_interval(tmp_path: Path) -> None:
    before = read_snapshot(container(tmp_path))
    later = dict(FILES, **{"cpu.stat": "usage_usec 3000000\nnr_periods 50\nnr_throttled 25\n"})
    after = read_snapshot(container(tmp_path, later))
    assert before is not None and after is not None
    after.taken_at = before.taken_at + 2.0
    row = usage(before, after)
    assert row.cpu_percent == pytest.approx(25.0)  # 0.5 s of CPU in 2 s
    assert row.throttled_percent == pytest.approx(50.0)  # 5 of 10 periods
    assert (row.memory_bytes, row.memory_limit_bytes, row.working_set_bytes) == (100 * MiB, None, 70 * MiB)
    assert (row.pids, row.pids_limit, row.write_bytes, row.pressure_cpu) == (3, 64, 8 * MiB, 1.5)


NET_DEV = (Path(__file__).parent / "data" / "net-dev").read_text()


def test_net_dev_parses_every_interface_but_lo() -> None:
    """Names are right-aligned to six columns and a long first counter is glued to the colon."""
    interfaces = parse_net_dev(NET_DEV)
    assert list(interfaces) == ["eth0", "veth-web0"]
    assert interfaces["eth0"] == {
        "rx_bytes": 12345678901,
        "rx_packets": 9876543,
        "rx_errors": 1,
        "rx_dropped": 2,
        "tx_bytes": 2345678,
        "tx_packets": 4567,
        "tx_errors": 3,
        "tx_dropped": 4,
    }
    assert interfaces["veth-web0"]["tx_dropped"] == 1 and interfaces["veth-web0"]["rx_bytes"] == 648
    assert totals(interfaces) == {
        "rx_bytes": 12345678901 + 648,
        "rx_packets": 9876543 + 8,
        "tx_bytes": 2345678 + 1200,
        "tx_packets": 4567 + 10,
    }


def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host_network: bool = False) -> Path:
    """/proc with pid 1 and pid 7, whose net namespace is its own (or pid 1's) and has NET_DEV."""
    proc = tmp_path / "proc"
    for pid in ("1", "7"):
        (proc / pid / "ns").mkdir(parents=True)
    (proc / "1" / "ns" / "net").write_text("")
    if host_network:
        (proc / "7" / "ns" / "net").symlink_to(proc / "1" / "ns" / "net")
    else:
        (proc / "7" / "ns" / "net").write_text("")
    (proc / "7" / "net").mkdir()
    (proc / "7" / "net" / "dev").write_text(NET_DEV)
    monkeypatch.setattr("cgctl.accounting.PROC", str(proc))
    return proc


def test_the_network_is_read_from_the_first_process_of_the_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_proc(tmp_path, monkeypatch)
    snap = read_snapshot(container(tmp_path, FILES | {"cgroup.procs": "7\n8\n"}))
    assert snap is not None and snap.interfaces == parse_net_dev(NET_DEV)
    assert network_totals(7) == totals(parse_net_dev(NET_DEV))
    row = usage(snap, snap)
    assert (row.net_rx_bytes, row.net_tx_bytes) == (12345678901 + 648, 2345678 + 1200)


@pytest.mark.parametrize("procs", ["", "9\n"], ids=["no process", "its process gone"])
def test_no_process_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procs: str) -> None:
    fake_proc(tmp_path, monkeypatch)
    snap = read_snapshot(container(tmp_path, FILES | {"cgroup.procs": procs}))
    assert snap is not None and snap.interfaces is None and snap.entries("interface") == {}
    assert usage(snap, snap).net_rx_bytes is None
    assert network_totals(9) is None


def test_the_hosts_net_namespace_is_not_the_containers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--network host: the same namespace as pid 1, whose NICs it would otherwise report."""
    fake_proc(tmp_path, monkeypatch, host_network=True)
    snap = read_snapshot(container(tmp_path, FILES | {"cgroup.procs": "7\n"}))
    assert snap is not None and snap.interfaces is None
    assert network_totals(7) is None
