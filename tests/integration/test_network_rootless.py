"""The rootless network: `cgctl run --userns` as an unprivileged user in a delegated cgroup gets
--network pasta by default, a published port reached on the VM's 127.0.0.1, the VM's loopback at its
gateway's address, and no pasta process left after its end nor after a SIGKILL of cgctl run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_run_input import unprivileged_delegation
from tests.integration.workloads import PYTHON

__all__ = ["unprivileged_delegation"]  # the fixture, used by name

UPLINK = "cgup0"
# The container's side: a TCP server on 8080 that answers once, after asking the VM's loopback (a
# server the test runs) for a word through its default gateway, which pasta maps to the host.
SERVE = """
import socket, struct, sys
route = [l.split() for l in open('/proc/net/route').read().splitlines()[1:]]
gateway = next(socket.inet_ntoa(struct.pack('<I', int(f[2], 16))) for f in route if f[1] == '00000000')
word = socket.create_connection((gateway, int(sys.argv[1])), timeout=30).recv(64).decode()
print('interfaces', sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
print('from the host:', word, flush=True)
server = socket.socket()
server.bind(('0.0.0.0', 8080))
server.listen()
client, _ = server.accept()
client.sendall(b'served by the container')
client.close()
"""


@pytest.fixture
def uplink() -> Iterator[None]:
    """What pasta needs of a host and a VM without a network lacks: a default route (on a dummy
    interface: nothing leaves the VM) and /dev/net/tun open to users, as udev leaves it."""
    subprocess.run(["modprobe", "tun"], check=True)
    dummy_loaded = Path("/sys/module/dummy").exists()  # test_sandbox.py probes with loading it
    tun = Path("/dev/net/tun")
    mode = tun.stat().st_mode & 0o777
    tun.chmod(0o666)
    for command in (
        f"link add {UPLINK} type dummy",
        f"addr add 10.99.0.2/24 dev {UPLINK}",
        f"link set {UPLINK} up",
        "route add default via 10.99.0.1",
    ):
        subprocess.run(["ip", *command.split()], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "link", "del", UPLINK], check=True)
        if not dummy_loaded:
            subprocess.run(["modprobe", "-r", "dummy"], check=True)
        tun.chmod(mode)


@pytest.fixture
def nobody_state() -> Iterator[Path]:
    """A state directory and HOME for the unprivileged user."""
    state = Path(tempfile.mkdtemp(prefix="cgctl-nobody-"))
    os.chown(state, 65534, 65534)
    try:
        yield state
    finally:
        shutil.rmtree(state)


def as_nobody(group: Path, state: Path, args: str, network: str | None = None) -> subprocess.Popen[str]:
    drop = "setpriv --reuid 65534 --regid 65534 --clear-groups"
    env = {**os.environ, "CGCTL_STATE_DIR": str(state), "HOME": str(state), "PYTHONPATH": os.getcwd()}
    env.pop("CGCTL_NETWORK")
    if network is not None:
        env["CGCTL_NETWORK"] = network
    shell = f"echo $$ > {group}/cgroup.procs && exec {drop} {PYTHON} -m cgctl {args}"
    return subprocess.Popen(
        ["sh", "-c", shell], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def pastas() -> list[int]:
    """The pasta processes of the VM (pasta re-executes itself as passt.avx2 or passt)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0) in (b"pasta", b"passt", b"passt.avx2"):
            found.append(int(pid))
    return found


def serve_once(word: bytes) -> tuple[int, threading.Thread]:
    """A server on the VM's loopback that answers one connection with word; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(240)

    def answer() -> None:
        with server:
            client, _ = server.accept()
            client.sendall(word)
            client.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ask(port: int, run: subprocess.Popen[str], timeout: float = 240) -> bytes:
    """What the published port answers, retried until the container listens (pasta accepts first,
    then closes a connection nothing inside took) while it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                answer = client.recv(64)
                if answer:
                    return answer
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"nothing answered on 127.0.0.1:{port} within {timeout} s")


def test_rootless_default_is_pasta_with_a_published_port_and_the_hosts_loopback(
    unprivileged_delegation: Path, uplink: None, nobody_state: Path
) -> None:
    assert pastas() == []
    loopback_port, answered = serve_once(b"hello")
    published = free_port()
    run = as_nobody(
        unprivileged_delegation,
        nobody_state,
        f'run --userns -p {published}:8080 -- {PYTHON} -c "{SERVE}" {loopback_port}',
    )
    try:
        assert ask(published, run) == b"served by the container"
        stdout, stderr = run.communicate(timeout=240)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 0, stderr
    assert "interfaces ['eth0', 'lo']" in stdout
    assert "from the host: hello" in stdout
    answered.join(timeout=10)
    assert pastas() == []
    assert list(nobody_state.glob("*.json")) == []


def test_sigkill_of_cgctl_run_leaves_no_pasta(
    unprivileged_delegation: Path, uplink: None, nobody_state: Path
) -> None:
    published = free_port()
    run = as_nobody(
        unprivileged_delegation,
        nobody_state,
        f"run --userns --name held -p {published}:8080 -- sleep 600",
        network="pasta",
    )
    try:
        deadline = time.monotonic() + 240
        record = nobody_state / "held.json"
        while time.monotonic() < deadline and not _pasta_pid(record):
            assert run.poll() is None, run.communicate()
            time.sleep(0.2)
        pasta = _pasta_pid(record)
        assert pasta in pastas()
        time.sleep(1)  # the workload goes on once pasta is ready
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        deadline = time.monotonic() + 30
        while pastas() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pastas() == []
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", published))  # the port is free again
        # The next cgctl cleans the dead run's cgroup and record (its pasta is gone: nothing to stop).
        # (from the leaf the dead one moved itself to: its parent now has controllers for children)
        leaf = unprivileged_delegation / "cgctl-supervisor"
        after = as_nobody(leaf, nobody_state, "run --userns -- true", network="none")
        assert after.wait(timeout=240) == 0, after.communicate()
        assert list(nobody_state.glob("*.json")) == []
    finally:
        run.kill()
        run.wait()


def test_a_published_port_in_use_is_refused(
    unprivileged_delegation: Path, uplink: None, nobody_state: Path
) -> None:
    with socket.create_server(("0.0.0.0", 0)) as holder:
        port = holder.getsockname()[1]
        run = as_nobody(
            unprivileged_delegation, nobody_state, f"run --userns -p {port}:80 -- true", network="pasta"
        )
        _, stderr = run.communicate(timeout=240)
    assert run.returncode == 125
    assert "--publish" in stderr and f"{port}/tcp is in use on this host" in stderr
    assert pastas() == []
    assert list(nobody_state.glob("*.json")) == []


def _pasta_pid(record: Path) -> int | None:
    try:
        return json.loads(record.read_text()).get("network", {}).get("pid")
    except (OSError, ValueError):
        return None
