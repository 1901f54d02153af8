"""The main job: questions -> shards on Ray actors -> part files -> OUTPUT and its summary."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from bulkscore.jobs.cluster import (
    RayRoom,
    connected_already,
    is_private,
    plan_pool,
    ray_session,
    watching_the_head,
)
from bulkscore.jobs.errors import JobError
from bulkscore.jobs.gather import (
    FOLDER_MANIFEST,
    Tally,
    is_batch_output,
    is_folder,
    read_finished,
    shard_rows,
    summarize,
    summary_path,
    tally_for,
    write_file_output,
    write_summary,
)
from bulkscore.jobs.openai_batch import write_batch_output
from bulkscore.jobs.parts import MemoryStore, PartStore
from bulkscore.jobs.progress import announcer, progress_bar
from bulkscore.jobs.schedule import Patience
from bulkscore.jobs.settings import JobSpec, fingerprint
from bulkscore.jobs.shards import Shard, plan_shards
from bulkscore.workers.contract import (
    REQUEST,
    ShardTask,
    check_result,
    input_schema,
    result_schema,
    sample_counts,
    shard_timings,
)
from bulkscore.workers.embedded import cache_root, embedded_gguf, is_prepared


@dataclass(frozen=True)
class RunOptions:
    """How to run the job; none of these change its results."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    overwrite: bool = False
    keep_parts: bool = False
    quiet: bool = False
    patience: Patience = Patience()  # how long to wait for room on the cluster and for a busy worker


@dataclass(frozen=True)
class RunReport:
    summary: dict
    already_finished: bool
    table: pa.Table | None = None  # the rows, for a job with no output (held in memory)


def shard_task(
    questions: pa.Table, index: int, start: int, stop: int, task: str = "generate", extra: pa.Table | None = None
) -> ShardTask:
    """Input rows [start, stop) as the task's actor reads them; `extra`: the task's own columns
    (questions.task_columns), row for row with `questions`."""
    rows = questions.slice(start, stop - start)
    columns = {
        "row": pa.array(range(start, stop), pa.int64()),
        "question": rows.column("question"),
        "reference": rows.column("reference"),
    }
    if extra is not None:
        columns |= {name: column for name, column in zip(extra.column_names, extra.slice(start, stop - start).columns)}
    schema = input_schema(task, requests=REQUEST in columns)
    return ShardTask(index=index, start=start, stop=stop, rows=pa.table(columns, schema=schema))


def check_output_free(spec: JobSpec, job_fingerprint: str, overwrite: bool) -> dict | None:
    """The summary of this very job if OUTPUT already holds it; refuse to clobber anything else."""
    output = spec.output
    if not output.exists() or overwrite:
        return None
    finished = read_finished(output)
    if finished is None:
        if is_folder(output) and (output.child(FOLDER_MANIFEST).exists() or not output.names()):
            return None  # an unfinished folder output (resumed, or refused, by its checkpoints), or empty
        if is_batch_output(output) and PartStore(output).manifest.exists():
            return None  # a batch output written but its summary not (a crash between): its parts resume it
        raise JobError(f"{output} exists and is not a bulkscore output; pass --overwrite to replace it")
    summary = finished[1]
    if summary.get("fingerprint") != job_fingerprint:
        raise JobError(
            f"{output} holds the results of a different job (fingerprint "
            f"{summary.get('fingerprint')}, this job {job_fingerprint}); pass --overwrite to replace it"
        )
    return summary


def run_job(
    spec: JobSpec,
    questions: pa.Table,
    options: RunOptions,
    say: Callable[[str], None],
    extra: pa.Table | None = None,
) -> RunReport:
    """Score `questions` as `spec` says; with no spec.output, in memory (nothing is written).
    `extra`: the task's own input columns (questions.task_columns).

    Finished shards are written as parts as they come; at the end they are gathered into OUTPUT one
    at a time (a folder output is its parts), so the output is never held whole."""
    started = time.perf_counter()
    hashed = questions
    for name, column in zip(extra.column_names, extra.columns) if extra is not None else ():
        hashed = hashed.append_column(f"__task.{name}", column)  # a resume reads the same choices
    job_fingerprint = fingerprint(spec, hashed)
    output = spec.output
    folder = output is not None and is_folder(output)
    if output is not None:
        finished = check_output_free(spec, job_fingerprint, options.overwrite)
        if finished is not None:
            return RunReport(finished, already_finished=True)
        if options.overwrite:
            summary_path(output).remove()

    plan = plan_shards(questions.num_rows, spec.shard_size)
    store = MemoryStore() if output is None else PartStore(output, folder)
    done = store.open(job_fingerprint, plan, spec.settings(), options.overwrite)
    if done:
        say(f"Resuming: {len(done)} of {len(plan)} shards already done in {store.folder}")
    todo = [s for s in plan if s.index not in done]
    idle = {
        "workers": 0,
        "nodes": 0,
        "worker_deaths": 0,
        "worker_hangs": 0,
        "timings": None,
        "device": None,
        "dtype": None,
        "invariant": None,
    }
    task = spec.scoring.task
    figures = score_on_ray(spec, questions, todo, store, options, say, started, extra) if todo else idle
    about = {"model": spec.model_name, "adapter": spec.model.adapter, **figures, "fingerprint": job_fingerprint}

    def summary_of(tally: Tally) -> dict:
        return summarize(tally, questions.num_rows, time.perf_counter() - started, about, task)

    if output is None:
        table = store.read(plan)
        return RunReport(summary_of(tally_for(task).add(table)), already_finished=False, table=table)
    if folder:
        tally = tally_for(task)
        for part in store.parts(plan):
            tally.add(part)
        summary = summary_of(tally)
        write_summary(output, summary)
    elif is_batch_output(output):
        about_job = spec.settings() | {"model_name": spec.model_name, "fingerprint": job_fingerprint}
        summary = write_batch_output(store.parts(plan), output, about_job, summary_of)
        if not options.keep_parts:
            store.remove()
    else:
        summary = write_file_output(store.parts(plan), output, spec.settings(), summary_of)
        if not options.keep_parts:
            store.remove()
    return RunReport(summary, already_finished=False)


def startup_pieces(startup_s: float, ray_s: float, info: dict) -> dict[str, float]:
    """Where the first worker's start-up went: the job's own start and Ray's (`ray_s`, from the job's
    start to Ray connected), the worker's placing and boot, and its model load, piece by piece."""
    load = info.get("load_s", 0.0)
    return {
        "ray_s": round(ray_s, 3),
        "placing_s": round(max(0.0, startup_s - ray_s - load), 3),
        "load_s": load,
        **info.get("load_pieces", {}),
    }


def score_on_ray(
    spec: JobSpec,
    questions: pa.Table,
    todo: list[Shard],
    store: PartStore,
    options: RunOptions,
    say: Callable[[str], None],
    started: float,
    extra: pa.Table | None = None,
) -> dict:
    """Score the shards in `todo` into `store` (`extra`: the task's own input columns).

    Returns how many workers ran, on how many nodes, how many died, and where the time went:
    startup_s (from `started` to the workers ready), and the actors' generate_s and loss_s summed;
    the device and dtype the model ran in, and whether every worker's results were batch-invariant.
    """
    from bulkscore.jobs.schedule import run_shards, start_workers

    samples, task = spec.scoring.generation.num_samples, spec.scoring.task
    schema = result_schema(task)
    # A spare may wait on no CPU only on an instance this job starts: its CPUs are all the job's.
    own_instance = is_private(options.address) and not connected_already()
    with ray_session(options.address) as where:
        from ray.exceptions import RayError  # only now: ray_session sets Ray's mode before its import

        ray_s = time.perf_counter() - started

        pool = plan_pool(options.workers, options.cpus_per_worker, options.gpus_per_worker, len(todo))
        # Each worker's torch uses as many threads as the CPUs Ray gave it.
        model = replace(spec.model, threads=spec.model.threads or max(1, int(pool.cpus_per_worker)))
        say(f"Starting {pool.workers} worker(s) with {spec.model_name} for {len(todo)} shard(s) on {where}...")
        gguf = embedded_gguf() if spec.model.kind == "embedded" else Path(spec.model.source)
        if spec.model.kind in ("embedded", "gguf") and not is_prepared(gguf):
            say(f"Converting {gguf.name} once into {cache_root()} (about 30 s)...")
        ready = time.perf_counter()
        model_time = ("generate_s", "loss_s") if task == "generate" else ("score_s",)
        timings = {"startup_s": None} | dict.fromkeys(model_time, 0.0)
        shards = {s.index: s for s in todo}
        pieces: dict[int, list[pa.Table]] = defaultdict(list)
        # (row, sample) pairs in all, and in each shard to do: a request's own n over --num-samples
        counts = sample_counts(extra if extra is not None else questions.select([]), samples)
        total = pc.sum(counts).as_py()
        expected = {s.index: pc.sum(counts.slice(s.start, s.stop - s.start)).as_py() for s in todo}
        with progress_bar(total, total - sum(expected.values()), options.quiet) as bar:
            tell = announcer(say)

            def on_ready(info: dict) -> None:
                if timings["startup_s"] is None:
                    timings["startup_s"] = round(time.perf_counter() - started, 3)
                    timings["startup"] = startup_pieces(timings["startup_s"], ray_s, info)
                    tell(
                        f"First worker ready in {time.perf_counter() - ready:.1f} s on {info['device']} "
                        f"({info['dtype']}, model loaded in {info['load_s']:.1f} s)"
                    )

            def on_result(piece: ShardTask, result: pa.Table) -> None:
                # A shard split after worker deaths comes back in pieces; write it when whole.
                pieces[piece.index].append(check_result(piece, result, samples, schema))
                for name, seconds in shard_timings(result).items():
                    if name in timings:
                        timings[name] = round(timings[name] + seconds, 3)
                bar.update(result.num_rows)
                shard = shards[piece.index]
                if sum(p.num_rows for p in pieces[piece.index]) == expected[piece.index]:
                    whole = pa.concat_tables(pieces.pop(piece.index)).sort_by(
                        [("row", "ascending"), ("sample", "ascending")]
                    )
                    store.write(shard, shard_rows(questions, whole, task))

            # drawn as workers free up
            tasks = (shard_task(questions, s.index, s.start, s.stop, task, extra) for s in todo)

            def head_lost(gcs: str) -> None:
                # From the watching thread: Ray would end the process in a minute with a C++ log line.
                sys.stderr.write(
                    f"\nError: lost the Ray head at {gcs} mid-job (no answer for ~12 s). Finished shards are "
                    f"kept in {store.folder}; the same command resumes once the cluster is back\n"
                )
                sys.stderr.flush()
                os._exit(1)

            watch = watching_the_head(head_lost) if not is_private(options.address) else nullcontext()
            try:
                with watch:
                    outcome = run_shards(
                        start_workers(pool, model, spec.scoring),
                        tasks,
                        samples,
                        on_result,
                        tell,
                        workers=pool.workers,
                        patience=options.patience,
                        on_ready=on_ready,
                        room=RayRoom(pool, options.address),
                        schema=schema,
                        start_spare=start_workers(pool, model, spec.scoring, spare=True)
                        if own_instance and not pool.gpus_per_worker
                        else None,
                    )
            except RayError as error:  # the cluster itself failed (the head lost, the connection cut)
                lines = str(error).strip().splitlines() or [type(error).__name__]
                kept = (
                    f"Finished shards are kept in {store.folder}; the same command resumes"
                    if isinstance(store, PartStore)
                    else "Nothing was written (no output)"
                )
                raise JobError(f"Ray failed mid-job on {where}: {lines[0][:300]}. {kept}") from None
    infos = outcome.infos
    return {
        "workers": pool.workers,
        "nodes": len({i["node"] for i in infos}),
        "worker_deaths": outcome.deaths,
        "worker_hangs": outcome.hangs,
        "timings": timings,
        "device": infos[0]["device"],
        "dtype": infos[0]["dtype"],
        "invariant": all(i["invariant"] for i in infos),
    }
