"""CRIU's command lines for an OCI container's checkpoint and restore (the dump and restore themselves
need a kernel: the micro-VM)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from cgctl.cgroup.fs import Cgroup
from cgctl.runtime import oci_checkpoint
from cgctl.runtime.checkpoint import CheckpointError
from cgctl.runtime.oci_checkpoint import CriuOptions, dump_args, restore_args


def config(tmp_path: Path, **linux: Any) -> dict[str, Any]:
    return {
        "process": {"args": ["sh"]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data/", "type": "bind", "source": str(tmp_path), "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "none", "source": "/run/hosts", "options": ["bind"]},
        ],
        "linux": linux,
    }


def pairs(args: list[str], option: str) -> list[str]:
    return [args[index + 1] for index, arg in enumerate(args) if arg == option]


def test_dump_marks_binds_masked_files_devices_and_joined_namespaces_external(tmp_path: Path) -> None:
    netns = tmp_path / "netns"
    netns.write_text("")
    # The pid is this process: its root is the host's, where /etc/hostname is a file and /proc a directory.
    spec = config(
        tmp_path,
        maskedPaths=["/etc/hostname", "/proc", "/no/such/file"],
        devices=[{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
        namespaces=[{"type": "pid"}, {"type": "network", "path": str(netns)}],
    )
    args = dump_args(
        "criu",
        os.getpid(),
        Cgroup(Path("/sys/fs/cgroup/c")),
        Path("/b/rootfs"),
        spec,
        CriuOptions(tmp_path / "img"),
    )
    assert args[:4] == ["criu", "dump", "--tree", str(os.getpid())]
    assert pairs(args, "--root") == ["/b/rootfs"]
    assert pairs(args, "--freeze-cgroup") == ["/sys/fs/cgroup/c"]
    assert pairs(args, "--ext-mount-map") == [
        "/data:/data",
        "/etc/hosts:/etc/hosts",
        "/etc/hostname:/dev/null",
        "/dev/fuse:/dev/fuse",
        "auto",
    ]
    assert pairs(args, "--external") == [f"net[{netns.stat().st_ino}]:extRootNetNS"]
    assert "--manage-cgroups=ignore" in args and "--leave-running" not in args and "--work-dir" not in args


def test_dump_options_are_runcs(tmp_path: Path) -> None:
    options = CriuOptions(
        tmp_path / "img",
        work_path=tmp_path / "work",
        leave_running=True,
        tcp_established=True,
        ext_unix_sk=True,
        shell_job=True,
        file_locks=True,
        auto_dedup=True,
    )
    args = dump_args("criu", 1, Cgroup(Path("/g")), Path("/r"), {}, options)
    for flag in (
        "--leave-running",
        "--tcp-established",
        "--ext-unix-sk",
        "--shell-job",
        "--file-locks",
        "--auto-dedup",
    ):
        assert args.count(flag) == 1, flag
    assert pairs(args, "--work-dir") == [str(tmp_path / "work")]
    assert options.log("dump.log") == tmp_path / "work" / "dump.log"
    assert CriuOptions(tmp_path).log("dump.log") == tmp_path / "dump.log"


def test_pre_dump_tracks_memory_and_a_dump_builds_on_its_parent(tmp_path: Path) -> None:
    pre = dump_args(
        "criu",
        1,
        Cgroup(Path("/g")),
        Path("/r"),
        {},
        CriuOptions(tmp_path, pre_dump=True, leave_running=True),
    )
    assert pre[1] == "pre-dump" and pre.count("--track-mem") == 1 and "--leave-running" not in pre
    dump = dump_args(
        "criu", 1, Cgroup(Path("/g")), Path("/r"), {}, CriuOptions(tmp_path, parent_path="../pre")
    )
    assert (
        dump[1] == "dump"
        and pairs(dump, "--prev-images-dir") == ["../pre"]
        and dump.count("--track-mem") == 1
    )


def test_restore_maps_binds_to_the_bundles_sources(tmp_path: Path) -> None:
    spec = config(tmp_path, maskedPaths=["/proc/kcore"], namespaces=[{"type": "mount"}])
    options = CriuOptions(tmp_path / "img", empty_ns=("network",))
    args = restore_args(
        "criu", Path("/m"), Path("/s/pid"), spec, options, {7: "pipe:[338]", 8: "extRootNetNS"}
    )
    assert args[:2] == ["criu", "restore"]
    assert pairs(args, "--root") == ["/m"] and pairs(args, "--pidfile") == ["/s/pid"]
    assert pairs(args, "--ext-mount-map") == [
        f"/data:{tmp_path}",
        "/etc/hosts:/run/hosts",
        "/dev/null:/dev/null",
        "auto",
    ]
    assert pairs(args, "--inherit-fd") == ["fd[7]:pipe:[338]", "fd[8]:extRootNetNS"]
    assert pairs(args, "--empty-ns") == ["net"]
    assert {"--restore-detached", "--restore-sibling", "--manage-cgroups=ignore"} <= set(args)
    assert "--network-lock" not in args  # CRIU takes the dump's and warns about any other


def test_only_the_network_can_be_restored_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--empty-ns ipc: only network"):
        CriuOptions(tmp_path, empty_ns=("ipc",))


def test_restore_without_descriptors_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oci_checkpoint, "_criu", lambda: "criu")
    with pytest.raises(CheckpointError, match="no checkpoint of cgctl-oci or runc here"):
        oci_checkpoint.restore(
            Cgroup(tmp_path / "g"), tmp_path, {}, CriuOptions(tmp_path), {0: 0, 1: 1, 2: 2}
        )
