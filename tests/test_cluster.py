"""Several nodes: workers spread over them, and a node lost mid-job costs no row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers import QUESTIONS

ROOT = Path(__file__).resolve().parent.parent


def test_a_node_removed_mid_job_costs_no_row(tiny_model, tmp_path):
    output = tmp_path / "answers.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BULKSCORE_CRASH_ON_QUESTION")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.node_loss_job", str(tiny_model), str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert summary["removed_node"] is not None
    assert summary["nodes"] == 2  # two workers, on two different nodes
    assert summary["worker_deaths"] >= 1
    assert summary["errors"] == 0
    table = pq.read_table(output).to_pydict()
    assert table["id"] == list(range(len(QUESTIONS) * 6))
    assert table["error"] == [None] * len(table["id"])
