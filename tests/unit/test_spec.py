"""The spec's parsers: sizes and names, as typed by humans on the command line and in policy files."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from cgctl.spec import Limits, Namespaces, WorkloadSpec, format_size, parse_size

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
