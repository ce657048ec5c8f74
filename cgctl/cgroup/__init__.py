"""cgroup v2: the filesystem layer (fs) and one module per controller, each with apply and stat."""
