"""The micro-VM's image and qemu command line, shared by `cgctl machine` and the test runner.

Why a VM: hosts with cgroup v1 controllers (or a hybrid layout) cannot give cgctl a cgroup v2
tree of its own; a stock Debian kernel booted under qemu can. The guest's root is the host's own
root, shared read-only over virtio-9p under a tmpfs overlay, so the same Python, checkout and
tools run on both sides without an OS image to build or keep up to date.

How: qemu in software emulation (this machine's /dev/kvm cannot boot a stock kernel) boots
Debian's kernel package, unpacked without running maintainer scripts, with a busybox initramfs
(guest/initramfs-init.sh) that builds the overlay root and switch_roots into guest/guest-run.sh,
which runs the job script the host wrote to the read-write share, or into the host's systemd.
Kernel, modules and initramfs are built once into a cache ($CGCTL_VM_CACHE, else
$XDG_CACHE_HOME/cgctl/vm, else ~/.cache/cgctl/vm) and rebuilt when the kernel package or the
guest scripts change.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import chdir
from pathlib import Path

GUEST = Path(__file__).resolve().parent / "guest"
# What job.sh exits with when the job cannot even start (its directory is gone).
EXIT_VM_FAILED = 125
# The initramfs's /init, then the files it copies into the guest's root.
GUEST_SCRIPTS = (
    GUEST / "initramfs-init.sh",
    GUEST / "guest-run.sh",
    GUEST / "guest-job-done.sh",
    GUEST / "microvm-job.service",
    GUEST / "microvm-job.target",
)
# The modules the initramfs loads to reach the host's root; modprobe adds their dependencies.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_rng", "9pnet_virtio", "9p", "overlay")
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 cgroup_no_v1=all psi=1 random.trust_cpu=on"
# Added for --systemd: boot into the job's target, with the hostname the default mode sets.
SYSTEMD_CMDLINE = "CGCTL_VM_INIT=systemd systemd.unit=microvm-job.target systemd.hostname=microvm"
# Host packages the VM needs, by the command that each one provides.
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "modprobe": "kmod",
    "apt-get": "apt",
    "dpkg": "dpkg",
}
# Variables that describe the host's shell session rather than the job.
ENV_DROPPED = {"_", "PWD", "OLDPWD", "SHLVL", "TERM_PROGRAM", "TMUX", "TMUX_PANE"}


class VMError(Exception):
    """The micro-VM could not be built or booted; the message says why and what to do."""


def log(message: str) -> None:
    print(f"cgctl vm: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if explicit := os.environ.get("CGCTL_VM_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "cgctl" / "vm"


def find_tool(name: str) -> str:
    for directory in (*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise VMError(
        f"{name} not found: install the Debian package {HOST_TOOLS[name]} "
        f"(apt-get install {HOST_TOOLS[name]})"
    )


def capture(*argv: str) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as error:
        raise VMError(f"{shlex.join(argv)} failed: {error.stderr.strip()}") from None


def kernel_package() -> tuple[str, str]:
    """The (name, version) of the kernel image package that linux-image-amd64 points at."""
    apt_get = find_tool("apt-get")
    apt_cache = apt_get.replace("apt-get", "apt-cache")
    for attempt in ("first", "after update"):
        depends = subprocess.run([apt_cache, "depends", "linux-image-amd64"], capture_output=True, text=True)
        for line in depends.stdout.splitlines():
            if line.strip().startswith("Depends: linux-image-"):
                name = line.split()[1]
                for policy_line in capture(apt_cache, "policy", name).splitlines():
                    if policy_line.strip().startswith("Candidate:"):
                        return name, policy_line.split()[1]
        if attempt == "first" and os.geteuid() == 0:
            log("apt does not know linux-image-amd64 yet: running apt-get update")
            subprocess.run([apt_get, "update", "-qq"], check=False)
    raise VMError("apt knows no linux-image-amd64: run apt-get update (as root) first")


def image_key(package: str, version: str) -> str:
    digest = hashlib.sha256(f"{package} {version} {INITRAMFS_MODULES} {KERNEL_CMDLINE}".encode())
    for script in GUEST_SCRIPTS:
        digest.update(script.read_bytes())
    return f"{package}_{version}_{digest.hexdigest()[:12]}"


def build_image(target: Path, package: str) -> None:
    """Fetch and unpack the kernel package (no maintainer scripts run) and build the initramfs."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        log(f"downloading {package} (once; cached in {target.parent})")
        with chdir(work):
            capture(find_tool("apt-get"), "download", "-q", package)
        deb = next(work.glob("*.deb"))
        root = work / "root"
        capture(find_tool("dpkg"), "-x", str(deb), str(root))
        deb.unlink()
        release = next((root / "lib/modules").iterdir()).name
        capture(find_tool("depmod"), "-b", str(root), release)
        (root / "boot" / f"vmlinuz-{release}").rename(work / "vmlinuz")
        write_initramfs(work / "initrd.gz", root, release)
        (work / "release").write_text(release + "\n")
        try:
            work.rename(target)
        except OSError:
            if not (target / "release").exists():
                raise
            shutil.rmtree(work)  # another runner built the same image meanwhile
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def write_initramfs(path: Path, root: Path, release: str) -> None:
    staging = path.parent / "initramfs"
    (staging / "bin").mkdir(parents=True)
    (staging / "modules").mkdir()
    for directory in ("proc", "sys", "dev", "mnt"):
        (staging / directory).mkdir()
    shutil.copy2(find_tool("busybox"), staging / "bin" / "busybox")
    shutil.copy2(GUEST_SCRIPTS[0], staging / "init")
    for script in GUEST_SCRIPTS[1:]:
        shutil.copy2(script, staging / script.name)
    (staging / "init").chmod(0o755)
    order: list[str] = []
    for module in INITRAMFS_MODULES:
        deps = capture(find_tool("modprobe"), "-d", str(root), "-S", release, "--show-depends", module)
        for line in deps.splitlines():
            kind, _, ko = line.strip().partition(" ")
            name = Path(ko).name
            if kind == "insmod" and name not in order:
                shutil.copy2(ko, staging / "modules" / name)
                order.append(name)
    (staging / "modules" / "order").write_text("\n".join(order) + "\n")
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    with path.open("wb") as archive:
        cpio = subprocess.Popen(
            [find_tool("busybox"), "cpio", "-o", "-H", "newc"],
            cwd=staging,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        gzip = subprocess.Popen(["gzip", "-9"], stdin=cpio.stdout, stdout=archive)
        assert cpio.stdin and cpio.stdout
        cpio.stdout.close()
        cpio.stdin.write(("\n".join([".", *files]) + "\n").encode())
        cpio.stdin.close()
        if cpio.wait() or gzip.wait():
            raise VMError(f"packing the initramfs into {path} failed")
    shutil.rmtree(staging)


def ensure_image() -> Path:
    """The cached kernel + modules + initramfs directory, built if missing.

    If the current image cannot be built (no network, no apt lists) an older cached one is used.
    """
    for tool in HOST_TOOLS:
        find_tool(tool)
    cache = cache_root()
    try:
        package, version = kernel_package()
        target = cache / image_key(package, version)
        if not (target / "release").exists():
            cache.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            build_image(target, package)
            log(f"built the VM image in {time.monotonic() - started:.1f}s: {target}")
            for stale in cache.glob("linux-image-*"):
                if stale != target:
                    shutil.rmtree(stale, ignore_errors=True)
        return target
    except VMError as error:
        cached = sorted(cache.glob("linux-image-*/release"), key=lambda p: p.stat().st_mtime)
        if not cached:
            raise
        log(f"{error}; using the cached image {cached[-1].parent}")
        return cached[-1].parent


def write_job(out: Path, argv: list[str], env: dict[str, str], cwd: str | None = None) -> None:
    env = {k: v for k, v in env.items() if k not in ENV_DROPPED and "=" not in k}
    # Put this interpreter's directory first so `python3` is the real one, not a pyenv shim.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env.update(CGCTL_VM="1", CGCTL_VM_OUT=str(out))
    if not sys.stdout.isatty():
        # The guest writes to a serial tty; tell it that the reader is not a terminal.
        env.update(TERM="dumb", NO_COLOR="1", PY_COLORS="0")
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    (out / "job.sh").write_text(
        f"cd {shlex.quote(cwd or os.getcwd())} || exit {EXIT_VM_FAILED}\n"
        f"exec /usr/bin/env -i {assignments} {shlex.join(argv)}\n"
    )


def qemu_argv(image: Path, out: Path, memory: str, cpus: int, params: str = "") -> list[str]:
    """qemu booting the image with the host's root (read-only) and `out` (read-write) shared;
    callers add their disks and devices. `params` adds to the kernel command line."""
    modules = image / "root" / "lib" / "modules"
    for path in (out, modules):
        if any(c.isspace() or c == "," for c in str(path)):
            raise VMError(
                f"{path}: the VM cannot share a path with spaces or commas; "
                "set CGCTL_VM_CACHE and TMPDIR to plain paths"
            )
    params = f"CGCTL_VM_OUT={out} CGCTL_VM_MODULES={modules} {params}".strip()
    return [
        find_tool("qemu-system-x86_64"),
        "-machine",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        str(cpus),
        "-m",
        memory,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
        "-bios",
        "qboot.rom",
        "-kernel",
        str(image / "vmlinuz"),
        "-initrd",
        str(image / "initrd.gz"),
        "-append",
        f"{KERNEL_CMDLINE} {params}",
        *share(path=Path("/"), tag="hostroot", readonly=True),
        *share(path=out, tag="out"),
        "-device",
        "virtio-rng-pci",
    ]


def share(path: Path, tag: str, readonly: bool = False) -> list[str]:
    """qemu arguments sharing a host directory over virtio-9p as mount tag `tag`."""
    if any(c.isspace() or c == "," for c in str(path)):
        raise VMError(f"{path}: the VM cannot share a path with spaces or commas")
    options = f"local,id={tag},path={path},security_model=none,multidevs=remap"
    return [
        "-fsdev",
        options + (",readonly=on" if readonly else ""),
        "-device",
        f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
    ]


def disk(path: Path, name: str) -> list[str]:
    """qemu arguments attaching a raw image as a virtio disk (/dev/vda for the first)."""
    return ["-drive", f"file={path},if=none,id={name},format=raw", "-device", f"virtio-blk-pci,drive={name}"]
