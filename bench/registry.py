"""How long does `cgctl pull` of a ~60 MiB two-layer image take, against skopeo copy plus tar -x?

    .venv/bin/python bench/registry.py [--runs N]

Why: a pull fetches each layer blob, checks its digest, unpacks it and puts it on disk; cgctl does all
of it in one stream per layer (httpx -> sha256 -> gzip -> sha256 of the tar -> safe unpack, layers in
parallel) and syncs each unpacked layer to disk before it names it. Its peer does the same work with
the usual tools: `skopeo copy docker://REGISTRY/IMAGE oci:DIR` (fetch, check the blob digests, keep
the blobs) then `tar -xzf` of each layer blob, in order, into one directory, then `sync -f` on it,
so that both pay the disk flush. (The peer checks no diff_id and no member of the tars; cgctl checks
both. A pull into a store that has the image fetches only the manifest and config: the second pull.)

How: it runs on this host, as root (whiteouts need it): a pull needs no cgroups. The image is built
once, deterministically (the same digests every time), in a temporary directory under $TMPDIR or
/tmp, which must be a real filesystem (ext4 here; a tmpfs would hide the disk flushes): layer 1 a
busybox root plus a base system of shared libraries (binary, half compressible), Python modules and
docs (text), locale files (random) and logs (repetitive); layer 2 an application, thousands of small
JavaScript files, images (random), a binary, CSV data, a whiteout of a layer-1 file, symlinks and a
hard link. Its uncompressed layers are pushed by skopeo, which gzips them as it would any push, to
Debian's docker-registry 2.8 serving plain HTTP on loopback (tests/registry.py); its files are
warm in the page cache after the push, and nothing drops the cache: both sides read the same warm
registry, and both write to the same disk. Each run, in an order that rotates run by run, times

  - cgctl pull (library): cgctl.images.pull.pull() into a fresh empty store, until its record is saved;
  - cgctl pull (CLI): `python -m cgctl pull REF --store DIR` into a fresh store, Python's start-up in;
  - skopeo copy + tar -x: the peer above, into fresh directories;

and then a second library pull (and a second CLI pull) into the store the first one filled: nothing
to fetch but the manifest and config. Each timed step starts after the filesystem is synced, so that
none pays for the one before it. skopeo as root keeps a blob-info cache in
/var/lib/containers/cache/blob-info-cache-v1.boltdb, which remembers where blobs were seen; an oci:
destination only reuses a blob it already holds, so the cache should save skopeo no work here, and
the benchmark checks it first (it prints a copy's time with a cache that has seen the image and with
an empty one). Still, every skopeo here, the push's too, gets a cache directory of its own, empty
for each timed run (a directory bind-mounted over that one in a private mount namespace, `unshare
--mount`), so that the host's cache is neither read nor grown. One untimed warm-up run comes first.

The table gives the median and minimum seconds of each (the peer's two parts too), its median CPU
seconds (every thread of the library pull; the tools' own for the CLI and the peer), and the ratios
of medians: cgctl pull over skopeo copy + tar -x (the goal is at most 1), the CLI over the same, and
the second pull over the first. --profile then profiles one library pull (one layer at a time:
cProfile sees only the calling thread) and prints its 15 functions of highest cumulative time. Other
work on the machine weighs on every step alike, the runs being interleaved; the minimums show what a
quiet machine gives. The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ builds the image and runs the registry

from cgctl.images import Store  # noqa: E402
from cgctl.images.pull import pull  # noqa: E402
from cgctl.images.registry import Options  # noqa: E402
from tests import oci  # noqa: E402
from tests.registry import Registry, running_registry  # noqa: E402

REPOSITORY = "bench/app:1"
PEER = "skopeo copy + tar -x"
SEED = 60  # the image is the same, byte for byte, every time
SKOPEO_CACHE = Path("/var/lib/containers/cache")  # root's blob-info cache directory
# $1: an empty directory to stand for skopeo's cache directory; the rest: skopeo's arguments.
PRIVATE_CACHE = 'mount --bind "$1" "$2" && shift 2 && exec skopeo "$@"'
WARMUP_RUNS = 1
TOP_FUNCTIONS = 15

Member = oci.Member
Sample = tuple[float, float]  # (wall seconds, CPU seconds)


def check(argv: list[str], cwd: Path | None = None) -> str:
    """Run argv to completion; its stdout, or RuntimeError with its stderr if it fails."""
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} exited with status {done.returncode}: {done.stderr.strip() or '(no stderr)'}"
        )
    return done.stdout


# -- the image


class Content:
    """Deterministic file contents of the kinds a real image holds, each compressing as its kind does."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz_"
        words = ["".join(self.rng.choices(letters, k=self.rng.randint(2, 10))) for _ in range(3000)]
        words += ["def", "return", "self", "if", "else", "for", "in", "import", "None", "=", "(", ")", ":"]
        lines = []
        for _ in range(120_000):  # ~6 MiB of source-like text to slice files from
            indent = "    " * self.rng.randint(0, 3)
            lines.append(indent + " ".join(self.rng.choices(words, k=self.rng.randint(2, 12))))
        self.source = "\n".join(lines).encode()
        logs = []
        for number in range(60_000):  # ~6 MiB of log lines that differ in a few characters
            level = self.rng.choice(("INFO", "INFO", "INFO", "DEBUG", "WARN"))
            stamp = f"2026-11-28T10:{number // 60 % 60:02d}:{number % 60:02d}Z"
            millis = self.rng.randint(1, 999)
            logs.append(f"{stamp} {level} worker-{number % 8} request handled in {millis} ms status=200")
        self.logs = "\n".join(logs).encode()

    def text(self, size: int) -> bytes:
        """Source code or docs: gzip takes it to about a third."""
        start = self.rng.randrange(len(self.source) - size) if size < len(self.source) else 0
        return self.source[start : start + size]

    def log(self, size: int) -> bytes:
        """Logs or data: gzip takes it to a tenth or less."""
        start = self.rng.randrange(len(self.logs) - size) if size < len(self.logs) else 0
        return self.logs[start : start + size]

    def random(self, size: int) -> bytes:
        """Already compressed data (images, archives, .mo files): gzip cannot shrink it."""
        return self.rng.randbytes(size)

    def binary(self, size: int) -> bytes:
        """Machine code: random 4 KiB blocks between zero-padded tables, about 60 % of its size gzip'd."""
        blocks = []
        for _ in range(size // 4096):
            if self.rng.random() < 0.55:
                blocks.append(self.rng.randbytes(4096))
            else:
                table = self.rng.randbytes(512)
                blocks.append(table + bytes(512) + table[::-1] + bytes(2560))
        return b"".join(blocks) + bytes(size % 4096)


def base_layer(content: Content) -> list[Member]:
    """busybox and a base system: ~60 MiB, ~29 MiB gzip'd."""
    rng = content.rng
    members = oci.busybox_layer()
    members += [oci.directory(name) for name in ("usr", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/share",
                                                 "usr/share/doc", "usr/share/locale", "usr/lib/python3",
                                                 "var", "var/log")]  # fmt: skip
    for number in range(16):
        data = content.binary(rng.randint(512, 1536) << 10)
        members.append(oci.file(f"usr/lib/x86_64-linux-gnu/lib{number}.so.1.0", data, 0o755))
        members.append(oci.link(f"usr/lib/x86_64-linux-gnu/lib{number}.so.1", f"lib{number}.so.1.0"))
    for package in range(300):
        members.append(oci.directory(f"usr/share/doc/pkg{package}"))
        members.append(
            oci.file(f"usr/share/doc/pkg{package}/copyright", content.text(rng.randint(1, 12) << 10))
        )
        members.append(
            oci.file(f"usr/share/doc/pkg{package}/changelog", content.log(rng.randint(2, 24) << 10))
        )
    for module in range(60):
        members.append(oci.directory(f"usr/lib/python3/mod{module}"))
        for number in range(20):
            data = content.text(rng.randint(1, 24) << 10)
            members.append(oci.file(f"usr/lib/python3/mod{module}/part{number}.py", data))
    for language in range(40):
        members.append(oci.directory(f"usr/share/locale/l{language}"))
        members.append(
            oci.file(f"usr/share/locale/l{language}/messages.mo", content.random(rng.randint(64, 320) << 10))
        )
    members += [oci.file(f"var/log/app{number}.log", content.log(3 << 20)) for number in range(3)]
    return members


def app_layer(content: Content) -> list[Member]:
    """An application: ~45 MiB, ~30 MiB gzip'd, with a whiteout, symlinks and a hard link."""
    rng = content.rng
    directories = ["app", "app/node_modules", "app/static", "app/bin", "app/data"]
    directories += ["usr", "usr/share", "usr/share/doc", "var", "var/log"]
    members = [oci.directory(name) for name in directories]
    for package in range(250):
        root = f"app/node_modules/p{package}"
        members += [oci.directory(root), oci.directory(f"{root}/lib")]
        members.append(oci.file(f"{root}/package.json", content.text(rng.randint(1, 3) << 10)))
        members.append(oci.file(f"{root}/README.md", content.text(rng.randint(1, 8) << 10)))
        for number in range(rng.randint(4, 12)):
            members.append(oci.file(f"{root}/lib/m{number}.js", content.text(rng.randint(1, 16) << 10)))
    for number in range(60):
        members.append(oci.file(f"app/static/img{number}.jpg", content.random(rng.randint(128, 512) << 10)))
    members.append(oci.file("app/bin/server", content.binary(8 << 20), 0o755))
    members.append(oci.link("app/bin/server-current", "server"))
    members.append(oci.link("app/bin/server-hard", "app/bin/server", hard=True))
    members += [oci.file(f"app/data/table{number}.csv", content.log(2 << 20)) for number in range(2)]
    members.append(oci.file("usr/share/doc/.wh.pkg7", b""))  # deletes pkg7's docs from layer 1
    members.append(oci.file("var/log/.wh.app0.log", b""))
    return members


def build_image(layout: Path) -> int:
    """The two-layer image, uncompressed, as an OCI layout (skopeo gzips it on push); its tars' bytes."""
    content = Content(SEED)
    layers = [base_layer(content), app_layer(content)]
    oci.write_oci_layout(layout, layers, compress=False, Cmd=["/app/bin/server"], Env=["PATH=/bin"])
    return sum(len(oci.tar_bytes(members)) for members in layers)


def push(registry: Registry, layout: Path, cache: Path) -> list[int]:
    """Push the layout as skopeo would any image (gzip'd); returns the layer blobs' sizes in the registry."""
    reference = registry.reference(REPOSITORY)
    skopeo(cache, "copy", "--dest-tls-verify=false", f"oci:{layout}", reference)
    manifest = json.loads(skopeo(cache, "inspect", "--raw", "--tls-verify=false", reference, reuse=True))
    if not all(layer["mediaType"].endswith("+gzip") for layer in manifest["layers"]):
        raise RuntimeError(f"skopeo pushed layers that are not gzip'd: {manifest['layers']}")
    return [int(layer["size"]) for layer in manifest["layers"]]


# -- what is timed


def sync_all() -> None:
    """Write back every dirty page, so that the next timed step pays for none of the last one's."""
    os.sync()


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of its children that have exited) now."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def since(start: tuple[float, float]) -> Sample:
    """(wall seconds, CPU seconds) since start: CPU in every thread of this process and in the tools it ran
    (the registry's is not counted: it is a child that exits only at the end)."""
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def timed(step: Callable[[], object]) -> Sample:
    sync_all()
    started = clock()
    step()
    return since(started)


def cgctl_cli(reference: str, store: Path) -> None:
    output = check([sys.executable, "-m", "cgctl", "pull", reference, "--store", str(store)], cwd=ROOT)
    if "pulled 2 layer(s)" not in output:
        raise RuntimeError(f"cgctl pull printed {output!r}")


def skopeo(cache: Path, *arguments: str, reuse: bool = False) -> str:
    """skopeo with `cache`, an empty directory (or, if `reuse`, one it used before), standing for its
    blob-info cache directory in a private mount namespace: the host's cache is neither read nor written."""
    cache.mkdir(exist_ok=reuse)
    SKOPEO_CACHE.mkdir(parents=True, exist_ok=True)  # where skopeo would make it anyway
    return check(["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_CACHE, "sh",
                  str(cache), str(SKOPEO_CACHE), *arguments])  # fmt: skip


def skopeo_copy(registry: Registry, destination: Path, cache: Path, reuse: bool = False) -> None:
    """skopeo copy from the registry to an OCI layout, with its own blob-info cache (see skopeo())."""
    reference = registry.reference(REPOSITORY)
    skopeo(cache, "copy", "--src-tls-verify=false", reference, f"oci:{destination}", reuse=reuse)


def untar_layers(layout: Path, rootfs: Path) -> None:
    """tar -xzf each layer blob of the layout's image, bottom first, into rootfs, then sync -f."""
    blobs = layout / "blobs" / "sha256"
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((blobs / manifest_digest.split(":")[1]).read_text())
    rootfs.mkdir()
    for layer in manifest["layers"]:
        check(["tar", "-xzf", str(blobs / layer["digest"].split(":")[1]), "-C", str(rootfs)])
    check(["sync", "-f", str(rootfs)])


def run_once(registry: Registry, scratch: Path, number: int, results: dict[str, list[Sample]] | None) -> None:
    """One run of every step (into fresh directories under scratch/run-N, removed afterwards); its
    seconds are appended to results unless it is a warm-up (None)."""
    here = scratch / f"run-{number}"
    here.mkdir()
    reference = f"{registry.address}/{REPOSITORY}"
    store = Store(here / "store")
    peer_parts: dict[str, Sample] = {}

    def library() -> None:
        record = pull(reference, store, Options())
        if len(record["layers"]) != 2:
            raise RuntimeError(f"cgctl pulled {record['layers']}")

    def peer() -> None:
        started = clock()
        skopeo_copy(registry, here / "oci", here / "skopeo-cache")
        peer_parts["peer: skopeo copy"] = since(started)
        copied = clock()
        untar_layers(here / "oci", here / "rootfs")
        peer_parts["peer: tar -x + sync"] = since(copied)

    firsts: list[tuple[str, Callable[[], object]]] = [
        ("cgctl pull (library)", library),
        ("cgctl pull (CLI)", lambda: cgctl_cli(reference, here / "cli-store")),
        (PEER, peer),
    ]
    shift = number % len(firsts)
    seconds = {name: timed(step) for name, step in firsts[shift:] + firsts[:shift]}
    seconds = {name: seconds[name] for name, _ in firsts} | peer_parts  # the table's order
    seconds["second pull (library)"] = timed(library)
    seconds["second pull (CLI)"] = timed(lambda: cgctl_cli(reference, here / "cli-store"))
    shutil.rmtree(here)
    if results is not None:
        for name, value in seconds.items():
            results.setdefault(name, []).append(value)


def check_skopeo_cache(registry: Registry, scratch: Path, rounds: int = 3) -> dict[str, float]:
    """Median seconds of skopeo copy with a blob-info cache that has seen this image and with an empty
    one, alternating: whether the cache spares it work here. Neither is the host's."""
    here = scratch / "skopeo-cache-check"
    seen = here / "seen-cache"
    here.mkdir()
    skopeo_copy(registry, here / "first", seen)  # the cache sees the image once
    if not (seen / "blob-info-cache-v1.boltdb").exists():
        raise RuntimeError(f"skopeo wrote no blob-info cache in {seen}: the bind mount did not take")
    cached, empty = [], []
    for number in range(rounds):
        cached.append(timed(functools.partial(skopeo_copy, registry, here / f"seen-{number}", seen, True))[0])
        fresh, cache = here / f"fresh-{number}", here / f"empty-cache-{number}"
        empty.append(timed(functools.partial(skopeo_copy, registry, fresh, cache))[0])
    shutil.rmtree(here)
    return {"seen_cache_s": statistics.median(cached), "empty_cache_s": statistics.median(empty)}


def profile(registry: Registry, scratch: Path) -> str:
    """cProfile of one library pull into a fresh store, one layer at a time; the top functions."""
    store = Store(scratch / "profiled-store")
    profiler = cProfile.Profile()
    sync_all()
    profiler.enable()
    pull(f"{registry.address}/{REPOSITORY}", store, Options(), parallel=1)
    profiler.disable()
    shutil.rmtree(store.root)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(TOP_FUNCTIONS)
    return out.getvalue().rstrip()


# -- the report


def report(results: dict[str, list[Sample]], runs: int, sizes: list[int], tar_bytes: int) -> dict[str, Any]:
    walls = {name: [wall for wall, _ in samples] for name, samples in results.items()}
    median = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(cpu for _, cpu in samples) for name, samples in results.items()}
    peer = median[PEER]
    mib = sum(sizes) / (1 << 20)
    layers = " + ".join(f"{size / (1 << 20):.1f}" for size in sizes)
    tar_mib = tar_bytes / (1 << 20)
    what = f"{mib:.1f} MiB gzip'd ({layers} MiB; {tar_mib:.0f} MiB of tar)"
    print(f"pull of {what} from a loopback registry, {runs} runs, interleaved:")
    print(f"  {'':<24} {'median s':>9} {'min s':>7} {'MiB/s':>7} {'CPU s':>7}")
    for name, values in walls.items():
        rate = f"{mib / median[name]:7.0f}" if name.startswith("cgctl pull") or name == PEER else f"{'':>7}"
        label = name.replace("peer: ", "  of which ")
        print(f"  {label:<24} {median[name]:9.3f} {min(values):7.3f} {rate} {cpu[name]:7.3f}")
    ratios = {
        "cgctl pull / (skopeo copy + tar -x)": median["cgctl pull (library)"] / peer,
        "cgctl CLI / (skopeo copy + tar -x)": median["cgctl pull (CLI)"] / peer,
        "second pull / first pull (library)": median["second pull (library)"]
        / median["cgctl pull (library)"],
        "second pull / first pull (CLI)": median["second pull (CLI)"] / median["cgctl pull (CLI)"],
    }
    for name, ratio in ratios.items():
        print(f"  {name:<38} x {ratio:.3f}")
    return {
        "mib_gzip": mib,
        "mib_tar": tar_bytes / (1 << 20),
        "runs": runs,
        "median_s": median,
        "min_s": {name: min(values) for name, values in walls.items()},
        "cpu_median_s": cpu,
        "ratios": ratios,
        "samples_s": walls,
        "cpu_samples_s": {name: [cpu for _, cpu in samples] for name, samples in results.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs (default 5)")
    parser.add_argument("--profile", action="store_true", help="then profile one library pull")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit(f"{sys.argv[0]} needs root: the image's whiteouts become device nodes in cgctl's store")
    for tool in ("skopeo", "tar", "sync", "unshare", "docker-registry"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (scripts/setup installs what the tests and benchmarks need)")
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as name:
        scratch = Path(name)
        filesystem = check(["df", "--output=fstype", str(scratch)]).split()[-1]
        print(f"scratch directory {scratch} on {filesystem}")
        tar_bytes = build_image(scratch / "layout")
        with running_registry(scratch / "registry") as registry:
            sizes = push(registry, scratch / "layout", scratch / "push-cache")
            shutil.rmtree(scratch / "layout")
            cache = check_skopeo_cache(registry, scratch)
            print(f"skopeo copy with a blob-info cache that saw the image {cache['seen_cache_s']:.3f} s, "
                  f"with an empty one {cache['empty_cache_s']:.3f} s (medians of 3)")  # fmt: skip
            results: dict[str, list[Sample]] = {}
            for number in range(WARMUP_RUNS + args.runs):
                run_once(registry, scratch, number, results if number >= WARMUP_RUNS else None)
            summary = report(results, args.runs, sizes, tar_bytes)
            summary["skopeo_cache"] = cache
            summary["filesystem"] = filesystem
            if args.profile:
                print(profile(registry, scratch))
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
