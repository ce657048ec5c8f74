"""The default sandbox: what a workload may ask of the kernel and the host, beyond its limits.

Layers, each closing what the others leave open (runc's and docker's defaults, bubblewrap's and
nsjail's no_new_privs):

- capabilities: a root workload keeps a small set (spec.DEFAULT_CAPABILITIES) in its bounding,
  permitted, effective and inheritable sets, none ambient; a non-root --user has none effective;
  explicit sets (OCI process.capabilities) are taken exactly, whatever the user, as runc does;
- no_new_privs: setuid programs and file capabilities grant nothing on exec;
- seccomp: an allowlist of system calls (seccomp-default.json, docker's profile format), built by
  libseccomp in the supervisor and installed as the last step before exec;
- kernel paths: /proc and /sys files that reach the kernel masked or read-only (paths.py);
- devices: a cgroup device program (cgroup/devices.py), attached by the supervisor to the
  workload's cgroup before the workload joins it (default rules, or the spec's OCI ones).

`--privileged` turns every layer off. The supervisor makes the plan (every error is a SpecError
before anything exists); the workload's init enters it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cgctl import syscalls
from cgctl.cgroup import devices
from cgctl.sandbox import paths, seccomp
from cgctl.spec import CAPABILITIES, Security, SpecError

CAP_LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


@dataclass(frozen=True)
class Plan:
    """Everything the workload's init needs to enter the sandbox, decided by the supervisor."""

    capabilities: int  # bit N = capability N: what a root workload keeps
    bounding_drop: tuple[int, ...]  # capabilities this kernel knows that the workload must not keep
    no_new_privileges: bool
    seccomp: seccomp.Filter | None
    masked: tuple[str, ...] = ()  # kernel paths to hide (paths.py)
    read_only: tuple[str, ...] = ()  # and to write-protect
    sets: tuple[int, int, int, int] | None = None  # explicit (effective, permitted, inheritable, ambient)


def plan(security: Security) -> Plan:
    """The sandbox a spec asks for, checked against this host (its capabilities, the seccomp profile);
    raises SpecError naming the field and value before anything is created."""
    last = _last_capability()
    kept = security.capabilities()
    named: list[tuple[tuple[str | int, ...], str]] = [
        (("security", "cap_add", index), name) for index, name in enumerate(security.cap_add)
    ]
    sets = security.capability_sets
    for kind in ("bounding", "effective", "inheritable", "permitted", "ambient") if sets else ():
        named += [
            (("security", "capability_sets", kind, i), name) for i, name in enumerate(getattr(sets, kind))
        ]
    for field, name in named:
        if CAPABILITIES.index(name) > last:
            reason = f"this kernel does not know it (its last capability is {CAPABILITIES[last]})"
            raise SpecError(field, name, reason)
    kept = [name for name in kept if CAPABILITIES.index(name) <= last]
    mask = sum(1 << CAPABILITIES.index(name) for name in kept)
    masked = paths.MASKED if security.masked_paths is None else tuple(security.masked_paths)
    read_only = paths.READ_ONLY if security.readonly_paths is None else tuple(security.readonly_paths)
    if security.privileged:
        return Plan(
            mask, (), False, None, tuple(security.masked_paths or ()), tuple(security.readonly_paths or ())
        )
    compiled = None
    if security.seccomp != seccomp.UNCONFINED:
        compiled = seccomp.filter_for(security.seccomp, kept)
    return Plan(
        capabilities=mask,
        bounding_drop=tuple(cap for cap in range(last + 1) if not mask >> cap & 1),
        no_new_privileges=security.no_new_privileges,
        seccomp=compiled,
        masked=masked,
        read_only=read_only,
        sets=None if sets is None else tuple(sets.mask(kind) for kind in _SETS),  # type: ignore[arg-type]
    )


_SETS = ("effective", "permitted", "inheritable", "ambient")


def device_rules(security: Security) -> tuple[devices.Rule, ...] | None:
    """The devices the workload may use (None: all, when privileged); a --device that is not a device
    node on this host raises SpecError."""
    if security.privileged:
        return None
    rules = list(devices.DEFAULT_RULES) if security.device_rules is None else _oci_rules(security)
    for node in security.device_nodes:
        if node.type != "p":
            rules.append(devices.Rule("b" if node.type == "b" else "c", node.major, node.minor, "rwm"))
    for index, device in enumerate(security.devices):
        try:
            rules.append(devices.rule_for(device.path, device.access))
        except ValueError as error:
            raise SpecError(("security", "devices", index), device.path, str(error)) from None
    return tuple(rules)


def _oci_rules(security: Security) -> list[devices.Rule]:
    """The OCI rules over deny-all, in order, as allow rules: cgctl's program only allows, so a deny
    may only take back everything allowed so far (type a, any major and minor, rwm: runc's first
    rule); a narrower deny is refused by name."""
    rules: list[devices.Rule] = []
    for index, rule in enumerate(security.device_rules or ()):
        if rule.allow:
            rules.append(devices.Rule(rule.type, rule.major, rule.minor, rule.access))
        elif (rule.type, rule.major, rule.minor, set(rule.access)) == ("a", None, None, set("rwm")):
            rules.clear()
        elif rules:
            raise SpecError(
                ("security", "device_rules", index),
                f"deny {rule.type} {rule.major}:{rule.minor} {rule.access}",
                "cgctl's device program cannot take back part of what earlier rules allowed: "
                "deny everything (type a, rwm), or leave the allow rules out",
            )
    return rules


@functools.cache
def _last_capability() -> int:
    """The number of the last capability this kernel knows (it does not change while it runs)."""
    return int(CAP_LAST_CAP.read_text())


def enter(plan: Plan, identity: tuple[int, int] | None, groups: tuple[int, ...] = ()) -> None:
    """Drop to the plan's privileges and become identity (uid, gid) if given, with the supplementary
    groups: the workload's last steps before exec, in the one order that works. Without no_new_privs,
    loading a seccomp filter needs CAP_SYS_ADMIN, so the filter goes in first (then the profile must
    allow what follows: capset, setuid, prctl; the default one does)."""
    if plan.no_new_privileges:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    elif plan.seccomp:
        seccomp.install(plan.seccomp)
    for cap in plan.bounding_drop:
        syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    if plan.sets is not None:
        syscalls.prctl(syscalls.PR_SET_KEEPCAPS, 1)  # explicit sets hold for any user
    if identity is not None:
        uid, gid = identity
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)  # to a non-root uid: the kernel empties the permitted and effective sets
    elif groups:
        os.setgroups(list(groups))
    if plan.sets is not None:
        effective, permitted, inheritable, ambient = plan.sets
        syscalls.capset(effective, permitted, inheritable)
        for cap in range(ambient.bit_length()):
            if ambient >> cap & 1:
                syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_RAISE, cap)
    elif os.geteuid() == 0:
        syscalls.capset(plan.capabilities, plan.capabilities, plan.capabilities)
    else:
        syscalls.capset(0, 0, 0)
    if plan.no_new_privileges and plan.seccomp:
        seccomp.install(plan.seccomp)
