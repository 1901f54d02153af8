"""Read question sets (JSONL, JSON, Parquet; OpenAI Batch files, jobs.openai_batch; folders that
Hugging Face datasets saved, jobs.hfdatasets) into one table {id, question, reference, *others}.

JSON may be an array of objects or the homework's array of `[question, answer(, reasoning)]`.
Several inputs are concatenated in the order given; ids come from the id column, or are the rows'
0-based positions in the concatenated input. The inputs' other columns pass through to the output
with their types (a column missing from one input is null there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from bulkscore.jobs import hfdatasets
from bulkscore.jobs.errors import InputError
from bulkscore.jobs.gather import ANSWER_INDEX, contract_columns
from bulkscore.jobs.openai_batch import is_batch_file, read_batch_file
from bulkscore.jobs.storage import Location, locate
from bulkscore.workers.contract import REQUEST, REQUEST_TYPE

QUESTION_COLUMNS = ("question", "prompt", "input")
# Where each task finds its question (a choice's or a continuation's context; perplexity's text).
TASK_QUESTION_COLUMNS = {
    "generate": QUESTION_COLUMNS,
    "choice": ("question", "context", "query", *QUESTION_COLUMNS[1:]),
    "loglikelihood": ("context", *QUESTION_COLUMNS),
    "perplexity": ("text", *QUESTION_COLUMNS),
}
ANSWER_COLUMNS = ("answer", "reference", "target", "correct_answer")
ANSWERED_TASKS = ("generate", "choice")  # the tasks that read an answer column
ID_COLUMN = "id"
ARRAY_COLUMNS = ("question", "answer", "reasoning")  # homework-style JSON rows
JSON_BLOCK = 16 << 20  # pyarrow reads JSONL in blocks of this many bytes; a longer line falls back


@dataclass(frozen=True)
class InMemory:
    """Rows given from Python (bulkscore.run): a pyarrow Table or a list of dicts; `name` stands for
    a file name in messages."""

    name: str
    data: pa.Table | list[dict]

    def __str__(self) -> str:
        return self.name


Source = Location | InMemory


@dataclass(frozen=True)
class Columns:
    """Column names asked for on the command line; None means detect."""

    question: str | None = None
    answer: str | None = None
    id: str | None = None
    task: str = "generate"  # which columns are looked for (TASK_QUESTION_COLUMNS, ANSWERED_TASKS)
    split: str | None = None  # a saved DatasetDict's split (--split); None: its only one


def bundled_questions() -> Path:
    return Path(__file__).parent / "data" / "unit_conversions.jsonl"


def bundled_examples() -> Path:
    """The worked examples `--prompt-format cot` shows the model unless --examples replaces them."""
    return Path(__file__).parent / "data" / "cot_examples.jsonl"


def read_text(path: Location) -> str:
    try:
        data = path.read_bytes()
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text; save the file as UTF-8") from None


def read_jsonl(path: Location) -> pa.Table | list[dict]:
    """pyarrow's JSON reader (columnar, ~10x faster than Python objects): block by block, so that the
    file is never in memory beside its table; the whole file at once where a later block's types
    differ from the first's. Where pyarrow refuses the file or would read it otherwise than plain
    JSON does, the line-by-line reader, which also names the line at fault (pyarrow would turn ISO
    dates into timestamps: the plain reader keeps them text)."""
    options = pa_json.ReadOptions(block_size=JSON_BLOCK)

    def streamed() -> pa.Table:
        with path.open_input() as stream:
            reader = pa_json.open_json(stream, read_options=options)
            return pa.Table.from_batches(list(reader), reader.schema)

    def whole() -> pa.Table:
        with path.open_input() as stream:
            return pa_json.read_json(stream, read_options=options)

    for read in (streamed, whole):
        try:
            table = read()
            if table.num_rows and not any(pa.types.is_timestamp(f.type) for f in table.schema):
                table.validate(full=True)  # text that is not UTF-8 fails here
                return table
        except (pa.ArrowException, OSError):
            continue
    return read_jsonl_rows(path)


def read_jsonl_rows(path: Location) -> list[dict]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_json(path: Location) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise InputError(
            f"{path}: expected a JSON array of objects or of [question, answer] arrays, got {type(data).__name__}"
        )
    rows = []
    for number, item in enumerate(data):
        if isinstance(item, dict):
            rows.append(item)
        elif isinstance(item, list) and 1 <= len(item) <= len(ARRAY_COLUMNS):
            rows.append(dict(zip(ARRAY_COLUMNS, item)))
        else:
            raise InputError(
                f"{path}, item {number}: expected an object or a [question, answer(, reasoning)] "
                f"array, got {json.dumps(item)[:80]}"
            )
    return rows


def read_parquet(path: Location) -> pa.Table:
    try:
        return pq.read_table(path.path, filesystem=path.fs)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a readable Parquet file or folder ({error})") from None


def read_file(path: Location, split: str | None = None) -> pa.Table | list[dict]:
    try:
        kind = path.kind()
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: cannot read ({error})") from None
    if kind == pafs.FileType.NotFound:
        raise InputError(f"{path}: no such file or folder{hfdatasets.hub_hint(path)}")
    suffix = PurePosixPath(path.path).suffix.lower()
    if kind == pafs.FileType.Directory and hfdatasets.saved_kind(path):  # written by datasets' save_to_disk
        return hfdatasets.read_saved(path, split)
    if kind == pafs.FileType.Directory or suffix in (".parquet", ".pq"):
        return read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        return read_batch_file(path) if is_batch_file(path) else read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    raise InputError(f"{path}: unsupported format {suffix or '(no suffix)'}; use .jsonl, .json or .parquet")


def column_names(data: pa.Table | list[dict]) -> list[str]:
    if isinstance(data, pa.Table):
        return data.column_names
    names: dict[str, None] = {}
    for row in data:
        names.update(dict.fromkeys(row))
    return list(names)


def column_values(data: pa.Table | list[dict], name: str) -> list:
    if isinstance(data, pa.Table):
        return data.column(name).to_pylist()
    return [row.get(name) for row in data]


def pick_column(
    path: Source, names: list[str], asked: str | None, candidates: Sequence[str], what: str, option: str
) -> str | None:
    if asked is not None:
        if asked not in names:
            raise InputError(f"{path}: no column {asked!r} (asked for by {option}); columns: {', '.join(names)}")
        return asked
    found = next((c for c in candidates if c in names), None)
    if found is None and what == "question":
        raise InputError(
            f"{path}: no question column (looked for {', '.join(candidates)}); columns: "
            f"{', '.join(names)}. Name it with {option}."
        )
    return found


def as_text(value: object) -> str | None:
    """A question or reference as text: a number as its shortest text (6000 and 6000.0 -> "6000",
    0.5 -> "0.5"), whichever reader typed it: JSON's parser, pyarrow's or a Parquet column."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def text_column(data: pa.Table | list[dict], name: str) -> pa.Array | pa.ChunkedArray:
    """A column as text (as_text): in Arrow for text, integers and booleans, which need no Python
    object per row; value by value for the rest, a slice at a time."""
    if not isinstance(data, pa.Table):
        return pa.array([as_text(v) for v in column_values(data, name)], pa.string())
    column = data.column(name)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
        return column.cast(pa.string())
    if pa.types.is_boolean(kind) or pa.types.is_null(kind):
        return column.cast(pa.string())
    if pa.types.is_floating(kind) and (text := float_text(column)) is not None:
        return text
    pieces = [column.slice(i, TEXT_SLICE).to_pylist() for i in range(0, len(column), TEXT_SLICE)]
    return pa.chunked_array([pa.array([as_text(v) for v in piece], pa.string()) for piece in pieces], pa.string())


TEXT_SLICE = 65_536


def float_text(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """as_text of a float column in Arrow compute: whole numbers as integers, the rest as Arrow
    writes them, which is Python's repr for 1e-4 <= |v| < 1e10 (checked on random values; outside
    it Arrow switches to exponents at other places). None when a value lies outside (or is NaN)."""
    values = column.cast(pa.float64())
    size = pc.abs(values)
    whole = pc.and_(pc.equal(pc.floor(values), values), pc.less(size, 1e16))
    plain = pc.and_(pc.greater_equal(size, 1e-4), pc.less(size, 1e10))
    if not pc.all(pc.or_(whole, plain)).as_py():  # nulls are skipped; False when any value is not covered
        return None
    integers = pc.if_else(whole, values, 0.0).cast(pa.int64()).cast(pa.string())
    return pc.if_else(whole, integers, values.cast(pa.string()))


def other_columns(path: Source, data: pa.Table | list[dict], names: list[str]) -> pa.Table:
    """The input's columns besides question, answer and id, typed as they were (JSON: inferred).

    Always one row per input row, even with no columns, so that inputs stack row for row."""
    if isinstance(data, pa.Table):
        return data.select(names)
    if not names:
        return pa.table({"_": pa.nulls(len(data))}).select([])
    try:
        return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in data])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        mixed = next(n for n in names if not can_type([row.get(n) for row in data]))
        raise InputError(f"{path}: column {mixed!r} mixes types (e.g. numbers and text); make it one type") from None


def can_type(values: list) -> bool:
    try:
        pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def load_file(path: Source, columns: Columns) -> dict:
    data = path.data if isinstance(path, InMemory) else read_file(path, columns.split)
    names = column_names(data)
    if not names:
        raise InputError(f"{path}: no rows")
    candidates = TASK_QUESTION_COLUMNS[columns.task]
    question = pick_column(path, names, columns.question, candidates, "question", "--question-column")
    answer = None
    if columns.task in ANSWERED_TASKS:
        answer = pick_column(path, names, columns.answer, ANSWER_COLUMNS, "answer", "--answer-column")
    id_name = pick_column(path, names, columns.id, (ID_COLUMN,), "id", "--id-column")
    n = len(data) if isinstance(data, list) else data.num_rows
    others = [name for name in names if name not in (question, answer, id_name)]
    return {
        "rows": n,
        "others": other_columns(path, data, others),
        "id": id_values(path, data, id_name) if id_name else None,
        "question": text_column(data, question),
        "reference": text_column(data, answer) if answer else pa.nulls(n, pa.string()),
        "answer_index": integer_column(data, answer, n) if columns.task == "choice" else None,
    }


def integer_column(data: pa.Table | list[dict], name: str | None, n: int) -> pa.Array | pa.ChunkedArray:
    """A column's values where it is typed as whole numbers (an answer given as a choice's index),
    else nulls: the answer's text alone cannot tell the index 2 from the choice "2"."""
    try:
        if name is not None and isinstance(data, pa.Table) and pa.types.is_integer(data.column(name).type):
            return data.column(name).cast(pa.int64())
        if name is not None and isinstance(data, list):
            values = column_values(data, name)
            if all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
                return pa.array(values, pa.int64())
    except (OverflowError, pa.ArrowInvalid):  # beyond int64: no choice's index; the text is matched
        pass
    return pa.nulls(n, pa.int64())


def id_values(path: Source, data: pa.Table | list[dict], name: str) -> pa.Array | pa.ChunkedArray:
    if isinstance(data, pa.Table):
        return data.column(name)
    try:
        return pa.array(column_values(data, name))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise InputError(f"{path}: the id column mixes types; ids must be all numbers or all text") from None


def as_source(path: Source | str) -> Source:
    """An input as given: rows in memory, or a Location (a local path or a filesystem URI)."""
    return path if isinstance(path, InMemory | Location) else locate(str(path))


def load_questions(paths: Sequence[Source | str], columns: Columns = Columns(), limit: int | None = None) -> pa.Table:
    """One table {id, question, reference, *other columns} of every input row, in the order given.
    Columns stay Arrow arrays throughout: no Python object per row for text and integer columns."""
    sources = [as_source(p) for p in paths]
    parts = [load_file(source, columns) for source in sources]
    hfdatasets.check_split(sources, columns.split)
    total = sum(p["rows"] for p in parts)
    if total == 0:
        raise InputError(f"{', '.join(map(str, sources))}: no rows")
    if any(p["id"] is not None for p in parts) and not all(p["id"] is not None for p in parts):
        raise InputError("some inputs have an id column and some do not; give all of them ids or none")
    ids = pa.array(range(total), pa.int64()) if parts[0]["id"] is None else id_array([p["id"] for p in parts], sources)
    table = pa.table(
        {
            "id": ids,
            "question": pa.chunked_array([p["question"] for p in parts], pa.string()),
            "reference": pa.chunked_array([p["reference"] for p in parts], pa.string()),
        }
    )
    for name, column in zip(*other_table([p["others"] for p in parts], sources, columns.task)):
        table = table.append_column(name, column)
    if columns.task == "choice":
        table = table.append_column(ANSWER_INDEX, pa.chunked_array([p["answer_index"] for p in parts], pa.int64()))
    return table.slice(0, limit) if limit is not None else table


def task_columns(
    questions: pa.Table, task: str, where: str, choices: str | None = None, continuation: str | None = None
) -> dict[str, pa.ChunkedArray]:
    """The columns a task's shards carry besides {row, question, reference} (workers.contract's
    TASK_INPUTS), checked before any work: present, and of a type the task can read."""
    if task == "choice":
        return {
            "choices": choices_column(questions, choices or "choices", where),
            "answer_index": questions[ANSWER_INDEX],
        }
    if task == "generate" and REQUEST in questions.column_names:
        if questions.schema.field(REQUEST).type == REQUEST_TYPE:  # OpenAI Batch requests (jobs.openai_batch)
            return {REQUEST: questions.column(REQUEST)}
    if task == "loglikelihood":
        name = continuation or "continuation"
        column = task_column(questions, name, where, "--continuation-column", "the text scored after each context")
        if not (
            pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)
        ):
            raise InputError(
                f"{where}: column {name!r} holds {column.type}, not text: each continuation must be a string"
            )
        return {"continuation": column.cast(pa.string())}
    return {}


def task_column(questions: pa.Table, name: str, where: str, option: str, what: str) -> pa.ChunkedArray:
    if name not in questions.column_names:
        raise InputError(
            f"{where}: no column {name!r} ({what}; name it with {option}); the columns besides the question, "
            f"answer and id: {', '.join(n for n in questions.column_names[3:] if n != ANSWER_INDEX) or 'none'}"
        )
    return questions.column(name)


def choices_column(questions: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    """The choice task's column: a list of strings per row (an empty or null list is that row's error)."""
    column = task_column(questions, name, where, "--choices-column", "each row's list of choices")
    kind = column.type
    if pa.types.is_null(kind):
        return column.cast(pa.list_(pa.string()))
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise InputError(f"{where}: column {name!r} holds {kind}, not lists: give each row a list of choices (strings)")
    inner = kind.value_type
    if not (pa.types.is_string(inner) or pa.types.is_large_string(inner) or pa.types.is_null(inner)):
        bad = next((i for i, v in enumerate(column.to_pylist()) if v), None)
        example = "" if bad is None else f" (row {bad}: {json.dumps(column[bad].as_py())[:80]})"
        raise InputError(
            f"{where}: column {name!r} holds lists of {inner}, not of text: every choice must be a string{example}"
        )
    return column.cast(pa.list_(pa.string()))


def other_table(
    tables: list[pa.Table], paths: Sequence[Source], task: str = "generate"
) -> tuple[list[str], list[pa.ChunkedArray]]:
    """The inputs' other columns stacked, and their output names: a name the task's output uses
    for its own columns gets an `input_` prefix."""
    try:
        stacked = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError(
            f"{', '.join(map(str, paths))}: a column has different types in different inputs ({error})"
        ) from None
    names: list[str] = []
    own = contract_columns(task)
    for name in stacked.column_names:
        while name in own or name in names:
            name = "input_" + name
        names.append(name)
    return names, stacked.columns


def id_array(pieces: list, paths: Sequence[Source]) -> pa.ChunkedArray:
    """The inputs' ids as one column, checked: no empty value, one type, no duplicate."""
    where = ", ".join(map(str, paths))
    chunks = [c for piece in pieces for c in (piece.chunks if isinstance(piece, pa.ChunkedArray) else [piece])]
    if any(c.null_count for c in chunks) or any(pa.types.is_null(c.type) for c in chunks):
        raise InputError(f"{where}: the id column has empty values")
    if all(pa.types.is_integer(c.type) for c in chunks):
        chunks = [c.cast(pa.int64()) for c in chunks]
    try:
        ids = pa.chunked_array(chunks)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise InputError(f"{where}: the id column mixes types; ids must be all numbers or all text") from None
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise InputError(f"{where}: duplicate id {dup!r}; ids must be unique (or drop the id column)")
    return ids


def load_examples(path: Path) -> tuple[tuple[str, str], ...]:
    """Few-shot (question, answer text) pairs from any input format, answers as worked text."""
    part = load_file(as_source(path), Columns())
    pairs = tuple(zip(part["question"].to_pylist(), part["reference"].to_pylist()))
    if not pairs:
        raise InputError(f"{path}: no examples")
    for number, (question, answer) in enumerate(pairs, 1):
        if not question or not question.strip() or answer is None or not answer.strip():
            raise InputError(f"{path}: example {number} needs both a question and an answer text")
    return pairs
