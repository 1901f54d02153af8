"""Turn shard results into output rows, merge them into OUTPUT, and summarize the job."""

from __future__ import annotations

import json
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
import pyarrow.compute as pc

from bulkscore.jobs.storage import Location
from bulkscore.workers.contract import RESULT_SCHEMA

SETTINGS_KEY = b"bulkscore.settings"
SUMMARY_KEY = b"bulkscore.summary"


def output_schema(questions: pa.Schema) -> pa.Schema:
    """The output contract's columns, in order, then the input's other columns (pass-through)."""
    head = [
        questions.field("id"),
        RESULT_SCHEMA.field("sample"),
        pa.field("question", pa.string()),
        pa.field("reference", pa.string()),
    ]
    contract = head + [f for f in RESULT_SCHEMA if f.name not in ("row", "sample")]
    return pa.schema(contract + [f for f in questions if f.name not in CONTRACT_COLUMNS])


CONTRACT_COLUMNS = frozenset(["id", "question", "reference"] + RESULT_SCHEMA.names) - {"row"}


def summary_path(output: Location) -> Location:
    stem = output.name.removesuffix(".parquet")
    return output.sibling(stem + ".summary.json")


def shard_rows(questions: pa.Table, result: pa.Table) -> pa.Table:
    """Output rows of one shard: the input's id, question and reference beside each result row.

    `result` is checked and sorted by (row, sample) already; `row` indexes `questions`.
    """
    source = questions.take(result.column("row"))
    schema = output_schema(questions.schema)
    columns = {name: result.column(name) for name in RESULT_SCHEMA.names if name != "row"}
    return pa.table([columns[name] if name in columns else source.column(name) for name in schema.names], schema=schema)


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("bulkscore", "ray", "torch", "transformers", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def mean(column: pa.ChunkedArray) -> float | None:
    return rounded(pc.mean(column).as_py())


def error_kind(error: str) -> str:
    """Row errors read "<kind>: <detail>"."""
    return error.split(":", 1)[0]


def count(mask: pa.ChunkedArray) -> int:
    return pc.sum(mask).as_py() or 0


def row_figures(table: pa.Table) -> dict:
    """Counts and rates over output rows, i.e. (input row, sample) pairs, unrounded: what the job's
    summary and the report state, for the whole output or any slice of it."""
    samples = table.num_rows
    with_reference = count(pc.is_valid(table.column("reference")))
    correct = count(pc.fill_null(table.column("is_correct"), False))
    answered = count(pc.is_valid(table.column("answer_text")))
    return {
        "samples": samples,
        "errors": count(pc.is_valid(table.column("error"))),
        "answered": answered,
        "correct": correct,
        "with_reference": with_reference,
        "accuracy": correct / with_reference if with_reference else None,
        "answer_rate": answered / samples if samples else None,
        "mean_loss": pc.mean(table.column("loss")).as_py(),
        "prompt_tokens": count(table.column("num_prompt_tokens")),
        "completion_tokens": count(table.column("num_completion_tokens")),
    }


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def summarize(table: pa.Table, num_rows: int, elapsed_s: float, extra: dict) -> dict:
    """The job's figures. Counts and rates are over output rows, i.e. (input row, sample) pairs."""
    f = row_figures(table)
    kinds = Counter(error_kind(e) for e in table.column("error").drop_null().to_pylist())
    return (
        {
            "rows": num_rows,
            "samples": f["samples"],
            "errors": f["errors"],
            "error_kinds": dict(sorted(kinds.items())),
            "answered": f["answered"],
            "correct": f["correct"],
            "accuracy": rounded(f["accuracy"]),
            "answer_rate": rounded(f["answer_rate"]),
            "mean_loss": rounded(f["mean_loss"]),
            "mean_completion_loss": mean(table.column("completion_loss")),
            "mean_reference_loss": mean(table.column("reference_loss")),
            "prompt_tokens": f["prompt_tokens"],
            "completion_tokens": f["completion_tokens"],
            "elapsed_s": round(elapsed_s, 3),
            "rows_per_s": round(num_rows / elapsed_s, 3) if elapsed_s > 0 else None,
            "tokens_per_s": round(f["completion_tokens"] / elapsed_s, 3) if elapsed_s > 0 else None,
        }
        | extra
        | {"versions": versions()}
    )


def write_output(table: pa.Table, output: Location, settings: dict, summary: dict) -> None:
    """OUTPUT and its summary JSON, each written whole or not at all."""
    metadata = {SETTINGS_KEY: json.dumps(settings).encode(), SUMMARY_KEY: json.dumps(summary).encode()}
    output.write_table(table.replace_schema_metadata(metadata))
    summary_path(output).write_bytes((json.dumps(summary, indent=2) + "\n").encode())


def read_finished(output: Location) -> tuple[dict, dict] | None:
    """(settings, summary) of a finished OUTPUT, or None if OUTPUT is not one of ours."""
    try:
        metadata = output.read_schema().metadata or {}
    except (OSError, pa.ArrowException):
        return None
    if SETTINGS_KEY not in metadata or SUMMARY_KEY not in metadata:
        return None
    return json.loads(metadata[SETTINGS_KEY]), json.loads(metadata[SUMMARY_KEY])
