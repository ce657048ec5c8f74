"""Policy files on a real kernel: applied live when they appear, change and go, refused whole when bad,
explained, kept applied against changes by hand, and their actions fired by real pressure and OOM."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl import policy, runtime
from cgctl.runtime.api import CreateRequest, RestartPolicy
from tests.integration.daemon import Daemon
from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    MiB,
    allocate,
    busy_loop_share,
    cgctl_in_process,
    spec,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("no_leaks")
SLEEP = ["/bin/sleep", "3600"]
STRESS = ["/usr/bin/stress-ng", "--vm", "1", "--vm-bytes", "64M", "--vm-keep", "--timeout", "600s", "--quiet"]


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """A daemon watching its own policy directory."""
    directory = tmp_path_factory.mktemp("policy-daemon")
    policy_dir = directory / "policies.d"
    policy_dir.mkdir()
    started = Daemon(directory)
    started.start("--policy-dir", str(policy_dir))
    try:
        yield started, policy_dir
    finally:
        started.clean_up()


@pytest.fixture
def clean_dir(policies: tuple[Daemon, Path]) -> Iterator[tuple[Daemon, Path]]:
    daemon, directory = policies
    yield daemon, directory
    for file in directory.iterdir():
        file.unlink()
    for container in daemon.api.list(all=True):
        daemon.api.remove(container.name, force=True)


def limit(name: str, file: str) -> str:
    return (CGCTL_ROOT / name / file).read_text().strip()


def start(daemon: Daemon, name: str, command: list[str], **fields: object) -> None:
    request = CreateRequest.model_validate({"spec": {"name": name, "command": command, **fields}})
    daemon.api.create(request)


def write(directory: Path, file: str, text: str) -> None:
    """As an editor saves: a new file renamed into place."""
    temporary = directory / f".{file}.tmp"
    temporary.write_text(text)
    temporary.rename(directory / file)


def events(daemon: Daemon, since: float, kind: str) -> list[dict[str, object]]:
    return [e.model_dump() for e in daemon.api.events(since=since, until=time.time()) if e.type == kind]


def test_memory_max_follows_a_policy_file_as_it_appears_changes_and_goes(
    clean_dir: tuple[Daemon, Path],
) -> None:
    daemon, directory = clean_dir
    start(daemon, "web-1", SLEEP, labels={"tier": "web"})
    assert limit("web-1", "memory.max") == "max"
    began = time.time()
    web = "policies:\n  - name: web\n    match: {labels: {tier: web}}\n    limits: {memory: {max: %s}}\n"
    write(directory, "10-web.yaml", web % "256M")
    wait_for(lambda: limit("web-1", "memory.max") == str(256 * MiB), "the new policy to apply")
    write(directory, "10-web.yaml", web % "128M")
    wait_for(lambda: limit("web-1", "memory.max") == str(128 * MiB), "the changed policy to apply")
    assert daemon.api.inspect("web-1").policies == ["10-web.yaml:web"]
    (directory / "10-web.yaml").unlink()
    wait_for(lambda: limit("web-1", "memory.max") == "max", "the removed policy's limit to go")
    wait_for(lambda: len(events(daemon, began, "policy-reload")) == 3, "an event for each reload")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)  # `systemctl reload cgctld`
    wait_for(lambda: len(events(daemon, began, "policy-reload")) == 4, "the reload on SIGHUP")
    reloads = events(daemon, began, "policy-reload")
    assert [e["attributes"]["result"] for e in reloads] == ["applied"] * 4  # type: ignore[index]
    # A new container gets its policy before its first instruction: its limit is there at once.
    write(directory, "10-web.yaml", web % "64M")
    wait_for(lambda: daemon.api.explain("web-1").policies == ["10-web.yaml:web"], "the reload")
    start(daemon, "web-2", ["/bin/cat", "/sys/fs/cgroup/memory.max"], labels={"tier": "web"})
    assert daemon.api.wait("web-2", timeout=60).exit_code == 0
    assert [line.text for line in daemon.api.logs("web-2")] == [str(64 * MiB)]


def test_an_invalid_file_is_refused_whole_and_the_active_policies_stay(
    clean_dir: tuple[Daemon, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    daemon, directory = clean_dir
    start(daemon, "steady", SLEEP)
    write(directory, "10-all.yaml", "policies:\n  - name: all\n    limits: {memory: {max: 128M}}\n")
    wait_for(lambda: limit("steady", "memory.max") == str(128 * MiB), "the policy")
    bad = "policies:\n  - name: broken\n    limits:\n      memory: {max: 12Q}\n"
    write(directory, "20-bad.yaml", bad + "  - name: other\n    limits: {pids: {max: 10}}\n")
    wait_for(
        lambda: not daemon.cli(capfd, "policy", "status", "--json")[1].count('"ok": true'), "the refusal"
    )
    status = json.loads(daemon.cli(capfd, "policy", "status", "--json")[1])
    assert status["problems"] == [
        f"{directory}/20-bad.yaml:4:21: policies[0].limits.memory.max: '12Q': not a size: use bytes or "
        "K/M/G/T with an optional iB (256M, 256MiB, 1.5G), or max"
    ]
    assert limit("steady", "memory.max") == str(128 * MiB) and limit("steady", "pids.max") == "max"
    code, _, err = cgctl_in_process(capfd, "policy", "validate", str(directory))
    assert code == 1 and f"{directory}/20-bad.yaml:4:21: policies[0].limits.memory.max" in err
    code, _, err = daemon.cli(capfd, "policy", "apply")
    assert code == 1 and "the active ones stay in force" in err and "20-bad.yaml:4:21" in err
    assert limit("steady", "memory.max") == str(128 * MiB)


def test_explain_names_the_winner_and_the_overridden_and_diff_writes_nothing(
    clean_dir: tuple[Daemon, Path], capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    daemon, directory = clean_dir
    write(directory, "10-tier.yaml", "policies:\n  - name: tier\n    match: {labels: {tier: web}}\n"
          "    priority: batch\n    limits: {memory: {max: 512M}, pids: {max: 64}}\n")  # fmt: skip
    one = "policies:\n  - name: one\n    match: {name: api-*, labels: {tier: web}}\n"
    write(directory, "20-one.yaml", one + "    limits: {memory: {max: 256M}}\n")
    wait_for(lambda: len(daemon.api.policy_status().policies) == 2, "both policies")
    start(daemon, "api-1", SLEEP, labels={"tier": "web"}, limits={"pids": {"max": 50}})
    explained = {item.limit: item for item in daemon.api.explain("api-1").limits}
    assert explained["memory.max"].source == "20-one.yaml:one" and explained["memory.max"].value == 256 * MiB
    assert [(o.value, o.source) for o in explained["memory.max"].overridden] == [
        (512 * MiB, "10-tier.yaml:tier")
    ]
    assert explained["pids.max"].source == "explicit"
    assert [o.source for o in explained["pids.max"].overridden] == ["10-tier.yaml:tier"]
    assert explained["cpu.weight"].source == "10-tier.yaml:tier (priority batch)"
    assert (limit("api-1", "memory.max"), limit("api-1", "pids.max"), limit("api-1", "cpu.weight")) == (
        str(256 * MiB), "50", "25"
    )  # fmt: skip
    code, out, _ = daemon.cli(capfd, "policy", "explain", "api-1")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert code == 0 and rows["memory.max"] == [
        "memory.max", "256", "MiB", "20-one.yaml:one", "512", "MiB", "from", "10-tier.yaml:tier"
    ]  # fmt: skip
    # diff: what a staged set without the specific policy would do, without doing it.
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "10-tier.yaml").write_text((directory / "10-tier.yaml").read_text())
    code, out, err = daemon.cli(capfd, "policy", "diff", str(staged), "--json")
    assert code == 0, err
    plans = {plan["name"]: plan for plan in json.loads(out)}
    assert plans["api-1"]["changes"] == [
        {"limit": "memory.max", "old": 256 * MiB, "new": 512 * MiB, "source": "10-tier.yaml:tier"}
    ]
    assert limit("api-1", "memory.max") == str(256 * MiB)
    code, _, err = daemon.cli(capfd, "policy", "diff", str(tmp_path / "nowhere"))
    assert code == 1 and "no such directory" in err
    (directory / "20-one.yaml").unlink()
    wait_for(lambda: limit("api-1", "memory.max") == str(512 * MiB), "the reload after the removal")


def test_a_limit_changed_by_hand_is_put_back(clean_dir: tuple[Daemon, Path]) -> None:
    daemon, directory = clean_dir
    write(
        directory,
        "10-guard.yaml",
        "policies:\n  - name: guard\n    limits: {memory: {max: 256M}, pids: {max: 40}}\n",
    )
    wait_for(lambda: daemon.api.policy_status().policies == ["10-guard.yaml:guard"], "the policy")
    start(daemon, "guarded", SLEEP)
    assert limit("guarded", "memory.max") == str(256 * MiB)
    began = time.time()
    (CGCTL_ROOT / "guarded" / "memory.max").write_text("max")
    wait_for(lambda: limit("guarded", "memory.max") == str(256 * MiB), "the policy's value to come back", 10)
    took = time.time() - began
    drift = events(daemon, began, "policy-drift")
    assert [e["attributes"] for e in drift] == [
        {"file": "memory.max", "found": "max", "restored": str(256 * MiB), "policy": "10-guard.yaml:guard"}
    ]
    print(f"drift corrected in {took:.3f} s")
    metrics = subprocess.run(["curl", "-s", "--unix-socket", str(daemon.socket), "http://x/metrics"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert 'cgctl_policy_drift_corrections_total{policy="10-guard.yaml:guard"} 1' in metrics
    info = next(line for line in metrics.splitlines() if line.startswith("cgctl_container_info{")
                and 'container="guarded"' in line)  # fmt: skip
    assert 'policy="10-guard.yaml:guard"' in info
    # An explicit update is the user's: it is not put back.
    daemon.api.update("guarded", {"pids": {"max": 30}})
    (CGCTL_ROOT / "guarded" / "pids.max").write_text("35")
    time.sleep(1)
    assert limit("guarded", "pids.max") == "35"


def test_pressure_actions_fire_under_real_memory_pressure_within_their_rate_limit(
    clean_dir: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, directory = clean_dir
    log = tmp_path / "fired.jsonl"
    write(directory, "10-pressure.yaml", f"""
policies:
  - name: squeeze
    match: {{name: squeezed-*}}
    limits: {{memory: {{high: 16M, max: 512M}}}}
  - name: log
    match: {{name: squeezed-logged}}
    actions:
      - when: {{pressure: {{resource: memory, above: 10%, window: 1s}}}}
        do: {{run: [/bin/sh, -c, "cat >> {log}; echo >> {log}"]}}
        at_most_every: 4s
  - name: relieve
    match: {{name: squeezed-relieved}}
    actions:
      - when: {{pressure: {{resource: memory, above: 10%, window: 1s}}}}
        do: {{set: {{memory: {{high: 1G}}}}}}
""")  # fmt: skip
    wait_for(lambda: len(daemon.api.policy_status().policies) == 3, "the policies")
    began = time.time()
    start(daemon, "squeezed-logged", STRESS)
    start(daemon, "squeezed-relieved", STRESS)
    wait_for(lambda: limit("squeezed-relieved", "memory.high") == str(1 << 30), "the relief action", 60)

    def relief() -> list[dict[str, object]]:
        return [e for e in events(daemon, began, "policy-action") if e["name"] == "squeezed-relieved"]

    wait_for(lambda: bool(relief()), "the relief action's event")
    relieved = relief()
    assert relieved[0]["attributes"]["result"] == "set memory.high=1073741824"  # type: ignore[index]
    print(f"pressure to relief: {relieved[0]['time'] - began:.2f} s after the start")  # type: ignore[operator]
    explained = {item.limit: item for item in daemon.api.explain("squeezed-relieved").limits}
    assert explained["memory.high"].source == "action" and explained["memory.high"].value == 1 << 30
    time.sleep(14)
    daemon.api.remove("squeezed-logged", force=True)
    fired = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert fired and all(f["container"] == "squeezed-logged" and f["when"] == "pressure" for f in fired)
    assert fired[0]["policy"] == "10-pressure.yaml:log" and fired[0]["attributes"] == {"resource": "memory"}
    times = [f["time"] for f in fired]
    assert all(later - earlier >= 4 for earlier, later in itertools.pairwise(times)), times
    assert 2 <= len(fired) <= (times[-1] - times[0]) // 4 + 1, times  # held back, yet still firing
    logged = [e for e in events(daemon, began, "policy-action") if e["name"] == "squeezed-logged"]
    assert len(logged) == len(fired) and all("exited with 0" in e["attributes"]["result"] for e in logged)  # type: ignore[index]


def test_an_oom_kill_action_restarts_the_container_once_per_rate_limit(
    clean_dir: tuple[Daemon, Path],
) -> None:
    daemon, directory = clean_dir
    oom = "policies:\n  - name: revive\n    match: {name: oomer}\n    limits: {memory: {max: 64M}}\n"
    write(
        directory,
        "10-oom.yaml",
        oom + "    actions:\n      - {when: oom_kill, do: restart, at_most_every: 1h}\n",
    )
    wait_for(lambda: daemon.api.policy_status().policies == ["10-oom.yaml:revive"], "the policy")
    began = time.time()
    daemon.api.create(CreateRequest(spec=spec(allocate(200), name="oomer"), restart=RestartPolicy(name="no")))

    def revived_and_ended() -> bool:
        container = daemon.api.inspect("oomer")
        return container.state == "exited" and container.restart_count == 1

    wait_for(revived_and_ended, "one restart, then the end", 120)
    container = daemon.api.inspect("oomer")
    assert [a.oom_killed for a in container.attempts] == [True, True]
    actions = events(daemon, began, "policy-action")
    assert [(e["attributes"]["do"], e["attributes"]["result"]) for e in actions] == [
        ("restart", "restarting")
    ]  # type: ignore[index]


def test_a_foreground_run_gets_its_policy_without_a_daemon(tmp_path: Path) -> None:
    directory = tmp_path / "policies.d"
    directory.mkdir()
    fg = "policies:\n  - name: fg\n    match: {command: cat}\n    limits: {memory: {max: 96M}}\n"
    (directory / "10-fg.yaml").write_text(fg + "    actions:\n      - {when: exit, do: {run: [/bin/true]}}\n")
    env = {**os.environ, "CGCTL_POLICY_DIR": str(directory)}
    done = subprocess.run([PYTHON, "-m", "cgctl", "run", "--", "/bin/cat", "/sys/fs/cgroup/memory.max"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, f"{96 * MiB}\n"), done.stderr
    assert "only the daemon (cgctld) takes the actions of 10-fg.yaml:fg" in done.stderr
    (directory / "20-bad.yaml").write_text("policies:\n  - name: bad\n    priority: urgent\n")
    done = subprocess.run([PYTHON, "-m", "cgctl", "run", "--", "/bin/true"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert (
        done.returncode == 125
        and f"{directory}/20-bad.yaml:3:15: policies[0].priority: 'urgent'" in done.stderr
    )


def test_two_priority_classes_share_a_contended_cpu_by_their_weights(tmp_path: Path) -> None:
    """default (cpu.weight 100) against batch (25): 4 to 1, within 20%."""
    (tmp_path / "10-classes.yaml").write_text(
        "policies:\n  - {name: normal, match: {labels: {class: default}}, priority: default}\n"
        "  - {name: low, match: {labels: {class: batch}}, priority: batch}\n"
    )
    active = policy.load_directory(tmp_path)
    began = time.time() + 5
    shares = {kind: tmp_path / f"share-{kind}" for kind in ("default", "batch")}
    runs = [
        threading.Thread(
            target=runtime.run,
            args=(spec(busy_loop_share(began, began + 8, shares[kind]), name=f"class-{kind}",
                       labels={"class": kind}, limits={"cpu": {"cpuset": "0"}}),),
            kwargs={"policies": active},
        )
        for kind in shares
    ]  # fmt: skip
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    high, low = (float(shares[kind].read_text()) for kind in ("default", "batch"))
    print(f"default {high:.3f}, batch {low:.3f}: {high / low:.2f} to 1")
    assert 3.2 <= high / low <= 4.8, (high, low)


def test_a_policy_directory_made_after_the_daemon_started_is_loaded(tmp_path: Path) -> None:
    """As on a fresh install: /etc/cgctl/policies.d does not exist until ops create it."""
    directory = tmp_path / "etc" / "policies.d"  # neither it nor its parent exists yet
    daemon = Daemon(tmp_path)
    daemon.start("--policy-dir", str(directory))
    try:
        start(daemon, "late", SLEEP)
        directory.mkdir(parents=True)
        (directory / "10-late.yaml").write_text("policies:\n  - name: late\n    limits: {pids: {max: 33}}\n")
        wait_for(lambda: limit("late", "pids.max") == "33", "the policy of the new directory")
        (directory / "10-late.yaml").unlink()
        directory.rmdir()
        wait_for(lambda: limit("late", "pids.max") == "max", "the policy to go with its directory")
    finally:
        daemon.clean_up()


def test_a_policy_sets_huge_pages_and_zswap_per_leaf_and_they_reset_when_it_goes(
    clean_dir: tuple[Daemon, Path],
) -> None:
    daemon, directory = clean_dir
    start(daemon, "huge-1", SLEEP, labels={"tier": "huge"}, limits={"hugetlb": {"2MB": "8M"}})
    assert limit("huge-1", "hugetlb.2MB.max") == str(8 * MiB)
    huge = "policies:\n  - name: huge\n    match: {labels: {tier: huge}}\n    limits: %s\n"
    write(directory, "10-huge.yaml", huge % "{hugetlb: {2MB: 16M}, memory: {zswap_max: 4M}}")
    wait_for(lambda: limit("huge-1", "memory.zswap.max") == str(4 * MiB), "the policy's zswap limit")
    explained = {item.limit: item for item in daemon.api.explain("huge-1").limits}
    assert explained["hugetlb[2MB]"].source == "explicit" and explained["hugetlb[2MB]"].value == 8 * MiB
    assert [o.source for o in explained["hugetlb[2MB]"].overridden] == ["10-huge.yaml:huge"]
    assert explained["memory.zswap_max"].source == "10-huge.yaml:huge"
    start(daemon, "huge-2", SLEEP, labels={"tier": "huge"})
    assert (limit("huge-2", "hugetlb.2MB.max"), limit("huge-2", "memory.zswap.max")) == (
        str(16 * MiB), str(4 * MiB)
    )  # fmt: skip
    (directory / "10-huge.yaml").unlink()
    wait_for(lambda: limit("huge-2", "hugetlb.2MB.max") == "max", "the removed policy's limits to go")
    assert limit("huge-2", "memory.zswap.max") == "max" and limit("huge-1", "hugetlb.2MB.max") == str(8 * MiB)
