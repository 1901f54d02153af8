"""Run shards on a pool of actors, at most two in flight per actor, results handed back in order done."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import pyarrow as pa

from jobs.cluster import PoolPlan
from jobs.errors import JobError
from workers.actor import ShardScorer
from workers.contract import ModelSpec, ScoringSettings, ShardTask

IN_FLIGHT_PER_WORKER = 2


def start_workers(plan: PoolPlan, model: ModelSpec, scoring: ScoringSettings) -> tuple[list, list[dict]]:
    """Start the actors and wait until each has loaded its model; refuse a model that fails to load.

    Returns the actors and what each reports of itself (pid, host, device, dtype, load_s).
    """
    import ray

    scorer = ray.remote(ShardScorer).options(
        num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker, max_restarts=0
    )
    actors = [scorer.remote(model, scoring) for _ in range(plan.workers)]
    infos = ray.get([a.info.remote() for a in actors])
    for info in infos:
        if info.get("error"):
            for actor in actors:
                ray.kill(actor)
            raise JobError(f"a worker could not load the model: {info['error']}")
    return actors, infos


def run_shards(
    actors: Sequence, tasks: Sequence[ShardTask], on_result: Callable[[ShardTask, pa.Table], None]
) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    queue = deque(tasks)
    pending: dict = {}

    def submit(actor) -> None:
        task = queue.popleft()
        pending[actor.score.remote(task)] = (actor, task)

    for _ in range(IN_FLIGHT_PER_WORKER):
        for actor in actors:
            if queue:
                submit(actor)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        actor, task = pending.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as error:
            raise JobError(
                f"a worker died while scoring shard {task.index} (rows {task.start}-{task.stop - 1}): "
                f"{error}; run the same command again to resume from the finished shards"
            ) from None
        except RayTaskError as error:
            raise JobError(f"shard {task.index} failed: {error.cause!r}") from None
        on_result(task, result)
        if queue:
            submit(actor)
