"""A real terminal for the tests, headless: a tmux server of its own, one window, driven with
send-keys and read with capture-pane, as a person at a terminal would type and see."""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

# What the pane's shell prints after the command under test, to read its status and the terminal's
# mode once cgctl has let go of it.
PROMPT = r"^~ #\s*$"  # busybox sh's, for root in its home, /
AFTER = 'echo "[exit $?]"; stty -a | tr -s " ;\\n" " " | sed "s/^/[stty /; s/$/]/"; exec sleep 3600'


class Tmux:
    def __init__(self, directory: Path, columns: int = 100, rows: int = 30) -> None:
        self.socket = directory / "tmux.sock"
        self.columns, self.rows = columns, rows

    def tmux(self, *args: str) -> str:
        found = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, check=True
        )
        return found.stdout

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run argv in the window (in a shell that then prints its status and `stty -a`)."""
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
        command = f"{exports}{shlex.join(argv)}; {AFTER}"
        size = ["-x", str(self.columns), "-y", str(self.rows)]
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", *size, "sh", "-c", command)
        self.tmux("set-option", "-g", "history-limit", "5000")

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        if enter:
            self.tmux("send-keys", "-t", "t", "Enter")

    def keys(self, *keys: str) -> None:
        """tmux key names: C-c, C-z, C-p, C-q, Enter ..."""
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-5000")

    def resize(self, columns: int, rows: int) -> None:
        self.tmux("resize-window", "-t", "t", "-x", str(columns), "-y", str(rows))

    def wait_for(self, pattern: str, timeout: float = 90, after: int = 0) -> re.Match[str]:
        """The first match of the regex in the screen's text past `after` characters, waited for."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            found = re.compile(pattern, re.MULTILINE).search(text, after)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} did not appear in {timeout} s; the terminal shows:\n{text}"
                )
            time.sleep(0.2)

    def exit_status(self, timeout: float = 90) -> tuple[int, str]:
        """The status of the command under test and the `stty -a` that followed it."""
        found = self.wait_for(r"\[exit (\d+)\]\s*\[stty ([^\]]*)\]", timeout)
        return int(found.group(1)), found.group(2)

    def kill(self, timeout: float = 60) -> None:
        """Close the terminal, as a person closing the window, and wait until what ran in it is gone
        (cgctl gets SIGHUP and ends its run)."""
        try:
            session = int(self.tmux("display-message", "-p", "-t", "t", "#{pane_pid}"))
        except (subprocess.CalledProcessError, ValueError):
            return
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, check=False)
        deadline = time.monotonic() + timeout
        while _in_session(session):
            assert time.monotonic() < deadline, f"what ran in the terminal outlived it by {timeout} s"
            time.sleep(0.2)


def _in_session(session: int) -> list[int]:
    """The processes of a session (the pane's shell is its leader)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(fields[3]) == session:
            found.append(int(entry.name))
    return found


def cooked(stty: str) -> bool:
    """The caller's terminal as a shell left it: canonical, echoing, signals on."""
    flags = stty.split()
    return {"icanon", "echo", "isig"} <= set(flags)


def shell_session(tmux: Tmux, resize_to: tuple[int, int] = (120, 40)) -> None:
    """What a person checks in an interactive shell: its own pty, its size following the window,
    Ctrl-C and Ctrl-Z reaching the job in the foreground, the shell going on."""
    tmux.type("tty")
    tmux.wait_for(r"^/dev/pts/\d+\s*$")
    tmux.type("stty size")
    tmux.wait_for(rf"^{tmux.rows} {tmux.columns}\s*$")
    tmux.resize(*resize_to)
    tmux.type("stty size")
    tmux.wait_for(rf"^{resize_to[1]} {resize_to[0]}\s*$")
    tmux.type("sleep 100; echo slept-through")
    time.sleep(1)
    tmux.keys("C-c")
    tmux.type("echo after-$((20+22))")
    tmux.wait_for(r"^after-42\s*$")
    assert not re.search(r"^slept-through", tmux.screen(), re.MULTILINE)  # typed, never printed
    tmux.type("sleep 200")
    time.sleep(1)
    tmux.keys("C-z")
    tmux.wait_for(r"Stopped.*sleep 200")
    tmux.type("kill -KILL %1; echo killed-$((1+1))")  # a stopped job takes SIGTERM only once continued
    tmux.wait_for(r"^killed-2\s*$")
