"""The daemon end to end, through the CLI and the API: detached runs, logs, wait, rm, attach,
events, restart policies, OOM events, bad input, the socket's permissions, the TCP listener's token."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cgctl.runtime.api import CreateRequest, Event, Failure, Invalid
from cgctl.runtime.remote import RemoteRuntime, UnixConnection
from tests import oci
from tests.integration.daemon import Daemon
from tests.integration.workloads import MiB, allocate, cgctl_in_process, spec, wait_for

pytestmark = pytest.mark.usefixtures("no_leaks")


def test_detached_run_logs_kill_wait_and_rm(capfd: pytest.CaptureFixture[str], daemon: Daemon) -> None:
    status, out, err = daemon.cli(
        capfd, "run", "-d", "--name", "web", "--label", "tier=front", "--", "sh", "-c",
        "echo hello; echo oops >&2; exec sleep 1000",
    )  # fmt: skip
    assert (status, out, err) == (0, "web\n", "")
    status, out, _ = daemon.cli(capfd, "ps", "--json", "--filter", "label=tier=front")
    (listed,) = json.loads(out)
    assert (listed["name"], listed["state"], listed["detached"]) == ("web", "running", True)
    assert Path(f"/proc/{listed['pid']}").exists()
    assert Path(listed["cgroup"], "cgroup.procs").read_text().split() == [str(listed["pid"])]
    wait_for(lambda: "hello" in daemon.cli(capfd, "logs", "web")[1], "web's output in its log")
    status, out, err = daemon.cli(capfd, "logs", "web")
    assert (status, out, err) == (0, "hello\n", "oops\n")
    assert daemon.cli(capfd, "logs", "--tail", "1", "web")[1:] == ("", "oops\n")
    assert daemon.cli(capfd, "rm", "web")[0] == 125, "rm without -f removed a running container"
    assert daemon.cli(capfd, "kill", "web")[:2] == (0, "web: killed\n")
    assert daemon.cli(capfd, "wait", "web")[:2] == (0, "137\n")
    status, out, _ = daemon.cli(capfd, "ps", "--json")
    assert [c["name"] for c in json.loads(out)] == []
    status, out, _ = daemon.cli(capfd, "ps", "-a", "--json")
    (exited,) = json.loads(out)
    assert (exited["state"], exited["attempts"][0]["signal"], exited["pid"]) == ("exited", 9, None)
    assert not Path(listed["cgroup"]).exists(), "an exited container's cgroup was left"
    assert daemon.cli(capfd, "rm", "web")[:2] == (0, "web\n")
    assert daemon.cli(capfd, "inspect", "web")[0] == 125
    assert not (daemon.data_dir / "containers" / "web").exists()


def test_exit_status_and_final_accounting(capfd: pytest.CaptureFixture[str], daemon: Daemon) -> None:
    assert (
        daemon.cli(capfd, "run", "-d", "--name", "seven", "--mem", "64M", "--", "sh", "-c", "exit 7")[0] == 0
    )
    assert daemon.cli(capfd, "wait", "seven")[:2] == (0, "7\n")
    _status, out, _ = daemon.cli(capfd, "inspect", "seven", "--json")
    info = json.loads(out)
    assert (info["state"], info["attempts"][-1]["exit_code"], info["attempts"][-1]["ended"]) == (
        "exited", 7, "exited with 7",
    )  # fmt: skip
    assert info["report"]["limits"]["memory.max"] == str(64 * MiB)
    assert "env" not in info["spec"]
    daemon.cli(capfd, "rm", "seven")


def test_foreground_run_through_the_daemon_attaches(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    status, out, err = daemon.cli(
        capfd,
        "run",
        "--name",
        "attached",
        "--report",
        str(report),
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    )
    assert (status, out, err) == (3, "out\n", "err\n")
    assert json.loads(report.read_text())["exit_code"] == 3
    assert daemon.cli(capfd, "ps", "-a", "--json")[1].strip() == "[]", "an attached run was left behind"


def test_command_not_found_is_127_and_leaves_nothing(
    capfd: pytest.CaptureFixture[str], daemon: Daemon
) -> None:
    status, _, err = daemon.cli(capfd, "run", "-d", "--name", "missing", "--", "/no/such/command")
    assert status == 127 and "command not found" in err
    assert daemon.cli(capfd, "ps", "-a", "--json")[1].strip() == "[]"
    assert not (daemon.data_dir / "containers" / "missing").exists()


def test_fifty_parallel_detached_runs(daemon: Daemon) -> None:
    names = [f"par-{index}" for index in range(50)]
    errors: list[BaseException] = []

    def create(name: str) -> None:
        try:
            daemon.api.create(CreateRequest(spec=spec(["sleep", "1000"], name=name)))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        listed = {c.name: c for c in daemon.api.list()}
        assert sorted(listed) == sorted(names)
        assert all(c.state == "running" and Path(f"/proc/{c.pid}").exists() for c in listed.values())
        assert len({c.pid for c in listed.values()}) == 50
        records = {p.stem for p in Path("/run/cgctl/runs").glob("par-*.json")}
        assert records == set(names)
    finally:
        for name in names:
            daemon.api.remove(name, force=True)
    assert daemon.api.list(all=True) == []


def test_restart_policy_backs_off_and_gives_up(daemon: Daemon) -> None:
    since = time.time()
    request = CreateRequest.model_validate(
        {"spec": {"name": "crashy", "command": ["sh", "-c", "exit 1"]}, "restart": "on-failure:3"}
    )
    daemon.api.create(request)
    wait_for(lambda: daemon.api.inspect("crashy").state == "exited", "crashy to give up", 120)
    info = daemon.api.inspect("crashy")
    assert (info.restart_count, [a.exit_code for a in info.attempts]) == (3, [1, 1, 1, 1])
    events = list(daemon.api.events(since=since, until=time.time()))
    restarts = [e for e in events if e.name == "crashy" and e.type == "restart"]
    assert [e.attributes["backoff_seconds"] for e in restarts] == ["0.1", "0.2", "0.4"]
    assert all(e.attributes["reason"] == "exited with 1" for e in restarts)
    exits = [e.time for e in events if e.name == "crashy" and e.type == "exit"]
    gaps = [later.time - exit_time for exit_time, later in zip(exits, restarts, strict=False)]
    assert all(gap >= backoff for gap, backoff in zip(gaps, (0.1, 0.2, 0.4), strict=True)), gaps
    daemon.api.remove("crashy")


def test_oom_kill_is_an_event_within_a_second(daemon: Daemon) -> None:
    seen: list[Event] = []
    since = time.time()

    def listen() -> None:
        for event in daemon.api.events(since=since, until=since + 120):
            if event.name == "hog" and event.type == "oom":
                seen.append(event)
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    daemon.api.create(
        CreateRequest(
            spec=spec(
                ["sh", "-c", f"{shlex.join(allocate(256))}; exec sleep 1000"],
                name="hog",
                limits={"memory": {"max": "48M", "swap_max": "0", "oom_group": False}},
            )
        )
    )
    events_file = Path(daemon.api.inspect("hog").cgroup, "memory.events")
    deadline = time.monotonic() + 120
    while int(dict(line.split() for line in events_file.read_text().splitlines())["oom_kill"]) == 0:
        assert time.monotonic() < deadline, "the workload was never OOM killed"
        time.sleep(0.005)
    killed_at = time.time()
    listener.join(timeout=5)
    assert seen, "no oom event"
    assert seen[0].time - killed_at < 1.0
    assert seen[0].attributes["oom_kills"] == "1"
    daemon.api.remove("hog", force=True)


def test_bad_input_gets_a_4xx_and_creates_nothing(daemon: Daemon) -> None:
    def post(path: str, body: bytes, headers: str = "") -> tuple[int, dict[str, object]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(daemon.socket))
            head = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n"
            )
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before all was sent
                client.sendall(head.encode() + body)
            raw = b""
            while chunk := client.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    cases = {
        b'{"spec": {"command": ["true"], "name": "a/b"}}': (400, "spec.name"),
        b'{"spec": {"command": ["true"]}, "surprise": 1}': (400, "unknown field 'surprise'"),
        b'{"spec": {"command": ["true"], "limits": {"memory": {"max": "lots"}}}}': (400, "'lots'"),
        b'{"spec": {"command": []}}': (400, "spec.command"),
        b'{"spec": {"command": ["true"]}, "restart": "sometimes"}': (400, "'sometimes'"),
        b'{"spec": {"command": ["true"], "security": {"cap_add": ["CAP_NOPE"]}}}': (400, "CAP_NOPE"),
        b"{not json": (400, ""),
        b'{"spec": {"command": ["true"]}, "log": {"max_size": "1K"}}': (400, "log.max_size"),
    }
    for body, (status, mentioned) in cases.items():
        answer = post("/v1/containers", body)
        assert answer[0] == status and mentioned in str(answer[1]["message"]), (body, answer)
    # A body over the limit is refused from its declared length, before it is read: the answer is
    # read before the body is sent, since a server closing with a body unread resets the connection
    # and the client's recv may then see the reset before the answer (a full run found that race).
    big = b'{"spec": {"command": ["true"], "labels": {"x": "' + b"y" * (2 << 20) + b'"}}}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(daemon.socket))
        client.sendall(
            f"POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(big)}\r\nConnection: close\r\n\r\n".encode()
        )
        client.settimeout(30)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused: nobody reads it
            client.sendall(big)
    assert answer.split()[1] == b"413", answer[:200]
    assert b"the request body is over" in answer
    assert post("/v1/containers/..%2Fetc/kill", b"{}")[0] in (400, 404)
    assert post("/v1/containers/nope/kill", b'{"signal": "NOPE"}')[0] == 400
    assert post("/v1/containers/nope/kill", b"{}")[0] == 404
    with pytest.raises(Invalid):
        daemon.api.kill("nope", "SIGNOPE")
    assert daemon.api.list(all=True) == []
    assert list((daemon.data_dir / "containers").iterdir()) == []


def test_socket_refuses_unprivileged_users(daemon: Daemon) -> None:
    mode = daemon.socket.stat().st_mode & 0o777
    assert mode & 0o007 == 0, f"the socket is open to others: {mode:o}"
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\nsys.exit(0)\n"
    )
    nobody = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "python3",
            "-S",
            "-c",
            probe,
            str(daemon.socket),
        ]
    )
    assert nobody.returncode == 13
    assert os.access(daemon.socket, os.W_OK)


def test_tcp_listener_needs_the_token_and_the_socket_does_not(daemon: Daemon) -> None:
    host, port = daemon.tcp.rsplit(":", 1)
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": daemon.token_file.read_text()}):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("GET", "/v1/containers", headers=header)
        response = connection.getresponse()
        assert (response.status, json.loads(response.read())["exit_code"]) == (401, 125), header
        connection.close()
    token = daemon.token_file.read_text()
    over_tcp = RemoteRuntime(f"tcp://{daemon.tcp}", token=token)
    assert over_tcp.ping()["version"] == daemon.api.ping()["version"]  # the socket needs no token
    with pytest.raises(Failure, match="needs its token"):
        RemoteRuntime(f"tcp://{daemon.tcp}").list()


def test_image_containers_that_exit_at_once_leave_the_keeper_serving(daemon: Daemon, tmp_path: Path) -> None:
    """An image container can end before the keeper first looks at it; its exit and its pipes' end
    then come in one batch, and the exit closes the pipes: the keeper must not read the stale fds."""
    oci.write_oci_layout(tmp_path / "image", [oci.busybox_layer()], Env=["PATH=/bin"])
    daemon.api.import_image(str(tmp_path / "image"), "quick:1")
    (record,) = [i for i in daemon.api.images() if i["name"] == "quick"]
    names = [f"quick-{index}" for index in range(10)]
    try:
        for name in names:
            rootfs = {"layers": record["layer_dirs"], "image": "quick:1"}
            daemon.api.create(CreateRequest(spec=spec(["true"], name=name, rootfs=rootfs)))
        assert [daemon.api.wait(name).exit_code for name in names] == [0] * 10
        daemon.api.create(CreateRequest(spec=spec(["sleep", "1000"], name="after-them")))
        assert daemon.api.inspect("after-them").state == "running"
    finally:
        for name in [*names, "after-them"]:
            with contextlib.suppress(Failure):
                daemon.api.remove(name, force=True)
        daemon.api.remove_image("quick:1")


def test_images_stats_and_checkpoint_through_the_api(daemon: Daemon, tmp_path: Path) -> None:
    oci.write_oci_layout(tmp_path / "image", [oci.busybox_layer(oci.file("etc/hello", b"hi\n"))])
    status, record = api_call(
        daemon, "POST", "/v1/images", {"path": str(tmp_path / "image"), "reference": "apitest:1"}
    )
    assert (status, record["name"], record["tag"]) == (201, "apitest", "1")
    status, images = api_call(daemon, "GET", "/v1/images")
    assert any(i["name"] == "apitest" for i in images)
    assert api_call(daemon, "POST", "/v1/images", {"path": "/nonexistent", "reference": "x:1"})[0] == 400
    assert api_call(daemon, "DELETE", "/v1/images/apitest:1")[0] == 200
    assert api_call(daemon, "DELETE", "/v1/images/apitest:1")[0] == 404

    daemon.api.create(
        CreateRequest.model_validate({"spec": spec(["sleep", "1000"], name="measured"), "restart": "always"})
    )
    status, usage = api_call(daemon, "GET", "/v1/stats?name=measured&interval=0.2")
    assert (status, [(row["name"], row["pids"]) for row in usage]) == (200, [("measured", 1)])
    assert api_call(daemon, "GET", "/v1/stats?name=nope")[0] == 404
    (sample,) = daemon.api.stats(["measured"], interval=0.2)
    assert [row.name for row in sample] == ["measured"]
    status, dumped = api_call(
        daemon, "POST", "/v1/containers/measured/checkpoint", {"dir": str(tmp_path / "ck")}
    )
    assert status == 200 and dumped["left_running"] is False, dumped
    info = daemon.api.wait("measured")
    assert (info.state, info.last.ended) == ("exited", f"checkpointed to {tmp_path / 'ck'}")  # type: ignore[union-attr]
    assert info.restart_count == 0
    daemon.api.remove("measured")


def test_restore_through_the_daemon_goes_on_where_the_checkpoint_left_off(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = "i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); sleep 0.25; done; exit 7"
    limits = {"memory": {"max": "96M"}, "pids": {"max": 20}}
    daemon.api.create(
        CreateRequest.model_validate({"spec": spec(["sh", "-c", count], name="counting", limits=limits)})
    )

    def numbers(name: str) -> list[int]:
        return [int(line.text) for line in daemon.api.logs(name)]

    wait_for(lambda: len(numbers("counting")) >= 4, "four lines before the dump")
    status, _ = api_call(daemon, "POST", "/v1/containers/counting/checkpoint", {"dir": str(tmp_path / "ck")})
    assert status == 200
    daemon.api.wait("counting")
    dumped_at = numbers("counting")[-1]

    status, out, err = daemon.cli(capfd, "restore", "--dir", str(tmp_path / "ck"), "--name", "counted", "-d")
    assert (status, out) == (0, "counted\n"), err
    restored = daemon.api.inspect("counted")
    assert restored.detached and restored.state == "running"
    group = Path(restored.cgroup)
    assert (group / "memory.max").read_text().strip() == str(96 << 20)
    assert (group / "pids.max").read_text().strip() == "20"
    ended = daemon.api.wait("counted")
    assert ended.exit_code == 7
    assert numbers("counted")[0] in (dumped_at, dumped_at + 1) and numbers("counted")[-1] == 29
    assert ended.report is not None and ended.report.limits["memory.max"] == str(96 << 20)

    # Attached, through the daemon over TCP (as from a `cgctl machine`): its output here, its status ours.
    monkeypatch.setenv("CGCTL_TOKEN_FILE", str(daemon.token_file))
    status, out, err = cgctl_in_process(
        capfd, "--host", f"tcp://{daemon.tcp}", "restore", "--dir", str(tmp_path / "ck"), "--name", "again"
    )
    assert status == 7, err
    assert [int(n) for n in out.split()][-1] == 29 and int(out.split()[0]) in (dumped_at, dumped_at + 1)
    assert "restored again from" in err

    for bad, expected in (
        ({"dir": str(tmp_path / "nothing")}, 400),
        ({"dir": str(tmp_path / "ck"), "name": "counted"}, 409),
        ({"dir": str(tmp_path / "ck"), "name": "../x"}, 400),
        ({"dir": "relative"}, 400),
    ):
        before = {c.name for c in daemon.api.list(all=True)}
        assert api_call(daemon, "POST", "/v1/restore", bad)[0] == expected, bad
        assert {c.name for c in daemon.api.list(all=True)} == before
    for name in ("counting", "counted"):
        daemon.api.remove(name)


def api_call(daemon: Daemon, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """One request on the daemon's socket: (status, parsed JSON); a bytes body is sent as it is."""
    connection = UnixConnection(str(daemon.socket), timeout=300)
    try:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    return response.status, json.loads(raw) if raw else None
