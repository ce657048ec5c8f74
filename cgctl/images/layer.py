"""Unpack one image layer (a tar stream) into a directory overlayfs can use as a lower layer.

Nothing in an archive is trusted. A member may not leave the layer: no
absolute or `..` names, no path through a symlink (the archive's own included),
no symlink whose target climbs out of the layer's root (absolute targets are
read from the layer's root, as the container will), no hard link to anything
not already in the layer; device nodes only when unpacking as root. Files are
created with O_EXCL|O_NOFOLLOW. The OCI whiteouts become overlayfs's: `.wh.NAME`
a 0/0 character device NAME, `.wh..wh..opq` the directory's
trusted.overlay.opaque=y (both need root). Any violation raises LayerError
naming the member.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


class LayerError(Exception):
    """The layer cannot be unpacked safely or completely."""


def unpack(stream: BinaryIO, destination: Path, as_root: bool) -> None:
    """Unpack the tar stream into destination (an empty directory)."""
    directories: list[tuple[Path, tarfile.TarInfo]] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as archive:
            for member in archive:
                name = _clean(member.name)
                if name is None:
                    continue  # the layer's root itself
                parent, base = posixpath.split(name)
                _check_parents(destination, parent, member.name)
                if base == OPAQUE_MARKER:
                    _need_root(as_root, member.name, "an opaque directory marker")
                    os.setxattr(destination / parent, OPAQUE_XATTR, b"y", follow_symlinks=False)
                    continue
                if base.startswith(WHITEOUT_PREFIX):
                    _need_root(as_root, member.name, "a whiteout (a deletion)")
                    target = destination / parent / base[len(WHITEOUT_PREFIX) :]
                    _clear(target)
                    os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))
                    continue
                target = destination / name
                _create(archive, member, target, destination, name, as_root)
                if member.isdir():
                    directories.append((target, member))
                else:
                    _set_metadata(target, member, as_root)
    except tarfile.TarError as error:
        raise LayerError(f"not a valid tar stream or cut short: {error}") from None
    except (EOFError, OSError) as error:
        if isinstance(error, OSError) and error.filename:
            raise LayerError(f"cannot unpack: {error}") from None
        raise LayerError(f"the layer is cut short or corrupt: {error}") from None
    for target, member in reversed(directories):  # children first: a read-only directory is set last
        _set_metadata(target, member, as_root)


def _clean(name: str) -> str | None:
    """The member's path inside the layer, or None for the root; LayerError if it leaves the layer."""
    if name.startswith("/"):
        raise LayerError(f"{name!r}: an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{name!r}: a path with '..'")
    return "/".join(parts) or None


def _check_parents(destination: Path, parent: str, member: str, make: bool = True) -> None:
    """Every directory on the way must be a real directory of the layer (made if missing and
    `make`), never a symlink, so nothing is ever written through one."""
    here = destination
    for part in parent.split("/") if parent else []:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            if not make:
                return  # what is looked up below it does not exist either
            os.mkdir(here, 0o755)
            continue
        if stat.S_ISLNK(mode):
            raise LayerError(f"{member!r}: a path through the symlink {here.relative_to(destination)}")
        if not stat.S_ISDIR(mode):
            raise LayerError(f"{member!r}: {here.relative_to(destination)} is not a directory")


def _need_root(as_root: bool, member: str, what: str) -> None:
    if not as_root:
        raise LayerError(
            f"{member!r} is {what}, which overlayfs stores in a way only root can: import as root"
        )


def _clear(target: Path) -> None:
    """Remove what an earlier member of this layer put at target (the later one wins, as in tar)."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(target)
    else:
        os.unlink(target)


def _create(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    target: Path,
    destination: Path,
    name: str,
    as_root: bool,
) -> None:
    if member.isdir():
        if not target.is_dir() or target.is_symlink():
            _clear(target)
            os.mkdir(target, 0o700)
        return
    _clear(target)
    if member.isreg():
        data = archive.extractfile(member)
        assert data is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            shutil.copyfileobj(data, file, 1 << 20)
            if file.tell() != member.size:
                raise LayerError(f"{member.name!r}: cut short")
        return
    if member.issym():
        start = "" if member.linkname.startswith("/") else posixpath.dirname(name)
        resolved = posixpath.normpath(posixpath.join(start, member.linkname.lstrip("/")))
        if resolved == ".." or resolved.startswith("../"):
            raise LayerError(f"{member.name!r}: a symlink to {member.linkname!r}, outside the layer")
        os.symlink(member.linkname, target)
    elif member.islnk():
        source = _clean(member.linkname)
        if source is None:
            raise LayerError(f"{member.name!r}: a hard link to the layer's root")
        _check_parents(destination, posixpath.dirname(source), member.name, make=False)
        if not os.path.lexists(destination / source) or (destination / source).is_dir():
            raise LayerError(f"{member.name!r}: a hard link to {member.linkname!r}, not a file of the layer")
        os.link(destination / source, target, follow_symlinks=False)
    elif member.ischr() or member.isblk():
        _need_root(as_root, member.name, "a device node")
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(target, 0o600)
    else:
        raise LayerError(f"{member.name!r}: an unsupported tar member type {member.type!r}")


def _set_metadata(target: Path, member: tarfile.TarInfo, as_root: bool) -> None:
    if member.islnk():
        return  # shares its inode with the file it links to
    if as_root:
        os.lchown(target, member.uid, member.gid)
    if not member.issym():
        os.chmod(target, member.mode & 0o7777)
    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


def pack(upper: Path, out: BinaryIO) -> None:
    """Write overlayfs's upper directory as an image layer's tar: its 0/0 character devices become
    `.wh.NAME` whiteouts and its opaque directories get a `.wh..wh..opq`, the inverse of unpack.
    Names are sorted and owners numeric, so the same directory gives the same bytes."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for directory, subdirectories, files in os.walk(upper):
            subdirectories.sort()
            here = Path(directory)
            relative = here.relative_to(upper)
            if relative != Path(".") and _is_opaque(here):
                archive.addfile(_empty(f"{relative}/{OPAQUE_MARKER}"))
            for name in sorted(subdirectories + files):
                path, arcname = here / name, str(relative / name) if relative != Path(".") else name
                info = os.lstat(path)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(0, 0):
                    archive.addfile(_empty(f"{posixpath.dirname(arcname) or '.'}/{WHITEOUT_PREFIX}{name}"))
                    continue
                member = archive.gettarinfo(path, arcname)
                if member is None:  # a socket: a layer cannot hold one (docker leaves them out too)
                    continue
                member.uname = member.gname = ""
                if member.isreg():
                    with open(path, "rb") as data:
                        archive.addfile(member, data)
                else:
                    archive.addfile(member)


def _is_opaque(directory: Path) -> bool:
    try:
        return os.getxattr(directory, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _empty(name: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name.removeprefix("./"))
    member.mode = 0o644
    return member
