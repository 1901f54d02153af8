"""Turn shard results into output rows, merge them into OUTPUT, and summarize the job."""

from __future__ import annotations

import json
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
import pyarrow.compute as pc

from jobs.storage import Location
from workers.contract import RESULT_SCHEMA

SETTINGS_KEY = b"bulkscore.settings"
SUMMARY_KEY = b"bulkscore.summary"


def output_schema(questions: pa.Schema) -> pa.Schema:
    """The output contract's columns, in order, then the input's other columns (pass-through)."""
    head = [questions.field("id"), RESULT_SCHEMA.field("sample"),
            pa.field("question", pa.string()), pa.field("reference", pa.string())]
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
    value = pc.mean(column).as_py()
    return None if value is None else round(value, 6)


def error_kind(error: str) -> str:
    """Row errors read "<kind>: <detail>"."""
    return error.split(":", 1)[0]


def summarize(table: pa.Table, num_rows: int, elapsed_s: float, extra: dict) -> dict:
    """The job's figures. Counts and rates are over output rows, i.e. (input row, sample) pairs."""
    samples = table.num_rows
    with_reference = pc.sum(pc.is_valid(table.column("reference"))).as_py() or 0
    correct = pc.sum(pc.fill_null(table.column("is_correct"), False)).as_py() or 0
    answered = pc.sum(pc.is_valid(table.column("answer_text"))).as_py() or 0
    completion_tokens = pc.sum(table.column("num_completion_tokens")).as_py() or 0
    errors = pc.sum(pc.is_valid(table.column("error"))).as_py() or 0
    kinds = Counter(error_kind(e) for e in table.column("error").drop_null().to_pylist())
    return {
        "rows": num_rows,
        "samples": samples,
        "errors": errors,
        "error_kinds": dict(sorted(kinds.items())),
        "answered": answered,
        "correct": correct,
        "accuracy": round(correct / with_reference, 6) if with_reference else None,
        "answer_rate": round(answered / samples, 6) if samples else None,
        "mean_loss": mean(table.column("loss")),
        "mean_completion_loss": mean(table.column("completion_loss")),
        "mean_reference_loss": mean(table.column("reference_loss")),
        "prompt_tokens": pc.sum(table.column("num_prompt_tokens")).as_py() or 0,
        "completion_tokens": completion_tokens,
        "elapsed_s": round(elapsed_s, 3),
        "rows_per_s": round(num_rows / elapsed_s, 3) if elapsed_s > 0 else None,
        "tokens_per_s": round(completion_tokens / elapsed_s, 3) if elapsed_s > 0 else None,
    } | extra | {"versions": versions()}


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
