"""Images and roots of their own, for real: import, overlay layers, whiteouts, volumes, read-only roots."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl import state
from cgctl.accounting import find_container
from tests import oci
from tests.integration.workloads import CGCTL_ROOT, PYTHON, STATE_DIR, cgctl_in_process, tmpfs, wait_for
from tests.unit.test_images import REASONS, malicious

pytestmark = pytest.mark.usefixtures("no_leaks")

SCRIPT = (
    "cat /etc/greeting; ls /etc; ls /opaque; echo GREETING=$GREETING; pwd; id -u; "
    "env | grep -c CALLER_SECRET; echo ok > /tmp/write-test && cat /tmp/write-test"
)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmpfs(tmp_path / "store")
    monkeypatch.setenv("CGCTL_IMAGE_STORE", str(root))
    yield root
    subprocess.run(["umount", "--lazy", str(root)], check=True)


@pytest.fixture
def demo(tmp_path: Path, store: Path, capfd: pytest.CaptureFixture[str]) -> str:
    """demo:1, two layers: busybox with /etc/gone and /opaque/a, then a layer deleting both."""
    bottom = oci.busybox_layer(
        oci.file("etc/greeting", b"hello from the image\n"),
        oci.file("etc/gone", b"deleted above\n"),
        oci.directory("opaque"),
        oci.file("opaque/a", b"a"),
        oci.directory("srv"),
        oci.directory("tmp", 0o1777),
    )
    top = [
        oci.directory("etc"),
        oci.file("etc/.wh.gone"),
        oci.file("etc/added", b"added\n"),
        oci.directory("opaque"),
        oci.file("opaque/.wh..wh..opq"),
        oci.file("opaque/b", b"b"),
    ]
    oci.write_oci_layout(
        tmp_path / "demo",
        [bottom, top],
        Cmd=["/bin/sh", "-c", SCRIPT],
        Env=["PATH=/bin", "GREETING=from-image"],
        WorkingDir="/srv",
        User="nobody",
    )
    status, out, err = cgctl_in_process(capfd, "image", "import", str(tmp_path / "demo"), "demo:1")
    assert status == 0, err
    assert out.startswith("demo:1: imported 2 layer(s)")
    return "demo:1"


def layer_dirs(store: Path) -> list[Path]:
    return sorted((store / "layers" / "sha256").iterdir())


def test_an_image_runs_with_its_layers_config_and_whiteouts(
    capfd: pytest.CaptureFixture[str], demo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLER_SECRET", "never inside")
    status, out, err = cgctl_in_process(capfd, "run", "--image", demo)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "hello from the image"
    config_at = lines.index("GREETING=from-image")
    etc, opaque = lines[1 : config_at - 1], lines[config_at - 1 : config_at]
    assert "added" in etc and "greeting" in etc and "gone" not in etc, out  # the whiteout hides it
    assert opaque == ["b"] and "a" not in lines, out  # the opaque directory hides the lower /opaque/a
    # Env, WorkingDir and User from the config; the caller's environment stays outside.
    assert lines[config_at:] == ["GREETING=from-image", "/srv", "65534", "0", "ok"], out

    # CMD replaces the image's Cmd; --env, --workdir and --user override its config.
    status, out, err = cgctl_in_process(
        capfd, "run", "--image", demo, "--env", "GREETING=mine", "--workdir", "/", "--user", "0:0",
        "--", "sh", "-c", "echo $GREETING; pwd; id -u",
    )  # fmt: skip
    assert (status, out) == (0, "mine\n/\n0\n"), err


def test_writes_go_to_the_upper_layer_never_to_the_store(
    capfd: pytest.CaptureFixture[str], demo: str, store: Path, tmp_path: Path
) -> None:
    before = {path: sorted(p.name for p in path.rglob("*")) for path in layer_dirs(store)}
    write = "echo changed > /etc/greeting; echo new > /etc/newfile; rm /etc/added; cat /etc/greeting"
    status, out, err = cgctl_in_process(
        capfd, "run", "--image", demo, "--user", "root", "--", "sh", "-c", write
    )
    assert (status, out) == (0, "changed\n"), err
    assert {path: sorted(p.name for p in path.rglob("*")) for path in layer_dirs(store)} == before
    assert "hello from the image" in next(p.read_text() for p in store.rglob("greeting"))

    upper = tmpfs(tmp_path / "uppers") / "job"
    args = ["run", "--image", demo, "--user", "root", "--upper", str(upper)]
    status, _, err = cgctl_in_process(capfd, *args, "--keep-upper", "--", "sh", "-c", write)
    assert status == 0, err
    assert (upper / "upper" / "etc" / "newfile").read_text() == "new\n"
    assert (upper / "upper" / "etc" / "added").is_char_device()  # the deletion, as overlayfs records it
    # A kept upper carries on where it was; without --keep-upper its layer is removed at the end
    # (and DIR too, had cgctl made it).
    status, out, err = cgctl_in_process(capfd, *args, "--", "cat", "/etc/newfile")
    assert (status, out) == (0, "new\n"), err
    assert not (upper / "upper").exists() and not (upper / "work").exists()
    subprocess.run(["umount", "--lazy", str(tmp_path / "uppers")], check=True)


def test_read_only_root_volumes_and_rootfs_layers(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base, extra = tmp_path / "base", tmp_path / "extra"
    layers = {
        base: oci.busybox_layer(oci.file("etc/which", b"base\n")),
        extra: [oci.directory("etc"), oci.file("etc/which", b"extra\n")],
    }
    for directory, members in layers.items():
        directory.mkdir()
        subprocess.run(["tar", "-x", "-C", str(directory)], input=oci.tar_bytes(members), check=True)
    shared, readonly = tmp_path / "shared", tmp_path / "readonly"
    shared.mkdir()
    readonly.mkdir()
    (readonly / "data").write_text("read me\n")
    script = (
        "cat /etc/which; touch /rootfile 2>/dev/null || echo root-ro; touch /tmp/t && echo tmp-rw; "
        "echo from-inside > /shared/out; cat /ro/data; touch /ro/x 2>/dev/null || echo vol-ro"
    )
    status, out, err = cgctl_in_process(
        capfd, "run", "--rootfs", str(base), "--layer", str(extra), "--read-only",
        "--volume", f"{shared}:/shared", "--volume", f"{readonly}:/ro:ro", "--", "/bin/sh", "-c", script,
    )  # fmt: skip
    assert status == 0, err
    assert out.splitlines() == ["extra", "root-ro", "tmp-rw", "read me", "vol-ro"]
    assert (shared / "out").read_text() == "from-inside\n"
    assert not (readonly / "x").exists() and not (base / "rootfile").exists()
    assert (base / "etc" / "which").read_text() == "base\n"

    for args, message in [
        (["--volume", "relative:/x", "--rootfs", str(base)], "is not an absolute path"),
        (["--volume", f"{tmp_path}/nope:/x", "--rootfs", str(base)], "no such file or directory on the host"),
        (["--rootfs", str(tmp_path / "nope")], "not a directory"),
        (["--volume", f"{shared}:/x"], "volumes need a root of its own"),
        (["--rootfs", str(base), "--share", "mnt"], "needs its own mount namespace"),
        (["--image", "nosuch:1"], "no image nosuch:1"),
    ]:
        status, _, err = cgctl_in_process(capfd, "run", *args, "--", "/bin/true")
        assert status == 125 and message in err, (args, err)


def root_lowerdir(name: str) -> str:
    """The lowerdir of the root mount the container's init sees ('' if none yet). The init, as its
    record says: while a restore finishes, CRIU's action scripts run in its cgroup too."""
    record = STATE_DIR / f"{name}.json"
    pid = state.read(record).get("pid") if record.exists() else None
    if pid is None:
        return ""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        if line.split()[4] == "/" and "lowerdir=" in line:
            return line.split("lowerdir=")[1].split(",")[0]
    return ""


def test_two_containers_share_the_layers_and_the_image_stays_while_used(
    capfd: pytest.CaptureFixture[str], demo: str, store: Path
) -> None:
    runs = [
        subprocess.Popen(
            [PYTHON, "-m", "cgctl", "run", "--name", f"sharer{n}", "--image", demo, "--", "sleep", "1000"]
        )
        for n in (1, 2)
    ]
    try:
        for n in (1, 2):  # the init joins its cgroup before it builds its root
            wait_for(lambda n=n: str(store) in root_lowerdir(f"sharer{n}"), f"sharer{n} to pivot")
        lowers = [root_lowerdir(f"sharer{n}") for n in (1, 2)]
        record = json.loads((store / "images" / "demo" / "1.json").read_text())
        top_first = [str(store / "layers" / d.replace(":", "/")) for d in reversed(record["layers"])]
        assert lowers[0] == lowers[1] == ":".join(top_first)
        assert find_container("sharer1").image == demo  # the exporter's `image` label
        status, _, err = cgctl_in_process(capfd, "image", "rm", demo)
        assert status == 125 and "in use by the running container sharer" in err, err
        assert layer_dirs(store)
    finally:
        for n in (1, 2):
            if (CGCTL_ROOT / f"sharer{n}").exists():
                (CGCTL_ROOT / f"sharer{n}" / "cgroup.kill").write_text("1")
        for run in runs:
            run.wait(timeout=60)
    status, out, err = cgctl_in_process(capfd, "image", "rm", demo)
    assert (status, out) == (0, "demo:1: removed, with 2 layer(s) no other image uses\n"), err
    assert not layer_dirs(store)
    status, out, _ = cgctl_in_process(capfd, "image", "ls")
    assert out.splitlines() == ["IMAGE  ID  LAYERS  SIZE"]


@pytest.mark.parametrize("case", sorted(REASONS))
def test_malicious_archives_are_refused_by_the_cli(
    capfd: pytest.CaptureFixture[str], store: Path, tmp_path: Path, case: str
) -> None:
    oci.write_oci_layout(tmp_path / "evil", [malicious(case)])
    outside = {p.name for p in tmp_path.iterdir()}
    status, _, err = cgctl_in_process(capfd, "image", "import", str(tmp_path / "evil"), "evil")
    assert status == 125 and REASONS[case] in err and "not imported" in err, err
    assert {p.name for p in tmp_path.iterdir()} == outside
    assert not any(store.rglob("*.json")) and not any((store / "layers" / "sha256").iterdir())
    assert not os.path.exists("/tmp/evil") and not os.path.exists("/evil")


def test_a_container_with_its_own_root_checkpoints_and_restores_with_its_tmpfs(
    capfd: pytest.CaptureFixture[str], demo: str, store: Path, tmp_path: Path
) -> None:
    # The count lives only in the container's /tmp (a tmpfs inside its mount namespace).
    counter = (
        "while :; do i=$(($(cat /tmp/n 2>/dev/null || echo 0) + 1)); echo $i >/tmp/n; echo $i; "
        "sleep 0.1; done"
    )
    run = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", "rooted", "--image", demo, "--user", "root", "--",
         "sh", "-c", counter],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert run.stdout is not None
    assert int(run.stdout.readline()) == 1
    status, _, err = cgctl_in_process(capfd, "checkpoint", "rooted", "--dir", str(tmp_path / "images"))
    assert status == 0, err
    assert "note: files written to its root (outside /tmp, /dev/shm and volumes) are not in" in err
    assert run.wait(timeout=60) == 137
    last = int(run.stdout.read().split()[-1])
    restored = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "restore", "--dir", str(tmp_path / "images"), "--name", "rerooted"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert restored.stdout is not None and restored.stderr is not None
    try:
        first = restored.stdout.readline()
        assert first, restored.stderr.read().decode()
        assert int(first) == last + 1
        wait_for(lambda: root_lowerdir("rerooted") != "", "the restorer to record the init")
        assert str(store) in root_lowerdir("rerooted")  # its root is the image's layers, not the host's
        init = state.read(STATE_DIR / "rerooted.json")["pid"]
        assert sorted(os.listdir(f"/proc/{init}/root/etc")) == ["added", "greeting", "group", "passwd"]
    finally:
        assert cgctl_in_process(capfd, "kill", "rerooted")[0] == 0
        assert restored.wait(timeout=60) == 137


def test_a_store_on_overlayfs_is_refused_before_unpacking(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM's root is overlayfs, as /var/lib is for a cgctl inside a container: the default store
    there cannot hold whiteouts, and the import says so, with the fix, and writes nothing."""
    monkeypatch.delenv("CGCTL_IMAGE_STORE", raising=False)
    default = Path("/var/lib/cgctl/images")
    before = sorted(default.rglob("*")) if default.exists() else []
    oci.write_oci_layout(tmp_path / "image", [oci.busybox_layer(oci.file("etc/x", b"x"))])
    status, _, err = cgctl_in_process(capfd, "image", "import", str(tmp_path / "image"), "plain:1")
    assert status == 125
    assert err.strip().splitlines() == [
        f"cgctl: {tmp_path / 'image'}: not imported: the image store {default} is on a filesystem of "
        "type overlay, which refuses the 0/0 character devices that mark deleted files in image layers "
        "(Operation not permitted); put the store on another filesystem (tmpfs, ext4, xfs, btrfs) with "
        "--store DIR or CGCTL_IMAGE_STORE=DIR"
    ]
    assert sorted(default.rglob("*")) == before
