"""config.json as cgctl's spec (runtime/bundle.py), and the OCI lifecycle's pure parts (container.py)."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cgctl.cgroup import fs
from cgctl.runtime import bundle, container
from cgctl.runtime.bundle import BundleError


@pytest.fixture(scope="module")
def runc_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What `runc spec` writes: the config every caller starts from."""
    directory = tmp_path_factory.mktemp("spec")
    if shutil.which("runc"):
        subprocess.run(["runc", "spec"], cwd=directory, check=True)
        return dict(json.loads((directory / "config.json").read_text()))
    from cgctl.runtime import oci_data  # type: ignore[attr-defined]  # cgctl's own, same shape

    return dict(oci_data.default_spec(rootless=False))


def _bundle(tmp_path: Path, config: dict[str, Any]) -> bundle.Bundle:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return bundle.load(tmp_path, "c1", tmp_path / "seccomp.json")


def test_runc_default_config_becomes_a_spec(tmp_path: Path, runc_config: dict[str, Any]) -> None:
    found = _bundle(tmp_path, runc_config)
    spec = found.spec
    assert spec.name == "c1" and spec.command == ["sh"] and spec.tty
    assert spec.user == "0:0" and spec.workdir == "/"
    assert spec.env["PATH"].startswith("/usr/local/sbin")
    assert spec.hostname == "runc"
    assert sorted(spec.namespaces.private()) == ["ipc", "mnt", "net", "pid", "uts"]
    assert spec.security.seccomp == "unconfined"  # OCI: no filter unless linux.seccomp says so
    assert spec.security.no_new_privileges is True
    assert "CAP_KILL" in spec.security.capabilities() and "CAP_SYS_ADMIN" not in spec.security.capabilities()
    assert found.root == (tmp_path / "rootfs").resolve()


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("linux", "intelRdt"), {"closID": "x"}, "linux.intelRdt"),
        (("linux", "resources", "network"), {"classID": 1}, "linux.resources.network"),
        (("process", "selinuxLabel"), "system_u:x", "process.selinuxLabel"),
        (("hooks", "createContainer"), [{"path": "/bin/true"}], "hooks.createContainer"),
        (("hooks", "madeUp"), [{"path": "/bin/true"}], "hooks.madeUp"),
        (("linux", "resources", "memory"), {"disableOOMKiller": True}, "disableOOMKiller"),
        (("process", "env"), ["NOEQUALS"], "process.env"),
        (("root", "path"), "missing", "root.path"),
    ],
)
def test_unsupported_or_bad_fields_are_refused_by_name(
    tmp_path: Path, runc_config: dict[str, Any], path: tuple[str, ...], value: object, named: str
) -> None:
    config = copy.deepcopy(runc_config)
    target = config
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    with pytest.raises(BundleError, match=named.replace(".", r"\.")):
        _bundle(tmp_path, config)


def test_a_namespace_with_a_path_is_joined(tmp_path: Path, runc_config: dict[str, Any]) -> None:
    config = copy.deepcopy(runc_config)
    config["linux"]["namespaces"] = [{"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}]
    namespaces = _bundle(tmp_path, config).spec.namespaces
    assert namespaces.join == {"net": "/proc/1/ns/net"}
    assert namespaces.private() == ["mnt", "net"] and "net" not in namespaces.share  # joined: not the host's


def test_a_root_without_a_mount_namespace_is_refused(tmp_path: Path, runc_config: dict[str, Any]) -> None:
    config = copy.deepcopy(runc_config)
    config["linux"]["namespaces"] = [{"type": "pid"}]
    with pytest.raises(BundleError, match="its own mount namespace"):
        _bundle(tmp_path, config)


def test_resources_convert_as_runc_does() -> None:
    limits = bundle.limits_from_resources(
        {
            "memory": {"limit": 64 << 20, "reservation": 32 << 20, "swap": 96 << 20},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
            "pids": {"limit": -1},
            "blockIO": {"weight": 500},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
            "unified": {"memory.swap.high": "max"},
        }
    )
    assert limits["memory"] == {"max": 64 << 20, "low": 32 << 20, "swap_max": 32 << 20}
    assert limits["cpu"] == {"weight": 39, "cpus": "0.5", "cpuset": "0"}  # runc: shares 1024 -> weight 39
    assert limits["pids"] == {"max": "max"}
    assert limits["io"]["weight"] == [{"weight": 4950}]  # runc: 1 + (500 - 10) * 9999 // 990
    assert limits["hugetlb"] == {"2MB": 4 << 20}
    assert limits["files"] == {"memory.swap.high": "max"}
    assert bundle.limits_from_resources({"memory": {"limit": -1, "swap": -1}})["memory"] == {
        "max": "max",
        "swap_max": "max",
    }


def test_kubernetes_annotations_become_labels(tmp_path: Path, runc_config: dict[str, Any]) -> None:
    config = copy.deepcopy(runc_config)
    config["annotations"] = {
        "io.kubernetes.pod.name": "web-1",
        "io.kubernetes.pod.namespace": "prod",
        "x": "y",
    }
    found = _bundle(tmp_path, config)
    assert found.spec.labels == {"io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace": "prod"}
    assert found.annotations["x"] == "y"


def test_hooks_are_kept_in_order(tmp_path: Path, runc_config: dict[str, Any]) -> None:
    config = copy.deepcopy(runc_config)
    config["hooks"] = {"prestart": [{"path": "/bin/a"}, {"path": "/bin/b", "args": ["b", "1"], "timeout": 5}]}
    hooks = _bundle(tmp_path, config).hooks["prestart"]
    assert [(hook.path, hook.args, hook.timeout) for hook in hooks] == [
        ("/bin/a", ["/bin/a"], None),
        ("/bin/b", ["b", "1"], 5),
    ]


@pytest.fixture
def unified(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(fs, "open_unified_root", lambda controllers: fs.Cgroup(tmp_path))
    return tmp_path


def test_cgroups_path_is_placed_as_runc_places_it(unified: Path) -> None:
    assert container.cgroup_location("/default/c1", "c1", systemd=False) == (unified / "default", "c1")
    assert container.cgroup_location("", "c1", systemd=False) == (None, "c1")
    assert container.cgroup_location("machine-pods.slice:libpod:abc", "abc", systemd=True) == (
        unified / "machine.slice" / "machine-pods.slice",
        "libpod-abc.scope",
    )
    assert container.cgroup_location(":cri:abc", "abc", systemd=True) == (
        unified / "system.slice",
        "cri-abc.scope",
    )
    with pytest.raises(container.OciError, match="slice:prefix:name"):
        container.cgroup_location("/not/systemd", "c1", systemd=True)
    with pytest.raises(container.OciError, match="not a cgroup below"):
        container.cgroup_location("/../../etc", "c1", systemd=False)


def test_signals_are_taken_as_runc_takes_them() -> None:
    assert container.parse_signal("KILL") == signal.SIGKILL
    assert container.parse_signal("sigterm") == signal.SIGTERM
    assert container.parse_signal("9") == 9
    for bad in ("NOPE", "0", "999"):
        with pytest.raises(container.OciError, match="invalid signal"):
            container.parse_signal(bad)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", "a b"])
def test_bad_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(container.OciError, match="invalid id format"):
        container.create(tmp_path / "root", bad, tmp_path, container.Options())
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_runcs_allowed_devices_follow_the_configs_rules(tmp_path: Path, runc_config: dict[str, Any]) -> None:
    rules = _bundle(tmp_path, runc_config).spec.security.device_rules
    assert rules is not None
    assert (rules[0].allow, rules[0].type, rules[0].access) == (False, "a", "rwm")  # the config's deny-all
    assert any(rule.allow and (rule.major, rule.minor) == (1, 3) for rule in rules)  # /dev/null, as runc
    assert any(rule.allow and (rule.major, rule.minor) == (136, None) for rule in rules)  # the ptys


def test_a_profile_is_reduced_to_what_libseccomp_keeps() -> None:
    allow, refuse = "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"
    arg = [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]
    profile = {
        "defaultAction": refuse,
        "syscalls": [
            {"names": ["setns", "read"], "action": allow},
            {"names": ["setns"], "action": refuse, "errnoRet": 1},  # later, any arguments: the first wins
            {"names": ["clone"], "action": allow, "args": arg},
            {"names": ["clone", "write"], "action": refuse},  # any arguments wins over args
            {"names": ["read"], "action": allow, "args": arg},  # same action: both stay
        ],
    }
    kept = bundle.as_libseccomp_keeps(profile)["syscalls"]
    assert [(entry["names"], entry["action"]) for entry in kept] == [
        (["setns", "read"], allow),
        (["clone", "write"], refuse),
        (["read"], allow),
    ]


def test_a_bad_policy_file_fails_create_by_name_and_leaves_nothing(
    tmp_path: Path, runc_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-bad.yaml").write_text("policies:\n  - name: x\n    limits: {memory: {max: lots}}\n")
    monkeypatch.setenv("CGCTL_POLICY_DIR", str(policies))
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    _bundle(bundle_dir, {**runc_config, "process": {**runc_config["process"], "terminal": False}})
    with pytest.raises(container.OciError, match=r"10-bad\.yaml"):
        container.create(tmp_path / "root", "c1", bundle_dir, container.Options())
    assert list((tmp_path / "root").iterdir()) == []
