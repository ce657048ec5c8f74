"""What policies cost the daemon: a reload across many containers, a pressure action's reaction, and
idle triggers.

Why: ops change policy files while containers run and expect every container to follow at once; a
pressure action is only useful if it acts while the pressure lasts; and armed triggers must cost
nothing while nothing happens. Each figure is set against a floor measured in the same run:

- Reload: 100 policy files (one per container, each a memory.max and a pids.max) with 100 running
  containers, from `POST /v1/policies/reload` until it answers with every container changed (the
  reload is synchronous: the answer comes after the last write), then once more from the moment
  the files change on disk (inotify, 0.2 s settle) until every container's memory.max reads the
  new value. Floors: the same 200 writes with plain open/write, and 100 `cgctl update`s through
  the API one after another (the path a reload takes per container, plus HTTP).
- Reaction: a container under memory.high 16M running stress-ng, a policy action that sets
  memory.high 1G when memory `some` pressure passes 10% of 1 s. The benchmark arms its own trigger
  with the same numbers on the same cgroup and times from its own POLLPRI to memory.high reading
  1G (polled every millisecond): the daemon's part, from the kernel's event to the effect.
- Idle: the daemon's CPU over an idle window with 100 containers and no trigger (floor), then with a
  pressure action armed on each (100 PSI triggers, never firing).

How: it writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy; on this project's
development machines (cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py --memory 3G -- .venv/bin/python bench/policy.py [--quick]

The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cgroup2_host import require_cgroup2_root
from daemon import CLOCK_TICKS, PYTHON, Daemon, cpu_ticks

from cgctl.cgroup import fs, pressure
from cgctl.runtime.api import CreateRequest
from cgctl.spec import WorkloadSpec

HOW_TO_RUN = ".venv/bin/python tests/vm/microvm.py --memory 3G -- .venv/bin/python bench/policy.py"
CGCTL_ROOT = Path("/sys/fs/cgroup/cgctl.slice")
MiB = 1 << 20
STRESS = ["/usr/bin/stress-ng", "--vm", "1", "--vm-bytes", "64M", "--vm-keep", "--timeout", "600s", "--quiet"]


def wait_until(condition: object, what: str, timeout: float = 300.0, step: float = 0.001) -> float:
    """Seconds until condition() holds (polled every `step`); raises after timeout."""
    started = time.perf_counter()
    while not condition():  # type: ignore[operator]
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)
    return time.perf_counter() - started


def policy_files(directory: Path, names: list[str], mib: int) -> None:
    for index, name in enumerate(names):
        text = f"policies:\n  - name: p{index:03d}\n    match: {{name: {name}}}\n"
        text += f"    limits: {{memory: {{max: {mib}M}}, pids: {{max: {100 + index}}}}}\n"
        temporary = directory / f".{index:03d}.tmp"
        temporary.write_text(text)
        temporary.rename(directory / f"{index:03d}.yaml")


def all_read(names: list[str], value: str) -> bool:
    return all((CGCTL_ROOT / name / "memory.max").read_text().strip() == value for name in names)


def reload_figures(daemon: Daemon, directory: Path, names: list[str]) -> dict[str, float]:
    """Reload through the API, then through inotify; and the floors (raw writes, API updates)."""
    figures = {}
    policy_files(directory, names, 200)
    # The files appear: the daemon's inotify reload applies them; wait for it to settle first.
    wait_until(lambda: all_read(names, str(200 * MiB)), "the first policies", step=0.05)
    policy_files(directory, names, 300)
    figures["inotify_seconds"] = wait_until(
        lambda: all_read(names, str(300 * MiB)), "the inotify reload", step=0.01
    )
    time.sleep(1.0)  # let that reload's settle end
    # The edit is seen by inotify too, whose reload waits 0.2 s for quiet: the API's starts first.
    # Should inotify's win the lock, the API's finds nothing to do: then the round is done again.
    for attempt in range(3):
        for file in directory.iterdir():
            file.write_text(file.read_text().replace(f"{300 - attempt}M", f"{299 - attempt}M"))
        started = time.perf_counter()
        result = daemon.api.policy_apply()
        figures["api_reload_seconds"] = time.perf_counter() - started
        if sum(bool(plan.changes) for plan in result) == len(names):
            break
        time.sleep(1.0)
    else:
        raise RuntimeError("the directory's own reload beat the API's three times")
    if not all_read(names, str((299 - attempt) * MiB)):
        raise RuntimeError("the API reload answered before every container had its new limit")
    started = time.perf_counter()
    for index, name in enumerate(names):
        # The values in force, so that the daemon's drift correction has nothing to put back.
        (CGCTL_ROOT / name / "memory.max").write_text(str((299 - attempt) * MiB))
        (CGCTL_ROOT / name / "pids.max").write_text(str(100 + index))
    figures["raw_write_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    for index, name in enumerate(names):
        daemon.api.update(name, {"memory": {"max": "260M"}, "pids": {"max": 200 + index}})
    figures["api_update_seconds"] = time.perf_counter() - started
    return figures


def reaction_figures(daemon: Daemon, directory: Path, rounds: int) -> list[float]:
    """Seconds from the kernel's pressure event (our own trigger) to memory.high reading 1G."""
    (directory / "psi.yaml").write_text(
        "policies:\n  - name: relieve\n    match: {name: squeezed-*}\n    limits: {memory: {high: 16M}}\n"
        "    actions:\n      - when: {pressure: {resource: memory, above: 10%, window: 1s}}\n"
        "        do: {set: {memory: {high: 1G}}}\n"
    )
    time.sleep(1.5)
    reactions = []
    for round_ in range(rounds):
        name = f"squeezed-{round_}"
        spec = WorkloadSpec.model_validate({"name": name, "command": ["/bin/sleep", "3600"]})
        daemon.api.create(CreateRequest(spec=spec))
        group = fs.Cgroup(CGCTL_ROOT / name)
        fd = pressure.open_trigger(group, "memory", "some", 100_000, 1_000_000)
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        # The pressure comes from a second process in the same cgroup (the trigger is armed first).
        import subprocess

        stress = subprocess.Popen(STRESS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        group.write("cgroup.procs", str(stress.pid))
        try:
            events = poller.poll(60_000)
            fired = time.perf_counter()
            if not events:
                raise RuntimeError(f"{name}: no pressure event within 60 s")
            wait_until(lambda n=name: (CGCTL_ROOT / n / "memory.high").read_text().strip() == str(1 << 30),
                       "the action's effect", timeout=60)  # fmt: skip
            reactions.append(time.perf_counter() - fired)
        finally:
            os.close(fd)
            stress.kill()
            stress.wait()
            daemon.api.remove(name, force=True)
    (directory / "psi.yaml").unlink()
    return reactions


def idle_cpu(daemon: Daemon, seconds: float) -> float:
    """The daemon's CPU over `seconds` of nothing happening, as a fraction of one core."""
    before = cpu_ticks(daemon.pid)
    time.sleep(seconds)
    return (cpu_ticks(daemon.pid) - before) / CLOCK_TICKS / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 containers, 1 reaction, 10 s idle windows")
    args = parser.parse_args()
    require_cgroup2_root(HOW_TO_RUN)
    count, rounds, idle_seconds = (20, 1, 10.0) if args.quick else (100, 5, 30.0)
    print(f"cgctl policy benchmark; kernel {platform.release()}, {os.cpu_count()} CPUs, python {PYTHON}")
    workdir = Path(tempfile.mkdtemp(prefix="cgctl-bench-policy-"))
    directory = workdir / "policies.d"
    directory.mkdir()
    daemon = Daemon(workdir)
    failed = False
    try:
        daemon.start("--policy-dir", str(directory))
        names = [f"c{index:03d}" for index in range(count)]
        for name in names:
            spec = WorkloadSpec.model_validate({"name": name, "command": ["/bin/sleep", "100000"]})
            daemon.api.create(CreateRequest(spec=spec))
        idle_floor = idle_cpu(daemon, idle_seconds)
        (directory / "guard.yaml").write_text(
            "policies:\n  - name: guard\n    actions:\n"
            "      - when: {pressure: {resource: memory, above: 90%, window: 10s}}\n        do: freeze\n"
        )
        wait_until(lambda: daemon.api.explain(names[-1]).actions != [], "the triggers to be armed", step=0.1)
        idle_armed = idle_cpu(daemon, idle_seconds)
        (directory / "guard.yaml").unlink()
        time.sleep(1.0)
        figures = reload_figures(daemon, directory, names)
        for file in directory.iterdir():
            file.unlink()
        time.sleep(1.0)
        reactions = reaction_figures(daemon, directory, rounds)
        daemon.alive()
    except Exception:
        failed = True
        print(daemon.log.read_text() if daemon.log.exists() else "(no daemon log)", file=sys.stderr)
        raise
    finally:
        if not failed:
            daemon.remove_all()
        problems = daemon.stop()
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
    p50 = statistics.median(reactions)
    rows = [
        (f"Reload, {count} files x {count} containers (API)", f"{figures['api_reload_seconds']:.2f} s"),
        ("  from the files' change on disk (inotify + 0.2 s settle)", f"{figures['inotify_seconds']:.2f} s"),
        (f"  floor: {2 * count} plain writes of the same files", f"{figures['raw_write_seconds']:.3f} s"),
        (f"  peer path: {count} `update`s through the API", f"{figures['api_update_seconds']:.2f} s "
         f"(reload / updates = {figures['api_reload_seconds'] / figures['api_update_seconds']:.2f})"),
        (f"PSI action, kernel event to effect (p50 of {len(reactions)})", f"{p50 * 1000:.0f} ms "
         f"(max {max(reactions) * 1000:.0f} ms)"),
        (f"Daemon CPU idle, {count} containers, 0 triggers", f"{idle_floor * 100:.2f}% of a core"),
        (f"Daemon CPU idle, {count} containers, {count} triggers", f"{idle_armed * 100:.2f}% of a core"),
    ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    print("BENCH_JSON " + json.dumps({**figures, "reactions": reactions, "idle_floor": idle_floor,
                                      "idle_armed": idle_armed, "containers": count}))  # fmt: skip


if __name__ == "__main__":
    main()
