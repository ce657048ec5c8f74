"""What does a container network cost: throughput through a published port and between two containers on
a bridge, and the extra start time of `--network bridge` over `--network none`, each against a floor.

Why: cgctl's network is the CNI plugins plus its own table and records, so it should be judged against
the same kernel paths made by hand. The throughput floors: a veth pair into a netns made with `ip netns`
and `ip link`, reached through one nft DNAT rule (for a published port: the client on the host connects
to a host address, as to a published port) or directly (for two containers: the container-to-container
path has no NAT). The start-time floor: `ip netns add`, the plugins of cgctl's own conflist for the
default network (bridge with host-local, portmap, firewall, bandwidth) called by hand with ADD in order
and DEL in reverse, and `ip netns del`; against it, the median time of `cgctl run --network bridge --
true` less that of `cgctl run --network none -- true`. Every peer is measured round by round,
interleaved, and each ratio is a median over the floor's median from the same run.

Goals (issue #26): at least 0.8x the floor's throughput; a bridge's start overhead at most 1.5x the
floor's steps.

How: it makes namespaces, veths, nft rules and cgroups, so it needs root and a pure cgroup v2 hierarchy;
on this project's development machines, the micro-VM (all its traffic stays inside it):

    .venv/bin/python tests/vm/microvm.py --timeout 1500 -- .venv/bin/python bench/network.py [--runs N]

iperf3 (Debian's) measures throughput: the bits per second its receiving end counted in --seconds. The
client of the between-containers case runs in the second container's network namespace (nsenter), the
server is the first container's workload. Everything it made is removed at the end, also on failure.
The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cgroup2_host import require_cgroup2_root
from figures import p90, positive_int

from cgctl.network import cni
from cgctl.network.store import Paths, get

WARMUP_RUNS = 1
CGCTL = [sys.executable, "-m", "cgctl"]
NETNS = "bench-floor"
HOST_IP, INSIDE_IP = "10.99.0.1", "10.99.0.2"  # the floor's veth pair (a /30 no cgctl network uses)
PUBLISHED = 15201  # the published port, on cgctl's and on the floor's
TABLE = "bench_floor"  # the floor's nft table, with its one DNAT rule


def check(argv: list[str]) -> str:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def iperf(target: str, port: int, seconds: int, netns_of: int | None = None) -> float:
    """Bits per second the server counted for one iperf3 test to target:port (from a pid's netns)."""
    enter = ["nsenter", f"--net=/proc/{netns_of}/ns/net"] if netns_of else []
    result = json.loads(check([*enter, "iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J"]))
    return float(result["end"]["sum_received"]["bits_per_second"])


@contextlib.contextmanager
def floor_network(stack: contextlib.ExitStack) -> Iterator[None]:
    """The hand-made floor: a netns with an iperf3 server behind a veth pair and one DNAT rule."""
    check(["ip", "netns", "add", NETNS])
    stack.callback(subprocess.run, ["ip", "netns", "del", NETNS], capture_output=True)
    check(["ip", "link", "add", "vbench0", "type", "veth", "peer", "name", "vbench1", "netns", NETNS])
    stack.callback(subprocess.run, ["ip", "link", "del", "vbench0"], capture_output=True)
    check(["ip", "addr", "add", f"{HOST_IP}/30", "dev", "vbench0"])
    check(["ip", "link", "set", "vbench0", "up"])
    for step in (["addr", "add", f"{INSIDE_IP}/30", "dev", "vbench1"], ["link", "set", "vbench1", "up"]):
        check(["ip", "-n", NETNS, *step])
    check(["ip", "-n", NETNS, "link", "set", "lo", "up"])
    rule = f"ip daddr {HOST_IP} tcp dport {PUBLISHED} dnat to {INSIDE_IP}:5201"
    chain = f"  chain output {{\n    type nat hook output priority -100;\n    {rule}\n  }}\n"
    script = f"table ip {TABLE} {{\n{chain}}}\n"
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=60)
    stack.callback(subprocess.run, ["nft", "delete", "table", "ip", TABLE], capture_output=True)
    server = subprocess.Popen(["ip", "netns", "exec", NETNS, "iperf3", "-s"], stdout=subprocess.DEVNULL)
    stack.callback(server.wait, 60)
    stack.callback(server.kill)
    wait_listening(lambda: check(["ip", "netns", "exec", NETNS, "ss", "-Htln", "sport = :5201"]))
    yield


def wait_listening(listening: Callable[[], str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not listening().strip():
        if time.monotonic() > deadline:
            raise RuntimeError("an iperf3 server never listened")
        time.sleep(0.1)


def container(stack: contextlib.ExitStack, name: str, *args: str) -> dict[str, Any]:
    """A `cgctl run --network bridge` container left running; its run record once it is attached."""
    supervisor = subprocess.Popen(
        [*CGCTL, "run", "--name", name, "--network", "bridge", *args], stdout=subprocess.DEVNULL
    )
    stack.callback(supervisor.wait, 120)
    stack.callback(subprocess.run, [*CGCTL, "kill", name], capture_output=True)
    record_path = Path(os.environ["CGCTL_STATE_DIR"]) / f"{name}.json"
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(record_path.read_text())
            if record.get("pid") and "address" in record.get("network", {}):
                return dict(record)
        if supervisor.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start on the bridge")
        time.sleep(0.1)


def floor_start(conflist: dict[str, Any]) -> None:
    """The floor of a bridge's start and end: a netns, the conflist's plugins by hand, and back."""
    check(["ip", "netns", "add", "bench-start"])
    env = {"CNI_CONTAINERID": "bench-start", "CNI_NETNS": "/run/netns/bench-start", "CNI_IFNAME": "eth0"}
    env |= {"CNI_PATH": ":".join(cni.PLUGIN_DIRS), "PATH": os.environ["PATH"]}
    result: dict[str, Any] | None = None
    for command, plugins in (("ADD", conflist["plugins"]), ("DEL", conflist["plugins"][::-1])):
        for plugin in plugins:
            stdin = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
            if result is not None:
                stdin["prevResult"] = result
            done = subprocess.run(
                [cni.find(plugin["type"]) or plugin["type"]],
                input=json.dumps(stdin),
                env={**env, "CNI_COMMAND": command},
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{plugin['type']} {command}: {done.stdout} {done.stderr}")
            if command == "ADD":
                result = json.loads(done.stdout)
    check(["ip", "netns", "del", "bench-start"])


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def rounds(peers: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """Each peer's value per run, interleaved round by round after the warm-ups."""
    for _ in range(WARMUP_RUNS):
        for measure in peers.values():
            measure()
    found: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(runs):
        for name, measure in peers.items():
            found[name].append(measure())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=7, help="rounds per peer (default 7)")
    parser.add_argument("--seconds", type=positive_int, default=3, help="each iperf3 test's length")
    args = parser.parse_args()
    require_cgroup2_root(".venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/network.py")
    seconds = args.seconds
    with (
        tempfile.TemporaryDirectory(prefix="bench-net-", dir="/run") as work,
        contextlib.ExitStack() as stack,
    ):
        os.environ["CGCTL_STATE_DIR"] = f"{work}/runs"
        os.environ["CGCTL_NETWORK_DIR"] = f"{work}/networks"
        paths = Paths.default()
        stack.enter_context(floor_network(stack))
        client = container(stack, "bench-client", "--", "sleep", "100000")  # first: the bridge is up
        gateway = get(paths, "bridge").gateway  # published on it: a host address, as the floor's
        published = f"{gateway}:{PUBLISHED + 1}:5201"
        server = container(stack, "bench-server", "-p", published, "--", "iperf3", "-s")
        inside = ["nsenter", f"--net=/proc/{server['pid']}/ns/net", "ss", "-Htln", "sport = :5201"]
        wait_listening(lambda: check(inside))
        address = server["network"]["address"]
        throughput = rounds(
            {
                "floor: veth + DNAT": lambda: iperf(HOST_IP, PUBLISHED, seconds),
                "cgctl: published port": lambda: iperf(gateway, PUBLISHED + 1, seconds),
                "floor: veth": lambda: iperf(INSIDE_IP, 5201, seconds),
                "cgctl: between containers": lambda: iperf(address, 5201, seconds, client["pid"]),
            },
            args.runs,
        )
        conflist = get(paths, "bridge").conflist(paths)
        starts = rounds(
            {
                "floor: netns + plugins by hand": lambda: timed(lambda: floor_start(conflist)),
                "cgctl run --network none": lambda: timed(
                    lambda: check([*CGCTL, "run", "--network", "none", "--", "true"])
                ),
                "cgctl run --network bridge": lambda: timed(
                    lambda: check([*CGCTL, "run", "--network", "bridge", "--", "true"])
                ),
            },
            args.runs,
        )
    report(throughput, starts, args.runs, seconds)


def report(
    throughput: dict[str, list[float]], starts: dict[str, list[float]], runs: int, seconds: int
) -> None:
    median = {name: statistics.median(values) for name, values in {**throughput, **starts}.items()}
    print(f"kernel {platform.release()}; {runs} rounds after {WARMUP_RUNS} warm-up, peers interleaved")
    title = f"throughput (iperf3, {seconds} s)"
    print(f"{title:<34}{'median Mbit/s':>14}{'p10 Mbit/s':>12}{'x floor':>9}")
    floors = {"cgctl: published port": "floor: veth + DNAT", "cgctl: between containers": "floor: veth"}
    ratios: dict[str, float] = {}
    for name, values in throughput.items():
        floor = floors.get(name, name)
        ratios[name] = median[name] / median[floor]
        low = -p90([-v for v in values])
        print(f"{name:<34}{median[name] / 1e6:>14.1f}{low / 1e6:>12.1f}{ratios[name]:>9.2f}")
    extra = median["cgctl run --network bridge"] - median["cgctl run --network none"]
    floor_steps = median["floor: netns + plugins by hand"]
    print(f"{'start and end of `true`':<34}{'median ms':>14}{'p90 ms':>12}")
    for name, values in starts.items():
        print(f"{name:<34}{median[name] * 1e3:>14.1f}{p90(values) * 1e3:>12.1f}")
    ratios["bridge start overhead"] = extra / floor_steps
    print(
        f"bridge over none: {extra * 1e3:.1f} ms = {ratios['bridge start overhead']:.2f}x the floor's steps"
    )
    summary = {
        "kernel": platform.release(),
        "runs": runs,
        "seconds": seconds,
        "throughput_bits": throughput,
        "start_seconds": starts,
        "ratios": ratios,
    }
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
