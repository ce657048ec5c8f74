"""The daemon's policies: the active set, reloaded on request, on SIGHUP and when a file of the
directory changes (inotify); applied to every running container through the path of `cgctl
update`; kept applied (a policy's value written back when someone changes the cgroup file: the
kernel reports every write to an interface file to inotify); and their actions, fired by the
kernel's events (PSI triggers, memory.events, exits) at most once per `at_most_every` per container.

A reload is all or nothing: a set with any bad file is refused whole and the active one stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inotify_simple import INotify, flags

from cgctl import limits as limits_table
from cgctl import policy, state
from cgctl.cgroup import fs, pressure
from cgctl.daemon.triggers import TriggerPoller
from cgctl.policy.loader import Located
from cgctl.policy.model import Action
from cgctl.runtime import policies as on_records
from cgctl.runtime.api import (
    EventType,
    Explanation,
    Invalid,
    NotFound,
    PolicyPlan,
    PolicyStatus,
    ReloadResult,
)
from cgctl.spec import Limits

if TYPE_CHECKING:
    from cgctl.daemon.managed import Managed

log = logging.getLogger("cgctld")
SETTLE = 0.2  # seconds of quiet in the directory before a reload: an editor writes in several steps
RUN_TIMEOUT = 60.0  # seconds a `run` action's command may take
DIRECTORY_EVENTS = (
    flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.CREATE | flags.DELETE_SELF
)


@dataclasses.dataclass
class Armed:
    """The policy state of one running container attempt."""

    last_fired: dict[tuple[str, int], float]  # the container's, kept across its attempts
    actions: list[tuple[Located, int, Action]] = dataclasses.field(default_factory=list)
    guarded: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # file -> (content, policy)
    memory_high: int = 0
    triggers: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # poller keys


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What the engine needs of the daemon's service: its event feed, its containers (by name), the
    watcher of their files, and what a policy's actions do to a container."""

    emit: Callable[[EventType, str, dict[str, str]], None]
    find: Callable[[str], Managed | None]
    watch: Callable[[str, fs.Cgroup, tuple[str, ...]], None]
    freeze: Callable[[str, float], bool]
    thaw: Callable[[str, float], bool]
    kill: Callable[[str, str], int]
    restart: Callable[[Managed], None]


class PolicyEngine:
    """The active set and what keeps it in force (see the module's docstring); one per Service."""

    def __init__(self, hooks: Hooks, state_dir: Path, directory: Path) -> None:
        self.hooks, self.state_dir = hooks, state_dir
        self.directory = directory
        self.lock = threading.RLock()
        self.active = policy.PolicySet()
        self.status = PolicyStatus(directory=str(directory), files=[], policies=[])
        self.armed: dict[str, Armed] = {}
        self.last_fired: dict[str, dict[tuple[str, int], float]] = {}  # container -> action -> when
        self.actions_taken: Counter[tuple[str, str]] = Counter()  # (policy, action) -> count
        self.drift_corrected: Counter[str] = Counter()  # policy -> count
        self.reloads: Counter[str] = Counter()  # result -> count
        self.poller = TriggerPoller(self._pressure)
        self.closed = False
        self.inotify = INotify()
        self.changed = threading.Event()
        self.watching = self._watch(None)  # before the first load, so no change after it is missed
        self.was_directory = self.directory.is_dir()
        self._load_initial()
        threading.Thread(target=self._watch_directory, name="policy-dir", daemon=True).start()
        threading.Thread(target=self._reload_when_changed, name="policy-reload", daemon=True).start()

    # --- the set ---

    def _load_initial(self) -> None:
        try:
            self.active = policy.load_directory(self.directory)
            self._loaded(None)
        except policy.PolicyError as error:
            log.error("policies not loaded, none are in force: %s", error)
            self._loaded(error)

    def _loaded(self, error: policy.PolicyError | None) -> None:
        self.status = PolicyStatus(
            directory=str(self.directory),
            files=[Path(file).name for file in self.active.files],
            policies=[located.source for located in self.active.policies],
            reloaded_at=time.time(),
            ok=error is None,
            problems=[str(problem) for problem in error.problems] if error else [],
        )
        self.reloads["success" if error is None else "failure"] += 1

    def reload(self) -> ReloadResult:
        """Load the directory and apply it to every running container; Invalid (and the active set
        stays) if any file is bad."""
        with self.lock:
            try:
                loaded = policy.load_directory(self.directory)
            except policy.PolicyError as error:
                self._loaded(error)
                log.error("policy reload refused, the active policies stay: %s", error)
                self.hooks.emit("policy-reload", "", {"result": "refused", "error": str(error.problems[0])})
                raise Invalid(f"policies not reloaded, the active ones stay in force:\n{error}") from None
            self.active = loaded
            self._loaded(None)
            plans = self.apply_all()
        changed = [plan for plan in plans if plan.changes or plan.error]
        log.info("policies reloaded: %d files, %d policies, %d containers changed",
                 len(loaded.files), len(loaded.policies), len(changed))  # fmt: skip
        self.hooks.emit(
            "policy-reload",
            "",
            {
                "result": "applied",
                "policies": str(len(loaded.policies)),
                "containers_changed": str(len(changed)),
            },
        )
        return ReloadResult(status=self.status, containers=plans)

    def apply_all(self) -> list[PolicyPlan]:
        """The active set on every running container (at start-up: on those found again)."""
        with self.lock:
            return [self._apply(name) for name in on_records.running(self.state_dir)]

    def diff(self, directory: Path | None = None) -> list[PolicyPlan]:
        """What the policies of `directory` (default: the policy directory as it is now) would change
        on each running container; nothing is written."""
        try:
            candidate = policy.load_directory(directory or self.directory, must_exist=directory is not None)
        except policy.PolicyError as error:
            raise Invalid(f"{directory or self.directory} has errors:\n{error}") from None
        return on_records.diff(candidate, self.state_dir)

    def explain(self, name: str) -> Explanation:
        armed = self.armed.get(name)
        actions = None
        if armed is not None:
            actions = [f"{located.source}: {action.when.kind()} -> {action.do.kind()} (at most every "
                       f"{action.at_most_every:g} s)" for located, _, action in armed.actions]  # fmt: skip
        try:
            return on_records.explain(name, self.active, self.state_dir, actions)
        except LookupError as error:
            raise NotFound(str(error)) from None

    def _apply(self, name: str) -> PolicyPlan:
        managed = self.hooks.find(name)
        if managed is None:  # a foreground run: its limits follow the set; no guards, no actions
            return on_records.apply(name, self.active, self.state_dir)
        with managed.lock:
            plan = on_records.apply(name, self.active, self.state_dir)
            if plan.changes:
                self.hooks.emit("update", name, {c.limit: str(c.new) for c in plan.changes})
            if managed.info.state in ("running", "frozen") and managed.group is not None:
                self.arm(managed)
            return plan

    # --- a container's attempt ---

    def arm(self, managed: Managed) -> None:
        """Guard the files its policies set and arm their actions (call with managed.lock held, the
        container running); again after each change of its limits."""
        try:
            self._arm(managed)
        except (OSError, ValueError, fs.CgroupError) as error:  # a policy never fails a container
            log.error("%s: its policies' guards and actions are not armed: %s", managed.info.name, error)

    def _arm(self, managed: Managed) -> None:
        name, group = managed.info.name, managed.group
        assert group is not None
        record = state.read(state.record_path(self.state_dir, name))
        sources = (record.get("policy") or {}).get("sources", {})
        applied = set((record.get("policy") or {}).get("applied", []))
        managed.info.policies = sorted(applied)
        previous = self.armed.get(name)
        armed = Armed(self.last_fired.setdefault(name, {}), memory_high=_high(group))
        for leaf, source in sources.items():
            file = limits_table.leaf_file(leaf)
            if file is None:  # the network's (bandwidth): no file to guard
                continue
            with contextlib.suppress(fs.CgroupError):
                armed.guarded[file] = (group.read(file), source.partition(" (")[0])
        self.hooks.watch(name, group, tuple(armed.guarded))
        for located in self.active.policies:
            if located.source in applied:
                armed.actions += [
                    (located, index, action) for index, action in enumerate(located.policy.actions)
                ]
        self._disarm_triggers(previous)
        for located, index, action in armed.actions:
            condition = action.when.pressure
            if condition is None:
                continue
            key = (name, located.order, index)
            try:
                window = int(condition.window * 1_000_000)
                fd = pressure.open_trigger(
                    group, condition.resource, condition.kind, int(window * condition.above / 100), window
                )
            except (fs.CgroupError, ValueError) as error:
                log.error("%s: %s: pressure action not armed: %s", name, located.source, error)
                continue
            self.poller.add(key, fd)
            armed.triggers.append(key)
        self.armed[name] = armed

    def forget(self, name: str) -> None:
        """The container is gone: its rate limits with it."""
        self.disarm(name)
        self.last_fired.pop(name, None)

    def disarm(self, name: str) -> Armed | None:
        armed = self.armed.pop(name, None)
        self._disarm_triggers(armed)
        return armed

    def _disarm_triggers(self, armed: Armed | None) -> None:
        for key in armed.triggers if armed else []:
            self.poller.remove(key)

    def ended(self, managed: Managed, attributes: dict[str, str], oom_unseen: bool) -> None:
        """The attempt ended (call with managed.lock held, before the restart decision): its OOM kill
        if the watcher missed it, then its exit, fire their actions."""
        armed = self.disarm(managed.info.name)
        if armed is None:
            return
        if oom_unseen:
            self._fire(managed, armed, "oom_kill", {"oom_kills": "1"})
        self._fire(managed, armed, "exit", attributes)

    # --- the kernel's events ---

    def memory_events(self, managed: Managed, new_oom_kills: bool) -> None:
        armed = self.armed.get(managed.info.name)
        if armed is None or managed.group is None:
            return
        if new_oom_kills:
            self._fire(managed, armed, "oom_kill", {"oom_kills": str(managed.oom_kills)})
        high = _high(managed.group)
        if high > armed.memory_high:
            armed.memory_high = high
            self._fire(managed, armed, "memory_high", {"high_events": str(high)})

    def file_changed(self, managed: Managed, file: str) -> None:
        """Drift: put back a guarded file that someone changed."""
        with managed.lock:
            armed = self.armed.get(managed.info.name)
            if armed is None or file not in armed.guarded or managed.group is None:
                return
            group, (expected, source) = managed.group, armed.guarded[file]
            try:
                found = group.read(file)
                if found == expected:
                    return
                record = state.read(state.record_path(self.state_dir, managed.info.name))
                limits = Limits.model_validate(record["spec"]["limits"])
                from cgctl.runtime.update import file_settings

                for setting_file, value in file_settings(group, limits):
                    if setting_file == file:
                        group.write(file, value)
                restored = group.read(file)
            except (fs.CgroupError, OSError, ValueError) as error:
                log.warning("%s: %s changed by hand and not put back: %s", managed.info.name, file, error)
                return
        self.drift_corrected[source] += 1
        self.hooks.emit(
            "policy-drift",
            managed.info.name,
            {"file": file, "found": found.strip()[:80], "restored": restored.strip()[:80], "policy": source},
        )

    def _pressure(self, key: object) -> None:
        name, order, number = typing.cast(tuple[str, int, int], key)
        managed = self.hooks.find(name)
        armed = self.armed.get(name)
        if managed is None or armed is None:
            return
        for located, index, action in armed.actions:
            if located.order == order and index == number and action.when.pressure is not None:
                self._take(
                    managed, armed, located, index, action, {"resource": action.when.pressure.resource}
                )

    def _fire(self, managed: Managed, armed: Armed, when: str, attributes: dict[str, str]) -> None:
        for located, index, action in armed.actions:
            if action.when.kind() == when:
                self._take(managed, armed, located, index, action, attributes)

    def _take(
        self,
        managed: Managed,
        armed: Armed,
        located: Located,
        index: int,
        action: Action,
        attributes: dict[str, str],
    ) -> None:
        """Do the action unless it was done less than at_most_every ago for this container."""
        now = time.monotonic()
        last = armed.last_fired.get((located.source, index))
        if last is not None and now - last < action.at_most_every:
            log.debug(
                "%s: %s action %d held back by its rate limit", managed.info.name, located.source, index
            )
            return
        armed.last_fired[(located.source, index)] = now
        event = {
            "time": time.time(),
            "container": managed.info.name,
            "policy": located.source,
            "when": action.when.kind(),
            "do": action.do.kind(),
            "attributes": attributes,
        }
        run = self._run_command if action.do.run is not None else self._act
        threading.Thread(target=run, args=(managed, located, action, event), daemon=True).start()

    def _act(self, managed: Managed, located: Located, action: Action, event: dict[str, Any]) -> None:
        name, do = managed.info.name, action.do
        try:
            if do.set is not None:
                self._set(managed, do.set.model_dump(mode="json", exclude_unset=True))
                result = "set " + " ".join(_flat(do.set.model_dump(mode="json", exclude_unset=True)))
            elif do.freeze:
                self.hooks.freeze(name, 10.0)
                result = "frozen"
            elif do.thaw:
                self.hooks.thaw(name, 10.0)
                result = "thawed"
            elif do.kill is not None:
                result = f"{self.hooks.kill(name, do.kill)} processes sent {do.kill}"
            else:
                self.hooks.restart(managed)
                result = "restarting"
        except Exception as error:  # an action must never take the daemon's threads down
            result = f"failed: {error}"
        self._done(managed, located, action, event, result)

    def _set(self, managed: Managed, fields: dict[str, Any]) -> None:
        from cgctl.runtime.update import merge, set_limits

        state_dir = self.state_dir
        with managed.lock:
            record = state.read(state.record_path(state_dir, managed.info.name))
            overrides = merge(record.get("action_limits") or {}, fields)
            wanted = on_records.resolution(
                {**record, "action_limits": overrides}, managed.info.name, self.active
            )
            noted = {"action_limits": overrides, "policy": wanted.record()}
            set_limits(managed.info.name, wanted.limits, noted, state_dir)
            if managed.group is not None and managed.info.state in ("running", "frozen"):
                self.arm(managed)

    def _run_command(self, managed: Managed, located: Located, action: Action, event: dict[str, Any]) -> None:
        argv = action.do.run or []
        try:
            done = subprocess.run(
                argv,
                input=json.dumps(event).encode(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
                check=False,
                start_new_session=True,
            )
            result = f"{argv[0]} exited with {done.returncode}"
            if done.returncode:
                log.warning("%s: %s: %s: %s", managed.info.name, located.source, result,
                            done.stdout[-500:].decode(errors="replace").strip())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            result = f"{argv[0]} failed: {error}"
        self._done(managed, located, action, event, result)

    def _done(
        self, managed: Managed, located: Located, action: Action, event: dict[str, Any], result: str
    ) -> None:
        self.actions_taken[(located.source, action.do.kind())] += 1
        self.hooks.emit(
            "policy-action",
            managed.info.name,
            {"policy": located.source, "when": event["when"], "do": event["do"], "result": result,
             **{f"event_{key}": value for key, value in event["attributes"].items()}},
        )  # fmt: skip

    # --- the directory ---

    def _watch(self, watching: tuple[Path, int] | None) -> tuple[Path, int] | None:
        """The watch in force, (directory, descriptor): on the directory, or on its parent while it does
        not exist (neither exists: none, and the loop looks again every second)."""
        target = self.directory if self.directory.is_dir() else self.directory.parent
        if watching is not None and target == watching[0]:
            return watching
        try:
            descriptor = self.inotify.add_watch(target, DIRECTORY_EVENTS)
        except OSError:
            return watching
        if watching is not None:
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(watching[1])
        return target, descriptor

    def _watch_directory(self) -> None:
        """Flag every change in the directory, and its appearing or going; dot files (editors'
        temporary files) do not count."""
        while not self.closed:
            self.watching = self._watch(self.watching)
            if self.directory.is_dir() != self.was_directory:
                self.was_directory = not self.was_directory
                self.changed.set()
            for event in self.inotify.read(timeout=1000):  # the timeout bounds close() and the parent's case
                if self.watching is None or event.wd != self.watching[1]:
                    continue
                if self.watching[0] != self.directory or not event.name.startswith("."):
                    self.changed.set()

    def _reload_when_changed(self) -> None:
        while not self.closed:
            if not self.changed.wait(timeout=1.0):
                continue
            while self.changed.wait(timeout=SETTLE):  # until the directory is quiet
                self.changed.clear()
            with contextlib.suppress(Invalid):
                self.reload()

    def close(self) -> None:
        self.closed = True
        self.poller.close()

    # --- metrics ---

    def metrics(self) -> str:
        """The policy rows of the daemon's /metrics."""
        lines = [
            "# HELP cgctl_policy_actions_total Actions policies took, by policy and action.\n",
            "# TYPE cgctl_policy_actions_total counter\n",
            *(f'cgctl_policy_actions_total{{action="{kind}",policy="{_escape(source)}"}} {count}\n'
              for (source, kind), count in sorted(self.actions_taken.items())),
            "# HELP cgctl_policy_drift_corrections_total Guarded files changed by hand and put back.\n",
            "# TYPE cgctl_policy_drift_corrections_total counter\n",
            *(f'cgctl_policy_drift_corrections_total{{policy="{_escape(source)}"}} {count}\n'
              for source, count in sorted(self.drift_corrected.items())),
            "# HELP cgctl_policy_reloads_total Policy reloads by result.\n",
            "# TYPE cgctl_policy_reloads_total counter\n",
            *(f'cgctl_policy_reloads_total{{result="{result}"}} {count}\n'
              for result, count in sorted(self.reloads.items())),
            "# HELP cgctl_policy_last_reload_success Whether the last reload was applied (1) or not (0).\n",
            "# TYPE cgctl_policy_last_reload_success gauge\n",
            f"cgctl_policy_last_reload_success {int(self.status.ok)}\n",
            "# HELP cgctl_policy_last_reload_timestamp_seconds When the last reload was tried.\n",
            "# TYPE cgctl_policy_last_reload_timestamp_seconds gauge\n",
            f"cgctl_policy_last_reload_timestamp_seconds {self.status.reloaded_at or 0}\n",
            "# HELP cgctl_policy_policies Policies in force.\n",
            "# TYPE cgctl_policy_policies gauge\n",
            f"cgctl_policy_policies {len(self.active.policies)}\n",
        ]  # fmt: skip
        return "".join(lines)


def _high(group: fs.Cgroup) -> int:
    try:
        return group.read_keyed("memory.events").get("high", 0)
    except (fs.CgroupError, ValueError):
        return 0


def _flat(fields: dict[str, Any]) -> list[str]:
    from cgctl.limits import leaf_name, leaves

    return [f"{leaf_name(leaf)}={value}" for leaf, value in leaves(fields).items()]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
