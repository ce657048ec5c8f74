"""Host-wide accounting (issue #15) on a real cgroup v2 tree: cgroups laid out as systemd, docker, podman
and Kubernetes lay them out, each with a real process, are named by their path (unit, slice, runtime,
id, pod_uid, qos) and carry the kernel's values; the selection options choose among them; cgroups that
come and go between scrapes (or during one) come and go from the exposition; promtool accepts it; a
real Prometheus scraping `cgctl exporter --all --compat cadvisor` answers cgctl's dashboard and a
public cAdvisor dashboard; `cgctl stats --all` lists the tree, through the daemon too; bad selections
are refused before anything starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cgctl import discovery, runtime
from cgctl.metrics import ContainerCollector
from cgctl.runtime.remote import UnixConnection
from tests.integration.conftest import UNIFIED
from tests.integration.daemon import Daemon
from tests.integration.hostwide_tree import HostTree
from tests.integration.veth import veth_into
from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    MiB,
    cgctl_in_process,
    run_records,
    spec,
    wait_for,
    workload_pids,
)

EXPORTERS = Path(__file__).parents[2] / "exporters"
DISK = os.environ.get("CGCTL_VM_DISK", "/dev/vda")

# This run's names: a rerun never meets what an interrupted one left.
RUN = secrets.token_hex(3)
DOCKER_ID, PODMAN_ID, BURSTABLE_ID, GUARANTEED_ID = (secrets.token_hex(32) for _ in range(4))
BURSTABLE_UID, GUARANTEED_UID = str(uuid.uuid4()), str(uuid.uuid4())
UNIT = f"hw-test-{RUN}.service"
SERVICE = f"/system.slice/{UNIT}"  # a busy loop held to QUOTA by cpu.max
QUOTA = 20_000  # of 100_000 us
DOCKER = f"/system.slice/docker-{DOCKER_ID}.scope"  # reads the disk once, then sleeps; pids.max
PIDS_MAX = 16
PODMAN = f"/machine.slice/libpod-{PODMAN_ID}.scope"  # memory.max; its payload one level down
MEMORY_MAX = 64 * MiB
PAYLOAD = f"{PODMAN}/container"  # holds ALLOCATED
ALLOCATED = 32 * MiB
QOS_SLICE = "/kubepods.slice/kubepods-burstable.slice"
BURSTABLE_POD = f"{QOS_SLICE}/kubepods-burstable-pod{BURSTABLE_UID.replace('-', '_')}.slice"
BURSTABLE = f"{BURSTABLE_POD}/cri-containerd-{BURSTABLE_ID}.scope"  # sleeps
GUARANTEED_POD = f"/kubepods.slice/kubepods-pod{GUARANTEED_UID.replace('-', '_')}.slice"
GUARANTEED = f"{GUARANTEED_POD}/cri-containerd-{GUARANTEED_ID}.scope"  # sleeps
OWN = f"hw-test-{RUN}"  # one of cgctl's own containers, at /cgctl.slice/OWN
OWN_PATH = f"/cgctl.slice/{OWN}"

# What each cgroup's path says it is: the native rows' labels besides `cgroup`.
LABELS: dict[str, dict[str, str]] = {
    "/": {},
    "/system.slice": {"unit": "system.slice", "slice": "-.slice"},
    SERVICE: {"unit": UNIT, "slice": "system.slice"},
    DOCKER: {"runtime": "docker", "id": DOCKER_ID[:12]},
    "/machine.slice": {"unit": "machine.slice", "slice": "-.slice"},
    PODMAN: {"runtime": "podman", "id": PODMAN_ID[:12]},
    PAYLOAD: {"runtime": "podman", "id": PODMAN_ID[:12]},  # inherited from its container's scope
    "/kubepods.slice": {"unit": "kubepods.slice", "slice": "-.slice"},
    QOS_SLICE: {"unit": "kubepods-burstable.slice", "slice": "kubepods.slice", "qos": "burstable"},
    BURSTABLE_POD: {"pod_uid": BURSTABLE_UID, "qos": "burstable"},
    BURSTABLE: {
        "pod_uid": BURSTABLE_UID,
        "qos": "burstable",
        "runtime": "containerd",
        "id": BURSTABLE_ID[:12],
    },
    GUARANTEED_POD: {"pod_uid": GUARANTEED_UID, "qos": "guaranteed"},
    GUARANTEED: {
        "pod_uid": GUARANTEED_UID,
        "qos": "guaranteed",
        "runtime": "containerd",
        "id": GUARANTEED_ID[:12],
    },
    OWN_PATH: {"container": OWN, "unit": "cgctl.slice", "slice": "-.slice"},
}
# cAdvisor's `name`: cgctl's name, another runtime's short id, "" for a plain cgroup.
NAMES = {
    "/": "",
    "/system.slice": "",
    SERVICE: "",
    DOCKER: DOCKER_ID[:12],
    PODMAN: PODMAN_ID[:12],
    PAYLOAD: "",  # nested in a container, unnamed as cAdvisor leaves it: `sum by (name)` counts it once
    BURSTABLE_POD: "",
    BURSTABLE: BURSTABLE_ID[:12],
    GUARANTEED: GUARANTEED_ID[:12],
    OWN_PATH: OWN,
}
# `cgctl stats --all`'s NAME: cgctl's name, runtime:id, pod:uid, else the unit.
STATS_NAMES = {
    "/": "",
    "/system.slice": "system.slice",
    SERVICE: UNIT,
    DOCKER: f"docker:{DOCKER_ID[:12]}",
    PODMAN: f"podman:{PODMAN_ID[:12]}",
    PAYLOAD: f"podman:{PODMAN_ID[:12]}",
    QOS_SLICE: "kubepods-burstable.slice",
    BURSTABLE_POD: f"pod:{BURSTABLE_UID}",
    BURSTABLE: f"containerd:{BURSTABLE_ID[:12]}",
    GUARANTEED: f"containerd:{GUARANTEED_ID[:12]}",
    OWN_PATH: OWN,
}


def kernel(path: str, file: str, key: str | None = None) -> str:
    """A cgroup interface file's value as the kernel writes it: whole, or one key of a flat-keyed file."""
    text = (UNIFIED / path.lstrip("/") / file).read_text()
    return text.strip() if key is None else dict(line.split() for line in text.splitlines())[key]


def kernel_io(path: str, key: str) -> str:
    """io.stat's key for the scratch disk (254:0 in the VM)."""
    number = f"{os.major(os.stat(DISK).st_rdev)}:{os.minor(os.stat(DISK).st_rdev)}"
    for line in (UNIFIED / path.lstrip("/") / "io.stat").read_text().splitlines():
        device, *pairs = line.split()
        if device == number:
            return dict(pair.split("=") for pair in pairs)[key]
    raise AssertionError(f"{path}/io.stat has no line for {DISK} ({number})")


def on_host(below: str = "/") -> set[str]:
    """Every cgroup at or below the cgroup `below`, as /proc/PID/cgroup names them."""
    top = UNIFIED / below.lstrip("/")
    return {"/" + str(Path(d).relative_to(UNIFIED)).removeprefix(".") for d, _, _ in os.walk(top)}


@pytest.fixture(scope="module")
def tree() -> Iterator[HostTree]:
    """The layout above, each leaf with its process (which moves in before it execs), and a cgctl
    container beside them."""
    cgroups = HostTree()
    own = threading.Thread(target=runtime.run, args=(spec(["sleep", "3600"], name=OWN),), daemon=True)
    network = contextlib.ExitStack()
    try:
        (cgroups.cgroup(SERVICE) / "cpu.max").write_text(f"{QUOTA} 100000")
        cgroups.spawn(SERVICE, ["sh", "-c", "while :; do :; done"])
        (cgroups.cgroup(DOCKER) / "pids.max").write_text(str(PIDS_MAX))
        read_once = f"dd if={DISK} of=/dev/null bs=4096 count=8 iflag=direct status=none; exec sleep 3600"
        cgroups.spawn(DOCKER, ["sh", "-c", read_once])
        (cgroups.cgroup(PODMAN) / "memory.max").write_text(str(MEMORY_MAX))
        cgroups.spawn(PAYLOAD, [PYTHON, "-S", "-c", f"import time\nb = b'x' * {ALLOCATED}\ntime.sleep(3600)"])
        cgroups.spawn(BURSTABLE, ["sleep", "3600"])
        cgroups.spawn(GUARANTEED, ["sleep", "3600"])
        own.start()
        wait_for(lambda: bool(workload_pids(OWN)), "the cgctl container to start")
        # an interface in its net namespace, for the dashboard's network panels
        network.enter_context(
            veth_into(workload_pids(OWN)[0], "nshw-h0", "nshw-c0", "10.200.0.9", "10.200.0.10")
        )
        wait_for(
            lambda: kernel(DOCKER, "pids.current") == "1" and "rbytes" in kernel(DOCKER, "io.stat"),
            "the docker scope's read",
        )
        wait_for(lambda: int(kernel(PAYLOAD, "memory.stat", "anon")) >= ALLOCATED, "the allocation", 120)
        yield cgroups
    finally:
        network.close()
        if (CGCTL_ROOT / OWN / "cgroup.kill").exists():
            (CGCTL_ROOT / OWN / "cgroup.kill").write_text("1")
        if own.ident is not None:
            own.join(timeout=60)
        cgroups.close()
    wait_for(
        lambda: not (CGCTL_ROOT / OWN).exists() and OWN + ".json" not in run_records(), "cgctl to clean up"
    )


# --- the exposition, read in this process ---

LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def series(text: str, metric: str) -> list[tuple[dict[str, str], str]]:
    """(labels, value as written) of each sample of metric."""
    found = []
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, _, value = line[len(metric) + 1 :].rpartition("} ")
            found.append((dict(LABEL.findall(labels)), value))
    return found


def value(text: str, metric: str, **labels: str) -> str:
    """The value of the one sample of metric that has these labels (and maybe others)."""
    values = [
        v for found, v in series(text, metric) if all(found.get(k) == want for k, want in labels.items())
    ]
    assert len(values) == 1, f"{len(values)} samples of {metric} with {labels}"
    return values[0]


def collector(compat: tuple[str, ...] = (), **select: object) -> ContainerCollector:
    selection = discovery.select(UNIFIED, **select)  # type: ignore[arg-type]
    return ContainerCollector(compat=compat, unified=UNIFIED, selection=selection)  # type: ignore[arg-type]


def scrape(compat: tuple[str, ...] = (), **select: object) -> str:
    """What `cgctl exporter --all` serves, with these selection options."""
    return collector(compat, **select).render()


def cgroups_in(text: str) -> set[str]:
    """The cgroups an exposition accounts (each has a cpu.stat, the root too)."""
    return {labels["cgroup"] for labels, _ in series(text, "cgctl_container_cpu_usage_seconds_total")}


def test_every_cgroup_is_named_by_its_path(tree: HostTree) -> None:
    text = scrape(("cadvisor",))
    native = {
        labels["cgroup"]: labels for labels, _ in series(text, "cgctl_container_cpu_usage_seconds_total")
    }
    assert set(native) == on_host(), "every cgroup of the host, the root included, and no other"
    for path, expected in LABELS.items():
        assert native[path] == {"cgroup": path, **expected}
    assert f"cgctl_exporter_cgroups {len(native)}\n" in text
    cadvisor = {labels["id"]: labels for labels, _ in series(text, "container_cpu_usage_seconds_total")}
    assert set(cadvisor) == set(native)
    for path, name in NAMES.items():
        assert cadvisor[path] == {"cpu": "total", "id": path, "image": "", "name": name}
    (info,) = series(text, "cgctl_container_info")  # cgctl's own containers only
    assert info[0]["container"] == OWN and info[0]["cgroup"] == OWN_PATH


def test_values_are_the_kernels_verbatim(tree: HostTree) -> None:
    """Values that hold still are the kernel's digits exactly (read before and after the scrape, and
    tried again if they moved meanwhile); the busy loop's CPU time lies between its two reads."""
    steady: dict[tuple[str, str, tuple[tuple[str, str], ...]], Callable[[], str]] = {
        ("cgctl_container_memory_usage_bytes", PAYLOAD, ()): lambda: kernel(PAYLOAD, "memory.current"),
        ("cgctl_container_memory_anon_bytes", PODMAN, ()): lambda: kernel(PODMAN, "memory.stat", "anon"),
        ("cgctl_container_spec_memory_limit_bytes", PODMAN, ()): lambda: kernel(PODMAN, "memory.max"),
        ("cgctl_container_pids", DOCKER, ()): lambda: kernel(DOCKER, "pids.current"),
        ("cgctl_container_spec_pids_limit", DOCKER, ()): lambda: kernel(DOCKER, "pids.max"),
        ("cgctl_container_io_read_bytes_total", DOCKER, (("device", "vda"),)): lambda: kernel_io(
            DOCKER, "rbytes"
        ),
        ("cgctl_container_io_reads_total", DOCKER, (("device", "vda"),)): lambda: kernel_io(DOCKER, "rios"),
        ("cgctl_container_cpu_usage_seconds_total", GUARANTEED, ()): lambda: str(
            int(kernel(GUARANTEED, "cpu.stat", "usage_usec")) / 1e6
        ),
        ("cgctl_container_pids", BURSTABLE, ()): lambda: kernel(BURSTABLE, "pids.current"),
    }
    deadline = time.monotonic() + 60
    while True:
        before = {key: read() for key, read in steady.items()}
        busy_before = int(kernel(SERVICE, "cpu.stat", "usage_usec"))
        text = scrape(("cadvisor",))
        busy_after = int(kernel(SERVICE, "cpu.stat", "usage_usec"))
        if before == {key: read() for key, read in steady.items()}:
            break
        assert time.monotonic() < deadline, "the tree's values never held still over a scrape"
    for (metric, path, extra), expected in before.items():
        assert value(text, metric, cgroup=path, **dict(extra)) == expected, metric
    assert before[("cgctl_container_spec_memory_limit_bytes", PODMAN, ())] == str(MEMORY_MAX)
    assert before[("cgctl_container_pids", DOCKER, ())] == "1"
    assert before[("cgctl_container_spec_pids_limit", DOCKER, ())] == str(PIDS_MAX)
    busy = float(value(text, "cgctl_container_cpu_usage_seconds_total", cgroup=SERVICE))
    assert busy_before / 1e6 <= busy <= busy_after / 1e6 and busy_after > busy_before
    assert value(text, "cgctl_container_spec_cpu_quota_seconds", cgroup=SERVICE) == str(QUOTA / 1e6)
    # cAdvisor's rows carry the same digits.
    podman = {"id": PODMAN, "name": PODMAN_ID[:12]}
    assert value(text, "container_spec_memory_limit_bytes", **podman) == str(MEMORY_MAX)
    assert value(text, "container_processes", id=DOCKER, name=DOCKER_ID[:12]) == "1"
    assert (
        value(text, "container_fs_reads_bytes_total", id=DOCKER, device="/dev/vda")
        == before[("cgctl_container_io_read_bytes_total", DOCKER, (("device", "vda"),))]
    )


def test_cgroups_appear_and_vanish_between_scrapes(tree: HostTree) -> None:
    scraper = collector(("cadvisor",))  # one collector, as the exporter keeps one across scrapes
    transient = f"/system.slice/hw-test-{RUN}-transient.service"
    before = scraper.render()
    assert transient not in before
    tree.spawn(transient, ["sleep", "3600"])
    try:
        text = scraper.render()
        assert value(text, "cgctl_container_pids", cgroup=transient) == "1"
        labels = {"cgroup": transient, "unit": f"hw-test-{RUN}-transient.service", "slice": "system.slice"}
        assert labels in [found for found, _ in series(text, "cgctl_container_pids")]
        assert value(text, "container_processes", id=transient, name="") == "1"
    finally:
        tree.remove(transient)
    after = scraper.render()
    assert transient not in after, "a series of the removed cgroup is left"
    assert cgroups_in(after) == cgroups_in(before)


def test_max_depth_include_exclude_and_root_select(tree: HostTree) -> None:
    assert cgroups_in(scrape(max_depth=0)) == {"/"}
    top = cgroups_in(scrape(max_depth=1))
    assert top == {path for path in on_host() if path.count("/") == 1} | {"/"}
    assert {"/system.slice", "/machine.slice", "/kubepods.slice", "/cgctl.slice"} <= top
    kubepods = on_host("/kubepods.slice")
    assert cgroups_in(scrape(include=("/kubepods.slice*",))) == kubepods
    assert cgroups_in(scrape(include=("/kubepods.slice*",), exclude=("*/cri-containerd-*",))) == kubepods - {
        BURSTABLE,
        GUARANTEED,
    }
    assert cgroups_in(scrape(include=("/system.slice/*", "/machine.slice/*"))) == (
        on_host("/system.slice") | on_host("/machine.slice")
    ) - {"/system.slice", "/machine.slice"}
    # Below another root, paths are still the ones /proc/PID/cgroup writes; depth counts from the root.
    assert cgroups_in(scrape(root=UNIFIED / "machine.slice")) == {"/machine.slice", PODMAN, PAYLOAD}
    assert cgroups_in(scrape(root=UNIFIED / "machine.slice", max_depth=1)) == {"/machine.slice", PODMAN}


def test_the_selection_options_of_stats(tree: HostTree, capfd: pytest.CaptureFixture[str]) -> None:
    status, out, err = cgctl_in_process(
        capfd,
        "stats",
        "--all",
        "--no-stream",
        "--json",
        "--interval",
        "0.2",
        "--cgroup-root",
        str(UNIFIED / "kubepods.slice"),
        "--max-depth",
        "1",
        "--exclude",
        "/kubepods.slice/kubepods-pod*",
    )
    assert status == 0, err
    assert {row["cgroup"] for row in json.loads(out)} == {"/kubepods.slice", QOS_SLICE}


def test_a_cgroup_removed_mid_walk_is_skipped(tree: HostTree, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removed after the walk listed it and before its files are read; or listed, then removed before
    the walk looks below it: skipped, with no error counted."""
    parent = f"/hw-test-{RUN}-walk"
    for path in ("read-gone", "gone/below"):
        tree.cgroup(f"{parent}/{path}")
    walk = discovery.walk

    def walk_and_remove(selection: discovery.Selection, mount: Path) -> Iterator[tuple[Path, str]]:
        for directory, path in walk(selection, mount):
            yield directory, path
            if path == f"{parent}/gone":  # listed, not yet looked into
                tree.remove(f"{parent}/gone")
        tree.remove(f"{parent}/read-gone")  # listed, not yet read

    monkeypatch.setattr(discovery, "walk", walk_and_remove)
    scraper = collector(("cadvisor",), root=tree.directory(parent))
    text = scraper.render()
    assert cgroups_in(text) == {parent}
    assert scraper.errors == {"discover": 0, "read": 0}
    assert "cgctl_exporter_cgroups 1\n" in text
    tree.remove(parent)


def test_churn_during_scrapes_is_no_error(tree: HostTree) -> None:
    """Cgroups made and removed while a collector scrapes the whole host again and again: each is seen
    by the scrapes it lived through (some removed in the middle of one), and none counts as an error."""
    parent = f"/hw-test-{RUN}-churn"
    churn = tree.cgroup(parent)
    tree.delegate(churn)  # its children have every controller's files to read
    scraper = collector(("cadvisor",))
    started = [0]
    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def scrape_again_and_again() -> None:
        while not stop.is_set():
            started[0] += 1
            try:
                text = scraper.render()
            except BaseException as error:  # reported below
                failures.append(error)
                return
            seen.extend(path for path in cgroups_in(text) if path.startswith(parent + "/"))

    def wait_scrapes(count: int, what: str) -> None:
        wait_for(lambda: started[0] >= count or bool(failures), what, 30)

    thread = threading.Thread(target=scrape_again_and_again, daemon=True)
    thread.start()
    try:
        for i in range(30):
            child = churn / f"c{i}"
            (child / "inner").mkdir(parents=True)
            wait_scrapes(started[0] + 2, "a whole scrape after the mkdir")
            wait_scrapes(started[0] + 1, "the next scrape to start")
            (child / "inner").rmdir()  # while that scrape walks or reads
            child.rmdir()
    finally:
        stop.set()
        thread.join(timeout=60)
        for directory, _, _ in os.walk(churn, topdown=False):  # what a failed iteration left
            if Path(directory) != churn:
                os.rmdir(directory)
    assert not failures, failures
    assert scraper.errors == {"discover": 0, "read": 0}
    assert {f"{parent}/c{i}" for i in range(30)} <= set(seen)
    assert not any(path.startswith(parent + "/") for path in cgroups_in(scraper.render()))
    tree.remove(parent)


def test_a_controller_switched_off_during_scrapes_is_no_error(tree: HostTree) -> None:
    """Turning a controller off in the parent's cgroup.subtree_control takes its files away from the
    children while a scrape may hold them open (ENODEV): the scrape goes on without them."""
    parent = f"/hw-test-{RUN}-toggled"
    tree.cgroup(f"{parent}/child")
    control = tree.directory(parent) / "cgroup.subtree_control"
    scraper = collector(root=tree.directory(parent))
    stop, toggles = threading.Event(), [0]

    def toggle() -> None:
        while not stop.is_set():
            control.write_text("-memory")
            control.write_text("+memory")
            toggles[0] += 1

    thread = threading.Thread(target=toggle)
    thread.start()
    renders, failures = 0, []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                scraper.render()
            except Exception as error:  # the exporter would drop the connection: Prometheus gets nothing
                failures.append(repr(error))
            renders += 1
    finally:
        stop.set()
        thread.join(timeout=60)
        tree.remove(parent)
    assert not failures, failures[:3]
    assert renders >= 5 and toggles[0] >= 5
    assert scraper.errors == {"discover": 0, "read": 0}


def test_promtool_accepts_the_hostwide_exposition(tree: HostTree) -> None:
    for compat in ((), ("cadvisor",)):
        done = subprocess.run(
            ["promtool", "check", "metrics"], input=scrape(compat), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


# --- the command line, and the daemon ---


def test_stats_all_lists_the_tree(tree: HostTree, capfd: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "cgctl", "stats", "--all", "--no-stream", "--json", "--sort", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    by_path = {row["cgroup"]: row for row in rows}
    assert set(by_path) == on_host()
    for path, name in STATS_NAMES.items():
        assert by_path[path]["name"] == name, path
    assert by_path[PODMAN]["memory_limit_bytes"] == MEMORY_MAX and by_path[DOCKER]["pids_limit"] == PIDS_MAX
    assert by_path[PAYLOAD]["memory_bytes"] >= ALLOCATED and by_path[GUARANTEED]["pids"] == 1
    order = [row["cgroup"] for row in rows]
    assert by_path[SERVICE]["cpu_percent"] > by_path[DOCKER]["cpu_percent"]
    assert order.index(SERVICE) < order.index(DOCKER), "--sort cpu puts the busy loop above a sleeper"
    assert [row["cpu_percent"] for row in rows] == sorted((row["cpu_percent"] for row in rows), reverse=True)

    status, out, err = cgctl_in_process(
        capfd, "stats", "--all", "--no-stream", "--interval", "0.2", "--include", "/system.slice/*"
    )
    assert status == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["CGROUP", "NAME", "CPU", "%"]
    table = {line.split()[0]: line.split()[1] for line in lines}
    assert table[SERVICE] == UNIT and table[DOCKER] == f"docker:{DOCKER_ID[:12]}"
    assert set(table) == on_host("/system.slice") - {"/system.slice"}


def get_over_unix(path: Path, target: str) -> str:
    connection = UnixConnection(str(path), 60)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    finally:
        connection.close()


def test_the_daemon_accounts_every_cgroup(
    tree: HostTree, tmp_path_factory: pytest.TempPathFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    from cgctl.runtime.api import HostWide, Invalid

    daemon = Daemon(tmp_path_factory.mktemp("hostwide-daemon"))
    try:
        daemon.start(
            "--metrics-all", "--metrics-compat", "cadvisor", "--metrics-exclude", "/kubepods.slice/*"
        )
        text = get_over_unix(daemon.socket, "/metrics")
        assert cgroups_in(text) == on_host() - (on_host("/kubepods.slice") - {"/kubepods.slice"})
        assert value(text, "cgctl_container_pids", cgroup=DOCKER, **LABELS[DOCKER]) == "1"
        assert value(text, "container_spec_memory_limit_bytes", id=PODMAN, name=PODMAN_ID[:12]) == str(
            MEMORY_MAX
        )

        status, out, err = cgctl_in_process(
            capfd,
            "-H",
            daemon.host,
            "stats",
            "--all",
            "--no-stream",
            "--json",
            "--interval",
            "0.2",
            "--include",
            "/kubepods.slice*",
        )
        assert status == 0, err
        rows = {row["cgroup"]: row for row in json.loads(out)}
        assert set(rows) == on_host("/kubepods.slice")
        assert rows[BURSTABLE]["name"] == STATS_NAMES[BURSTABLE] and rows[BURSTABLE]["pids"] == 1
        assert rows[BURSTABLE_POD]["name"] == STATS_NAMES[BURSTABLE_POD]

        with pytest.raises(Invalid, match="invalid value '/tmp' for --cgroup-root"):
            next(iter(daemon.api.stats(hostwide=HostWide(cgroup_root="/tmp"))))
        status, _, err = cgctl_in_process(
            capfd, "-H", daemon.host, "stats", "--all", "--no-stream", "--include", "system.slice"
        )
        assert status == 125 and "--include" in err and "'system.slice'" in err
    finally:
        daemon.clean_up()


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def free_ports(count: int = 1) -> list[int]:
    """Ports nothing listens on, each different (all held until all are chosen)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def test_bad_selections_are_refused_before_anything_starts(
    tree: HostTree, capfd: pytest.CaptureFixture[str]
) -> None:
    cgroups, records, (port,) = on_host(), run_records(), free_ports()
    done = subprocess.run(
        [PYTHON, "-m", "cgctl", "stats", "--all", "--cgroup-root", "/tmp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 125, done.stderr
    assert "--cgroup-root" in done.stderr and "'/tmp'" in done.stderr, done.stderr
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "cgctl",
            "exporter",
            "--all",
            "--include",
            "system.slice",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 125, done.stderr
    assert "--include" in done.stderr and "'system.slice'" in done.stderr, done.stderr
    for args, words in (
        (("stats", "--no-stream", "--max-depth", "1"), ("--max-depth", "--all")),
        (
            ("stats", "--all", "--no-stream", "--cgroup-root", "/machine.slice"),
            (f"{UNIFIED}/machine.slice?",),
        ),
        (("stats", "--all", "--no-stream", "--max-depth", "-1"), ("--max-depth", "-1")),
        (("stats", "--all", "--no-stream", "--exclude", "kubepods.slice"), ("--exclude", "'kubepods.slice'")),
    ):
        status, _, err = cgctl_in_process(capfd, *args)
        assert status == 125 and all(word in err for word in words), (args, err)
    assert (on_host(), run_records(), listening(port)) == (cgroups, records, False)


# --- a real Prometheus scraping `cgctl exporter --all --compat cadvisor` ---

QueryFn = Callable[[str], list[dict[str, object]]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((EXPORTERS / "grafana-dashboard.json").read_text())
    panels = [p for row in dashboard["panels"] for p in (row.get("panels") or [row])]
    return [target["expr"] for panel in panels if panel.get("type") != "row" for target in panel["targets"]]


@pytest.fixture(scope="module")
def prometheus(tree: HostTree) -> Iterator[QueryFn]:
    """The exporter command, host-wide with cAdvisor's names, and Prometheus scraping it each second."""
    exporter_port, prometheus_port = free_ports(2)
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-hostwide-"))
    exporter_log = workdir / "exporter.log"
    with exporter_log.open("w") as log:
        exporter = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "cgctl",
                "exporter",
                "--all",
                "--compat",
                "cadvisor",
                "--listen",
                f"127.0.0.1:{exporter_port}",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs: [{job_name: cgctl, static_configs: "
        f"[{{targets: ['127.0.0.1:{exporter_port}']}}]}}]\n"
    )
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def query(expr: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=30) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def scraped(times: int) -> bool:
        assert exporter.poll() is None, f"the exporter died: {exporter_log.read_text()}"
        try:
            result = query(f'count_over_time(container_cpu_usage_seconds_total{{id="{SERVICE}"}}[1m])')
        except OSError:
            return False  # not listening yet
        return bool(result) and float(result[0]["value"][1]) >= times  # type: ignore[index]

    try:
        wait_for(lambda: scraped(30), "30 scrapes of the tree: a [30s] rate covers its window", 180)
        yield query
    finally:
        server.terminate()
        server.wait(timeout=60)
        exporter.terminate()
        status = exporter.wait(timeout=60)
        said = exporter_log.read_text()
        shutil.rmtree(workdir, ignore_errors=True)
    assert status == 0, said


def as_query(expr: str) -> str:
    return expr.replace("$container", ".*").replace("$__rate_interval", "30s").replace("${datasource}", "")


@pytest.mark.parametrize("expr", dashboard_expressions())
def test_every_dashboard_expression_returns_host_wide_data(prometheus: QueryFn, expr: str) -> None:
    assert prometheus(as_query(expr)), f"no data for {expr}"


def by(result: list[dict[str, object]], *labels: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(sample["metric"].get(label, "") for label in labels): float(sample["value"][1])  # type: ignore[attr-defined,index]
        for sample in result
    }


def test_the_dashboard_shows_the_tree(prometheus: QueryFn) -> None:
    panel = 'rate(cgctl_container_cpu_usage_seconds_total{container=~"$container"}[$__rate_interval])'
    assert panel in dashboard_expressions()
    cpu = by(prometheus(as_query(panel)), "cgroup")
    assert 0.1 < cpu[(SERVICE,)] <= 0.25, cpu[(SERVICE,)]  # cpu.max holds it to 0.2 CPU
    assert by(prometheus('count(cgctl_container_info{container=~".*"}) or vector(0)'))[()] == 1
    limits = by(
        prometheus(as_query('cgctl_container_spec_memory_limit_bytes{container=~"$container"}')), "cgroup"
    )
    assert limits[(PODMAN,)] == MEMORY_MAX


def test_a_public_cadvisor_dashboard_works_host_wide(prometheus: QueryFn) -> None:
    """Queries of Grafana.com dashboard 893, "Docker and system monitoring" (cAdvisor and node exporter),
    its $interval set to 1m: containers of other runtimes by their short id, the host by id="/"."""
    cpu = by(
        prometheus('sum(rate(container_cpu_usage_seconds_total{name=~".+"}[1m])) by (name) * 100'), "name"
    )
    for container in (DOCKER_ID, PODMAN_ID, BURSTABLE_ID, GUARANTEED_ID):
        assert (container[:12],) in cpu
    assert (OWN,) in cpu
    rss = by(prometheus('sum(container_memory_rss{name=~".+"}) by (name)'), "name")
    assert ALLOCATED <= rss[(PODMAN_ID[:12],)] < 2 * ALLOCATED  # the scope, not its nested cgroup again
    host_system = prometheus('sum(rate(container_cpu_system_seconds_total{id="/"}[1m]))')
    host_rss = prometheus('container_memory_rss{id="/"}')
    assert host_system and host_rss and float(host_rss[0]["value"][1]) >= ALLOCATED  # type: ignore[index]
    # The machine's total, as cAdvisor dashboards take it: the root cgroup holds at least the busy loop.
    total = by(prometheus('sum(rate(container_cpu_usage_seconds_total{id="/"}[1m]))'))[()]
    assert total >= 0.05
    # The machine's memory, as Kubernetes dashboards sum it: the root cgroup has no memory.current, so
    # it comes from /proc/meminfo (MemTotal - MemFree), as runc and cAdvisor take it.
    memory = by(prometheus('sum(container_memory_working_set_bytes{id="/"})'))[()]
    assert ALLOCATED <= memory <= by(prometheus('container_memory_usage_bytes{id="/"}'))[()]


def test_native_labels_aggregate(prometheus: QueryFn) -> None:
    units = by(
        prometheus('sum by (unit) (rate(cgctl_container_cpu_usage_seconds_total{unit!=""}[1m]))'), "unit"
    )
    # A [1m] rate over less than a minute of data is diluted (rate divides by the range): compare.
    others = [rate for (unit,), rate in units.items() if unit not in (UNIT, "system.slice")]
    assert max(others) < units[(UNIT,)] <= 0.25 and ("system.slice",) in units
    pods = by(
        prometheus('sum by (pod_uid, qos) (cgctl_container_memory_usage_bytes{pod_uid!=""})'),
        "pod_uid",
        "qos",
    )
    assert set(pods) == {(BURSTABLE_UID, "burstable"), (GUARANTEED_UID, "guaranteed")}
    runtimes = by(prometheus('count by (runtime) (cgctl_container_pids{runtime!=""})'), "runtime")
    assert set(runtimes) == {("docker",), ("podman",), ("containerd",)}
