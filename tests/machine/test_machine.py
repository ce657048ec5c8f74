"""`cgctl machine` for real, from this host: a booted VM running the daemon on its own ext4 disk, driven
by separate cgctl commands as a user types them. Needs qemu and a host without a usable cgroup v2
(this project's machines): there, the CLI acts through a started machine by itself."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl.machine.instance import Machine
from tests import oci

CHECKOUT = Path(__file__).resolve().parents[2]
BIG = 192 << 20  # a layer that takes seconds to import in the VM: time to kill it mid-way


def cgctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "cgctl", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    print(f"$ cgctl {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}", file=sys.stderr)
    return done


def ok(*args: str) -> str:
    done = cgctl(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_for(what: str, check: object, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.5)


def shell(machine: Machine, command: str, seconds: float = 60) -> str:
    """What `cgctl machine shell` prints for one command, read until the command's end marker."""
    attached = subprocess.Popen(
        [sys.executable, "-m", "cgctl", "machine", "shell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert attached.stdin and attached.stdout
    attached.stdin.write(f"{command}; echo end-$((6*7))\n".encode())
    attached.stdin.flush()
    seen, deadline = b"", time.monotonic() + seconds
    while b"end-42" not in seen and time.monotonic() < deadline:
        if select.select([attached.stdout], [], [], 1)[0]:
            seen += os.read(attached.stdout.fileno(), 4096)
    attached.stdin.close()
    attached.wait(timeout=30)
    assert b"end-42" in seen, f"the shell did not answer within {seconds} s: {seen!r}"
    return seen.decode(errors="replace")


@pytest.fixture(scope="module", autouse=True)
def host_without_cgroup2() -> None:
    done = cgctl("check")
    assert done.returncode == 125, (
        "these tests need a host without a usable cgroup v2 (cgctl check passes here)"
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[Machine]:
    home = tmp_path_factory.mktemp("machine") / "m"
    os.environ["CGCTL_MACHINE_DIR"] = str(home)
    try:
        ok("machine", "init", "--disk-size", "4G", "--memory", "2G", "--share", str(shared))
        ok("machine", "start")
        yield Machine(home)
    finally:
        if running := Machine(home).running():
            os.kill(running.pid, signal.SIGKILL)
        del os.environ["CGCTL_MACHINE_DIR"]


@pytest.fixture(scope="module")
def demo(shared: Path) -> Path:
    """Two layers; the upper one deletes /etc/gone (a whiteout, which overlayfs roots refuse to hold)."""
    bottom = oci.busybox_layer(
        oci.file("etc/greeting", b"hello from the image\n"),
        oci.file("etc/gone", b"x\n"),
        oci.directory("tmp", 0o1777),
    )
    top = [oci.directory("etc"), oci.file("etc/.wh.gone"), oci.file("etc/added", b"added\n")]
    oci.write_oci_layout(shared / "demo", [bottom, top], Cmd=["/bin/sh", "-c", "cat /etc/greeting; ls /etc"])
    return shared / "demo"


def test_state_survives_stop_and_start(machine: Machine, demo: Path, shared: Path) -> None:
    assert "imported 2 layer(s)" in ok("image", "import", str(demo), "demo:1")
    out = ok("run", "--image", "demo:1")
    assert out.splitlines()[0] == "hello from the image"
    assert "added" in out.split() and "gone" not in out.split()

    ok("run", "-d", "--name", "ticker", "--image", "demo:1", "--", "sh", "-c",
       'trap "exit 3" TERM; echo tick; while :; do sleep 1; done')  # fmt: skip
    assert "ticker" in ok("ps")
    wait_for("log line", lambda: "tick" in ok("logs", "ticker"))
    ok("run", "--image", "demo:1", "-v", f"{shared}:/data", "--", "sh", "-c", "echo from-the-vm > /data/out")
    assert (shared / "out").read_text() == "from-the-vm\n"
    assert "ticker" in ok("stats", "--no-stream")
    ok("run", "-d", "--name", "counter", "--image", "demo:1", "--", "sh", "-c",
       "i=0; while :; do echo $i; i=$((i+1)); sleep 1; done")  # fmt: skip
    wait_for("three counts", lambda: len(ok("logs", "counter").split()) >= 3)
    assert "checkpointed to" in ok("checkpoint", "counter", "--dir", str(shared / "ck"))
    counted = int(ok("logs", "counter").split()[-1])

    assert "cgctl-machine" in shell(machine, "hostname; cat /sys/fs/cgroup/cgroup.controllers")
    running = machine.running()
    assert running is not None
    metrics = http.client.HTTPConnection("127.0.0.1", running.metrics_port, timeout=60)
    metrics.request("GET", "/metrics")
    assert 'container="ticker"' in metrics.getresponse().read().decode()
    api = http.client.HTTPConnection("127.0.0.1", running.api_port, timeout=60)
    api.request("GET", "/v1/containers")
    assert api.getresponse().status == 401, "the API answered on loopback without the token"

    assert "machine stopped" in ok("machine", "stop")
    assert machine.running() is None
    assert "machine started" in ok("machine", "start")
    assert "demo:1" in ok("image", "ls")
    (ticker,) = [c for c in json.loads(ok("ps", "-a", "--json")) if c["name"] == "ticker"]
    assert (ticker["state"], ticker["exit_code"]) == ("exited", 3), "the stop did not record its exit"
    assert "tick" in ok("logs", "ticker")
    assert ok("run", "--image", "demo:1").splitlines()[0] == "hello from the image"
    # The checkpoint taken before the stop restores after it, and counts on from where it was.
    assert ok("restore", "--dir", str(shared / "ck"), "--name", "counter2", "-d") == "counter2\n"
    wait_for("a count after the restore", lambda: len(ok("logs", "counter2").split()) >= 2)
    assert int(ok("logs", "counter2").split()[0]) in (counted, counted + 1)
    ok("kill", "counter2")
    ok("wait", "counter2")
    ok("rm", "ticker", "counter", "counter2")


def test_a_hard_kill_during_an_import_leaves_all_of_the_image_or_none(machine: Machine, shared: Path) -> None:
    content = os.urandom(BIG)
    oci.write_oci_layout(shared / "big", [oci.busybox_layer(oci.file("big", content))])
    importing = subprocess.Popen(
        [sys.executable, "-m", "cgctl", "image", "import", str(shared / "big"), "big:1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(3)
    assert importing.poll() is None, "the import ended before the kill: make the image bigger"
    running = machine.running()
    assert running is not None
    os.kill(running.pid, signal.SIGKILL)
    assert importing.wait(timeout=60) != 0
    wait_for("qemu's end", lambda: machine.running() is None, 30)

    ok("machine", "start")
    kept = [i for i in json.loads(ok("image", "ls", "--json")) if i["name"] == "big"]
    leftovers = "ls -a /layers | grep -c '^\\.[0-9a-f]' || true"
    if not kept:  # none of it: the next import finds and removes what the killed one left
        ok("image", "import", str(shared / "big"), "big:1")
        assert ok("run", "--image", "demo:1", "-v", "/var/lib/cgctl/images/layers/sha256:/layers:ro", "--",
                  "sh", "-c", leftovers).strip() == "0"  # fmt: skip
    digest = ok("run", "--image", "big:1", "--", "/bin/busybox", "sha256sum", "/big").split()[0]
    assert digest == hashlib.sha256(content).hexdigest()


def test_bad_input_at_the_machine_changes_nothing(machine: Machine, shared: Path) -> None:
    done = cgctl("run", "--image", "demo:1", "-v", "/var/tmp:/data", "--", "true")
    assert (
        done.returncode == 125
        and "the machine shares" in done.stderr
        and "writes would stay in the VM" in done.stderr
    )
    done = cgctl("checkpoint", "nothing", "--dir", "/var/tmp/ck")
    assert done.returncode == 125 and "would stay in the VM" in done.stderr
    done = cgctl("machine", "set", "--cpus", "1")
    assert done.returncode == 125 and "stop it first" in done.stderr
    done = cgctl("machine", "rm")
    assert done.returncode == 125 and "stop it first" in done.stderr
    done = cgctl("exporter")
    assert (
        done.returncode == 125 and f"http://127.0.0.1:{machine.config().metrics_port}/metrics" in done.stderr
    )
    assert machine.running() is not None
    assert "machine stopped" in ok("machine", "stop")


def test_scripts_cgctl_makes_and_starts_the_default_machine_once(tmp_path: Path) -> None:
    """The README's main job on this kind of host, with the default machine directory."""
    env = {k: v for k, v in os.environ.items() if k != "CGCTL_MACHINE_DIR"} | {"XDG_DATA_HOME": str(tmp_path)}
    script = [str(CHECKOUT / "scripts" / "cgctl")]
    try:
        first = subprocess.run(
            [*script, "run", "--mem", "256M", "--", "python3", "-c", 'b = b"x" * (512 << 20)'],
            capture_output=True, text=True, timeout=900, env=env,
        )  # fmt: skip
        print(first.stderr, file=sys.stderr)
        assert first.returncode == 137, first.stderr
        assert first.stderr.count("scripts/cgctl: starting the cgroup v2 machine") == 1
        assert "creating a cgroup v2 machine" in first.stderr
        assert "killed by the OOM killer: memory.max 256 MiB reached" in first.stderr
        assert (tmp_path / "cgctl" / "machine" / "disk.img").exists()
        again = subprocess.run([*script, "ps", "-a"], capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode == 0 and "scripts/cgctl" not in again.stderr, again.stderr
    finally:
        subprocess.run([*script, "machine", "stop"], timeout=300, env=env)
