"""Change a running container's limits: all values checked before any write, rolled back if one fails.

Only what differs from the container's recorded limits is written; bandwidth
(a limit the network applies) is shaped anew by the bandwidth plugin
(network.reshape). The run record is updated in place (its inode carries the
supervisor's lock), and lists the files written, so the run report read back
at the end shows the limits in force then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgctl import limits as table
from cgctl import network, state
from cgctl.accounting import find_container
from cgctl.cgroup import fs
from cgctl.limits import format_rate, leaf_name, leaves
from cgctl.runtime.supervisor import (
    base_controllers,
    check_files,
    interface_file_settings,
    limit_settings,
    needed_controllers,
)
from cgctl.spec import Limits, SpecError

# Multi-line files keyed by their first word (a device); the rest hold one value.
KEYED_BY_DEVICE = ("io.max", "io.weight")
IO_KEYS = ("rbps", "wbps", "riops", "wiops")
IO_MAX_UNLIMITED = " ".join(f"{key}=max" for key in IO_KEYS)
DEFAULT_WEIGHT = 100


def update(name: str, changes: dict[str, dict[str, Any]], state_dir: Path | None = None) -> dict[str, str]:
    """Apply changes (the `limits` fields given) to the running container; returns what the kernel
    now reads back for each file written. They are explicit limits: a policy reload leaves them.
    Raises LookupError, pydantic's ValidationError, SpecError or fs.CgroupError; in every case the
    container's limits are as they were."""
    Limits.model_validate(changes)  # bad values are refused before anything is looked up
    path = state.record_path(state_dir or state.default_state_dir(), name)
    find_container(name, state_dir)
    record = state.read(path)
    new = Limits.model_validate(merge(record["spec"]["limits"], changes))
    explicit = merge(record.get("explicit", record["spec"]["limits"]), changes)
    noted: dict[str, Any] = {"explicit": explicit}
    if record.get("policy"):  # what is given now is the user's, no longer a policy's
        given = {leaf_name(leaf) for leaf in leaves(explicit)}
        sources = {leaf: source for leaf, source in record["policy"]["sources"].items() if leaf not in given}
        noted["policy"] = {**record["policy"], "sources": sources}
    return set_limits(name, new, noted, state_dir)


def set_limits(
    name: str, new: Limits, record_fields: dict[str, Any], state_dir: Path | None = None
) -> dict[str, str]:
    """Make the running container's limits `new` (its caller knows it runs: a reload lists the running
    ones once, rather than each write looking through every record): write what differs, put a
    limit that `new` no longer gives back to the kernel's default, roll back on a refused write;
    then record `new` and `record_fields` in its run record. Returns what the kernel reads back for
    each file written."""
    path = state.record_path(state_dir or state.default_state_dir(), name)
    record = state.read(path)
    old = Limits.model_validate(record["spec"]["limits"])
    group = fs.Cgroup(Path(record["cgroup"]))
    unified, parent = _prepare(group, old, new)
    before, after = _settings(old, unified, parent), _settings(new, unified, parent)
    rates = _shaping(name, record, old, new)
    # Resets first: cpu.weight cannot be written while cpu.idle is 1 (the kernel's EINVAL).
    to_write = _resets(before, after) + [_whole(s) for s in after if s not in before]
    previous = {file: group.read(file) for file, _ in to_write}
    written: list[tuple[str, str]] = []
    try:
        for file, value in to_write:
            group.write(file, value)
            written.append((file, value))
        if rates is not None:  # the network's limits, once the cgroup's are in
            attachment = network.reshape(record["network"], rates, f"/proc/{record['pid']}/ns/net")
            record_fields = {**record_fields, "network": attachment}
    except (fs.CgroupError, network.NetworkError) as error:
        for file, value in reversed(written):
            _restore(group, file, value, previous[file])
        if isinstance(error, network.NetworkError):
            raise
        raise fs.CgroupError(f"{error}; the {len(written)} value(s) already written were put back") from None
    record = state.read(path)  # as it is now: a checkpoint may have noted itself meanwhile
    record["spec"]["limits"] = new.model_dump(mode="json")
    record["written"] = sorted(set(record.get("written", [])) | {file for file, _ in to_write})
    record.update(record_fields)
    state.rewrite(path, record)
    unshaped = {} if rates is None else dict.fromkeys(table.by_network(old.model_dump(mode="json")), 0)
    return {file: group.read(file).strip() for file, _ in to_write} | table.shown_rates(
        {**unshaped, **(rates or {})}
    )


def _shaping(name: str, record: dict[str, Any], old: Limits, new: Limits) -> dict[str, int] | None:
    """The rates the network is to apply, if they change (None if not). SpecError, naming the option,
    for a container without a network of its own (none, host, container:NAME) given one."""
    rates = table.by_network(new.model_dump(mode="json"))
    if rates == table.by_network(old.model_dump(mode="json")):
        return None
    if not record.get("network") or not record.get("pid"):
        for direction, rate in rates.items():
            option = table.row("network", direction).name
            raise SpecError(
                ("limits", "network", direction),
                format_rate(rate),
                f"{option} needs a network of its own: --network bridge or a network's name "
                f"({name} has none)",
            )
        return None
    return rates


def file_settings(group: fs.Cgroup, limits: Limits) -> list[tuple[str, str]]:
    """Every (interface file, value) that makes the group's limits `limits`, checked against this host;
    the controllers they need are enabled in the parent."""
    return _settings(limits, *_prepare(group, limits))


def _prepare(group: fs.Cgroup, *limits: Limits) -> tuple[fs.Cgroup, fs.Cgroup]:
    """The cgroup v2 root and the group's parent, with the controllers `limits` need enabled along the
    way to it (one no container asked for before, hugetlb or cpuset, may be on nowhere yet)."""
    unified = fs.open_unified_root(set().union(*map(base_controllers, limits)))
    controllers = set().union(*(needed_controllers(each, unified) for each in limits))
    return unified, fs.open_cgctl_root(unified, controllers, group.path.parent)


def _settings(limits: Limits, unified: fs.Cgroup, parent: fs.Cgroup) -> list[tuple[str, str]]:
    settings = limit_settings(limits, unified, parent.path)
    check_files(settings, parent)
    return settings + interface_file_settings(limits.files, parent)


def _resets(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The kernel's defaults for what was set before and is no longer (io files: per device)."""
    kept = {_key(file, value) for file, value in after}
    resets = []
    for file, value in before:
        if _key(file, value) in kept:
            continue
        if file in KEYED_BY_DEVICE:
            device = value.split()[0]
            resets.append((file, f"{device} {IO_MAX_UNLIMITED if file == 'io.max' else 'default'}"))
            if file == "io.weight" and device == "default":
                resets[-1] = (file, f"default {DEFAULT_WEIGHT}")
        elif (found := table.file_row(file)) is not None and found[0].default is not None:
            resets.append((file, found[0].default))  # what a new cgroup's file holds
    return resets


def _whole(setting: tuple[str, str]) -> tuple[str, str]:
    """An io.max line with every key: the kernel changes only the keys a write names, so a cap the
    new line leaves out must be written as max to go."""
    file, value = setting
    if file != "io.max":
        return setting
    device, *given = value.split()
    named = {entry.partition("=")[0] for entry in given}
    return file, " ".join([device, *given, *(f"{key}=max" for key in IO_KEYS if key not in named)])


def _key(file: str, value: str) -> tuple[str, str]:
    return (file, value.split()[0]) if file in KEYED_BY_DEVICE else (file, "")


def merge(old: dict[str, Any], changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Limits as JSON (all of them, or only those given) with the changes over them; per-device
    lists merge by device."""
    merged = {
        section: dict(values) if isinstance(values, dict) else values for section, values in old.items()
    }
    for section, fields in changes.items():
        for key, value in fields.items():
            if section == "io":
                given = Limits.model_validate({"io": {key: value}}).io.model_dump(mode="json")[key]
                io = merged.setdefault("io", {})
                kept = [
                    entry for entry in io.get(key, []) if entry["device"] not in {e["device"] for e in given}
                ]
                io[key] = kept + given
            else:
                merged.setdefault(section, {})[key] = value
    return merged


def _restore(group: fs.Cgroup, file: str, written: str, previous: str) -> None:
    """Put back what a file held before we wrote `written` to it."""
    if file not in KEYED_BY_DEVICE:
        group.write(file, previous.strip())
        return
    device = written.split()[0]
    line = next((line for line in previous.splitlines() if line.split()[0] == device), None)
    if line is not None:
        group.write(file, line)
    elif file == "io.max":
        group.write(file, f"{device} {IO_MAX_UNLIMITED}")
