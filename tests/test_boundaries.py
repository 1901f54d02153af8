"""The driver stays light, the private Ray instance stays on loopback, the cache is race-safe."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bulkscore.workers.embedded import prepare_once


def test_importing_the_driver_loads_neither_torch_nor_transformers():
    code = (
        "import sys, bulkscore, bulkscore.jobs.cli, bulkscore.jobs.run, bulkscore.jobs.schedule, bulkscore.workers.actor,"
        " bulkscore.workers.contract, bulkscore.workers.embedded\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_worker_imports_none_of_the_driver():
    """A Ray worker imports the package on its way to bulkscore.workers: the public API (and with it
    the driver, click and its readers) stays out of its start-up until something asks for it."""
    code = (
        "import sys, bulkscore.workers.actor, bulkscore.workers.scoring\n"
        "print(sorted(m for m in ('bulkscore.jobs.api', 'bulkscore.jobs.run', 'click') if m in sys.modules))\n"
        "import bulkscore\n"
        "print(bulkscore.run.__module__, bulkscore.JobError.__name__, sorted(bulkscore.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "[]",
        "bulkscore.jobs.api JobError ['JobError', 'Result', 'UsageError', 'export', 'report', 'run']",
    ]


def last_json_line(code: str) -> dict:
    """What `code` prints last, as JSON, run in a process of its own that starts a private instance
    (neither RAY_ADDRESS nor this suite's loopback setting passed on: the instance sets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_private_ray_instance_listens_on_loopback_without_dashboard_or_monitors():
    """And it starts only what a job uses: no autoscaler monitor, log monitor or dashboard server, a
    minimal dashboard agent (jobs.cluster.start_private_instance), yet runs actors."""
    code = (
        "import json, os, ray, subprocess, sys\n"
        "from bulkscore.jobs.cluster import ray_session\n"
        "from tests.helpers import descendants\n"
        "with ray_session(None):\n"
        "    def worker():\n"
        "        import gc\n"
        "        return {'torch': 'torch' in sys.modules, 'frozen': gc.get_freeze_count(), 'collecting': gc.isenabled()}\n"
        "    ran = ray.get(ray.remote(worker).options(num_cpus=0).remote())\n"
        "    def processes():\n"
        "        below = set(descendants(os.getpid()))\n"
        "        listing = subprocess.run(['ps', '-eo', 'pid=,ni=,args='], capture_output=True, text=True).stdout\n"
        "        return [line for line in listing.splitlines() if int(line.split()[0]) in below]\n"
        "    commands = processes()\n"
        "    probe = ray.remote(lambda: os.environ.get('PROBE')).options(num_cpus=0, runtime_env={'env_vars': {'PROBE': 'set'}})\n"
        "    in_runtime_env = ray.get(probe.remote(), timeout=60)\n"
        "    workers_after = sum(line.split()[2] == 'ray::IDLE' for line in processes())\n"
        "    ports = ('RuntimeEnvAgentPort', 'MetricsAgentPort', 'MetricsExportPort', 'DashboardAgentListenPort')\n"
        "    print(json.dumps({'gcs': ray.get_runtime_context().gcs_address,\n"
        "                      'nodes': [n['NodeManagerAddress'] for n in ray.nodes()],\n"
        "                      'ports': {name: ray.nodes()[0][name] for name in ports},\n"
        "                      'in_runtime_env': in_runtime_env, 'workers_after': workers_after,\n"
        "                      'dashboard': ray._private.worker._global_node.address_info.get('webui_url'),\n"
        "                      'ran': ran, 'commands': commands,\n"
        "                      'dashboard_packages': 'aiohttp' in sys.modules,\n"
        "                      'early_prestart': ray._private.state.state.get_system_config().get('enable_worker_prestart')}))\n"
    )
    info = last_json_line(code)
    assert info["gcs"].startswith("127.0.0.1:")
    assert info["nodes"] == ["127.0.0.1"]
    assert not info["dashboard"]
    # The task ran in the prestarted worker, which had imported torch as it booted (workers.preload),
    # with the cycle collector paused for it and on again after.
    assert info["ran"]["torch"] and info["ran"]["collecting"] and info["ran"]["frozen"] > 100_000
    commands = " ".join(info["commands"])
    assert "gcs_server" in commands and "raylet" in commands
    for left_out in ("autoscaler/_private/monitor.py", "log_monitor.py", "dashboard/dashboard.py"):
        assert left_out not in commands
    # The dashboard agent runs as in a minimal Ray install (the raylet starts it, with the command it
    # was given), so the driver never imported its packages.
    agent_commands = [c for c in info["commands"] if "dashboard/agent.py" in c]
    assert agent_commands and all("--minimal" in c for c in agent_commands)
    assert not info["dashboard_packages"]
    # One worker process, prestarted as soon as the raylet was up (Ray: one per CPU, once the driver
    # has connected); it ran the task. (Ray names its worker processes ray::<what they run>.)
    assert info["early_prestart"] is True
    raylet = [c for c in info["commands"] if "--num_prestart_python_workers=" in c]
    assert len(raylet) == 1 and "--num_prestart_python_workers=1 " in raylet[0] + " "
    workers = [c for c in info["commands"] if c.split()[2].startswith("ray::") and "Agent" not in c]
    assert [c.split()[2] for c in workers] == ["ray::IDLE"]
    # The raylet did not wait for its agents' port reports (jobs.cluster.lean_raylet_command): it
    # was given the minimal agent's unused ports (-1) and the runtime env agent's chosen one, and
    # registered those; the runtime env agent serves there (a task in a runtime env ran).
    assert info["ports"]["MetricsAgentPort"] == info["ports"]["MetricsExportPort"] == -1
    assert info["ports"]["DashboardAgentListenPort"] == -1
    told = raylet[0].split("--runtime_env_agent_port=")[1].split()[0]
    assert int(told) == info["ports"]["RuntimeEnvAgentPort"] > 0
    assert info["in_runtime_env"] == "set" and info["workers_after"] == 2  # its own worker process
    # Both agents run at niceness 19, below the worker processes (Ray's: 15 more than the driver's).
    niceness = {
        line.split()[2]: int(line.split()[1]) for line in info["commands"] if line.split()[2].startswith("ray::")
    }
    assert niceness["ray::DashboardAgent"] == niceness["ray::RuntimeEnvAgent"] == 19
    assert niceness["ray::IDLE"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 15)


def test_a_private_instance_is_up_once_its_raylet_registers():
    """Ray's head start asks the GCS for its node in a call that sleeps a whole second whenever the
    raylet has not registered yet, which is always so at the first asking (the raylet waits ~0.7 s
    for its agents). The private instance waits for the registration itself, in short steps, so
    Ray's call finds the node at once."""
    code = (
        "import json, ray, ray._private.services as services\n"
        "from ray._raylet import GcsClient, NodeID\n"
        "from bulkscore.jobs.cluster import ray_session\n"
        "plain, found = services.get_node, []\n"
        "def get_node(gcs_address, node_id):\n"
        "    found.append(GcsClient(address=gcs_address).check_alive([NodeID.from_hex(node_id)], timeout=10)[0])\n"
        "    return plain(gcs_address, node_id)\n"
        "services.get_node = get_node\n"
        "with ray_session(None):\n"
        "    ran = ray.get(ray.remote(lambda: 'ran').options(num_cpus=0).remote())\n"
        "print(json.dumps({'found': found, 'ran': ran}))\n"
    )
    info = last_json_line(code)
    assert info == {"found": [True], "ran": "ran"}


class StandInHead:
    """What until_registered reads of Ray's head Node: its GCS client, node id and raylet process."""

    def __init__(self, gcs: object, raylet_exit: int | None = None) -> None:
        from ray._raylet import NodeID

        self.gcs, self.node_id = gcs, NodeID.from_random().hex()
        raylet = SimpleNamespace(process=SimpleNamespace(poll=lambda: raylet_exit))
        self.all_processes = {"raylet": [raylet]}

    def get_gcs_client(self) -> object:
        return self.gcs


class AskedGcs:
    def __init__(self, answer: bool | None) -> None:
        self.answer, self.asked = answer, 0

    def check_alive(self, nodes: list, timeout: float) -> list[bool]:
        self.asked += 1
        if self.answer is None:
            raise RuntimeError("GCS unreachable")
        return [self.answer] * len(nodes)


def test_waiting_for_a_raylet_gives_up_to_rays_own_wait(monkeypatch):
    """Anything amiss (a head or GCS client unlike Ray's, a failing GCS, a raylet that exited) hands
    the wait back to Ray at once; a node that never registers is waited for REGISTRATION_WAIT_S."""
    from bulkscore.jobs import cluster

    cluster.until_registered(object())  # nothing of a head: returns at once
    failing, exited, registered = AskedGcs(None), AskedGcs(False), AskedGcs(True)
    cluster.until_registered(StandInHead(failing))
    cluster.until_registered(StandInHead(exited, raylet_exit=1))
    cluster.until_registered(StandInHead(registered))
    assert (failing.asked, exited.asked, registered.asked) == (1, 0, 1)

    monkeypatch.setattr(cluster, "REGISTRATION_WAIT_S", 0.2)
    never = AskedGcs(False)
    cluster.until_registered(StandInHead(never))
    assert 2 <= never.asked <= 0.2 / cluster.REGISTRATION_POLL_S + 1


def test_only_the_raylet_is_told_to_prestart_one_worker_that_preloads():
    from bulkscore.jobs.cluster import lean_raylet, worker_takes_preload

    assert worker_takes_preload()  # this Ray's worker takes the option
    started = []
    start = lean_raylet(lambda command, kind, *args, **kwargs: started.append((kind, command, args, kwargs)))
    worker = (
        "--python_worker_command=python setup_worker.py default_worker.py --x=1 RAY_WORKER_DYNAMIC_OPTION_PLACEHOLDER"
    )
    start(["raylet", "--num_prestart_python_workers=16", worker, "--head"], "raylet", True, cwd="/")
    start(["gcs_server", "--num_prestart_python_workers=16", worker], "gcs_server", True)
    preloading = worker.replace(" RAY_WORKER", " --worker-preload-modules=bulkscore.workers.preload RAY_WORKER")
    assert started == [
        ("raylet", ["raylet", "--num_prestart_python_workers=1", preloading, "--head"], (True,), {"cwd": "/"}),
        ("gcs_server", ["gcs_server", "--num_prestart_python_workers=16", worker], (True,), {}),
    ]

    assert lean_raylet(None) is None  # a Ray without start_ray_process: nothing is swapped
    # A Ray whose worker lacks the preload option: one prestarted worker, as it starts them.
    started.clear()
    lean_raylet(lambda command, *args, **kwargs: started.append(command), preload=False)([worker], "raylet")
    assert started == [[worker]]


def test_the_raylet_is_told_its_minimal_agents_unused_ports_and_runs_them_below_its_workers():
    from bulkscore.jobs.cluster import lean_raylet_command

    nice = shutil.which("nice")
    agents = ["--dashboard_agent_command=python agent.py --listen-port=0", "--runtime_env_agent_command=python main.py"]
    ports = ["--metrics-agent-port=0", "--metrics_export_port=0", "--runtime_env_agent_port=4321"]
    niced = [f"{a.split('=', 1)[0]}={nice} -n 19 {a.split('=', 1)[1]}" for a in agents]
    unused = ["--metrics-agent-port=-1", "--metrics_export_port=-1", "--dashboard_agent_listen_port=-1"]

    minimal = [agents[0] + " --minimal", agents[1]]
    assert lean_raylet_command(["raylet", *minimal, *ports], preload=False) == [
        "raylet",
        niced[0] + " --minimal",
        niced[1],
        "--runtime_env_agent_port=4321",
        *unused,
    ]
    # A full dashboard agent reports ports it serves on: the raylet waits for them, as Ray has it.
    assert lean_raylet_command(["raylet", *agents, *ports], preload=False) == ["raylet", *niced, *ports]
    # A Ray that chooses the agents' ports itself: nothing to wait for, nothing told.
    chosen = ["--metrics-agent-port=5001", "--metrics_export_port=5002", "--runtime_env_agent_port=5003"]
    assert lean_raylet_command(["raylet", *minimal, *chosen], preload=False)[3:] == chosen


def test_a_chosen_agent_port_is_free_and_outside_the_kernels_own_picks(tmp_path, monkeypatch):
    from bulkscore.jobs import cluster

    below = int(cluster.PICKED_PORTS_FILE.read_text().split()[0])
    ports = {cluster.free_port() for _ in range(20)}
    assert all(cluster.CHOSEN_PORTS_FROM <= port < below for port in ports)

    with socket.socket() as taken:  # the only port left to choose is in use: the agent picks its own
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        picked = tmp_path / "ip_local_port_range"
        picked.write_text(f"{port + 1}\t60999\n")
        monkeypatch.setattr(cluster, "PICKED_PORTS_FILE", picked)
        monkeypatch.setattr(cluster, "CHOSEN_PORTS_FROM", port)
        assert cluster.free_port() == 0
        taken.close()
        assert cluster.free_port() == port
    picked.write_text("1024 60999\n")  # the kernel may pick any: nothing is chosen ahead
    assert cluster.free_port() == 0


def slow_build(target: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        tmp.mkdir()
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "config.json").write_text("{}")

    prepare_once(Path(target), build)


def test_concurrent_preparation_builds_once(tmp_path):
    target, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=slow_build, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().splitlines()) == 1
    assert json.loads((target / "config.json").read_text()) == {}
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]


def test_a_files_digest_is_read_once_and_follows_its_content(tmp_path, monkeypatch):
    import hashlib

    from bulkscore.workers.embedded import converted_folder, file_digest

    monkeypatch.setenv("BULKSCORE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_digest(model) == expected
    (memo,) = (tmp_path / "cache" / "digests").iterdir()
    memo.write_text("remembered")  # a second call reads the memo, not the file
    assert file_digest(model) == "remembered"
    model.write_bytes(b"other weights")  # a changed file (size, change time) is read again
    assert file_digest(model) == hashlib.sha256(b"other weights").hexdigest()
    assert converted_folder(model).name == f"m-{hashlib.sha256(b'other weights').hexdigest()[:12]}"
