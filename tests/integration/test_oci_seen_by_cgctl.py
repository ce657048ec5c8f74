"""Containers made through cgctl-oci are cgctl's too: `cgctl ps`, `top`, the exporter, `exec`, live policies,
freeze; and checkpoint/restore with runc's flags. Driven as a shim drives it: one cgctl-oci process per
operation, and the container's init reaped by us (a subreaper), never by cgctl-oci."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgctl import syscalls
from cgctl.metrics import ContainerCollector
from tests import oci
from tests.integration.workloads import MiB, cgctl_in_process, tmpfs, wait_for

CGCTL_OCI = shutil.which("cgctl-oci") or str(Path(__file__).parents[2] / ".venv/bin/cgctl-oci")
CGROUP_PARENT = Path("/sys/fs/cgroup/cgctl-oci-test")
POD = {"io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace": "prod"}


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root on a tmpfs (CRIU and overlayfs need a real filesystem under it)."""
    root = tmpfs(tmp_path_factory.mktemp("oci-root")) / "rootfs"
    for info, data in oci.busybox_layer(oci.directory("tmp", 0o1777)):
        target = root / info.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if info.isdir():
            target.mkdir(exist_ok=True)
        elif info.issym():
            target.symlink_to(info.linkname)
        else:
            target.write_bytes(data or b"")
            target.chmod(info.mode)
    for directory in ("proc", "sys", "dev"):
        (root / directory).mkdir(exist_ok=True)
    return root


@pytest.fixture
def ocictl(tmp_path: Path, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OciCtl]:
    monkeypatch.setenv("CGCTL_POLICY_DIR", str(tmp_path / "policies"))
    (tmp_path / "policies").mkdir()
    was = syscalls.get_child_subreaper()
    syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)  # as containerd's shim is: the inits are ours to reap
    ctl = OciCtl(tmp_path, rootfs)
    try:
        yield ctl
    finally:
        for name in list(ctl.made):
            ctl("delete", "--force", name, check=False)
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, int(was))
        _reap()
        assert not list((tmp_path / "state").glob("*")), "cgctl-oci left state behind"
        assert not [path for path in CGROUP_PARENT.glob("*") if path.is_dir()], (
            "cgctl-oci left cgroups behind"
        )


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                return
        except ChildProcessError:
            return


class OciCtl:
    def __init__(self, directory: Path, rootfs: Path) -> None:
        self.directory, self.rootfs, self.made = directory, rootfs, set[str]()

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # A container's init keeps create's stdio: /dev/null for it (a shim gives it FIFOs of its own),
        # and the errors from --log, as a shim reads them.
        log = self.directory / "log.json"
        log.unlink(missing_ok=True)
        with tempfile.TemporaryFile("w+") as out:
            status = subprocess.run(
                [
                    CGCTL_OCI,
                    "--root",
                    str(self.directory / "state"),
                    "--log",
                    str(log),
                    "--log-format=json",
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if args[0] == "create" else out,
                stderr=subprocess.DEVNULL,
                timeout=120,
            ).returncode
            out.seek(0)
            errors = (
                [json.loads(line)["msg"] for line in log.read_text().splitlines()] if log.exists() else []
            )
            done = subprocess.CompletedProcess(args, status, out.read(), "\n".join(errors))
        if check:
            assert done.returncode == 0, f"cgctl-oci {' '.join(args)}: {done.stderr}"
        return done

    def bundle(self, name: str, command: list[str], **linux: Any) -> Path:
        bundle = self.directory / f"bundle-{name}"
        bundle.mkdir()
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
        config = json.loads((bundle / "config.json").read_text())
        config["root"] = {"path": str(self.rootfs), "readonly": False}
        config["process"].update(terminal=False, args=command)
        config["linux"].update(cgroupsPath=f"/{CGROUP_PARENT.name}/{name}", **linux)
        config["annotations"] = POD
        (bundle / "config.json").write_text(json.dumps(config))
        return bundle

    def started(self, name: str, command: list[str], **linux: Any) -> dict[str, Any]:
        self("create", "--bundle", str(self.bundle(name, command, **linux)), name)
        self.made.add(name)
        self("start", name)
        return dict(json.loads(self("state", name).stdout))


SLEEPER = ["sleep", "600"]


def test_an_oci_container_is_listed_topped_and_exported_with_its_pod(
    ocictl: OciCtl, capfd: pytest.CaptureFixture[str]
) -> None:
    state = ocictl.started("seen", SLEEPER)
    status, out, err = cgctl_in_process(capfd, "ps", "--json")
    assert status == 0, err
    listed = {entry["name"]: entry for entry in json.loads(out)}
    assert "seen" in listed and listed["seen"]["labels"] == POD
    status, out, err = cgctl_in_process(capfd, "top", "seen", "--json")
    assert status == 0, err
    assert [row["pid"] for row in json.loads(out)] == [state["pid"]]
    text = ContainerCollector().render()
    info = next(
        line for line in text.splitlines() if line.startswith("cgctl_container_info{") and '"seen"' in line
    )
    assert (
        'label_io_kubernetes_pod_name="web-1"' in info and 'label_io_kubernetes_pod_namespace="prod"' in info
    )
    assert f'cgroup="/{CGROUP_PARENT.name}/seen"' in info
    assert 'cgctl_container_cpu_usage_seconds_total{container="seen"}' in text


def test_a_policy_changes_its_memory_max_live_and_an_explicit_limit_wins(
    ocictl: OciCtl, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    free = ocictl.started("free", SLEEPER)
    pinned = ocictl.started("pinned", SLEEPER, resources={"memory": {"limit": 64 * MiB}})
    assert free["status"] == pinned["status"] == "running"
    (tmp_path / "policies" / "10-prod.yaml").write_text(
        "policies:\n  - name: prod\n    match: {labels: {io.kubernetes.pod.namespace: prod}}\n"
        "    limits:\n      memory: {max: 200M}\n"
    )
    status, _, err = cgctl_in_process(capfd, "policy", "apply")
    assert status == 0, err
    assert (CGROUP_PARENT / "free" / "memory.max").read_text().strip() == str(200 * MiB)
    assert (CGROUP_PARENT / "pinned" / "memory.max").read_text().strip() == str(64 * MiB)


def test_cgctl_freeze_and_exec_reach_it_and_its_state_stays_true(
    ocictl: OciCtl, capfd: pytest.CaptureFixture[str]
) -> None:
    ocictl.started("frozen", SLEEPER)
    assert cgctl_in_process(capfd, "freeze", "frozen")[0] == 0
    assert json.loads(ocictl("state", "frozen").stdout)["status"] == "paused"
    assert cgctl_in_process(capfd, "thaw", "frozen")[0] == 0
    assert json.loads(ocictl("state", "frozen").stdout)["status"] == "running"
    status, out, err = cgctl_in_process(capfd, "exec", "frozen", "--", "cat", "/proc/1/cmdline")
    assert status == 0, err
    assert out.split("\0")[:2] == SLEEPER


def test_checkpoint_and_restore_with_runcs_flags(ocictl: OciCtl, tmp_path: Path) -> None:
    counter = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"]
    ocictl.started("counted", counter)
    wait_for(lambda: int(ocictl("exec", "counted", "cat", "/tmp/count").stdout or 0) > 5, "the counter")
    images = tmp_path / "images"
    ocictl(
        "checkpoint",
        "--image-path",
        str(images),
        "--work-path",
        str(tmp_path / "work"),
        "--file-locks",
        "counted",
    )
    assert json.loads(ocictl("state", "counted").stdout)["status"] == "stopped"
    assert (tmp_path / "work" / "dump.log").exists()  # --work-path: CRIU's log goes there
    ocictl("delete", "counted")
    bundle = tmp_path / "bundle-counted"
    ocictl("restore", "--detach", "--image-path", str(images), "--bundle", str(bundle), "counted")
    state = json.loads(ocictl("state", "counted").stdout)
    assert state["status"] == "running"
    before = int(ocictl("exec", "counted", "cat", "/tmp/count").stdout)
    assert before > 5  # the counter came back where it was, not from 0
    deadline = time.monotonic() + 60
    while int(ocictl("exec", "counted", "cat", "/tmp/count").stdout) == before:
        assert time.monotonic() < deadline, "the restored counter does not count"
        time.sleep(0.2)
    for unsupported in ("--lazy-pages", "--pre-dump"):
        done = ocictl("checkpoint", unsupported, "--image-path", str(tmp_path / "x"), "counted", check=False)
        assert done.returncode == 1 and unsupported in done.stderr
        assert json.loads(ocictl("state", "counted").stdout)["status"] == "running"
