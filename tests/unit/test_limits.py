"""cgctl.limits.LIMITS, the one table of limits: what is read from it (options, files, defaults,
leaves, docs/run.md's table) and the parsers of the syntax it adds."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import typer.main

from cgctl import limits
from cgctl.cgroup import hugetlb
from cgctl.cgroup.fs import Cgroup
from cgctl.cli import app
from cgctl.cli.limits import OPTION_FOR_FIELD
from cgctl.limits import leaf_name, leaves
from cgctl.spec import Limits, SpecError

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_docs_run_md_has_the_table_of_limits_drawn_from_the_table() -> None:
    assert "\n".join(limits.markdown_rows()) in (DOCS / "run.md").read_text(), (
        "docs/run.md's limit rows differ from cgctl.limits.LIMITS: print them with .venv/bin/python -c "
        "'from cgctl.limits import markdown_rows; print(*markdown_rows(), sep=\"\\n\")' and paste them"
    )


def test_each_row_is_a_field_of_the_spec_and_a_distinct_option_and_file() -> None:
    fields = Limits.model_fields
    for row in limits.LIMITS:
        assert row.field[0] in fields
        if len(row.field) == 2:
            assert row.field[1] in fields[row.field[0]].annotation.model_fields  # type: ignore[union-attr]
    by_cgroup = [row for row in limits.LIMITS if row.by == "cgroup"]
    assert len({row.option for row in limits.LIMITS}) == len(limits.LIMITS)
    assert len({row.file for row in by_cgroup}) == len(by_cgroup)
    for row in limits.LIMITS:  # a file, or the network: never both
        assert bool(row.file) == (row.by == "cgroup")


def test_bandwidth_is_applied_by_the_network_not_a_file() -> None:
    assert limits.row("network", "egress").by == "network" and limits.row("network", "egress").name == (
        "--egress-bandwidth"
    )
    assert limits.file_row("") is None
    assert limits.settings("", {"egress": 10_000_000}) == []
    assert limits.leaf_file("network.egress") is None and limits.leaf_file("memory.max") == "memory.max"
    assert limits.applied_by(("network", "ingress")) == "network"
    assert limits.applied_by(("hugetlb", "2MB")) == limits.applied_by(("io", "max", "/dev/vda")) == "cgroup"
    given = Limits.model_validate({"network": {"egress": "10mbit"}, "memory": {"max": "1M"}})
    assert limits.by_network(given.model_dump(mode="json")) == {"egress": 10_000_000}
    assert limits.shown_rates({"egress": 10_000_000, "ingress": 0}) == {
        "network.egress": "10mbit",
        "network.ingress": "max",
    }


@pytest.mark.parametrize("verb", ["run", "update"])
def test_run_and_update_take_an_option_per_row(verb: str) -> None:
    command = typer.main.get_command(app)
    sub = command.get_command(click.Context(command), verb)  # type: ignore[attr-defined]
    names = {name for param in sub.params for name in (*param.opts, *param.secondary_opts)}
    for row in limits.LIMITS:
        assert set(row.option.split("/")) <= names
        assert OPTION_FOR_FIELD[row.field] == row.name


def test_files_defaults_and_leaves_come_from_the_table() -> None:
    assert limits.file_row("memory.zswap.max") == (limits.row("memory", "zswap_max"), "")
    assert limits.file_row("hugetlb.2MB.max") == (limits.row("hugetlb"), "2MB")
    assert limits.file_row("hugetlb.2MB.current") is None and limits.file_row("memory.swap.high") is None
    assert limits.row("hugetlb").default == "max" and limits.row("cpu", "cpus").default == "max 100000"
    found = leaves(
        Limits.model_validate({"hugetlb": {"2MB": "64M"}, "files": {"a.b": "1"}}).model_dump(
            mode="json", exclude_unset=True
        )
    )
    named = {leaf_name(leaf): value for leaf, value in found.items()}
    assert named == {"hugetlb[2MB]": 64 << 20, "files[a.b]": "1"}
    for name, file in [
        ("memory.max", "memory.max"),
        ("memory.zswap_max", "memory.zswap.max"),
        ("cpu.cpus", "cpu.max"),
        ("io.max[/dev/vda]", "io.max"),
        ("hugetlb[2MB]", "hugetlb.2MB.max"),
        ("files[memory.swap.high]", "memory.swap.high"),
    ]:
        assert limits.leaf_file(name) == file


def test_settings_of_a_controller_in_the_tables_order() -> None:
    limited = Limits.model_validate(
        {"memory": {"max": "1M", "zswap_max": "2M", "min": 5}, "cpu": {"cpus": "1.5"}}
    )
    assert limits.settings("memory", dict(limited.memory)) == [
        ("memory.min", "5"),
        ("memory.max", str(1 << 20)),
        ("memory.zswap.max", str(2 << 20)),
        ("memory.oom.group", "1"),
    ]
    assert limits.settings("cpu", dict(limited.cpu)) == [("cpu.max", "150000 100000")]


@pytest.mark.parametrize(("given", "size"), [("2MB", "2MB"), ("2m", "2MB"), ("1GB", "1GB"), ("64kb", "64KB")])
def test_page_sizes_are_named_as_the_kernel_names_them(given: str, size: str) -> None:
    assert limits.parse_page_size(given) == size
    assert Limits.model_validate({"hugetlb": {given: "max"}}).hugetlb == {size: "max"}


@pytest.mark.parametrize("given", ["2", "2TB", "MB", "2.5MB"])
def test_a_bad_page_size_is_refused(given: str) -> None:
    with pytest.raises(ValueError, match="not a huge page size"):
        limits.parse_page_size(given)


def test_key_values_parse_a_map_option() -> None:
    assert limits.key_values(":", "SIZE:LIMIT")(["2MB:64M", "1GB:max"]) == {"2MB": "64M", "1GB": "max"}
    with pytest.raises(ValueError) as error:
        limits.key_values(":", "SIZE:LIMIT")(["2MB"])
    assert error.value.args == ("2MB", "expected SIZE:LIMIT")


def test_host_page_sizes_are_named_from_sys(tmp_path: Path) -> None:
    for kib in (2048, 1048576, 64):
        (tmp_path / f"hugepages-{kib}kB").mkdir()
    assert hugetlb.page_sizes(tmp_path) == ["64KB", "2MB", "1GB"]
    assert hugetlb.page_sizes(tmp_path / "none") == []


def test_hugetlb_settings_refuse_a_missing_controller_or_size(tmp_path: Path) -> None:
    (tmp_path / "hugepages" / "hugepages-2048kB").mkdir(parents=True)
    unified = Cgroup(tmp_path / "root")
    unified.path.mkdir()
    unified.file("cgroup.controllers").write_text("cpu memory pids\n")
    wanted = Limits.model_validate({"hugetlb": {"2MB": "64M"}}).hugetlb
    with pytest.raises(SpecError, match="no hugetlb controller") as error:
        hugetlb.settings(wanted, unified, tmp_path / "hugepages")
    assert error.value.field == ("limits", "hugetlb", "2MB")
    unified.file("cgroup.controllers").write_text("cpu memory pids hugetlb\n")
    assert hugetlb.settings(wanted, unified, tmp_path / "hugepages") == [("hugetlb.2MB.max", str(64 << 20))]
    with pytest.raises(SpecError, match=r"no 1GB huge pages \(it has 2MB"):
        hugetlb.settings({"1GB": "max"}, unified, tmp_path / "hugepages")


@pytest.mark.parametrize("mode", ["none", "host", "container:db"])
def test_a_bandwidth_without_a_network_of_its_own_is_refused_by_its_option(mode: str) -> None:
    from cgctl import network
    from cgctl.netspec import NetworkSpec

    with pytest.raises(network.NetworkError) as error:
        network.plan(NetworkSpec(mode=mode), bandwidth={"egress": 10_000_000})
    assert (error.value.option, error.value.value) == ("--egress-bandwidth", "10mbit")
    assert "--egress-bandwidth needs a network of its own: --network bridge or a network's name" in str(
        error.value
    )
    assert network.plan(NetworkSpec(mode=mode)).network is None


def test_update_refuses_a_bandwidth_for_a_container_without_a_network_and_shapes_only_changes() -> None:
    from cgctl.runtime.update import _shaping

    old = Limits.model_validate({"network": {"ingress": "1mbit"}})
    new = Limits.model_validate({"network": {"ingress": "1mbit", "egress": "5mbit"}})
    with pytest.raises(SpecError) as error:
        _shaping("web", {"pid": 7}, Limits(), new)
    assert error.value.field == ("limits", "network", "ingress") and "needs a network of its own" in str(
        error.value
    )
    attached = {"pid": 7, "network": {"bandwidth": {"ingress": 1_000_000}}}
    assert _shaping("web", attached, old, old) is None
    assert _shaping("web", attached, old, new) == {"ingress": 1_000_000, "egress": 5_000_000}
    assert _shaping("web", attached, new, Limits()) == {}  # both taken off
