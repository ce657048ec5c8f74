"""Run records: who owns which workload cgroup, so that names are unique and dead runs are cleaned up.

Each running workload has a record file, <state dir>/<name>.json, that its
supervisor holds an exclusive flock on for as long as it lives. The kernel
drops the lock when the supervisor dies, however it dies (SIGKILL included),
so a record whose lock can be taken belongs to a dead run: its cgroup is
killed and removed by the next cgctl that starts. The record is written
before the cgroup is made and removed after it is gone, so no cgroup of
cgctl's is ever without one. cgroups cgctl did not create are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgctl.cgroup import fs

CLAIM_PATIENCE = 2.0  # seconds a name's lock may be held by another's cleanup before it counts as in use


def default_state_dir() -> Path:
    if explicit := os.environ.get("CGCTL_STATE_DIR"):
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/cgctl/runs")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return Path(runtime_dir) / "cgctl" / "runs"


@dataclass
class Claim:
    """A held run record: the name is ours until release()."""

    name: str
    path: Path
    fd: int

    def release(self) -> None:
        """Forget the run; call after its cgroup is gone."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)

    def hand_over(self) -> None:
        """Stop holding the lock but keep the record: an OCI container's, whose OCI state now holds
        the name (see the module's docstring)."""
        os.close(self.fd)


def oci_owned(record: dict[str, Any]) -> bool:
    """Whether the record is an OCI container's whose state still exists (its name is in use)."""
    oci = record.get("oci")
    return isinstance(oci, dict) and os.path.exists(str(oci.get("state")))


def record_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def rewrite(path: Path, record: dict[str, object]) -> None:
    """Replace a record's content in place: its inode, which the supervisor's lock is on, stays.

    One write, padded with spaces (JSON ignores them) to at least the old length, so that a
    reader (the exporter, `cgctl stats`) never catches the file empty or cut short.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, json.dumps(record).encode().ljust(os.fstat(fd).st_size), 0)
    finally:
        os.close(fd)


def read(path: Path) -> dict[str, Any]:
    """A record's content. A read that races a rewrite can come out torn (reads of a regular file
    are not atomic against a write), so read again until it parses; ValueError after 0.1 s."""
    for _ in range(100):
        try:
            return dict(json.loads(path.read_text()))
        except ValueError:
            time.sleep(0.001)
    return dict(json.loads(path.read_text()))


def update(path: Path, **fields: object) -> None:
    """Set fields of a record in place (None removes one)."""
    record = read(path)
    record.update(fields)
    rewrite(path, {key: value for key, value in record.items() if value is not None})


def _checkpoint_lock(record: Path) -> Path:
    return record.with_suffix(".checkpoint")


@contextlib.contextmanager
def checkpointing(record: Path) -> Iterator[None]:
    """Held by `cgctl checkpoint` while CRIU dumps a run and its record is updated: a dump that
    ends the workload wakes its supervisor, which must wait to read how the checkpoint went."""
    lock = _checkpoint_lock(record)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def wait_for_checkpoint(record: Path) -> None:
    """Block while a checkpoint of this run is in progress (see checkpointing)."""
    try:
        fd = os.open(_checkpoint_lock(record), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def claim(state_dir: Path, name: str, record: dict[str, object]) -> Claim:
    """Take the name for a new run, or raise SpecError if a live run has it."""
    from cgctl.spec import SpecError  # pydantic's, which `cgctl ps` never needs

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = record_path(state_dir, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    # Another cgctl's clean_stale may hold the lock for a moment (our file is still empty: it cannot
    # tell us from a claimer that died), then unlinks it; only a lock held longer is a live run's.
    deadline = time.monotonic() + CLAIM_PATIENCE
    locked = False
    while not locked:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            if os.fstat(fd).st_nlink == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.005)
    if os.fstat(fd).st_nlink == 0:  # a stale-run cleanup unlinked it between our open and flock
        os.close(fd)
        return claim(state_dir, name, record)
    if locked and os.fstat(fd).st_size and oci_owned(_parsed(path)):
        locked = False
    if not locked:
        os.close(fd)
        raise SpecError(("name",), name, "already in use by a running workload")
    rewrite(path, record)
    return Claim(name, path, fd)


def live_records(
    state_dir: Path, proc_locks: Path = Path("/proc/locks")
) -> list[tuple[Path, os.stat_result]]:
    """The records whose supervisor is alive, with their stat: seen in /proc/locks without taking locks,
    else (a record not listed there) asked of the kernel with a lock probe. /proc/locks names the
    inode a lock is really on, which stat does not give on overlayfs (a state directory inside a
    docker container, or on the VM's root): there it is another device, and every record would look
    dead."""
    records = sorted(state_dir.glob("*.json")) if state_dir.exists() else []
    if not records:
        return []  # /proc/locks lists every lock of the host: not worth reading for nothing
    held = set()
    for line in proc_locks.read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK":  # waiters ("->") have their own layout
            major, minor, inode = fields[5].split(":")
            held.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
    live = []
    for path in records:
        try:
            identity = path.stat()
        except FileNotFoundError:
            continue
        if (identity.st_dev, identity.st_ino) in held or _locked(path) or _oci_running(path):
            live.append((path, identity))
    return live


def _parsed(path: Path) -> dict[str, Any]:
    """A record's content, {} if it cannot be read (gone, or an empty claim)."""
    try:
        return read(path)
    except (OSError, ValueError):
        return {}


def _oci_running(path: Path) -> bool:
    """Whether an unlocked record is an OCI container's with processes in its cgroup."""
    record = _parsed(path)
    if not oci_owned(record):
        return False
    try:
        events = Path(record["cgroup"], "cgroup.events").read_text()
    except OSError:
        return False
    return "populated 1" in events


def _locked(path: Path) -> bool:
    """Whether another open file holds path's flock: a shared lock we cannot get now. The probe holds
    one for an instant, which a claimer waits out (claim) and a cleaner takes for a live run."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def clean_stale(state_dir: Path) -> list[str]:
    """Kill and remove the cgroups of runs whose supervisor is gone, and take down their networks;
    returns their names."""
    cleaned = []
    for path in sorted(state_dir.glob("*.json")) if state_dir.exists() else []:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # its run ended meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # alive
        try:
            # Empty: a claimer between its open and its lock, or one that died there; it made no
            # cgroup. Unlinked at once, so that a live claimer retries with a file of its own.
            try:
                record = read(path) if os.fstat(fd).st_size else {}
            except ValueError:
                record = {}
            if oci_owned(record):
                continue  # an OCI container's, until its `delete` (without its state, it is dead)
            if record.get("cgroup"):
                fs.remove(fs.Cgroup(Path(record["cgroup"])))
            if record.get("network"):  # its namespace died with its processes: release the rest
                from cgctl import network

                with contextlib.suppress(network.NetworkError, network.cni.CniError, OSError):
                    network.detach(record["network"])
            path.unlink(missing_ok=True)
            cleaned.append(path.stem)
        finally:
            os.close(fd)
    return cleaned
