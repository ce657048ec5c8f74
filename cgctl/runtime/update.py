"""Change a running container's limits: all values checked before any write, rolled back if one fails.

Only what differs from the container's recorded limits is written. The run
record is updated in place (its inode carries the supervisor's lock), and
lists the files written, so the run report read back at the end shows the
limits in force then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgctl import state
from cgctl.accounting import find_container
from cgctl.cgroup import fs
from cgctl.runtime.local import base_controllers, interface_file_settings, limit_settings, needed_controllers
from cgctl.spec import Limits

# Multi-line files keyed by their first word (a device); the rest hold one value.
KEYED_BY_DEVICE = ("io.max", "io.weight")
IO_MAX_UNLIMITED = "rbps=max wbps=max riops=max wiops=max"


def update(name: str, changes: dict[str, dict[str, Any]], state_dir: Path | None = None) -> dict[str, str]:
    """Apply changes (the `limits` fields given) to the running container; returns what the kernel
    now reads back for each file written. Raises LookupError, pydantic's ValidationError, SpecError
    or fs.CgroupError; in every case the container's limits are as they were."""
    Limits.model_validate(changes)  # bad values are refused before anything is looked up
    container = find_container(name, state_dir)
    path = state.record_path(state_dir or state.default_state_dir(), name)
    record = state.read(path)
    old = Limits.model_validate(record["spec"]["limits"])
    new = Limits.model_validate(_merge(record["spec"]["limits"], changes))
    group = fs.Cgroup(container.cgroup)
    unified = fs.open_unified_root(base_controllers(new))
    parent = fs.Cgroup(group.path.parent)
    fs.enable_controllers(parent, needed_controllers(new, unified))

    def settings(limits: Limits) -> list[tuple[str, str]]:
        return limit_settings(limits, unified, parent.path) + interface_file_settings(limits.files, parent)

    before = settings(old)
    to_write = [setting for setting in settings(new) if setting not in before]
    previous = {file: group.read(file) for file, _ in to_write}
    written: list[tuple[str, str]] = []
    try:
        for file, value in to_write:
            group.write(file, value)
            written.append((file, value))
    except fs.CgroupError as error:
        for file, value in reversed(written):
            _restore(group, file, value, previous[file])
        raise fs.CgroupError(f"{error}; the {len(written)} value(s) already written were put back") from None
    record["spec"]["limits"] = new.model_dump(mode="json")
    record["written"] = sorted(set(record.get("written", [])) | {file for file, _ in to_write})
    state.rewrite(path, record)
    return {file: group.read(file).strip() for file, _ in to_write}


def _merge(old: dict[str, Any], changes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The recorded limits with the changes over them; per-device lists merge by device."""
    merged = {
        section: dict(values) if isinstance(values, dict) else values for section, values in old.items()
    }
    for section, fields in changes.items():
        for key, value in fields.items():
            if section == "io":
                given = Limits.model_validate({"io": {key: value}}).io.model_dump(mode="json")[key]
                kept = [
                    entry
                    for entry in merged["io"][key]
                    if entry["device"] not in {e["device"] for e in given}
                ]
                merged["io"][key] = kept + given
            else:
                merged[section][key] = value
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
