"""`cgctl commit`, `image save`, `pull` and `push` through a real daemon: a running container frozen for
the copy of its writes, the new image run, and the image out to a registry and back with skopeo."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgctl.images import auth
from cgctl.runtime.api import Invalid, PullRequest, RegistryAuth
from tests import oci
from tests.integration.daemon import Daemon
from tests.integration.workloads import tmpfs, wait_for
from tests.registry import running_registry, skopeo

pytestmark = pytest.mark.usefixtures("no_leaks", "private_skopeo_cache")

USER, PASSWORD, WRONG = "alice", "Corr3ct-horse-PASS", "wr0ng-Guess-PASS"
BASE = "cbase:1"
BIG = 8 << 20  # bytes of random data the container writes: gzip takes a while on them, frozen


@pytest.fixture
def uppers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tmpfs for --upper directories; credentials only from tmp_path (never a real user's)."""
    monkeypatch.setenv("CGCTL_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    root = tmpfs(tmp_path / "uppers")
    yield root
    subprocess.run(["umount", "--lazy", str(root)], check=True)


@pytest.fixture(scope="module")
def base(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """cbase:1 in the daemon's store: busybox (with rm and head) and an /etc/x to delete."""
    layout = tmp_path_factory.mktemp("base") / "layout"
    extra = [oci.link("bin/rm", "busybox"), oci.link("bin/head", "busybox"), oci.file("etc/x", b"x\n"),
             oci.directory("tmp", 0o1777)]  # fmt: skip
    oci.write_oci_layout(layout, [oci.busybox_layer(*extra)], Cmd=["/bin/sh"], Env=["PATH=/bin"])
    return daemon.api.import_image(str(layout), BASE)


def image(daemon: Daemon, reference: str) -> dict[str, Any]:
    name, _, tag = reference.rpartition(":")
    (found,) = [i for i in daemon.api.images() if (i["name"], i["tag"]) == (name, tag)]
    return found


def blob(daemon: Daemon, digest: str) -> bytes:
    return (daemon.images / "blobs" / digest.replace(":", "/")).read_bytes()


def events(cgroup: str) -> dict[str, str]:
    return dict(line.split() for line in Path(cgroup, "cgroup.events").read_text().splitlines())


def remove(daemon: Daemon, *names: str) -> None:
    """Remove the containers (killing running ones) if they were made: a failed run makes none."""
    for container in daemon.api.list(all=True):
        if container.name in names:
            daemon.api.remove(container.name, force=True)


def run_and_wait(capfd: pytest.CaptureFixture[str], daemon: Daemon, name: str, *args: str) -> None:
    """A detached run through the daemon that has ended when this returns."""
    status, _, err = daemon.cli(capfd, "run", "-d", "--name", name, "--image", BASE, *args)
    assert status == 0, err
    assert daemon.cli(capfd, "wait", name)[:2] == (0, "0\n")


def test_a_running_container_is_frozen_for_its_commit_and_the_new_image_runs(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, base: dict[str, Any], uppers: Path
) -> None:
    upper = uppers / "job"
    script = (f"rm /etc/x; echo new > /etc/new; head -c {BIG} /dev/urandom > /big; touch /ready; "
              "exec sleep 1000")  # fmt: skip
    status, _, err = daemon.cli(
        capfd,
        "run",
        "-d",
        "--name",
        "committed",
        "--image",
        BASE,
        "--upper",
        str(upper),
        "--",
        "sh",
        "-c",
        script,
    )
    assert status == 0, err
    try:
        wait_for(lambda: (upper / "upper" / "ready").exists(), "the container's writes")
        cgroup = daemon.api.inspect("committed").cgroup
        seen: set[str] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.add(events(cgroup)["frozen"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            status, out, err = daemon.cli(capfd, "commit", "committed", "derived:1", "-m", "first commit")
        finally:
            stop.set()
            watcher.join()
        assert status == 0, err
        assert out.startswith("derived:1: committed's writes as layer 2, "), out
        assert seen == {"0", "1"}, seen  # frozen during the copy, thawed around it
        assert events(cgroup) == {**events(cgroup), "populated": "1", "frozen": "0"}
        assert daemon.api.inspect("committed").state == "running"

        record = image(daemon, "derived:1")
        assert record["layers"][:-1] == base["layers"] and record["parent"] == BASE
        history = json.loads(blob(daemon, record["id"]))["history"][-1]
        assert (history["created_by"], history["comment"]) == ("cgctl commit committed", "first commit")
        layer = daemon.images / "layers" / record["layers"][-1].replace(":", "/")
        assert (layer / "etc" / "x").is_char_device()  # the whiteout
        big = (layer / "big").read_bytes()
        assert len(big) == BIG and big == (upper / "upper" / "big").read_bytes()

        check = "cat /etc/new; ls /etc; test -e /etc/x || echo x-gone; test -s /big && echo big"
        status, out, err = daemon.cli(capfd, "run", "--image", "derived:1", "--", "sh", "-c", check)
        assert (status, out) == (0, "new\ngroup\nnew\npasswd\nx-gone\nbig\n"), err
    finally:
        remove(daemon, "committed")


def test_commit_needs_an_upper_directory_kept_once_the_container_ended(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, base: dict[str, Any], uppers: Path
) -> None:
    try:
        run_and_wait(capfd, daemon, "kept", "--upper", str(uppers / "kept"), "--keep-upper", "--",
                     "sh", "-c", "echo kept > /etc/kept")  # fmt: skip
        status, out, err = daemon.cli(capfd, "commit", "kept", "fromkept:1")
        assert status == 0 and out.startswith("fromkept:1: kept's writes as layer 2"), err
        status, out, err = daemon.cli(
            capfd, "run", "--image", "fromkept:1", "--", "sh", "-c", "cat /etc/kept /etc/x"
        )
        assert (status, out) == (0, "kept\nx\n"), err

        run_and_wait(capfd, daemon, "lost", "--upper", str(uppers / "lost"), "--", "sh", "-c", "true")
        status, _, err = daemon.cli(capfd, "commit", "lost", "lost:1")
        assert status == 125 and "run it with --keep-upper to commit it after it ends" in err, err

        run_and_wait(capfd, daemon, "tmpfs", "--", "sh", "-c", "true")
        status, _, err = daemon.cli(capfd, "commit", "tmpfs", "tmpfs:1")
        assert status == 125 and "run it with --upper DIR" in err, err

        status, _, err = daemon.cli(capfd, "commit", "nosuch", "nosuch:1")
        assert status == 125 and "nosuch" in err, err
        assert {i["name"] for i in daemon.api.images()}.isdisjoint({"lost", "tmpfs", "nosuch"})
    finally:
        remove(daemon, "kept", "lost", "tmpfs")


def test_save_pull_and_push_through_the_daemon(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, base: dict[str, Any], uppers: Path, tmp_path: Path
) -> None:
    try:
        run_and_wait(capfd, daemon, "topush", "--upper", str(uppers / "topush"), "--keep-upper", "--",
                     "sh", "-c", "echo pushed > /etc/pushed; rm /etc/x")  # fmt: skip
        assert daemon.cli(capfd, "commit", "topush", "pushme:1")[0] == 0
    finally:
        remove(daemon, "topush")
    record = image(daemon, "pushme:1")
    manifest = json.loads(blob(daemon, record["manifest"]))
    layer_digests = [d["digest"] for d in manifest["layers"]]

    # `image save` writes, on the daemon's host, an OCI archive skopeo reads.
    archive = tmp_path / "pushme.tar"
    status, out, err = daemon.cli(capfd, "image", "save", "pushme:1", str(archive))
    assert status == 0 and out.startswith(f"pushme:1: saved to {archive}"), err
    inspected = json.loads(skopeo("inspect", f"oci-archive:{archive}").stdout)
    assert (inspected["Digest"], inspected["Layers"]) == (record["manifest"], layer_digests)

    fresh = tmp_path / "fresh"
    oci.write_oci_layout(fresh, [oci.busybox_layer(oci.file("etc/fresh", b"fresh\n"))], Env=["PATH=/bin"])
    with running_registry(tmp_path / "registry", users={USER: PASSWORD}) as registry:
        registry.push(fresh, "team/fresh:1")
        pulled = f"{registry.address}/team/fresh:1"

        # The client's credentials travel to the daemon: wrong ones are refused, never shown or logged.
        auth.save(registry.address, USER, WRONG)
        status, _, err = daemon.cli(capfd, "pull", pulled)
        assert status == 125 and "the user name or password is wrong" in err and WRONG not in err, err
        auth.save(registry.address, USER, PASSWORD)
        status, out, err = daemon.cli(capfd, "pull", pulled)
        assert status == 0 and out.startswith(f"{pulled}: pulled 1 layer(s)"), err
        status, out, err = daemon.cli(capfd, "run", "--image", pulled, "--", "sh", "-c", "cat /etc/fresh")
        assert (status, out) == (0, "fresh\n"), err

        target = f"{registry.address}/team/pushed:1"
        status, out, err = daemon.cli(capfd, "push", "pushme:1", target)
        assert status == 0, err
        digest = oci.sha256(blob(daemon, record["manifest"]))
        assert out == f"{target}: {digest} (blobs: 3 sent, 0 mounted, 0 already there)\n"
        status, out, err = daemon.cli(capfd, "push", "pushme:1", target)
        assert (status, out) == (0, f"{target}: {digest} (blobs: 0 sent, 0 mounted, 3 already there)\n"), err

        copied = tmp_path / "copied"
        skopeo("copy", *registry.skopeo_flags("src"), registry.reference("team/pushed:1"), f"oci:{copied}:x")
        index = json.loads((copied / "index.json").read_text())
        (descriptor,) = index["manifests"]
        assert descriptor["digest"] == record["manifest"]
        back = json.loads(layout_blob(copied, descriptor["digest"]))
        assert [d["digest"] for d in back["layers"]] == layer_digests
        assert (
            json.loads(layout_blob(copied, back["config"]["digest"]))["rootfs"]["diff_ids"]
            == record["layers"]
        )
        for digest in layer_digests:
            assert hashlib.sha256(layout_blob(copied, digest)).hexdigest() == digest.removeprefix("sha256:")

        # A pull whose reference is bad is a 400 that creates nothing and does not echo the password.
        before = sorted(str(p) for p in daemon.images.rglob("*"))
        given = RegistryAuth(username=USER, password=PASSWORD)
        with pytest.raises(Invalid) as refused:
            daemon.api.pull(PullRequest(reference=f"{registry.address}/Bad//name", auth=given))
        assert refused.value.status == 400 and "not an image name" in str(refused.value)
        assert PASSWORD not in str(refused.value)
        assert sorted(str(p) for p in daemon.images.rglob("*")) == before
    log = daemon.log.read_text()
    assert PASSWORD not in log and WRONG not in log


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / digest.replace(":", "/")).read_bytes()
