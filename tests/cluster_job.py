"""Jobs on a three-node Ray cluster (all on 127.0.0.1, one CPU each) that loses workers and nodes.

Run by tests/test_cluster.py in a process of its own: python -m tests.cluster_job MODEL OUTPUT MODE
(or `python -m tests.cluster_job serve`: a plain two-CPU cluster, no token authentication).

- node-loss: three workers fill the cluster; once two parts are on disk a node is removed, so its
  worker's replacement finds no room: the job must go on with two.
- chaos: from the job's third second a random worker process is SIGKILLed every 3-5 s (while
  loading or scoring), and a node is removed (after 4 of 32 parts), then added back (after 12).

Prints one JSON line: the job's summary plus what was done to it (and its messages).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from bulkscore.jobs.questions import load_questions  # noqa: E402
from bulkscore.jobs.run import RunOptions, run_job  # noqa: E402
from bulkscore.jobs.settings import JobSpec  # noqa: E402
from bulkscore.jobs.storage import locate  # noqa: E402
from bulkscore.workers.contract import (  # noqa: E402
    GenerationSettings,
    GradingSettings,
    ModelSpec,
    PromptSettings,
    ScoringSettings,
)
from tests.helpers import QUESTIONS, descendants, write_jsonl  # noqa: E402


def scorers(node) -> list[int]:
    """Process ids of this node's ShardScorer actors."""
    pids = descendants(node.all_processes["raylet"][0].process.pid)
    if not pids:
        return []
    found = subprocess.run(["ps", "-o", "pid=,args=", "-p", ",".join(map(str, pids))], capture_output=True, text=True)
    return [int(line.split()[0]) for line in found.stdout.splitlines() if "ray::ShardScorer" in line]


def serve() -> None:
    """A two-CPU cluster without token authentication, until standard input closes."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    print(f"ADDRESS {cluster.address}", flush=True)
    sys.stdin.read()
    cluster.shutdown()


def main() -> None:
    if sys.argv[1] == "serve":
        return serve()
    model, output, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()

    copies = 16 if mode == "node-loss" else 32
    rows = [
        {"id": i, "question": f"{q['question']} ({i})", "answer": q["answer"]} for i, q in enumerate(QUESTIONS * copies)
    ]
    questions = load_questions([write_jsonl(output.with_suffix(".jsonl"), rows)])
    spec = JobSpec(
        ("q",),
        locate(str(output)),
        ModelSpec(model, "folder", dtype="float32", device="cpu"),
        ScoringSettings(PromptSettings(), GenerationSettings(max_new_tokens=16), GradingSettings()),
        shard_size=3 if mode == "node-loss" else 8,
        limit=None,
    )
    said: list[str] = []
    reports: list = []
    options = RunOptions(workers=3, cpus_per_worker=1, keep_parts=True, quiet=True)
    started = time.monotonic()

    def say(text: str) -> None:
        said.append(f"{time.monotonic() - started:.1f} s: {text}")

    job = threading.Thread(target=lambda: reports.append(run_job(spec, questions, options, say)))
    job.start()

    events: list[str] = []
    parts = output.with_name(output.name + ".parts")
    pick = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
    kills = 0
    next_kill = started + 3.0
    removed = None
    while job.is_alive() and time.monotonic() - started < 400:
        now = time.monotonic()
        if mode == "node-loss":
            if removed is None and parts.exists() and len(list(parts.glob("part-*.parquet"))) >= 2:
                victim = next((n for n in nodes if scorers(n)), None)
                if victim is not None:
                    cluster.remove_node(victim, allow_graceful=False)
                    removed = victim
                    events.append(f"{now - started:.1f} s: removed a node")
        else:
            if now >= next_kill:
                pids = [pid for node in [cluster.head_node, *nodes] for pid in scorers(node)]
                if pids:
                    os.kill(pick.choice(pids), signal.SIGKILL)
                    kills += 1
                next_kill = now + pick.uniform(3.0, 5.0)
            done = len(list(parts.glob("part-*.parquet"))) if parts.exists() else 0
            if removed is None and done >= 4:
                removed = nodes.pop(0)
                cluster.remove_node(removed, allow_graceful=False)
                events.append(f"{now - started:.1f} s: removed a node")
            elif removed is not None and len(nodes) < 2 and done >= 12:
                nodes.append(cluster.add_node(num_cpus=1))
                events.append(f"{now - started:.1f} s: added a node")
        time.sleep(0.1)
    job.join(timeout=60)
    result = {
        "mode": mode,
        "elapsed_s": round(time.monotonic() - started, 1),
        "kills": kills,
        "events": events,
        "said": said,
        "summary": reports[0].summary if reports else None,
    }
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
