"""Several nodes (all on 127.0.0.1): a full cluster that loses a node, and a job under chaos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers import QUESTIONS

ROOT = Path(__file__).resolve().parent.parent


def cluster_job(model: Path, output: Path, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BULKSCORE_CRASH_ON_QUESTION")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.cluster_job", str(model), str(output), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["summary"] is not None, result
    return result


def every_row_once(output: Path, rows: int) -> None:
    table = pq.read_table(output).to_pydict()
    assert table["id"] == list(range(rows))
    assert table["error"] == [None] * rows


def test_a_full_cluster_that_loses_a_node_finishes_with_the_workers_it_has(tiny_model, tmp_path):
    """Three workers on three one-CPU nodes; a node is removed mid-job. Its worker's replacement has no
    room, holds no work, and the job finishes with two (it used to wait for it forever)."""
    output = tmp_path / "answers.parquet"
    result = cluster_job(tiny_model, output, "node-loss")
    summary = result["summary"]
    assert result["events"] and "removed a node" in result["events"][0]
    assert summary["nodes"] >= 2 and summary["worker_deaths"] >= 1 and summary["errors"] == 0
    assert any("2 of 3 workers running; waiting for room for 1 more" in s for s in result["said"]), result["said"]
    every_row_once(output, len(QUESTIONS) * 16)


def test_a_job_under_chaos_finishes_with_every_row_once(tiny_model, tmp_path):
    """A worker process SIGKILLed every 3-5 s from the job's third second (while loading or scoring),
    and a node removed and added back: every row once, no error rows, the deaths counted."""
    output = tmp_path / "answers.parquet"
    result = cluster_job(tiny_model, output, "chaos")
    summary = result["summary"]
    assert result["kills"] >= 3 and len(result["events"]) == 2, result
    assert summary["worker_deaths"] >= result["kills"] and summary["errors"] == 0, result
    every_row_once(output, len(QUESTIONS) * 32)
    print(
        f"chaos: {summary['rows']} rows, {result['kills']} kills, {summary['worker_deaths']} deaths, "
        f"{result['elapsed_s']} s"
    )
