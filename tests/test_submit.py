"""`bulkscore submit/status/logs/stop` against a Ray head started by the test, on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from tests.helpers import QUESTIONS, start_head, stop_head, write_jsonl

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    """`ray start --head` with its dashboard (the Jobs API) on 127.0.0.1; stopped by process id."""
    started = start_head()
    try:
        yield started
    finally:
        stop_head(started)


@pytest.fixture
def jobs_api(head) -> str:
    return head["jobs"]


@pytest.fixture
def token_auth(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")


def bulkscore(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


@pytest.mark.usefixtures("token_auth")
def test_submit_follows_the_job_and_writes_the_output(jobs_api, tiny_model, tmp_path):
    head = jobs_api
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    output = tmp_path / "answers.parquet"
    result = bulkscore(
        "submit",
        "--address",
        head,
        "--",
        questions,
        "--model",
        tiny_model,
        "-o",
        output,
        "--max-new-tokens",
        "4",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("Submitted job raysubmit_")
    assert result.stderr.rstrip().endswith("succeeded")
    assert "rows       3 (3 samples, 0 errors)" in result.stdout  # the job's own output, streamed
    assert pq.read_table(output).column("id").to_pylist() == [q["id"] for q in QUESTIONS[:3]]


@pytest.mark.usefixtures("token_auth")
def test_a_failed_job_makes_submit_fail_with_its_error(jobs_api, tmp_path):
    head = jobs_api
    result = bulkscore("submit", "--address", head, "--", tmp_path / "missing.jsonl", "-o", tmp_path / "a.parquet")
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'missing.jsonl'}: no such file or folder" in result.stdout  # the job's log
    assert "Error: job raysubmit_" in result.stderr and " failed: " in result.stderr


@pytest.mark.usefixtures("token_auth")
def test_no_wait_then_status_logs_and_stop(jobs_api, tiny_model, tmp_path):
    head = jobs_api
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    quick = bulkscore(
        "submit",
        "--address",
        head,
        "--no-wait",
        "--",
        questions,
        "--model",
        tiny_model,
        "-o",
        tmp_path / "a.parquet",
        "--max-new-tokens",
        "4",
        "--quiet",
    )
    assert quick.exit_code == 0, quick.output
    job_id = quick.stdout.strip()
    assert job_id.startswith("raysubmit_")
    follow = bulkscore("logs", job_id, "--address", head, "--follow")
    assert follow.exit_code == 0 and "rows       2 (2 samples, 0 errors)" in follow.stdout
    assert bulkscore("status", job_id, "--address", head).stdout.startswith("SUCCEEDED")
    assert "rows       2 (2 samples, 0 errors)" in bulkscore("logs", job_id, "--address", head).stdout

    slow = bulkscore(
        "submit",
        "--address",
        head,
        "--no-wait",
        "--",
        write_jsonl(tmp_path / "many.jsonl", QUESTIONS * 50),
        "--model",
        tiny_model,
        "-o",
        tmp_path / "b.parquet",
        "--max-new-tokens",
        "64",
        "--shard-size",
        "8",
    )
    job_id = slow.stdout.strip()
    deadline = time.monotonic() + 60
    while (
        not bulkscore("status", job_id, "--address", head).stdout.startswith("RUNNING") and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    stopped = bulkscore("stop", job_id, "--address", head)
    assert (stopped.exit_code, stopped.stdout) == (0, f"Stopped job {job_id}\n")
    while (
        not bulkscore("status", job_id, "--address", head).stdout.startswith("STOPPED") and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert bulkscore("status", job_id, "--address", head).stdout.startswith("STOPPED")


def test_wrong_token_and_missing_address_are_clear(jobs_api, monkeypatch, tmp_path):
    head = jobs_api
    # Ray caches the token per process, so a wrong one is tried in a fresh process.
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-cluster-token"}
    wrong = subprocess.run(
        [str(BIN / "bulkscore"), "status", "raysubmit_x", "--address", head],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1
    assert wrong.stderr.startswith(
        f"Error: cannot use the Ray Jobs API at {head}: Authentication failed: Forbidden: Invalid authentication token"
    )
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    no_token = subprocess.run(
        [str(BIN / "bulkscore"), "status", "raysubmit_x", "--address", head],
        env={k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_token.returncode == 1
    assert no_token.stderr.startswith(
        f"Error: cannot use the Ray Jobs API at {head}: Token authentication is enabled but Ray couldn't find a"
    )
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    missing = bulkscore("status", "raysubmit_x")
    assert (missing.exit_code, missing.stderr) == (
        1,
        "Error: no Ray Jobs address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS\n",
    )
    unknown = bulkscore("status", "raysubmit_x", "--address", head)
    assert (unknown.exit_code, unknown.stderr) == (
        1,
        "Error: cannot read job raysubmit_x: Request failed with status code 404: Job raysubmit_x does not exist.\n",
    )


@pytest.mark.parametrize("kind", ["gcs", "client"])
def test_run_joins_a_cluster_by_address(head, tiny_model, tmp_path, kind):
    """`run --address HOST:PORT` (or ray://HOST:PORT) uses that cluster, not a private instance; the
    cluster's token (~/.ray/auth_token) is sent without RAY_AUTH_MODE being set, as `submit` does."""
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    output = tmp_path / "answers.parquet"
    unset = ("RAY_ADDRESS", "BULKSCORE_CRASH_ON_QUESTION", "RAY_AUTH_MODE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [
            str(BIN / "bulkscore"),
            "run",
            str(questions),
            "--model",
            str(tiny_model),
            "-o",
            str(output),
            "--max-new-tokens",
            "4",
            "--address",
            head[kind],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"for 1 shard(s) on the Ray cluster at {head[kind]}..." in done.stderr
    assert pq.read_table(output).column("error").to_pylist() == [None] * 3


@pytest.mark.usefixtures("token_auth")
def test_runtime_env_and_working_dir_reach_the_job(jobs_api, tmp_path):
    from ray.job_submission import JobSubmissionClient

    (tmp_path / "work").mkdir()
    write_jsonl(tmp_path / "work" / "q.jsonl", QUESTIONS[:1])
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars:\n  BULKSCORE_CACHE: /tmp/bulkscore-job-cache\n")
    result = bulkscore(
        "submit",
        "--address",
        jobs_api,
        "--no-wait",
        "--working-dir",
        tmp_path / "work",
        "--runtime-env",
        env_file,
        "--",
        "q.jsonl",
        "--model",
        "./no-model",
    )  # ends at once
    assert result.exit_code == 0, result.output
    runtime_env = JobSubmissionClient(jobs_api).get_job_info(result.stdout.strip()).runtime_env
    assert runtime_env["env_vars"] == {"BULKSCORE_CACHE": "/tmp/bulkscore-job-cache"}
    assert runtime_env["working_dir"].startswith("gcs://")  # uploaded from tmp_path/work


def test_one_worker_per_gpu_by_default(monkeypatch):
    import ray

    from bulkscore.jobs.cluster import PoolPlan, plan_pool

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 4.0})
    assert plan_pool(None, None, None, shards=100) == PoolPlan(workers=4, cpus_per_worker=1.0, gpus_per_worker=1.0)
    assert plan_pool(None, None, 0.5, shards=100) == PoolPlan(workers=8, cpus_per_worker=1.0, gpus_per_worker=0.5)
    assert plan_pool(None, None, None, shards=2).workers == 2  # never more workers than shards
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert plan_pool(None, None, None, shards=100) == PoolPlan(workers=4, cpus_per_worker=4.0, gpus_per_worker=0.0)


@pytest.mark.usefixtures("token_auth")
def test_a_working_dir_with_its_own_jobs_and_workers_packages_runs(jobs_api, tiny_model, tmp_path):
    """--working-dir goes first on the job's PYTHONPATH; its jobs/ and workers/ shadow nothing of ours."""
    project = tmp_path / "project"
    for name in ("jobs", "workers"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name}')\n")
    questions = write_jsonl(project / "q.jsonl", QUESTIONS[:2])
    output = tmp_path / "answers.parquet"
    result = bulkscore(
        "submit",
        "--address",
        jobs_api,
        "--working-dir",
        project,
        "--",
        questions,
        "--model",
        tiny_model,
        "-o",
        output,
        "--max-new-tokens",
        "4",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(output).num_rows == 2
