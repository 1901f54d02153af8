"""Small helpers the tests share."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTIONS = [
    {"id": 10, "question": "How many gram are there per 6 kg?", "answer": 6000},
    {"id": 11, "question": "Convert 2.5 km to m.", "answer": 2500.0},
    {"id": 12, "question": "What is 3 hour in minute?", "answer": 180},
    {"id": 13, "question": "Express 750 mL in liter.", "answer": 0.75},
    {"id": 14, "question": "How many byte are in 2 kilobyte?", "answer": 2000},
    {"id": 15, "question": "What is the capital of France?", "answer": "Paris"},
    {"id": 16, "question": "How many second are in 1.5 minute?", "answer": 90},
    {"id": 17, "question": "Convert 10 mph to km/h, please, and explain the steps in detail.", "answer": 16.09344},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def descendants(root: int) -> list[int]:
    """Process ids of every process below `root`."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL a job started with start_new_session=True: driver, Ray, and Ray's workers, which
    run in process groups of their own."""
    processes = descendants(job.pid)
    os.killpg(job.pid, signal.SIGKILL)
    for pid in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(*marks: str) -> list[int]:
    """Processes whose command line holds one of `marks` (a Ray head's temp dir or GCS address)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(mark in args for mark in marks):
                    pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def start_head() -> dict:
    """`ray start --head` on 127.0.0.1 with its dashboard (the Ray Jobs API); returns its addresses."""
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="bs-", dir="/tmp")  # short: Ray's socket paths must fit
    gcs, dashboard, client = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BULKSCORE_CRASH_ON_QUESTION")}
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{bin_dir}:{env.get('PATH', '')}"}
    subprocess.run(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return {
        "jobs": f"http://127.0.0.1:{dashboard}",
        "gcs": f"127.0.0.1:{gcs}",
        "client": f"ray://127.0.0.1:{client}",
        "temp_dir": temp_dir,
    }


def stop_head(head: dict) -> None:
    """Stop a head from start_head by process id (never `ray stop`, which stops every Ray here)."""
    pids = processes_of(head["temp_dir"], head["gcs"] + " ")
    pids += [child for pid in pids for child in descendants(pid)]
    for pid in set(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(head["temp_dir"], ignore_errors=True)


CHROMIUM = "chromium"  # Debian's package; `make test` installs it
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # a page that tried the network would find nothing
)


def browser(page: Path, *args: str, width: int = 1280, height: int = 2400) -> subprocess.CompletedProcess:
    """Open `page` in headless Chromium as a person would, with a fresh profile; fails loudly when
    Chromium is missing (install Debian's `chromium`, as `make test` does)."""
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError("these tests need Debian's chromium: apt-get install chromium (make test does)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [
                CHROMIUM,
                *BROWSER_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                *args,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done
