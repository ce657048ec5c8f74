"""Registries for real: `cgctl pull`, `push`, `login` and `image save` against Debian's docker-registry 2.8,
with skopeo as the other client and BlobProxy in front to count, slow down and corrupt what it serves."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests import oci
from tests.integration.workloads import MiB, cgctl_in_process, tmpfs
from tests.registry import BlobProxy, Registry, free_port, running_registry, skopeo

pytestmark = pytest.mark.usefixtures("no_leaks", "private_skopeo_cache")

USER, PASSWORD, WRONG = "alice", "Tr0ub4dor-and-3-horses", "wr0ng-Guess-42"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty store on a tmpfs; credentials only from tmp_path (never a real user's)."""
    root = tmpfs(tmp_path / "store")
    monkeypatch.setenv("CGCTL_IMAGE_STORE", str(root))
    monkeypatch.setenv("CGCTL_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for variable in ("CGCTL_TLS_CA", "CGCTL_INSECURE_REGISTRIES", "CGCTL_HOST"):
        monkeypatch.delenv(variable, raising=False)
    yield root
    subprocess.run(["umount", "--lazy", str(root)], check=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One plain-HTTP registry on loopback for the module, without users."""
    with running_registry(tmp_path_factory.mktemp("registry")) as started:
        yield started


@pytest.fixture
def proxy(registry: Registry) -> Iterator[BlobProxy]:
    with BlobProxy(registry) as started:
        yield started


class TcpRelay:
    """Forwards TCP connections on a loopback port of its own to `upstream` as they are, keeping the first
    bytes each client sent: a TLS ClientHello starts with 0x16, plain HTTP with its method's name."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.openings: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *_: object) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            first = client.recv(1 << 16)
            self.openings.append(first)
            upstream.sendall(first)
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join(30)


def _pump(source: socket.socket, destination: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            destination.sendall(data)
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def pull(capfd: pytest.CaptureFixture[str], reference: str, *flags: str) -> tuple[int, str, str]:
    return cgctl_in_process(capfd, "pull", *flags, reference)


def record_of(store: Path, name: str, tag: str) -> dict[str, Any]:
    return dict(json.loads((store / "images" / name / f"{tag}.json").read_text()))


def layer_path(store: Path, diff_id: str) -> Path:
    return store / "layers" / diff_id.replace(":", "/")


def blob_gets(proxy: BlobProxy, since: int = 0) -> list[str]:
    """The digests of the blobs GET requests asked the proxy for, after the first `since` requests."""
    return [
        r.path.rsplit("/", 1)[1] for r in proxy.requests[since:] if r.kind == "blob" and r.method == "GET"
    ]


def contents(root: Path) -> list[str]:
    """Everything under root, as relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def small_layout(directory: Path, greeting: bytes) -> None:
    """Two small gzip layers (no busybox), for the tests that never run the image."""
    oci.write_oci_layout(
        directory,
        [
            [oci.directory("etc"), oci.file("etc/greeting", greeting)],
            [oci.file("data", os.urandom(64 << 10))],
        ],
    )


def test_skopeo_pushes_cgctl_pulls_and_runs_it_with_whiteouts_and_a_second_pull_fetches_no_blob(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, store: Path, registry: Registry, proxy: BlobProxy
) -> None:
    bottom = oci.busybox_layer(
        oci.file("etc/greeting", b"hello from the registry\n"), oci.file("etc/gone", b"deleted above\n")
    )
    top = [oci.directory("etc"), oci.file("etc/.wh.gone"), oci.file("etc/added", b"added\n")]
    oci.write_oci_layout(tmp_path / "layout", [bottom, top])
    pushed = registry.push(tmp_path / "layout", "demo/busybox:1")  # over plain HTTP

    reference, name = f"{proxy.address}/demo/busybox:1", f"{proxy.address}/demo/busybox"
    status, out, err = pull(capfd, reference)
    assert status == 0, err
    assert out.startswith(f"{name}:1: pulled 2 layer(s)") and pushed in out, out
    record = record_of(store, name, "1")
    assert (record["name"], record["tag"], record["digest"]) == (name, "1", pushed)
    assert record["manifest"] == pushed
    assert sorted(blob_gets(proxy)) == sorted(record["blobs"][1:])  # the config and each layer, once

    status, out, err = cgctl_in_process(
        capfd, "run", "--image", reference, "--", "sh", "-c", "cat /etc/greeting; ls /etc"
    )
    assert status == 0, err
    assert out.splitlines() == ["hello from the registry", "added", "greeting", "group", "passwd"], out
    assert (layer_path(store, record["layers"][1]) / "etc" / "gone").is_char_device()  # what hid it

    before = len(proxy.requests)
    status, out, err = pull(capfd, reference)
    assert status == 0, err
    assert blob_gets(proxy, before) == [], "the second pull fetched blobs the store has"
    assert [r.kind for r in proxy.requests[before:]] == ["base", "manifest"]
    assert record_of(store, name, "1")["layers"] == record["layers"]


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Registry]:
    """A registry over HTTPS (a throwaway CA) asking for basic auth."""
    with running_registry(tmp_path / "secure", tls=True, users={USER: PASSWORD}) as started:
        yield started


def test_login_over_verified_tls_keeps_credentials_for_pull_and_push_and_never_shows_the_password(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    store: Path,
    secure: Registry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert secure.ca is not None
    ca, auth_file = str(secure.ca), tmp_path / "auth.json"

    def login(password: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
        return cgctl_in_process(
            capfd, "login", secure.address, "-u", USER, "--password-stdin", "--tls-ca", ca
        )

    status, out, err = login(WRONG)
    assert status == 125 and "401" in err and "password is wrong" in err, err
    assert WRONG not in out + err and PASSWORD not in out + err
    assert not auth_file.exists()

    status, out, err = login(PASSWORD)
    assert status == 0 and out.startswith(f"Login Succeeded (credentials for {secure.address}"), err
    assert PASSWORD not in out + err
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600
    text = auth_file.read_text()
    assert PASSWORD not in text
    assert json.loads(text) == {
        "auths": {secure.address: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}
    }

    small_layout(tmp_path / "layout", b"over TLS\n")
    pushed = secure.push(tmp_path / "layout", "team/app:1")
    reference = f"{secure.address}/team/app:1"
    status, out, err = pull(capfd, reference, "--tls-ca", ca)
    assert status == 0, err
    record = record_of(store, f"{secure.address}/team/app", "1")
    assert record["digest"] == pushed
    assert (layer_path(store, record["layers"][0]) / "etc" / "greeting").read_text() == "over TLS\n"

    # Without the CA the certificate is not trusted: a failure, never a retry over plain HTTP (which a
    # loopback registry that does not speak TLS would get). The relay sees what each connection opens with.
    with TcpRelay(secure.address) as relay:
        status, _, err = pull(capfd, f"{relay.address}/team/app:1")
    assert status == 125 and "CERTIFICATE_VERIFY_FAILED" in err and "cannot be reached" in err, err
    assert relay.openings and all(opening[:1] == b"\x16" for opening in relay.openings), relay.openings

    # Push an imported image with the kept credentials; skopeo sees the blobs and manifest cgctl keeps.
    small_layout(tmp_path / "local", b"pushed by cgctl\n")
    status, _, err = cgctl_in_process(capfd, "image", "import", str(tmp_path / "local"), "local/app:2")
    assert status == 0, err
    local = record_of(store, "local/app", "2")
    destination = f"{secure.address}/team/pushed:2"
    status, out, err = cgctl_in_process(capfd, "push", "local/app:2", destination, "--tls-ca", ca)
    assert status == 0, err
    assert out.strip() == f"{destination}: {local['manifest']} (blobs: 3 sent, 0 mounted, 0 already there)"
    inspected = secure.inspect("team/pushed:2")
    assert (inspected["Digest"], inspected["Layers"]) == (local["manifest"], local["blobs"][2:])
    status, out, err = cgctl_in_process(capfd, "push", "local/app:2", destination, "--tls-ca", ca)
    assert status == 0 and out.strip().endswith("(blobs: 0 sent, 0 mounted, 3 already there)"), err
    assert PASSWORD not in out + err

    status, out, err = cgctl_in_process(capfd, "logout", secure.address)
    assert status == 0 and json.loads(auth_file.read_text()) == {"auths": {}}, err
    status, _, err = pull(capfd, reference, "--tls-ca", ca)
    assert status == 125 and "401" in err and f"cgctl login {secure.address}" in err, err


def test_an_interrupted_pull_resumes_from_the_kept_bytes_with_a_range_request(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, store: Path, registry: Registry, proxy: BlobProxy
) -> None:
    payload = os.urandom(16 * MiB)  # incompressible: the blob is as big as the file
    members = [oci.file("payload", payload)]
    oci.write_oci_layout(tmp_path / "big", [members], compress=False)
    registry.push(tmp_path / "big", "big/random:1")
    size, digest = len(tar := oci.tar_bytes(members)), oci.sha256(tar)
    del tar
    partial = store / "blobs" / "sha256" / f".partial-{digest.split(':')[1]}"
    reference = f"{proxy.address}/big/random:1"

    proxy.rate = 1_500_000  # bytes per second: about 11 s for the blob
    child = subprocess.Popen(
        [sys.executable, "-m", "cgctl", "pull", reference],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.stat().st_size >= 3 * MiB):
            assert child.poll() is None, f"the pull exited {child.returncode}: {child.communicate()}"
            assert time.monotonic() < deadline, "the pull kept no 3 MiB of the blob in 120 s"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    kept = partial.stat().st_size
    assert 3 * MiB <= kept < size, kept
    assert not (store / "images").exists(), "a killed pull recorded an image"

    proxy.rate = None
    before = len(proxy.requests)
    status, _, err = pull(capfd, reference)
    assert status == 0, err
    ranges = [r.range for r in proxy.requests[before:] if r.path.endswith(digest) and r.method == "GET"]
    assert ranges == [f"bytes={kept}-"], ranges
    record = record_of(store, f"{proxy.address}/big/random", "1")
    unpacked = layer_path(store, record["layers"][0]) / "payload"
    assert hashlib.sha256(unpacked.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert (store / "blobs" / digest.replace(":", "/")).stat().st_size == size
    assert list((store / "blobs" / "sha256").glob(".partial-*")) == []
    assert [p.name for p in (store / "layers" / "sha256").iterdir() if p.name.startswith(".")] == []


def test_a_tampered_blob_is_refused_and_leaves_nothing_of_the_image_in_the_store(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, store: Path, registry: Registry, proxy: BlobProxy
) -> None:
    # Uncompressed, so that the flipped middle byte lands in a file's data: only the digest can tell.
    layers = [[oci.directory("etc"), oci.file("etc/small", b"small\n")], [oci.file("data", os.urandom(MiB))]]
    oci.write_oci_layout(tmp_path / "image", layers, compress=False)
    registry.push(tmp_path / "image", "tampered/app:1")
    bad = oci.sha256(oci.tar_bytes(layers[1]))
    reference = f"{proxy.address}/tampered/app:1"

    proxy.corrupt = bad
    status, out, err = pull(capfd, reference)
    assert status == 125 and out == "", (out, err)
    assert f"layer {bad}: the blob's content does not match its digest" in err, err
    assert bad in blob_gets(proxy)
    blobs = store / "blobs" / "sha256"
    assert not list(store.glob("images/**/*.json")), contents(store)
    assert not list(store.glob("layers/sha256/*")), contents(store)  # the good layer was taken back too
    assert [p.name for p in blobs.glob("*") if not p.name.startswith(".partial-")] == [], contents(store)
    assert not (blobs / f".partial-{bad.split(':')[1]}").exists()  # wrong bytes are never resumed from

    proxy.corrupt = None  # the registry's own bytes: the next pull fetches the blob whole and takes it
    before = len(proxy.requests)
    status, _, err = pull(capfd, reference)
    assert status == 0, err
    assert [r.range for r in proxy.requests[before:] if r.path.endswith(bad)] == [None]


def test_a_multi_platform_index_pulls_only_this_machines_image(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, store: Path, registry: Registry, proxy: BlobProxy
) -> None:
    other = "arm64" if ARCH == "amd64" else "amd64"  # listed first: taking the first would be wrong
    platforms = {
        f"linux/{arch}": [[oci.directory("etc"), oci.file("etc/platform", f"{arch}\n".encode())]]
        for arch in (other, ARCH)
    }
    oci.write_multiplatform_layout(tmp_path / "multi", platforms)
    index_digest = registry.push(tmp_path / "multi", "multi/app:1")
    index = registry.inspect("multi/app:1", raw=True)
    assert index["mediaType"] == oci.INDEX and len(index["manifests"]) == 2
    mine = next(m["digest"] for m in index["manifests"] if m["platform"]["architecture"] == ARCH)
    assert mine != index_digest

    status, _, err = pull(capfd, f"{proxy.address}/multi/app:1")
    assert status == 0, err
    record = record_of(store, f"{proxy.address}/multi/app", "1")
    assert record["manifest"] == mine and record["digest"] == mine
    assert (layer_path(store, record["layers"][0]) / "etc" / "platform").read_text() == f"{ARCH}\n"
    assert sorted(blob_gets(proxy)) == sorted(record["blobs"][1:])  # nothing of the other platform


def write_zstd_layout(directory: Path, members: list[oci.Member]) -> tuple[str, str]:
    """An OCI layout of one image with one zstd layer; (its diff_id, its blob's digest)."""
    tar = oci.tar_bytes(members)
    blob = zstandard.ZstdCompressor(level=3).compress(tar)
    assert blob[:4] == b"\x28\xb5\x2f\xfd"
    config = json.dumps(oci.image_config([tar], {})).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": oci.put_blob(directory, config), "size": len(config)},
        "layers": [{"mediaType": ZSTD_LAYER, "digest": oci.put_blob(directory, blob), "size": len(blob)}],
    }  # fmt: skip
    data = json.dumps(manifest).encode()
    oci.write_index(
        directory, {"mediaType": oci.MANIFEST, "digest": oci.put_blob(directory, data), "size": len(data)}
    )
    return oci.sha256(tar), oci.sha256(blob)


def test_a_zstd_layer_is_pulled_verified_and_unpacked(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, store: Path, registry: Registry
) -> None:
    text = b"zstd " * 20000  # compresses well: the blob is not the tar
    diff_id, blob = write_zstd_layout(
        tmp_path / "zstd", [oci.directory("etc"), oci.file("etc/zstd", text), oci.link("etc/alias", "zstd")]
    )
    registry.push(tmp_path / "zstd", "zstd/app:1")
    manifest = registry.inspect("zstd/app:1", raw=True)
    assert [(d["mediaType"], d["digest"]) for d in manifest["layers"]] == [(ZSTD_LAYER, blob)]

    status, _, err = pull(capfd, f"{registry.address}/zstd/app:1")
    assert status == 0, err
    record = record_of(store, f"{registry.address}/zstd/app", "1")
    assert record["layers"] == [diff_id] and record["blobs"][2:] == [blob]
    root = layer_path(store, diff_id)
    assert (root / "etc" / "zstd").read_bytes() == text and os.readlink(root / "etc" / "alias") == "zstd"
    assert (store / "blobs" / blob.replace(":", "/")).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # kept as sent


def test_unknown_malformed_and_unreachable_references_are_refused_with_the_reason(
    capfd: pytest.CaptureFixture[str], store: Path, registry: Registry, proxy: BlobProxy
) -> None:
    missing = f"{proxy.address}/no/such:1"
    status, out, err = pull(capfd, missing)
    assert status == 125 and out == "", err
    assert missing in err and "404" in err and "no such repository, tag or digest" in err, err
    assert blob_gets(proxy) == []

    served = len(proxy.requests)
    for malformed, why in [
        (f"{proxy.address}/Team/App:1", "not an image name"),
        (f"{proxy.address}/team/app:bad!tag", "not a tag"),
        (f"{proxy.address}/team/app@sha256:abc", "not a digest"),
        ("127.0.0.1:99999999/team/app:1", "not a registry's domain"),
    ]:
        status, out, err = pull(capfd, malformed)
        assert status == 125 and out == "" and why in err and "invalid value" in err, (malformed, err)
    assert len(proxy.requests) == served, "a malformed reference reached the registry"

    unreachable = f"127.0.0.1:{free_port()}/team/app:1"
    started = time.monotonic()
    status, out, err = pull(capfd, unreachable)
    elapsed = time.monotonic() - started
    assert status == 125 and out == "", err
    assert unreachable in err and "cannot be reached" in err and "Connection refused" in err, err
    assert 7 <= elapsed < 60, f"{elapsed:.1f} s: not the retries with backoff (7.5 s of pauses)"
    assert contents(store) in ([], ["blobs", "blobs/sha256"]), contents(store)


def test_a_pulled_image_saves_to_an_oci_archive_that_skopeo_reads_and_cgctl_imports_back(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, store: Path, registry: Registry
) -> None:
    small_layout(tmp_path / "layout", b"saved\n")
    pushed = registry.push(tmp_path / "layout", "saved/app:1")
    reference = f"{registry.address}/saved/app:1"
    status, _, err = pull(capfd, reference)
    assert status == 0, err
    record = record_of(store, f"{registry.address}/saved/app", "1")

    archive = tmp_path / "saved.tar"
    status, out, err = cgctl_in_process(capfd, "image", "save", reference, str(archive))
    assert status == 0 and out.startswith(f"{reference}: saved to {archive}"), err
    inspected = json.loads(skopeo("inspect", f"oci-archive:{archive}").stdout)
    assert (inspected["Digest"], inspected["Layers"]) == (pushed, record["blobs"][2:])

    status, out, err = cgctl_in_process(capfd, "image", "import", str(archive), "again:1")
    assert status == 0, err
    again = record_of(store, "again", "1")
    assert (again["id"], again["layers"], again["manifest"]) == (record["id"], record["layers"], pushed)
