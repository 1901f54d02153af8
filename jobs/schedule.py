"""Run shards on a pool of actors: at most two in flight per actor, dead actors replaced.

A worker that dies costs only its in-flight shards, which run again on a live worker. The shard
that was running when a worker died is blamed for it; after MAX_DEATHS it is bisected, each piece
gets one more try, and a single row that still kills its worker becomes an error row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from bulkscore.jobs.cluster import PoolPlan
from bulkscore.jobs.errors import JobError
from bulkscore.workers.actor import ShardScorer
from bulkscore.workers.contract import ModelSpec, ScoringSettings, ShardTask, error_result

IN_FLIGHT_PER_WORKER = 2
MAX_DEATHS = 3  # deaths of a whole shard before it is bisected
WAIT_S = 0.5


@dataclass
class Work:
    task: ShardTask
    deaths: int = 0  # workers that died while running this piece or a piece holding it
    tries_left: int = MAX_DEATHS  # before this piece is split (or, for one row, given up)


def start_workers(plan: PoolPlan, model: ModelSpec, scoring: ScoringSettings) -> tuple[Callable, list, list[dict]]:
    """Start the actors and wait until each has loaded its model; refuse a model that fails to load.

    Returns a function that starts one more actor, the actors, and what each reports of itself.
    """
    import ray

    # The shards in flight on a worker run at once, so that its engine refills one's free decode
    # slots with the other's rows.
    scorer = ray.remote(ShardScorer).options(
        num_cpus=plan.cpus_per_worker,
        num_gpus=plan.gpus_per_worker,
        max_restarts=0,
        max_concurrency=IN_FLIGHT_PER_WORKER,
    )

    def start_one():
        return scorer.remote(model, scoring)

    actors = [start_one() for _ in range(plan.workers)]
    infos = ray.get([a.info.remote() for a in actors])
    for info in infos:
        if info.get("error"):
            for actor in actors:
                ray.kill(actor)
            raise JobError(f"a worker could not load the model: {info['error']}")
    return start_one, actors, infos


def after_death(work: Work, cause: str, num_samples: int) -> tuple[list[Work], pa.Table | None]:
    """What to do with a piece whose worker died running it: retry it, split it, or give up on it."""
    work.deaths += 1
    work.tries_left -= 1
    if work.tries_left > 0:
        return [work], None
    if work.task.size == 1:
        message = f"worker died: {work.deaths} workers died running this row (last: {cause})"
        return [], error_result(work.task, num_samples, message)
    # Each half gets one try: a half that kills its worker again is split again.
    return [Work(half, work.deaths, 1) for half in work.task.halves()], None


def death_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def can_take(in_flight: list[tuple], work: Work) -> bool:
    """A piece that has been running when a worker died runs alone, so a death there is its own."""
    if any(w.deaths for _, w in in_flight):
        return False
    return not in_flight if work.deaths else len(in_flight) < IN_FLIGHT_PER_WORKER


def run_shards(
    start_one: Callable,
    actors: Sequence,
    tasks: Sequence[ShardTask],
    num_samples: int,
    on_result: Callable[[ShardTask, pa.Table], None],
    say: Callable[[str], None],
) -> int:
    """Score every task; returns how many workers died on the way."""
    import ray
    from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

    died = (RayActorError, WorkerCrashedError, OutOfMemoryError)
    queue = deque(Work(task) for task in tasks)
    in_flight: dict = {a: [] for a in actors}  # live actor -> [(ref, work)] in the order it runs them
    owner: dict = {}  # ref -> actor
    deaths = 0

    def fill() -> None:
        for work in list(queue):
            # The least busy worker first, so that a few shards spread over the whole pool.
            takers = [a for a, running in in_flight.items() if can_take(running, work)]
            actor = min(takers, key=lambda a: len(in_flight[a]), default=None)
            if actor is not None:
                queue.remove(work)
                ref = actor.score.remote(work.task)
                in_flight[actor].append((ref, work))
                owner[ref] = actor

    def get(ref, work: Work) -> pa.Table:
        try:
            return ray.get(ref)
        except RayTaskError as error:
            raise JobError(f"shard {work.task.index} failed: {error.cause!r}") from None

    while queue or owner:
        fill()
        # A bounded wait gives Python a moment to act on Ctrl-C between checks.
        ready, _ = ray.wait(list(owner), num_returns=1, timeout=WAIT_S)
        if not ready:
            continue
        actor = owner.pop(ready[0])
        work = next(w for r, w in in_flight[actor] if r == ready[0])
        try:
            result = get(ready[0], work)
        except died as error:
            # The worker is gone with everything it had: keep what it finished, blame the piece
            # that was running (the first unfinished one), and run the rest again elsewhere.
            deaths += 1
            lost = in_flight.pop(actor)
            ray.kill(actor)
            in_flight[start_one()] = []
            blamed = None
            for ref, piece in lost:
                owner.pop(ref, None)
                try:
                    on_result(piece.task, get(ref, piece))
                    continue
                except died:
                    pass
                if blamed is None:
                    blamed = piece
                    task = piece.task
                    say(
                        f"A worker died running rows {task.start}-{task.stop - 1} of shard {task.index}; "
                        f"starting a replacement ({death_cause(error)})"
                    )
                    retry, given_up = after_death(piece, death_cause(error), num_samples)
                    queue.extendleft(reversed(retry))
                    if given_up is not None:
                        on_result(piece.task, given_up)
                else:
                    queue.append(piece)
            continue
        in_flight[actor].remove((ready[0], work))
        on_result(work.task, result)
    return deaths
