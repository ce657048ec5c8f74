"""cgctl: run workloads in their own cgroup v2 with memory, CPU, IO and pids limits, and account for them."""

__version__ = "0.1.0"
