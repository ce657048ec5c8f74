"""Accounting and the exporter against real workloads: true values, promtool, a real Prometheus."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from cgctl.exporter import make_server
from cgctl.metrics import ContainerCollector
from tests.integration.veth import SINK, SINK_PORT, send_udp, veth_into
from tests.integration.workloads import (
    PYTHON,
    Background,
    MiB,
    cgctl_in_process,
    wait_for,
    workload_pids,
)

EXPORTERS = Path(__file__).parents[2] / "exporters"
DISK = os.environ.get("CGCTL_VM_DISK", "/dev/vda")


@pytest.fixture
def background() -> Iterator[Background]:
    workloads = Background()
    yield workloads
    workloads.stop()


def scrape(compat: tuple[str, ...] = ()) -> str:
    """What the exporter serves for its containers."""
    return ContainerCollector(compat=compat).render()  # type: ignore[arg-type]


def sample(text: str, metric: str, container: str) -> float:
    match = re.search(rf'^{metric}{{container="{container}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"no {metric} for {container}"
    return float(match.group(1))


def signal_file_workload(script: str, go: Path, done: Path) -> list[str]:
    """A Python workload that writes `go.ready` once started, waits for `go`, runs script, writes `done`."""
    code = (
        f"import os, sys, time\nopen({str(go) + '.ready'!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n{script}\n"
        f"open({str(done)!r}, 'w').close()\ntime.sleep(3600)\n"
    )
    return [PYTHON, "-S", "-c", code]


def test_one_cpu_second_shows_as_one_second(background: Background, tmp_path: Path) -> None:
    go, done = tmp_path / "go", tmp_path / "done"
    burn = "start = time.process_time()\nwhile time.process_time() - start < 1.0: pass"
    background.start("burner", signal_file_workload(burn, go, done))
    wait_for(Path(f"{go}.ready").exists, "the interpreter to start")  # its start-up is not the burn
    before = sample(scrape(), "cgctl_container_cpu_usage_seconds_total", "burner")
    go.touch()
    wait_for(done.exists, "the burn")
    after = sample(scrape(), "cgctl_container_cpu_usage_seconds_total", "burner")
    assert 0.95 <= after - before <= 1.2, after - before


def test_a_known_allocation_shows_in_anon(background: Background, tmp_path: Path) -> None:
    go, done = tmp_path / "go", tmp_path / "done"
    background.start("holder", signal_file_workload(f"b = b'x' * {64 * MiB}", go, done))
    go.touch()
    wait_for(done.exists, "the allocation")
    text = scrape()
    anon = sample(text, "cgctl_container_memory_anon_bytes", "holder")
    assert 64 * MiB <= anon <= 96 * MiB, anon / MiB
    assert sample(text, "cgctl_container_memory_working_set_bytes", "holder") >= anon


def test_an_oom_kill_counts_exactly_one(background: Background, tmp_path: Path) -> None:
    go, done = tmp_path / "go", tmp_path / "done"
    victim = f"import subprocess; subprocess.run([sys.executable, '-S', '-c', 'b = b\"x\" * {128 * MiB}'])"
    background.start(
        "survivor",
        signal_file_workload(victim, go, done),
        limits={"memory": {"max": "48M", "oom_group": False}},
    )
    before = sample(scrape(), "cgctl_container_memory_oom_kills_total", "survivor")
    go.touch()
    wait_for(done.exists, "the victim to be killed")
    text = scrape(("cadvisor",))
    assert sample(text, "cgctl_container_memory_oom_kills_total", "survivor") - before == 1
    assert 'container_oom_events_total{id="/cgctl.slice/survivor",image="",name="survivor"} 1\n' in text


def test_container_cpu_is_the_sum_over_its_processes(background: Background) -> None:
    spin = (
        "import os, time\nos.fork()\nend = time.time() + 3\nwhile time.time() < end: pass\ntime.sleep(3600)"
    )
    background.start("pair", [PYTHON, "-S", "-c", spin])
    wait_for(lambda: len(workload_pids("pair")) == 2, "both processes")
    time.sleep(3.5)
    usage = sample(scrape(), "cgctl_container_cpu_usage_seconds_total", "pair")
    measured = sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in workload_pids("pair"))
    assert usage == pytest.approx(measured, rel=0.05, abs=0.1)


def test_stats_json_and_table(background: Background, capfd: pytest.CaptureFixture[str]) -> None:
    background.start(
        "stat-me", ["sh", "-c", "while :; do :; done"], limits={"cpu": {"cpus": "0.5"}, "pids": {"max": 8}}
    )
    status, out, _ = cgctl_in_process(capfd, "stats", "--no-stream", "--json", "--interval", "2", "stat-me")
    assert status == 0
    (row,) = json.loads(out)
    assert row["name"] == "stat-me" and 40 <= row["cpu_percent"] <= 60 and row["pids_limit"] == 8
    assert row["throttled_percent"] > 50
    status, out, _ = cgctl_in_process(capfd, "stats", "--no-stream", "stat-me")
    assert status == 0 and out.splitlines()[0].split()[:3] == ["NAME", "CPU", "%"] and "stat-me" in out
    status, _, err = cgctl_in_process(capfd, "stats", "--no-stream", "nobody-here")
    assert status == 125 and "no running container named nobody-here" in err


def test_promtool_accepts_the_exposition(background: Background) -> None:
    background.start(
        "checked",
        ["sh", "-c", f"dd if=/dev/zero of={DISK} bs=1M count=4 oflag=direct; sleep 3600"],
        limits={"memory": {"max": "64M"}, "cpu": {"cpus": "1"}, "pids": {"max": 10}},
        labels={"team": "infra"},
        security={"devices": [DISK]},
    )
    for compat in ((), ("cadvisor",)):
        done = subprocess.run(
            ["promtool", "check", "metrics"], input=scrape(compat), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_exporter_command_serves_and_stops_cleanly(background: Background) -> None:
    background.start("served", ["sleep", "3600"], labels={"team": "infra"})
    exporter = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "exporter", "--listen", "127.0.0.1:9754", "--compat", "cadvisor"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert exporter.stderr and "serving http://127.0.0.1:9754/metrics" in exporter.stderr.readline()
        with urllib.request.urlopen("http://127.0.0.1:9754/metrics", timeout=30) as response:
            content_type, text = response.headers["Content-Type"], response.read().decode()
        assert content_type.startswith("text/plain; version=0.0.4")
        assert 'cgctl_container_info{cgroup="/cgctl.slice/served",container="served"' in text
        assert 'container_processes{id="/cgctl.slice/served",image="",name="served"} 1\n' in text
        assert "cgctl_exporter_process_resident_memory_bytes" in text
    finally:
        exporter.terminate()
    assert exporter.wait(timeout=30) == 0


# --- a real Prometheus scraping the exporter while workloads run ---

QueryFn = Callable[[str], list[dict[str, object]]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((EXPORTERS / "grafana-dashboard.json").read_text())
    panels = [p for row in dashboard["panels"] for p in (row.get("panels") or [row])]
    return [target["expr"] for panel in panels if panel.get("type") != "row" for target in panel["targets"]]


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((EXPORTERS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def prometheus() -> Iterator[QueryFn]:
    """Workloads that exercise every panel and alert, the exporter, and Prometheus scraping it each second."""
    workloads = Background()
    workloads.start(
        "throttled",
        ["sh", "-c", "while :; do :; done"],
        limits={"cpu": {"cpus": "0.2"}},
        labels={"team": "infra"},
    )
    workloads.start(
        "writer",
        [
            "sh",
            "-c",
            f"while :; do dd if=/dev/zero of={DISK} bs=64K count=16 oflag=direct "
            "status=none; sleep 0.2; done",
        ],
        limits={"pids": {"max": 16}},
        security={"devices": [DISK]},
    )
    workloads.start(
        "near-limit",
        [PYTHON, "-S", "-c", f"import time; b = b'x' * {58 * MiB}; time.sleep(3600)"],
        limits={"memory": {"max": "64M"}},
    )
    go = (
        Path(tempfile.mkdtemp()) / "go"
    )  # the OOM must come while Prometheus watches, or increase() sees none
    workloads.start(
        "oomed",
        [
            "sh",
            "-c",
            f"while [ ! -e {go} ]; do sleep 0.2; done; {PYTHON} -S -c 'b = b\"x\" * {96 * MiB}'; sleep 3600",
        ],
        limits={"memory": {"max": "32M", "oom_group": False}},
    )
    workloads.start(
        "stalled",
        [PYTHON, "-S", "-c", f"while True: b = b'x' * {48 * MiB}; del b"],  # over memory.high again and again
        limits={"memory": {"high": "16M"}},
    )
    workloads.start("net-sink", [PYTHON, "-S", "-c", SINK])  # with an interface, for the network panels
    network = contextlib.ExitStack()
    server = make_server("127.0.0.1", 9753, ContainerCollector())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{EXPORTERS / 'alerts.yml'}]\n"
        "scrape_configs: [{job_name: cgctl, static_configs: [{targets: ['127.0.0.1:9753']}]}]\n"
    )
    server_process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            "--web.listen-address=127.0.0.1:9090",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def query(expr: str) -> list[dict[str, object]]:
        url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=30) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def seen(expr: str, at_least: float) -> bool:
        try:
            result = query(expr)
        except OSError:
            return False  # not listening yet
        return bool(result) and float(result[0]["value"][1]) >= at_least  # type: ignore[index]

    try:
        network.enter_context(
            veth_into(workload_pids("net-sink")[0], "nsprom-h0", "nsprom-c0", "10.200.0.5", "10.200.0.6")
        )
        wait_for(
            lambda: seen('count_over_time(cgctl_container_info{container="oomed"}[1m])', 5), "scrapes", 180
        )
        go.touch()
        send_udp("10.200.0.6", SINK_PORT, 100, 1000)
        wait_for(
            lambda: seen('cgctl_container_memory_oom_kills_total{container="oomed"}', 1), "the OOM kill", 120
        )
        time.sleep(5)  # a few more scrapes for every rate()
        yield query
    finally:
        server_process.terminate()
        server_process.wait(timeout=60)
        server.shutdown()
        server.server_close()
        network.close()
        workloads.stop()


def as_query(expr: str) -> str:
    return expr.replace("$container", ".*").replace("$__rate_interval", "30s").replace("${datasource}", "")


@pytest.mark.parametrize("expr", dashboard_expressions())
def test_every_dashboard_expression_returns_data(prometheus: QueryFn, expr: str) -> None:
    assert prometheus(as_query(expr)), f"no data for {expr}"


@pytest.mark.parametrize("expr", rule_expressions())
def test_every_alert_fires_on_its_workload(prometheus: QueryFn, expr: str) -> None:
    """A [5m] rate over the first seconds of data is diluted over the whole window (rate divides by the
    range), so an alert on a rate fires once enough of its window has been seen: wait for that."""
    deadline = time.monotonic() + 240
    while not prometheus(expr):
        measured = prometheus(expr.rsplit(">", 1)[0])  # the value the threshold is applied to
        assert time.monotonic() < deadline, f"{expr} does not fire; without its threshold: {measured}"
        time.sleep(2)
