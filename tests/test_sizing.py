"""Workers sized to the pod: the CPUs the process may use (cgroup quota, affinity) and its memory limit.

The deciding functions are pure and tested on file texts; the reader on a fake /proc and cgroup tree;
the server through the command line under `taskset` and, where the machine lets the tests make
cgroups, inside one with a CPU quota and a memory limit.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading

import pytest
import requests
import wasmtime
import yaml

from kwserver.evaluation.modes import annotate
from kwserver.server.sizing import (
    MIB,
    count_cpus,
    headroom,
    locate_cgroup,
    parse_memory_limit,
    read_cgroup_files,
    workers_that_fit,
)
from tests.support.cgroups import Cgroup
from tests.support.paths import SERVER_FIXTURES, TEST_POLICIES, load_json, policy_path
from tests.support.server import wait_for

V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V1_CGROUP = "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc/large\n0::/\n"


# --- where the cgroup is -------------------------------------------------------------------------

def test_cgroup_v2_is_the_mount_point_joined_with_the_process_path():
    assert locate_cgroup("0::/kubepods/pod1/c1\n", V2_MOUNTS, "cpu") == (2, "/sys/fs/cgroup/kubepods/pod1/c1")
    assert locate_cgroup("0::/\n", V2_MOUNTS, "memory") == (2, "/sys/fs/cgroup")  # a cgroup namespace


def test_cgroup_v1_strips_the_mount_root_and_wins_over_v2():
    assert locate_cgroup(V1_CGROUP, V1_MOUNTS, "cpu") == (1, "/sys/fs/cgroup/cpu,cpuacct/large")
    assert locate_cgroup(V1_CGROUP, V1_MOUNTS, "memory") == (1, "/sys/fs/cgroup/memory")


@pytest.mark.parametrize("proc_cgroup,mountinfo", [
    (None, V2_MOUNTS), ("0::/\n", None), ("", V2_MOUNTS),
    ("2:cpu:/elsewhere\n", V1_MOUNTS),  # outside the mount's root
    ("0::/\n", V1_MOUNTS.splitlines()[0]),  # v2 cgroup, no v2 mount
    ("garbage\n", "garbage\n"),
])
def test_no_cgroup_found(proc_cgroup, mountinfo):
    assert locate_cgroup(proc_cgroup, mountinfo, "cpu") is None


# --- how many CPUs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("files,affinity,count,reason", [
    ({"cpu.max": "150000 100000\n"}, 64, 2, "cgroup CPU quota 1.5 CPUs"),
    ({"cpu.max": "25000 100000\n"}, 64, 1, "cgroup CPU quota 0.25 CPUs"),  # below one CPU: rounded up
    ({"cpu.max": "400000 100000\n"}, 1, 1, "1 CPU in the affinity set, fewer than the cgroup CPU quota 4 CPUs"),
    ({"cpu.max": "max 100000\n"}, 4, 4, "4 CPUs in the affinity set, no cgroup CPU quota (cpu.max is max)"),
    ({"cpu.max": None}, 3, 3, "3 CPUs in the affinity set, cgroup cpu.max missing or unreadable"),
    ({"cpu.max": "lots\n"}, 3, 3, "3 CPUs in the affinity set, cgroup cpu.max unparsable ('lots')"),
    ({"cpu.max": "100000 0\n"}, 2, 2, "2 CPUs in the affinity set, cgroup CPU quota 100000/0 unusable"),
    ({"cpu.cfs_quota_us": "200000\n", "cpu.cfs_period_us": "100000\n"}, 8, 2, "cgroup CPU quota 2 CPUs"),
    ({"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}, 8, 8,
     "8 CPUs in the affinity set, no cgroup CPU quota (cpu.cfs_quota_us is -1)"),
    ({"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": None}, 8, 8,
     "8 CPUs in the affinity set, cgroup cpu.cfs_quota_us or cpu.cfs_period_us missing, unreadable or unparsable"),
    ({}, 2, 2, "2 CPUs in the affinity set, no cgroup CPU controller"),
])
def test_cpu_count_follows_the_quota_and_the_affinity(files, affinity, count, reason):
    cpus = count_cpus(files, affinity)
    assert (cpus.count, cpus.reason) == (count, reason)


def test_the_start_log_names_the_count_and_why():
    assert count_cpus({"cpu.max": "150000 100000"}, 64).describe() == "2 workers: cgroup CPU quota 1.5 CPUs"
    assert count_cpus({}, 1).describe().startswith("1 worker: ")


def test_the_pool_bounds_default_to_the_same_figure():
    from kwserver.config import ServerSettings
    from kwserver.server.sizing import CpuCount, plan_workers

    cpus = CpuCount(4, "cgroup CPU quota 3.5 CPUs")
    default = plan_workers(ServerSettings(), cpus)
    assert (default.initial, default.minimum, default.maximum) == (4, 4, 4) and not default.autoscaling
    assert default.describe() == "4 workers: cgroup CPU quota 3.5 CPUs"
    grows = plan_workers(ServerSettings(min_workers=1), cpus)  # --max-workers' default follows the CPUs
    assert (grows.initial, grows.minimum, grows.maximum) == (4, 1, 4) and grows.autoscaling
    assert plan_workers(ServerSettings(workers=3), cpus).maximum == 3
    assert plan_workers(ServerSettings(workers=3), cpus).describe() == "3 workers: --workers"
    raised = plan_workers(ServerSettings(min_workers=6), cpus)
    assert raised.describe() == "6 workers: cgroup CPU quota 3.5 CPUs (--min-workers/--max-workers)"


def _fake_tree(tmp_path, cpu_max):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/kubepods/pod1\n")
    (proc / "mountinfo").write_text(V2_MOUNTS)
    group = tmp_path / "sys/fs/cgroup/kubepods/pod1"
    group.mkdir(parents=True)
    if cpu_max == "unreadable":
        (group / "cpu.max").mkdir()  # reading it fails whoever we are (root reads a chmod 000 file)
    elif cpu_max is not None:
        (group / "cpu.max").write_text(cpu_max)
    (group / "memory.max").write_text("536870912\n")
    return proc


@pytest.mark.parametrize("cpu_max,expected", [("150000 100000\n", "150000 100000\n"), (None, None),
                                              ("unreadable", None)])
def test_the_reader_finds_the_process_cgroup_files(tmp_path, cpu_max, expected):
    proc = _fake_tree(tmp_path, cpu_max)
    assert read_cgroup_files("cpu", {2: ("cpu.max",), 1: ()}, proc, tmp_path) == {"cpu.max": expected}
    memory = read_cgroup_files("memory", {2: ("memory.max",), 1: ()}, proc, tmp_path)
    assert parse_memory_limit(memory) == 512 * MIB


def test_no_proc_files_no_cgroup(tmp_path):
    assert read_cgroup_files("cpu", {2: ("cpu.max",), 1: ()}, tmp_path / "nowhere", tmp_path) == {}


# --- how much memory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("files,limit", [
    ({"memory.max": "max\n"}, None), ({"memory.max": "268435456\n"}, 256 * MIB), ({"memory.max": None}, None),
    ({"memory.limit_in_bytes": "9223372036854771712\n"}, None), ({"memory.limit_in_bytes": "1073741824"}, 1024 * MIB),
    ({}, None), ({"memory.max": "0"}, None),
])
def test_memory_limit(files, limit):
    assert parse_memory_limit(files) == limit


def test_workers_that_fit_keep_the_headroom():
    assert headroom(100 * MIB) == 32 * MIB and headroom(1024 * MIB) == int(102.4 * MIB)
    assert workers_that_fit(1024 * MIB, 100 * MIB, 20 * MIB) == 41  # (1024 - 102.4 - 100) // 20
    assert workers_that_fit(256 * MIB, 100 * MIB, 100 * MIB) == 1
    assert workers_that_fit(256 * MIB, 180 * MIB, 50 * MIB) == 0
    assert workers_that_fit(64 * MIB, 80 * MIB, 16 * MIB) == 0  # already past the limit


# --- through the command line ----------------------------------------------------------------------

POLICIES = {"sleep": {"module": policy_path("sleeping"), "settings": {"sleepMilliseconds": 1}}}
SLEEP = load_json(SERVER_FIXTURES / "pod_sleep_100ms.json")
RAW_REVIEW = load_json(SERVER_FIXTURES / "raw_review.json")


def _worker_count(server) -> int:
    status = requests.get(f"http://127.0.0.1:{server.metrics_port}/status", timeout=5).json()
    return status["workers"]


SERVE = [sys.executable, "-m", "kwserver", "serve"]


def _without_workers_setting(command: list[str]) -> list[str]:
    return ["env", "-u", "KUBEWARDEN_WORKERS", *command]


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
def test_workers_follow_the_cpu_affinity(run_server):
    command = _without_workers_setting(["taskset", "-c", "0", *SERVE])
    server = run_server(POLICIES, command=command)
    assert "starting: 1 worker: 1 CPU in the affinity set" in server.log()
    assert _worker_count(server) == 1


@pytest.fixture
def cgroup():
    group = Cgroup.make()
    if group is None:
        pytest.skip("cannot make a cgroup with CPU and memory controllers here")
    yield group
    group.remove()


def test_workers_follow_the_cgroup_cpu_quota(run_server, cgroup):
    cgroup.set_cpu(50_000)  # half a CPU: one worker, whatever the machine has
    server = run_server(POLICIES, command=cgroup.wrap(_without_workers_setting(SERVE)))
    assert "starting: 1 worker: cgroup CPU quota 0.5 CPUs" in server.log()
    assert _worker_count(server) == 1


def test_a_memory_limit_below_one_workers_need_starts_one_worker_with_a_warning(run_server, cgroup):
    # The master alone is about 45 MiB (PSS); 72 MiB leaves no room for a worker beside the headroom.
    cgroup.set_memory(72 * MIB)
    server = run_server(POLICIES, command=cgroup.wrap(_without_workers_setting(SERVE)))
    assert re.search(r"the memory limit is below what one worker needs \(\d+ MiB in use \+ 16 MiB per worker \+ "
                     r"32 MiB headroom, memory limit 72 MiB\): starting 1 worker", server.log())
    assert _worker_count(server) == 1
    assert server.post("/validate/sleep", SLEEP).status_code == 200


def _leaky_module(directory) -> str:
    source = TEST_POLICIES / "leaky"
    path = directory / "leaky.wasm"
    path.write_bytes(annotate(wasmtime.wat2wasm((source / "leaky.wat").read_text()),
                              yaml.safe_load((source / "metadata.yml").read_text())))
    return str(path)


def test_the_pool_never_grows_past_what_the_memory_limit_holds(run_server, cgroup, tmp_path):
    policies = {**POLICIES, "leaky": {"module": _leaky_module(tmp_path)}}
    server = run_server(policies, command=cgroup.wrap(SERVE), env={
        "KUBEWARDEN_WORKERS": "1", "KWSERVER_MAX_WORKERS": "3", "KWSERVER_SCALE_UP_AFTER_SECONDS": "1",
        "KWSERVER_INSTANCE_KEEP_MEMORY_MIB": "1024", "KWSERVER_POLICY_MEMORY_LIMIT_MIB": "1024",
        "KWSERVER_WORKER_INSTANCE_BUDGET_MIB": "1024",
        "KWSERVER_FRESH_INSTANCE_PER_REQUEST": "false"})  # reused, the leaking instance keeps what it took
    session = requests.Session()
    for _ in range(20):  # the worker holds 80 MiB of instance memory of its own
        assert session.post(server.url + "/validate_raw/leaky", json=RAW_REVIEW, timeout=30).status_code == 200
    status = requests.get(f"http://127.0.0.1:{server.metrics_port}/status", timeout=5).json()
    worker_uss = max(p["uss"] for p in status["processes"] if p["role"] == "worker")
    assert worker_uss > 60 * MIB
    # Room for what runs and its headroom, and half a worker more.
    cgroup.set_memory(status["totals"]["pss"] + 40 * MIB + worker_uss // 2)

    stop = threading.Event()
    slow = json.loads(json.dumps(SLEEP))
    slow["request"]["object"]["metadata"]["annotations"]["kubewarden.sleep_duration_milliseconds"] = 150

    def load() -> None:
        with requests.Session() as client:
            while not stop.is_set():
                client.post(server.url + "/validate/sleep", json=slow, timeout=30)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: "not adding a worker to the 1 running: it would not fit in the memory limit" in server.log(),
                 timeout=30)
        assert _worker_count(server) == 1
        cgroup.set_memory(4096 * MIB)  # the pod's limit raised in place: the pool grows again
        wait_for(lambda: _worker_count(server) >= 2, timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
