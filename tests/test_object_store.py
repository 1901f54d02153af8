"""An output on an object store (S3, served by moto on 127.0.0.1): written, resumed, refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from tests.helpers import QUESTIONS, kill_job, write_jsonl


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("bench")
    yield fs
    fs.delete_dir_contents("bench", missing_dir_ok=True)


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


@pytest.mark.usefixtures("ray_instance")
def test_output_on_s3_is_written_and_resumed(bucket, s3_endpoint, tiny_model, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    output = f"s3://bench/run/answers.parquet{query}"
    args = [
        questions,
        "--model",
        tiny_model,
        "-o",
        output,
        "--max-new-tokens",
        "6",
        "--shard-size",
        "3",
        "--keep-parts",
    ]

    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[-1] == f"Wrote {output} and s3://bench/run/answers.summary.json{query}"
    table = pq.read_table("bench/run/answers.parquet", filesystem=bucket)
    assert table.column("id").to_pylist() == [q["id"] for q in QUESTIONS]
    with bucket.open_input_stream("bench/run/answers.summary.json") as f:
        assert json.loads(f.read())["rows"] == len(QUESTIONS)
    parts = "bench/run/answers.parquet.parts"
    listed = sorted(i.path.rsplit("/", 1)[1] for i in bucket.get_file_info(pafs.FileSelector(parts)))
    assert listed == ["manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    # Lose the output and one shard: the rerun scores only that shard.
    kept = bucket.get_file_info(f"{parts}/part-00000.parquet").mtime
    bucket.delete_file("bench/run/answers.parquet")
    bucket.delete_file(f"{parts}/part-00001.parquet")
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert f"Resuming: 2 of 3 shards already done in s3://bench/run/answers.parquet.parts{query}" in resumed.stderr
    assert bucket.get_file_info(f"{parts}/part-00000.parquet").mtime == kept
    assert pq.read_table("bench/run/answers.parquet", filesystem=bucket).to_pydict() == table.to_pydict()

    again = invoke(*args)
    assert (
        again.stdout.splitlines()[0] == f"{output} already holds this job's results (use --overwrite to score again)."
    )
    other = invoke(*args[:-1], "--max-new-tokens", "7")
    assert other.exit_code == 1 and "holds the results of a different job" in other.stderr


def test_an_unusable_uri_is_refused_before_work(tmp_path):
    result = invoke(write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1]), "-o", "nosuchfs://x/answers.parquet")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --output nosuchfs://x/answers.parquet: not a usable filesystem URI")


RESULTS = ("id", "completion", "num_completion_tokens", "loss", "completion_loss", "reference_loss")


@pytest.mark.usefixtures("ray_instance")
def test_input_read_from_s3_and_a_folder_output_there_resume_after_a_kill(bucket, s3_endpoint, tiny_model, tmp_path):
    """Questions read from the bucket (JSONL and Parquet), a folder output written there; the whole
    job SIGKILLed once two shards are up, then the same command finishes the rest. The rows equal
    a local run's, to the last bit."""
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    with bucket.open_output_stream("bench/in/q.jsonl") as f:
        f.write(write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:4]).read_bytes())
    more = pa.Table.from_pylist([q | {"answer": str(q["answer"])} for q in QUESTIONS[4:]])
    pq.write_table(more, "bench/in/more.parquet", filesystem=bucket)
    inputs = [f"s3://bench/in/q.jsonl{query}", f"s3://bench/in/more.parquet{query}"]
    output = f"s3://bench/out/{query}"
    options = ["--model", str(tiny_model), "--max-new-tokens", "12", "--shard-size", "1"]
    command = [str(Path(sys.executable).parent / "bulkscore"), "run", *inputs, "-o", output, *options]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    job = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    parts = pafs.FileSelector("bench/out", allow_not_found=True)

    def finished() -> list[str]:
        names = [i.path.rsplit("/", 1)[1] for i in bucket.get_file_info(parts)]
        return sorted(n for n in names if n.startswith("part-"))

    while time.monotonic() < deadline and job.poll() is None and len(finished()) < 2:
        time.sleep(0.1)
    kill_job(job)
    assert job.returncode == -signal.SIGKILL, job.stderr.read()
    done = finished()
    assert 2 <= len(done) < len(QUESTIONS)

    resumed = invoke(*inputs, "-o", output, *options)
    assert resumed.exit_code == 0, resumed.output
    assert f"Resuming: {len(done)} of {len(QUESTIONS)} shards already done" in resumed.stderr
    assert len(finished()) == len(QUESTIONS)

    local = tmp_path / "local.parquet"
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    assert invoke(tmp_path / "all.jsonl", "-o", local, *options, "--quiet").exit_code == 0
    written = pq.read_table("bench/out", filesystem=bucket).to_pydict()
    expected = pq.read_table(local).to_pydict()
    for column in RESULTS:
        assert written[column] == expected[column], column
    with bucket.open_input_stream("bench/out.summary.json") as f:
        assert json.loads(f.read())["rows"] == len(QUESTIONS)
