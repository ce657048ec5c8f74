"""The README's code blocks run as an operator would type them, as root on this Debian 12 userland
with a cgroup v2 kernel: each ```console block's commands with their output compared to the
transcript, each ```sh block as a script that must succeed (tests/readme_blocks.py). A block that
cannot run here says why in the README (`<!-- not run: REASON -->`); an unmarked one this test
cannot run fails it.

Each block runs from the checkout with its .venv/bin first on PATH (standing for the README's
install, which needs the network), in a mount namespace of its own where /etc, /run and /var are
throwaway overlays: what a block installs (units, sysusers.d and tmpfiles.d files, the group cgctl,
/run/cgctl) is gone when it ends, and the rest of the suite, in the same boot, never sees it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme_blocks import Block, blocks, matches, transcript

CHECKOUT = Path(__file__).resolve().parents[2]
SEPARATOR = "----- test_readme: end of command -----"
# Overlays over the directories a block may write, upper layers on a tmpfs of this namespace alone.
THROWAWAY = """
set -eu
mount -t tmpfs tmpfs "$SCRATCH"
for dir in /etc /run /var; do
    mkdir -p "$SCRATCH$dir/upper" "$SCRATCH$dir/work"
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$SCRATCH$dir/upper,workdir=$SCRATCH$dir/work" "$dir"
done
cd "$CHECKOUT"
exec bash -o pipefail "$@"
"""


def run_in_throwaway(script: str, scratch: Path, *options: str) -> subprocess.CompletedProcess[str]:
    scratch.mkdir()
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "SCRATCH": str(scratch),
        "CHECKOUT": str(CHECKOUT),
    }
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            THROWAWAY,
            "throwaway",
            *options,
            "-c",
            script,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def runnable() -> list[Block]:
    return [block for block in blocks() if block.not_run is None]


@pytest.mark.parametrize("block", runnable(), ids=lambda block: block.where)
def test_readme_block(block: Block, tmp_path: Path) -> None:
    problem = block.problem()
    assert problem is None, problem
    if block.language == "sh":
        done = run_in_throwaway(block.text, tmp_path / "scratch", "-e")
        assert done.returncode == 0, f"{block.where}: exit status {done.returncode}:\n{done.stdout}"
        return
    pairs = transcript(block)
    # Each command, then a separator line, with the command's status kept for the next (`echo $?`).
    script = "exec 2>&1\n" + "".join(
        f"{command}\nstatus=$?; printf '\\n%s\\n' '{SEPARATOR}'; (exit $status)\n" for command, _ in pairs
    )
    done = run_in_throwaway(script, tmp_path / "scratch")
    outputs = done.stdout.split(f"\n{SEPARATOR}\n")
    assert len(outputs) == len(pairs) + 1, f"{block.where}: the transcript stopped early:\n{done.stdout}"
    for (command, expected), output in zip(pairs, outputs, strict=False):
        assert matches(expected, output), (
            f"{block.where}: `{command}` printed:\n{output}\nnot as the README shows:\n{expected}"
        )
