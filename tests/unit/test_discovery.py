"""Host-wide discovery: what a cgroup's path says it is, which cgroups a selection walks, and what it refuses.

The walk runs over plain directories here (a cgroup's children are its subdirectories, its files are
files); the micro-VM's tests/integration/test_hostwide.py walks the real hierarchy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cgctl import discovery

ID = "0123456789abcdef" * 4
POD = "5d3e2f1a-8b7c-4d6e-9f0a-1b2c3d4e5f60"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", {}),
        ("/system.slice", {"unit": "system.slice", "slice": "-.slice"}),
        ("/system.slice/nginx.service", {"unit": "nginx.service", "slice": "system.slice"}),
        # a cgroup inside a unit is counted to the unit
        ("/system.slice/nginx.service/workers", {"unit": "nginx.service", "slice": "system.slice"}),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope",
            {"unit": "run-r1.scope", "slice": "app.slice"},
        ),
        (
            f"/system.slice/docker-{ID}.scope",
            {"runtime": "docker", "id": ID[:12]},
        ),
        (f"/docker/{ID}", {"runtime": "docker", "id": ID[:12]}),  # docker's cgroupfs driver
        (
            f"/machine.slice/libpod-{ID}.scope/container",
            {"runtime": "podman", "id": ID[:12]},
        ),
        # conmon watches a container from beside it: it is a unit, not a container
        (
            f"/machine.slice/libpod-conmon-{ID}.scope",
            {"unit": f"libpod-conmon-{ID}.scope", "slice": "machine.slice"},
        ),
        (f"/system.slice/crio-{ID}.scope", {"runtime": "crio", "id": ID[:12]}),
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{ID}.scope",
            {
                "qos": "burstable",
                "pod_uid": POD,
                "runtime": "containerd",
                "id": ID[:12],
            },
        ),
        (
            f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice",
            {"qos": "guaranteed", "pod_uid": POD},
        ),
        (f"/kubepods/besteffort/pod{POD}/{ID}", {"qos": "besteffort", "pod_uid": POD, "id": ID[:12]}),
        (f"/kubepods/pod{POD}", {"qos": "guaranteed", "pod_uid": POD}),
        # pod-like names outside kubepods are nobody's pods
        (f"/pod{POD}", {}),
        ("/cgctl.slice/web", {"unit": "cgctl.slice", "slice": "-.slice"}),
    ],
)
def test_labels_say_what_the_path_is(path: str, expected: dict[str, str]) -> None:
    assert discovery.labels(path) == expected


def test_display_names() -> None:
    assert (
        discovery.display_name(discovery.labels(f"/machine.slice/libpod-{ID}.scope")) == f"podman:{ID[:12]}"
    )
    assert discovery.display_name({"pod_uid": POD, "qos": "burstable"}) == f"pod:{POD}"
    assert discovery.display_name(discovery.labels("/system.slice/nginx.service")) == "nginx.service"
    assert discovery.display_name({}) == ""


def make_tree(mount: Path, *paths: str) -> None:
    mount.mkdir()
    (mount / "cgroup.procs").touch()
    for path in paths:
        directory = mount
        for name in path.strip("/").split("/"):
            directory = directory / name
            directory.mkdir(exist_ok=True)
            (directory / "cgroup.procs").touch()
            (directory / "cpu.stat").write_text("usage_usec 1\n")


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    make_tree(root, "/system.slice/a.service", "/system.slice/b.service/sub", "/kubepods.slice/x", "/other")
    return root


def walked(selection: discovery.Selection, mount: Path) -> list[str]:
    return [path for _, path in discovery.walk(selection, mount)]


def test_walk_lists_parents_before_children_and_skips_files(mount: Path) -> None:
    assert walked(discovery.select(mount), mount) == [
        "/",
        "/kubepods.slice",
        "/kubepods.slice/x",
        "/other",
        "/system.slice",
        "/system.slice/a.service",
        "/system.slice/b.service",
        "/system.slice/b.service/sub",
    ]


def test_depth_root_and_globs_select(mount: Path) -> None:
    assert walked(discovery.select(mount, max_depth=0), mount) == ["/"]
    assert walked(discovery.select(mount, max_depth=1), mount) == [
        "/",
        "/kubepods.slice",
        "/other",
        "/system.slice",
    ]
    # paths stay as /proc/PID/cgroup writes them, whatever the root; depth counts from the root
    assert walked(discovery.select(mount, root=mount / "system.slice", max_depth=1), mount) == [
        "/system.slice",
        "/system.slice/a.service",
        "/system.slice/b.service",
    ]
    assert walked(discovery.select(mount, include=("/system.slice/*",)), mount) == [
        "/system.slice/a.service",
        "/system.slice/b.service",
        "/system.slice/b.service/sub",
    ]
    # an exclude glob ending in * drops a subtree; the walk goes on below a cgroup it drops
    assert walked(discovery.select(mount, exclude=("/system.slice*", "/")), mount) == [
        "/kubepods.slice",
        "/kubepods.slice/x",
        "/other",
    ]
    assert walked(discovery.select(mount, include=("*/sub",)), mount) == ["/system.slice/b.service/sub"]


def test_a_cgroup_removed_during_the_walk_is_skipped(mount: Path) -> None:
    walk = discovery.walk(discovery.select(mount), mount)
    assert next(walk)[1] == "/"
    for directory in sorted((mount / "other").rglob("*"), reverse=True):
        directory.unlink()
    (mount / "other").rmdir()
    assert "/other" not in [path for _, path in walk]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"root": Path("/tmp")},
            "invalid value '/tmp' for --cgroup-root: not a cgroup of the cgroup2 hierarchy",
        ),
        ({"max_depth": -1}, "invalid value -1 for --max-depth: a depth is 0 (the root alone) or more"),
        (
            {"include": ("system.slice",)},
            "invalid value 'system.slice' for --include: cgroup paths start with /",
        ),
        ({"exclude": ("x*",)}, "invalid value 'x*' for --exclude: cgroup paths start with /"),
    ],
)
def test_select_refuses_what_cannot_match(mount: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(discovery.SelectionError) as error:
        discovery.select(mount, **kwargs)  # type: ignore[arg-type]
    assert str(error.value).startswith(message)


def test_a_cgroup_path_given_for_a_root_gets_a_hint(mount: Path) -> None:
    with pytest.raises(discovery.SelectionError, match=f"did you mean {mount}/system.slice"):
        discovery.select(mount, root=Path("/system.slice"))


def test_a_root_inside_the_mount_may_be_given_through_a_symlink(mount: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(mount / "system.slice")
    assert discovery.select(mount, root=tmp_path / "link").root == mount / "system.slice"
