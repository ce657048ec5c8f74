"""`cgctl exec` into a running container: its root, pid namespace, hostname, cgroup (and limits) and
sandbox; statuses; the refusals; a container the daemon started; and `exec -it` through a real
terminal (tmux)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import oci
from tests.integration.daemon import Daemon
from tests.integration.tmux import PROMPT, Tmux, cooked, shell_session
from tests.integration.workloads import CGCTL_ROOT, PYTHON, STATE_DIR, cgctl_in_process, wait_for

IMAGE = "execbox:1"
NAME = "box"
CGCTL = [PYTHON, "-m", "cgctl"]
GROUP = CGCTL_ROOT / NAME
MARKER = b"only in the image\n"


def status_field(text: str, name: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.startswith(f"{name}:"))


def init_pid() -> int:
    return int(json.loads((STATE_DIR / f"{NAME}.json").read_text())["pid"])


@pytest.fixture(scope="module")
def image(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """execbox:1 in the daemon's store, which the foreground run uses too (CGCTL_IMAGE_STORE)."""
    layout = tmp_path_factory.mktemp("execbox") / "layout"
    applets = ("hostname", "ps", "tail", "stty", "tty", "kill", "head")
    extra = [*(oci.link(f"bin/{applet}", "busybox") for applet in applets), oci.file("marker", MARKER),
             oci.directory("tmp", 0o1777), oci.directory("mnt")]  # fmt: skip
    oci.write_oci_layout(layout, [oci.busybox_layer(*extra)], Env=["PATH=/bin", "FROM_IMAGE=yes"])
    daemon.api.import_image(str(layout), IMAGE)
    return {"CGCTL_IMAGE_STORE": str(daemon.images)}


@pytest.fixture(scope="module")
def box(image: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A foreground `cgctl run` of the image under 64M and 50 pids (an OOM kill takes one process, not
    the container), whose init sleeps."""
    run = subprocess.Popen(
        [*CGCTL, "run", "--name", NAME, "--image", IMAGE, "--mem", "64M", "--pids", "50", "--no-oom-group",
         "--", "sleep", "100000"],
        stdin=subprocess.DEVNULL, env={**os.environ, **image},
    )  # fmt: skip
    record = STATE_DIR / f"{NAME}.json"
    wait_for(lambda: record.exists() and b'"pid"' in record.read_bytes(), "the container's init")
    yield run
    (GROUP / "cgroup.kill").write_text("1")
    run.wait(timeout=120)


def exec_(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return cgctl_in_process(capfd, "exec", *args)


def test_it_sees_the_containers_root_pid_namespace_and_hostname(
    capfd: pytest.CaptureFixture[str], box: subprocess.Popen[bytes]
) -> None:
    script = "cat /marker; cat /proc/1/cmdline; echo; echo pid=$$; hostname; ps -o pid,args | grep -c ."
    status, out, err = exec_(capfd, NAME, "--", "sh", "-c", script)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].encode() + b"\n" == MARKER
    assert lines[1] == "sleep\x00100000\x00"  # pid 1 is the container's init
    assert 1 < int(lines[2].removeprefix("pid=")) < 20  # a small pid of the container's namespace
    assert lines[3] == NAME
    assert int(lines[4]) <= 6  # ps's header, sleep, sh, ps, grep: the host's processes are not seen


def command_line(pid: int) -> bytes:
    """Its argv, or nothing once it has ended (exec's joining child exits as soon as it has forked)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def parent_of(pid: int) -> int:
    return int(status_field(Path(f"/proc/{pid}/status").read_text(), "PPid"))


def test_it_is_counted_in_the_containers_cgroup_and_outlives_a_killed_cgctl(
    box: subprocess.Popen[bytes],
) -> None:
    before = int((GROUP / "pids.current").read_text())
    client = subprocess.Popen([*CGCTL, "exec", NAME, "--", "sleep", "300"], stdin=subprocess.DEVNULL)
    found: list[int] = []

    def sleeping() -> bool:
        procs = map(int, (GROUP / "cgroup.procs").read_text().split())
        found[:] = [pid for pid in procs if command_line(pid) == b"sleep\x00300\x00"]
        return bool(found) and parent_of(found[0]) == client.pid

    try:
        wait_for(sleeping, "the exec'd sleep in the container's cgroup, a child of cgctl exec")
        (sleeper,) = found
        assert int((GROUP / "pids.current").read_text()) == before + 1
        client.kill()  # SIGKILL: cgctl exec cannot pass the process on to anyone
        client.wait()
        wait_for(lambda: parent_of(sleeper) != client.pid, "the sleep to be reparented")
        # It lives on in the container's cgroup, the child of the caller's reaper (the VM's init): the
        # kernel does not reparent across pid namespaces to the container's init.
        print(f"after cgctl exec was killed, the exec'd sleep's parent is pid {parent_of(sleeper)}")
        assert sleeper in map(int, (GROUP / "cgroup.procs").read_text().split())
        os.kill(sleeper, signal.SIGKILL)
        wait_for(lambda: int((GROUP / "pids.current").read_text()) == before, "pids.current back")
    finally:
        client.kill()


def test_it_gets_the_containers_sandbox(
    capfd: pytest.CaptureFixture[str], box: subprocess.Popen[bytes]
) -> None:
    script = "mount -t tmpfs x /mnt 2>/dev/null && echo mounted || echo refused; cat /proc/self/status"
    status, out, err = exec_(capfd, NAME, "--", "sh", "-c", script)
    assert status == 0, err
    assert out.splitlines()[0] == "refused"
    init = Path(f"/proc/{init_pid()}/status").read_text()
    for field in ("CapEff", "CapBnd", "CapPrm", "NoNewPrivs", "Seccomp"):
        assert status_field(out, field) == status_field(init, field), field
    assert (status_field(out, "NoNewPrivs"), status_field(out, "Seccomp")) == ("1", "2")


def test_a_memory_hog_is_oom_killed_under_the_containers_limit(
    capfd: pytest.CaptureFixture[str], box: subprocess.Popen[bytes]
) -> None:
    def oom_kills() -> int:
        events = dict(line.split() for line in (GROUP / "memory.events").read_text().splitlines())
        return int(events["oom_kill"])

    before = oom_kills()
    status, _, err = exec_(capfd, NAME, "--", "tail", "/dev/zero")  # one endless line, kept whole
    assert status == 137, err
    assert oom_kills() > before
    assert box.poll() is None and Path(f"/proc/{init_pid()}").exists()  # the container runs on


def test_statuses_pass_through(capfd: pytest.CaptureFixture[str], box: subprocess.Popen[bytes]) -> None:
    assert exec_(capfd, NAME, "--", "sh", "-c", "exit 7")[0] == 7
    status, _, err = exec_(capfd, NAME, "--", "no-such-command")
    assert (status, err) == (127, "cgctl: no-such-command: command not found\n")
    status, _, err = exec_(capfd, NAME, "--", "/marker")
    assert status == 126 and "/marker: cannot execute: Permission denied" in err
    assert exec_(capfd, NAME, "--", "sh", "-c", "kill -TERM $$")[0] == 128 + 15


def test_user_env_and_workdir(
    capfd: pytest.CaptureFixture[str], box: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PASSED", "on")
    script = "id -u; id -g; echo $A $PASSED $FROM_IMAGE $PATH; pwd"
    status, out, err = exec_(capfd, "-u", "nobody", "-e", "A=1", "-e", "PASSED", "-w", "/tmp", NAME, "--",
                             "sh", "-c", script)  # fmt: skip
    assert status == 0, err
    assert out.splitlines() == ["65534", "65534", "1 on yes /bin", "/tmp"]
    status, out, err = exec_(capfd, NAME, "--", "sh", "-c", "id -u; pwd")
    assert (status, out.split()) == (0, ["0", "/"]), err
    status, _, err = exec_(capfd, "-u", "nosuchuser", NAME, "--", "true")
    assert status == 125 and "looking up the user nosuchuser" in err, err
    status, _, err = exec_(capfd, "-w", "/no/such/dir", NAME, "--", "true")
    assert status == 125 and "changing to the working directory /no/such/dir" in err, err


def test_refusals(capfd: pytest.CaptureFixture[str], box: subprocess.Popen[bytes]) -> None:
    assert cgctl_in_process(capfd, "freeze", NAME)[0] == 0
    try:
        status, _, err = exec_(capfd, NAME, "--", "true")
        assert status == 125
        assert f"{NAME} is frozen: `cgctl thaw {NAME}` first" in err
    finally:
        assert cgctl_in_process(capfd, "thaw", NAME)[0] == 0
    status, _, err = exec_(capfd, "no-such", "--", "true")
    assert status == 125 and "no running container named 'no-such'" in err
    status, _, err = exec_(capfd, "--privileged", NAME, "--", "true")
    assert status == 125 and "--privileged on exec needs a container started with --privileged" in err


def test_a_stopped_container_is_refused(capfd: pytest.CaptureFixture[str], image: dict[str, str]) -> None:
    status, _, err = cgctl_in_process(capfd, "run", "--name", "ended", "--", "true")
    assert status == 0, err
    status, _, err = exec_(capfd, "ended", "--", "true")
    assert status == 125 and "no running container named 'ended'" in err


def test_a_container_the_daemon_started(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, image: dict[str, str]
) -> None:
    status, _, err = daemon.cli(capfd, "run", "-d", "--name", "dbox", "--image", IMAGE, "--", "sleep", "1000")
    assert status == 0, err
    try:
        wait_for(lambda: daemon.api.inspect("dbox").pid is not None, "its init")
        # Without -H: its run record is this host's, so the library joins it here.
        status, out, err = exec_(capfd, "dbox", "--", "sh", "-c", "hostname; cat /marker")
        assert (status, out.encode()) == (0, b"dbox\n" + MARKER), err
    finally:
        daemon.api.remove("dbox", force=True)


def test_exec_it_in_a_terminal(tmux: Tmux, box: subprocess.Popen[bytes]) -> None:
    tmux.start([*CGCTL, "exec", "-it", NAME, "--", "sh"])
    tmux.wait_for(PROMPT)
    shell_session(tmux)
    tmux.type("cat /marker")
    tmux.wait_for(r"^only in the image\s*$")
    tmux.type("exit 3")
    status, stty = tmux.exit_status()
    assert status == 3
    assert cooked(stty), stty


@pytest.mark.parametrize("interactive", [True, False])
def test_tty_needs_a_terminal(interactive: bool, box: subprocess.Popen[bytes]) -> None:
    options = ["-i", "-t"] if interactive else ["-t"]
    found = subprocess.run([*CGCTL, "exec", *options, NAME, "--", "true"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)  # fmt: skip
    assert found.returncode == 125, found
    which = "input" if interactive else "output"
    assert f"the {which} device is not a terminal" in found.stderr and "drop -t" in found.stderr, found.stderr
