"""`cgctl machine`: a long-lived cgroup v2 micro-VM running the daemon, for hosts without a usable
cgroup v2 of their own (instance.py); the VM's image and qemu command line (vm.py), which the
test runner tests/vm/microvm.py shares; the shell's console bridge (console.py)."""

import os
from pathlib import Path

RUN_FILE = "run.json"  # in the machine's home while its qemu runs: what every verb looks for first


def default_home() -> Path:
    """The machine's directory; here, not in instance.py, so a verb can look for a started machine
    without importing what starting one needs."""
    if explicit := os.environ.get("CGCTL_MACHINE_DIR"):
        return Path(explicit)
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "cgctl" / "machine"
