"""Several nodes (all on 127.0.0.1): a full cluster that loses a node, and a job under chaos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers import QUESTIONS, write_jsonl

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
    # The waiting line mid-job comes only once the replacement has waited 3 s, and the job may end
    # sooner; the closing line is said whenever it ends.
    [ending] = [s for s in result["said"] if "never found room" in s]
    assert "Finished with 2 of 3 workers running; 1 more never found room (each worker asks for 1 CPU; " in ending
    assert "the cluster has 0 of " in ending, ending
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


def test_a_cluster_without_tokens_is_detected_or_one_error_line(tiny_model, tmp_path):
    """A token file at home (any local run leaves one) used to switch on token mode against a cluster
    that does not use it: every worker died, a 40-line traceback. Now the mode is tried first and
    the job runs; with RAY_AUTH_MODE=token forced, one `Error:` line says what to change."""
    questions = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS[:2])
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a" * 64)
    env = plain_env()
    server = serve(env)
    try:
        address = server.stdout.readline().split()[1]

        def run(**extra) -> subprocess.CompletedProcess:
            output = tmp_path / f"answers-{len(extra)}.parquet"
            options = ["--workers", "1", "--cpus-per-worker", "1", "--max-new-tokens", "4"]
            return subprocess.run(
                run_command(questions, tiny_model, address, output, options),
                env=env | {"HOME": str(home)} | extra,
                capture_output=True,
                text=True,
                timeout=300,
            )

        guessed = run()
        assert guessed.returncode == 0, guessed.stderr[-3000:]
        forced = run(RAY_AUTH_MODE="token")
        assert forced.returncode == 1 and "Traceback" not in forced.stderr, forced.stderr[-3000:]
        [error] = [line for line in forced.stderr.splitlines() if line.startswith("Error:")]
        assert "it never ran" in error and "run with RAY_AUTH_MODE=disabled" in error, error
    finally:
        server.stdin.close()
        server.wait(timeout=60)


def run_command(questions: Path, model: Path, address: str, output: Path, options: list[str]) -> list[str]:
    """`bulkscore run` against the cluster at `address`, in a process of its own."""
    program = [sys.executable, "-c", "from bulkscore.jobs.cli import cli; cli()"]
    return [*program, "run", str(questions), "--model", str(model), "--address", address, "-o", str(output), *options]


def plain_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "BULKSCORE_CRASH"))}


def serve(env: dict) -> subprocess.Popen:
    """A two-CPU loopback cluster without token authentication; closing its stdin shuts it down."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cluster_job", "serve"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_the_head_going_away_mid_job_is_one_error_line(tiny_model, tmp_path):
    """The cluster's head dies while the job runs: one `Error:` line within seconds (Ray's own driver
    would wait a minute and end with a C++ log line), exit 1, the finished shards kept."""
    rows = [{"id": i, "question": f"How many gram are there per {i} kg?", "answer": 1000 * i} for i in range(400)]
    questions = write_jsonl(tmp_path / "questions.jsonl", rows)
    output = tmp_path / "answers.parquet"
    env = plain_env() | {"RAY_AUTH_MODE": "disabled"}
    server = serve(env)
    address = server.stdout.readline().split()[1]
    options = ["--workers", "1", "--cpus-per-worker", "1", "--max-new-tokens", "32", "--shard-size", "4", "--quiet"]
    job = subprocess.Popen(
        run_command(questions, tiny_model, address, output, options),
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    parts = tmp_path / "answers.parquet.parts"
    deadline = time.monotonic() + 120
    while not (parts.exists() and list(parts.glob("part-*.parquet"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    server.stdin.close()
    server.wait(timeout=60)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    [error] = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith(f"Error: lost the Ray head at {address} mid-job") and str(parts) in error
    assert list(parts.glob("part-*.parquet"))
