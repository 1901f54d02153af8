"""Turn shard results into output rows, merge them into OUTPUT, and summarize the job."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bulkscore.jobs.storage import Location
from bulkscore.workers.contract import result_schema

SETTINGS_KEY = b"bulkscore.settings"
SUMMARY_KEY = b"bulkscore.summary"
ANSWER_INDEX = "__answer_index"  # a choice job's answers as indices, where the input typed them so; not output


def output_schema(questions: pa.Schema, task: str = "generate") -> pa.Schema:
    """The output contract's columns for the task, in order, then the input's other columns (pass-through)."""
    result = result_schema(task)
    head = [questions.field("id"), result.field("sample"), pa.field("question", pa.string())]
    if task in ("generate", "choice"):
        head.append(pa.field("reference", pa.string()))
    contract = head + [f for f in result if f.name not in ("row", "sample")]
    return pa.schema(contract + [f for f in questions if f.name not in contract_columns(task) | {ANSWER_INDEX}])


def contract_columns(task: str = "generate") -> frozenset[str]:
    """The names of the task's own output columns: an input column so named gets `input_`."""
    return frozenset(["id", "question", "reference"] + result_schema(task).names) - {"row"}


CONTRACT_COLUMNS = contract_columns()  # generate's


def summary_path(output: Location) -> Location:
    """OUTPUT.summary.json in place of .parquet; a batch output's keeps its .jsonl (out.jsonl.summary.json),
    so that the same job's Parquet and batch outputs side by side keep their own."""
    return output.sibling(output.name.removesuffix(".parquet") + ".summary.json")


def is_batch_output(output: Location) -> bool:
    """An output written as an OpenAI Batch output file (jobs.openai_batch): a path ending in .jsonl."""
    return output.name.lower().endswith(".jsonl")


def not_parquet(location: Location, error: Exception) -> str:
    """Why an output cannot be read as Parquet, for the commands that read one (report, export)."""
    if is_batch_output(location):  # an OpenAI Batch output, or a question file given by mistake
        return (
            f"{location}: cannot read it as Parquet (a .jsonl file; report and export read Parquet outputs: "
            "run the job with -o NAME.parquet)"
        )
    return f"{location}: cannot read it as Parquet ({error})"


def shard_rows(questions: pa.Table, result: pa.Table, task: str = "generate") -> pa.Table:
    """Output rows of one shard: the input's id, question and reference beside each result row.

    `result` is checked and sorted by (row, sample) already; `row` indexes `questions`.
    """
    source = questions.take(result.column("row"))
    schema = output_schema(questions.schema, task)
    columns = {name: result.column(name) for name in result.schema.names if name != "row"}
    return pa.table([columns[name] if name in columns else source.column(name) for name in schema.names], schema=schema)


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("bulkscore", "ray", "torch", "transformers", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def error_kind(error: str) -> str:
    """Row errors read "<kind>: <detail>"."""
    return error.split(":", 1)[0]


def count(mask: pa.ChunkedArray) -> int:
    return pc.sum(mask).as_py() or 0


class Tally:
    """The output's figures added up part by part, so that no more than one part need be in memory:
    counts, and sums and counts of each loss (whose means are their ratio)."""

    COUNTS = ("samples", "errors", "answered", "correct", "with_reference", "prompt_tokens", "completion_tokens")
    LOSSES = ("loss", "completion_loss", "reference_loss")

    def __init__(self) -> None:
        """The generate task's; the other tasks' are its subclasses below (tally_for)."""
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.losses = {name: [0.0, 0] for name in self.LOSSES}  # name -> [sum, how many]
        self.error_kinds: Counter = Counter()

    @staticmethod
    def per_row(table: pa.Table) -> dict[str, pa.ChunkedArray]:
        """What each row adds to the counts besides itself (`samples`): 0/1 flags and token counts.
        The one definition of what is counted, for whole tables and for groups of rows alike."""
        flags = {
            "errors": pc.is_valid(table.column("error")),
            "answered": pc.is_valid(table.column("answer_text")),
            "correct": pc.fill_null(table.column("is_correct"), False),
            "with_reference": pc.is_valid(table.column("reference")),
        }
        tokens = {name: table.column("num_" + name) for name in ("prompt_tokens", "completion_tokens")}
        return {name: column.cast(pa.int64()) for name, column in (flags | tokens).items()}

    def add(self, table: pa.Table) -> Tally:
        added = {"samples": table.num_rows} | {name: count(c) for name, c in self.per_row(table).items()}
        losses = {
            name: (pc.sum(table.column(name)).as_py() or 0.0, count(pc.is_valid(table.column(name))))
            for name in self.LOSSES
            if name in table.column_names
        }
        self.merge(added, losses)
        if added["errors"]:
            self.error_kinds.update(error_kind(e) for e in table.column("error").drop_null().to_pylist())
        return self

    def merge(self, counts: dict[str, int], losses: dict[str, tuple[float, int]]) -> None:
        """Add counts, and (sum, how many) of losses, found elsewhere (e.g. by a group-by)."""
        for name, value in counts.items():
            self.counts[name] += value
        for name, (total, n) in losses.items():
            self.losses[name][0] += total
            self.losses[name][1] += n

    def mean(self, name: str) -> float | None:
        total, n = self.losses[name]
        return total / n if n else None

    def figures(self) -> dict:
        """Counts and rates over output rows, i.e. (input row, sample) pairs, unrounded: what the
        job's summary and the report state, for the whole output or any slice of it."""
        c = self.counts
        return c | {
            "accuracy": c["correct"] / c["with_reference"] if c["with_reference"] else None,
            "answer_rate": c["answered"] / c["samples"] if c["samples"] else None,
            "mean_loss": self.mean("loss"),
        }


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def mean_stderr(hits: int, n: int) -> float | None:
    """lm-eval's standard error of a mean of 0/1 values: sample standard deviation over sqrt(n)."""
    if n < 2:
        return None
    return math.sqrt((hits - hits * hits / n) / (n - 1) / n)


def as_counts(columns: dict[str, pa.ChunkedArray]) -> dict[str, pa.ChunkedArray]:
    """Flags and token counts as the int64 columns Tally.add sums."""
    return {name: column.cast(pa.int64()) for name, column in columns.items()}


class LikelihoodTally(Tally):
    """A likelihood task's tally: its summary is SUMMARY's figures, in that order, floats rounded."""

    SUMMARY: tuple[str, ...] = ()

    def summary(self) -> dict:
        f = self.figures()
        return {k: rounded(f[k]) if isinstance(f[k], float) else f[k] for k in self.SUMMARY}


class ChoiceTally(LikelihoodTally):
    """A choice job's figures: accuracy by the summed log-probs and by those per character."""

    COUNTS = ("samples", "errors", "with_answer", "correct", "correct_norm", "prompt_tokens")
    LOSSES = ()
    SUMMARY = (
        "with_answer", "correct", "correct_norm", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "prompt_tokens",
    )  # fmt: skip

    @staticmethod
    def per_row(table: pa.Table) -> dict[str, pa.ChunkedArray]:
        return as_counts(
            {
                "errors": pc.is_valid(table.column("error")),
                "with_answer": pc.is_valid(table.column("is_correct")),
                "correct": pc.fill_null(table.column("is_correct"), False),
                "correct_norm": pc.fill_null(table.column("is_correct_norm"), False),
                "prompt_tokens": table.column("num_prompt_tokens"),
            }
        )

    def figures(self) -> dict:
        c, n = self.counts, self.counts["with_answer"]
        return c | {
            "acc": c["correct"] / n if n else None,
            "acc_stderr": mean_stderr(c["correct"], n),
            "acc_norm": c["correct_norm"] / n if n else None,
            "acc_norm_stderr": mean_stderr(c["correct_norm"], n),
        }


class LoglikelihoodTally(LikelihoodTally):
    """A loglikelihood job's figures: how often the continuation is the greedy one, and its log-probs."""

    COUNTS = ("samples", "errors", "greedy", "prompt_tokens", "continuation_tokens")
    LOSSES = ("logprob",)
    SUMMARY = ("acc", "acc_stderr", "mean_logprob", "perplexity", "greedy", "prompt_tokens", "continuation_tokens")

    @staticmethod
    def per_row(table: pa.Table) -> dict[str, pa.ChunkedArray]:
        return as_counts(
            {
                "errors": pc.is_valid(table.column("error")),
                "greedy": pc.fill_null(table.column("is_greedy"), False),
                "prompt_tokens": table.column("num_prompt_tokens"),
                "continuation_tokens": table.column("num_continuation_tokens"),
            }
        )

    def figures(self) -> dict:
        c, scored = self.counts, self.losses["logprob"][1]
        mean = self.mean("logprob")
        return c | {
            "acc": c["greedy"] / scored if scored else None,  # lm-eval's acc of a loglikelihood task
            "acc_stderr": mean_stderr(c["greedy"], scored),
            "mean_logprob": mean,
            "perplexity": math.exp(-mean) if mean is not None else None,  # lm-eval's: exp(-mean logprob)
        }


class PerplexityTally(LikelihoodTally):
    """A perplexity job's figures, weighted over every row as lm-eval aggregates them (a sum of
    log-probs over a sum of words or bytes, not a mean of the rows' ratios)."""

    COUNTS = ("samples", "errors", "tokens", "words", "bytes")
    LOSSES = ("logprob",)
    SUMMARY = (
        "logprob", "word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity", "tokens", "words", "bytes",
    )  # fmt: skip

    @staticmethod
    def per_row(table: pa.Table) -> dict[str, pa.ChunkedArray]:
        return as_counts(
            {
                "errors": pc.is_valid(table.column("error")),
                "tokens": table.column("num_tokens"),
                "words": table.column("num_words"),
                "bytes": table.column("num_bytes"),
            }
        )

    def figures(self) -> dict:
        c, total = self.counts, self.losses["logprob"][0]

        def per(n: int) -> float | None:
            return math.exp(-total / n) if n else None

        return c | {
            "logprob": total,
            "word_perplexity": per(c["words"]),
            "byte_perplexity": per(c["bytes"]),
            "bits_per_byte": -total / c["bytes"] / math.log(2) if c["bytes"] else None,
            "token_perplexity": per(c["tokens"]),
        }


TALLIES = {"choice": ChoiceTally, "loglikelihood": LoglikelihoodTally, "perplexity": PerplexityTally}


def tally_for(task: str) -> Tally:
    return TALLIES.get(task, Tally)()


def summarize(tally: Tally, num_rows: int, elapsed_s: float, extra: dict, task: str = "generate") -> dict:
    """The job's figures. Counts and rates are over output rows, i.e. (input row, sample) pairs."""
    if task != "generate":
        f = tally.figures()
        return (
            {"task": task, "rows": num_rows, "samples": f["samples"], "errors": f["errors"]}
            | {"error_kinds": dict(sorted(tally.error_kinds.items()))}
            | tally.summary()
            | {
                "elapsed_s": round(elapsed_s, 3),
                "rows_per_s": round(num_rows / elapsed_s, 3) if elapsed_s > 0 else None,
            }
            | extra
            | {"versions": versions()}
        )
    f = tally.figures()
    return (
        {
            "rows": num_rows,
            "samples": f["samples"],
            "errors": f["errors"],
            "error_kinds": dict(sorted(tally.error_kinds.items())),
            "answered": f["answered"],
            "correct": f["correct"],
            "accuracy": rounded(f["accuracy"]),
            "answer_rate": rounded(f["answer_rate"]),
            "mean_loss": rounded(f["mean_loss"]),
            "mean_completion_loss": rounded(tally.mean("completion_loss")),
            "mean_reference_loss": rounded(tally.mean("reference_loss")),
            "prompt_tokens": f["prompt_tokens"],
            "completion_tokens": f["completion_tokens"],
            "elapsed_s": round(elapsed_s, 3),
            "rows_per_s": round(num_rows / elapsed_s, 3) if elapsed_s > 0 else None,
            "tokens_per_s": round(f["completion_tokens"] / elapsed_s, 3) if elapsed_s > 0 else None,
        }
        | extra
        | {"versions": versions()}
    )


# Parts are gathered into row groups of about this many rows or bytes, whichever comes first: few
# enough row groups for fast reads (a 64-row group per default shard would make a 10M-row file's
# footer huge), small enough to keep the driver's memory flat.
ROW_GROUP_ROWS = 65_536
ROW_GROUP_BYTES = 64 << 20


def is_folder(output: Location) -> bool:
    """A folder output (a Parquet dataset, one file per shard): written with a trailing slash, or
    an existing folder."""
    return output.text.split("?", 1)[0].endswith("/") or output.kind() == pafs.FileType.Directory


def write_summary(output: Location, summary: dict) -> None:
    summary_path(output).write_bytes((json.dumps(summary, indent=2) + "\n").encode())


def write_file_output(
    parts: Iterable[pa.Table], output: Location, settings: dict, summarize_tally: Callable[[Tally], dict]
) -> dict:
    """OUTPUT as one Parquet file assembled from `parts` (in input order) as they are read, a row
    group per ROW_GROUP_ROWS rows (or ROW_GROUP_BYTES) or so, never the whole table in memory; then
    its summary JSON.
    The summary, made from the tally of what was written, goes into the file's key-value metadata
    at the end. Both files appear whole or not at all. Returns the summary."""
    tally = tally_for(settings.get("scoring", {}).get("task", "generate"))
    summary: dict = {}

    def put(path: str) -> None:
        writer = None
        pending: list[pa.Table] = []
        rows = size = 0  # in `pending`
        try:
            for part in parts:
                tally.add(part)
                if writer is None:
                    schema = part.schema.with_metadata({SETTINGS_KEY: json.dumps(settings).encode()})
                    writer = pq.ParquetWriter(path, schema, filesystem=output.fs)
                pending.append(part)
                rows, size = rows + part.num_rows, size + part.get_total_buffer_size()
                if rows >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
                    writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
                    pending.clear()
                    rows = size = 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
            summary.update(summarize_tally(tally))
            writer.add_key_value_metadata({SUMMARY_KEY: json.dumps(summary).encode()})
        finally:
            if writer is not None:
                writer.close()

    output.write(put)
    write_summary(output, summary)
    return summary


def read_finished(output: Location) -> tuple[dict, dict] | None:
    """(settings, summary) of a finished OUTPUT, or None if OUTPUT is not one of ours."""
    if is_folder(output):
        summary = summary_path(output)
        manifest = output.child(FOLDER_MANIFEST)
        if not (summary.exists() and manifest.exists()):
            return None
        return json.loads(manifest.read_bytes())["settings"], json.loads(summary.read_bytes())
    if is_batch_output(output):  # its summary is written once the file is whole
        summary = summary_path(output)
        return ({}, json.loads(summary.read_bytes())) if summary.exists() and output.exists() else None
    try:
        metadata = output.read_metadata()
    except (OSError, pa.ArrowException):
        return None
    if SETTINGS_KEY not in metadata or SUMMARY_KEY not in metadata:
        return None
    return json.loads(metadata[SETTINGS_KEY]), json.loads(metadata[SUMMARY_KEY])


def read_output(output: Location) -> pa.Table:
    """A finished OUTPUT's rows, a file or a folder (whose `_`-files pyarrow skips)."""
    return pq.read_table(output.path, filesystem=output.fs).replace_schema_metadata(None)


FOLDER_MANIFEST = "_manifest.json"
