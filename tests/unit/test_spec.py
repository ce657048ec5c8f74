"""The spec's parsers: sizes and names, as typed by humans on the command line and in policy files."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from cgctl.spec import (
    CAPABILITIES,
    DEFAULT_CAPABILITIES,
    Device,
    Limits,
    Namespaces,
    Security,
    WorkloadSpec,
    capability_name,
    format_size,
    parse_size,
)

MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256M", 256 * MiB),
        ("256MiB", 256 * MiB),
        ("256mb", 256 * MiB),
        ("256Mi", 256 * MiB),
        ("1.5G", 1536 * MiB),
        ("1.5 GiB", 1536 * MiB),
        ("2T", 2 << 40),
        ("64k", 64 << 10),
        ("4096", 4096),
        ("4096B", 4096),
        ("0", 0),
        (4096, 4096),
        ("max", "max"),
        ("MAX", "max"),
        (" 1G ", 1 << 30),
    ],
)
def test_sizes_parse_to_bytes(text: object, size: object) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["256Q", "-1", -1, "", "M", "1.5", "1e3", "12 34", "iB", "5i", True, "0x10"])
def test_bad_sizes_are_refused(text: object) -> None:
    with pytest.raises(ValueError, match=r"not a size|whole number"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(64 * MiB, "64 MiB"), (1536 * MiB, "1.5 GiB"), (512, "512 B"), (1 << 10, "1 KiB"), ("max", "max")],
)
def test_sizes_format_for_humans(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("name", ["job1", "a", "web.api-2_x", "A" * 64])
def test_valid_names(name: str) -> None:
    assert WorkloadSpec(name=name, command=["true"]).name == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", ".hidden", "-x", "A" * 65, "with space", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="name"):
        WorkloadSpec(name=name, command=["true"])


def test_memory_limit_parses_through_the_spec() -> None:
    spec = WorkloadSpec.model_validate({"command": ["true"], "limits": {"memory": {"max": "64M"}}})
    assert spec.limits.memory.max == 64 * MiB
    assert spec.limits.memory.oom_group is True


@pytest.mark.parametrize("command", [[], [""]])
def test_a_command_is_required(command: list[str]) -> None:
    with pytest.raises(ValidationError, match="command"):
        WorkloadSpec(command=command)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="memroy"):
        WorkloadSpec.model_validate({"command": ["true"], "limits": {"memroy": {"max": "1G"}}})


def limits(**fields: object) -> Limits:
    return Limits.model_validate(fields)


@pytest.mark.parametrize(("cpus", "quota"), [("0.5", "0.5"), ("2", "2"), ("1.25", "1.25"), (0.01, "0.01")])
def test_cpus_are_exact_decimals(cpus: object, quota: str) -> None:
    assert limits(cpu={"cpus": cpus}).cpu.cpus == Decimal(quota)


@pytest.mark.parametrize("cpus", ["0", "-1", "0.001", "abc", "nan", "inf"])
def test_bad_cpus_are_refused(cpus: str) -> None:
    with pytest.raises(ValidationError, match="cpus"):
        limits(cpu={"cpus": cpus})


@pytest.mark.parametrize("weight", [0, 10001, -5])
def test_cpu_weight_range(weight: int) -> None:
    with pytest.raises(ValidationError, match="weight"):
        limits(cpu={"weight": weight})


@pytest.mark.parametrize("cpuset", ["0", "0-3", "0,2-5,7"])
def test_cpu_lists(cpuset: str) -> None:
    assert limits(cpu={"cpuset": cpuset}).cpu.cpuset == cpuset


@pytest.mark.parametrize("cpuset", ["", "a", "3-1", "0,", "-1", "0-"])
def test_bad_cpu_lists(cpuset: str) -> None:
    with pytest.raises(ValidationError, match="cpuset"):
        limits(cpu={"cpuset": cpuset})


def test_io_max_from_the_command_line_form() -> None:
    io = limits(io={"max": ["/dev/sda:rbps=10M,wiops=100", "8:16:wbps=1G"]}).io
    assert (io.max[0].device, io.max[0].rbps, io.max[0].wiops, io.max[0].wbps) == (
        "/dev/sda",
        10 * MiB,
        100,
        None,
    )
    assert (io.max[1].device, io.max[1].wbps) == ("8:16", 1 << 30)


@pytest.mark.parametrize(
    "text",
    [
        "/dev/sda",
        "/dev/sda:",
        "/dev/sda:speed=1",
        "wbps=1",
        ":wbps=1",
        "/dev/sda:wbps=1Q",
        "/dev/sda:riops=1.5",
    ],
)
def test_bad_io_max(text: str) -> None:
    with pytest.raises(ValidationError):
        limits(io={"max": [text]})


def test_io_weight_default_and_per_device() -> None:
    weights = limits(io={"weight": ["300", "/dev/sda:50", "8:16:10"]}).io.weight
    assert [(w.device, w.weight) for w in weights] == [(None, 300), ("/dev/sda", 50), ("8:16", 10)]


@pytest.mark.parametrize("weight", ["0", "10001", "/dev/sda:x", "abc"])
def test_bad_io_weight(weight: str) -> None:
    with pytest.raises(ValidationError):
        limits(io={"weight": [weight]})


@pytest.mark.parametrize(("pids", "expected"), [("1", 1), (4096, 4096), ("max", "max")])
def test_pids(pids: object, expected: object) -> None:
    assert limits(pids={"max": pids}).pids.max == expected


@pytest.mark.parametrize("pids", ["0", "-1", "1.5", "many"])
def test_bad_pids(pids: str) -> None:
    with pytest.raises(ValidationError, match="pids"):
        limits(pids={"max": pids})


@pytest.mark.parametrize("name", ["memory", "../memory.max", "a/b.c", ".hidden"])
def test_bad_interface_file_names(name: str) -> None:
    with pytest.raises(ValidationError, match="interface file"):
        limits(files={name: "1"})


def test_namespaces_default_private_and_share() -> None:
    assert Namespaces().private() == ["cgroup", "ipc", "mnt", "net", "pid", "uts"]
    assert Namespaces(share=["net", "pid"]).private() == ["cgroup", "ipc", "mnt", "uts"]
    with pytest.raises(ValidationError):
        Namespaces(share=["time"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("env", {"1X": "y"}),
        ("env", {"A-B": "y"}),
        ("labels", {"": "x"}),
        ("labels", {"a b": "x"}),
        ("workdir", "rel"),
    ],
)
def test_bad_env_labels_and_workdir(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        WorkloadSpec.model_validate({"command": ["true"], field: value})


@pytest.mark.parametrize("name", ["sys_admin", "SYS_ADMIN", "cap_sys_admin", "CAP_SYS_ADMIN", " Sys_Admin "])
def test_capability_names_with_or_without_cap_in_any_case(name: str) -> None:
    assert capability_name(name) == "CAP_SYS_ADMIN"


@pytest.mark.parametrize("name", ["", "CAP_", "SYS_WIZARD", "cap_cap_chown", "0", "NET ADMIN"])
def test_unknown_capabilities_are_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a Linux capability"):
        capability_name(name)


def test_capability_numbers_are_the_kernels() -> None:
    # linux/capability.h: the numbers are ABI; a shifted table would drop the wrong capabilities.
    assert CAPABILITIES.index("CAP_CHOWN") == 0
    assert CAPABILITIES.index("CAP_NET_RAW") == 13
    assert CAPABILITIES.index("CAP_SYS_ADMIN") == 21
    assert CAPABILITIES.index("CAP_MKNOD") == 27
    assert CAPABILITIES.index("CAP_SETFCAP") == 31
    assert CAPABILITIES.index("CAP_CHECKPOINT_RESTORE") == 40 == len(CAPABILITIES) - 1
    assert set(DEFAULT_CAPABILITIES) < set(CAPABILITIES) and len(DEFAULT_CAPABILITIES) == 14


def test_the_capability_set_from_the_default_add_and_drop() -> None:
    assert Security().capabilities() == [name for name in CAPABILITIES if name in DEFAULT_CAPABILITIES]
    kept = Security(cap_add=["net_admin"], cap_drop=["chown", "MKNOD"]).capabilities()
    assert "CAP_NET_ADMIN" in kept and "CAP_CHOWN" not in kept and "CAP_MKNOD" not in kept
    assert Security(cap_drop=["ALL"]).capabilities() == []
    assert Security(cap_drop=["all"], cap_add=["kill"]).capabilities() == ["CAP_KILL"]
    assert Security(privileged=True, cap_drop=["ALL"]).capabilities() == list(CAPABILITIES)


@pytest.mark.parametrize(
    ("text", "device"),
    [
        ("/dev/vda", ("/dev/vda", None, "rwm")),
        ("/dev/vda:r", ("/dev/vda", None, "r")),
        ("/dev/vda:/dev/xvda", ("/dev/vda", "/dev/xvda", "rwm")),
        ("/dev/vda:/dev/xvda:rw", ("/dev/vda", "/dev/xvda", "rw")),
    ],
)
def test_devices_parse_as_docker_writes_them(text: str, device: tuple[str, str | None, str]) -> None:
    parsed = Device.model_validate(text)
    assert (parsed.path, parsed.target, parsed.access) == device


@pytest.mark.parametrize(
    "text", ["vda", "/dev/vda:rr", "/dev/vda:x", "/a:/b:/c:r", "/dev/vda:dev/x", "/dev/vda:"]
)
def test_bad_devices_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        Device.model_validate(text)


@pytest.mark.parametrize("seccomp", ["default", "unconfined", "/etc/cgctl/profile.json"])
def test_seccomp_sources(seccomp: str) -> None:
    assert Security(seccomp=seccomp).seccomp == seccomp


def test_a_relative_seccomp_profile_is_refused() -> None:
    with pytest.raises(ValidationError, match="absolute path"):
        Security(seccomp="profile.json")


def test_sharing_the_mount_namespace_needs_privileged() -> None:
    with pytest.raises(ValidationError, match="--share mnt needs --privileged"):
        WorkloadSpec(command=["true"], namespaces=Namespaces(share=["mnt"]))
    spec = WorkloadSpec(
        command=["true"], namespaces=Namespaces(share=["mnt"]), security=Security(privileged=True)
    )
    assert spec.security.privileged
