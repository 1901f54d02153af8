"""`bulkscore run` end to end through the CLI, on a tiny model and a shared private Ray instance."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from tests.helpers import QUESTIONS, write_jsonl

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("sample", pa.int32()),
        ("question", pa.string()),
        ("reference", pa.string()),
        ("completion", pa.string()),
        ("answer_text", pa.string()),
        ("answer", pa.float64()),
        ("is_correct", pa.bool_()),
        ("loss", pa.float64()),
        ("completion_loss", pa.float64()),
        ("reference_loss", pa.float64()),
        ("num_prompt_tokens", pa.int32()),
        ("num_completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
    ]
)
SUMMARY_KEYS = {
    "rows",
    "samples",
    "errors",
    "error_kinds",
    "worker_deaths",
    "worker_hangs",
    "nodes",
    "answered",
    "correct",
    "accuracy",
    "answer_rate",
    "mean_loss",
    "mean_completion_loss",
    "mean_reference_loss",
    "prompt_tokens",
    "completion_tokens",
    "elapsed_s",
    "rows_per_s",
    "tokens_per_s",
    "model",
    "adapter",
    "workers",
    "fingerprint",
    "versions",
    "timings",
    "device",
    "dtype",
    "invariant",
}


@pytest.fixture
def questions(tmp_path) -> Path:
    return write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)


def invoke(*args: str):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def run_tiny(tiny_model, questions, output, *extra):
    return invoke(questions, "--model", tiny_model, "-o", output, "--max-new-tokens", "8", "--quiet", *extra)


@pytest.mark.usefixtures("ray_instance")
def test_run_writes_the_contract(tiny_model, questions, tmp_path):
    output = tmp_path / "out" / "answers.parquet"
    output.parent.mkdir()
    result = run_tiny(tiny_model, questions, output, "--shard-size", "3", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "rows       8 (8 samples, 0 errors)"
    assert lines[-1] == f"Wrote {output} and {output.with_suffix('.summary.json')}"
    assert result.stderr == ""  # --quiet: no progress bar, no messages

    table = pq.read_table(output)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    assert table.column("id").to_pylist() == [q["id"] for q in QUESTIONS]
    assert table.column("question").to_pylist() == [q["question"] for q in QUESTIONS]
    assert table.column("reference").to_pylist() == ["6000", "2500", "180", "0.75", "2000", "Paris", "90", "16.09344"]
    assert table.column("sample").to_pylist() == [0] * 8
    assert table.column("error").to_pylist() == [None] * 8
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(n > 0 for n in table.column("num_completion_tokens").to_pylist())
    assert all(x is not None for x in table.column("reference_loss").to_pylist())

    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["rows"] == summary["samples"] == 8 and summary["errors"] == 0
    assert set(summary["timings"]) == {"startup_s", "startup", "generate_s", "loss_s"}
    assert 0 < summary["timings"]["startup_s"] < summary["elapsed_s"]
    # Start-up piece by piece: Ray (joined here: the tests' instance), the worker placed, its load.
    pieces = summary["timings"]["startup"]
    assert set(pieces) == {"ray_s", "placing_s", "load_s", "imports_s", "source_s", "tokenizer_s", "model_s", "pack_s"}
    assert pieces["ray_s"] + pieces["placing_s"] + pieces["load_s"] == pytest.approx(
        summary["timings"]["startup_s"], abs=0.01
    )
    assert pieces["load_s"] >= pieces["tokenizer_s"] + pieces["model_s"] > 0
    shown = [line for line in lines if line.startswith("start-up   ")]
    assert len(shown) == 1 and "tokenizer" in shown[0] and "packing" in shown[0], lines
    assert summary["timings"]["generate_s"] > 0 and summary["timings"]["loss_s"] > 0
    assert summary["completion_tokens"] == sum(table.column("num_completion_tokens").to_pylist())
    assert summary["mean_loss"] == pytest.approx(sum(table.column("loss").to_pylist()) / 8, abs=1e-6)
    metadata = pq.ParquetFile(output).metadata.metadata  # the file's key-value metadata
    assert json.loads(metadata[b"bulkscore.summary"]) == summary
    assert json.loads(metadata[b"bulkscore.settings"])["shard_size"] == 3
    assert not output.with_name("answers.parquet.parts").exists()


SAMPLING = ("--temperature", "0.8", "--top-p", "0.9", "--num-samples", "3", "--seed", "11")
RESULT_COLUMNS = ("completion", "num_completion_tokens", "finish_reason", "loss", "completion_loss", "reference_loss")


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("decoding", [(), SAMPLING], ids=["greedy", "seeded-samples"])
def test_results_do_not_depend_on_shard_size_batch_size_or_workers(tiny_model, questions, tmp_path, decoding, dtype):
    """Bitwise: one worker with two threads, rows one at a time in shards of 3, against two workers
    with a thread each, eight rows at a time in shards of 5."""
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    first = run_tiny(tiny_model, questions, a, "--dtype", dtype, "--shard-size", "3", "--batch-size", "1", *decoding)
    assert first.exit_code == 0, first.output
    result = run_tiny(
        tiny_model,
        questions,
        b,
        "--dtype",
        dtype,
        "--shard-size",
        "5",
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        *decoding,
    )
    assert result.exit_code == 0, result.output
    ta, tb = pq.read_table(a).to_pydict(), pq.read_table(b).to_pydict()
    assert None not in ta["loss"] and len(set(ta["completion"])) > 1
    for column in RESULT_COLUMNS:
        assert ta[column] == tb[column], column
    summaries = [json.loads(path.with_suffix(".summary.json").read_text()) for path in (a, b)]
    assert [s["workers"] for s in summaries] == [1, 2]
    assert [(s["dtype"], s["device"], s["invariant"]) for s in summaries] == [(dtype, "cpu", True)] * 2


@pytest.mark.usefixtures("ray_instance")
def test_rerun_resumes_and_a_different_job_is_refused(tiny_model, questions, tmp_path):
    output = tmp_path / "answers.parquet"
    parts = tmp_path / "answers.parquet.parts"
    assert run_tiny(tiny_model, questions, output, "--shard-size", "3", "--keep-parts").exit_code == 0
    assert sorted(p.name for p in parts.iterdir()) == [
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    first = pq.read_table(output).to_pydict()
    mtime = output.stat().st_mtime_ns

    again = run_tiny(tiny_model, questions, output, "--shard-size", "3", "--keep-parts")
    assert again.exit_code == 0
    assert (
        again.stdout.splitlines()[0] == f"{output} already holds this job's results (use --overwrite to score again)."
    )
    assert output.stat().st_mtime_ns == mtime

    # A job killed before merging: two shards finished, one not. The rerun scores only that one.
    output.unlink()
    (parts / "part-00001.parquet").unlink()
    kept = (parts / "part-00000.parquet").stat().st_mtime_ns
    resumed = invoke(
        questions, "--model", tiny_model, "-o", output, "--max-new-tokens", "8", "--shard-size", "3", "--keep-parts"
    )
    assert resumed.exit_code == 0, resumed.output
    assert f"Resuming: 2 of 3 shards already done in {parts}" in resumed.stderr
    assert (parts / "part-00000.parquet").stat().st_mtime_ns == kept  # not recomputed, not rewritten
    assert (parts / "part-00001.parquet").exists()
    assert pq.read_table(output).to_pydict() == first

    other = run_tiny(tiny_model, questions, output, "--max-new-tokens", "9")
    assert other.exit_code == 1
    assert "holds the results of a different job" in other.stderr and "--overwrite" in other.stderr
    assert run_tiny(tiny_model, questions, output, "--max-new-tokens", "9", "--overwrite").exit_code == 0
