"""Small helpers the tests share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
