"""`cgctl exec` without a cgroup v2 kernel: the CLI's refusals, what prepare finds in a run record and
the container's init, and start's fork, reports and statuses on this host (a target that joins no
namespace and "joins" a cgroup that is a plain file). tests/integration/test_exec.py does the rest."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl import sandbox, state
from cgctl.cli import main
from cgctl.runtime import exec as execution
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import ExecSpec, Security


def cgctl(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")  # no daemon to find
    monkeypatch.setattr("cgctl.runtime.interface.SYSTEM_SOCKET", Path("/nonexistent/cgctl.sock"))
    monkeypatch.setattr("sys.argv", ["cgctl", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["web"], "no command given: cgctl exec [OPTIONS] web -- CMD [ARGS...]"),
        (["web", "--"], "no command given"),
        (["-e", "1A=x", "web", "--", "true"], "invalid --env: '1A' is not an environment variable name"),
        (
            ["-w", "tmp", "web", "--", "true"],
            "invalid value 'tmp' for --workdir: 'tmp' is not an absolute path",
        ),
        (["-u", "a b", "web", "--", "true"], "invalid value 'a b' for --user"),
        (["web", "--", ""], "invalid CMD: the command is empty"),
        (["--detach-keys", "ctrl-1", "web", "--", "true"], "invalid value 'ctrl-1' for --detach-keys"),
        (["-t", "web", "--", "sh"], "the output device is not a terminal"),
        (["-it", "web", "--", "sh"], "the input device is not a terminal"),
        (["nosuch", "--", "true"], "no running container named 'nosuch'"),
    ],
)
def test_bad_input_exits_125_naming_the_option(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.setenv("CGCTL_STATE_DIR", str(tmp_path / "runs"))
    status, err = cgctl(monkeypatch, capsys, "exec", *args)
    assert status == 125
    assert expected in err, err


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[Path, Path, state.Claim]]:
    """A live run record for "web" whose init is this very process and whose cgroup is a directory."""
    group = tmp_path / "web"
    group.mkdir()
    (group / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    spec = {"command": ["sleep", "1000"], "user": "65534", "workdir": "/srv"}
    runs = tmp_path / "runs"
    claim = state.claim(runs, "web", {"cgroup": str(group), "pid": os.getpid(), "spec": spec})
    yield runs, group, claim
    claim.release()


def test_prepare_takes_the_containers_environment_user_and_workdir(
    container: tuple[Path, Path, state.Claim], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, group, _ = container
    target = execution.prepare(runs, "web", ExecSpec(command=["id"], env={"A": "1"}))
    own = dict(
        os.fsdecode(e).partition("=")[::2] for e in Path("/proc/self/environ").read_bytes().split(b"\0") if e
    )
    assert target.env == {**own, "A": "1"}
    assert (target.user, target.workdir, target.pid) == ("65534", "/srv", os.getpid())
    assert target.cgroup_procs == str(group / "cgroup.procs")
    assert target.namespaces == ()  # all ours: none to join
    assert target.sandbox == sandbox.plan(Security())
    mine = execution.prepare(runs, "web", ExecSpec(command=["id"], user="root", workdir="/tmp"))
    assert (mine.user, mine.workdir) == ("root", "/tmp")


def test_prepare_refuses_what_the_container_cannot_take(container: tuple[Path, Path, state.Claim]) -> None:
    runs, group, claim = container
    with pytest.raises(LookupError, match="no running container named 'db'"):
        execution.prepare(runs, "db", ExecSpec(command=["id"]))
    with pytest.raises(execution.ExecError, match="--privileged on exec needs a container started with"):
        execution.prepare(runs, "web", ExecSpec(command=["id"], privileged=True))
    (group / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    with pytest.raises(execution.ExecError, match=r"web is frozen: `cgctl thaw web` first") as refused:
        execution.prepare(runs, "web", ExecSpec(command=["id"]))
    assert refused.value.exit_code == 125
    state.update(claim.path, pid=None)
    with pytest.raises(execution.ExecError, match="web has not started its process yet"):
        execution.prepare(runs, "web", ExecSpec(command=["id"]))


def own_capabilities() -> int:
    """Ours (this host may not give even root all of them): the sandbox keeps them as they are."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("CapEff:")), 16)


def host_target(tmp_path: Path, argv: list[str], **fields: object) -> execution.Target:
    """A target on this host that joins nothing and keeps our privileges: start's forks, reports and
    statuses alone."""
    return execution.Target(
        **{
            "name": "web",
            "pid": os.getpid(),
            "cgroup_procs": str(tmp_path / "cgroup.procs"),
            "namespaces": (),
            "sandbox": sandbox.Plan(own_capabilities(), (), False, None),
            "argv": argv,
            "env": {"PATH": "/usr/bin:/bin", "A": "1"},
            "user": None,
            "workdir": str(tmp_path),
            "tty": False,
            "interactive": False,
            **fields,
        }  # type: ignore[arg-type]
    )


def test_start_runs_the_command_as_our_child_with_the_given_stdio(tmp_path: Path) -> None:
    read, write = os.pipe()
    target = host_target(tmp_path, ["sh", "-c", 'echo "$A $(pwd) $(cat /proc/self/cgroup | wc -l)"; exit 7'])
    started = execution.start(target, stdio=(os.open(os.devnull, os.O_RDONLY), write, write))
    os.close(write)
    assert started.master is None and started.alive_fd is None
    assert execution.wait(started.pid) == 7  # a child of ours: waitpid works
    with os.fdopen(read) as out:
        assert out.read().split()[:2] == ["1", str(tmp_path)]
    assert (tmp_path / "cgroup.procs").read_text() == "0"  # the joining child wrote itself there


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["no-such-command"], 127, "no-such-command: command not found"),
        (["./data"], 126, "./data: cannot execute: Permission denied"),
    ],
)
def test_a_command_that_cannot_run_is_127_or_126(
    tmp_path: Path, argv: list[str], code: int, message: str
) -> None:
    (tmp_path / "data").write_text("not a program\n")  # mode 0644, in the workdir
    with pytest.raises(SpawnError) as failed:
        execution.start(host_target(tmp_path, argv))
    assert (failed.value.exit_code, str(failed.value)) == (code, message)


def test_a_setup_failure_is_125_with_its_stage(tmp_path: Path) -> None:
    with pytest.raises(SpawnError) as failed:
        execution.start(host_target(tmp_path, ["true"], workdir="/no/such/dir"))
    assert failed.value.exit_code == 125
    assert "while changing to the working directory /no/such/dir" in str(failed.value)
    with pytest.raises(SpawnError, match="while joining web's cgroup"):
        execution.start(host_target(tmp_path, ["true"], cgroup_procs=str(tmp_path / "no" / "cgroup.procs")))


def test_a_signal_is_128_plus_its_number(tmp_path: Path) -> None:
    started = execution.start(host_target(tmp_path, ["sh", "-c", "kill -TERM $$"]))
    assert execution.wait(started.pid) == 128 + 15


def test_with_a_terminal_the_master_comes_back(tmp_path: Path) -> None:
    started = execution.start(
        host_target(tmp_path, ["sh", "-c", "tty; stty size"], tty=True), terminal=(12, 34)
    )
    assert started.master is not None
    output = b""
    while select.select([started.master], [], [], 10)[0]:
        try:
            chunk = os.read(started.master, 1024)
        except OSError:  # EIO: the process has closed its side
            break
        if not chunk:
            break
        output += chunk
    os.close(started.master)
    assert execution.wait(started.pid) == 0
    lines = output.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["12", "34"], output
