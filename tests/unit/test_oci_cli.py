"""cgctl-oci's command line takes runc's spellings, and errors as runc words them (exit 1, --log)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cgctl import oci
from cgctl.runtime import oci_update


def test_update_takes_every_flag_that_oci_update_reads() -> None:
    assert tuple(oci_update.FLAGS) == oci.UPDATE_FLAGS


@pytest.mark.parametrize(
    "argv",
    [
        # as containerd's runc v2 shim (go-runc) calls it
        [
            "--root",
            "/run/containerd/runc/k8s.io",
            "--log",
            "/x/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--console-socket",
            "/tmp/s",
            "ID",
        ],
        # as conmon calls it
        [
            "--root=/run/runc",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--no-pivot",
            "ID",
        ],
        ["--log-format=json", "exec", "--detach", "--pid-file", "/p", "--process", "/p.json", "ID"],
        ["kill", "--all", "ID", "KILL"],
        ["delete", "-f", "ID"],
        ["checkpoint", "--image-path", "/i", "--work-path", "/w", "--leave-running", "--file-locks", "ID"],
        ["update", "--resources", "-", "ID"],
        ["update", "--memory", "256m", "--cpu-quota", "50000", "ID"],
        ["events", "--stats", "ID"],
        ["ps", "--format", "json", "ID"],
        ["exec", "ID", "--", "sh", "-c", "echo hi"],
    ],
)
def test_runcs_callers_spellings_parse(argv: list[str]) -> None:
    args = oci._parser().parse_args(argv)
    assert args.id == "ID" and callable(args.handler)


def test_errors_go_to_stderr_and_the_log_as_json(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    done = subprocess.run(
        [sys.executable, "-m", "cgctl.oci", "--root", str(tmp_path), "--log", str(log), "--log-format=json",
         "state", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == "container does not exist"
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == "container does not exist" and entry["time"]


def test_delete_force_of_a_missing_container_is_no_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        oci.main(["--root", str(tmp_path), "delete", "--force", "nope"])
    assert exited.value.code == 0


@pytest.mark.parametrize(("text", "seconds"), [("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), ("1.5s", 1.5)])
def test_intervals_are_gos_durations(text: str, seconds: float) -> None:
    assert oci._duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "-1s", "fast", "0s"])
def test_bad_intervals_are_refused_by_name(text: str) -> None:
    with pytest.raises(oci.OciError, match="--interval"):
        oci._duration(text)
