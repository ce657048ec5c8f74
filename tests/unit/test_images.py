"""Image import: formats, the store, and every archive that must be refused with nothing written."""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from cgctl.images import ImageError, LayerError, Store, import_image, parse_reference
from tests import oci

CONFIG = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/", "User": "nobody"}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def test_references() -> None:
    assert parse_reference("busybox") == ("busybox", "latest")
    assert parse_reference("team/app:1.2-rc") == ("team/app", "1.2-rc")
    for bad in ("Busybox", "a:b:c", "../x", "x:", ":tag", "a//b"):
        with pytest.raises(ValueError):
            parse_reference(bad)


@pytest.mark.parametrize("form", ["oci-directory", "oci-tar", "oci-uncompressed", "docker-save"])
def test_every_format_imports_to_the_same_layers_stored_once(tmp_path: Path, store: Store, form: str) -> None:
    layers = [
        [oci.directory("etc"), oci.file("etc/greeting", b"hello\n"), oci.link("etc/hi", "greeting")],
        [oci.directory("srv"), oci.file("srv/data", b"x" * 5000, 0o600),
         oci.link("srv/copy", "srv/data", hard=True)],
    ]  # fmt: skip
    archive = tmp_path / "image"
    if form == "docker-save":
        oci.write_docker_save(archive, layers, **CONFIG)
    else:
        oci.write_oci_layout(tmp_path / "layout", layers, compress=form != "oci-uncompressed", **CONFIG)
        archive = tmp_path / "layout"
        if form == "oci-tar":
            oci.tar_directory(tmp_path / "layout", tmp_path / "layout.tar")
            archive = tmp_path / "layout.tar"
    record = import_image(archive, "app:1", store)
    assert record["config"] == CONFIG
    assert [store.layer(d).name for d in record["layers"]] == [
        oci.sha256(oci.tar_bytes(members)).split(":")[1] for members in layers
    ]
    bottom, top = (store.layer(d) for d in record["layers"])
    assert (bottom / "etc" / "greeting").read_text() == "hello\n"
    assert os.readlink(bottom / "etc" / "hi") == "greeting"
    assert (top / "srv" / "data").stat().st_mode & 0o777 == 0o600
    assert (top / "srv" / "copy").stat().st_ino == (top / "srv" / "data").stat().st_ino
    assert store.load("app:1") == record

    before = files_under(store.root / "layers")
    import_image(archive, "app:again", store)
    assert files_under(store.root / "layers") == before, "a layer was stored twice"
    assert [i["tag"] for i in store.images()] == ["1", "again"]
    assert store.remove("app:1") == []  # still used by app:again
    assert sorted(store.remove("app:again")) == sorted(record["layers"])
    assert not any((store.root / "layers" / "sha256").iterdir())


def malicious(name: str) -> list[list[oci.Member]]:
    """One layer that tries to write outside itself (or to be what it is not)."""
    return {
        "dotdot": [oci.file("../outside/evil", b"x")],
        "absolute": [oci.file("/tmp/evil", b"x")],
        "symlink-escape": [oci.link("escape", "../../outside")],
        "through-symlink": [oci.link("root", "/"), oci.file("root/evil", b"x")],
        "through-own-symlink": [oci.directory("d"), oci.link("d/up", "/etc"), oci.file("d/up/passwd", b"x")],
        "hardlink-out": [oci.link("hard", "../outside/file", hard=True)],
        "hardlink-absolute": [oci.link("hard", "/etc/passwd", hard=True)],
        "hardlink-missing": [oci.link("hard", "etc/shadow", hard=True)],
    }[name]


REASONS = {
    "dotdot": "a path with '..'",
    "absolute": "an absolute path",
    "symlink-escape": "outside the layer",
    "through-symlink": "a path through the symlink root",
    "through-own-symlink": "a path through the symlink d/up",
    "hardlink-out": "a path with '..'",
    "hardlink-absolute": "an absolute path",
    "hardlink-missing": "not a file of the layer",
}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_archives_that_leave_their_layer_are_refused_with_nothing_written(
    tmp_path: Path, store: Store, case: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("mine")
    good = [oci.directory("etc"), oci.file("etc/ok", b"fine")]
    oci.write_oci_layout(tmp_path / "layout", [good, malicious(case)])
    before = files_under(tmp_path)
    with pytest.raises(LayerError, match=REASONS[case]):
        import_image(tmp_path / "layout", "evil", store)
    assert files_under(tmp_path) - before <= {
        "store",
        "store/layers",
        "store/layers/sha256",
        "store/blobs",
        "store/blobs/sha256",
    }
    assert (outside / "file").read_text() == "mine"
    assert not list(store.images())


def corrupt(path: Path, how: str) -> None:
    blobs = sorted((path / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    layer = blobs[-1]  # the biggest blob is the layer
    data = layer.read_bytes()
    if how == "digest":
        tar = bytearray(gzip.decompress(data))
        tar[600] ^= 0xFF  # a byte of the file's content
        layer.write_bytes(gzip.compress(bytes(tar), mtime=0))
    else:
        layer.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("how", "reason"), [("digest", "does not match"), ("truncated", "cut short")])
def test_a_corrupt_layer_is_refused_and_leaves_no_partial_image(
    tmp_path: Path, store: Store, how: str, reason: str
) -> None:
    first = [oci.directory("etc"), oci.file("etc/ok", b"fine")]
    second = [oci.file("big", os.urandom(200_000))]
    oci.write_oci_layout(tmp_path / "layout", [first, second])
    corrupt(tmp_path / "layout", how)
    with pytest.raises((ImageError, LayerError), match=reason):
        import_image(tmp_path / "layout", "broken", store)
    assert files_under(store.root) <= {"layers", "layers/sha256", "blobs", "blobs/sha256"}, (
        "a layer of a failed import was kept"
    )


def test_device_nodes_and_whiteouts_need_root() -> None:
    with tempfile.TemporaryDirectory() as shared:  # pytest's tmp_path is private to root
        tmp_path = Path(shared)
        os.chmod(tmp_path, 0o777)
        refused_as_nobody(tmp_path)


def refused_as_nobody(tmp_path: Path) -> None:
    for name, members in [("device", [oci.device("dev/null")]), ("whiteout", [oci.file(".wh.gone")])]:
        oci.write_oci_layout(tmp_path / name, [members])
        child = os.fork()
        if child == 0:  # as nobody: refused, nothing made
            os.setgid(65534)
            os.setuid(65534)
            try:
                import_image(tmp_path / name, "x", Store(tmp_path / f"store-{name}"))
            except LayerError as error:
                os._exit(0 if "import as root" in str(error) else 2)
            os._exit(1)
        assert os.waitpid(child, 0)[1] == 0, name
        assert files_under(tmp_path / f"store-{name}") <= {"layers", "layers/sha256", "blobs", "blobs/sha256"}


def test_not_an_image(tmp_path: Path, store: Store) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="neither an OCI image layout"):
        import_image(tmp_path / "empty", "x", store)
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    with pytest.raises(ImageError, match="cannot read it"):
        import_image(tmp_path / "junk", "x", store)
    oci.write_oci_layout(tmp_path / "layout", [[oci.file("a")]])
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    manifest = tmp_path / "layout" / index["manifests"][0]["digest"].replace("sha256:", "blobs/sha256/")
    manifest.write_text(manifest.read_text() + " ")
    with pytest.raises(ImageError, match="does not match its digest"):
        import_image(tmp_path / "layout", "x", store)


def test_an_import_removes_what_a_dead_import_left_and_nothing_else(tmp_path: Path, store: Store) -> None:
    from cgctl.images import store as stores

    layers = store.root / "layers" / "sha256"
    layers.mkdir(parents=True)
    dead_boot = layers / ".0123456789ab-deadbeef-1-x1"  # a machine killed mid-import: another boot
    dead_pid = layers / f".0123456789ab-{stores._BOOT_ID}-{2**22 + 1}-x2"  # beyond pid_max: never alive
    running = layers / f".0123456789ab-{stores._BOOT_ID}-{os.getpid()}-x3"  # an import going on now
    for work in (dead_boot, dead_pid, running):
        (work / "etc").mkdir(parents=True)
    oci.write_oci_layout(tmp_path / "image", [oci.busybox_layer()])
    import_image(tmp_path / "image", "fresh:1", store)
    assert sorted(p.name for p in layers.iterdir() if p.name.startswith(".")) == [running.name]
    assert not any(p.name.startswith(".whiteout-probe") for p in store.root.iterdir())


def test_a_saved_record_is_on_disk_before_its_name(tmp_path: Path, store: Store) -> None:
    oci.write_oci_layout(tmp_path / "image", [oci.busybox_layer()])
    record = import_image(tmp_path / "image", "durable:1", store)
    path = store.record("durable", "1")
    assert json.loads(path.read_text()) == record
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(path.parent.glob(".*.tmp"))


def test_the_local_runtime_does_the_image_verbs_on_its_store_with_the_clis_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--store DIR` is this host's store whatever daemon answers; its errors are the runtime's one
    error type, with the messages `cgctl image` has always shown."""
    from cgctl import state
    from cgctl.runtime.api import Failure, NotFound
    from cgctl.runtime.interface import connect
    from cgctl.runtime.local import LocalRuntime

    monkeypatch.setenv("CGCTL_HOST", "tcp://192.0.2.1:1")  # never reached
    runtime = connect(state_dir=tmp_path / "state", image_store=tmp_path / "store")
    assert isinstance(runtime, LocalRuntime) and runtime.host is None
    oci.write_oci_layout(tmp_path / "image", [[oci.file("greeting", b"hello\n" * 1000)]])
    seen: list[tuple[int, int]] = []
    record = runtime.import_image(
        str(tmp_path / "image"), "app:1", lambda done, total: seen.append((done, total))
    )
    assert seen and [i["id"] for i in runtime.images()] == [record["id"]]
    assert runtime.inspect_image("app:1") == Store(tmp_path / "store").load("app:1")
    saved = runtime.save_image("app:1", str(tmp_path / "app.tar"))
    assert saved["size"] == (tmp_path / "app.tar").stat().st_size

    with pytest.raises(Failure, match=r"^invalid value for NAME\[:TAG\]: 'Bad:1': not an image name"):
        runtime.import_image(str(tmp_path / "image"), "Bad:1")
    with pytest.raises(Failure, match=f"^{re.escape(str(tmp_path / 'nothere'))}: not imported: "):
        runtime.import_image(str(tmp_path / "nothere"), "app:2")
    with pytest.raises(NotFound, match=r"^no image gone:1 in "):
        runtime.inspect_image("gone:1")
    with pytest.raises(
        Failure, match=f"^gone:1: not saved to {re.escape(str(tmp_path / 'gone.tar'))}: no image gone:1"
    ):
        runtime.save_image("gone:1", str(tmp_path / "gone.tar"))

    claim = state.claim(
        tmp_path / "state", "user", {"cgroup": str(tmp_path), "spec": {"rootfs": {"image": "app:1"}}}
    )
    with pytest.raises(Failure, match=r"^app:1 is in use by the running container user: stop it first$"):
        runtime.remove_image("app:1")
    claim.release()
    assert len(runtime.remove_image("app:1")) == 1 and runtime.images() == []
    with pytest.raises(NotFound, match=r"^no image app:1 in "):
        runtime.remove_image("app:1")


def test_the_remote_runtime_inspects_an_image_from_the_daemons_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from cgctl.runtime.api import Invalid, NotFound
    from cgctl.runtime.remote import RemoteRuntime

    runtime = RemoteRuntime("tcp://192.0.2.1:1")  # never reached: the list is given
    listed = [
        {"name": "app", "tag": "1", "id": "sha256:a"},
        {"name": "app", "tag": "latest", "id": "sha256:b"},
    ]
    monkeypatch.setattr(runtime, "images", lambda: listed)
    assert runtime.inspect_image("app")["id"] == "sha256:b"
    with pytest.raises(NotFound, match=r"^no image app:2 in the daemon's store at tcp://192\.0\.2\.1:1$"):
        runtime.inspect_image("app:2")
    with pytest.raises(Invalid, match="not an image name"):
        runtime.inspect_image("Bad:1")
