"""Image import speed, and the start time of a container from an imported image against crun's.

Why: importing verifies two digests per layer and unpacks every member with
checks of its own, so its speed is judged against GNU tar unpacking the same
gzip'd layers with no checks (the floor); starting `true` from the image
(overlayfs over the store's layers, a tmpfs upper, /dev, pivot_root) is
judged against `crun run` on a bundle whose root is the same busybox layer,
interleaved run by run, both under memory.max 256M.

How: it needs root, a pure cgroup v2 hierarchy and crun; on this project's development machines
(cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/image.py [--runs N]

The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cgroup2_host import require_cgroup2_root
from spawn import MEMORY_LIMIT, OCI_CGROUPS_PATH, check

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/oci.py builds the image

from cgctl import runtime
from cgctl.images import Store, import_image
from cgctl.spec import WorkloadSpec
from tests import oci

HOW_TO_RUN = ".venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/image.py"
DATA_FILES, DATA_FILE_BYTES = 16, 4 << 20  # a 64 MiB layer of random (incompressible) files


def build_image(directory: Path) -> int:
    """A busybox layer and a 64 MiB data layer, gzip'd, as an OCI layout; returns the tars' bytes."""
    data = [oci.file(f"data/{n}", os.urandom(DATA_FILE_BYTES)) for n in range(DATA_FILES)]
    layers = [oci.busybox_layer(), [oci.directory("data"), *data]]
    oci.write_oci_layout(directory, layers, Cmd=["/bin/true"], Env=["PATH=/bin"])
    return sum(len(oci.tar_bytes(members)) for members in layers)


def time_import(layout: Path, scratch: Path, rounds: int) -> tuple[list[float], list[float]]:
    """(cgctl import, tar -xzf of the same layer blobs) seconds, alternating, into fresh directories."""
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    blobs = layout / "blobs" / "sha256"
    layer_blobs = [
        blobs / layer["digest"].split(":")[1]
        for layer in json.loads((blobs / manifest.split(":")[1]).read_text())["layers"]
    ]
    ours, floor = [], []
    for number in range(rounds):
        started = time.perf_counter()
        import_image(layout, "bench:1", Store(scratch / f"store-{number}"))
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        for index, blob in enumerate(layer_blobs):
            target = scratch / f"tar-{number}" / str(index)
            target.mkdir(parents=True)
            check(["tar", "-xzf", str(blob), "-C", str(target)])
        floor.append(time.perf_counter() - started)
        shutil.rmtree(scratch / f"tar-{number}")
        if number:
            shutil.rmtree(scratch / f"store-{number}")
    return ours, floor


def crun_bundle(bundle: Path, rootfs: Path) -> None:
    bundle.mkdir()
    check(["crun", "spec"], cwd=bundle)
    config = json.loads((bundle / "config.json").read_text())
    config["process"].update(args=["/bin/true"], terminal=False)
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["linux"]["resources"]["memory"] = {"limit": MEMORY_LIMIT}
    config["linux"]["cgroupsPath"] = OCI_CGROUPS_PATH
    (bundle / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="container starts per peer (default 20)")
    parser.add_argument("--imports", type=int, default=3, help="imports (default 3)")
    args = parser.parse_args()
    require_cgroup2_root(HOW_TO_RUN)
    if not shutil.which("crun"):
        sys.exit("crun is not installed: apt-get install crun")
    with tempfile.TemporaryDirectory(prefix="bench-image-") as name:
        scratch = Path(name)
        check(["mount", "-t", "tmpfs", "tmpfs", str(scratch)])  # a real upper/lower filesystem
        try:
            results = run(scratch, args.runs, args.imports)
        finally:
            check(["umount", "--lazy", str(scratch)])
    print("BENCH_JSON " + json.dumps(results))


def run(scratch: Path, runs: int, imports: int) -> dict[str, object]:
    size = build_image(scratch / "layout")
    ours, floor = time_import(scratch / "layout", scratch, imports)
    mib = size / (1 << 20)
    print(f"import of {mib:.0f} MiB in 2 gzip'd layers, median of {imports}:")
    print(f"  cgctl image import {statistics.median(ours):.2f} s = {mib / statistics.median(ours):.0f} MiB/s")
    print(
        f"  tar -xzf floor     {statistics.median(floor):.2f} s = {mib / statistics.median(floor):.0f} MiB/s"
    )
    print(f"  x floor            {statistics.median(ours) / statistics.median(floor):.2f}")

    store = Store(scratch / "store-0")
    record = store.load("bench:1")
    layers = [str(store.layer(diff_id)) for diff_id in record["layers"]]
    spec = WorkloadSpec.model_validate(
        {"command": ["/bin/true"], "env": {"PATH": "/bin"}, "limits": {"memory": {"max": "256M"}},
         "rootfs": {"layers": layers, "image": "bench:1"}}
    )  # fmt: skip
    crun_bundle(scratch / "bundle", Path(layers[0]))
    ids = itertools.count()

    def cgctl_run() -> None:
        if runtime.run(spec).exit_code != 0:
            raise RuntimeError("cgctl run --image bench:1 -- /bin/true did not exit 0")

    def crun_run() -> None:
        check(
            ["crun", "--cgroup-manager=cgroupfs", "run", "--bundle", str(scratch / "bundle"), f"b{next(ids)}"]
        )

    peers = {"crun run": crun_run, "cgctl run --image (library)": cgctl_run}
    timings: dict[str, list[float]] = {name: [] for name in peers}
    for round_ in range(2 + runs):  # two warm-ups
        for name, start in peers.items():
            started = time.perf_counter()
            start()
            if round_ >= 2:
                timings[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(samples) * 1e3 for name, samples in timings.items()}
    print(f"start /bin/true from the image and wait, median of {runs}, interleaved:")
    for name, median in medians.items():
        print(f"  {name:<28} {median:7.1f} ms  x crun {median / medians['crun run']:.2f}")
    return {
        "import": {"mib": mib, "cgctl_s": statistics.median(ours), "tar_s": statistics.median(floor)},
        "start_ms": medians,
    }


if __name__ == "__main__":
    main()
