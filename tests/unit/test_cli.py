"""The CLI's contract before anything runs: bad input exits 125 naming the option and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgctl.cli import main


def cgctl(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["cgctl", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--mem", "256Q", "--", "true"], "invalid value '256Q' for --mem: not a size: use bytes or K/M/G/T"),
        (["--mem", "-1", "--", "true"], "invalid value '-1' for --mem"),
        (["--name", "../x", "--", "true"], "invalid value '../x' for --name"),
        (["--name", "", "--", "true"], "invalid value '' for --name"),
        (["--mem", "1G"], "no command given"),
        (["--mem-high", "lots", "--", "true"], "invalid value 'lots' for --mem-high"),
        (
            ["--swap", "1.5", "--", "true"],
            "invalid value '1.5' for --swap: a size in bytes must be a whole number",
        ),
        (["--cpus", "0", "--", "true"], "invalid value '0' for --cpus: give at least 0.01 CPUs"),
        (
            ["--cpu-weight", "10001", "--", "true"],
            "invalid value '10001' for --cpu-weight: Input should be less than or equal to 10000",
        ),
        (
            ["--cpu-weight", "many", "--", "true"],
            "invalid value 'many' for --cpu-weight: Input should be a valid integer",
        ),
        (["--cpuset", "3-1", "--", "true"], "invalid value '3-1' for --cpuset: the range 3-1 runs backwards"),
        (["--io-max", "/dev/sda", "--", "true"], "invalid value '/dev/sda' for --io-max: not DEV:KEY"),
        (["--pids", "0", "--", "true"], "invalid value '0' for --pids: 0 would forbid the workload itself"),
        (["--share", "time", "--", "true"], "invalid value 'time' for --share"),
        (["--label", "novalue", "--", "true"], "invalid value 'novalue' for --label: expected KEY=VALUE"),
        (["--hostname", "", "--", "true"], "invalid value '' for --hostname"),
        (["--no-such-option", "--", "true"], "No such option: --no-such-option"),
        (["--cap-add", "SYS_WIZARD", "--", "true"], "invalid value 'SYS_WIZARD' for --cap-add: not a Linux"),
        (["--cap-drop", "cap_", "--", "true"], "invalid value 'cap_' for --cap-drop"),
        (["--cap-add", "ALL", "--", "true"], "invalid --cap-add: adding ALL capabilities is --privileged"),
        (["--device", "dev/vda", "--", "true"], "invalid value 'dev/vda' for --device: 'dev/vda' is not"),
        (["--device", "/dev/vda:rwx", "--", "true"], "invalid value 'rwx' for --device: 'rwx' is not an"),
        (["--device", "/dev/vda:/dev/xvda", "--", "true"], "a path of its own needs a root of its own"),
        (["--share", "mnt", "--", "true"], "--share mnt needs --privileged"),
        (
            ["--seccomp", "/no/such/profile.json", "--", "true"],
            "invalid value '/no/such/profile.json' for --seccomp",
        ),
    ],
)
def test_bad_input_exits_125_naming_option_and_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, err = cgctl(monkeypatch, capsys, "run", *args)
    assert code == 125
    assert expected in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["stats", "--max-depth", "2"], "--max-depth selects among every cgroup of the host: add --all"),
        (["stats", "--max-depth", "0"], "--max-depth selects among every cgroup of the host: add --all"),
        (["exporter", "--include", "/x"], "--include selects among every cgroup of the host: add --all"),
        (["stats", "--all", "web"], "name containers or show every cgroup with --all, not both"),
        (["stats", "--all", "--max-depth", "-1"], "Invalid value for '--max-depth'"),
        (["stats", "--all", "--sort", "size"], "'size' is not one of"),
        (
            ["exporter", "--all", "--include", "system.slice"],
            "invalid value 'system.slice' for --include: cgroup paths start with /",
        ),
        (
            ["exporter", "--all", "--cgroup-root", "/tmp"],
            "invalid value '/tmp' for --cgroup-root: not a cgroup",
        ),
        (["daemon", "--metrics-exclude", "/x"], "--metrics-exclude selects among every cgroup of the host"),
        (["daemon", "--metrics-compat", "node"], "invalid value 'node' for --metrics-compat"),
    ],
)
def test_hostwide_options_refuse_bad_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, err = cgctl(monkeypatch, capsys, *args)
    assert code == 125
    assert expected in err


def test_version_and_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", ["cgctl", "--version"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("cgctl ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run", "-d", "--", "true"],
            "`cgctl run -d` needs the cgctl daemon, and none answers: start the daemon",
        ),
        (["run", "--restart", "always", "--", "true"], "`cgctl run --restart` needs the cgctl daemon"),
        (["logs", "web"], "`cgctl logs` needs the cgctl daemon, and none answers: start the daemon first"),
        (["wait", "web"], "`cgctl wait` needs the cgctl daemon, and none answers"),
        (["restore", "-d", "--dir", "/nonexistent"], "`cgctl restore -d` needs the cgctl daemon"),
        (["policy", "status"], "`cgctl policy status` needs the cgctl daemon (the active policy set is"),
        (
            ["--host", "unix:///nonexistent/cgctl.sock", "ps"],
            "cannot reach the cgctl daemon at unix:///nonexistent",
        ),
        (["--host", "tcp://1.2.3.4", "ps"], "invalid value 'tcp://1.2.3.4' for --host"),
        (["events", "--since", "yesterday"], "invalid value 'yesterday' for --since"),
        (["attach", "web"], "no running container named 'web'"),
    ],
)
def test_daemon_verbs_without_a_daemon(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")  # no rootless daemon's socket either
    monkeypatch.setattr("cgctl.runtime.interface.SYSTEM_SOCKET", Path("/nonexistent/cgctl.sock"))
    status, err = cgctl(monkeypatch, capsys, *args)
    assert status == 125
    assert expected in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "-it", "--", "sh"], "-t: the input device is not a terminal (stdin is redirected): drop -t"),
        (["run", "-t", "--", "sh"], "-t: the output device is not a terminal (stdout is redirected)"),
        (["run", "-it", "--detach-keys", "ctrl-1", "--", "sh"], "invalid value 'ctrl-1' for --detach-keys"),
        (["attach", "--detach-keys", "abc", "web"], "invalid value 'abc' for --detach-keys"),
    ],
)
def test_terminal_options_refuse_what_cannot_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    """Under pytest, stdin and stdout are not terminals: -t is refused before anything is made."""
    status, err = cgctl(monkeypatch, capsys, *args)
    assert status == 125
    assert expected in err
