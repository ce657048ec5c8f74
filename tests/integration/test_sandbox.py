"""The default sandbox, tried from inside: every escape a root (or non-root) workload might attempt fails,
its limits stay in force afterwards, and what containers legitimately do keeps working."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cgctl.spec import CAPABILITIES, DEFAULT_CAPABILITIES
from tests import oci
from tests.integration.test_images import tmpfs
from tests.integration.workloads import MiB, cgctl_in_process

pytestmark = pytest.mark.usefixtures("no_leaks")

DISK = os.environ.get("CGCTL_VM_DISK", "/dev/vda")
SYSTEM_PYTHON = "/usr/bin/python3"  # reachable by any user (the venv's Python may live under /root, 0700)
LIMITS = ["--mem", "64M", "--pids", "64"]
# What each workload prints after its attempt: its own limits, read from inside.
LIMITS_AFTER = "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max"
HELD = ["held", str(64 * MiB), "64"]


def mask(names: list[str] | tuple[str, ...]) -> int:
    return sum(1 << CAPABILITIES.index(name) for name in names)


def status_field(text: str, field: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.startswith(f"{field}:"))


def disk_numbers() -> tuple[int, int]:
    major, minor = Path(f"/sys/class/block/{Path(DISK).name}/dev").read_text().split(":")
    return int(major), int(minor)


def syscall(number: int, *args: int) -> str:
    """Python code printing ok if the raw system call succeeds, else its errno's name (no single quotes:
    the shell scripts below quote it with them)."""
    return (
        "import ctypes, errno; libc = ctypes.CDLL(None, use_errno=True); "
        f"r = libc.syscall({number}, {', '.join(map(str, args)) or '0'}); "
        'print("ok" if r >= 0 else errno.errorcode[ctypes.get_errno()])'
    )


# (name, a shell command that succeeds only if the escape worked); x86_64 system call numbers.
MAJOR, MINOR = disk_numbers() if Path(DISK).exists() else (254, 0)
ATTEMPTS = {
    "module load": "modprobe dummy && test -d /sys/module/dummy",
    "sysctl write": "echo 17 > /proc/sys/vm/swappiness",
    "sysctl write through a fresh proc": "d=$(mktemp -d) && mount -t proc proc $d && "
    "echo 17 > $d/sys/vm/swappiness",
    "sysrq": "echo h > /proc/sysrq-trigger",
    "kcore read": "test $(head -c 16 /proc/kcore | wc -c) -gt 0",
    "remount /sys read-write": "mount -o remount,rw /sys",
    "remount /proc/sys read-write": "mount -o remount,bind,rw /proc/sys",
    "remount cgroup files read-write": "mount -o remount,rw /sys/fs/cgroup",
    "fresh sysfs": "d=$(mktemp -d) && mount -t sysfs sysfs $d",
    "fresh cgroup2": "d=$(mktemp -d) && mount -t cgroup2 none $d",
    "unmount a mask": "umount /proc/kcore",
    "mknod and read the disk": f"d=$(mktemp -d) && mknod $d/disk b {MAJOR} {MINOR} && "
    "head -c 512 $d/disk | wc -c | grep -qx 512",
    "read the host's disk node": f"head -c 512 {DISK} | wc -c | grep -qx 512",
    "raise memory.max": "echo max > /sys/fs/cgroup/memory.max",
    "raise pids.max": "echo max > /sys/fs/cgroup/pids.max",
    "a cgroup of its own": "mkdir /sys/fs/cgroup/escape",
    "kexec_load": f"{SYSTEM_PYTHON} -S -c '{syscall(246, 0, 0, 0, 0)}' | grep -qx ok",
    "bpf": f"{SYSTEM_PYTHON} -S -c '{syscall(321, 0, 0, 0)}' | grep -qx ok",
    "keyctl": f"{SYSTEM_PYTHON} -S -c '{syscall(250, 0, 0)}' | grep -qx ok",
    "perf_event_open": f"{SYSTEM_PYTHON} -S -c '{syscall(298, 0, 0, -1, -1, 0)}' | grep -qx ok",
    "unshare a user namespace": f"{SYSTEM_PYTHON} -S -c '{syscall(272, 0x10000000)}' | grep -qx ok",
}


@pytest.fixture(scope="module", autouse=True)
def nothing_loaded_before() -> None:
    assert not Path("/sys/module/dummy").exists(), (
        "the dummy module is loaded already: the test proves nothing"
    )


@pytest.mark.parametrize("user", ["root", "nobody"])
@pytest.mark.parametrize("attempt", list(ATTEMPTS))
def test_escape_fails_and_the_limits_hold(
    capfd: pytest.CaptureFixture[str], attempt: str, user: str, tmp_path: Path
) -> None:
    swappiness = Path("/proc/sys/vm/swappiness").read_text()
    script = (
        f"if ({ATTEMPTS[attempt]}) >/dev/null 2>&1; then echo ESCAPED; else echo held; fi; {LIMITS_AFTER}"
    )
    status, out, err = cgctl_in_process(
        capfd, "run", *LIMITS, "--user", user, "--workdir", "/", "--", "sh", "-c", script
    )
    assert status == 0, err
    assert out.split() == HELD, out
    assert not Path("/sys/module/dummy").exists()
    assert Path("/proc/sys/vm/swappiness").read_text() == swappiness


# Attempts that work without the sandbox and harm nothing outside the container: run with --privileged,
# they must escape, or the scripts above could be "held" by their own mistakes.
HARMLESS_WITHOUT_SANDBOX = [
    "kcore read", "read the host's disk node", "mknod and read the disk", "fresh sysfs", "fresh cgroup2",
    "remount /sys read-write", "unshare a user namespace", "sysrq",
]  # fmt: skip


@pytest.mark.parametrize("attempt", HARMLESS_WITHOUT_SANDBOX)
def test_the_same_attempt_escapes_when_privileged(capfd: pytest.CaptureFixture[str], attempt: str) -> None:
    script = ATTEMPTS[attempt].replace("umount /proc/kcore", "umount /proc")  # no mask to unmount
    check = f"if ({script}) >/dev/null 2>&1; then echo ESCAPED; else echo held; fi"
    status, out, err = cgctl_in_process(
        capfd, "run", "--privileged", "--workdir", "/", "--", "sh", "-c", check
    )
    assert (status, out) == (0, "ESCAPED\n"), err


def test_the_blocked_system_calls_answer_eperm(capfd: pytest.CaptureFixture[str]) -> None:
    calls = {"kexec_load": (246, 0, 0, 0, 0), "bpf": (321, 0, 0, 0), "keyctl": (250, 0, 0),
             "perf_event_open": (298, 0, 0, -1, -1, 0), "unshare(CLONE_NEWUSER)": (272, 0x10000000),
             "init_module": (175, 0, 0, 0), "clone3": (435, 0, 0)}  # fmt: skip
    script = "; ".join(f"{SYSTEM_PYTHON} -S -c '{syscall(*call)}'" for call in calls.values())
    status, out, err = cgctl_in_process(capfd, "run", "--", "sh", "-c", script)
    assert status == 0, err
    answers = dict(zip(calls, out.split(), strict=True))
    assert answers == {name: "ENOSYS" if name == "clone3" else "EPERM" for name in calls}, answers


def test_root_keeps_dockers_default_capabilities_and_nobody_none(capfd: pytest.CaptureFixture[str]) -> None:
    status, out, err = cgctl_in_process(capfd, "run", "--", "cat", "/proc/self/status")
    assert status == 0, err
    default = mask(DEFAULT_CAPABILITIES)
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd"):
        assert int(status_field(out, field), 16) == default, field
    assert int(status_field(out, "CapAmb"), 16) == 0
    assert (status_field(out, "NoNewPrivs"), status_field(out, "Seccomp")) == ("1", "2")

    status, out, err = cgctl_in_process(capfd, "run", "--user", "nobody", "--", "cat", "/proc/self/status")
    assert status == 0, err
    assert [int(status_field(out, f), 16) for f in ("CapInh", "CapPrm", "CapEff", "CapAmb")] == [0, 0, 0, 0]
    assert int(status_field(out, "CapBnd"), 16) == default
    assert (status_field(out, "NoNewPrivs"), status_field(out, "Seccomp")) == ("1", "2")


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_allow_new_privileges_keeps_the_filter_and_the_capabilities(
    capfd: pytest.CaptureFixture[str], user: str
) -> None:
    # Without no_new_privs the filter goes in before the capabilities are dropped: it must still be there.
    argv = ["run", "--allow-new-privileges", "--user", user, "--", "cat", "/proc/self/status"]
    status, out, err = cgctl_in_process(capfd, *argv)
    assert status == 0, err
    assert (status_field(out, "NoNewPrivs"), status_field(out, "Seccomp")) == ("0", "2")
    assert int(status_field(out, "CapEff"), 16) == (mask(DEFAULT_CAPABILITIES) if user == "root" else 0)
    assert int(status_field(out, "CapBnd"), 16) == mask(DEFAULT_CAPABILITIES)


def test_kernel_paths_are_masked_and_read_only(capfd: pytest.CaptureFixture[str]) -> None:
    script = (
        "wc -c < /proc/kcore; ls /sys/firmware | wc -l; ls /proc/acpi 2>/dev/null | wc -l; "
        "for p in /proc/sys /proc/sysrq-trigger /proc/irq /proc/bus /proc/fs /sys /sys/fs/cgroup; do "
        "awk -v p=$p '$5 == p {o = $6} END {print p, substr(o, 1, 2)}' /proc/self/mountinfo; done"
    )
    status, out, err = cgctl_in_process(capfd, "run", "--", "sh", "-c", script)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["0", "0", "0"], out
    assert all(line.endswith(" ro") for line in lines[3:]) and len(lines) == 10, out


def test_a_device_node_shipped_in_an_image_cannot_be_opened(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmpfs(tmp_path / "store")
    monkeypatch.setenv("CGCTL_IMAGE_STORE", str(store))
    try:
        layer = oci.busybox_layer(
            oci.directory("nodes"),
            oci.device("nodes/disk", MAJOR, MINOR, block=True),
            oci.device("nodes/mem", 1, 1),
            oci.device("nodes/null", 1, 3),
        )
        oci.write_oci_layout(tmp_path / "nodes", [layer], Cmd=["/bin/sh"], Env=["PATH=/bin"])
        status, _, err = cgctl_in_process(capfd, "image", "import", str(tmp_path / "nodes"), "nodes:1")
        assert status == 0, err
        assert next(store.rglob("nodes/disk")).is_block_device()
        script = (
            "for n in disk mem; do cat /nodes/$n > /dev/null 2>&1 && echo open:$n || echo refused:$n; done; "
            "echo hi > /nodes/null && echo null-works"
        )
        status, out, err = cgctl_in_process(capfd, "run", "--image", "nodes:1", "--", "sh", "-c", script)
        assert status == 0, err
        assert out.split() == ["refused:disk", "refused:mem", "null-works"], out
        # --device binds a granted node into the image's root, at a path of its own.
        read = "busybox head -c 4096 /dev/xvda | busybox wc -c"
        grant = ["--device", f"{DISK}:/dev/xvda:r", "--", "sh", "-c", read]
        status, out, err = cgctl_in_process(capfd, "run", "--image", "nodes:1", *grant)
        assert (status, out.strip()) == (0, "4096"), err
    finally:
        subprocess.run(["umount", "--lazy", str(store)], check=True)


# --- what keeps working ---------------------------------------------------------------------------------


def test_port_80_ping_and_chown_work_as_root(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bind = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 80)); s.listen(); print('bound')"
    script = (
        f'{SYSTEM_PYTHON} -S -c "{bind}"; busybox ping -c 1 -W 5 127.0.0.1 > /dev/null && echo pinged; '
        f"touch /tmp/f && chown 65534:65534 /tmp/f && chmod 600 /tmp/f && stat -c '%u %a' /tmp/f"
    )
    status, out, err = cgctl_in_process(capfd, "run", "--", "sh", "-c", script)
    assert status == 0, err
    assert out.splitlines() == ["bound", "pinged", "65534 600"], out


def test_a_user_namespace_run_is_sandboxed_too(capfd: pytest.CaptureFixture[str]) -> None:
    script = (
        "cat /proc/self/uid_map; grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status; "
        "wc -c < /proc/kcore"
    )
    status, out, err = cgctl_in_process(capfd, "run", "--userns", "--", "sh", "-c", script)
    assert status == 0, err
    words = out.split()
    assert words[:3] == ["0", "0", "1"], out
    assert int(words[words.index("CapEff:") + 1], 16) == mask(DEFAULT_CAPABILITIES)
    assert words[words.index("NoNewPrivs:") + 1] == "1" and words[words.index("Seccomp:") + 1] == "2"
    assert words[-1] == "0"


def test_cap_add_and_cap_drop_all_are_seen_inside(capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["--", "cat", "/proc/self/status"]
    status, out, err = cgctl_in_process(
        capfd, "run", "--cap-add", "net_admin", "--cap-drop", "CAP_CHOWN", *argv
    )
    assert status == 0, err
    expected = mask((set(DEFAULT_CAPABILITIES) - {"CAP_CHOWN"}) | {"CAP_NET_ADMIN"})
    assert int(status_field(out, "CapEff"), 16) == expected
    status, out, err = cgctl_in_process(capfd, "run", "--cap-drop", "ALL", *argv)
    assert status == 0, err
    assert int(status_field(out, "CapEff"), 16) == int(status_field(out, "CapBnd"), 16) == 0

    status, out, err = cgctl_in_process(capfd, "run", "--cap-add", "SYS_TIMETRAVEL", *argv)
    assert status == 125 and "invalid value 'SYS_TIMETRAVEL' for --cap-add" in err


def test_a_profile_denying_one_harmless_call_denies_exactly_it(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    profile = tmp_path / "no-getppid.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
            }
        )
    )
    code = f"{syscall(110)}; import os; print(os.getpid(), os.uname().nodename)"  # 110: getppid
    status, out, err = cgctl_in_process(
        capfd, "run", "--seccomp", str(profile), "--hostname", "inside", "--", SYSTEM_PYTHON, "-S", "-c", code
    )
    assert status == 0, err
    assert out.split() == ["EPERM", "1", "inside"], out  # getppid refused; getpid and uname answer


def test_unconfined_and_privileged_turn_the_sandbox_off(capfd: pytest.CaptureFixture[str]) -> None:
    unshare = syscall(272, 0x10000000)
    status, out, err = cgctl_in_process(
        capfd, "run", "--seccomp", "unconfined", "--", "sh", "-c",
        f"grep Seccomp: /proc/self/status; {SYSTEM_PYTHON} -S -c '{unshare}'",
    )  # fmt: skip
    assert status == 0, err
    assert out.split() == ["Seccomp:", "0", "ok"], out

    script = "cat /proc/self/status; head -c 16 /proc/kcore | wc -c"
    status, out, err = cgctl_in_process(capfd, "run", "--privileged", "--", "sh", "-c", script)
    assert status == 0, err
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert int(status_field(out, "CapEff"), 16) == (1 << (last + 1)) - 1
    assert (status_field(out, "NoNewPrivs"), status_field(out, "Seccomp")) == ("0", "0")
    assert out.split()[-1] == "16"


def test_a_granted_device_is_usable_as_asked(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    read = f"head -c 4096 {DISK} | wc -c"
    write = (
        f"dd if=/dev/zero of={DISK} bs=4096 count=1 oflag=direct status=none && echo wrote || echo refused"
    )
    status, out, err = cgctl_in_process(
        capfd, "run", "--device", f"{DISK}:r", "--", "sh", "-c", f"{read}; {write}"
    )
    assert status == 0, err
    assert out.split() == ["4096", "refused"], out
    status, out, err = cgctl_in_process(capfd, "run", "--device", DISK, "--", "sh", "-c", write)
    assert (status, out) == (0, "wrote\n"), err

    status, _, err = cgctl_in_process(capfd, "run", "--device", str(tmp_path), "--", "true")
    assert status == 125 and f"invalid value '{tmp_path}' for --device" in err


def test_the_report_shows_the_sandbox_in_force(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    status, _, err = cgctl_in_process(
        capfd, "run", "--report", str(report), "--device", f"{DISK}:r", "--", "true"
    )
    assert status == 0, err
    assert json.loads(report.read_text())["sandbox"] == {
        "privileged": False,
        "capabilities": [name for name in CAPABILITIES if name in DEFAULT_CAPABILITIES],
        "no_new_privileges": True,
        "seccomp": "default",
        "masked_paths": True,
        "devices": [f"{DISK}:r"],
    }
    status, _, err = cgctl_in_process(capfd, "run", "--report", str(report), "--privileged", "--", "true")
    assert status == 0, err
    sandbox = json.loads(report.read_text())["sandbox"]
    assert (sandbox["privileged"], sandbox["seccomp"], sandbox["devices"]) == (True, "unconfined", ["all"])


def test_share_mnt_needs_privileged(capfd: pytest.CaptureFixture[str]) -> None:
    status, _, err = cgctl_in_process(capfd, "run", "--share", "mnt", "--", "true")
    assert status == 125 and "--share mnt needs --privileged" in err
    status, out, err = cgctl_in_process(capfd, "run", "--share", "mnt", "--privileged", "--", "echo", "ok")
    assert (status, out) == (0, "ok\n"), err


def test_check_says_the_sandbox_works_here(capfd: pytest.CaptureFixture[str]) -> None:
    status, out, err = cgctl_in_process(capfd, "check", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["seccomp"]["usable"] and report["seccomp"]["libseccomp"]
    assert report["device_program"] == {"usable": True, "problem": None}
