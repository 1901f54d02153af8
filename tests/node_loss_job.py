"""A job on a three-node Ray cluster (all on 127.0.0.1) that loses a node while it runs.

Run by tests/test_cluster.py in a process of its own: python -m tests.node_loss_job MODEL OUTPUT.
Prints one JSON line: the job's summary plus the node removed.
"""

from __future__ import annotations

import json
import os
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


def runs_a_scorer(node) -> bool:
    """Whether one of this node's processes is a ShardScorer actor."""
    pids = descendants(node.all_processes["raylet"][0].process.pid)
    if not pids:
        return False
    names = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, pids))], capture_output=True, text=True)
    return "ray::ShardScorer" in names.stdout


def main() -> None:
    model, output = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()

    rows = [{"id": i, "question": f"{q['question']} ({i})", "answer": q["answer"]} for i, q in enumerate(QUESTIONS * 6)]
    questions = load_questions([write_jsonl(output.with_suffix(".jsonl"), rows)])
    spec = JobSpec(
        ("q",),
        locate(str(output)),
        ModelSpec(model, "folder", dtype="float32", device="cpu"),
        ScoringSettings(PromptSettings(), GenerationSettings(max_new_tokens=16), GradingSettings()),
        shard_size=4,
        limit=None,
    )
    reports: list = []
    job = threading.Thread(
        target=lambda: reports.append(
            run_job(
                spec,
                questions,
                RunOptions(workers=2, cpus_per_worker=1, keep_parts=True, quiet=True),
                lambda text: None,
            )
        )
    )
    job.start()

    parts = output.with_name(output.name + ".parts")
    removed = None
    deadline = time.monotonic() + 300
    while removed is None and job.is_alive() and time.monotonic() < deadline:
        if parts.exists() and list(parts.glob("part-*.parquet")):
            victim = next((n for n in workers if runs_a_scorer(n)), None)
            if victim is not None:
                cluster.remove_node(victim, allow_graceful=False)
                removed = victim.node_id
        time.sleep(0.05)
    job.join()
    print("SUMMARY " + json.dumps(reports[0].summary | {"removed_node": removed}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
