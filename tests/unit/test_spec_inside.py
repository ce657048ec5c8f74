"""The container's inside in the spec: what config.json says about the root and the process, checked
before anything is made (pydantic errors, SpecErrors from the supervisor's plan)."""

from __future__ import annotations

import os
import pickle
import resource
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cgctl import syscalls
from cgctl.cgroup import devices
from cgctl.ns import mounts, user
from cgctl.runtime import supervisor
from cgctl.sandbox import _oci_rules, device_rules
from cgctl.spec import CAPABILITIES, Security, SpecError, WorkloadSpec

ROOT = {"path": "/srv/root"}


def spec(**fields: Any) -> WorkloadSpec:
    return WorkloadSpec.model_validate({"command": ["sh"], **fields})


def test_a_root_is_layers_or_a_path_exactly() -> None:
    assert spec(rootfs=ROOT).rootfs is not None
    for wrong in ({"path": "/r", "layers": ["/l"]}, {}, {"path": "relative"}, {"path": "/r", "upper": "/u"}):
        with pytest.raises(ValidationError):
            spec(rootfs=wrong)


@pytest.mark.parametrize("destination", ["relative", "/a/../../etc", "/.."])
def test_a_mount_destination_must_stay_in_the_root(destination: str) -> None:
    with pytest.raises(ValidationError, match="destination"):
        spec(rootfs=ROOT, mounts=[{"destination": destination, "type": "tmpfs"}])


def test_mounts_and_device_nodes_need_a_root() -> None:
    with pytest.raises(ValidationError, match="mounts go into a root"):
        spec(mounts=[])
    with pytest.raises(ValidationError, match="device nodes"):
        spec(security={"device_nodes": [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3}]})


def test_rlimits_are_checked() -> None:
    assert (
        spec(rlimits=[{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2**64 - 1}]).rlimits[0].hard == 2**64 - 1
    )
    for wrong in (
        [{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}],
        [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}],
        [{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}, {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}],
    ):
        with pytest.raises(ValidationError):
            spec(rlimits=wrong)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"umask": 0o1000}, "umask"),
        ({"oom_score_adj": 1001}, "oom_score_adj"),
        ({"domainname": "d", "namespaces": {"share": ["uts"]}}, "uts namespace"),
        ({"additional_gids": [-1]}, "additional_gids"),
        ({"personality": "LINUX64"}, "personality"),
    ],
)
def test_process_attributes_are_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_capability_sets_are_exact_and_consistent() -> None:
    sets = {"bounding": ["chown"], "permitted": ["CAP_CHOWN"], "effective": ["CHOWN"]}
    security = Security(capability_sets=sets)
    assert security.capabilities() == ["CAP_CHOWN"]
    assert security.capability_sets is not None
    assert security.capability_sets.mask("effective") == 1 << CAPABILITIES.index("CAP_CHOWN")
    for wrong in (
        {"capability_sets": {"effective": ["CHOWN"]}},  # effective beyond permitted
        {"capability_sets": {"permitted": ["KILL"], "ambient": ["KILL"]}},  # ambient beyond inheritable
        {"capability_sets": {"bounding": ["ALL"]}},
        {"capability_sets": {}, "cap_add": ["KILL"]},
        {"capability_sets": {}, "privileged": True},
    ):
        with pytest.raises(ValidationError):
            Security.model_validate(wrong)


@pytest.mark.parametrize("key", ["vm.swappiness", "kernel.pid_max", "fs.file-max", "net./../vm"])
def test_a_sysctl_the_host_shares_is_refused_by_name(key: str) -> None:
    with pytest.raises(ValidationError, match=key.replace(".", r"\.")):
        Security(sysctl={key: "1"})


@pytest.mark.parametrize(
    ("key", "shared"),
    [("net.ipv4.ip_forward", "net"), ("kernel.shmmax", "ipc"), ("fs.mqueue.msg_max", "ipc")],
)
def test_a_namespaced_sysctl_needs_its_namespace(key: str, shared: str) -> None:
    assert spec(security={"sysctl": {key: "1"}}).security.sysctl == {key: "1"}
    with pytest.raises(ValidationError, match=f"its own {shared} namespace"):
        spec(security={"sysctl": {key: "1"}}, namespaces={"share": [shared]})


def test_namespaces_join_and_mappings_are_consistent() -> None:
    joined = spec(namespaces={"join": {"net": "/proc/1/ns/net"}})
    assert "net" in joined.namespaces.private()
    mapping = [{"container_id": 0, "host_id": 100000, "size": 65536}]
    assert spec(namespaces={"user": True, "uid_mappings": mapping, "gid_mappings": mapping})
    for wrong in (
        {"join": {"net": "/proc/1/ns/net"}, "share": ["net"]},
        {"join": {"user": "/proc/1/ns/user"}, "user": True},
        {"join": {"time": "/proc/1/ns/time"}},
        {"join": {"net": "relative"}},
        {"uid_mappings": mapping, "gid_mappings": mapping},
        {"user": True, "uid_mappings": mapping},
    ):
        with pytest.raises(ValidationError):
            spec(namespaces=wrong)


def test_mount_options_become_flags_propagation_and_data(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    given = [
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "mode=755", "size=1m"],
        },
        {"destination": "/data", "source": str(source), "options": ["rbind", "ro", "rslave"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "options": ["ro", "rw"]},
    ]
    steps = mounts.plan(spec(rootfs=ROOT, mounts=given).mounts or [])
    dev, data, cgroup = steps
    assert (dev.fstype, dev.flags, dev.data) == ("tmpfs", syscalls.MS_NOSUID, "mode=755,size=1m")
    assert data.fstype is None and data.flags == syscalls.MS_BIND | syscalls.MS_REC | syscalls.MS_RDONLY
    assert data.propagation == (mounts.MS_SLAVE | syscalls.MS_REC,)
    assert (cgroup.fstype, cgroup.flags, cgroup.source) == ("cgroup2", 0, "cgroup2")


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (
            {"destination": "/d", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]},
            "does not exist",
        ),
        ({"destination": "/d", "options": ["bind"], "source": "relative"}, "absolute source"),
        ({"destination": "/d", "type": "tmpfs", "options": ["tmpcopyup"]}, "tmpcopyup"),
        ({"destination": "/d", "options": ["nosuid"]}, "filesystem type"),
    ],
)
def test_a_bad_mount_is_a_spec_error_naming_it(mount: dict[str, Any], message: str) -> None:
    ok = {"destination": "/proc", "type": "proc"}
    with pytest.raises(SpecError, match=message) as raised:
        mounts.plan(spec(rootfs=ROOT, mounts=[ok, mount]).mounts or [])
    assert raised.value.field == ("mounts", 1)


def test_destinations_resolve_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "absolute").symlink_to("/etc")
    (root / "up").symlink_to("../../../../../etc")
    (root / "via").symlink_to("real")
    (root / "loop").symlink_to("loop")
    assert mounts.resolve(str(root), "/absolute/x") == f"{root}/etc/x"
    assert mounts.resolve(str(root), "/up") == f"{root}/etc"
    assert mounts.resolve(str(root), "/via/y") == f"{root}/real/y"
    assert mounts.resolve(str(root), "/../../z") == f"{root}/z"
    with pytest.raises(OSError, match="symbolic links"):
        mounts.resolve(str(root), "/loop/x")


def test_oci_device_rules_replace_the_defaults() -> None:
    rules = [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": -1, "access": "rw"},
    ]
    node = {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}
    security = Security(device_rules=rules, device_nodes=[node])
    assert device_rules(security) == (devices.Rule("c", 1, None, "rw"), devices.Rule("c", 10, 229, "rwm"))
    assert device_rules(Security()) == devices.DEFAULT_RULES
    reset = Security(device_rules=[rules[1], {"allow": False, "type": "a", "access": "mrw"}])
    assert _oci_rules(reset) == []


def test_a_narrow_deny_after_allows_is_refused_by_index() -> None:
    rules = [
        {"allow": True, "type": "c", "major": 1, "minor": 3},
        {"allow": False, "type": "c", "major": 1, "minor": 3},
    ]
    with pytest.raises(SpecError, match="cannot take back") as raised:
        device_rules(Security(device_rules=rules))
    assert raised.value.field == ("security", "device_rules", 1)


def test_id_maps_are_written_as_the_kernel_reads_them() -> None:
    assert user.map_text([(0, 100000, 65536), (65536, 1000, 1)]) == "0 100000 65536\n65536 1000 1\n"


def test_the_root_and_bind_sources_must_exist_before_anything_is_made(tmp_path: Path) -> None:
    with (
        pytest.raises(SpecError, match="not a directory") as raised,
        supervisor.prepared_root(spec(rootfs={"path": str(tmp_path / "missing")})),
    ):
        pass
    assert raised.value.field == ("rootfs", "path")
    bind = {"destination": "/d", "type": "bind", "source": str(tmp_path / "gone"), "options": ["bind"]}
    with (
        pytest.raises(SpecError, match="does not exist"),
        supervisor.prepared_root(spec(rootfs={"path": str(tmp_path)}, mounts=[bind])),
    ):
        pass
    assert os.listdir(tmp_path) == []


def test_the_launch_carries_the_process_attributes(tmp_path: Path) -> None:
    workload = spec(
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}],
        additional_gids=[20, 10, 20],
        umask=0o022,
        oom_score_adj=-5,
        domainname="example.org",
        personality="LINUX32",
        security={"sysctl": {"net.ipv4.ip_forward": "1"}},
        namespaces={"join": {"uts": "/proc/1/ns/uts"}},
    )

    class Group:
        def file(self, name: str) -> Path:
            return tmp_path / name

    launch = supervisor.launch_for(workload, "w", Group(), None, None, {})  # type: ignore[arg-type]
    assert launch.rlimits == ((resource.RLIMIT_NOFILE, 10, 20),)
    assert (launch.groups, launch.umask, launch.oom_score_adj) == ((20, 10), 0o022, -5)
    assert (launch.personality, launch.sysctl) == (
        syscalls.PERSONALITIES["LINUX32"],
        (("net.ipv4.ip_forward", "1"),),
    )
    assert launch.namespaces.joined == {"uts": "/proc/1/ns/uts"}
    assert launch.namespaces.domainname == "example.org"
    assert launch.id_maps is None and not launch.namespaces.own_mounts
    assert pickle.loads(pickle.dumps(launch)) == launch  # the daemon sends it to its keeper so
