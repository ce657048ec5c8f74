"""The CNI plugins, called as the CNI specification says: one executable per plugin of a network's
conflist, its configuration on stdin (with `name`, `cniVersion`, the previous plugin's result as
`prevResult` and the capabilities it asked for in `runtimeConfig`), CNI_* variables in its
environment, and its result or its error as JSON on stdout. ADD runs the list in order, DEL in
reverse; a DEL goes on past a plugin's error so that as much as possible is released."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
VERSION = "1.0.0"
TIMEOUT = 120.0  # seconds for one plugin: they run in milliseconds, but a loaded emulated VM is slow
INSTALL = "install Debian's containernetworking-plugins package (apt-get install containernetworking-plugins)"


class CniError(RuntimeError):
    """A plugin failed; the message names the plugin, the command and the plugin's own words."""


def plugin_path() -> list[str]:
    """Where plugins are looked for: $CNI_PATH's directories, then Debian's and the usual one."""
    given = [part for part in os.environ.get("CNI_PATH", "").split(":") if part]
    return [*given, *PLUGIN_DIRS]


def find(plugin: str) -> str | None:
    return shutil.which(plugin, path=os.pathsep.join(plugin_path()))


def missing(conflist: dict[str, Any]) -> list[str]:
    """The plugins of the list this host lacks."""
    return [p["type"] for p in conflist["plugins"] if find(p["type"]) is None]


def add(
    conflist: dict[str, Any],
    container_id: str,
    netns: str,
    ifname: str,
    runtime: dict[str, Any],
    address: str | None = None,
    prev_result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """ADD the container to the network (asking host-local for `address`, if given); its result
    (interfaces, IPs, routes). prev_result: the result the list's first plugin gets (a list of
    chained plugins alone, after an earlier ADD). On a plugin's failure the whole list is deleted
    again before CniError is raised."""
    result = prev_result
    args = f"IgnoreUnknown=1;IP={address}" if address else ""
    try:
        for plugin in conflist["plugins"]:
            result = _call("ADD", conflist, plugin, container_id, netns, ifname, runtime, result, args)
    except CniError:
        delete(conflist, container_id, netns, ifname, runtime, result, quiet=True)
        raise
    return result or {}


def delete(
    conflist: dict[str, Any],
    container_id: str,
    netns: str,
    ifname: str,
    runtime: dict[str, Any],
    prev_result: dict[str, Any] | None,
    quiet: bool = False,
) -> None:
    """DEL the container from the network, every plugin in reverse order even after one failed (the
    first failure is raised at the end unless quiet). netns may be '' once it is gone: plugins
    release their leases and rules by container id then."""
    first: CniError | None = None
    for plugin in reversed(conflist["plugins"]):
        try:
            _call("DEL", conflist, plugin, container_id, netns, ifname, runtime, prev_result)
        except CniError as error:
            first = first or error
    if first is not None and not quiet:
        raise first


def check(
    conflist: dict[str, Any],
    container_id: str,
    netns: str,
    ifname: str,
    runtime: dict[str, Any],
    prev_result: dict[str, Any],
) -> None:
    """CHECK that the container's network is still as ADD left it (CniError if not)."""
    for plugin in conflist["plugins"]:
        _call("CHECK", conflist, plugin, container_id, netns, ifname, runtime, prev_result)


def _call(
    command: str,
    conflist: dict[str, Any],
    plugin: dict[str, Any],
    container_id: str,
    netns: str,
    ifname: str,
    runtime: dict[str, Any],
    prev_result: dict[str, Any] | None,
    args: str = "",
) -> dict[str, Any]:
    kind = plugin["type"]
    executable = find(kind)
    if executable is None:
        raise CniError(f"the CNI plugin {kind!r} is not in {':'.join(plugin_path())}: {INSTALL}")
    config = {**plugin, "name": conflist["name"], "cniVersion": conflist.get("cniVersion", VERSION)}
    asked = {cap for cap, on in plugin.get("capabilities", {}).items() if on}
    wanted = {cap: value for cap, value in runtime.items() if cap in asked}
    if wanted:
        config["runtimeConfig"] = wanted
    if prev_result is not None:
        config["prevResult"] = prev_result
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": args,
        "CNI_PATH": ":".join(plugin_path()),
    }
    try:
        done = subprocess.run(
            [executable], input=json.dumps(config).encode(), env=env, capture_output=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise CniError(f"the CNI plugin {kind} ({command}) did not answer in {TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise CniError(f"the CNI plugin {kind} failed ({command}): {_reason(done)}")
    if command != "ADD":
        return prev_result or {}
    try:
        answer = json.loads(done.stdout or b"{}")
    except ValueError:
        raise CniError(f"the CNI plugin {kind} ({command}) printed no JSON: {done.stdout[:200]!r}") from None
    return dict(answer) if answer else (prev_result or {})


def _reason(done: subprocess.CompletedProcess[bytes]) -> str:
    """The plugin's error: its JSON's msg and details (the spec's error format), else what it printed."""
    try:
        error = json.loads(done.stdout)
        return "; ".join(str(error[key]) for key in ("msg", "details") if error.get(key))
    except (ValueError, TypeError, AttributeError):
        text = (done.stdout + done.stderr).decode(errors="replace").strip()
        return text[-500:] or f"exit status {done.returncode}"
