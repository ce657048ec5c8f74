"""Prometheus metrics: one table declares every metric; a collector reads the cgroups at scrape time.

Each row says the metric's name, type, help, where its value comes from (a
cgroup file and key, or a derivation) and the unit conversion. Native rows
(`cgctl_...`) carry only the `container` label (and `device` for IO, `interface`
for the network: rows with a sample per device or interface);
`cgctl_container_info` carries the rest for joins. cAdvisor rows (`container_...`,
emitted with --compat cadvisor) carry cAdvisor's `id`, `name`, `image` labels so
existing dashboards work unchanged. Labels never carry environment variables or
command lines.

Nothing is cached: every scrape reads the files anew (no background timer).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from cgctl.accounting import Container, Snapshot, host_cgroups, read_snapshot, running_containers
from cgctl.cgroup.fs import CgroupError
from cgctl.cgroup.io import SYS_DEV_BLOCK
from cgctl.discovery import Selection, is_container
from cgctl.processes import Resources, resources

Kind = Literal["counter", "gauge"]
Family = Literal["native", "cadvisor"]
USEC = 1e-6


@dataclass(frozen=True)
class Per:
    """A row with a sample per device or interface (Snapshot.entries), named in the label `label`."""

    label: Literal["device", "interface"]
    key: str  # the counter in each entry: io.stat's rbytes, accounting.NET_COUNTERS' rx_bytes
    prefix: str = ""  # before the name in the label (cAdvisor's devices are /dev/vda)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    source: str  # "file key" (read as the kernel wrote it), or "derived: how" for the few computed values
    derive: Callable[[Snapshot], float | None] | None = None  # per container, for derived rows
    per: Per | None = None
    scale: float = 1.0
    family: Family = "native"
    extra_labels: tuple[tuple[str, str], ...] = ()


def _cpu_shares(snap: Snapshot) -> float | None:
    """cgroup v1 shares from cpu.weight, the conversion runc and cAdvisor use."""
    weight = snap.value("cpu.weight")
    return None if weight is None else 2 + (weight - 1) * 262142 / 9999


def _native(name: str, kind: Kind, help: str, file: str, key: str = "", scale: float = 1.0) -> MetricDef:
    return MetricDef(name, kind, help, f"{file} {key}".strip(), scale=scale)


def _cadvisor(name: str, kind: Kind, help: str, file: str, key: str = "", scale: float = 1.0) -> MetricDef:
    return MetricDef(name, kind, help, f"{file} {key}".strip(), scale=scale, family="cadvisor")


PREFIX = "cgctl_container_"
NET_DEV = "/proc/PID/net/dev"  # of one of the container's processes: its net namespace's interfaces
METRICS: tuple[MetricDef, ...] = (
    # CPU
    _native(PREFIX + "cpu_usage_seconds_total", "counter", "CPU time used.", "cpu.stat", "usage_usec", USEC),
    _native(
        PREFIX + "cpu_user_seconds_total", "counter", "CPU time in user mode.", "cpu.stat", "user_usec", USEC
    ),
    _native(
        PREFIX + "cpu_system_seconds_total",
        "counter",
        "CPU time in the kernel.",
        "cpu.stat",
        "system_usec",
        USEC,
    ),
    _native(
        PREFIX + "cpu_periods_total",
        "counter",
        "Elapsed cpu.max enforcement periods.",
        "cpu.stat",
        "nr_periods",
    ),
    _native(
        PREFIX + "cpu_throttled_periods_total",
        "counter",
        "Periods in which cpu.max throttled the container.",
        "cpu.stat",
        "nr_throttled",
    ),
    _native(
        PREFIX + "cpu_throttled_seconds_total",
        "counter",
        "Time cpu.max held the container back.",
        "cpu.stat",
        "throttled_usec",
        USEC,
    ),
    _native(
        PREFIX + "cpu_bursts_total",
        "counter",
        "Periods in which cpu.max.burst was used.",
        "cpu.stat",
        "nr_bursts",
    ),
    _native(
        PREFIX + "cpu_burst_seconds_total",
        "counter",
        "CPU time used beyond the quota by bursting.",
        "cpu.stat",
        "burst_usec",
        USEC,
    ),
    # Memory
    _native(PREFIX + "memory_usage_bytes", "gauge", "Memory in use, page cache included.", "memory.current"),
    _native(
        PREFIX + "memory_peak_bytes",
        "gauge",
        "Highest memory use since the container started.",
        "memory.peak",
    ),
    MetricDef(
        PREFIX + "memory_working_set_bytes",
        "gauge",
        "Memory use minus inactive page cache, floored at 0.",
        "derived: memory.current - memory.stat inactive_file",
        Snapshot.working_set,
    ),
    *(
        _native(PREFIX + f"memory_{key}_bytes", "gauge", f"memory.stat {key}: {about}.", "memory.stat", key)
        for key, about in (
            ("anon", "anonymous memory (heap, stacks, anonymous mmaps)"),
            ("file", "page cache"),
            ("kernel", "kernel memory"),
            ("sock", "network socket buffers"),
            ("shmem", "shared memory and tmpfs"),
            ("file_mapped", "page cache mapped into processes"),
            ("file_dirty", "page cache waiting to be written back"),
            ("file_writeback", "page cache being written back"),
            ("active_anon", "recently used anonymous memory"),
            ("inactive_anon", "anonymous memory not recently used"),
            ("active_file", "recently used page cache"),
            ("inactive_file", "page cache not recently used"),
        )
    ),
    _native(PREFIX + "memory_page_faults_total", "counter", "Page faults.", "memory.stat", "pgfault"),
    _native(
        PREFIX + "memory_major_page_faults_total",
        "counter",
        "Page faults that needed IO.",
        "memory.stat",
        "pgmajfault",
    ),
    _native(
        PREFIX + "memory_workingset_refaults_anon_total",
        "counter",
        "Evicted anonymous pages faulted back in.",
        "memory.stat",
        "workingset_refault_anon",
    ),
    _native(
        PREFIX + "memory_workingset_refaults_file_total",
        "counter",
        "Evicted page cache faulted back in.",
        "memory.stat",
        "workingset_refault_file",
    ),
    _native(
        PREFIX + "memory_low_events_total",
        "counter",
        "Times reclaimed below memory.low.",
        "memory.events",
        "low",
    ),
    _native(
        PREFIX + "memory_high_events_total",
        "counter",
        "Times throttled over memory.high.",
        "memory.events",
        "high",
    ),
    _native(
        PREFIX + "memory_max_events_total",
        "counter",
        "Times memory.max was about to be exceeded.",
        "memory.events",
        "max",
    ),
    _native(
        PREFIX + "memory_oom_events_total",
        "counter",
        "Times the container ran out of memory.",
        "memory.events",
        "oom",
    ),
    MetricDef(
        PREFIX + "memory_oom_kills_total",
        "counter",
        "Processes killed by the OOM killer.",
        "derived: memory.events oom_kill - oom_group_kill",
        Snapshot.oom_kills,
    ),
    _native(
        PREFIX + "memory_oom_group_kills_total",
        "counter",
        "Times the OOM killer killed the whole container.",
        "memory.events",
        "oom_group_kill",
    ),
    _native(PREFIX + "memory_swap_usage_bytes", "gauge", "Swap in use.", "memory.swap.current"),
    # Pids
    _native(PREFIX + "pids", "gauge", "Processes and threads.", "pids.current"),
    _native(PREFIX + "pids_peak", "gauge", "Most processes and threads at once.", "pids.peak"),
    _native(
        PREFIX + "pids_refused_forks_total", "counter", "Forks refused by pids.max.", "pids.events", "max"
    ),
    # IO, per device
    *(
        MetricDef(
            PREFIX + f"io_{what}_total",
            "counter",
            f"{about}, per device.",
            f"io.stat {key}",
            per=Per("device", key),
        )
        for what, key, about in (
            ("read_bytes", "rbytes", "Bytes read"),
            ("write_bytes", "wbytes", "Bytes written"),
            ("reads", "rios", "Read operations"),
            ("writes", "wios", "Write operations"),
            ("discard_bytes", "dbytes", "Bytes discarded"),
            ("discards", "dios", "Discard operations"),
        )
    ),
    # Network, per interface of the container's own net namespace (lo left out; none for the host's)
    *(
        MetricDef(
            PREFIX + f"network_{way}_{what}_total",
            "counter",
            f"{about}, per interface.",
            f"{NET_DEV} {direction}_{key}",
            per=Per("interface", f"{direction}_{key}"),
        )
        for way, direction, verb, ing in (
            ("receive", "rx", "received", "receiving"),
            ("transmit", "tx", "sent", "sending"),
        )
        for what, key, about in (
            ("bytes", "bytes", f"Bytes {verb}"),
            ("packets", "packets", f"Packets {verb}"),
            ("errors", "errors", f"Errors while {ing}"),
            ("packets_dropped", "dropped", f"Packets dropped while {ing}"),
        )
    ),
    # Pressure stall information
    *(
        _native(
            PREFIX + f"pressure_{resource}_{state}_seconds_total",
            "counter",
            f"{about} {resource}.",
            f"{resource}.pressure",
            f"{line}.total",
            USEC,
        )
        for resource in ("cpu", "memory", "io")
        for state, line, about in (
            ("waiting", "some", "Time at least one task waited for"),
            ("stalled", "full", "Time all tasks were stalled on"),
        )
    ),
    # Limits in force (no series where the limit is max)
    _native(PREFIX + "spec_memory_limit_bytes", "gauge", "memory.max.", "memory.max"),
    _native(PREFIX + "spec_memory_high_bytes", "gauge", "memory.high.", "memory.high"),
    _native(PREFIX + "spec_memory_swap_limit_bytes", "gauge", "memory.swap.max.", "memory.swap.max"),
    _native(
        PREFIX + "spec_cpu_quota_seconds",
        "gauge",
        "CPU time allowed per period (cpu.max).",
        "cpu.max",
        "quota",
        USEC,
    ),
    _native(PREFIX + "spec_cpu_period_seconds", "gauge", "cpu.max's period.", "cpu.max", "period", USEC),
    _native(PREFIX + "spec_cpu_weight", "gauge", "cpu.weight.", "cpu.weight"),
    _native(PREFIX + "spec_pids_limit", "gauge", "pids.max.", "pids.max"),
    MetricDef(
        PREFIX + "start_time_seconds",
        "gauge",
        "When the container started (Unix time).",
        "derived: the run record",
        lambda snap: snap.container.started_at,
    ),
    # cAdvisor's names, for --compat cadvisor
    MetricDef(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed in seconds.",
        "cpu.stat usage_usec",
        scale=USEC,
        family="cadvisor",
        extra_labels=(("cpu", "total"),),
    ),
    _cadvisor(
        "container_cpu_user_seconds_total",
        "counter",
        "Cumulative user cpu time consumed in seconds.",
        "cpu.stat",
        "user_usec",
        USEC,
    ),
    _cadvisor(
        "container_cpu_system_seconds_total",
        "counter",
        "Cumulative system cpu time consumed in seconds.",
        "cpu.stat",
        "system_usec",
        USEC,
    ),
    _cadvisor(
        "container_cpu_cfs_periods_total",
        "counter",
        "Number of elapsed enforcement period intervals.",
        "cpu.stat",
        "nr_periods",
    ),
    _cadvisor(
        "container_cpu_cfs_throttled_periods_total",
        "counter",
        "Number of throttled period intervals.",
        "cpu.stat",
        "nr_throttled",
    ),
    _cadvisor(
        "container_cpu_cfs_throttled_seconds_total",
        "counter",
        "Total time duration the container has been throttled.",
        "cpu.stat",
        "throttled_usec",
        USEC,
    ),
    _cadvisor(
        "container_memory_usage_bytes",
        "gauge",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        "memory.current",
    ),
    MetricDef(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set in bytes.",
        "derived: memory.current - memory.stat inactive_file",
        Snapshot.working_set,
        family="cadvisor",
    ),
    _cadvisor("container_memory_rss", "gauge", "Size of RSS in bytes.", "memory.stat", "anon"),
    _cadvisor(
        "container_memory_cache", "gauge", "Number of bytes of page cache memory.", "memory.stat", "file"
    ),
    _cadvisor(
        "container_memory_mapped_file",
        "gauge",
        "Size of memory mapped files in bytes.",
        "memory.stat",
        "file_mapped",
    ),
    _cadvisor("container_memory_swap", "gauge", "Container swap usage in bytes.", "memory.swap.current"),
    _cadvisor(
        "container_memory_max_usage_bytes", "gauge", "Maximum memory usage recorded in bytes", "memory.peak"
    ),
    MetricDef(
        "container_oom_events_total",
        "counter",
        "Count of out of memory events observed for the container",
        "derived: memory.events oom_kill - oom_group_kill",
        Snapshot.oom_kills,
        family="cadvisor",
    ),
    *(
        MetricDef(
            f"container_fs_{what}_total",
            "counter",
            about,
            f"io.stat {key}",
            per=Per("device", key, "/dev/"),
            family="cadvisor",
        )
        for what, key, about in (
            ("reads_bytes", "rbytes", "Cumulative count of bytes read"),
            ("writes_bytes", "wbytes", "Cumulative count of bytes written"),
            ("reads", "rios", "Cumulative count of reads completed"),
            ("writes", "wios", "Cumulative count of writes completed"),
        )
    ),
    *(
        MetricDef(
            f"container_network_{way}_{what}_total",
            "counter",
            f"Cumulative count of {about}",
            f"{NET_DEV} {direction}_{key}",
            per=Per("interface", f"{direction}_{key}"),
            family="cadvisor",
        )
        for way, direction, verb, ing in (
            ("receive", "rx", "received", "receiving"),
            ("transmit", "tx", "transmitted", "transmitting"),
        )
        for what, key, about in (
            ("bytes", "bytes", f"bytes {verb}"),
            ("packets", "packets", f"packets {verb}"),
            ("errors", "errors", f"errors encountered while {ing}"),
            ("packets_dropped", "dropped", f"packets dropped while {ing}"),
        )
    ),
    _cadvisor(
        "container_processes", "gauge", "Number of processes running inside the container.", "pids.current"
    ),
    _cadvisor("container_spec_memory_limit_bytes", "gauge", "Memory limit for the container.", "memory.max"),
    _cadvisor(
        "container_spec_memory_swap_limit_bytes",
        "gauge",
        "Memory swap limit for the container.",
        "memory.swap.max",
    ),
    _cadvisor("container_spec_cpu_quota", "gauge", "CPU quota of the container.", "cpu.max", "quota"),
    _cadvisor("container_spec_cpu_period", "gauge", "CPU period of the container.", "cpu.max", "period"),
    MetricDef(
        "container_spec_cpu_shares",
        "gauge",
        "CPU share of the container.",
        "derived: cpu.weight as v1 shares",
        _cpu_shares,
        family="cadvisor",
    ),
    *(
        _cadvisor(
            f"container_pressure_{resource}_{state}_seconds_total",
            "counter",
            f"Total time duration {about} {resource}.",
            f"{resource}.pressure",
            f"{line}.total",
            USEC,
        )
        for resource in ("cpu", "memory", "io")
        for state, line, about in (
            ("waiting", "some", "tasks in the container have waited on"),
            ("stalled", "full", "tasks in the container have stalled on"),
        )
    ),
    MetricDef(
        "container_start_time_seconds",
        "gauge",
        "Start time of the container since unix epoch in seconds.",
        "derived: the run record",
        lambda snap: snap.container.started_at,
        family="cadvisor",
    ),
    MetricDef(
        "container_last_seen",
        "gauge",
        "Last time a container was seen by the exporter",
        "derived: the time of the scrape",
        lambda snap: snap.taken_at,
        family="cadvisor",
    ),
)

_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


def cgroup_name(container: Container, unified: Path) -> str:
    """The cgroup as /proc/PID/cgroup names it: its path below the cgroup2 mount."""
    if container.path:
        return container.path
    cgroup = container.cgroup
    if not cgroup.is_relative_to(unified):
        return str(cgroup)
    relative = str(cgroup.relative_to(unified))
    return "/" if relative == "." else f"/{relative}"


def info_labels(container: Container, unified: Path) -> dict[str, str]:
    """cgctl_container_info's labels: identity and the user's --label metadata, nothing else."""
    labels = {
        "container": container.name,
        "id": container.id,
        "cgroup": cgroup_name(container, unified),
        "image": container.image,
        "policy": container.policy,
    }
    for key, value in sorted(container.labels.items()):
        labels["label_" + _LABEL_NAME.sub("_", key)] = value
    return labels


def native_labels(container: Container, unified: Path, host_wide: bool) -> dict[str, str]:
    """The container's name; host-wide, the cgroup's path and what it is (discovery.labels)."""
    if not host_wide:
        return {"container": container.name}
    return {"cgroup": cgroup_name(container, unified)} | container.found


def cadvisor_labels(container: Container, unified: Path) -> dict[str, str]:
    """cAdvisor's: the cgroup path as `id`; `name` is cgctl's name, or another runtime's short id on
    that container's own cgroup (not on cgroups nested in it, which cAdvisor leaves unnamed too, so
    that `sum by (name)` counts each container once)."""
    path = cgroup_name(container, unified)
    name = container.name if container.own else container.found.get("id", "") if is_container(path) else ""
    return {"id": path, "image": container.image, "name": name}


class ContainerCollector(Collector):
    """Reads every running container's cgroup (host-wide: every selected cgroup) at scrape time and
    renders the metric table's rows.

    `render` writes the text exposition directly (the exporter serves it): values read from a file
    go out as the kernel wrote them (integers; microseconds divided once into seconds), so a scrape
    costs little more than reading the files. `collect` offers the same families to any
    prometheus_client registry by parsing that text, so there is one source of truth.
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        compat: Iterable[Family] = (),
        unified: Path = Path("/sys/fs/cgroup"),
        sys_dev_block: Path = SYS_DEV_BLOCK,
        selection: Selection | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.families: set[Family] = {"native", *compat}
        self.unified = unified
        self.sys_dev_block = sys_dev_block
        self.selection = selection  # host-wide accounting when given
        self.known_records: dict[Path, tuple[object, Container]] = {}
        self.label_cache: dict[tuple[object, ...], str] = {}
        self.errors = {"discover": 0, "read": 0}
        self.extra: Callable[[], str] | None = None  # more families (the daemon's policy engine's)

    def describe(self) -> list[Metric]:
        return []  # unchecked: the series depend on what is running at scrape time

    def collect(self) -> Iterator[Metric]:
        yield from text_string_to_metric_families(self.render())

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every container or cgroup, read now."""
        started = time.perf_counter()
        durations = {}
        try:
            if self.selection is None:
                containers = running_containers(self.state_dir, self.known_records)
            else:
                containers = host_cgroups(self.selection, self.unified, self.state_dir, self.known_records)
        except OSError:
            self.errors["discover"] += 1
            containers = []
        durations["discover"] = time.perf_counter() - started
        snaps = []
        device_names: dict[str, str] = {}
        for container in containers:
            try:
                if snap := read_snapshot(container, self.sys_dev_block, device_names):
                    snaps.append(snap)
            except (OSError, ValueError, CgroupError):
                self.errors["read"] += 1
        durations["read"] = time.perf_counter() - started - durations["discover"]
        out: list[str] = []
        self._render_families(out, snaps)
        own = sum(snap.container.own for snap in snaps)
        self._render_self_metrics(out, own, len(snaps), durations, time.perf_counter() - started)
        if self.extra is not None:
            out.append(self.extra())
        return "".join(out)

    def _label_text(self, container: Container, kind: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
        """The rendered labels of a container's rows of one kind (native, cadvisor, info), kept while
        what they are made of stays the same: a scrape of 1,000 cgroups renders them once."""
        key: tuple[object, ...] = (
            container.cgroup,
            kind,
            extra,
            container.name,
            container.id,
            container.image,
        )
        if kind == "info":
            key += (container.policy, tuple(container.labels.items()))
        if (text := self.label_cache.get(key)) is None:
            if kind == "info":
                labels = info_labels(container, self.unified)
            elif kind == "native":
                labels = native_labels(container, self.unified, self.selection is not None)
            else:
                labels = cadvisor_labels(container, self.unified)
            text = self.label_cache[key] = _labels(labels | dict(extra))
        return text

    def _render_families(self, out: list[str], snaps: list[Snapshot]) -> None:
        live = {snap.container.cgroup for snap in snaps}
        for key in [key for key in self.label_cache if key[0] not in live]:
            del self.label_cache[key]
        _family(
            out, "cgctl_container_info", "gauge", "Identity and labels of each running container; always 1."
        )
        out += [
            f"cgctl_container_info{{{self._label_text(snap.container, 'info')}}} 1\n"
            for snap in snaps
            if snap.container.own
        ]
        texts: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}
        for definition in METRICS:
            if definition.family not in self.families:
                continue
            _family(out, definition.name, definition.kind, definition.help)
            kind = (definition.family, definition.extra_labels)
            if kind not in texts:
                texts[kind] = [self._label_text(snap.container, *kind) for snap in snaps]
            _render_rows(out, definition, snaps, texts[kind])

    def _render_self_metrics(
        self, out: list[str], containers: int, cgroups: int, durations: dict[str, float], total: float
    ) -> None:
        _family(out, "cgctl_exporter_scrape_duration_seconds", "gauge", "Time the last scrape took.")
        out.append(f"cgctl_exporter_scrape_duration_seconds {total!r}\n")
        _family(
            out, "cgctl_exporter_part_duration_seconds", "gauge", "Time each part of the last scrape took."
        )
        for part, seconds in durations.items():
            out.append(f'cgctl_exporter_part_duration_seconds{{part="{part}"}} {seconds!r}\n')
        _family(
            out, "cgctl_exporter_part_errors_total", "counter", "Errors in each part of the scrapes so far."
        )
        for part in durations:
            out.append(f'cgctl_exporter_part_errors_total{{part="{part}"}} {self.errors[part]}\n')
        _family(out, "cgctl_exporter_containers", "gauge", "Running containers seen by the last scrape.")
        out.append(f"cgctl_exporter_containers {containers}\n")
        _family(out, "cgctl_exporter_cgroups", "gauge", "Cgroups the last scrape accounted.")
        out.append(f"cgctl_exporter_cgroups {cgroups}\n")


# cgctl's own long-lived processes (the daemon's /metrics: the daemon and its keeper), under the
# names prometheus_client's ProcessCollector gives the one process it runs in, with `process` to tell
# them apart; threads has no standard name.
PROCESS_METRICS: tuple[tuple[str, Kind, str, Callable[[Resources], float]], ...] = (
    ("cpu_seconds_total", "counter", "CPU time used, user and system.", lambda r: r.cpu_seconds),
    ("resident_memory_bytes", "gauge", "Resident memory.", lambda r: r.resident_bytes),
    ("open_fds", "gauge", "Open file descriptors.", lambda r: r.open_fds),
    ("threads", "gauge", "Threads.", lambda r: r.threads),
    ("start_time_seconds", "gauge", "Start time, in seconds since the unix epoch.", lambda r: r.started_at),
)


def render_processes(pids: dict[str, int | None]) -> str:
    """cgctl_process_* of each named process (process="daemon", "keeper"); one that is gone, or has
    no pid, has no rows."""
    found = {name: usage for name, pid in pids.items() if pid is not None and (usage := resources(pid))}
    out: list[str] = []
    for suffix, kind, help, value in PROCESS_METRICS:
        name = "cgctl_process_" + suffix
        _family(out, name, kind, help)
        out += [f'{name}{{process="{who}"}} {_number(float(value(usage)))}\n' for who, usage in found.items()]
    return "".join(out)


def _render_rows(
    out: list[str], definition: MetricDef, snaps: list[Snapshot], label_texts: list[str]
) -> None:
    """One sample per container (per device or interface for those rows) that has the value; the hot
    loop of a scrape, so file rows copy the kernel's digits rather than round-trip them through a float."""
    head = definition.name + "{"
    append = out.append
    if (per := definition.per) is not None:
        for snap, labels in zip(snaps, label_texts, strict=True):
            for name, counters in sorted(snap.entries(per.label).items()):
                if (value := counters.get(per.key)) is not None:
                    append(f'{head}{labels},{per.label}="{_escape(per.prefix + name)}"}} {_number(value)}\n')
    elif definition.derive is not None:
        derive = definition.derive
        for snap, labels in zip(snaps, label_texts, strict=True):
            if (value := derive(snap)) is not None:
                append(f"{head}{labels}}} {_number(value * definition.scale)}\n")
    else:
        file, _, key = definition.source.partition(" ")
        rows = [
            (values, labels)
            for snap, labels in zip(snaps, label_texts, strict=True)
            if (values := snap.files.get(file))
        ]
        if definition.scale == USEC:
            out += [
                f"{head}{labels}}} {int(text) / 1e6}\n"
                for values, labels in rows
                if (text := values.get(key))
            ]
        else:
            out += [f"{head}{labels}}} {text}\n" for values, labels in rows if (text := values.get(key))]


def _number(value: float) -> str:
    """Integral values as integers (as the kernel's), others in Python's shortest round-trip form."""
    return str(int(value)) if value.is_integer() else repr(value)


def _family(out: list[str], name: str, kind: Kind, help: str) -> None:
    escaped = help.replace("\\", "\\\\").replace("\n", "\\n")
    out.append(f"# HELP {name} {escaped}\n# TYPE {name} {kind}\n")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    """name="value" pairs, sorted by name, values escaped as the text format wants."""
    return ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(labels.items()))
