"""Turn an output file into training data: every row as JSONL, or the assignment's rft.json.

rft.json is what rejection-sampling fine-tuning reads: a JSON array of
`[question, answer, reasoning]`, one entry per question that has a correct sample, the reasoning
being that question's shortest correct completion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from bulkscore.jobs.errors import InputError
from bulkscore.jobs.gather import not_parquet
from bulkscore.jobs.storage import Location
from bulkscore.workers.answers import parse_number

EXPORT_FORMATS = ("jsonl", "rft-json")
NEEDED = ("id", "sample", "question", "reference", "completion", "is_correct")


@dataclass(frozen=True)
class Export:
    text: str
    kept: int  # rows (jsonl) or questions (rft-json) written
    total: int  # of how many


def read_answers(location: Location, needed: tuple[str, ...] = NEEDED) -> pa.Table:
    try:
        table = location.read_table()
    except (OSError, pa.ArrowException) as error:
        raise InputError(not_parquet(location, error)) from None
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise InputError(f"{location}: not a bulkscore output (no {', '.join(missing)} column)")
    return table


def correct_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.fill_null(table.column("is_correct"), False))


def to_jsonl(table: pa.Table, correct_only: bool) -> Export:
    kept = correct_rows(table) if correct_only else table
    lines = [json.dumps(row, ensure_ascii=False, default=str) for row in kept.to_pylist()]
    return Export("".join(line + "\n" for line in lines), len(lines), table.num_rows)


def reference_value(reference: str) -> float | str:
    """The reference as a number (the grader's truth); a text reference stays text."""
    value = parse_number(reference)
    return reference if value is None else value


def to_rft_json(table: pa.Table) -> Export:
    """One [question, answer, shortest correct completion] per question with a correct sample."""
    questions: dict[tuple, None] = {}  # (id, question) in input order
    best: dict[tuple, dict] = {}
    for row in table.select(NEEDED).to_pylist():
        key = (row["id"], row["question"])
        questions.setdefault(key)
        if not row["is_correct"]:
            continue
        if key not in best or len(row["completion"]) < len(best[key]["completion"]):
            best[key] = row
    entries = [
        [row["question"], reference_value(row["reference"]), row["completion"]]
        for key in questions
        if (row := best.get(key)) is not None
    ]
    return Export(json.dumps(entries, indent=2, ensure_ascii=False) + "\n", len(entries), len(questions))


def export_answers(location: Location, export_format: str, correct_only: bool) -> Export:
    table = read_answers(location)
    if export_format == "rft-json":
        return to_rft_json(table)
    return to_jsonl(table, correct_only)
