"""bulkscore's command line. Options become a JobSpec; the work lives in jobs.run."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from pyarrow import ArrowException

from jobs.errors import JobError
from jobs.export import EXPORT_FORMATS, export_answers
from jobs.gather import summary_path
from jobs.parts import parts_folder
from jobs.storage import Location, locate
from jobs.questions import Columns, bundled_questions, load_questions
from jobs.report import DEFAULT_BY, build_report
from jobs.run import RunOptions, run_job
from jobs.settings import JobSpec, check_remote_code, prompt_settings, resolve_adapter, resolve_model
from jobs.shards import DEFAULT_SHARD_SIZE
from workers.contract import (
    DEFAULT_ANSWER_REGEX,
    GenerationSettings,
    GradingSettings,
    ModelSpec,
    ScoringSettings,
)
from workers.prompts import PROMPT_FORMATS


@contextmanager
def reported() -> Iterator[None]:
    """A JobError becomes `Error: ...` on stderr and exit 1, never a traceback."""
    try:
        yield
    except JobError as error:
        raise click.ClickException(str(error)) from None


class BatchSize(click.ParamType):
    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int) or value == "auto":
            return None if value == "auto" else value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is not 'auto' or a whole number", param, ctx)
        if number < 1:
            self.fail("must be at least 1", param, ctx)
        return number


@click.group()
@click.version_option(package_name="bulkscore")
def cli() -> None:
    """Score a language model on a large question set, in batches, on Ray."""


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", default="answers.parquet", show_default=True, help="Output Parquet file: a path, or a filesystem URI such as s3://bucket/answers.parquet.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output or the checkpoints of another job.")
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N rows.")
@click.option("--keep-parts", is_flag=True, help="Keep OUTPUT.parts/ (the per-shard checkpoints) after merging.")
@click.option("--question-column", help="Column with the question [default: first of question, prompt, input].")
@click.option("--answer-column", help="Column with the reference answer [default: first of answer, reference, target, correct_answer].")
@click.option("--id-column", help="Column with the row id [default: id, else the row's 0-based index].")
@click.option("--model", "model_name", help="Hub id, model folder or .gguf file [default: embedded SmolLM2-135M-Instruct].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own code to run.")
@click.option("--adapter", help="PEFT LoRA adapter folder, applied on top of --model (its own base-model field is ignored).")
@click.option("--prompt-format", type=click.Choice(PROMPT_FORMATS), default="chat", show_default=True, help="raw: the question as is; chat: the tokenizer's chat template; cot: chat with an instruction to reason briefly and answer in <answer></answer>, after worked examples.")
@click.option("--system", help="System message (chat); replaces the instruction (cot).")
@click.option("--examples", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Worked examples for cot: question/answer-text pairs (JSONL, JSON or Parquet) [default: bundled].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--min-new-tokens", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True, help="Completions per question (needs --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", multiple=True, help="Stop generating at this text (repeatable).")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True, help="Relative tolerance for numeric answers.")
@click.option("--answer-regex", default=DEFAULT_ANSWER_REGEX, show_default=True, help="Extracts the answer from the completion (its first group).")
@click.option("--address", help="Ray address [default: $RAY_ADDRESS, else a private local instance].")
@click.option("--workers", type=click.IntRange(min=1), help="Actors [default: one per GPU, else CPUs / --cpus-per-worker].")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), help="CPUs per actor, also its torch threads [default: min(4, CPUs); 1 with a GPU].")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), help="GPUs per actor, fractions allowed [default: 1 if the cluster has GPUs].")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True, help="Rows per shard (the unit of checkpointing and scheduling).")
@click.option("--batch-size", type=BatchSize(), default="auto", show_default=True, help="Rows per generation batch; auto fits a token budget.")
@click.option("--quiet", is_flag=True, help="No progress bar or messages; the summary still prints.")
def run(inputs, output, overwrite, limit, keep_parts, question_column, answer_column, id_column,
        model_name, dtype, device, trust_remote_code, adapter, prompt_format, system, examples, max_new_tokens,
        min_new_tokens, temperature, top_p, num_samples, seed, stop, tolerance, answer_regex,
        address, workers, cpus_per_worker, gpus_per_worker, shard_size, batch_size, quiet):
    """Score INPUTS (JSONL, JSON or Parquet; none: the bundled unit-conversion set).

    Writes one row per input row and sample to OUTPUT, and OUTPUT's .summary.json beside it.
    Running the same command again resumes from the finished shards.

    Example: bulkscore run questions.jsonl -o answers.parquet --max-new-tokens 32
    """
    started = time.perf_counter()
    say = (lambda text: None) if quiet else (lambda text: click.echo(text, err=True))
    check_usage(output, min_new_tokens, max_new_tokens, temperature, num_samples, answer_regex, stop)
    check_prompt_usage(prompt_format, system, examples)
    with reported():
        location = locate(output)
        try:
            source, kind = resolve_model(model_name)
            check_remote_code(source, kind, trust_remote_code)
            spec = JobSpec(
                inputs=tuple(str(p) for p in inputs) or ("(bundled unit conversions)",),
                output=location,
                model=ModelSpec(source, kind, dtype, device, trust_remote_code, adapter=resolve_adapter(adapter)),
                scoring=ScoringSettings(
                    prompt_settings(prompt_format, system, examples),
                    GenerationSettings(max_new_tokens, min_new_tokens, temperature, top_p, num_samples,
                                       seed, tuple(stop), batch_size),
                    GradingSettings(tolerance, answer_regex),
                ),
                shard_size=shard_size,
                limit=limit,
            )
            columns = Columns(question_column, answer_column, id_column)
            questions = load_questions(list(inputs) or [bundled_questions()], columns, limit)
            say(f"Read {questions.num_rows} questions in {time.perf_counter() - started:.1f} s")
            options = RunOptions(address, workers, cpus_per_worker, gpus_per_worker, overwrite, keep_parts, quiet)
            report = run_job(spec, questions, options, say)
        except KeyboardInterrupt:
            click.echo(f"\nInterrupted. Finished shards are kept in {parts_folder(location)}: run the same "
                       "command again to resume.", err=True)
            sys.exit(130)
    if report.already_finished:
        click.echo(f"{output} already holds this job's results (use --overwrite to score again).")
    click.echo(summary_table(report.summary))
    click.echo(f"Wrote {output} and {summary_path(location)}")


def check_usage(output, min_new_tokens, max_new_tokens, temperature, num_samples, answer_regex, stop):
    """Refuse impossible combinations before any work (exit 2)."""
    if "://" not in output:
        check_local_output(Path(output))
    if min_new_tokens > max_new_tokens:
        raise click.BadParameter(f"{min_new_tokens} is more than --max-new-tokens {max_new_tokens}", param_hint="--min-new-tokens")
    if num_samples > 1 and temperature == 0:
        raise click.BadParameter("greedy decoding gives the same completion every time; add --temperature > 0", param_hint="--num-samples")
    try:
        re.compile(answer_regex)
    except re.error as error:
        raise click.BadParameter(f"not a valid regular expression: {error}", param_hint="--answer-regex") from None
    if any(s == "" for s in stop):
        raise click.BadParameter("a stop string cannot be empty", param_hint="--stop")


def check_prompt_usage(prompt_format: str, system: str | None, examples: Path | None) -> None:
    if examples is not None and prompt_format != "cot":
        raise click.BadParameter(f"worked examples are shown only in the cot format, not {prompt_format}; add --prompt-format cot", param_hint="--examples")
    if system is not None and prompt_format == "raw":
        raise click.BadParameter("the raw format sends the question alone; use --prompt-format chat or cot", param_hint="--system")


def write_file(target: Location, data: bytes) -> None:
    try:
        target.write_bytes(data)
    except (OSError, ArrowException) as error:
        raise JobError(f"cannot write {target}: {error}") from None


def check_local_output(output: Path) -> None:
    if output.is_dir():
        raise click.BadParameter(f"{output} is a folder; give a file path such as {output / 'answers.parquet'}", param_hint="--output")
    folder = next((p for p in output.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write {output}: {folder} is not a writable folder", param_hint="--output")


def summary_table(summary: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, digits=3):
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        ("rows", f"{summary['rows']:,} ({summary['samples']:,} samples, {summary['errors']:,} errors)"),
        ("answered", f"{summary['answered']:,} ({pct(summary['answer_rate'])})"),
        ("correct", f"{summary['correct']:,} (accuracy {pct(summary['accuracy'])})"),
        ("mean loss", f"{num(summary['mean_loss'])} (completion {num(summary['mean_completion_loss'])}, reference {num(summary['mean_reference_loss'])})"),
        ("tokens", f"{summary['prompt_tokens']:,} prompt, {summary['completion_tokens']:,} completion"),
        ("elapsed", f"{summary['elapsed_s']:.1f} s ({num(summary['rows_per_s'], 2)} rows/s, {num(summary['tokens_per_s'], 1)} tokens/s)"),
        ("model", f"{summary['model']} on {summary['workers']} worker(s)"),
    ]
    return "\n".join(f"{k:<10} {v}" for k, v in lines)


@cli.command()
@click.argument("answers")
@click.option("-o", "--output", required=True, help="File to write: a path or a filesystem URI.")
@click.option("--format", "export_format", type=click.Choice(EXPORT_FORMATS), default="jsonl", show_default=True, help="jsonl: one object per output row; rft-json: the assignment's rft.json, [question, answer, reasoning] per question with a correct sample.")
@click.option("--correct-only", is_flag=True, help="jsonl: only the rows graded correct (rft-json keeps only correct ones anyway).")
def export(answers, output, export_format, correct_only):
    """Write ANSWERS (a `bulkscore run` output) as training data.

    Example: bulkscore export samples.parquet --format rft-json -o rft.json
    """
    with reported():
        result = export_answers(locate(answers), export_format, correct_only)
        write_file(locate(output), result.text.encode())
    if export_format == "rft-json":
        click.echo(f"Kept {result.kept:,} of {result.total:,} questions (those with a correct sample) in {output}")
    else:
        click.echo(f"Wrote {result.kept:,} of {result.total:,} rows to {output}")


@cli.command()
@click.argument("answers", nargs=-1, required=True)
@click.option("-o", "--output", help="HTML file to write: a path or a filesystem URI [default: the first ANSWERS with .html].")
@click.option("--by", help=f"Column to break accuracy and answer rate down by (a pass-through input column) [default: {DEFAULT_BY}, where every run has it].")
def report(answers, output, by):
    """Write one self-contained HTML page about ANSWERS (`bulkscore run` outputs): summary,
    histograms of loss and completion length, accuracy per --by value, errors by kind, the
    highest-loss and wrong rows. Several outputs are compared side by side, one colour each.

    Example: bulkscore report raw.parquet chat.parquet cot.parquet -o report.html
    """
    locations = [locate(a) for a in answers]
    target = locate(output) if output else locations[0].sibling(locations[0].name.removesuffix(".parquet") + ".html")
    with reported():
        page, grouped_by = build_report(locations, by)
        data = page.encode()
        write_file(target, data)
    grouping = f", by {grouped_by}" if grouped_by else ""
    click.echo(f"Wrote {target} ({len(data) / 1024:,.0f} KiB; {len(answers)} run(s){grouping})")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--address", help="Ray Jobs address, e.g. http://HEAD:8265 [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS].")
@click.option("--working-dir", help="Folder to upload as the job's working directory.")
@click.option("--runtime-env", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Ray runtime environment (JSON or YAML file).")
@click.option("--no-wait", is_flag=True, help="Print the job id and return; don't follow the job.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def submit(address, working_dir, runtime_env, no_wait, run_args):
    """Run `bulkscore run RUN_ARGS...` as a job on a Ray cluster, following its logs.

    Exits 0 only if the job succeeded.

    Example: bulkscore submit --address http://head:8265 -- questions.jsonl -o /data/answers.parquet
    """
    from jobs import submit as jobs

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
@click.option("--address", help="Ray Jobs address [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS].")
def status(job_id, address):
    """Print a submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from jobs import submit as jobs

    with reported():
        state, message = jobs.final_status(jobs.jobs_client(address), job_id)
    click.echo(f"{state}" + (f": {message}" if message else ""))


@cli.command()
@click.argument("job_id")
@click.option("--address", help="Ray Jobs address [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS].")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job_id, address, follow):
    """Print a submitted job's logs."""
    from jobs import submit as jobs

    with reported():
        client = jobs.jobs_client(address)
        if follow:
            jobs.follow(client, job_id, lambda text: click.echo(text, nl=False))
        else:
            click.echo(jobs.call(f"cannot read job {job_id}", client.get_job_logs, job_id), nl=False)


@cli.command()
@click.argument("job_id")
@click.option("--address", help="Ray Jobs address [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS].")
def stop(job_id, address):
    """Stop a submitted job."""
    from jobs import submit as jobs

    with reported():
        stopped = jobs.call(f"cannot stop job {job_id}", jobs.jobs_client(address).stop_job, job_id)
    click.echo(f"Stopped job {job_id}" if stopped else f"Job {job_id} had already ended")
