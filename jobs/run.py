"""The main job: questions -> shards on Ray actors -> part files -> OUTPUT and its summary."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa

from jobs.cluster import plan_pool, ray_session
from jobs.errors import JobError
from jobs.gather import read_finished, shard_rows, summarize, summary_path, write_output
from jobs.parts import PartStore
from jobs.progress import announcer, progress_bar
from jobs.settings import JobSpec, fingerprint
from jobs.shards import plan_shards
from workers.contract import INPUT_SCHEMA, ShardTask, check_result


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


@dataclass(frozen=True)
class RunReport:
    summary: dict
    shards: int
    resumed_shards: int
    already_finished: bool


def shard_task(questions: pa.Table, index: int, start: int, stop: int) -> ShardTask:
    rows = questions.slice(start, stop - start)
    table = pa.table(
        {"row": pa.array(range(start, stop), pa.int64()), "question": rows.column("question"),
         "reference": rows.column("reference")},
        schema=INPUT_SCHEMA,
    )
    return ShardTask(index=index, start=start, stop=stop, rows=table)


def check_output_free(spec: JobSpec, job_fingerprint: str, overwrite: bool) -> dict | None:
    """The summary of this very job if OUTPUT already holds it; refuse to clobber anything else."""
    if not spec.output.exists() or overwrite:
        return None
    finished = read_finished(spec.output)
    if finished is None:
        raise JobError(f"{spec.output} exists and is not a bulkscore output; pass --overwrite to replace it")
    summary = finished[1]
    if summary.get("fingerprint") != job_fingerprint:
        raise JobError(
            f"{spec.output} holds the results of a different job (fingerprint "
            f"{summary.get('fingerprint')}, this job {job_fingerprint}); pass --overwrite to replace it"
        )
    return summary


def run_job(
    spec: JobSpec, questions: pa.Table, options: RunOptions, say: Callable[[str], None]
) -> RunReport:
    started = time.perf_counter()
    job_fingerprint = fingerprint(spec, questions)
    finished = check_output_free(spec, job_fingerprint, options.overwrite)
    if finished is not None:
        return RunReport(finished, 0, 0, already_finished=True)

    plan = plan_shards(questions.num_rows, spec.shard_size)
    store = PartStore(spec.output)
    done = store.open(job_fingerprint, plan, spec.settings(), options.overwrite)
    if done:
        say(f"Resuming: {len(done)} of {len(plan)} shards already done in {store.folder}")
    todo = [shard_task(questions, s.index, s.start, s.stop) for s in plan if s.index not in done]
    samples = spec.scoring.generation.num_samples
    workers = worker_deaths = 0
    if todo:
        with ray_session(options.address):
            pool = plan_pool(options.workers, options.cpus_per_worker, options.gpus_per_worker, len(todo))
            workers = pool.workers
            # Each worker's torch uses as many threads as the CPUs Ray gave it.
            model = replace(spec.model, threads=spec.model.threads or max(1, int(pool.cpus_per_worker)))
            say(f"Starting {pool.workers} worker(s) with {spec.model_name} for {len(todo)} shard(s)...")
            from jobs.schedule import run_shards, start_workers

            ready = time.perf_counter()
            start_one, actors, infos = start_workers(pool, model, spec.scoring)
            say(
                f"Workers ready in {time.perf_counter() - ready:.1f} s on {infos[0]['device']} "
                f"({infos[0]['dtype']}, model loaded in {max(i['load_s'] for i in infos):.1f} s)"
            )
            total_rows = questions.num_rows * samples
            done_rows = sum(s.rows for s in plan if s.index in done) * samples
            pieces: dict[int, list[pa.Table]] = defaultdict(list)
            with progress_bar(total_rows, done_rows, options.quiet) as bar:

                def on_result(task: ShardTask, result: pa.Table) -> None:
                    # A shard split after worker deaths comes back in pieces; write it when whole.
                    pieces[task.index].append(check_result(task, result, samples))
                    bar.update(result.num_rows)
                    shard = plan[task.index]
                    if sum(p.num_rows for p in pieces[task.index]) == shard.rows * samples:
                        whole = pa.concat_tables(pieces.pop(task.index)).sort_by(
                            [("row", "ascending"), ("sample", "ascending")])
                        store.write(shard, shard_rows(questions, whole))

                worker_deaths = run_shards(start_one, actors, todo, samples, on_result,
                                           announcer(bar, options.quiet))

    table = store.read(plan)
    extra = {"model": spec.model_name, "adapter": None, "workers": workers, "worker_deaths": worker_deaths,
             "fingerprint": job_fingerprint}
    summary = summarize(table, questions.num_rows, time.perf_counter() - started, extra)
    write_output(table, spec.output, spec.settings(), summary)
    if not options.keep_parts:
        store.remove()
    return RunReport(summary, len(plan), len(done), already_finished=False)

