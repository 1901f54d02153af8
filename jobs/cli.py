"""bulkscore's command line: a thin layer over bulkscore.jobs.api (`bulkscore.run`, `.report`,
`.export`) that turns options into keywords and results into output."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from bulkscore.jobs import api
from bulkscore.jobs.errors import JobError, UsageError
from bulkscore.jobs.export import EXPORT_FORMATS
from bulkscore.jobs.gather import summary_path
from bulkscore.jobs.parts import checkpoints
from bulkscore.jobs.report import DEFAULT_BY
from bulkscore.jobs.storage import locate
from bulkscore.workers.contract import TASKS
from bulkscore.workers.prompts import PROMPT_FORMATS


@contextmanager
def reported() -> Iterator[None]:
    """A bad setting becomes click's usage error (exit 2); any other JobError `Error: ...` on stderr
    and exit 1; never a traceback."""
    try:
        yield
    except UsageError as error:
        raise click.BadParameter(error.problem, param_hint=error.option) from None
    except JobError as error:
        raise click.ClickException(str(error)) from None


RUN_DEFAULTS = {name: p.default for name, p in inspect.signature(api.run).parameters.items()}


def default(name: str):
    """bulkscore.run's default for an option: the command and the library share one."""
    return RUN_DEFAULTS[name]


class AutoOrWhole(click.ParamType):
    """'auto' or a whole number of at least 1, checked as bulkscore.run checks it."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        try:
            return api.check_auto_or_whole(param.opts[0] if param else "value", value)
        except UsageError as error:
            self.fail(error.problem, param, ctx)


def seconds_option(name: str, help: str):
    """A patience option of `run`: seconds above 0, bulkscore.run's default."""
    return click.option(
        "--" + name.replace("_", "-"),
        type=click.FloatRange(min=0, min_open=True),
        default=default(name),
        show_default=True,
        help=help,
    )


def jobs_address(command):
    """The Ray Jobs address option of submit, status, logs and stop."""
    return click.option(
        "--address",
        help="Ray Jobs address, e.g. http://HEAD:8265 [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS].",
    )(command)


@click.group()
@click.version_option(package_name="bulkscore")
def cli() -> None:
    """Score a language model on a large question set, in batches, on Ray."""


@cli.command()
@click.argument("inputs", nargs=-1)
@click.option(
    "-o",
    "--output",
    default="answers.parquet",
    show_default=True,
    help="Output Parquet file (a path, or a filesystem URI such as s3://bucket/answers.parquet), a folder "
    "(a path ending in /), or an OpenAI Batch output file (a path ending in .jsonl).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output or the checkpoints of another job.")
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N rows.")
@click.option("--keep-parts", is_flag=True, help="Keep OUTPUT.parts/ (the per-shard checkpoints) after merging.")
@click.option(
    "--task",
    type=click.Choice(TASKS),
    default=default("task"),
    show_default=True,
    help="generate: an answer per question, graded, with three losses; choice: pick among a row's `choices` "
    "by log-likelihood; loglikelihood: a `continuation`'s log-likelihood after the question; perplexity: a "
    "`text` column's (lm-evaluation-harness's request types and tokenization).",
)
@click.option(
    "--question-column",
    help="Column with the question [default: first of question, prompt, input; choice: question, context, "
    "query, ...; loglikelihood: context, question, ...; perplexity: text, question, ...].",
)
@click.option(
    "--answer-column",
    help="Column with the reference answer [default: first of answer, reference, target, correct_answer].",
)
@click.option("--id-column", help="Column with the row id [default: id, else the row's 0-based index].")
@click.option(
    "--split",
    help="The split to score of a DatasetDict folder (DatasetDict.save_to_disk) [default: its only split].",
)
@click.option("--choices-column", help="choice: the column with each row's list of choices [default: choices].")
@click.option(
    "--continuation-column",
    help="loglikelihood: the column with the text scored after each context [default: continuation].",
)
@click.option(
    "--choice-delimiter",
    default=default("choice_delimiter"),
    show_default=repr(default("choice_delimiter")),
    help="choice: the text between the context and each choice (lm-eval's target_delimiter).",
)
@click.option("--model", help="Hub id, model folder or .gguf file [default: embedded SmolLM2-135M-Instruct].")
@click.option("--dtype", type=click.Choice(api.DTYPES), default=default("dtype"), show_default=True)
@click.option("--device", type=click.Choice(api.DEVICES), default=default("device"), show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own code to run.")
@click.option(
    "--adapter", help="PEFT LoRA adapter folder, applied on top of --model (its own base-model field is ignored)."
)
@click.option(
    "--prompt-format",
    type=click.Choice(PROMPT_FORMATS),
    help="raw: the question as is; chat: the tokenizer's chat template; cot: chat with an instruction to reason briefly and answer in <answer></answer>, after worked examples [default: chat; raw for the other tasks, as lm-eval].",
)
@click.option("--system", help="System message (chat); replaces the instruction (cot).")
@click.option(
    "--examples",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Worked examples for cot: question/answer-text pairs (JSONL, JSON or Parquet) [default: bundled].",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=default("max_new_tokens"), show_default=True)
@click.option("--min-new-tokens", type=click.IntRange(min=0), default=default("min_new_tokens"), show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=default("temperature"),
    show_default=True,
    help="0 is greedy.",
)
@click.option(
    "--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=default("top_p"), show_default=True
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    default=default("num_samples"),
    show_default=True,
    help="Completions per question (needs --temperature > 0).",
)
@click.option("--seed", type=int, default=default("seed"), show_default=True)
@click.option("--stop", multiple=True, help="Stop generating at this text (repeatable).")
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0, min_open=True),
    default=default("tolerance"),
    show_default=True,
    help="Relative tolerance for numeric answers.",
)
@click.option(
    "--answer-regex",
    default=default("answer_regex"),
    show_default=True,
    help="Extracts the answer from the completion (its first group that matched).",
)
@click.option("--address", help="Ray address [default: $RAY_ADDRESS, else a private local instance].")
@click.option(
    "--workers", type=click.IntRange(min=1), help="Actors [default: one per GPU, else CPUs / --cpus-per-worker]."
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0, min_open=True),
    help="CPUs per actor, also its torch threads [default: min(4, CPUs); 1 with a GPU].",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    help="GPUs per actor, fractions allowed [default: 1 if the cluster has GPUs].",
)
@click.option(
    "--shard-size",
    type=AutoOrWhole(),
    default=default("shard_size"),
    show_default=True,
    help="Rows per shard (the unit of checkpointing and scheduling); auto: 64, or more for big jobs "
    "(at most ~512 shards).",
)
@click.option(
    "--batch-size",
    type=AutoOrWhole(),
    default=default("batch_size"),
    show_default=True,
    help="Rows decoded at once per worker, at most one tile of 128; results do not depend on it.",
)
@seconds_option(
    "placement_timeout",
    "Seconds with no worker placed at all (the cluster has no room) before the job stops, finished "
    "shards kept for a resume; also the longest a placed worker may take to load its model.",
)
@seconds_option(
    "hang_timeout",
    "Seconds a busy worker may go without finishing a model call before it counts as hung (killed, "
    "its shards run again).",
)
@click.option("--quiet", is_flag=True, help="No progress bar or messages; the summary still prints.")
def run(inputs, output, **options):
    """Score INPUTS (JSONL, JSON, Parquet or a datasets save_to_disk folder; none: the bundled set).

    Writes one row per input row and sample to OUTPUT, and OUTPUT's .summary.json beside it.
    Running the same command again resumes from the finished shards. From Python: bulkscore.run.

    Example: bulkscore run questions.jsonl -o answers.parquet --max-new-tokens 32
    """
    say = (lambda text: None) if options["quiet"] else (lambda text: click.echo(text, err=True))
    with reported():
        try:
            result = api.run(list(inputs) or None, output, say=say, **options)
        except KeyboardInterrupt:
            click.echo(
                f"\nInterrupted. Finished shards are kept in {checkpoints(locate(output))}: run the same "
                "command again to resume.",
                err=True,
            )
            sys.exit(130)
    if result.already_finished:
        click.echo(f"{output} already holds this job's results (use --overwrite to score again).")
    click.echo(summary_table(result.summary))
    click.echo(f"Wrote {output} and {summary_path(locate(output))}")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def task_lines(summary: dict) -> list[tuple[str, str]]:
    """The summary lines of a likelihood task's figures."""
    task = summary["task"]
    if task == "choice":
        return [
            (
                "acc",
                f"{num(summary['acc'], 4)} ± {num(summary['acc_stderr'], 4)} ({summary['correct']:,} of {summary['with_answer']:,})",
            ),
            (
                "acc_norm",
                f"{num(summary['acc_norm'], 4)} ± {num(summary['acc_norm_stderr'], 4)} ({summary['correct_norm']:,})",
            ),
        ]
    if task == "loglikelihood":
        return [
            (
                "acc",
                f"{num(summary['acc'], 4)} ± {num(summary['acc_stderr'], 4)} (greedy continuations: {summary['greedy']:,})",
            ),
            ("perplexity", f"{num(summary['perplexity'], 4)} (mean log-prob {num(summary['mean_logprob'], 4)})"),
        ]
    return [
        ("word ppl", num(summary["word_perplexity"], 4)),
        ("byte ppl", f"{num(summary['byte_perplexity'], 4)} ({num(summary['bits_per_byte'], 4)} bits per byte)"),
        ("tokens", f"{summary['tokens']:,} ({summary['words']:,} words, {summary['bytes']:,} bytes)"),
    ]


def summary_table(summary: dict) -> str:
    if summary.get("task", "generate") != "generate":
        lines = [
            ("rows", f"{summary['rows']:,} ({summary['errors']:,} errors)"),
            *task_lines(summary),
            ("elapsed", f"{summary['elapsed_s']:.1f} s ({num(summary['rows_per_s'], 2)} rows/s)"),
            ("model", f"{summary['model']} on {summary['workers']} worker(s)"),
        ]
        return "\n".join(f"{k:<10} {v}" for k, v in lines + time_lines(summary))
    lines = [
        ("rows", f"{summary['rows']:,} ({summary['samples']:,} samples, {summary['errors']:,} errors)"),
        ("answered", f"{summary['answered']:,} ({pct(summary['answer_rate'])})"),
        ("correct", f"{summary['correct']:,} (accuracy {pct(summary['accuracy'])})"),
        (
            "mean loss",
            f"{num(summary['mean_loss'])} (completion {num(summary['mean_completion_loss'])}, reference {num(summary['mean_reference_loss'])})",
        ),
        ("tokens", f"{summary['prompt_tokens']:,} prompt, {summary['completion_tokens']:,} completion"),
        (
            "elapsed",
            f"{summary['elapsed_s']:.1f} s ({num(summary['rows_per_s'], 2)} rows/s, {num(summary['tokens_per_s'], 1)} tokens/s)",
        ),
        ("model", f"{summary['model']} on {summary['workers']} worker(s)"),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in lines + time_lines(summary))


PIECES = {
    "ray_s": "Ray",
    "placing_s": "worker placed",
    "imports_s": "transformers",
    "source_s": "files",
    "tokenizer_s": "tokenizer",
    "model_s": "model",
    "pack_s": "packing",
}


def time_lines(summary: dict) -> list[tuple[str, str]]:
    """Where the job's time went (the summary's timings): start-up piece by piece, then model time."""
    timings = summary.get("timings") or {}
    if timings.get("startup_s") is None:
        return []
    pieces = timings.get("startup") or {}
    shown = ", ".join(f"{label} {pieces[key]:.1f}" for key, label in PIECES.items() if key in pieces)
    model = ", ".join(
        f"{name.removesuffix('_s')} {seconds:.1f} s" for name, seconds in timings.items() if name in MODEL_TIME
    )
    return [
        ("start-up", f"{timings['startup_s']:.1f} s ({shown})" if shown else f"{timings['startup_s']:.1f} s"),
        ("model time", model),
    ]


MODEL_TIME = ("generate_s", "loss_s", "score_s")


@cli.command()
@click.argument("answers")
@click.option("-o", "--output", required=True, help="File to write: a path or a filesystem URI.")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(EXPORT_FORMATS),
    default="jsonl",
    show_default=True,
    help="jsonl: one object per output row; rft-json: the assignment's rft.json, [question, answer, reasoning] per question with a correct sample.",
)
@click.option(
    "--correct-only",
    is_flag=True,
    help="jsonl: only the rows graded correct (rft-json keeps only correct ones anyway).",
)
def export(answers, output, export_format, correct_only):
    """Write ANSWERS (a `bulkscore run` output) as training data. From Python: bulkscore.export.

    Example: bulkscore export samples.parquet --format rft-json -o rft.json
    """
    with reported():
        result = api.export(answers, output, format=export_format, correct_only=correct_only)
    if export_format == "rft-json":
        click.echo(f"Kept {result.kept:,} of {result.total:,} questions (those with a correct sample) in {output}")
    else:
        click.echo(f"Wrote {result.kept:,} of {result.total:,} rows to {output}")


@cli.command()
@click.argument("answers", nargs=-1, required=True)
@click.option(
    "-o", "--output", help="HTML file to write: a path or a filesystem URI [default: the first ANSWERS with .html]."
)
@click.option(
    "--by",
    help=f"Column to break accuracy and answer rate down by (a pass-through input column) [default: {DEFAULT_BY}, where every run has it].",
)
def report(answers, output, by):
    """Write one self-contained HTML page about ANSWERS (`bulkscore run` outputs): summary,
    histograms of loss and completion length, accuracy per --by value, errors by kind, the
    highest-loss and wrong rows. Several outputs are compared side by side, one colour each.
    From Python: bulkscore.report.

    Example: bulkscore report raw.parquet chat.parquet cot.parquet -o report.html
    """
    first = locate(answers[0])
    target = output or str(first.sibling(first.name.removesuffix(".parquet") + ".html"))
    with reported():
        page, grouped_by = api.report(answers, target, by=by)
    grouping = f", by {grouped_by}" if grouped_by else ""
    click.echo(f"Wrote {target} ({len(page.encode()) / 1024:,.0f} KiB; {len(answers)} run(s){grouping})")


@cli.command(context_settings={"ignore_unknown_options": True})
@jobs_address
@click.option("--working-dir", help="Folder to upload as the job's working directory.")
@click.option(
    "--runtime-env",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Ray runtime environment (JSON or YAML file).",
)
@click.option("--no-wait", is_flag=True, help="Print the job id and return; don't follow the job.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def submit(address, working_dir, runtime_env, no_wait, run_args):
    """Run `bulkscore run RUN_ARGS...` as a job on a Ray cluster, following its logs.

    Exits 0 only if the job succeeded.

    Example: bulkscore submit --address http://head:8265 -- questions.jsonl -o /data/answers.parquet
    """
    from bulkscore.jobs import submit as jobs

    with reported():
        client = jobs.jobs_client(address)
        job_id = jobs.submit(client, run_args, jobs.read_runtime_env(runtime_env, working_dir))
        click.echo(f"Submitted job {job_id}", err=True)
        if no_wait:
            click.echo(job_id)
            return
        jobs.follow(client, job_id, lambda text: click.echo(text, nl=False))
        status, message = jobs.final_status(client, job_id)
    if status != "SUCCEEDED":
        raise click.ClickException(f"job {job_id} {status.lower()}" + (f": {message}" if message else ""))
    click.echo(f"Job {job_id} succeeded", err=True)


@cli.command()
@click.argument("job_id")
@jobs_address
def status(job_id, address):
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from bulkscore.jobs import submit as jobs

    with reported():
        state, message = jobs.final_status(jobs.jobs_client(address), job_id)
    click.echo(f"{state}" + (f": {message}" if message else ""))


@cli.command()
@click.argument("job_id")
@jobs_address
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job_id, address, follow):
    """Print a submitted job's logs."""
    from bulkscore.jobs import submit as jobs

    with reported():
        client = jobs.jobs_client(address)
        if follow:
            jobs.follow(client, job_id, lambda text: click.echo(text, nl=False))
        else:
            click.echo(jobs.call(f"cannot read job {job_id}", client.get_job_logs, job_id), nl=False)


@cli.command()
@click.argument("job_id")
@jobs_address
def stop(job_id, address):
    """Stop a submitted job."""
    from bulkscore.jobs import submit as jobs

    with reported():
        stopped = jobs.call(f"cannot stop job {job_id}", jobs.jobs_client(address).stop_job, job_id)
    click.echo(f"Stopped job {job_id}" if stopped else f"Job {job_id} had already ended")
