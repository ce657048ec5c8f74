"""The workload's namespaces, seen from inside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cgctl import runtime
from tests.integration.workloads import PYTHON, spec

pytestmark = pytest.mark.usefixtures("no_leaks")

LOOK_AROUND = r"""
import json, os, socket, sys
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
client = socket.create_connection(listener.getsockname(), timeout=5)
os.makedirs("/mnt/private-test", exist_ok=True)
os.system("mount -t tmpfs none /mnt/private-test")
json.dump({
    "pid": os.getpid(),
    "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "interfaces": [line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]],
    "sys_interfaces": sorted(os.listdir("/sys/class/net")),
    "loopback_works": client.getpeername() == listener.getsockname(),
    "hostname": socket.gethostname(),
    "cgroup": open("/proc/self/cgroup").read(),
    "cgroup_mount": sorted(os.listdir("/sys/fs/cgroup"))[:3],
    "uid_map": open("/proc/self/uid_map").read().split(),
    "namespaces": {ns: os.readlink(f"/proc/self/ns/{ns}")
                   for ns in ("ipc", "mnt", "net", "pid", "uts", "cgroup", "user")},
    "fds": fds,
    "sid": os.getsid(0),
}, open(sys.argv[1], "w"))
"""


def look_around(tmp_path: Path, **fields: object) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "inside.json"
    report = runtime.run(spec([PYTHON, "-S", "-c", LOOK_AROUND, str(out)], **fields))
    assert report.exit_code == 0
    import json

    return json.loads(out.read_text())


def host_namespace(ns: str) -> str:
    return os.readlink(f"/proc/self/ns/{ns}")


def test_by_default_every_namespace_is_private(tmp_path: Path) -> None:
    inside = look_around(tmp_path, name="looker")
    assert inside["pid"] == 1 and inside["processes"] == [1]
    assert inside["interfaces"] == ["lo"] and inside["sys_interfaces"] == ["lo"] and inside["loopback_works"]
    assert inside["hostname"] == "looker"
    assert inside["cgroup"] == "0::/\n"
    assert inside["cgroup_mount"] == ["cgroup.controllers", "cgroup.events", "cgroup.freeze"]
    for ns in ("ipc", "mnt", "net", "pid", "uts", "cgroup"):
        assert inside["namespaces"][ns] != host_namespace(ns), ns
    assert inside["namespaces"]["user"] == host_namespace("user")
    assert inside["fds"] == [0, 1, 2, 3]  # stdio, and 3: the listing of /proc/self/fd itself
    assert inside["sid"] == 1  # a session leader (CRIU needs one)
    assert "/mnt/private-test" not in Path("/proc/self/mounts").read_text()


def test_shared_namespaces_are_the_hosts(tmp_path: Path) -> None:
    inside = look_around(tmp_path, namespaces={"share": ["net", "uts", "pid"]}, hostname="ignored")
    for ns in ("net", "uts", "pid"):
        assert inside["namespaces"][ns] == host_namespace(ns), ns
    assert inside["pid"] != 1
    assert inside["hostname"] == os.uname().nodename


def test_hostname_option(tmp_path: Path) -> None:
    assert look_around(tmp_path, hostname="box.example")["hostname"] == "box.example"


def test_userns_maps_root_inside_to_the_caller(tmp_path: Path) -> None:
    inside = look_around(tmp_path, namespaces={"user": True})
    assert inside["uid_map"] == ["0", str(os.geteuid()), "1"]
    assert inside["namespaces"]["user"] != host_namespace("user")
    assert inside["pid"] == 1 and inside["interfaces"] == ["lo"]
