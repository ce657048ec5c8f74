"""`cgctl machine` on this host without booting it: its directory, token and disk, its settings, what
qemu is asked to expose, and every bad input refused with nothing changed. The booted machine is
tested in tests/machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cgctl.daemon.server import TokenGate
from cgctl.machine.instance import Config, Machine, MachineError

GiB = 1 << 30


def cli(*args: str) -> tuple[int, str, str]:
    """One cgctl command in a process of its own, as a user types it: (status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "cgctl", *args], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def block_count(disk: Path) -> int:
    header = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    assert fields["Filesystem volume name"].strip() == "cgctl-data"
    return int(fields["Block count"])


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CGCTL_MACHINE_DIR", str(tmp_path / "machine"))
    return tmp_path / "machine"


def test_init_makes_a_private_home_a_token_and_an_empty_ext4_disk(home: Path, tmp_path: Path) -> None:
    status, out, err = cli("machine", "init", "--disk-size", "2G", "--cpus", "1", "--share", str(tmp_path))
    assert status == 0, err
    assert f"shared read-write: {tmp_path}" in out
    assert home.stat().st_mode & 0o777 == 0o700
    token = home / "share" / "token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) >= 32
    assert (home / "disk.img").stat().st_size == 2 * GiB
    assert (home / "disk.img").stat().st_blocks * 512 < 256 << 20, "the disk should be sparse"
    assert block_count(home / "disk.img") == 2 * GiB // 4096
    config = json.loads((home / "config.json").read_text())
    assert (config["cpus"], config["shares"]) == (1, [str(tmp_path)])
    assert 0 < config["metrics_port"] < 65536

    status, _, err = cli("machine", "init")
    assert status == 125 and "a machine already exists" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--share", "relative/dir"], "expected an existing directory's absolute path"),
        (["--share", "/nonexistent/dir"], "expected an existing directory's absolute path"),
        (["--memory", "512M"], "invalid value '512M' for --memory: at least 1G"),
        (["--disk-size", "lots"], "invalid value 'lots' for --disk-size"),
        (["--cpus", "0"], "Invalid value for '--cpus'"),
    ],
)
def test_init_refuses_bad_input_and_creates_nothing(home: Path, args: list[str], message: str) -> None:
    status, _, err = cli("machine", "init", *args)
    assert status == 125 and message in err, err
    assert not home.exists()


def test_a_share_with_a_space_is_refused(home: Path, tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    spaced.mkdir()
    status, _, err = cli("machine", "init", "--share", str(spaced))
    assert status == 125 and "cannot share a path with spaces" in err
    assert not home.exists()


def test_a_machine_directory_qemu_cannot_take_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "a,b" / "machine"
    monkeypatch.setenv("CGCTL_MACHINE_DIR", str(home))
    status, _, err = cli("machine", "init", "--share", str(tmp_path))
    assert status == 125 and "set CGCTL_MACHINE_DIR to a plain path" in err
    assert not home.exists()


def test_set_grows_the_disk_adds_shares_and_never_shrinks(home: Path, tmp_path: Path) -> None:
    assert cli("machine", "init", "--disk-size", "1G", "--share", str(tmp_path))[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    status, _, err = cli("machine", "set", "--disk-size", "3G", "--memory", "2G", "--share", str(other))
    assert status == 0, err
    assert block_count(home / "disk.img") == 3 * GiB // 4096
    config = Machine(home).config()
    assert (config.memory, config.disk_size, config.shares) == ("2048M", 3 * GiB, [str(tmp_path), str(other)])
    status, _, err = cli("machine", "set", "--disk-size", "2G")
    assert status == 125 and "the disk can only grow" in err
    assert Machine(home).config().disk_size == 3 * GiB


def test_verbs_on_no_machine_say_how_to_make_one(home: Path) -> None:
    for verb in (["status"], ["start"], ["set", "--cpus", "2"], ["rm"]):
        status, _, err = cli("machine", *verb)
        assert status == 125 and "no machine in" in err and "cgctl machine init" in err, (verb, err)
    assert not home.exists()


def test_a_stale_run_record_is_not_a_running_machine(home: Path, tmp_path: Path) -> None:
    machine = Machine(home)
    machine.init(Config(disk_size=GiB, shares=[str(tmp_path)]))
    # A live pid that is not this machine's qemu (pids are reused after a reboot).
    (home / "run.json").write_text(
        json.dumps({"pid": os.getpid(), "api_port": 1, "metrics_port": 2, "started_at": 0})
    )
    assert machine.running() is None
    (home / "run.json").unlink()
    (home / "run.json").mkdir()  # unreadable, as another user's is to a user whose HOME is not theirs
    assert machine.running() is None
    assert cli("ps")[0] == 0, "a machine this user cannot read must not break the other verbs"
    (home / "run.json").rmdir()
    status, out, _ = cli("machine", "status")
    assert status == 0 and "state:    stopped" in out
    status, _, err = cli("machine", "shell")
    assert status == 125 and "not running" in err
    assert cli("machine", "rm")[0] == 0
    assert not home.exists()


def test_qemu_exposes_the_api_and_metrics_on_loopback_only(home: Path, tmp_path: Path) -> None:
    machine = Machine(home)
    machine.init(Config(disk_size=GiB, metrics_port=9999, shares=[str(tmp_path)]))
    argv = machine.qemu_argv(tmp_path / "image", machine.config(), 12345)
    (netdev,) = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-netdev"]
    options = netdev.split(",")
    assert "restrict=on" in options, "the guest must reach nothing outside"
    forwards = sorted(option for option in options if option.startswith("hostfwd="))
    assert forwards == ["hostfwd=tcp:127.0.0.1:12345-:9700", "hostfwd=tcp:127.0.0.1:9999-:9753"]
    shares = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-fsdev"]
    assert any(f"path={tmp_path}," in share and "readonly" not in share for share in shares)
    assert any("path=/," in share and "readonly=on" in share for share in shares)


def test_machine_error_is_raised_for_init_twice(home: Path, tmp_path: Path) -> None:
    machine = Machine(home)
    machine.init(Config(disk_size=GiB, shares=[str(tmp_path)]))
    with pytest.raises(MachineError, match="already exists"):
        machine.init(Config(disk_size=GiB))


async def _call(gate: TokenGate, scope: dict[str, object]) -> int:
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await gate(scope, receive, send)  # type: ignore[arg-type]
    return int(sent[0]["status"])  # type: ignore[call-overload]


def test_token_gate_guards_tcp_and_lets_the_unix_socket_through() -> None:
    import asyncio

    async def inner(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]

    gate = TokenGate(inner, "s3cret")

    def scope(server: object, authorization: bytes | None) -> dict[str, object]:
        headers = [(b"authorization", authorization)] if authorization is not None else []
        return {"type": "http", "server": server, "headers": headers, "method": "GET", "path": "/"}

    tcp = ("10.0.2.15", 9700)
    assert asyncio.run(_call(gate, scope(tcp, b"Bearer s3cret"))) == 200
    assert asyncio.run(_call(gate, scope(tcp, b"Bearer wrong"))) == 401
    assert asyncio.run(_call(gate, scope(tcp, b"s3cret"))) == 401
    assert asyncio.run(_call(gate, scope(tcp, None))) == 401
    assert asyncio.run(_call(gate, scope(None, None))) == 401  # unknown: not let through
    assert asyncio.run(_call(gate, scope(("/run/cgctl/cgctl.sock", None), None))) == 200  # a unix socket


def test_token_gate_guards_websockets_too() -> None:
    """Attach and exec streams over TCP: refused before the handshake without the token."""
    import asyncio

    async def inner(scope: object, receive: object, send: object) -> None:
        await send({"type": "websocket.accept"})  # type: ignore[operator]

    async def handshake(authorization: bytes | None) -> str:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        headers = [(b"authorization", authorization)] if authorization is not None else []
        scope = {"type": "websocket", "server": ("127.0.0.1", 9700), "headers": headers, "path": "/"}
        await TokenGate(inner, "s3cret")(scope, None, send)  # type: ignore[arg-type]
        return str(sent[0]["type"])

    assert asyncio.run(handshake(b"Bearer s3cret")) == "websocket.accept"
    assert asyncio.run(handshake(b"Bearer wrong")) == "websocket.close"
    assert asyncio.run(handshake(None)) == "websocket.close"


@pytest.mark.parametrize(
    ("mode", "text", "message"),
    [
        (0o644, "x" * 40, "others may read the token (mode 644); fix: chmod 600"),
        (0o600, "short", "the token is too short"),
    ],
)
def test_daemon_tcp_refuses_a_weak_token_file_before_listening(
    tmp_path: Path, mode: int, text: str, message: str
) -> None:
    token = tmp_path / "token"
    token.write_text(text)
    token.chmod(mode)
    socket_path = tmp_path / "run" / "cgctl.sock"
    status, _, err = cli(
        "daemon", "--socket", str(socket_path), "--tcp", "127.0.0.1:9", "--token-file", str(token)
    )
    assert status == 125 and message in err, err
    assert not socket_path.exists()


def test_daemon_tcp_needs_a_token_file(tmp_path: Path) -> None:
    status, _, err = cli("daemon", "--socket", str(tmp_path / "s"), "--tcp", "127.0.0.1:9")
    assert status == 125 and "--tcp needs --token-file" in err
