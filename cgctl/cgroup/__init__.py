"""cgroup v2: the filesystem layer (fs) and one module per controller.

Each controller module turns its part of the spec into (interface file, value)
pairs (`settings`), checked against the host where that needs the host. What
the controllers report is read through one table-driven reader, cgctl.accounting,
shared by the run report, `cgctl stats` and the exporter.
"""
