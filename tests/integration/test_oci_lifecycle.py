"""cgctl-oci's lifecycle against runc's: every test runs with runc (the reference: each assertion holds
for it) and with cgctl-oci, through their command lines as containerd's shim and conmon call them.

A runtime's `create` returns leaving the container's init behind; this module is its subreaper (as the
shim and conmon are), so it reaps the init and sees its exit status."""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.integration.oci_bundles import (
    CGCTL_OCI,
    UNIFIED,
    alive,
    cgroup_dirs,
    make_bundle,
    read_until,
    reap,
    remove_cgroup_tree,
    runtime_params,
    subreaper,
    wait_for,
)
from tests.integration.workloads import tmpfs

CGROUP_PARENT = UNIFIED / "cgctl-oci-test"
# Runs until SIGTERM (then exits 143: a pid namespace's init only gets signals it handles), and
# writes /started in its root first, so that a test sees whether the user's process has begun.
WAITER = ["sh", "-c", "trap 'exit 143' TERM; touch /started; sleep 1000 & wait"]


class Result(NamedTuple):
    status: int
    out: str
    err: str


@dataclass
class Runtime:
    """One runtime binary with its own --root; bundles under `scratch`."""

    binary: str
    root: Path
    scratch: Path

    def __call__(self, *args: str, globals_: tuple[str, ...] = ()) -> Result:
        """Run a verb with stdio on files, as the shim gives it: a container's init keeps what it inherits,
        so a pipe would never reach EOF."""
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            status = subprocess.run(
                [self.binary, "--root", str(self.root), *globals_, *args],
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=120,
            ).returncode  # fmt: skip
        return Result(status, out.read_text(), err.read_text())

    def bundle(self, name: str, args: list[str], **changes: Any) -> Path:
        return make_bundle(self.scratch / name, args, f"/{CGROUP_PARENT.name}/{name}", **changes)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.status == 0, f"{self.binary} {' '.join(args)}: exit {result.status}: {result.err}"
        return result.out

    def state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.ok("state", name))
        return state

    def started(self, name: str, args: list[str] = WAITER, **changes: Any) -> dict[str, Any]:
        """A running container `name`; its state."""
        self.ok("create", "--bundle", str(self.bundle(name, args, **changes)), name)
        self.ok("start", name)
        wait_for((self.scratch / name / "rootfs/started").exists, f"{name}'s process to start")
        return self.state(name)

    def assert_gone(self, name: str) -> None:
        """`name` is unknown to the runtime and left no cgroup, no state and no process."""
        result = self("state", name)
        assert (result.status, "does not exist" in result.err) == (1, True), result
        assert not (CGROUP_PARENT / name).exists()
        assert os.listdir(self.root) == []


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs for the module's bundles and roots (the VM's root is overlayfs), with this process as
    the subreaper of the containers."""
    path = tmpfs(tmp_path_factory.mktemp("oci"))
    try:
        with subreaper():
            yield path
    finally:
        remove_cgroup_tree(CGROUP_PARENT)
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def oci(runtime: str, scratch: Path, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """The runtime with a fresh --root; whatever a test left is force-deleted, killed and reaped."""
    directory = scratch / request.node.name.replace("[", "-").replace("]", "")
    directory.mkdir()
    runtime_ = Runtime(runtime, directory / "root", directory)
    runtime_.root.mkdir()
    yield runtime_
    for name in os.listdir(runtime_.root):
        runtime_("delete", "--force", name)
    remove_cgroup_tree(CGROUP_PARENT)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break


@runtime_params()
# By name, and by full name with another status; a number is parsed as runc parses it (unit tests).
@pytest.mark.parametrize(("signal_", "status"), [("KILL", 137), ("SIGTERM", 143)])
def test_create_start_kill_delete(oci: Runtime, signal_: str, status: int) -> None:
    bundle = oci.bundle("c1", WAITER)
    assert oci("create", "--bundle", str(bundle), "c1") == (0, "", "")
    state = oci.state("c1")
    assert {key: state.get(key) for key in ("ociVersion", "id", "status", "bundle")} == {
        "ociVersion": state["ociVersion"], "id": "c1", "status": "created", "bundle": str(bundle),
    }  # fmt: skip
    assert state["ociVersion"].startswith("1.")
    pid = state["pid"]
    assert pid > 0 and alive(pid)
    # The window: the cgroup and the init exist, the user's process has not run.
    assert str(pid) in (CGROUP_PARENT / "c1/cgroup.procs").read_text().split()
    time.sleep(1)
    assert not (bundle / "rootfs/started").exists(), "the process ran before start"
    assert oci.state("c1")["status"] == "created"

    assert oci("start", "c1") == (0, "", "")
    wait_for((bundle / "rootfs/started").exists, "the process to run after start")
    assert oci.state("c1")["status"] == "running"

    assert oci("kill", "c1", signal_) == (0, "", "")
    wait_for(lambda: not alive(pid), f"{signal_} to end the container")
    assert oci.state("c1")["status"] == "stopped"
    assert reap(pid) == status
    assert oci("delete", "c1") == (0, "", "")
    oci.assert_gone("c1")


@runtime_params()
def test_run_exits_with_the_container_status(oci: Runtime) -> None:
    result = oci("run", "--bundle", str(oci.bundle("c1", ["sh", "-c", "echo out; exit 3"])), "c1")
    assert (result.status, result.out) == (3, "out\n")
    oci.assert_gone("c1")


@runtime_params()
def test_unknown_ids_are_refused(oci: Runtime) -> None:
    for verb in (["state"], ["start"], ["kill"], ["delete"], ["pause"], ["ps"]):
        result = oci(*verb, "nope")
        assert (result.status, "container does not exist" in result.err) == (1, True), (verb, result)
    assert os.listdir(oci.root) == []


@runtime_params()
def test_wrong_state_operations_fail_and_change_nothing(oci: Runtime) -> None:
    running = oci.started("c1")
    for verb, phrase in (
        (["start"], "cannot start an already running container"),
        (["delete"], "that is not stopped"),
        (["resume"], "container not paused"),
    ):
        result = oci(*verb, "c1")
        assert (result.status, phrase in result.err) == (1, True), (verb, result)
        assert oci.state("c1") == running and alive(running["pid"])
    assert oci("create", "--bundle", str(oci.scratch / "c1"), "c1").status == 1
    assert oci.state("c1") == running
    assert oci("delete", "--force", "c1") == (0, "", "")
    assert reap(running["pid"]) == 137
    oci.assert_gone("c1")

    pid = oci.started("c2")["pid"]
    oci.ok("kill", "c2", "KILL")
    wait_for(lambda: not alive(pid), "the kill")
    stopped = oci.state("c2")
    assert stopped["status"] == "stopped"
    for verb, phrase in (
        (["kill", "c2", "KILL"], "container not running"),
        (["start", "c2"], "cannot start a container that has stopped"),
        (["pause", "c2"], "container not running"),
    ):
        result = oci(*verb)
        assert (result.status, phrase in result.err) == (1, True), (verb, result)
        assert oci.state("c2") == stopped
    reap(pid)
    oci.ok("delete", "c2")
    oci.assert_gone("c2")


@runtime_params()
def test_hooks_run_in_order_with_the_state_on_stdin(oci: Runtime) -> None:
    """The runtime's own hooks, each recording its stdin; runc gives poststart the state it had
    before start ("created"), the OCI spec leaves that open, so "running" is accepted too."""
    record = oci.scratch / "hooks"
    record.mkdir()

    def hook(name: str) -> list[dict[str, Any]]:
        script = f"cat > {record}/{name}.json; echo {name} >> {record}/order"
        return [{"path": "/bin/sh", "args": ["sh", "-c", script]}]

    names = ("prestart", "createRuntime", "poststart", "poststop")
    pid = oci.started("c1", hooks={name: hook(name) for name in names})["pid"]
    oci.ok("kill", "c1", "KILL")
    wait_for(lambda: not alive(pid), "the kill")
    oci.ok("delete", "c1")
    assert (record / "order").read_text().split() == list(names)
    states = {name: json.loads((record / f"{name}.json").read_text()) for name in names}
    bundle = str(oci.scratch / "c1")
    for name, status in (("prestart", {"creating"}), ("createRuntime", {"creating"}),
                         ("poststart", {"created", "running"}), ("poststop", {"stopped"})):  # fmt: skip
        state = states[name]
        assert (state["id"], state["bundle"]) == ("c1", bundle), (name, state)
        assert state["status"] in status, (name, state)
        assert state["ociVersion"].startswith("1."), (name, state)
    assert [states[name]["pid"] for name in names[:3]] == [pid] * 3
    reap(pid)
    oci.assert_gone("c1")


@runtime_params()
def test_a_running_container_pauses_resumes_execs_and_is_listed(oci: Runtime) -> None:
    state = oci.started("c1")
    freeze = CGROUP_PARENT / "c1/cgroup.freeze"
    oci.ok("pause", "c1")
    assert (oci.state("c1")["status"], freeze.read_text().strip()) == ("paused", "1")
    oci.ok("resume", "c1")
    assert (oci.state("c1")["status"], freeze.read_text().strip()) == ("running", "0")

    result = oci("exec", "c1", "sh", "-c", "hostname; cat /started; echo in-exec; exit 7")
    assert (result.status, result.out) == (7, "runc\nin-exec\n"), result

    pids = json.loads(oci.ok("ps", "--format", "json", "c1"))
    assert sorted(pids) == sorted(int(p) for p in (CGROUP_PARENT / "c1/cgroup.procs").read_text().split())
    assert state["pid"] in pids
    listed = json.loads(oci.ok("list", "--format", "json"))
    assert [(c["id"], c["pid"], c["status"], c["bundle"]) for c in listed] == [
        ("c1", state["pid"], "running", str(oci.scratch / "c1"))
    ]
    oci.ok("kill", "c1", "TERM")
    assert reap(state["pid"]) == 143
    oci.ok("delete", "c1")
    oci.assert_gone("c1")


@runtime_params()
def test_errors_land_in_the_json_log(oci: Runtime) -> None:
    log = oci.scratch / "log.json"
    result = oci("state", "nope", globals_=("--log", str(log), "--log-format", "json"))
    assert (result.status, "container does not exist" in result.err) == (1, True), result
    entry = json.loads(log.read_text().splitlines()[-1])
    assert (entry["level"], "container does not exist" in entry["msg"]) == ("error", True), entry
    datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))


@pytest.mark.parametrize("runtime", [CGCTL_OCI], ids=["cgctl-oci"])
def test_an_unsupported_field_is_refused_by_name_leaving_nothing(oci: Runtime) -> None:
    """cgctl-oci only: runc supports intelRdt where the host has it; cgctl does not."""
    bundle = oci.bundle("c1", WAITER)
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["intelRdt"] = {"closID": "guaranteed_group"}
    (bundle / "config.json").write_text(json.dumps(config))
    result = oci("create", "--bundle", str(bundle), "c1")
    assert (result.status, "intelRdt" in result.err) == (1, True), result
    assert cgroup_dirs(CGROUP_PARENT) == []
    oci.assert_gone("c1")


@runtime_params()
def test_a_terminal_comes_through_the_console_socket(oci: Runtime) -> None:
    bundle = oci.bundle("c1", ["sh"], process={"terminal": True})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(oci.scratch / "console.sock"))
        listener.listen(1)
        listener.settimeout(60)
        create = subprocess.Popen(
            [oci.binary, "--root", str(oci.root), "create", "--bundle", str(bundle),
             "--console-socket", str(oci.scratch / "console.sock"), "c1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        connection, _ = listener.accept()
        with connection:
            fds = array.array("i")
            _, ancillary, _, _ = connection.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
        assert create.wait(timeout=60) == 0
    level, kind, data = ancillary[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    master = int.from_bytes(data[: fds.itemsize], "little")
    try:
        pid = oci.state("c1")["pid"]
        oci.ok("start", "c1")
        os.write(master, b"tty; echo h''i; exit 5\n")
        seen = read_until(master, b"\nhi\r")
        assert b"/dev/pts/0" in seen, seen
    finally:
        os.close(master)
    assert reap(pid) == 5
    oci.ok("delete", "c1")
    oci.assert_gone("c1")
