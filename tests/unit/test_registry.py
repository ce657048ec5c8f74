"""Registries and commits on the host: references, credentials, layer packing, commit, save, and the
distribution client against a real docker-registry on loopback (tests/registry.py)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cgctl.daemon.errors import validation_message
from cgctl.images import Store, auth, import_image
from cgctl.images import layer as layers
from cgctl.images import reference as references
from cgctl.images.commit import commit
from cgctl.images.pull import pull
from cgctl.images.push import push
from cgctl.images.registry import Options, RegistryError
from cgctl.images.save import save
from cgctl.images.source import DOCKER_MANIFEST
from cgctl.runtime.api import PullRequest, PushRequest, RegistryAuth, RegistryRequest
from cgctl.runtime.remote import _with_secret
from tests import oci
from tests.registry import BlobProxy, Registry, running_registry, skopeo

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_700_000_000  # every entry of a hand-made tree: whole seconds survive a round trip exactly


# -- references


@pytest.mark.parametrize(
    ("text", "fields", "name", "tag", "repository", "full"),
    [
        ("busybox", (None, "busybox", None, None), "busybox", "latest", "library/busybox",
         "docker.io/library/busybox:latest"),
        ("library/busybox:1.36", (None, "library/busybox", "1.36", None), "busybox", "1.36",
         "library/busybox", "docker.io/library/busybox:1.36"),
        ("docker.io/busybox", ("docker.io", "busybox", None, None), "busybox", "latest",
         "library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/library/busybox:musl", ("docker.io", "library/busybox", "musl", None), "busybox",
         "musl", "library/busybox", "docker.io/library/busybox:musl"),
        ("team/app:1.2-rc_3", (None, "team/app", "1.2-rc_3", None), "team/app", "1.2-rc_3", "team/app",
         "docker.io/team/app:1.2-rc_3"),
        ("ghcr.io/owner/my-app__x.y", ("ghcr.io", "owner/my-app__x.y", None, None),
         "ghcr.io/owner/my-app__x.y", "latest", "owner/my-app__x.y", "ghcr.io/owner/my-app__x.y:latest"),
        ("localhost/app", ("localhost", "app", None, None), "localhost/app", "latest", "app",
         "localhost/app:latest"),
        ("127.0.0.1:5000/team/app:v1", ("127.0.0.1:5000", "team/app", "v1", None),
         "127.0.0.1:5000/team/app", "v1", "team/app", "127.0.0.1:5000/team/app:v1"),
        ("[::1]:5000/app", ("[::1]:5000", "app", None, None), "[::1]:5000/app", "latest", "app",
         "[::1]:5000/app:latest"),
        (f"registry.example.com/a/b/c@{DIGEST}", ("registry.example.com", "a/b/c", None, DIGEST),
         "registry.example.com/a/b/c", f"sha256-{HEX}", "a/b/c", f"registry.example.com/a/b/c@{DIGEST}"),
        (f"app:1@{DIGEST}", (None, "app", "1", DIGEST), "app", "1", "library/app",
         f"docker.io/library/app:1@{DIGEST}"),
        ("localhost:5000", (None, "localhost", "5000", None), "localhost", "5000", "library/localhost",
         "docker.io/library/localhost:5000"),  # as docker reads it: the image localhost, tag 5000
    ],
)  # fmt: skip
def test_good_references(
    text: str, fields: tuple[str | None, ...], name: str, tag: str, repository: str, full: str
) -> None:
    parsed = references.parse(text)
    assert (parsed.domain, parsed.path, parsed.tag, parsed.digest) == fields
    assert (parsed.name, parsed.store_tag, parsed.repository, str(parsed)) == (name, tag, repository, full)
    assert parsed.registry == (fields[0] or "docker.io")
    # The store's name for it names the same image when parsed again.
    again = references.parse(f"{name}:{tag}")
    assert (again.name, again.store_tag, again.registry, again.repository) == (
        name,
        tag,
        parsed.registry,
        repository,
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Busybox", "not an image name"),
        ("a:b:c", "not an image name"),
        ("../x", "is not a registry's domain"),
        ("a//b", "not an image name"),
        ("-app", "not an image name"),
        ("app/", "not an image name"),
        ("", "not an image name"),
        ("x" * 256, "not an image name"),
        (":tag", "not an image name"),
        ("x:", "is not a tag"),
        ("app:bad!tag", "is not a tag"),
        ("app:" + "t" * 129, "is not a tag"),
        ("app@sha256:abc", "is not a digest"),
        (f"app@md5:{HEX}", "is not a digest"),
        (f"app@sha256:{HEX.upper()}", "is not a digest"),
        ("exa_mple.com/app", "is not a registry's domain"),
        ("host:123456/app", "is not a registry's domain"),
    ],
)
def test_bad_references_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as error:
        references.parse(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize(
    ("domain", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("[::1]", True),
        ("localhost.example.com:5000", False),
        ("registry.example.com", False),
        ("10.0.0.1:5000", False),
        ("[2001:db8::1]:5000", False),
        ("docker.io", False),
    ],
)
def test_is_loopback(domain: str, loopback: bool) -> None:
    assert references.is_loopback(domain) is loopback


# -- credentials


@pytest.fixture
def auth_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """cgctl's file and docker's, both under tmp_path: (cgctl's, docker's)."""
    monkeypatch.delenv("CGCTL_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "docker").mkdir()
    return tmp_path / "config" / "cgctl" / "auth.json", tmp_path / "docker" / "config.json"


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_login_saves_docker_format_json_only_its_owner_reads(auth_files: tuple[Path, Path]) -> None:
    mine, _ = auth_files
    assert auth.auth_file() == mine
    assert auth.save("127.0.0.1:5000", "alice", "pa:ss word") == mine
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    assert stat.S_IMODE(mine.parent.stat().st_mode) == 0o700
    assert json.loads(mine.read_text()) == {
        "auths": {"127.0.0.1:5000": {"auth": basic("alice", "pa:ss word")}}
    }
    assert auth.lookup("127.0.0.1:5000") == ("alice", "pa:ss word")  # a ':' in a password is the password's

    # Another registry joins it; a second login to the first replaces its entry; a file once readable
    # by others is 0600 again.
    mine.chmod(0o644)
    auth.save("ghcr.io", "bob", "b")
    auth.save("127.0.0.1:5000", "carol", "c")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    assert json.loads(mine.read_text())["auths"] == {
        "127.0.0.1:5000": {"auth": basic("carol", "c")},
        "ghcr.io": {"auth": basic("bob", "b")},
    }


def test_the_auth_file_may_be_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGCTL_AUTH_FILE", str(tmp_path / "elsewhere.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    auth.save("localhost:5000", "u", "p")
    assert auth.lookup("localhost:5000") == ("u", "p")
    assert (tmp_path / "elsewhere.json").exists()


def test_lookup_reads_cgctl_then_docker(auth_files: tuple[Path, Path]) -> None:
    mine, docker = auth_files
    docker.write_text(json.dumps({
        "auths": {
            "both.example.com": {"auth": basic("docker-user", "d")},
            "https://docker-only.example.com": {"auth": basic("d2", "p2")},
            "plain.example.com": {"username": "named", "password": "given"},
            "https://index.docker.io/v1/": {"auth": basic("hub", "h")},
        },
        "credsStore": "ignored",
    }))  # fmt: skip
    auth.save("both.example.com", "cgctl-user", "c")
    assert auth.lookup("both.example.com") == ("cgctl-user", "c")  # cgctl's own first
    assert auth.lookup("docker-only.example.com") == ("d2", "p2")  # docker's, keyed by URL
    assert auth.lookup("plain.example.com") == ("named", "given")  # username and password entries
    for hub in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert auth.lookup(hub) == ("hub", "h")
    assert auth.lookup("nowhere.example.com") is None
    # Logging out of cgctl leaves docker's entry, which then answers.
    assert auth.remove("both.example.com") is True
    assert auth.remove("both.example.com") is False
    assert auth.lookup("both.example.com") == ("docker-user", "d")
    assert json.loads(mine.read_text()) == {"auths": {}}


def test_remove_without_a_file(auth_files: tuple[Path, Path]) -> None:
    assert auth.remove("127.0.0.1:5000") is False
    assert not auth_files[0].exists()
    assert auth.lookup("127.0.0.1:5000") is None  # neither file exists


SECRET = "hunter2-SECRET"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"auths": {"r.example.com": {"auth": "' + basic("u", SECRET), "not a readable credentials file"),
        (json.dumps([{"auth": basic("u", SECRET)}]), "not a credentials file"),
        (json.dumps({"auths": [basic("u", SECRET)]}), "not a credentials file"),
        (json.dumps({"auths": {"r.example.com": {"auth": base64.b64encode(SECRET.encode()).decode()}}}),
         "the entry for r.example.com has neither"),
        (json.dumps({"auths": {"r.example.com": {"auth": "%%" + SECRET}}}), "the entry for r.example.com"),
        (json.dumps({"auths": {"r.example.com": {"password": SECRET}}}), "the entry for r.example.com"),
        (b"\xff\xfe" + SECRET.encode(), "not a readable credentials file"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("which", ["cgctl", "docker"])
def test_malformed_files_name_the_file_never_the_password(
    auth_files: tuple[Path, Path], content: str | bytes, reason: str, which: str
) -> None:
    path = auth_files[0] if which == "cgctl" else auth_files[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=reason) as error:
        auth.lookup("r.example.com")
    message = str(error.value)
    assert str(path) in message
    encoded = base64.b64encode(SECRET.encode()).decode()
    assert SECRET not in message and encoded not in message and basic("u", SECRET) not in message


# -- layers: pack and unpack


def build_tree(root: Path, reverse: bool = False) -> Path:
    """An overlayfs upper directory by hand: files, modes, owners, links, a device, whiteouts (also in
    a subdirectory), an opaque directory, an empty one; `reverse` makes it in another order."""
    directories = ["dir", "dir/sub", "empty", "opaque"]
    files: list[tuple[str, bytes, int]] = [
        ("file.txt", b"hello\n", 0o644),
        ("exec.sh", b"#!/bin/sh\necho hi\n", 0o755),
        ("dir/nested.txt", b"nested" * 1000, 0o600),
        ("dir/sub/deep", b"", 0o640),
        ("opaque/kept", b"kept\n", 0o644),
        ("suid", b"x", 0o4755),
    ]
    root.mkdir(parents=True)
    for directory in directories:
        (root / directory).mkdir()
    for name, data, mode in reversed(files) if reverse else files:
        (root / name).write_bytes(data)
        if name == "suid":
            os.chown(root / name, 1234, 5678)  # before the chmod: a chown clears set-user-ID
        os.chmod(root / name, mode)
    os.chmod(root / "dir", 0o750)
    os.symlink("file.txt", root / "link")
    os.symlink("/etc/passwd", root / "dir" / "absolute")
    os.lchown(root / "link", 42, 43)
    os.link(root / "file.txt", root / "dir" / "hard")
    os.mkfifo(root / "fifo", 0o600)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a device, not a whiteout
    for whiteout in ("gone", "dir/sub/gone-too"):
        os.mknod(root / whiteout, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.setxattr(root / "opaque", layers.OPAQUE_XATTR, b"y")
    for directory, subdirectories, names in os.walk(root, topdown=False):
        for name in [*subdirectories, *names]:
            os.utime(Path(directory) / name, (MTIME, MTIME), follow_symlinks=False)
    return root


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything an image layer keeps of a tree, by path (whiteouts as such), plus its hard links."""
    found: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for directory, subdirectories, names in os.walk(root):
        for name in [*subdirectories, *names]:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            info = os.lstat(path)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                found[relative] = ("whiteout",)
                continue
            if stat.S_ISREG(info.st_mode):
                inodes.setdefault(info.st_ino, []).append(relative)
                content: Any = path.read_bytes()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISDIR(info.st_mode):
                content = opaque(path)
            else:
                content = info.st_rdev
            found[relative] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid,
                               info.st_gid, info.st_mtime, content)  # fmt: skip
    found["(hard links)"] = tuple(sorted(tuple(sorted(paths)) for paths in inodes.values() if len(paths) > 1))
    return found


def opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, layers.OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def packed(root: Path) -> bytes:
    out = io.BytesIO()
    layers.pack(root, out)
    return out.getvalue()


def test_pack_then_unpack_gives_the_same_tree_and_the_same_bytes(tmp_path: Path) -> None:
    upper = build_tree(tmp_path / "upper")
    data = packed(upper)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = {member.name: member for member in archive.getmembers()}
    # Whiteouts and the opaque directory as image layers spell them; no 0/0 device is left in the tar.
    assert {".wh.gone", "dir/sub/.wh.gone-too", "opaque/.wh..wh..opq"} <= set(members)
    assert "gone" not in members and "dir/sub/gone-too" not in members
    assert not any(m.ischr() and (m.devmajor, m.devminor) == (0, 0) for m in members.values())
    assert members["null"].ischr() and (members["null"].devmajor, members["null"].devminor) == (1, 3)
    assert members["file.txt"].isreg() and members["dir/hard"].islnk()  # the first one walked is the file
    assert members["dir/hard"].linkname == "file.txt"
    assert members["link"].issym() and (members["link"].uid, members["link"].gid) == (42, 43)
    assert (members["suid"].mode, members["suid"].uid, members["suid"].gid) == (0o4755, 1234, 5678)
    assert all(m.uname == "" and m.gname == "" for m in members.values())

    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    layers.unpack(io.BytesIO(data), unpacked, as_root=True)
    assert snapshot(unpacked) == snapshot(upper)
    assert snapshot(upper)["(hard links)"] == (("dir/hard", "file.txt"),)
    assert packed(unpacked) == data  # and packing what was unpacked gives the very same bytes


def test_the_same_tree_packs_to_the_same_bytes(tmp_path: Path) -> None:
    one = build_tree(tmp_path / "one")
    other = build_tree(tmp_path / "other", reverse=True)  # other inodes, another creation order
    assert packed(one) == packed(one) == packed(other)


def test_sockets_are_left_out_of_a_layer(tmp_path: Path) -> None:
    """A layer cannot hold a socket (docker leaves them out too): a container that made one commits."""
    upper = tmp_path / "upper"
    (upper / "run").mkdir(parents=True)
    (upper / "run" / "file").write_text("x")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(upper / "run" / "app.sock"))
        with tarfile.open(fileobj=io.BytesIO(packed(upper))) as archive:
            assert archive.getnames() == ["run", "run/file"]


# -- commit and save


def base_layout(directory: Path) -> Path:
    """base: /etc/x, /etc/keep, /opaque/old in one layer, /etc/more in a second."""
    bottom = [oci.directory("etc"), oci.file("etc/x", b"x\n"), oci.file("etc/keep", b"keep\n"),
              oci.directory("opaque"), oci.file("opaque/old", b"old\n")]  # fmt: skip
    top = [oci.directory("etc"), oci.file("etc/more", b"more\n")]
    oci.write_oci_layout(directory, [bottom, top], Cmd=["/bin/sh"], Env=["PATH=/bin"])
    return directory


def make_upper(directory: Path) -> Path:
    """An upper directory as a container leaves it after `rm /etc/x; echo new > /etc/new` and
    replacing /opaque: a whiteout, a new file, an opaque directory."""
    (directory / "etc").mkdir(parents=True)
    (directory / "etc" / "new").write_text("new\n")
    os.mknod(directory / "etc" / "x", stat.S_IFCHR, os.makedev(0, 0))
    (directory / "opaque").mkdir()
    os.setxattr(directory / "opaque", layers.OPAQUE_XATTR, b"y")
    (directory / "opaque" / "fresh").write_text("fresh\n")
    return directory


def blob_files(store: Store) -> list[str]:
    return sorted(p.name for p in (store.root / "blobs" / "sha256").iterdir())


def check_commit(store: Store, base: dict[str, Any], record: dict[str, Any], media_type: str) -> str:
    """The record, config and manifest of a commit on top of base; returns the new layer's diff_id."""
    assert record["layers"][:-1] == base["layers"] and len(record["layers"]) == len(base["layers"]) + 1
    assert store.load(f"{record['name']}:{record['tag']}") == record
    config = json.loads(store.read_blob(record["id"]))
    assert config["rootfs"]["diff_ids"] == record["layers"]
    assert config["config"] == json.loads(store.read_blob(base["id"]))["config"]
    assert record["config"] == base["config"]
    assert config["history"][-1]["created_by"] == "cgctl commit job"
    assert config["history"][-1]["created"] == config["created"] == record["created"]
    manifest_bytes = store.read_blob(record["manifest"])
    manifest = json.loads(manifest_bytes)
    base_manifest = json.loads(store.read_blob(base["manifest"]))
    assert manifest["mediaType"] == base_manifest["mediaType"]
    assert manifest["config"]["digest"] == record["id"]
    assert manifest["config"]["size"] == len(store.read_blob(record["id"]))
    assert manifest["config"]["mediaType"] == base_manifest["config"]["mediaType"]
    assert manifest["layers"][:-1] == base_manifest["layers"]
    new = manifest["layers"][-1]
    assert new["mediaType"] == media_type
    blob = store.blob(new["digest"]).read_bytes()
    assert (oci.sha256(blob), len(blob)) == (new["digest"], new["size"])
    assert oci.sha256(gzip.decompress(blob)) == record["layers"][-1]
    assert sorted(record["blobs"]) == sorted(
        {record["manifest"], record["id"], *(d["digest"] for d in manifest["layers"])}
    )
    assert not [name for name in blob_files(store) if name.startswith(".")], "a temporary blob was left"
    return str(record["layers"][-1])


def test_commit_adds_the_upper_directory_as_a_layer(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    base = import_image(base_layout(tmp_path / "layout"), "base:1", store)
    upper = make_upper(tmp_path / "upper")
    record = commit(upper, "base:1", "derived:2", store, "cgctl commit job", "a comment")
    assert (record["name"], record["tag"], record["parent"], record["source"]) == (
        "derived", "2", "base:1", "commit of job"
    )  # fmt: skip
    diff_id = check_commit(store, base, record, OCI_GZIP)
    assert json.loads(store.read_blob(record["id"]))["history"] == [
        {"created": record["created"], "created_by": "cgctl commit job", "comment": "a comment"}
    ]
    layer = store.layer(diff_id)
    info = os.lstat(layer / "etc" / "x")
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0  # the whiteout, as overlayfs wants it
    assert (layer / "etc" / "new").read_text() == "new\n" and opaque(layer / "opaque")
    new_blob = store.blob(json.loads(store.read_blob(record["manifest"]))["layers"][-1]["digest"])
    with gzip.open(new_blob) as raw, tarfile.open(fileobj=raw) as archive:
        names = ["etc", "opaque", "etc/new", "etc/.wh.x", "opaque/.wh..wh..opq", "opaque/fresh"]
        assert archive.getnames() == names

    # The same writes again: the same layer, already there; no bytes of it are left lying about.
    again = commit(upper, "derived:2", "derived:3", store, "cgctl commit job")
    assert again["layers"][-2:] == [diff_id, diff_id] and again["parent"] == "derived:2"
    assert not [name for name in blob_files(store) if name.startswith(".")], "a temporary blob was left"

    # No parent, a bad name: refused before anything is written.
    before = blob_files(store)
    with pytest.raises(LookupError, match="no image nosuch:1"):
        commit(upper, "nosuch:1", "x:1", store, "cgctl commit job")
    with pytest.raises(ValueError, match="not an image name"):
        commit(upper, "base:1", "Bad:1", store, "cgctl commit job")
    assert blob_files(store) == before


def test_save_then_import_gives_the_same_image(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    import_image(base_layout(tmp_path / "layout"), "base:1", store)
    record = commit(make_upper(tmp_path / "upper"), "base:1", "derived:2", store, "cgctl commit job")
    archive = tmp_path / "out" / "derived.tar"
    archive.parent.mkdir()
    assert save("derived:2", store, archive) == archive.stat().st_size
    assert os.listdir(archive.parent) == ["derived.tar"]  # nothing half-written beside it
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert names[:2] == ["oci-layout", "index.json"] and len(names) == 2 + len(record["blobs"])
    assert index["manifests"][0]["digest"] == record["manifest"]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "2"

    other = Store(tmp_path / "other")
    again = import_image(archive, "again:1", other)
    assert (again["id"], again["layers"], again["manifest"]) == (
        record["id"],
        record["layers"],
        record["manifest"],
    )
    assert other.read_blob(again["manifest"]) == store.read_blob(record["manifest"])

    with pytest.raises(LookupError, match="no image nosuch:1"):
        save("nosuch:1", store, tmp_path / "out" / "nosuch.tar")
    assert os.listdir(archive.parent) == ["derived.tar"]


# -- the registry client, against a real registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry on loopback holding team/base:1 (OCI) and team/dock:1 (docker v2s2)."""
    directory = tmp_path_factory.mktemp("registry")
    layout = base_layout(directory / "layout")
    with running_registry(directory / "served") as served:
        served.push(layout, "team/base:1")
        skopeo("copy", "--format", "v2s2", *served.skopeo_flags("dest"), f"oci:{layout}",
               served.reference("team/dock:1"))  # fmt: skip
        yield served


PLAIN = Options()


def test_pull_is_verified_recorded_and_fetches_layers_once(registry: Registry, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    digest = registry.inspect("team/base:1")["Digest"]
    with BlobProxy(registry) as proxy:
        reference = f"{proxy.address}/team/base:1"
        record = pull(reference, store, PLAIN)
        assert (record["name"], record["tag"], record["digest"]) == (
            f"{proxy.address}/team/base",
            "1",
            digest,
        )
        assert (record["registry"], record["repository"], record["format"]) == (
            proxy.address,
            "team/base",
            "oci",
        )
        layer_digests = [d["digest"] for d in json.loads(store.read_blob(record["manifest"]))["layers"]]
        fetched = [r.path.rsplit("/", 1)[1] for r in proxy.served("blob")]
        assert sorted(fetched) == sorted([*layer_digests, record["id"]])
        assert oci.sha256(store.read_blob(record["manifest"])) == digest
        # Again: the layers are in the store, so none of them is asked for.
        proxy.requests.clear()
        assert pull(reference, store, PLAIN)["layers"] == record["layers"]
        assert [r.path.rsplit("/", 1)[1] for r in proxy.served("blob")] in ([], [record["id"]])
        assert len(proxy.served("manifest")) == 1
        # By digest: a record of its own, and a lookup by digest finds the tagged one too.
        by_digest = pull(f"{proxy.address}/team/base@{digest}", store, PLAIN)
        assert by_digest["tag"] == f"sha256-{digest.removeprefix('sha256:')}"
        assert store.load(f"{proxy.address}/team/base@{digest}")["digest"] == digest

    with pytest.raises(RegistryError, match="no such repository, tag or digest"):
        pull(f"{registry.address}/team/base:nosuch", store, PLAIN)
    assert not store.record(f"{registry.address}/team/base", "nosuch").exists()


def test_push_mounts_then_finds_everything_present(registry: Registry, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    record = pull(f"{registry.address}/team/base:1", store, PLAIN)
    blobs = 1 + len(record["layers"])
    pushed = push(f"{registry.address}/team/base:1", f"{registry.address}/other/copy:1", store, PLAIN)
    assert (pushed.sent, pushed.mounted, pushed.present) == (0, blobs, 0)
    assert pushed.digest == record["digest"]  # the manifest byte for byte
    assert pushed.reference == f"{registry.address}/other/copy:1"
    assert registry.inspect("other/copy:1")["Digest"] == record["digest"]
    again = push(f"{registry.address}/team/base:1", f"{registry.address}/other/copy:1", store, PLAIN)
    assert (again.sent, again.mounted, again.present) == (0, 0, blobs)
    # Under a name of its own in a repository that never saw it: uploaded.
    fresh = push(f"{registry.address}/team/base:1", f"{registry.address}/fresh/one:2", store, PLAIN)
    assert (fresh.sent, fresh.mounted, fresh.present) == (0, blobs, 0)


def test_a_commit_on_a_docker_image_pushes_and_pulls_back(registry: Registry, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    base = pull(f"{registry.address}/team/dock:1", store, PLAIN)
    assert base["format"] == "docker"
    assert json.loads(store.read_blob(base["manifest"]))["mediaType"] == DOCKER_MANIFEST
    target = f"{registry.address}/team/dock:committed"
    record = commit(make_upper(tmp_path / "upper"), f"{registry.address}/team/dock:1", target, store,
                    "cgctl commit job")  # fmt: skip
    check_commit(store, base, record, DOCKER_GZIP)
    pushed = push(target, None, store, PLAIN)
    assert (pushed.sent, pushed.mounted, pushed.present) == (2, 0, len(base["layers"]))  # config, new layer
    assert pushed.digest == oci.sha256(store.read_blob(record["manifest"]))
    raw = json.loads(
        skopeo("inspect", "--raw", *registry.skopeo_flags(), registry.reference("team/dock:committed")).stdout
    )
    assert raw == json.loads(store.read_blob(record["manifest"]))
    other = Store(tmp_path / "other")
    back = pull(target, other, PLAIN)
    assert (back["id"], back["layers"], back["digest"]) == (record["id"], record["layers"], pushed.digest)
    assert (other.layer(record["layers"][-1]) / "etc" / "new").read_text() == "new\n"


def test_wrong_credentials_are_refused_and_never_shown(tmp_path: Path) -> None:
    password, wrong = "right-PASSWORD-42", "wrong-PASSWORD-17"
    store = Store(tmp_path / "store")
    import_image(base_layout(tmp_path / "layout"), "base:1", store)
    with running_registry(tmp_path / "registry", users={"alice": password}) as registry:
        target = f"{registry.address}/team/app:1"
        with pytest.raises(RegistryError) as error:
            push("base:1", target, store, Options(credentials=lambda _: ("alice", wrong)))
        message = str(error.value)
        assert "401" in message and "the user name or password is wrong" in message
        assert wrong not in message and password not in message
        assert base64.b64encode(f"alice:{wrong}".encode()).decode() not in message
        with pytest.raises(RegistryError, match=f"log in first: cgctl login {registry.address}"):
            pull(target, store, PLAIN)
        pushed = push("base:1", target, store, Options(credentials=lambda _: ("alice", password)))
        assert (pushed.sent, pushed.mounted, pushed.present) == (3, 0, 0)
        with pytest.raises(RegistryError) as error:
            pull(target, Store(tmp_path / "other"), Options(credentials=lambda _: ("alice", wrong)))
        assert wrong not in str(error.value) and "the user name or password is wrong" in str(error.value)
        assert pull(target, Store(tmp_path / "other"), Options(credentials=lambda _: ("alice", password)))


# -- credentials through the daemon's API


def api_message(model: type[RegistryRequest], body: dict[str, Any]) -> str:
    """The daemon's 400 message for a body, as its RequestValidationError handler makes it."""
    with pytest.raises(ValidationError) as error:
        model.model_validate(body)
    return validation_message([{**e, "loc": ("body", *e["loc"])} for e in error.value.errors()])


@pytest.mark.parametrize(
    ("auth_body", "says"),
    [
        (
            {"username": "u", "password": SECRET * 400},
            "invalid auth.password: Value should have at most 4096",
        ),
        ({"username": "u", "password": 12345678}, "invalid auth.password: Input should be a valid string"),
        ({"username": "u", "password": SECRET, "token": SECRET}, "unknown field 'auth.token'"),
        ({"password": SECRET}, "missing field 'auth.username'"),
    ],
)
def test_api_validation_messages_never_echo_a_password(auth_body: dict[str, Any], says: str) -> None:
    requests: list[tuple[type[RegistryRequest], dict[str, Any]]] = [
        (PullRequest, {"reference": "busybox"}),
        (PushRequest, {"source": "busybox"}),
    ]
    for model, body in requests:
        message = api_message(model, {**body, "auth": auth_body})
        assert says in message, message
        assert SECRET not in message and "12345678" not in message


def test_the_password_is_masked_but_sent_in_clear_to_the_daemon() -> None:
    request = PullRequest(reference="busybox", auth=RegistryAuth(username="u", password=SECRET))
    assert SECRET not in repr(request) and SECRET not in str(request.model_dump(mode="json"))
    body = _with_secret(request)
    assert body["auth"] == {"username": "u", "password": SECRET}
    assert PullRequest.model_validate(body).auth.password.get_secret_value() == SECRET  # type: ignore[union-attr]
    assert request.auth is not None and request.auth.password.get_secret_value() == SECRET  # unchanged
