"""Integration tests run against a real cgroup v2 kernel (the micro-VM: scripts/test).

Asked for anywhere else, they fail with a message that says how to run them:
a test that silently skips on the wrong kernel proves nothing.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration.daemon import Daemon
    from tests.integration.tmux import Tmux

# Containers get --network none unless a test asks for more: a bridge's CNI plugins add seconds to
# each start in the emulated VM. tests/integration/test_network*.py cover the default (bridge).
os.environ.setdefault("CGCTL_NETWORK", "none")

UNIFIED = Path("/sys/fs/cgroup")
SKOPEO_CACHE = Path("/var/lib/containers/cache")
REQUIRED_CONTROLLERS = {"memory", "cpu", "io", "pids"}
HOW_TO_RUN = (
    "run them in the micro-VM: python3 tests/vm/microvm.py -- python3 -m pytest tests/integration "
    "(scripts/test does this)"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def kernel_problem() -> str | None:
    """Why this kernel cannot host the integration tests, or None."""
    if os.geteuid() != 0:
        return "integration tests must run as root"
    mounts = {
        line.split()[4]: line.split(" - ")[1].split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    }
    if mounts.get(str(UNIFIED)) != "cgroup2":
        return (
            f"{UNIFIED} is not a cgroup2 mount (found {mounts.get(str(UNIFIED), 'nothing')}): "
            "this kernel has no pure cgroup v2 hierarchy"
        )
    missing = REQUIRED_CONTROLLERS - set((UNIFIED / "cgroup.subtree_control").read_text().split())
    if missing:
        return f"{UNIFIED}/cgroup.subtree_control lacks the controllers {', '.join(sorted(missing))}"
    return None


@pytest.fixture(scope="session", autouse=True)
def cgroup_v2_kernel() -> None:
    problem = kernel_problem()
    if problem:
        pytest.fail(f"integration tests need a cgroup v2 kernel: {problem}; {HOW_TO_RUN}", pytrace=False)


class ScratchCgroup:
    """A scratch cgroup for canary tests, written through plain files so that
    the canaries check the kernel, not cgctl's own cgroup code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def keyed(self, name: str) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in self.read(name).splitlines())}

    def spawn(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start argv already inside this cgroup (it joins between fork and exec)."""
        procs = self.path / "cgroup.procs"
        return subprocess.Popen(argv, preexec_fn=lambda: procs.write_text("0"), **kwargs)  # type: ignore[call-overload]

    def wait_events(self, key: str, value: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.keyed("cgroup.events").get(key) != value:
            assert time.monotonic() < deadline, f"{self.path}/cgroup.events: {key} never became {value}"
            time.sleep(0.01)


@pytest.fixture
def scratch_cgroup(request: pytest.FixtureRequest) -> Iterator[ScratchCgroup]:
    path = UNIFIED / f"test-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    path.mkdir()
    group = ScratchCgroup(path)
    try:
        yield group
    finally:
        if group.keyed("cgroup.events")["populated"]:
            group.write("cgroup.kill", "1")
            group.wait_events("populated", 0)
        path.rmdir()


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Whatever a test runs, it leaves no workload cgroup and no run record behind."""
    from tests.integration.workloads import run_records, workload_cgroups

    before = workload_cgroups(), run_records()
    yield
    assert (workload_cgroups(), run_records()) == before, "a run left its cgroup or its record behind"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for a module's tests (each starts in the VM in seconds, not milliseconds)."""
    from tests.integration.daemon import Daemon

    started = Daemon(tmp_path_factory.mktemp("daemon"))
    started.start()
    try:
        yield started
    finally:
        started.clean_up()


@pytest.fixture(scope="module")
def private_skopeo_cache() -> Iterator[None]:
    """skopeo's blob-info cache on a tmpfs of its own: root's is always /var/lib/containers/cache (no
    flag moves it), and in the VM that is the host's file showing through the read-only share, which a
    skopeo on the host may be rewriting at that very moment; bbolt panics on the torn copy ("invalid
    freelist page")."""
    from tests.integration.workloads import tmpfs

    tmpfs(SKOPEO_CACHE)
    yield
    subprocess.run(["umount", "--lazy", str(SKOPEO_CACHE)], check=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    """A real terminal (tests/integration/tmux.py), closed at the end with what runs in it."""
    from tests.integration.tmux import Tmux

    terminal = Tmux(tmp_path)
    yield terminal
    terminal.kill()
