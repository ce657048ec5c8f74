"""cgctl-oci's data verbs against runc 1.1.5's own output (tests/unit/data/runc-1.1.5-*: `runc features`,
`runc spec [--rootless]` on the host, `runc events --stats` of a paused container in the micro-VM with
the cgroup files it read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cgctl.cgroup.fs import Cgroup
from cgctl.ns import mounts
from cgctl.runtime import oci_info, oci_stats
from cgctl.runtime.oci_update import update_flags_to_resources
from cgctl.sandbox import libseccomp, seccomp_profile
from cgctl.spec import CAPABILITIES

DATA = Path(__file__).parent / "data"
RUNC_FEATURES = json.loads((DATA / "runc-1.1.5-features.json").read_text())
RUNC_EVENTS = json.loads((DATA / "runc-1.1.5-events-stats.json").read_text())


def shape(value: Any) -> Any:
    """The keys and types of a JSON value, lists by the shape of their first item."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


@pytest.mark.parametrize(
    ("rootless", "fixture"), [(False, "runc-1.1.5-spec.json"), (True, "runc-1.1.5-spec-rootless.json")]
)
def test_spec_is_runcs_byte_for_byte(rootless: bool, fixture: str) -> None:
    # Captured as root, so runc's rootless mappings name uid and gid 0.
    spec = oci_info.default_spec(rootless=rootless, uid=0, gid=0)
    assert json.dumps(spec, indent="\t") == (DATA / fixture).read_text()


def test_rootless_spec_maps_root_to_the_caller() -> None:
    spec = oci_info.default_spec(rootless=True, uid=1000, gid=1001)
    assert spec["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 1}]
    assert spec["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 1001, "size": 1}]
    assert {"type": "network"} not in spec["linux"]["namespaces"]
    assert {"type": "user"} in spec["linux"]["namespaces"]
    assert "resources" not in spec["linux"]


def test_spec_templates_are_fresh_objects() -> None:
    first = oci_info.default_spec()
    first["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    first["linux"]["maskedPaths"].clear()
    second = oci_info.default_spec()
    assert second["process"]["capabilities"]["bounding"] == [
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
    ]
    assert second["linux"]["maskedPaths"]


def test_features_has_runcs_shape() -> None:
    found = oci_info.features()
    expected = shape(RUNC_FEATURES)
    if libseccomp.version() is None:  # runc too leaves seccomp out without libseccomp
        del expected["linux"]["seccomp"]
    assert shape(found) == expected | {"annotations": {key: "str" for key in found["annotations"]}}
    assert list(found["linux"]) == list(expected["linux"])


def test_features_says_what_cgctl_supports() -> None:
    found = oci_info.features()
    linux = found["linux"]
    assert linux["capabilities"] == list(CAPABILITIES) == RUNC_FEATURES["linux"]["capabilities"]
    assert linux["namespaces"] == RUNC_FEATURES["linux"]["namespaces"]
    assert linux["cgroup"] == {"v1": False, "v2": True, "systemd": True, "systemdUser": False}
    assert linux["apparmor"] == {"enabled": False} and linux["selinux"] == {"enabled": False}
    assert found["hooks"] == [hook for hook in RUNC_FEATURES["hooks"] if hook != "createContainer"]
    assert set(found["mountOptions"]) < set(RUNC_FEATURES["mountOptions"])
    assert {"ro", "nosuid", "rbind", "rprivate"} <= set(found["mountOptions"])
    assert not set(found["mountOptions"]) & set(mounts.UNSUPPORTED)
    assert found["annotations"]["cgctl.version"]


@pytest.mark.skipif(libseccomp.version() is None, reason="needs libseccomp (scripts/setup installs it)")
def test_features_seccomp_is_what_the_profile_parser_accepts() -> None:
    seccomp = oci_info.features()["linux"]["seccomp"]
    assert seccomp["actions"] == sorted(
        set(RUNC_FEATURES["linux"]["seccomp"]["actions"]) - {"SCMP_ACT_NOTIFY"}
    )
    assert seccomp["operators"] == RUNC_FEATURES["linux"]["seccomp"]["operators"]
    assert set(seccomp["archs"]) <= set(seccomp_profile.ARCHES)
    assert set(RUNC_FEATURES["linux"]["seccomp"]["archs"]) <= set(seccomp["archs"])
    assert seccomp["archs"] == sorted(seccomp["archs"])
    assert oci_info.features()["annotations"][oci_info.LIBSECCOMP_VERSION_ANNOTATION] == libseccomp.version()


def cgroup_of(tmp_path: Path, files: dict[str, str]) -> tuple[Cgroup, Path]:
    group = tmp_path / "container"
    group.mkdir()
    for name, text in files.items():
        (group / name).write_text(text)
    hugepages = tmp_path / "hugepages"
    for entry in RUNC_EVENTS["hugepages"]:
        (hugepages / entry).mkdir(parents=True)
    return Cgroup(group), hugepages


@pytest.mark.parametrize("case", ["limited", "unlimited"])
def test_stats_is_runcs_event_byte_for_byte(tmp_path: Path, case: str) -> None:
    group, hugepages = cgroup_of(tmp_path, RUNC_EVENTS[case]["files"])
    event = oci_stats.stats(case, group, hugepages)
    expected = RUNC_EVENTS[case]["runc"]
    assert event == expected
    assert json.dumps(event, separators=(",", ":")) == json.dumps(expected, separators=(",", ":"))


def test_stats_unlimited_reads_as_go_does(tmp_path: Path) -> None:
    group, hugepages = cgroup_of(tmp_path, RUNC_EVENTS["unlimited"]["files"])
    data = (oci_stats.stats("c", group, hugepages) or {})["data"]
    assert data["memory"]["usage"]["limit"] == data["memory"]["swap"]["limit"] == 2**64 - 1
    assert "limit" not in data["pids"]


def test_stats_swap_is_memory_plus_swap(tmp_path: Path) -> None:
    files = RUNC_EVENTS["limited"]["files"] | {
        "memory.swap.current": "4096\n",
        "memory.max": "1000\n",
        "memory.swap.max": "500\n",
    }
    group, hugepages = cgroup_of(tmp_path, files)
    memory = (oci_stats.stats("c", group, hugepages) or {})["data"]["memory"]
    assert memory["swap"]["limit"] == 1500
    assert memory["swap"]["usage"] == memory["usage"]["usage"] + 4096


def test_stats_blkio_in_cgroup_v1_tables(tmp_path: Path) -> None:
    io_stat = (
        "254:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n8:16 rbytes=0 wbytes=512 rios=0 wios=2\n"
    )
    group, hugepages = cgroup_of(tmp_path, RUNC_EVENTS["limited"]["files"] | {"io.stat": io_stat})
    blkio = (oci_stats.stats("c", group, hugepages) or {})["data"]["blkio"]
    assert blkio == {
        "ioServiceBytesRecursive": [
            {"major": 254, "op": "Read", "value": 4096},
            {"major": 254, "op": "Write"},
            {"major": 8, "minor": 16, "op": "Read"},
            {"major": 8, "minor": 16, "op": "Write", "value": 512},
        ],
        "ioServicedRecursive": [
            {"major": 254, "op": "Read", "value": 1},
            {"major": 254, "op": "Write"},
            {"major": 8, "minor": 16, "op": "Read"},
            {"major": 8, "minor": 16, "op": "Write", "value": 2},
        ],
    }


def test_stats_without_memory_controller_or_hugetlb(tmp_path: Path) -> None:
    group, hugepages = cgroup_of(tmp_path, {"cpu.stat": RUNC_EVENTS["limited"]["files"]["cpu.stat"]})
    data = (oci_stats.stats("c", group, hugepages) or {})["data"]
    assert data["memory"] == {
        key: {"limit": 0, "failcnt": 0} for key in ("usage", "swap", "kernel", "kernelTCP")
    }
    assert data["hugetlb"] == {} and data["blkio"] == {} and data["pids"] == {}


def test_stats_of_a_removed_cgroup_is_none(tmp_path: Path) -> None:
    assert oci_stats.stats("c", Cgroup(tmp_path / "gone")) is None


def test_update_flags_become_linux_resources() -> None:
    flags = {
        "memory": "256m",
        "memory-reservation": "1.5G",
        "memory-swap": "-1",
        "cpu-share": "512",
        "cpu-quota": "-1",
        "cpu-period": "100000",
        "cpuset-cpus": "0-1",
        "cpuset-mems": "0",
        "pids-limit": "64",
        "blkio-weight": "500",
        "unset": None,
    }
    assert update_flags_to_resources(flags) == {
        "memory": {"limit": 256 << 20, "reservation": 3 << 29, "swap": -1},
        "cpu": {"shares": 512, "quota": -1, "period": 100000, "cpus": "0-1", "mems": "0"},
        "pids": {"limit": 64},
        "blockIO": {"weight": 500},
    }


def test_update_flags_given_are_the_only_ones_set() -> None:
    assert update_flags_to_resources({"memory": "1024", "cpu-quota": None}) == {"memory": {"limit": 1024}}
    assert update_flags_to_resources({}) == {}


@pytest.mark.parametrize("text", ["1k", "1K", "1kb", "1KiB", "1 k", "1kB"])
def test_update_sizes_are_go_units_binary(text: str) -> None:
    assert update_flags_to_resources({"memory": text}) == {"memory": {"limit": 1024}}


@pytest.mark.parametrize(
    ("flag", "text", "message"),
    [
        ("memory", "lots", "invalid value for --memory: 'lots' is not a size"),
        ("memory", "1.2.3m", "is not a size"),
        ("memory", "-2", "is not a size"),
        ("cpu-share", "-5", "invalid value for --cpu-share: '-5' is not a whole number of 0 or more"),
        ("cpu-quota", "1.5", "is not a whole number"),
        ("pids-limit", str(2**63), "out of range"),
        ("blkio-weight", "5", "a weight is 10 to 1000"),
        ("kernel-memory", "1m", "--kernel-memory: not a flag of update"),
    ],
)
def test_update_flags_refused_name_the_flag(flag: str, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        update_flags_to_resources({flag: text})
