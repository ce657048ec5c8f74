"""The io controller: io.max caps and io.weight per device, devices named by path or MAJ:MIN."""

from __future__ import annotations

import os
import re
import stat as stat_mode
from pathlib import Path
from typing import TYPE_CHECKING

from cgctl import limits as limits_table
from cgctl.cgroup.fs import Cgroup

if TYPE_CHECKING:  # accounting reads device names through here, and `cgctl stats` needs no pydantic
    from cgctl.spec import IoLimits

CONTROLLER = "io"
IO_MAX, IO_WEIGHT = limits_table.row("io", "max").file, limits_table.row("io", "weight").file
SYS_DEV_BLOCK = Path("/sys/dev/block")
_MAJOR_MINOR = re.compile(r"^\d+:\d+$")


def device_number(device: str, field: tuple[str | int, ...], sys_dev_block: Path = SYS_DEV_BLOCK) -> str:
    """'MAJ:MIN' of a whole-disk block device given as a path or as MAJ:MIN."""
    from cgctl.spec import SpecError

    if _MAJOR_MINOR.match(device):
        number = device
    else:
        try:
            mode = os.stat(device)
        except OSError as error:
            raise SpecError(field, device, f"cannot use the device: {error.strerror}") from None
        if not stat_mode.S_ISBLK(mode.st_mode):
            raise SpecError(field, device, "not a block device")
        number = f"{os.major(mode.st_rdev)}:{os.minor(mode.st_rdev)}"
    entry = sys_dev_block / number
    if not entry.exists():
        raise SpecError(field, device, f"no block device {number} on this host (see lsblk)")
    if (entry / "partition").exists():
        disk = entry.resolve().parent.name
        raise SpecError(field, device, f"a partition; IO limits apply to whole disks: use /dev/{disk}")
    return number


def settings(limits: IoLimits, unified: Cgroup, sys_dev_block: Path = SYS_DEV_BLOCK) -> list[tuple[str, str]]:
    """io.max and io.weight lines, one per device; devices resolved to MAJ:MIN and checked."""
    from cgctl.spec import SpecError

    lines = []
    for index, cap in enumerate(limits.max):
        number = device_number(cap.device, ("limits", "io", "max", index), sys_dev_block)
        keys = {"rbps": cap.rbps, "wbps": cap.wbps, "riops": cap.riops, "wiops": cap.wiops}
        lines.append((IO_MAX, " ".join([number, *(f"{k}={v}" for k, v in keys.items() if v is not None)])))
    for index, weight in enumerate(limits.weight):
        target = "default"
        if weight.device is not None:
            field = ("limits", "io", "weight", index)
            target = device_number(weight.device, field, sys_dev_block)
            if not iocost_enabled(unified, target):
                raise SpecError(
                    field,
                    weight.device,
                    f"a per-device io.weight needs the io.cost controller on {target}: as root, "
                    f"echo '{target} enable=1' > {unified.file('io.cost.qos')} (with the BFQ scheduler, "
                    "use --cgroup-set io.bfq.weight=...)",
                )
        lines.append((IO_WEIGHT, f"{target} {weight.weight}"))
    return lines


def iocost_enabled(unified: Cgroup, device: str) -> bool:
    """Whether io.cost (which implements io.weight) is switched on for the device."""
    if not unified.has("io.cost.qos"):
        return False
    return any(
        line.startswith(f"{device} ") and " enable=1" in line
        for line in unified.read("io.cost.qos").splitlines()
    )


def device_name(number: str, sys_dev_block: Path = SYS_DEV_BLOCK) -> str | None:
    try:
        uevent = (sys_dev_block / number / "uevent").read_text()
    except OSError:
        return None
    return next((line[8:] for line in uevent.splitlines() if line.startswith("DEVNAME=")), None)
