"""bulkscore from Python: `run`, `report` and `export`, the same jobs as the commands.

The command line is a thin layer over these: it turns options into keywords (the same names, with
underscores) and prints what they return. Bad settings raise UsageError, anything else that stops
a job JobError (UsageError is a JobError), with the message the command prints.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from bulkscore.jobs.errors import InputError, JobError, UsageError
from bulkscore.jobs.export import EXPORT_FORMATS, Export, export_answers
from bulkscore.jobs.gather import is_batch_output, read_output
from bulkscore.jobs.hfdatasets import dataset_table, to_dataset
from bulkscore.jobs.openai_batch import has_requests, other_models, read_batch_output
from bulkscore.jobs.questions import Columns, InMemory, Source, bundled_questions, load_questions, task_columns
from bulkscore.jobs.report import build_report
from bulkscore.jobs.run import RunOptions, run_job
from bulkscore.jobs.schedule import DEFAULT_HANG_TIMEOUT_S, DEFAULT_PLACEMENT_TIMEOUT_S, Patience
from bulkscore.jobs.settings import JobSpec, check_remote_code, prompt_settings, resolve_adapter, resolve_model
from bulkscore.jobs.storage import Location, locate
from bulkscore.workers.contract import (
    DEFAULT_ANSWER_REGEX,
    REQUEST,
    TASKS,
    GenerationSettings,
    GradingSettings,
    ModelSpec,
    ScoringSettings,
    sample_counts,
)
from bulkscore.workers.prompts import PROMPT_FORMATS

if TYPE_CHECKING:
    import datasets

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
BUNDLED = "(bundled unit conversions)"


@dataclass(frozen=True)
class Result:
    """What a job produced: `table` in the output contract (one row per input row and sample, in
    input order) and `summary` (the figures `OUTPUT.summary.json` holds).

    With an output, `table` is read from it when first asked for: a job larger than memory returns
    at once, and its rows can be read piecewise from the output instead (an OpenAI Batch output,
    `.jsonl`, is read back as a row per choice: jobs.openai_batch.READ_BACK). `to_dataset()` returns
    `table` as a Hugging Face `datasets.Dataset` (it needs the datasets package)."""

    summary: dict
    already_finished: bool = False  # `output` already held this job's results: nothing was scored
    output: Location | None = None
    rows: pa.Table | None = field(default=None, repr=False)  # a job without output: its rows

    @cached_property
    def table(self) -> pa.Table:
        if self.rows is not None:
            return self.rows
        return read_batch_output(self.output) if is_batch_output(self.output) else read_output(self.output)

    def to_dataset(self) -> datasets.Dataset:
        """`table` as a `datasets.Dataset`, e.g. to `push_to_hub` or `save_to_disk` it."""
        return to_dataset(self.table)

    def __repr__(self) -> str:
        return f"Result({self.summary.get('samples')} rows, accuracy={self.summary.get('accuracy')})"


def run(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | pa.Table | Sequence[dict] | None = None,
    output: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    limit: int | None = None,
    keep_parts: bool = False,
    task: str = "generate",
    question_column: str | None = None,
    answer_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
    choices_column: str | None = None,
    continuation_column: str | None = None,
    choice_delimiter: str = " ",
    model: str | None = None,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    prompt_format: str | None = None,
    system: str | None = None,
    examples: str | os.PathLike | None = None,
    max_new_tokens: int = 64,
    min_new_tokens: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    stop: str | Sequence[str] = (),
    tolerance: float = 0.05,
    answer_regex: str = DEFAULT_ANSWER_REGEX,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None,
    shard_size: int | str = "auto",
    batch_size: int | str = "auto",
    placement_timeout: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    hang_timeout: float = DEFAULT_HANG_TIMEOUT_S,
    quiet: bool = False,
    say: Callable[[str], None] | None = None,
) -> Result:
    """Score a model on questions: the job `bulkscore run` runs, from Python.

    `inputs`: a path or a list of paths (JSONL, JSON, Parquet), a pyarrow Table, a pandas
    DataFrame, a `datasets.Dataset` or `IterableDataset` (or the folder a Dataset's `save_to_disk`
    wrote; a DatasetDict's: choose its `split`) or a list of dicts; None scores the bundled
    unit-conversion set. `task`: generate (an answer per row, graded), or score given text as
    lm-evaluation-harness does: choice (a `choices` column), loglikelihood (a `continuation`
    column), perplexity (a `text` column);
    `prompt_format` defaults to chat for generate, raw (lm-eval's) for the others. The keywords are
    `bulkscore run`'s options with underscores (see `bulkscore run --help`). With `output`, the
    Parquet file and its summary are written as the command writes them, and the same call again
    resumes; without it, nothing is written. Uses the Ray this process is connected to (a
    notebook's), else `address`, else a private local instance. Progress goes to stderr unless
    `quiet`; `say` receives the messages instead of stderr.

    Raises JobError (UsageError for bad settings, before any work) with the command's message.

    Example:
        >>> import bulkscore, pandas as pd
        >>> questions = pd.DataFrame({"question": ["How many grams are in 2 kilograms?"], "answer": [2000]})
        >>> result = bulkscore.run(questions, max_new_tokens=32)
        >>> result.table.column("completion")[0], result.summary["accuracy"]
    """
    started = time.perf_counter()
    say = say or ((lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr)))
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    prompt_asked = [name for name, value in (("--prompt-format", prompt_format), ("--system", system)) if value]
    if prompt_format is None:
        prompt_format = "chat" if task == "generate" else "raw"
    batch = check_auto_or_whole("--batch-size", batch_size)
    shard_size = check_auto_or_whole("--shard-size", shard_size)
    check_run(locals())
    examples_path = Path(examples) if examples is not None else None
    location = locate(str(output)) if output is not None else None
    if location is not None and is_batch_output(location) and task != "generate":
        raise UsageError("--output", "an OpenAI Batch output (.jsonl) holds generated completions: --task generate")
    source, kind = resolve_model(model)
    check_remote_code(source, kind, trust_remote_code)
    sources = question_sources(inputs)
    spec = JobSpec(
        inputs=tuple(map(str, sources)) if sources else (BUNDLED,),
        output=location,
        model=ModelSpec(source, kind, dtype, device, trust_remote_code, adapter=resolve_adapter(adapter)),
        scoring=ScoringSettings(
            prompt_settings(prompt_format, system, examples_path),
            GenerationSettings(max_new_tokens, min_new_tokens, temperature, top_p, num_samples, seed, stop, batch),
            GradingSettings(tolerance, answer_regex),
            task,
            choice_delimiter,
        ),
        shard_size=shard_size,
        limit=limit,
    )
    paths = sources or [bundled_questions()]
    questions = load_questions(paths, Columns(question_column, answer_column, id_column, task, split), limit)
    where = ", ".join(map(str, paths))
    extra = pa.table(task_columns(questions, task, where, choices_column, continuation_column))
    requests = has_requests(questions)
    if requests:
        check_requests(questions, task, temperature)
    if prompt_asked and requests:
        verb = "applies" if len(prompt_asked) == 1 else "apply"
        say(f"Warning: {' and '.join(prompt_asked)} {verb} to plain questions only; a request's prompt is its own")
    if named := other_models(questions, spec.model_name):
        say(
            f"Warning: the requests name {', '.join(named[:3])}{'...' if len(named) > 3 else ''}; "
            f"bulkscore ignores a request's model and runs {spec.model_name} (--model) for all of them"
        )
    say(
        f"Read {questions.num_rows} {'questions' if task == 'generate' else 'rows'} in {time.perf_counter() - started:.1f} s"
    )
    patience = Patience(placement_timeout, hang_timeout)
    options = RunOptions(address, workers, cpus_per_worker, gpus_per_worker, overwrite, keep_parts, quiet, patience)
    report = run_job(spec, questions, options, say, extra if extra.num_columns else None)
    return Result(report.summary, report.already_finished, location, report.table)


def check_requests(questions: pa.Table, task: str, temperature: float) -> None:
    """OpenAI Batch requests are generated; a request for samples needs a temperature."""
    if task != "generate":
        raise UsageError("--task", f"OpenAI Batch requests ask for completions: --task generate, not {task}")
    n = sample_counts(questions, 1)
    heat = pc.fill_null(pc.struct_field(questions.column(REQUEST), "temperature"), float(temperature))
    greedy = pc.sum(pc.and_(pc.greater(n, 1), pc.equal(heat, 0))).as_py() or 0
    if greedy:
        ids = questions.column("id").filter(pc.and_(pc.greater(n, 1), pc.equal(heat, 0)))[:3].to_pylist()
        raise InputError(
            f"{greedy} request(s) ask for n > 1 samples at temperature 0 ({', '.join(map(str, ids))}): greedy "
            "decoding gives the same completion every time; give them a temperature, or the job --temperature"
        )


def input_path(path: str | os.PathLike) -> Path | str:
    """A local path as a Path, a filesystem URI (s3://...) as it is written."""
    return str(path) if "://" in str(path) else Path(path)


def question_sources(inputs) -> list[Source]:
    """The inputs as paths or in-memory tables, in order; [] for the bundled set."""
    if inputs is None:
        return []
    if isinstance(inputs, (str, os.PathLike)):
        return [input_path(inputs)]
    if type(inputs).__module__.split(".")[0] == "datasets" and (table := dataset_table(inputs)) is not None:
        return [InMemory("the Dataset given", table)]
    if isinstance(inputs, pa.Table):
        return [InMemory("the table given", inputs)]
    if type(inputs).__module__.split(".")[0] == "pandas":  # a DataFrame; pandas itself is not needed
        return [InMemory("the DataFrame given", pa.Table.from_pandas(inputs, preserve_index=False))]
    items = list(inputs) if isinstance(inputs, Iterable) else None
    if items and all(isinstance(item, dict) for item in items):
        return [InMemory("the rows given", items)]
    if items and all(isinstance(item, (str, os.PathLike)) for item in items):
        return [input_path(item) for item in items]
    raise UsageError(
        "INPUTS",
        "give a path, a list of paths, a pyarrow Table, a pandas DataFrame, a datasets.Dataset or a list of dicts, "
        f"not {type(inputs).__name__}{' (empty)' if items == [] else ''}",
    )


def check_auto_or_whole(name: str, value: int | str | None) -> int | None:
    """An option that takes 'auto' (None) or a whole number of at least 1."""
    if value in ("auto", None):
        return None
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(name, f"{value!r} is not 'auto' or a whole number")
    if value < 1:
        raise UsageError(name, "must be at least 1")
    return value


def is_whole(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Each option's check as the command line makes it: (name, holds(value), what it must be).
OPTION_CHECKS: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("task", lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    ("limit", lambda v: v is None or is_whole(v, 1), "a whole number of at least 1"),
    ("split", lambda v: v is None or (isinstance(v, str) and v != ""), "a split's name"),
    ("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    ("device", lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    ("prompt_format", lambda v: v in PROMPT_FORMATS, f"one of {', '.join(PROMPT_FORMATS)}"),
    ("max_new_tokens", lambda v: is_whole(v, 1), "a whole number of at least 1"),
    ("min_new_tokens", lambda v: is_whole(v, 0), "a whole number of at least 0"),
    ("temperature", lambda v: is_number(v) and v >= 0, "a number of at least 0 (0 is greedy)"),
    ("top_p", lambda v: is_number(v) and 0 < v <= 1, "a number above 0 and at most 1"),
    ("num_samples", lambda v: is_whole(v, 1), "a whole number of at least 1"),
    ("seed", lambda v: is_whole(v, -(2**63)), "a whole number"),
    ("tolerance", lambda v: is_number(v) and v > 0, "a number above 0"),
    ("workers", lambda v: v is None or is_whole(v, 1), "a whole number of at least 1"),
    ("cpus_per_worker", lambda v: v is None or (is_number(v) and v > 0), "a number above 0"),
    ("gpus_per_worker", lambda v: v is None or (is_number(v) and v >= 0), "a number of at least 0"),
    ("placement_timeout", lambda v: is_number(v) and v > 0, "a number of seconds above 0"),
    ("hang_timeout", lambda v: is_number(v) and v > 0, "a number of seconds above 0"),
)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_run(options: dict) -> None:
    """Refuse settings that cannot work, and impossible combinations, before any work."""
    for name, holds, what in OPTION_CHECKS:
        if not holds(options[name]):
            raise UsageError(option(name), f"{options[name]!r} is not {what}")
    if options["output"] is not None and "://" not in str(options["output"]):
        check_local_output(Path(options["output"]))
    if options["min_new_tokens"] > options["max_new_tokens"]:
        raise UsageError(
            "--min-new-tokens", f"{options['min_new_tokens']} is more than --max-new-tokens {options['max_new_tokens']}"
        )
    if options["num_samples"] > 1 and options["temperature"] == 0:
        raise UsageError("--num-samples", "greedy decoding gives the same completion every time; add --temperature > 0")
    try:
        re.compile(options["answer_regex"])
    except re.error as error:
        raise UsageError("--answer-regex", f"not a valid regular expression: {error}") from None
    if any(s == "" for s in options["stop"]):
        raise UsageError("--stop", "a stop string cannot be empty")
    check_prompt_options(options["prompt_format"], options["system"], options["examples"])
    check_task_options(options)


def check_task_options(options: dict) -> None:
    """The likelihood tasks score given text: no sampling, and only the columns they read."""
    task = options["task"]
    if task == "generate":
        for name in ("choices_column", "continuation_column"):
            if options[name] is not None:
                raise UsageError(option(name), "only for --task choice or loglikelihood")
        return
    if options["num_samples"] > 1 or options["temperature"] != 0:
        what = "--num-samples" if options["num_samples"] > 1 else "--temperature"
        raise UsageError(what, f"--task {task} scores given text and samples nothing; drop {what}")
    if task == "perplexity" and options["prompt_format"] != "raw":
        raise UsageError("--prompt-format", "--task perplexity scores each text as it is (raw)")
    if options["answer_column"] is not None and task != "choice":
        raise UsageError("--answer-column", f"--task {task} reads no answer")
    if options["choices_column"] is not None and task != "choice":
        raise UsageError("--choices-column", "only for --task choice")
    if options["continuation_column"] is not None and task != "loglikelihood":
        raise UsageError("--continuation-column", "only for --task loglikelihood")


def check_prompt_options(prompt_format: str, system: str | None, examples) -> None:
    if examples is not None and prompt_format != "cot":
        raise UsageError(
            "--examples",
            f"worked examples are shown only in the cot format, not {prompt_format}; add --prompt-format cot",
        )
    if examples is not None and not Path(examples).is_file():
        raise UsageError("--examples", f"{examples}: no such file")
    if system is not None and prompt_format == "raw":
        raise UsageError("--system", "the raw format sends the question alone; use --prompt-format chat or cot")


def check_local_output(output: Path) -> None:
    """A file to write, or a folder (an existing one, or a path ending in /) to write a dataset into."""
    folder = next((p for p in [output.absolute(), *output.absolute().parents] if p.exists()), None)
    if folder == output.absolute() and not folder.is_dir():
        folder = output.absolute().parent
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError("--output", f"cannot write {output}: {folder} is not a writable folder")


def write_file(target: Location, data: bytes) -> None:
    try:
        target.write_bytes(data)
    except (OSError, pa.ArrowException) as error:
        raise JobError(f"cannot write {target}: {error}") from None


def outputs(answers: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Location]:
    names = [answers] if isinstance(answers, (str, os.PathLike)) else list(answers)
    if not names:
        raise UsageError("ANSWERS", "give at least one `bulkscore run` output")
    return [locate(str(name)) for name in names]


def report(
    answers: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    by: str | None = None,
) -> tuple[str, str | None]:
    """One self-contained HTML page about `bulkscore run` outputs (several: side by side), as
    `bulkscore report` writes it; written to `output` when given. Returns (the page, the column it
    breaks accuracy down by, or None).

    Example:
        >>> page, by = bulkscore.report(["chat.parquet", "cot.parquet"], "report.html")
    """
    page, grouped_by = build_report(outputs(answers), by)
    if output is not None:
        write_file(locate(str(output)), page.encode())
    return page, grouped_by


def export(
    answers: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    format: str = "jsonl",
    correct_only: bool = False,
) -> Export:
    """A `bulkscore run` output as training data, as `bulkscore export` writes it: `jsonl` (a row per
    output row) or `rft-json` (the assignment's rft.json). Written to `output` when given; returns
    the text and how many rows (or questions) it kept of how many.

    Example:
        >>> bulkscore.export("samples.parquet", "rft.json", format="rft-json").kept
    """
    if format not in EXPORT_FORMATS:
        raise UsageError("--format", f"{format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    (answers_at,) = outputs(answers)
    exported = export_answers(answers_at, format, correct_only)
    if output is not None:
        write_file(locate(str(output)), exported.text.encode())
    return exported
