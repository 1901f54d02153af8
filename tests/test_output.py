"""The output at scale: gathered part by part (never whole), as one file or as a folder dataset."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bulkscore.jobs.cli import cli
from tests.helpers import QUESTIONS, write_jsonl

ASSEMBLE = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bulkscore.jobs import gather
    from bulkscore.jobs.parts import PartStore
    from bulkscore.jobs.shards import plan_shards
    from bulkscore.jobs.storage import locate

    folder, rows, shard_size, row_group_bytes = sys.argv[1], *map(int, sys.argv[2:])
    gather.ROW_GROUP_BYTES = row_group_bytes
    output = locate(folder + "/answers.parquet")
    store = PartStore(output)
    plan = plan_shards(rows, shard_size)
    pool = pa.default_memory_pool()
    before = pool.max_memory()
    summary = gather.write_file_output(store.parts(plan), output, {}, lambda t: {"samples": t.counts["samples"]})
    print(json.dumps({"peak": pool.max_memory() - before, "summary": summary}))
    """
)


def fake_part(start: int, stop: int) -> pa.Table:
    """Output rows with the columns the tally reads and a wide text column, as a completion is."""
    n = stop - start
    return pa.table(
        {
            "id": pa.array(range(start, stop), pa.int64()),
            "reference": pa.array(["1"] * n),
            "completion": pa.array([f"{i:06d}" * 170 for i in range(start, stop)]),  # ~1 KB a row
            "answer_text": pa.array(["1"] * n),
            "is_correct": pa.array([True] * n),
            "error": pa.array([None] * n, pa.string()),
            "loss": pa.array([1.0] * n),
            "num_prompt_tokens": pa.array([3] * n, pa.int32()),
            "num_completion_tokens": pa.array([4] * n, pa.int32()),
        }
    )


def test_the_output_file_is_gathered_part_by_part_and_never_held_whole(tmp_path):
    """100 parts of ~1 MB each make a ~100 MB output; in a fresh process (so that pyarrow's peak
    allocation is this work's alone) gathering them into one file never holds more than a few
    parts at once. Row groups are capped at 2 MB here: the cap, not the output's size, bounds it."""
    from bulkscore.jobs.parts import PartStore
    from bulkscore.jobs.shards import plan_shards
    from bulkscore.jobs.storage import locate

    rows, shard_size = 100_000, 1_000
    output = locate(str(tmp_path / "answers.parquet"))
    store = PartStore(output)
    plan = plan_shards(rows, shard_size)
    store.open("fingerprint", plan, {}, overwrite=False)
    for shard in plan:
        store.write(shard, fake_part(shard.start, shard.stop))
    whole = sum(fake_part(s.start, s.stop).nbytes for s in plan)

    found = subprocess.run(
        [sys.executable, "-c", ASSEMBLE, str(tmp_path), str(rows), str(shard_size), str(2 << 20)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(found.stdout)
    assert report["summary"] == {"samples": rows}
    assert report["peak"] < whole / 8, (report["peak"], whole)  # ~100 MB of rows, a few MB held

    written = pq.ParquetFile(tmp_path / "answers.parquet")
    assert written.metadata.num_rows == rows
    assert 10 <= written.metadata.num_row_groups <= 100  # gathered into groups, not a group per part
    assert written.read(columns=["id"]).column("id").to_pylist() == list(range(rows))  # input order
    assert json.loads(written.metadata.metadata[b"bulkscore.summary"]) == {"samples": rows}


@pytest.fixture
def questions(tmp_path) -> Path:
    return write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)


def run(tiny_model, questions, output, *extra):
    args = [questions, "--model", tiny_model, "-o", output, "--max-new-tokens", "6", "--quiet", "--shard-size", "3"]
    return CliRunner().invoke(cli, ["run", *map(str, args), *extra])


@pytest.mark.usefixtures("ray_instance")
def test_a_folder_output_holds_the_same_rows_as_a_file_and_resumes(tiny_model, questions, tmp_path):
    single = run(tiny_model, questions, tmp_path / "answers.parquet")
    assert single.exit_code == 0, single.output
    folder = tmp_path / "answers"
    first = run(tiny_model, questions, f"{folder}/")
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[-1] == f"Wrote {folder}/ and {tmp_path / 'answers.summary.json'}"

    # A Parquet dataset: a file per shard, that pyarrow (and Spark, Ray Data, DuckDB) read as one.
    assert sorted(p.name for p in folder.iterdir()) == [
        "_manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    expected = pq.read_table(tmp_path / "answers.parquet").replace_schema_metadata(None)
    assert pq.read_table(folder).replace_schema_metadata(None).equals(expected)
    summary = json.loads((tmp_path / "answers.summary.json").read_text())
    assert summary["samples"] == 8 and summary["fingerprint"]

    # Finished: the same command again scores nothing. A lost shard (and summary) is redone alone.
    again = run(tiny_model, questions, folder)
    assert again.exit_code == 0 and "already holds this job's results" in again.stdout
    (folder / "part-00001.parquet").unlink()
    (tmp_path / "answers.summary.json").unlink()
    resumed = CliRunner().invoke(
        cli,
        ["run", str(questions), "--model", str(tiny_model), "-o", str(folder), "--max-new-tokens", "6"]
        + ["--shard-size", "3"],
    )
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming: 2 of 3 shards already done" in resumed.stderr
    assert pq.read_table(folder).replace_schema_metadata(None).equals(expected)

    # Another job on the same folder is refused, as for a file.
    other = run(tiny_model, questions, folder, "--max-new-tokens", "5")
    assert other.exit_code == 1 and "holds the results of a different job" in other.stderr
