#!/usr/bin/env python3
"""Run one command as root in a throwaway micro-VM with a pure cgroup v2 kernel.

Why: the hosts cgctl is developed and tested on mount cgroup v1 controllers
that belong to the host, so real cgroup v2 behaviour (limits, freezer, PSI,
namespaces, CRIU) can only be exercised under a kernel we boot ourselves.

How: qemu (software emulation; this machine's /dev/kvm cannot boot a stock
kernel) boots Debian's stock kernel with a busybox initramfs. The host's root
is shared read-only over virtio-9p under a tmpfs overlay, so the checkout and
the host's Python environment are visible at the same paths and writes are
thrown away with the VM. A second, read-write 9p share at the same path in
both worlds carries the job script in and the exit status, kernel log and any
artifacts out. A small raw disk is attached as /dev/vda for io.max tests.

We boot qemu directly rather than through virtme-ng: the whole VM is two
short shell scripts we control, it boots in about 6 s against virtme-ng's 14,
and it needs no udev or systemd inside.

With --systemd the host's own systemd boots as PID 1 instead, into
microvm-job.target (10-25 s more), and microvm-job.service runs the command:
for what needs a real service manager (unit files, socket activation,
delegation). The job's cgroup is then /system.slice/microvm-job.service.

Kernel, modules and initramfs are built once into a cache outside the
checkout ($CGCTL_VM_CACHE, else $XDG_CACHE_HOME/cgctl/vm, else ~/.cache/...)
and rebuilt whenever the kernel package or the guest scripts change.

Usage: microvm.py [--systemd] [--memory 2G] [--cpus 2] [--timeout S] [--artifacts DIR] -- CMD [ARGS...]
Exit status: the command's own; 124 on timeout; 125 if the VM could not run it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import chdir
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The initramfs's /init, then the files it copies into the guest's root.
GUEST_SCRIPTS = (
    HERE / "initramfs-init.sh",
    HERE / "guest-run.sh",
    HERE / "guest-job-done.sh",
    HERE / "microvm-job.service",
    HERE / "microvm-job.target",
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
# The kernel's last words when guest-run.sh powers off: noise, not output of the command.
REBOOT_MESSAGE = re.compile(rb"^\[\s*\d+\.\d+\] reboot: Restarting system\n?$")
EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125
# Variables that describe the host's shell session rather than the job.
ENV_DROPPED = {"_", "PWD", "OLDPWD", "SHLVL", "TERM_PROGRAM", "TMUX", "TMUX_PANE"}


class VMError(Exception):
    """The micro-VM could not be built or booted; the message says why and what to do."""


def log(message: str) -> None:
    print(f"microvm: {message}", file=sys.stderr, flush=True)


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


def write_job(out: Path, argv: list[str], env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if k not in ENV_DROPPED and "=" not in k}
    # Put this interpreter's directory first so `python3` is the real one, not a pyenv shim.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env.update(CGCTL_VM="1", CGCTL_VM_OUT=str(out), CGCTL_VM_DISK="/dev/vda")
    if not sys.stdout.isatty():
        # The guest writes to a serial tty; tell it that the reader is not a terminal.
        env.update(TERM="dumb", NO_COLOR="1", PY_COLORS="0")
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    (out / "job.sh").write_text(
        f"cd {shlex.quote(os.getcwd())} || exit {EXIT_VM_FAILED}\n"
        f"exec /usr/bin/env -i {assignments} {shlex.join(argv)}\n"
    )


def qemu_argv(image: Path, out: Path, disk: Path, memory: str, cpus: int, systemd: bool) -> list[str]:
    modules = image / "root" / "lib" / "modules"
    for path in (out, modules):
        if any(c.isspace() or c == "," for c in str(path)):
            raise VMError(
                f"{path}: the VM cannot share a path with spaces or commas; "
                "set CGCTL_VM_CACHE and TMPDIR to plain paths"
            )
    params = f"CGCTL_VM_OUT={out} CGCTL_VM_MODULES={modules}"
    if systemd:
        params += f" {SYSTEMD_CMDLINE}"
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
        "-serial",
        "stdio",
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
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
        f"local,id=out,path={out},security_model=none,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=out,mount_tag=out",
        "-drive",
        f"file={disk},if=none,id=disk,format=raw",
        "-device",
        "virtio-blk-pci,drive=disk",
        "-device",
        "virtio-rng-pci",
    ]


def boot(
    argv: list[str],
    memory: str,
    cpus: int,
    timeout: float | None,
    artifacts: Path | None,
    disk_size: int,
    systemd: bool,
) -> int:
    image = ensure_image()
    out = Path(tempfile.mkdtemp(prefix="cgctl-vm-"))
    try:
        disk = Path(tempfile.mkdtemp(prefix="cgctl-vm-disk-")) / "disk.img"
        with disk.open("wb") as handle:
            handle.truncate(disk_size)
        write_job(out, argv, dict(os.environ))
        started = time.monotonic()
        qemu = subprocess.Popen(
            qemu_argv(image, out, disk, memory, cpus, systemd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = stream(qemu, timeout)
        shutil.rmtree(disk.parent, ignore_errors=True)
        elapsed = time.monotonic() - started
        if artifacts:
            shutil.copytree(out, artifacts, dirs_exist_ok=True)
        status_file = out / "status"
        if timed_out:
            log(f"timed out after {timeout:.0f}s; the VM was stopped")
            return EXIT_TIMEOUT
        if not status_file.exists():
            log(
                f"the VM stopped before the command finished (qemu exit {qemu.returncode}); "
                "see the console output above"
            )
            return EXIT_VM_FAILED
        status = int(status_file.read_text())
        log(f"exit status {status} after {elapsed:.1f}s in the VM")
        return status
    finally:
        shutil.rmtree(out, ignore_errors=True)


def stream(qemu: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Copy the serial console to our stdout as it arrives; True if the timeout hit first."""
    assert qemu.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    timer_fired = False

    def on_alarm(*_: object) -> None:
        nonlocal timer_fired
        timer_fired = True
        os.killpg(qemu.pid, signal.SIGKILL)

    if deadline is not None:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        for raw in iter(qemu.stdout.readline, b""):
            # The guest writes to a tty: keep what a terminal would show of lines redrawn with \r.
            line = raw.replace(b"\r\n", b"\n").rsplit(b"\r", 1)[-1]
            if not REBOOT_MESSAGE.match(line):
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
    except BaseException:
        os.killpg(qemu.pid, signal.SIGKILL)
        raise
    finally:
        if deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        qemu.wait()
    return timer_fired


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--memory",
        default=os.environ.get("CGCTL_VM_MEMORY", "2G"),
        help="guest memory, qemu syntax (default 2G)",
    )
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument("--timeout", type=float, help="seconds before the VM is stopped")
    parser.add_argument(
        "--disk-size",
        type=parse_size,
        default="256M",
        help="size of the scratch disk /dev/vda (default 256M)",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        help="copy the results share (status, dmesg.log, files the job wrote to $CGCTL_VM_OUT) here",
    )
    parser.add_argument(
        "--systemd",
        action="store_true",
        help="boot the host's systemd as PID 1 and run the command as microvm-job.service",
    )
    parser.add_argument("--build-only", action="store_true", help="build the cached image and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.build_only:
            print(ensure_image())
            return 0
        if not command:
            parser.error("no command given: microvm.py -- CMD [ARGS...]")
        return boot(
            command, args.memory, args.cpus, args.timeout, args.artifacts, args.disk_size, args.systemd
        )
    except VMError as error:
        log(str(error))
        return EXIT_VM_FAILED


if __name__ == "__main__":
    sys.exit(main())
