"""A terminal for the workload from its own devpts, handed out over a socket as runc's console socket is.

The pty must be allocated inside the workload's mount namespace: with a root of its own, /dev/ptmx
there is its private devpts instance (rootfs.py mounts one with `newinstance`), so `tty` prints a
/dev/pts path of its own and nothing of the host's ptys is visible. The workload's first process
opens the pair, keeps the slave as its controlling terminal and stdio, and sends the master back to
the process that relays it (the supervisor, the keeper, or `cgctl exec`) with SCM_RIGHTS.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

# The size of a terminal nobody has measured yet: the kernel's own default, left as it is.
UNKNOWN_SIZE = (0, 0)


def channel() -> tuple[socket.socket, socket.socket]:
    """(the relay's end, the workload's end): the master comes over it, once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    return ours, theirs


def take_terminal(sock_fd: int, size: tuple[int, int]) -> None:
    """In the workload, a session leader by now: open a pty here, make its slave our controlling
    terminal and stdin/stdout/stderr at `size` (rows, columns), and send the master on sock_fd."""
    master, slave = os.openpty()
    if size != UNKNOWN_SIZE:
        set_size(slave, size)
    socket.send_fds(socket.socket(fileno=os.dup(sock_fd)), [b"pty"], [master])
    os.close(master)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    if slave > 2:
        os.close(slave)


def receive_master(sock: socket.socket) -> int | None:
    """The master the workload sent, or None if it closed its end first (it failed; its report says why)."""
    _, fds, _, _ = socket.recv_fds(sock, 16, 1)
    return fds[0] if fds else None


def set_size(fd: int, size: tuple[int, int]) -> None:
    """Set the terminal's (rows, columns); the kernel sends SIGWINCH to its foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))


def get_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal at fd."""
    rows, columns, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, columns
