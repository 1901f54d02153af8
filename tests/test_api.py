"""bulkscore.run, .report and .export from Python: every kind of input, the same checks and errors
as the command, nothing written without an output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bulkscore
import bulkscore.jobs.run
from tests.helpers import QUESTIONS, write_jsonl

OPTIONS = {"max_new_tokens": 6, "quiet": True}
IDS = [q["id"] for q in QUESTIONS[:4]]


def tiny(tiny_model) -> dict:
    return OPTIONS | {"model": str(tiny_model)}


@pytest.fixture
def rows():
    return [dict(q) for q in QUESTIONS[:4]]


@pytest.mark.usefixtures("ray_instance")
def test_every_kind_of_input_gives_the_same_rows(tiny_model, tmp_path, rows, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl = write_jsonl(tmp_path / "q.jsonl", rows)
    halves = [write_jsonl(tmp_path / "a.jsonl", rows[:2]), write_jsonl(tmp_path / "b.jsonl", rows[2:])]
    inputs = {
        "a path": str(jsonl),
        "a list of paths": halves,
        "a pyarrow Table": pa.Table.from_pylist(rows),
        "a pandas DataFrame": pd.DataFrame(rows),
        "a list of dicts": rows,
    }
    before = set(tmp_path.iterdir())
    results = {name: bulkscore.run(given, **tiny(tiny_model)) for name, given in inputs.items()}
    assert set(tmp_path.iterdir()) == before  # no output: nothing written
    first = results["a path"]
    assert first.table.column("id").to_pylist() == IDS
    assert first.table.column("reference").to_pylist() == ["6000", "2500", "180", "0.75"]
    assert first.summary["rows"] == 4 and first.summary["errors"] == 0 and not first.already_finished
    for name, result in results.items():
        for column in ("id", "question", "completion", "loss", "is_correct"):
            assert result.table.column(column).to_pylist() == first.table.column(column).to_pylist(), (name, column)
        assert result.summary["rows"] == 4, name
    # A number reads as its shortest text whichever way it was typed: in a DataFrame or a pyarrow
    # Table the answers 6000 and 2500.0 make a float column, in a list of dicts an int and a float.
    for name in ("a pandas DataFrame", "a pyarrow Table", "a list of dicts"):
        assert results[name].table.column("reference").to_pylist() == ["6000", "2500", "180", "0.75"], name


@pytest.mark.usefixtures("ray_instance")
def test_with_an_output_it_writes_and_resumes_as_the_command_does(tiny_model, tmp_path, rows):
    output = tmp_path / "answers.parquet"
    first = bulkscore.run(rows, output, **tiny(tiny_model))
    assert pq.read_table(output).column("completion").to_pylist() == first.table.column("completion").to_pylist()
    assert json.loads(output.with_suffix(".summary.json").read_text()) == first.summary
    again = bulkscore.run(rows, str(output), **tiny(tiny_model))
    assert again.already_finished and again.summary == first.summary
    assert again.table.column("completion").to_pylist() == first.table.column("completion").to_pylist()
    with pytest.raises(bulkscore.JobError, match="holds the results of a different job"):
        bulkscore.run(rows, output, **tiny(tiny_model) | {"max_new_tokens": 5})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_samples": 3}, "Invalid value for '--num-samples': greedy decoding gives the same completion every time"),
        ({"max_new_tokens": 0}, "Invalid value for '--max-new-tokens': 0 is not a whole number of at least 1"),
        ({"min_new_tokens": 9, "max_new_tokens": 8}, "Invalid value for '--min-new-tokens': 9 is more than"),
        ({"dtype": "int8"}, "Invalid value for '--dtype': 'int8' is not one of auto, float32, bfloat16, float16"),
        ({"top_p": 0}, "Invalid value for '--top-p': 0 is not a number above 0 and at most 1"),
        ({"batch_size": 0}, "Invalid value for '--batch-size': must be at least 1"),
        ({"answer_regex": "("}, "Invalid value for '--answer-regex': not a valid regular expression"),
        ({"stop": ""}, "Invalid value for '--stop': a stop string cannot be empty"),
        ({"system": "Be brief.", "prompt_format": "raw"}, "Invalid value for '--system': the raw format sends"),
        ({"examples": "x.jsonl"}, "Invalid value for '--examples': worked examples are shown only in the cot format"),
        ({"workers": 1.5}, "Invalid value for '--workers': 1.5 is not a whole number of at least 1"),
    ],
)
def test_bad_settings_raise_the_commands_message_before_any_work(options, message, rows, monkeypatch):
    def refuse(*args):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(bulkscore.jobs.run, "ray_session", refuse)
    with pytest.raises(bulkscore.UsageError) as raised:
        bulkscore.run(rows, **OPTIONS | options)
    assert str(raised.value).startswith(message)
    assert isinstance(raised.value, bulkscore.JobError)


def test_bad_inputs_raise_job_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(bulkscore.jobs.run, "ray_session", lambda *a: (_ for _ in ()).throw(AssertionError("Ray")))
    with pytest.raises(bulkscore.JobError, match=f"{tmp_path / 'missing.jsonl'}: no such file or folder"):
        bulkscore.run(tmp_path / "missing.jsonl", **OPTIONS)
    with pytest.raises(bulkscore.JobError, match="the DataFrame given: no question column"):
        bulkscore.run(pd.DataFrame({"text": ["hi"]}), **OPTIONS)
    with pytest.raises(bulkscore.UsageError, match="give a path, a list of paths, a pyarrow Table"):
        bulkscore.run(42, **OPTIONS)
    with pytest.raises(TypeError):
        bulkscore.run([], no_such_option=1)


@pytest.mark.usefixtures("ray_instance")
def test_report_and_export_from_python(tiny_model, tmp_path, rows):
    output = tmp_path / "answers.parquet"
    bulkscore.run(rows, output, **tiny(tiny_model))
    page, by = bulkscore.report(output, tmp_path / "page.html")
    assert (tmp_path / "page.html").read_text() == page and by is None and "<html" in page
    exported = bulkscore.export(str(output), tmp_path / "rows.jsonl")
    assert (exported.kept, exported.total) == (4, 4)
    assert [json.loads(line)["id"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == IDS
    with pytest.raises(bulkscore.UsageError, match="'--format': 'csv' is not one of jsonl, rft-json"):
        bulkscore.export(output, format="csv")


@pytest.mark.embedded
def test_the_one_liner_from_the_issue_prints_one_row(embedded_folder, tmp_path):
    """What a notebook user types first: a DataFrame in, a table and a summary out."""
    code = (
        "import bulkscore, pandas as pd; r = bulkscore.run(pd.DataFrame({'question': ['How many grams are in 2 "
        "kilograms?'], 'answer': [2000]}), max_new_tokens=8); print(r.table.num_rows, r.summary['rows'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "1 1\n"
    assert list(tmp_path.iterdir()) == []
