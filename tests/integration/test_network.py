"""Container networks for `cgctl run` in the foreground (docs/network.md): the default bridge, ports
published on the VM's loopback, names on a user network and nothing across networks, an internal
network, bad input that changes nothing, and clean-up after SIGKILL of `cgctl run`. All traffic stays
in the VM: its loopback, cgctl's bridges and the containers' namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl.network import store
from tests.integration.workloads import PYTHON, run_records, wait_for, workload_cgroups

CGCTL = [PYTHON, "-m", "cgctl"]
PATHS = store.Paths.default()
# A root of its own made of the VM's: python3 is there, and /etc/hosts and resolv.conf are cgctl's.
OWN_ROOT = ["--rootfs", "/"]


def cgctl(*args: str, network_env: str | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CGCTL_NETWORK"}
    if network_env is not None:
        env["CGCTL_NETWORK"] = network_env
    return subprocess.run([*CGCTL, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)  # type: ignore[call-overload,no-any-return]


def leftovers() -> dict[str, object]:
    """What a container's network leaves on the VM if it is not taken down: veths, leases, port
    claims, per-container iptables rules, files, and cgctl's cgroups and records."""
    links = subprocess.run(
        ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True
    ).stdout
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    leases = sorted(
        str(p.relative_to(PATHS.leases))
        for p in PATHS.leases.glob("*/*")
        if p.name != "lock" and not p.name.startswith("last_reserved_ip")
    )
    return {
        "veths": sorted(line.split(":")[1].split("@")[0].strip() for line in links.splitlines()),
        "leases": leases,
        "claims": sorted(p.name for p in (PATHS.runtime / "ports").glob("*")),
        "rules": sorted(line for line in rules.splitlines() if "cgctl-" in line),
        "files": sorted(p.name for p in (PATHS.runtime / "containers").glob("*")),
        "cgroups": workload_cgroups(),
        "records": run_records(),
    }


@pytest.fixture
def nothing_left() -> Iterator[None]:
    before = leftovers()
    yield
    wait_for(
        lambda: leftovers() == before, f"the network left something behind: {leftovers()} (was {before})"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str, timeout: float = 120) -> bytes:
    """GET url once the server behind it answers (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.5)


@pytest.fixture
def networks() -> Iterator[list[str]]:
    """Two user networks and an internal one (`cgctl network create`), removed at the end."""
    made = {"test-a": [], "test-b": [], "test-internal": ["--internal"]}
    for name, options in made.items():
        done = cgctl("network", "create", *options, name)
        assert done.returncode == 0, done.stderr
    yield list(made)
    assert cgctl("network", "rm", *made).returncode == 0


def test_the_default_for_root_is_a_bridge_with_docker_s_files(nothing_left: None) -> None:
    """Unset, --network is bridge: eth0 with an address of 10.91.0.0/16, a default route through the
    gateway, and (with a root of its own) /etc/hosts naming the container and resolv.conf without a
    loopback nameserver."""
    script = "ip -o -4 addr show eth0; ip route; cat /etc/hosts /etc/resolv.conf /etc/hostname"
    done = cgctl("run", "--name", "deflt", "--hostname", "box", *OWN_ROOT, "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    address = re.search(r"inet (10\.91\.\d+\.\d+)/16", done.stdout)
    assert address, done.stdout
    assert "default via 10.91.0.1 dev eth0" in done.stdout
    assert f"{address.group(1)}\tbox\n" in done.stdout
    assert "127.0.0.1\tlocalhost\n" in done.stdout
    nameservers = re.findall(r"^nameserver (\S+)", done.stdout, re.MULTILINE)
    assert nameservers and not any(n.startswith("127.") or n == "::1" for n in nameservers)
    assert done.stdout.rstrip().endswith("box")


def test_a_published_port_answers_on_the_loopback_and_is_its_own(nothing_left: None, tmp_path: Path) -> None:
    """-p 127.0.0.1:PORT:8000 reaches a server in the container; the same port for another container
    is refused naming its holder, a host process's port naming the process; after the container is
    killed its port, lease and rules are gone, and its report counts its traffic."""
    port = free_port()
    (tmp_path / "index.html").write_text("from the container\n")
    server = subprocess.Popen(
        [*CGCTL, "run", "--init", "--network", "bridge", "--name", "web", "-p", f"127.0.0.1:{port}:8000",
         "--report", str(tmp_path / "report.json"), "-v", f"{tmp_path}:/srv", *OWN_ROOT, "--",
         "python3", "-m", "http.server", "-d", "/srv", "8000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert fetch(f"http://127.0.0.1:{port}/index.html") == b"from the container\n"
        taken = cgctl("run", "--network", "bridge", "-p", f"127.0.0.1:{port}:80", "--", "true")
        assert taken.returncode == 125
        assert f"invalid value '{port}/tcp' for --publish" in taken.stderr and "by web" in taken.stderr
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            other = held.getsockname()[1]
            busy = cgctl("run", "--network", "bridge", "-p", f"127.0.0.1:{other}:80", "--", "true")
        assert busy.returncode == 125, busy.stderr
        assert f"{other}/tcp is in use on this host by python" in busy.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=300)
    counted = json.loads((tmp_path / "report.json").read_text())["network"]
    assert counted["tx_bytes"] > len("from the container\n") and counted["rx_packets"] > 0, counted


def test_names_on_a_user_network_and_nothing_across_networks(networks: list[str], nothing_left: None) -> None:
    """Two containers on one network reach each other by name (the peer's /etc/hosts is rewritten as
    it joins); one on another network reaches neither by name nor by address; an internal network
    has no route out of its bridge."""
    first, second, internal = networks
    server = subprocess.Popen(
        [*CGCTL, "run", "--init", "--network", first, "--name", "srv", *OWN_ROOT, "--",
         "sh", "-c", "ip -o -4 addr show eth0 > /dev/stderr; exec python3 -m http.server 8000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (PATHS.runtime / "members" / first / "srv.json").exists(), "srv on its network", 300)
        client = "import urllib.request as u; print(u.urlopen('http://srv:8000/', timeout=30).status)"
        near = cgctl("run", "--network", first, "--name", "near", *OWN_ROOT, "--", "python3", "-c", client)
        assert (near.returncode, near.stdout.strip()) == (0, "200"), near.stderr
        address = store.get(PATHS, first).subnet.rsplit(".", 1)[0]
        probe = (
            "import socket, sys\n"
            "try: socket.gethostbyname('srv'); print('resolved')\n"
            "except OSError: print('unknown')\n"
            "s = socket.socket(); s.settimeout(5)\n"
            f"print('reached' if s.connect_ex(('{address}.2', 8000)) == 0 else 'unreachable')\n"
        )
        far = cgctl("run", "--network", second, "--name", "far", *OWN_ROOT, "--", "python3", "-c", probe)
        assert (far.returncode, far.stdout.split()) == (0, ["unknown", "unreachable"]), far.stderr
        routes = cgctl("run", "--network", internal, "--", "ip", "route")
        assert routes.returncode == 0, routes.stderr
        assert "default" not in routes.stdout and "dev eth0" in routes.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--network", "nosuch"], "invalid value 'nosuch' for --network: no such network"),
        (["--network", "bad name"], "--network"),
        (["--network", "bridge", "-p", "80:99999"], "invalid value '80:99999' for --publish"),
        (["--network", "none", "-p", "8080:80"], "cannot carry published ports"),
        (["--network", "host", "-p", "8080:80"], "cannot carry published ports"),
        (["--network", "container:nosuch"], "no running container nosuch"),
        (["--network", "bridge", "--dns", "not-an-ip"], "--dns"),
        (["--network", "bridge", "--add-host", "nocolon"], "invalid value 'nocolon' for --add-host"),
        (["--network", "bridge", "--share", "net"], "--share net is --network host"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(args: list[str], message: str, nothing_left: None) -> None:
    done = cgctl("run", *args, "--", "true")
    assert done.returncode == 125, done
    assert message in done.stderr, done.stderr


def test_sigkill_of_cgctl_run_leaves_nothing(nothing_left: None) -> None:
    """A killed `cgctl run` takes its workload with it; the next cgctl finds its record and releases
    the lease, the port and the rules (state.clean_stale)."""
    port = free_port()
    run = subprocess.Popen(
        [*CGCTL, "run", "--network", "bridge", "--name", "doomed", "-p", f"127.0.0.1:{port}:8000", "--",
         PYTHON, "-m", "http.server", "8000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    fetch(f"http://127.0.0.1:{port}/")
    run.kill()
    run.wait(timeout=60)
    wait_for(
        lambda: not [p for p in os.listdir("/proc") if p.isdigit() and _is_server(p)], "the server to die"
    )
    assert cgctl("run", "--network", "none", "--", "true").returncode == 0  # a run cleans up dead ones


def _is_server(pid: str) -> bool:
    try:
        return b"http.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_checkpoint_is_restored_onto_its_network_with_its_address(
    nothing_left: None, tmp_path: Path
) -> None:
    """CRIU dumps the container with its namespace as external; the restore attaches a new one to the
    same network with the same address and port, and the server answers there again."""
    port = free_port()
    argv = [PYTHON, "-m", "http.server", "8000"]
    stdio = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    run = subprocess.Popen(
        [*CGCTL, "run", "--network", "bridge", "--name", "ck", "-p", f"127.0.0.1:{port}:8000", "--", *argv],
        **stdio,  # type: ignore[arg-type]
    )
    fetch(f"http://127.0.0.1:{port}/")
    address = json.loads((Path("/run/cgctl/runs") / "ck.json").read_text())["network"]["address"]
    dumped = cgctl("checkpoint", "--dir", str(tmp_path / "ck"), "ck")
    assert dumped.returncode == 0, dumped.stderr
    run.communicate(timeout=300)
    restored = subprocess.Popen([*CGCTL, "restore", "--dir", str(tmp_path / "ck")], **stdio)  # type: ignore[arg-type]
    try:
        fetch(f"http://127.0.0.1:{port}/")
        again = json.loads((Path("/run/cgctl/runs") / "ck.json").read_text())["network"]["address"]
        assert again == address
    finally:
        with contextlib.suppress(FileNotFoundError):
            Path("/sys/fs/cgroup/cgctl.slice/ck/cgroup.kill").write_text("1")
        restored.communicate(timeout=300)
