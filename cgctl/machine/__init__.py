"""`cgctl machine`: a long-lived cgroup v2 micro-VM running the daemon, for hosts without a usable
cgroup v2 of their own (instance.py); the VM's image and qemu command line (vm.py), which the
test runner tests/vm/microvm.py shares; the shell's console bridge (console.py)."""
