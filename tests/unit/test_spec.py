"""The spec's parsers: sizes and names, as typed by humans on the command line and in policy files."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cgctl.spec import WorkloadSpec, format_size, parse_size

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
def test_bad_sizes_are_refused_with_the_value_in_the_message(text: object) -> None:
    with pytest.raises(ValueError) as error:
        parse_size(text)
    assert str(text) in str(error.value)


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
