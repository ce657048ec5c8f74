"""`run -it` and `attach`, driven through a real terminal (tmux) as a person types: a prompt, the
workload's own pty, its size following the window, Ctrl-C and Ctrl-Z reaching it, its status, and
the caller's terminal back in cooked mode; here and through the daemon, with detach and attach."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import oci
from tests.integration.daemon import Daemon
from tests.integration.tmux import PROMPT, Tmux, cooked, shell_session
from tests.integration.workloads import PYTHON, workload_cgroups

IMAGE = "term:1"
CGCTL = [PYTHON, "-m", "cgctl"]


@pytest.fixture(scope="module")
def image(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """term:1 in the daemon's store, which the foreground runs use too (CGCTL_IMAGE_STORE)."""
    layout = tmp_path_factory.mktemp("term") / "layout"
    oci.write_oci_layout(layout, [oci.busybox_layer(oci.directory("tmp", 0o1777))], Env=["PATH=/bin"])
    daemon.api.import_image(str(layout), IMAGE)
    return {"CGCTL_IMAGE_STORE": str(daemon.images)}


def test_run_it_here(image: dict[str, str], no_leaks: None, tmux: Tmux) -> None:
    tmux.start(
        [*CGCTL, "run", "-it", "--image", IMAGE, "--mem", "64M", "--name", "tty-here", "--", "sh"], image
    )
    tmux.wait_for(PROMPT)
    shell_session(tmux)
    tmux.type("cat /sys/fs/cgroup/memory.max")  # its limits hold on a terminal too
    tmux.wait_for(r"^67108864\s*$")
    tmux.type("exit 3")
    status, stty = tmux.exit_status()
    assert status == 3
    assert cooked(stty), stty


@pytest.mark.parametrize("interactive", [True, False])
def test_tty_needs_a_terminal(image: dict[str, str], interactive: bool, no_leaks: None) -> None:
    options = ["-i", "-t"] if interactive else ["-t"]
    found = subprocess.run(
        [*CGCTL, "run", *options, "--image", IMAGE, "--name", "refused-tty", "--", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env={**os.environ, **image},
    )  # fmt: skip
    assert found.returncode == 125, found
    assert "is not a terminal" in found.stderr and "drop -t" in found.stderr, found.stderr
    assert "refused-tty" not in workload_cgroups()


def test_run_it_through_the_daemon_detach_and_attach(
    daemon: Daemon, image: dict[str, str], tmux: Tmux
) -> None:
    tmux.start([*CGCTL, "-H", daemon.host, "run", "-it", "--image", IMAGE, "--mem", "64M", "--name", "tty-d",
                "--", "sh"])  # fmt: skip
    tmux.wait_for(PROMPT)  # the prompt it printed before the stream was attached is replayed
    shell_session(tmux)
    tmux.type("cat /sys/fs/cgroup/memory.max")
    tmux.wait_for(r"^67108864\s*$")
    tmux.keys("C-p", "C-q")
    tmux.wait_for(r"detached from tty-d")
    status, stty = tmux.exit_status()
    assert status == 0 and cooked(stty), stty
    assert daemon.api.inspect("tty-d").state == "running"

    again = Tmux(tmux.socket.parent / "again")
    (tmux.socket.parent / "again").mkdir()
    try:
        again.start([*CGCTL, "-H", daemon.host, "attach", "tty-d"])
        time.sleep(2)
        again.type("echo back-$((2+3))")
        again.wait_for(r"^back-5\s*$")
        again.type("exit 4")
        status, stty = again.exit_status()
        assert status == 4 and cooked(stty), stty
    finally:
        again.kill()
    assert daemon.api.inspect("tty-d").exit_code == 4
    daemon.api.remove("tty-d")


def test_run_dit_then_attach(daemon: Daemon, image: dict[str, str], tmux: Tmux) -> None:
    started = subprocess.run(
        [*CGCTL, "-H", daemon.host, "run", "-dit", "--image", IMAGE, "--name", "tty-bg", "--", "sh"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )  # fmt: skip
    assert started.returncode == 0 and started.stdout.strip() == "tty-bg", started
    refused = subprocess.run(
        [*CGCTL, "-H", daemon.host, "checkpoint", "tty-bg", "--dir", str(tmux.socket.parent / "dump")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 125, refused
    assert "is a terminal" in refused.stderr and "without -t" in refused.stderr, refused.stderr
    assert not (tmux.socket.parent / "dump").exists() or not any((tmux.socket.parent / "dump").iterdir())
    tmux.start([*CGCTL, "-H", daemon.host, "attach", "tty-bg"])
    time.sleep(2)
    tmux.type("")
    tmux.wait_for(PROMPT)
    tmux.type("tty")
    tmux.wait_for(r"^/dev/pts/\d+\s*$")
    tmux.type("exit 5")
    status, stty = tmux.exit_status()
    assert status == 5 and cooked(stty), stty
    logged = subprocess.run([*CGCTL, "-H", daemon.host, "logs", "tty-bg"], capture_output=True, text=True)
    assert "/dev/pts/" in logged.stdout  # a terminal's output is logged as stdout
    daemon.api.remove("tty-bg")


def test_attach_needs_a_running_container(daemon: Daemon, image: dict[str, str]) -> None:
    found = subprocess.run([*CGCTL, "-H", daemon.host, "attach", "no-such"], capture_output=True, text=True)
    assert found.returncode == 125 and "no-such" in found.stderr, found


@pytest.fixture
def running(daemon: Daemon, image: dict[str, str]) -> Iterator[str]:
    """A detached image container to exec into."""
    name = f"ex-{time.monotonic_ns() % 100000}"
    started = subprocess.run(
        [*CGCTL, "-H", daemon.host, "run", "-d", "--image", IMAGE, "--mem", "64M", "--name", name, "--",
         "sleep", "1000"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )  # fmt: skip
    assert started.returncode == 0, started
    yield name
    daemon.api.remove(name, force=True)


def test_exec_through_the_daemon_passes_output_input_and_status(daemon: Daemon, running: str) -> None:
    script = "echo out-$((6*7)); echo err >&2; exit 7"
    done = subprocess.run(
        [*CGCTL, "-H", daemon.host, "exec", running, "--", "sh", "-c", script],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (7, "out-42\n", "err\n")
    piped = subprocess.run(
        [*CGCTL, "-H", daemon.host, "exec", "-i", running, "--", "sh", "-c", "cat; echo done"],
        input="line one\nline two\n", capture_output=True, text=True,
    )  # fmt: skip
    assert (piped.returncode, piped.stdout) == (0, "line one\nline two\ndone\n"), piped
    over_tcp = subprocess.run(
        [*CGCTL, "-H", f"tcp://{daemon.tcp}", "exec", running, "--", "cat", "/proc/sys/kernel/hostname"],
        env={**os.environ, "CGCTL_TOKEN_FILE": str(daemon.token_file)}, capture_output=True, text=True,
    )  # fmt: skip
    assert (over_tcp.returncode, over_tcp.stdout) == (0, f"{running}\n"), over_tcp
    missing = subprocess.run([*CGCTL, "-H", daemon.host, "exec", running, "--", "nope"], capture_output=True)
    assert missing.returncode == 127


def test_exec_it_through_the_daemon(daemon: Daemon, running: str, tmux: Tmux) -> None:
    tmux.start([*CGCTL, "-H", daemon.host, "exec", "-it", running, "--", "sh"])
    tmux.wait_for(PROMPT)
    shell_session(tmux)
    tmux.type("cat /proc/1/cmdline | tr '\\0' ' '; echo")
    tmux.wait_for(r"^sleep 1000\s*$")
    tmux.type("exit 6")
    status, stty = tmux.exit_status()
    assert status == 6 and cooked(stty), stty
    assert daemon.api.inspect(running).state == "running"


def test_streams_refuse_bad_requests_and_strangers(daemon: Daemon, running: str) -> None:
    """Bad first messages, unknown and stopped containers: an error as a request would get; over TCP
    without the token: no handshake at all."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect, unix_connect

    def first(path: str, message: str | None = None) -> dict[str, object]:
        with unix_connect(str(daemon.socket), f"ws://localhost{path}") as stream:
            if message is not None:
                stream.send(message)
            return dict(json.loads(stream.recv(timeout=60)))

    bad = first(f"/v1/containers/{running}/exec", '{"spec": {"command": []}}')
    assert (bad["ok"], bad["status"], bad["exit_code"]) == (False, 400, 125)
    assert "spec.command" in str(bad["message"])
    unknown = first(f"/v1/containers/{running}/exec", "not json")
    assert (unknown["ok"], unknown["status"]) == (False, 400)
    nobody = first("/v1/containers/nobody/attach")
    assert (nobody["ok"], nobody["status"]) == (False, 404), nobody
    nobody = first("/v1/containers/nobody/exec", '{"spec": {"command": ["true"]}}')
    assert (nobody["ok"], nobody["exit_code"]) == (False, 125), nobody
    with pytest.raises(InvalidStatus):
        connect(f"ws://{daemon.tcp}/v1/containers/{running}/attach", open_timeout=60)


def test_streams_over_ssh_dial_stdio(daemon: Daemon, running: str, tmp_path: Path) -> None:
    """ssh://HOST runs `ssh HOST -- cgctl dial-stdio`: the streams pass that pipe too. The `ssh` here
    runs its remote command locally (the transport under test is dial-stdio, not OpenSSH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done; shift; exec "$@"\n')
    (bin_dir / "cgctl").write_text(f'#!/bin/sh\nexec {PYTHON} -m cgctl "$@"\n')
    for tool in ("ssh", "cgctl"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    host = f"ssh://tester@localhost{daemon.socket}"
    done = subprocess.run(
        [*CGCTL, "-H", host, "exec", "-i", running, "--", "sh", "-c", "read line; echo got-$line; exit 9"],
        input="over-ssh\n", env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (9, "got-over-ssh\n"), done


def test_attach_without_a_terminal_feeds_stdin_and_ends_with_it(
    daemon: Daemon, image: dict[str, str]
) -> None:
    """`run -di`: stdin is a pipe the keeper holds open for attach; the end of ours ends its."""
    started = subprocess.run(
        [*CGCTL, "-H", daemon.host, "run", "-di", "--image", IMAGE, "--name", "piped", "--",
         "sh", "-c", "while read line; do echo got-$line; done; echo stdin-ended; exit 12"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )  # fmt: skip
    assert started.returncode == 0, started
    attached = subprocess.run(
        [*CGCTL, "-H", daemon.host, "attach", "piped"], input="a\nb\n", capture_output=True, text=True
    )
    assert (attached.returncode, attached.stdout) == (12, "got-a\ngot-b\nstdin-ended\n"), attached
    daemon.api.remove("piped")
