"""Nothing lost: workers killed mid-job, a row that kills every worker, the whole job killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from tests.conftest import CRASH_NEEDLE, HANG_NEEDLE
from tests.helpers import QUESTIONS, kill_job, write_jsonl

RESULTS = ("completion", "num_completion_tokens", "loss", "completion_loss", "reference_loss")
MANY = [
    {"id": i, "question": f"{q['question']} (variant {i})", "answer": q["answer"]} for i, q in enumerate(QUESTIONS * 5)
]


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def scorer_pids(raylet_pid: int) -> list[int]:
    """Process ids of this Ray instance's ShardScorer actors (children of its raylet)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [int(pid) for pid, ppid, args in rows if int(ppid) == raylet_pid and args.startswith("ray::ShardScorer")]


@pytest.mark.usefixtures("ray_instance")
def test_a_killed_worker_costs_no_row(tiny_model, tmp_path):
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    questions = write_jsonl(tmp_path / "q.jsonl", MANY)
    output = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    killed: list[int] = []

    def kill_a_worker_once_a_shard_is_done() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if parts.exists() and any(p.name.startswith("part-") for p in parts.iterdir()):
                for pid in scorer_pids(raylet):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_once_a_shard_is_done)
    killer.start()
    result = invoke(
        questions, "--model", tiny_model, "-o", output, "--max-new-tokens", "16", "--shard-size", "2", "--keep-parts"
    )
    killer.join()
    assert result.exit_code == 0, result.output
    assert killed
    assert "A worker died running rows " in result.stderr and "starting a replacement" in result.stderr
    table = pq.read_table(output).to_pydict()
    assert table["id"] == [q["id"] for q in MANY]  # every row once, in order
    assert table["error"] == [None] * len(MANY)
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["worker_deaths"] >= 1 and summary["errors"] == 0


@pytest.mark.usefixtures("ray_instance")
def test_a_row_that_kills_every_worker_is_isolated(tiny_model, tmp_path):
    rows = [dict(q) for q in QUESTIONS[:6]]
    rows[3]["question"] = f"{CRASH_NEEDLE}: how many gram per 6 kg?"
    questions = write_jsonl(tmp_path / "q.jsonl", rows)
    output = tmp_path / "answers.parquet"
    result = invoke(questions, "--model", tiny_model, "-o", output, "--max-new-tokens", "6", "--shard-size", "2")
    assert result.exit_code == 0, result.output
    table = pq.read_table(output).to_pydict()
    assert table["id"] == [q["id"] for q in rows]
    errors = table["error"]
    # Given up only after 3 deaths while it ran alone (the shard's own deaths before its split are
    # counted in all); a death pinned on an innocent piece only splits it, never condemns a row.
    deaths = re.match(r"worker died: 3 workers died running this row alone, (\d+) in all \(last: ", errors[3])
    assert deaths and int(deaths.group(1)) >= 4, errors
    assert errors[:3] + errors[4:] == [None] * 5, errors  # its shard-mate (row 2) was scored too
    assert table["completion"][2] is not None and table["finish_reason"][3] == "error"
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["errors"] == 1 and summary["error_kinds"] == {"worker died": 1}
    assert summary["worker_deaths"] >= 4
    # (Ray's raylet also reports each death on stdout, before the summary.)
    assert "rows       6 (6 samples, 1 errors)" in result.stdout.splitlines()
    # Rows scored in halves and quarters of their shard, after the deaths, to the last bit as in a job
    # that never saw the killer row.
    innocent = write_jsonl(tmp_path / "innocent.jsonl", rows[:3] + rows[4:])
    clean = tmp_path / "clean.parquet"
    assert invoke(innocent, "--model", tiny_model, "-o", clean, "--max-new-tokens", "6", "--quiet").exit_code == 0
    expected = pq.read_table(clean).to_pydict()
    for column in RESULTS:
        assert table[column][:3] + table[column][4:] == expected[column], column


@pytest.mark.usefixtures("ray_instance")
def test_a_row_that_hangs_its_worker_is_isolated_and_its_shard_mates_scored(tiny_model, tmp_path):
    """A worker that stops making progress (its model thread blocked, the process alive) is killed
    after --hang-timeout like a dead one; the row is isolated as `worker hung`."""
    rows = [dict(q) for q in QUESTIONS[:4]]
    rows[1]["question"] = f"{HANG_NEEDLE}: how many gram per 6 kg?"
    questions = write_jsonl(tmp_path / "q.jsonl", rows)
    output = tmp_path / "answers.parquet"
    options = ("--max-new-tokens", "4", "--shard-size", "2", "--workers", "1", "--hang-timeout", "2")
    result = invoke(questions, "--model", tiny_model, "-o", output, *options)
    assert result.exit_code == 0, result.output
    assert "A worker hung running rows 0-1 of shard 0" in result.stderr
    table = pq.read_table(output).to_pydict()
    assert table["id"] == [q["id"] for q in rows]
    assert table["error"][1].startswith("worker hung: 3 workers hung running this row alone"), table["error"]
    assert table["error"][:1] + table["error"][2:] == [None] * 3  # its shard-mate too
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["error_kinds"] == {"worker hung": 1} and summary["worker_hangs"] >= 3


SECRET = "hf_bulkscoreTestSecret0123456789"


@pytest.mark.usefixtures("ray_instance")
def test_a_job_killed_as_a_whole_resumes_without_redoing_finished_shards(tiny_model, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", MANY)
    output = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    command = [
        str(Path(sys.executable).parent / "bulkscore"),
        "run",
        str(questions),
        "--model",
        str(tiny_model),
        "-o",
        str(output),
        "--max-new-tokens",
        "16",
        "--shard-size",
        "4",
        "--keep-parts",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BULKSCORE_CRASH_ON_QUESTION")}
    env |= {"HF_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET}

    # Driver, Ray and workers: the whole job dies by SIGKILL once three shards are on disk.
    job = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.poll() is None:
        if parts.exists() and len(list(parts.glob("part-*.parquet"))) >= 3:
            break
        time.sleep(0.05)
    kill_job(job)
    first_out, first_err = job.stdout.read(), job.stderr.read()
    assert job.returncode == -signal.SIGKILL
    assert not output.exists()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert 3 <= len(finished) < 10
    assert not list(parts.glob(".*tmp*"))  # nothing half-written is left looking finished... or at all

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming: {len(finished)} of 10 shards already done in {parts}" in resumed.stderr
    assert {name: (parts / name).stat().st_mtime_ns for name in finished} == finished  # untouched
    assert len(list(parts.glob("part-*.parquet"))) == 10

    # The same rows, once each, as a run that was never interrupted.
    table = pq.read_table(output).to_pydict()
    assert table["id"] == [q["id"] for q in MANY] and table["error"] == [None] * len(MANY)
    clean = tmp_path / "clean.parquet"
    assert invoke(questions, "--model", tiny_model, "-o", clean, "--max-new-tokens", "16", "--quiet").exit_code == 0
    expected = pq.read_table(clean).to_pydict()
    for column in RESULTS:  # to the last bit
        assert table[column] == expected[column], column

    # No secret from the environment reaches the output, the summary, the checkpoints or the logs.
    written = [
        output.read_bytes(),
        output.with_suffix(".summary.json").read_bytes(),
        (parts / "manifest.json").read_bytes(),
        first_out,
        first_err,
        resumed.stdout.encode(),
        resumed.stderr.encode(),
    ]
    assert not any(SECRET.encode() in blob for blob in written)
