"""The limits added as rows of cgctl.limits.LIMITS, on the real kernel: --hugetlb SIZE:LIMIT
(hugetlb.<size>.max) and --memory-zswap-max (memory.zswap.max) in run, update and the report, and
a page size this host lacks refused by name before anything is created."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl.cgroup.hugetlb import page_sizes
from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    MiB,
    cgctl_in_process,
    run_records,
    wait_for,
    workload_cgroups,
    workload_pids,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


def limit(name: str, file: str) -> str:
    return (CGCTL_ROOT / name / file).read_text().strip()


def test_the_vm_kernel_has_hugetlb_2mb_pages_and_zswap() -> None:
    assert "hugetlb" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    assert "2MB" in page_sizes()


def test_run_writes_hugetlb_and_zswap_and_reports_them(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seen, report = tmp_path / "seen", tmp_path / "report.json"
    files = "/sys/fs/cgroup/hugetlb.2MB.max /sys/fs/cgroup/memory.zswap.max"
    status, _, err = cgctl_in_process(
        capfd, "run", "--name", "huge-run", "--hugetlb", "2M:64M", "--memory-zswap-max", "32M",
        "--report", str(report), "--", "sh", "-c", f"cat {files} > {seen}",
    )  # fmt: skip
    assert status == 0, err
    assert seen.read_text().split() == [str(64 * MiB), str(32 * MiB)]
    final = json.loads(report.read_text())
    assert final["limits"]["hugetlb.2MB.max"] == str(64 * MiB)
    assert final["limits"]["memory.zswap.max"] == str(32 * MiB)


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--hugetlb", "3MB:64M", "this host has no 3MB huge pages (it has 2MB"),
        ("--hugetlb", "2MB", "expected PAGE_SIZE:LIMIT"),
        ("--hugetlb", "2MB:lots", "not a size"),
        ("--memory-zswap-max", "1Q", "not a size"),
    ],
)
def test_a_bad_value_is_refused_by_name_with_nothing_created(
    capfd: pytest.CaptureFixture[str], option: str, value: str, says: str
) -> None:
    before = (workload_cgroups(), run_records())
    status, _, err = cgctl_in_process(capfd, "run", "--name", "huge-bad", option, value, "--", "true")
    assert status == 125 and f"for {option}" in err and says in err, err
    assert (workload_cgroups(), run_records()) == before


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    """A container started without hugetlb, which is then off along cgctl's subtree, as after a boot."""
    for group in (CGCTL_ROOT, CGCTL_ROOT.parent):
        with contextlib.suppress(OSError):
            (group / "cgroup.subtree_control").write_text("-hugetlb")
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", "huge-up", "--", "sleep", "3600"],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: bool(workload_pids("huge-up")), "huge-up to start")
    yield supervisor
    supervisor.terminate()
    supervisor.stderr and supervisor.stderr.close()
    subprocess.run([PYTHON, "-m", "cgctl", "kill", "huge-up"], capture_output=True)
    supervisor.wait(timeout=60)


def test_update_sets_and_resets_hugetlb_and_zswap(
    capfd: pytest.CaptureFixture[str], sleeper: subprocess.Popen[str]
) -> None:
    status, out, err = cgctl_in_process(
        capfd, "update", "huge-up", "--hugetlb", "2MB:32M", "--memory-zswap-max", "16M"
    )
    assert status == 0, err
    assert out.splitlines() == [
        f"huge-up: memory.zswap.max = {16 * MiB}",
        f"huge-up: hugetlb.2MB.max = {32 * MiB}",
    ]
    status, out, err = cgctl_in_process(
        capfd, "update", "huge-up", "--hugetlb", "2MB:max", "--memory-zswap-max", "max"
    )
    assert status == 0, err
    assert (limit("huge-up", "hugetlb.2MB.max"), limit("huge-up", "memory.zswap.max")) == ("max", "max")
    status, _, err = cgctl_in_process(capfd, "update", "huge-up", "--hugetlb", "5MB:1M")
    assert status == 125 and "for --hugetlb: this host has no 5MB huge pages" in err, err
