"""The machine and the network: `cgctl pull` on a host without cgroup v2 reaches the machine's store
from a registry on the host's loopback (which the guest, restrict=on, cannot reach), with a pull's
digest checks and resume; a guest port forwarded to the host's loopback while asked, and no longer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl.machine.instance import Machine, MachineError
from tests import oci
from tests.machine.test_machine import cgctl, host_without_cgroup2, machine, ok, shared, shell
from tests.registry import BlobProxy, Registry, running_registry

__all__ = ["host_without_cgroup2", "machine", "shared"]  # fixtures, used by name
MiB = 1 << 20


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as started:
        yield started


@pytest.fixture
def proxy(registry: Registry) -> Iterator[BlobProxy]:
    with BlobProxy(registry) as started:
        yield started


def pulls(machine: Machine) -> list[Path]:
    folder = machine.share / "pulls"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_pull_for_the_machine_resumes_and_runs_there(
    machine: Machine, registry: Registry, proxy: BlobProxy, tmp_path: Path
) -> None:
    payload = os.urandom(16 * MiB)  # incompressible: the blob is as big as the file
    bottom = oci.busybox_layer(
        oci.file("etc/greeting", b"pulled for the machine\n"), oci.file("etc/gone", b"x\n")
    )
    top = [oci.directory("etc"), oci.file("etc/.wh.gone"), oci.file("payload", payload)]
    oci.write_oci_layout(tmp_path / "layout", [bottom, top], compress=False)
    registry.push(tmp_path / "layout", "machine/demo:1")
    digest = oci.sha256(oci.tar_bytes(top))
    reference = f"{proxy.address}/machine/demo:1"

    proxy.rate = 1_500_000  # bytes per second: about 11 s for the big blob
    child = subprocess.Popen(
        [sys.executable, "-m", "cgctl", "pull", reference],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (partial := _partial(machine, digest)) or partial.stat().st_size < 3 * MiB:
            assert child.poll() is None, f"the pull exited {child.returncode}: {child.communicate()}"
            assert time.monotonic() < deadline, "the pull kept no 3 MiB of the blob in 120 s"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    kept = partial.stat().st_size
    assert "machine/demo" not in ok("image", "ls")

    proxy.rate = None
    before = len(proxy.requests)
    out = ok("pull", reference)
    ranges = [r.range for r in proxy.requests[before:] if r.path.endswith(digest) and r.method == "GET"]
    assert ranges == [f"bytes={kept}-"], ranges
    manifest = registry.inspect("machine/demo:1")["Digest"]
    assert manifest in out
    assert pulls(machine) == []
    listed = ok("run", "--image", reference, "--", "sh", "-c", "cat /etc/greeting; ls /etc; wc -c < /payload")
    assert listed.splitlines()[0] == "pulled for the machine"
    assert "gone" not in listed.split() and str(16 * MiB) in listed.split()
    ok("image", "rm", reference)


def test_a_tampered_blob_for_the_machine_is_refused(
    machine: Machine, registry: Registry, proxy: BlobProxy, tmp_path: Path
) -> None:
    layer = [oci.file("data", os.urandom(MiB))]
    oci.write_oci_layout(tmp_path / "layout", [oci.busybox_layer(), layer], compress=False)
    registry.push(tmp_path / "layout", "machine/tampered:1")
    proxy.corrupt = oci.sha256(oci.tar_bytes(layer))
    done = cgctl("pull", f"{proxy.address}/machine/tampered:1")
    assert done.returncode == 125
    assert "do not match the layer's digest" in done.stderr
    assert "machine/tampered" not in ok("image", "ls")
    for left in pulls(machine):  # its other blobs stay for a resume; never the tampered one
        assert not list(left.rglob(f"*{proxy.corrupt.split(':')[1]}"))
    proxy.corrupt = None
    ok("pull", f"{proxy.address}/machine/tampered:1")
    assert "machine/tampered" in ok("image", "ls")
    assert pulls(machine) == []
    ok("image", "rm", f"{proxy.address}/machine/tampered:1")


def _partial(machine: Machine, digest: str) -> Path | None:
    found = [p for p in pulls(machine) for p in p.rglob(f".partial-{digest.split(':')[1]}")]
    return found[0] if found else None


def test_a_guest_port_is_forwarded_to_the_hosts_loopback_while_asked(machine: Machine) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve = (
        f"import socket; s = socket.create_server(('0.0.0.0', {port})); "
        "[c.sendall(b'from the machine') or c.close() for c in iter(lambda: s.accept()[0], None)]"
    )
    shell(machine, f'nohup python3 -c "{serve}" > /dev/null 2>&1 & echo started')
    with machine.forwarded([(port, "tcp")]):
        deadline = time.monotonic() + 60
        answer = b""
        while not answer and time.monotonic() < deadline:  # until the guest's server listens
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    answer = client.recv(64)
            except OSError:
                pass
            time.sleep(0.2)
        assert answer == b"from the machine"
        with pytest.raises(MachineError, match=f"cannot forward {port}/tcp"):
            machine.forward(port)  # qemu holds it already
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    shell(machine, f"pkill -f 'create_server..0.0.0.0., {port}' ; echo stopped")
