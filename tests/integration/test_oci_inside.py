"""The container's inside as config.json describes it, read from inside: a prepared root with its own
mounts, process attributes (rlimits, groups, umask, oom_score_adj, domain name, personality),
explicit capability sets, masked paths, sysctls, device nodes and rules, joined namespaces and
uid/gid mappings."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl.policy import PolicySet
from cgctl.runtime import supervisor
from cgctl.spec import CAPABILITIES, WorkloadSpec
from tests import oci
from tests.integration.workloads import CGCTL_ROOT, STATE_DIR, cgctl_in_process, wait_for

pytestmark = pytest.mark.usefixtures("no_leaks")
Capture = pytest.CaptureFixture[str]

# runc's default mounts (those `runc spec` writes), as config.json gives them.
NO_DEVICES = ["nosuid", "noexec", "nodev"]


def mount(destination: str, kind: str, source: str, *options: str) -> dict[str, object]:
    return {"destination": destination, "type": kind, "source": source, "options": list(options)}


OCI_MOUNTS = [
    mount("/proc", "proc", "proc"),
    mount("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
    mount("/dev/pts", "devpts", "devpts", "nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"),
    mount("/dev/shm", "tmpfs", "shm", *NO_DEVICES, "mode=1777", "size=65536k"),
    mount("/dev/mqueue", "mqueue", "mqueue", *NO_DEVICES),
    mount("/sys", "sysfs", "sysfs", *NO_DEVICES, "ro"),
    mount("/sys/fs/cgroup", "cgroup", "cgroup", *NO_DEVICES, "relatime", "ro"),
]


@pytest.fixture
def root() -> Iterator[Path]:
    """A busybox root directory, reachable by any uid (a mapped root included)."""
    with tempfile.TemporaryDirectory(prefix="oci-inside-", dir="/tmp") as top:
        os.chmod(top, 0o755)
        path = Path(top) / "rootfs"
        with tarfile.open(fileobj=io.BytesIO(oci.tar_bytes(oci.busybox_layer()))) as archive:
            archive.extractall(path)
        for directory in ("proc", "sys", "dev", "tmp"):
            (path / directory).mkdir(exist_ok=True)
        os.chmod(path, 0o755)
        yield path


def run(capfd: Capture, root: Path, script: str, **fields: object) -> str:
    """Run script in a busybox sh in root; its stdout (its exit status must be 0)."""
    capfd.readouterr()
    command = ["/bin/sh", "-c", script]
    spec = WorkloadSpec.model_validate(
        {"command": command, "rootfs": {"path": str(root)}, "env": {"PATH": "/bin"}, **fields}
    )
    report = supervisor.run(spec, policies=PolicySet())
    out, err = capfd.readouterr()
    assert report.exit_code == 0, f"exit {report.exit_code}: {err}"
    return out


def mount_points(mountinfo: str) -> dict[str, str]:
    """mount point -> 'fstype options' from a mountinfo dump."""
    found = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 6 and " - " in line:
            fstype = line.split(" - ")[1].split()[0]
            found[fields[4]] = f"{fstype} {fields[5]}"
    return found


def test_a_prepared_root_gets_exactly_its_own_mounts(capfd: Capture, root: Path) -> None:
    shared = root.parent / "shared"
    shared.mkdir()
    (shared / "note").write_text("hello")
    mounts = [*OCI_MOUNTS, mount("/data", "bind", str(shared), "rbind", "ro")]
    script = (
        "cat /proc/self/mountinfo; echo ---; cat /data/note; echo; "
        "touch /data/x 2>/dev/null && echo data-writable; touch /newfile 2>/dev/null && echo root-writable; "
        "echo x > /dev/null && echo null-ok; ls /dev"
    )
    out = run(capfd, root, script, mounts=mounts, rootfs={"path": str(root), "read_only": True})
    mountinfo, rest = out.split("---\n")
    points = mount_points(mountinfo)
    for given in OCI_MOUNTS:
        assert given["destination"] in points, (given, points)
    assert points["/sys/fs/cgroup"].startswith("cgroup2 ro"), points
    assert points["/data"].split()[1].startswith("ro"), points
    assert points["/"].split()[1].startswith("ro"), points
    assert "/tmp" not in points, "the built-in /tmp is not mounted when the spec gives its mounts"
    lines = rest.split()
    assert lines[:2] == ["hello", "null-ok"], rest
    expected = {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "fd", "pts", "shm", "mqueue"}
    assert expected <= set(lines), lines
    assert not (root / "newfile").exists()


def test_a_bind_destination_symlinked_out_of_the_root_stays_inside(
    capfd: pytest.CaptureFixture[str], root: Path
) -> None:
    shared = root.parent / "shared"
    shared.mkdir()
    (shared / "note").write_text("inside")
    outside = root.parent / "outside"
    outside.mkdir()
    (root / "escape").symlink_to("../../../../" + str(outside).lstrip("/"))
    mounts = [*OCI_MOUNTS, mount("/escape", "bind", str(shared), "bind")]
    out = run(capfd, root, "cat /escape/note", mounts=mounts)
    assert out == "inside"
    assert list(outside.iterdir()) == [], "the bind must not land outside the root"


def test_process_attributes_are_seen_inside(capfd: Capture, root: Path) -> None:
    script = (
        "ulimit -n; ulimit -Hn; id -G; umask; cat /proc/self/oom_score_adj /proc/sys/kernel/domainname; "
        "busybox uname -m"
    )
    out = run(
        capfd,
        root,
        script,
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}],
        additional_gids=[10, 20],
        umask=0o027,
        oom_score_adj=321,
        domainname="example.org",
        personality="LINUX32",
    )
    assert out.split("\n")[:7] == ["123", "456", "0 10 20", "0027", "321", "example.org", "i686"], out


def test_explicit_capability_sets_are_taken_as_they_are(capfd: Capture, root: Path) -> None:
    sets = {
        "bounding": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_KILL"],
        "permitted": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"],
        "effective": ["CAP_CHOWN"],
        "inheritable": ["CAP_NET_BIND_SERVICE"],
        "ambient": ["CAP_NET_BIND_SERVICE"],
    }
    out = run(capfd, root, "grep ^Cap /proc/self/status", user="65534", security={"capability_sets": sets})
    caps = {line.split(":")[0]: int(line.split()[1], 16) for line in out.splitlines()}

    def mask(names: list[str]) -> int:
        return sum(1 << CAPABILITIES.index(name) for name in names)

    # A non-root exec keeps the ambient set as its permitted and effective ones.
    assert caps == {
        "CapInh": mask(sets["inheritable"]),
        "CapPrm": mask(sets["ambient"]),
        "CapEff": mask(sets["ambient"]),
        "CapBnd": mask(sets["bounding"]),
        "CapAmb": mask(sets["ambient"]),
    }, out


def test_masked_and_read_only_paths_are_exactly_those_given(capfd: Capture, root: Path) -> None:
    security = {"masked_paths": ["/proc/version"], "readonly_paths": ["/proc/sys"]}
    out = run(capfd, root, "cat /proc/version; echo ---; cat /proc/self/mountinfo", security=security)
    version, mountinfo = out.split("---\n")
    assert version == ""
    points = mount_points(mountinfo)
    assert points["/proc/sys"].split()[1].startswith("ro"), points
    assert "/proc/kcore" not in points and "/proc/keys" not in points, "the defaults are replaced"


def test_namespaced_sysctls_are_set_inside(capfd: Capture, root: Path) -> None:
    sysctl = {"net.ipv4.ip_forward": "1", "kernel.shmmax": "123456"}
    script = "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmax"
    out = run(capfd, root, script, security={"sysctl": sysctl})
    assert out.split() == ["1", "123456"]
    assert Path("/proc/sys/kernel/shmmax").read_text().strip() != "123456"


def test_device_nodes_are_made_and_the_rules_replace_the_defaults(
    capfd: pytest.CaptureFixture[str], root: Path
) -> None:
    security = {
        "device_nodes": [{"path": "/dev/myzero", "type": "c", "major": 1, "minor": 5, "file_mode": 0o600}],
        "device_rules": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        ],
    }
    script = (
        "busybox stat -c '%a %t:%T' /dev/myzero; busybox head -c 4 /dev/myzero | busybox wc -c; "
        "echo x > /dev/null && echo null-ok; busybox head -c 1 /dev/urandom 2>/dev/null | busybox wc -c"
    )
    out = run(capfd, root, script, security=security)
    assert out.split() == ["600", "1:5", "4", "null-ok", "0"], out


def test_a_joined_namespace_is_the_workloads(capfd: Capture, root: Path) -> None:
    holder = subprocess.Popen(["unshare", "--uts", "sh", "-c", "hostname joined-uts && exec sleep 60"])
    try:
        path = f"/proc/{holder.pid}/ns/uts"
        deadline = 200
        while os.readlink(path) == os.readlink("/proc/self/ns/uts") or _hostname(holder.pid) != "joined-uts":
            deadline -= 1
            assert deadline, "the holder never made its namespace"
            subprocess.run(["sleep", "0.05"], check=True)
        out = run(capfd, root, "busybox hostname", namespaces={"join": {"uts": path}})
        assert out.strip() == "joined-uts"
    finally:
        holder.kill()
        holder.wait(timeout=10)


def _hostname(pid: int) -> str:
    found = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True)
    return found.stdout.strip()


def test_uid_and_gid_mappings_are_written_for_the_workload(capfd: Capture, root: Path) -> None:
    mapping = [{"container_id": 0, "host_id": 100000, "size": 65536}]
    namespaces = {"user": True, "uid_mappings": mapping, "gid_mappings": mapping}
    script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; busybox stat -c %u /bin/busybox"
    # Its own mounts, made before pivot_root: the kernel lets a user namespace mount sysfs only while
    # a full one is still visible in its mount namespace.
    out = run(capfd, root, script, namespaces=namespaces, mounts=OCI_MOUNTS)
    # The root's files belong to the host's root, which the namespace does not map.
    assert out.split() == ["0", "100000", "65536", "0", "100000", "65536", "0", "65534"], out


def test_exec_gets_the_containers_groups_rlimits_umask_and_capability_sets(
    capfd: Capture, root: Path
) -> None:
    name = "oci-inside-exec"
    fields = {
        "name": name,
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 88}],
        "additional_gids": [30],
        "umask": 0o077,
        "security": {"capability_sets": {"bounding": ["CAP_KILL"], "permitted": ["CAP_KILL"]}},
    }
    spec = WorkloadSpec.model_validate(
        {"command": ["/bin/sleep", "1000"], "rootfs": {"path": str(root)}, **fields}
    )
    runner = threading.Thread(target=supervisor.run, args=(spec,), kwargs={"policies": PolicySet()})
    runner.start()
    try:
        record = STATE_DIR / f"{name}.json"
        wait_for(lambda: record.exists() and b'"pid"' in record.read_bytes(), "the container's init")
        script = "id -G; ulimit -n; umask; grep CapBnd /proc/self/status"
        status, out, err = cgctl_in_process(capfd, "exec", name, "--", "/bin/sh", "-c", script)
        assert status == 0, err
        assert out.split() == [
            "0",
            "30",
            "77",
            "0077",
            "CapBnd:",
            f"{1 << CAPABILITIES.index('CAP_KILL'):016x}",
        ]
    finally:
        (CGCTL_ROOT / name / "cgroup.kill").write_text("1")
        runner.join(timeout=120)
    assert not runner.is_alive()
