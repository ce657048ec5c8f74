#!/usr/bin/env python3
"""Run one command as root in a throwaway micro-VM with a pure cgroup v2 kernel.

Why: the hosts cgctl is developed and tested on mount cgroup v1 controllers
that belong to the host, so real cgroup v2 behaviour (limits, freezer, PSI,
namespaces, CRIU) can only be exercised under a kernel we boot ourselves.
The VM itself (kernel, initramfs, qemu's command line) is cgctl.machine.vm's,
shared with `cgctl machine`; this runner adds what a one-shot job needs: its
console on our stdout, a timeout, a scratch disk as /dev/vda for io.max tests,
the exit status back from the read-write share, and writes thrown away.

We boot qemu directly rather than through virtme-ng: the whole VM is two
short shell scripts we control, it boots in about 6 s against virtme-ng's 14,
and it needs no udev or systemd inside.

With --systemd the host's own systemd boots as PID 1 instead, into
microvm-job.target (10-25 s more), and microvm-job.service runs the command:
for what needs a real service manager (unit files, socket activation,
delegation). The job's cgroup is then /system.slice/microvm-job.service.

Usage: microvm.py [--systemd] [--memory 2G] [--cpus 2] [--timeout S] [--artifacts DIR] -- CMD [ARGS...]
Exit status: the command's own; 124 on timeout; 125 if the VM could not run it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cgctl.machine import vm
from cgctl.machine.vm import EXIT_VM_FAILED, SYSTEMD_CMDLINE, VMError, ensure_image, qemu_argv, write_job

# The kernel's last words when guest-run.sh powers off: noise, not output of the command.
REBOOT_MESSAGE = re.compile(rb"^\[\s*\d+\.\d+\] reboot: Restarting system\n?$")
EXIT_TIMEOUT = 124


def log(message: str) -> None:
    print(f"microvm: {message}", file=sys.stderr, flush=True)


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
        write_job(out, argv, {**os.environ, "CGCTL_VM_DISK": "/dev/vda"})
        started = time.monotonic()
        qemu = subprocess.Popen(
            [
                *qemu_argv(image, out, memory, cpus, SYSTEMD_CMDLINE if systemd else ""),
                *["-serial", "stdio"],
                *vm.disk(disk, "scratch"),
            ],
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
