"""Ray: join a cluster or start a private local instance, and size the worker pool."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bulkscore.jobs.errors import JobError

DEFAULT_CPUS_PER_WORKER = 4
# A ray:// head forks one server process per client, from a process full of gRPC threads; now and
# then that child dies before it starts (empty logs; about one connection in eight on a busy 2-core
# machine) and the head answers "Initialization failure from server". A new try succeeds.
CLIENT_SERVER_FAILED = "Initialization failure from server"
CLIENT_START_TRIES = 3


@dataclass(frozen=True)
class PoolPlan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def is_private(address: str | None) -> bool:
    return address in (None, "", "local")


def bind_to_loopback() -> None:
    """Make a Ray instance started by this process, and all its processes, bind to 127.0.0.1.

    Ray reads the switch at import time (and `_node_ip_address` does not cover the GCS), so it goes
    into the environment, which Ray's own processes inherit, and into Ray's constant in case Ray
    was imported before.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def use_token_if_present() -> bool:
    """Ray's clients send the cluster token only with RAY_AUTH_MODE=token; turn it on when one exists.
    Returns whether it was turned on here (a guess: the cluster may not use tokens)."""
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or TOKEN_FILE.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


TOKEN_PROBE = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
try:
    ray.get(ray.remote(num_cpus=0)(type("Probe", (), {"ping": lambda self: 1})).remote().ping.remote(), timeout=60)
except Exception as error:
    sys.exit(3 if "never ran" in str(error) else 4)
"""


def token_mode_works(address: str) -> bool:
    """Whether the cluster at `address` runs actors for a client in token mode (RAY_AUTH_MODE=token):
    asked in a process of its own, since Ray fixes the mode for the life of a process. A cluster
    without token authentication refuses them ("The actor never ran"), though it accepts the
    connection and plain tasks. Anything else (no answer, another failure) counts as working, so
    that the job meets, and reports, the real problem."""
    try:
        probe = subprocess.run([sys.executable, "-c", TOKEN_PROBE, address], capture_output=True, timeout=90)
    except subprocess.TimeoutExpired:
        return True
    return probe.returncode != 3


def connected_already() -> bool:
    """Whether this process is connected to Ray already (a notebook, a test): ray_session keeps that."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@contextmanager
def ray_session(address: str | None) -> Iterator[str]:
    """Connected to Ray for the block; a private instance listens on 127.0.0.1 with no dashboard.

    If this process is already connected (a notebook, a test), that connection is used and kept.
    Yields where the job runs, in words.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if is_private(address):
        bind_to_loopback()
    elif use_token_if_present() and "ray" not in sys.modules and not token_mode_works(address):
        # The token is a local file's guess and the cluster refuses actors made with it: it does not
        # use token authentication. Ray reads the mode once, at import, so it is set before.
        os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    if ray.is_initialized():
        yield f"the Ray instance at {ray.get_runtime_context().gcs_address}"
        return
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    for attempt in range(1, CLIENT_START_TRIES + 1):
        try:
            if is_private(address):
                start_private_instance(quiet)
            else:
                ray.init(address=address, **quiet)
            break
        except (ConnectionError, RuntimeError, ValueError) as error:
            ray.shutdown()
            if attempt == CLIENT_START_TRIES or CLIENT_SERVER_FAILED not in str(error):
                raise JobError(
                    f"cannot start or join Ray at {address or 'a private local instance'}: {error}"
                ) from None
            time.sleep(attempt)
    try:
        yield "a private local Ray instance" if is_private(address) else f"the Ray cluster at {address}"
    finally:
        ray.shutdown()


def start_private_instance(quiet: dict) -> None:
    """ray.init of a private local instance with only the processes a job uses.

    Besides its GCS, raylet and their two agents, Ray's head starts an autoscaler monitor, a log
    monitor (worker output to the driver, off here: log_to_driver=False) and a minimal dashboard
    server (the Jobs and state APIs). On a 2-core machine those three take ~1.7 CPU-seconds while the
    instance starts, and ~1 s to stop: measured, ray.init 2.9 -> 1.8 s, ray.shutdown 1.4 -> 0.3 s.
    They are left out through Ray's own parameters (no_monitor, include_log_monitor) and its head
    node's start_api_server. The dashboard agent runs as in a minimal Ray install (no HTTP server or
    metrics export), which also spares the driver importing the dashboard's packages to decide so:
    ray.init 1.8 -> 1.6 s. And the head's start returns as soon as its raylet has registered, not at
    the end of Ray's one-second wait for it (until_registered): 1.6 -> 1.3 s. Its raylet prestarts
    one worker process as soon as it is up, rather than one per CPU once the driver has connected
    (EARLY_PRESTART, lean_raylet): the first actor's process boots, and imports torch, while the
    driver connects and places the actor, with no others beside it. That raylet starts at once: it
    is told the ports its agents would report (lean_raylet_command, free_port) rather than waiting
    ~0.5-1 s for their reports, and the agents run at niceness 19, below the worker (Ray's 15), so
    their imports do not hold it back: job start-up 4.9 -> 4.2 s (interleaved runs). All for the
    duration of this ray.init only. Should a Ray version lack a swapped name, or its worker the
    preload option, that part starts as Ray starts it.
    """
    import ray
    import ray._private.node as node_module
    import ray._private.services as services
    import ray._private.utils as ray_utils

    class LeanHead(node_module.Node):
        def __init__(self, ray_params, *args, **kwargs) -> None:
            ray_params.no_monitor, ray_params.include_log_monitor = True, False
            # Chosen here, the runtime env agent's port goes to the raylet with its command: it
            # then need not wait (~0.5 s) for the agent to report one it picked itself.
            ray_params.runtime_env_agent_port = ray_params.runtime_env_agent_port or free_port()
            super().__init__(ray_params, *args, **kwargs)

        def start_api_server(self, *args, **kwargs) -> None:
            pass

        def start_ray_processes(self) -> None:
            super().start_ray_processes()
            until_registered(self)

    try:
        with (
            swapped(node_module, "Node", LeanHead),
            swapped(ray_utils, "get_dashboard_dependency_error", lean_agent),
            swapped(services, "start_ray_process", lean_raylet(getattr(services, "start_ray_process", None))),
        ):
            ray.init(address="local", include_dashboard=False, _system_config=EARLY_PRESTART, **quiet)
    except (AttributeError, TypeError):  # a Ray whose head does not take these: start it plainly
        ray.shutdown()
        ray.init(address="local", include_dashboard=False, **quiet)


# The raylet starts its prestarted worker processes as soon as it is up, not once the driver has
# connected (Ray's default), so that the first actor's process boots while the driver connects.
EARLY_PRESTART = {"enable_worker_prestart": True}
PRESTART_FLAG = "--num_prestart_python_workers="
WORKER_COMMAND_FLAG = "--python_worker_command="
WORKER_OPTIONS = "RAY_WORKER_DYNAMIC_OPTION_PLACEHOLDER"  # where the raylet adds each worker's own options
WORKER_PRELOAD = "bulkscore.workers.preload"
PRELOAD_FLAG = "--worker-preload-modules="
# The raylet's agents run below Ray's workers (niceness 15, Ray's worker_niceness): their start-up
# imports (~1 CPU-second each) would otherwise take the CPUs the first actor's process boots on.
DASHBOARD_AGENT_FLAG = "--dashboard_agent_command="
AGENT_COMMAND_FLAGS = (DASHBOARD_AGENT_FLAG, "--runtime_env_agent_command=")
AGENT_NICENESS = 19
UNUSED_AGENT_PORTS = ("--metrics-agent-port=", "--metrics_export_port=", "--dashboard_agent_listen_port=")


# Ports for an agent of a private instance: above Ray's default worker ports (10002-19999, a
# `ray start` cluster's on this machine) and below the kernel's range for ports it picks itself.
CHOSEN_PORTS_FROM = 20000
PICKED_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(tries: int = 50) -> int:
    """A TCP port on 127.0.0.1 that is free now; 0 (let the agent pick) if none is found.

    It lies below the range the kernel picks from (ip_local_port_range), so that until the agent
    binds it, no process that asks the kernel for any port (Ray's own processes do, by the dozen,
    as the instance starts) can be given it: only one binding this very number could."""
    try:
        below = int(PICKED_PORTS_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        below = 32768  # Linux's default
    for _ in range(tries if below > CHOSEN_PORTS_FROM else 0):
        port = CHOSEN_PORTS_FROM + secrets.randbelow(below - CHOSEN_PORTS_FROM)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return 0


def lean_raylet(start: Callable | None, preload: bool | None = None) -> Callable | None:
    """Ray's start_ray_process, but the raylet it starts prestarts one worker process, not one per
    CPU, its worker processes import torch as they boot (WORKER_PRELOAD; `preload`, by default if
    this Ray's worker takes the option), and it starts its agents below them (AGENT_NICENESS) and
    goes on without waiting for them (lean_raylet_command).

    One: the first actor's. The rest start as their actors are placed. Ray's many would boot at
    once, alongside the driver, on CPUs the first actor's process needs (and the job may never use
    them: one worker per 4 CPUs by default). Every worker of a private instance is the job's."""
    if start is None:
        return None
    preload = worker_takes_preload() if preload is None else preload

    from ray._private import ray_constants

    def start_process(command: list[str], process_type: str, *args, **kwargs) -> object:
        if process_type == ray_constants.PROCESS_TYPE_RAYLET:
            command = lean_raylet_command(command, preload)
        return start(command, process_type, *args, **kwargs)

    return start_process


def lean_raylet_command(command: list[str], preload: bool) -> list[str]:
    """The raylet's command, edited as lean_raylet says; and, when its dashboard agent runs minimal,
    told the ports that agent would report as unused (-1), so that it does not wait for the report.

    A minimal agent serves no metrics or HTTP, and says so by writing -1 to its port files, but only
    after importing its modules (~0.5 s); the raylet, given 0, waits for those files before it
    starts anything. Given -1 it goes on at once, and registers the same -1s with the GCS. (A Ray
    whose start gives the raylet ports it chose itself, not 0, is left as it is.)"""
    nice = shutil.which("nice")
    command = [lean_raylet_argument(part, preload, nice) for part in command]
    waits = f"{UNUSED_AGENT_PORTS[1]}0" in command
    if waits and any(part.startswith(DASHBOARD_AGENT_FLAG) and " --minimal" in part for part in command):
        command = [part for part in command if not part.startswith(UNUSED_AGENT_PORTS)]
        command += [f"{flag}-1" for flag in UNUSED_AGENT_PORTS]
    return command


def lean_raylet_argument(part: str, preload: bool, nice: str | None = None) -> str:
    if part.startswith(PRESTART_FLAG):
        return f"{PRESTART_FLAG}1"
    if preload and part.startswith(WORKER_COMMAND_FLAG) and WORKER_OPTIONS in part:
        return part.replace(WORKER_OPTIONS, f"{PRELOAD_FLAG}{WORKER_PRELOAD} {WORKER_OPTIONS}", 1)
    if nice and part.startswith(AGENT_COMMAND_FLAGS):
        flag, _, agent = part.partition("=")
        return f"{flag}={subprocess.list2cmdline([nice, '-n', str(AGENT_NICENESS)])} {agent}"
    return part


def worker_takes_preload() -> bool:
    """Whether this Ray's worker process takes PRELOAD_FLAG (Ray's own start never passes it)."""
    import ray

    worker = Path(ray.__file__).parent / "_private" / "workers" / "default_worker.py"
    return worker.is_file() and PRELOAD_FLAG.rstrip("=") in worker.read_text()


REGISTRATION_POLL_S = 0.02
REGISTRATION_WAIT_S = 30.0


def until_registered(node: object) -> None:
    """Return once the GCS lists `node` (Ray's head Node, its processes started) alive, asking every
    REGISTRATION_POLL_S.

    Ray's head start asks next in a call that, if the raylet has not registered yet, sleeps a whole
    second before it asks again; and the raylet registers only once its agents are up, ~0.7 s after
    it starts. So that call always slept its second, ~0.25 s past the registration. Only that is at
    stake here: should the raylet exit, REGISTRATION_WAIT_S pass, or anything fail on the way (a Ray
    whose Node or GCS client differs), Ray's own wait takes over, and reports what it meets."""
    try:
        from ray._private import ray_constants
        from ray._raylet import NodeID

        gcs, me = node.get_gcs_client(), NodeID.from_hex(node.node_id)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        deadline = time.monotonic() + REGISTRATION_WAIT_S
        while raylet.poll() is None and time.monotonic() < deadline:
            if gcs.check_alive([me], timeout=1)[0]:
                return
            time.sleep(REGISTRATION_POLL_S)
    except Exception:  # not swallowed: Ray's own wait, next, meets the same trouble and reports it
        return


def lean_agent() -> str:
    """What Ray's start asks before it starts the dashboard agent: a reason to run it minimal."""
    return "a private bulkscore instance serves no dashboard"


@contextmanager
def swapped(owner: object, name: str, value: object) -> Iterator[None]:
    """owner.name is `value` for the block; nothing changes if owner has no such name (a Ray
    version without it then starts that part as Ray starts it)."""
    if not hasattr(owner, name):
        yield
        return
    plain = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, plain)


HEAD_CHECK_S = 3.0
HEAD_LOST_AFTER = 4  # failed checks in a row (~12 s): well before Ray's own 60 s, which ends in a C++ log line


@contextmanager
def watching_the_head(on_lost: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, check every few seconds that the head's GCS port still accepts a
    connection; if it stops (the head died, the network is cut), call on_lost(address) from the
    watching thread. Without this, Ray's driver waits 60 s and exits with a C++ log line. Only for a
    cluster joined by address: a private instance lives and dies with this process."""
    import ray

    gcs = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    host, _, port = (gcs or "").rpartition(":")
    if not host or not port.isdigit():
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        failures = 0
        while not stop.wait(HEAD_CHECK_S):
            try:
                socket.create_connection((host, int(port)), timeout=HEAD_CHECK_S).close()
                failures = 0
            except OSError:
                failures += 1
                if failures >= HEAD_LOST_AFTER:
                    on_lost(gcs)
                    return

    watcher = threading.Thread(target=watch, name="bulkscore-head-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()


def plan_pool(
    workers: int | None, cpus_per_worker: float | None, gpus_per_worker: float | None, shards: int
) -> PoolPlan:
    """How many actors, and what each asks of Ray: one per GPU when there are GPUs, else by CPUs."""
    import ray

    resources = ray.cluster_resources()
    total_cpus = resources.get("CPU", 1.0)
    total_gpus = resources.get("GPU", 0.0)
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if total_gpus >= 1 else 0.0)
    cpus = (
        cpus_per_worker
        if cpus_per_worker is not None
        else (1.0 if gpus else float(min(DEFAULT_CPUS_PER_WORKER, total_cpus)))
    )
    if workers is None:
        workers = int(total_gpus // gpus) if gpus else int(total_cpus // cpus)
    workers = max(1, min(workers, shards))
    if workers * cpus > total_cpus or workers * gpus > total_gpus:
        raise JobError(
            f"{workers} workers x ({cpus:g} CPU, {gpus:g} GPU) do not fit the cluster's "
            f"{total_cpus:g} CPU and {total_gpus:g} GPU; lower --workers, --cpus-per-worker or --gpus-per-worker"
        )
    return PoolPlan(workers, cpus, gpus)


class Room:
    """What the job says about the cluster's capacity (jobs.schedule asks); RayRoom gives Ray's figures."""

    def describe(self) -> str:
        return "no figures from the cluster"

    def fits_a_worker(self) -> bool | None:
        """Whether the cluster has the resources one more worker asks for now; None when unknown."""
        return None

    def start_failure(self, cause: str) -> str:
        """Why workers keep dying before they are ready, with what to change."""
        return f"workers keep dying before their model is loaded (last: {cause})"


class RayRoom(Room):
    def __init__(self, plan: PoolPlan, address: str | None) -> None:
        self.plan, self.address = plan, address

    def describe(self) -> str:
        import ray

        plan = self.plan
        asks = f"each worker asks for {plan.cpus_per_worker:g} CPU" + (
            f" and {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else ""
        )
        try:
            total, free = ray.cluster_resources(), ray.available_resources()
        except Exception as error:  # the cluster's figures are a courtesy; the sentence stands without
            return f"{asks}; the cluster's resources are unknown ({type(error).__name__})"
        has = f"the cluster has {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs free"
        if plan.gpus_per_worker or total.get("GPU"):
            has += f" and {free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs"
        return f"{asks}; {has}"

    def fits_a_worker(self) -> bool | None:
        import ray

        try:
            free = ray.available_resources()
        except Exception:  # as in describe: the figures are a courtesy
            return None
        plan = self.plan
        return free.get("CPU", 0) >= plan.cpus_per_worker and free.get("GPU", 0) >= plan.gpus_per_worker

    def start_failure(self, cause: str) -> str:
        text = super().start_failure(cause)
        if "never ran" in cause and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            text += (
                f". This process uses Ray's token authentication (RAY_AUTH_MODE=token) and the cluster at "
                f"{self.address} seems not to: run with RAY_AUTH_MODE=disabled, or start the cluster "
                "with RAY_AUTH_MODE=token and the same token"
            )
        return text
