"""What `cgctl-oci events --stats` prints: runc's stats event for a container's cgroup v2.

runc 1.1 reports cgroup v2 in cgroup v1's shapes (types/events.go, filled by libcontainer's fs2):
nanoseconds for CPU times, a memory limit of 2^64-1 for "max", swap as memory plus swap (v1's
memsw), pids.max "max" as a limit of 0, io.stat's rbytes/wbytes and rios/wios as v1's
ioServiceBytesRecursive and ioServicedRecursive. Go's `omitempty` drops zero numbers and empty lists
but never a nested object, which is why `usage`, `throttling` and `cpuset` are always there; maps
come sorted by key as Go writes them, so json.dumps(separators=(",", ":")) gives runc's bytes.

Who reads it: go-runc's Stats runs `runc events --stats`, but containerd 1.6's runc v2 shim (what `ctr
task metrics` and the CRI plugin use) reads the cgroup itself, finding it from the init's
/proc/PID/cgroup under /sys/fs/cgroup, and so does podman (`podman stats`); this event is for other
callers of go-runc and for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgctl.accounting import Container, Snapshot, read_snapshot
from cgctl.cgroup import fs, hugetlb

UNLIMITED = 2**64 - 1  # Go's math.MaxUint64, what runc reads "max" as
# runc's cpuset statistics come from cgroup v1 files only: with v2 they are all zero.
_CPUSET_V1 = (
    "cpu_exclusive", "mem_hardwall", "mem_exclusive", "memory_migrate", "memory_spread_page",
    "memory_spread_slab", "memory_pressure", "sched_load_balance", "sched_relax_domain_level",
)  # fmt: skip
_IO_TABLES = {"rbytes": ("ioServiceBytesRecursive", "Read"), "wbytes": ("ioServiceBytesRecursive", "Write"),
              "rios": ("ioServicedRecursive", "Read"), "wios": ("ioServicedRecursive", "Write")}  # fmt: skip


def stats(container_id: str, group: fs.Cgroup, hugepages: Path = hugetlb.HUGEPAGES) -> dict[str, Any] | None:
    """The `{"type": "stats", "id": ..., "data": ...}` event for the cgroup; None if it is gone."""
    snap = read_snapshot(Container(container_id, container_id, group.path, None))
    if snap is None:
        return None
    data = {
        "cpu": _cpu(snap),
        "cpuset": dict.fromkeys(_CPUSET_V1, 0),
        "memory": _memory(snap),
        "pids": _nonzero(current=_int(snap, "pids.current"), limit=_int(snap, "pids.max")),
        "blkio": _blkio(group.read_optional("io.stat") or ""),
        "hugetlb": _hugetlb(group, hugepages),
        "intel_rdt": {},
        "network_interfaces": None,
    }
    return {"type": "stats", "id": container_id, "data": data}


def _int(snap: Snapshot, file: str, key: str = "") -> int:
    value = snap.value(file, key)
    return 0 if value is None else int(value)


def _nonzero(**values: Any) -> dict[str, Any]:
    """Go's omitempty: zeros and empty lists left out."""
    return {key: value for key, value in values.items() if value}


def _cpu(snap: Snapshot) -> dict[str, Any]:
    def nanoseconds(key: str) -> int:
        return _int(snap, "cpu.stat", key) * 1000

    return {
        "usage": _nonzero(total=nanoseconds("usage_usec"))
        | {"kernel": nanoseconds("system_usec"), "user": nanoseconds("user_usec")},
        "throttling": _nonzero(
            periods=_int(snap, "cpu.stat", "nr_periods"),
            throttledPeriods=_int(snap, "cpu.stat", "nr_throttled"),
            throttledTime=nanoseconds("throttled_usec"),
        ),
    }


def _memory(snap: Snapshot) -> dict[str, Any]:
    """memory.current/max as usage, and swap as memory plus swap (cgroup v1's memsw), as runc does."""
    empty = {"limit": 0, "failcnt": 0}
    if "memory.current" not in snap.files:  # no memory controller here: runc leaves all at zero
        return {"usage": empty, "swap": empty, "kernel": empty, "kernelTCP": empty}
    usage, limit = _int(snap, "memory.current"), _limit(snap, "memory.max")
    if "memory.swap.current" in snap.files:
        swap_usage, swap_limit = _int(snap, "memory.swap.current"), _limit(snap, "memory.swap.max")
    else:  # no swap accounting in this kernel
        swap_usage, swap_limit = 0, 0
    if swap_limit != UNLIMITED:
        swap_limit = min(swap_limit + limit, UNLIMITED)
    raw = {key: int(value) for key, value in sorted(snap.files.get("memory.stat", {}).items())}
    return (
        _nonzero(cache=raw.get("file", 0))
        | {
            "usage": {"limit": limit} | _nonzero(usage=usage) | {"failcnt": 0},
            "swap": {"limit": swap_limit} | _nonzero(usage=usage + swap_usage) | {"failcnt": 0},
            "kernel": empty,
            "kernelTCP": empty,
        }
        | _nonzero(raw=raw)
    )


def _limit(snap: Snapshot, file: str) -> int:
    """A limit file's value; read_snapshot leaves "max" out, which runc reads as 2^64-1."""
    return UNLIMITED if snap.value(file) is None else _int(snap, file)


def _blkio(io_stat: str) -> dict[str, Any]:
    """io.stat in cgroup v1's tables, by device number; the keys v1 had no table for are left out."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for number, values in fs.parse_nested(io_stat).items():
        major, _, minor = number.partition(":")
        for key, value in values.items():
            if key in _IO_TABLES:
                table, op = _IO_TABLES[key]
                entry = _nonzero(major=int(major), minor=int(minor), op=op, value=int(value))
                tables.setdefault(table, []).append(entry)
    return tables


def _hugetlb(group: fs.Cgroup, hugepages: Path) -> dict[str, Any]:
    """Per huge page size: usage and failcnt (hugetlb.<size>.events' max); {} without the controller."""
    found = {}
    for size in sorted(hugetlb.page_sizes(hugepages)):
        current = group.read_optional(f"hugetlb.{size}.current")
        events = group.read_optional(f"hugetlb.{size}.events")
        if current is None or events is None:
            break
        found[size] = _nonzero(usage=int(current)) | {"failcnt": int(fs.parse_keyed(events).get("max", 0))}
    return found
